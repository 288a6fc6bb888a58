"""DVC stage `register`: the recommended model of each task becomes a new registry version, with
its lineage; registry/decision.json holds each decision, its rationale and what register did.

Only a decided verdict registers anything: an inconclusive one, or one where no method beats the
base, leaves the registry and production as they are. A new version replaces production only if,
scored here on the current test split beside the production model (paired, the same items), it is
at least as good (tuneoff/decision/decide.py `replaces_champion`). A promoted version is published to
`--production`/<task>/ (models/production/<task>/, the path dvc.yaml's `artifacts:` section names:
`dvc artifacts get . <task>-model`). The registry is `--out` (registry/).
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from tuneoff.core import measure
from tuneoff.core.atomic import write_json
from tuneoff.core.errors import TuneoffError, user_errors
from tuneoff.core.lineage import git_revision, lock_hashes
from tuneoff.core.methods import NF4_BASE
from tuneoff.core.methods import method as method_named
from tuneoff.core.params import (
    BaseModelParams,
    DecideParams,
    EvaluateParams,
    TrackingParams,
    read_params,
    section,
)
from tuneoff.core.records import Comparison, read, read_jsonl
from tuneoff.core.tracking import flat, stage_run
from tuneoff.decision.decide import replaces_champion
from tuneoff.decision.pairs import continuous, scores
from tuneoff.decision.registry import model_card, register
from tuneoff.evaluation.score import load_test, score_model
from tuneoff.modeling.merge import adapter_dir, deployment, load_shipped

def test_sha256(prepared: Path) -> str:
    """Which test split a score is on: the sha256 of the prepared task's test.jsonl."""
    return hashlib.sha256((prepared / "test.jsonl").read_bytes()).hexdigest()


def score_production(task: str, folder: Path, prepared: Path, production: dict,
                     params: EvaluateParams) -> list[float | None]:
    """Per-item score of the production model published in `folder` on the current test split in `prepared`
    (1/0 for right/wrong)."""
    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        raise TuneoffError(f"{folder}/ holds no model, but the registry names production v{production['version']}: "
                           f"restore it (`dvc pull {folder.parent}`) so the new version can be scored beside it")
    dev = measure.device()
    net, tokenizer = load_shipped(folder, Path(production["base"]) if "base" in production else None, dev,
                                  measure.eval_dtype(params.dtype, dev))
    scored = score_model(net, tokenizer, load_test(prepared), params, dev,
                         f"register {task}: production v{production['version']}")
    return scores(scored.records)


@user_errors
def main(comparison_file: Path, prepared: Path, runs: Path, out: Path, production_dir: Path) -> None:
    if not comparison_file.is_file():
        raise TuneoffError(f"{comparison_file} not found: run `dvc repro report` first")
    report = read(Comparison, comparison_file)
    params = read_params()
    tracking_params = section(TrackingParams, "tracking", data=params)
    rules = section(DecideParams, "decide", data=params)
    evaluate = section(EvaluateParams, "evaluate", data=params)
    revision = git_revision()
    source = section(BaseModelParams, "base_model", data=params)
    base_model = source.wheel if source.source == "wheel" else source.path
    production_dir.mkdir(parents=True, exist_ok=True)  # the stage's output, even before any version is promoted
    decisions = {}
    for comparison in report["tasks"]:
        task = comparison["task"]
        decision = report["decisions"][task]
        decisions[task] = dict(decision)
        if decision["verdict"] != "decided":
            decisions[task]["registered"] = None
            decisions[task]["register"] = (f"nothing registered ({decision['verdict']}): the registry and "
                                           f"{production_dir} are unchanged")
            print(f"register: {task}: nothing registered, the verdict is {decision['verdict']}")
            continue
        method = decision["method"]
        row = next(r for r in comparison["rows"] if r["method"] == method)
        run = runs / task / method
        deployed = deployment(run, method)
        test_hash = test_sha256(prepared / task)
        records = read_jsonl(run / "predictions.jsonl")
        challenger = scores(records)

        def judge(production: dict | None) -> tuple[bool, str]:
            if production is None:
                return True, "first version of this model"
            promote, reason = replaces_champion(challenger, score_production(task, production_dir / task, prepared / task, production, evaluate),
                                                rules.max_gap_points, continuous(records))
            if production.get("test_sha256") != test_hash:
                reason += (f" (the test split changed since production v{production['version']} was registered; "
                           "both were scored on the current one here)")
            return promote, reason

        stages = ([method_named(method).train_stage(task), f"prepare@{task}", "import_base"]
                  + {"float-merged": [f"merge@{task}-{method}"], "nf4-merged": [f"merge_nf4@{task}-{method}"]}.get(
                      deployed.form, []) + (["quantize"] if deployed.base == NF4_BASE else []))
        version = register(out, f"{task}-model", {
            "method": method, "path": str(deployed.path), "main_metric": comparison["main_metric"],
            # the unmerged adapter too, and the form and base it ships in: `tuneoff serve` hot-swaps adapters
            # on one base instead of loading merged copies
            **({"adapter": str(adapter_dir(run)), "form": deployed.form, "base": str(deployed.base)}
               if method_named(method).adapter else {}),
            "main": row["main"], "ci": [row["ci_low"], row["ci_high"]], "test_sha256": test_hash,
            "test_examples": len(challenger),
            "lineage": {"git": revision, **lock_hashes(stages)},
            "params": {"train": params["train"], "prepare": params["prepare"], "task": params["tasks"][task]},
            "metrics": {"eval": row["metrics"], "train": row["train"]},
        }, judge, publish_to=production_dir / task,
            card=lambda v: model_card(f"{task}-model", v, task, base_model, comparison["main_metric"], decision["rationale"]))
        decisions[task]["registered"] = {"name": f"{task}-model", "version": version["version"],
                                         "stage": version["stage"], "reason": version["reason"]}
        if version["stage"] == "production":
            decisions[task]["registered"]["published"] = str(production_dir / task)
        with stage_run("register", {"decide": rules.model_dump()}, task=task, method=method) as tracker:
            tracker.summary(flat({"registered": decisions[task]["registered"], "main": row["main"]}))
            if version["stage"] == "production":
                tracker.alert(f"tuneoff: {task}-model v{version['version']} ({method}) in production", version["reason"])
            # the same version and stage as the local registry, as artifact aliases and a registry link
            tracker.link(f"{task}-model", "model", deployed.path, {k: v for k, v in version.items() if k != "params"},
                         f"{tracking_params.registry}/{task}-model",
                         (f"v{version['version']}-local", version["stage"]))
        print(f"register: {task}-model v{version['version']} ({method}) -> {version['stage']}: {version['reason']}")
    write_json(out / "decision.json", decisions)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m stages.register")
    parser.add_argument("--comparison", type=Path, required=True, dest="comparison_file", help="the report's comparison.json")
    parser.add_argument("--prepared", type=Path, required=True, help="the prepared data, a folder per task")
    parser.add_argument("--runs", type=Path, required=True, help="every run's folder (the recommended one's predictions and model)")
    parser.add_argument("--out", type=Path, required=True, help="the registry's folder")
    parser.add_argument("--production", type=Path, required=True, dest="production_dir",
                        help="where a promoted version is published, a folder per task")
    main(**vars(parser.parse_args()))
