"""DVC stage `register`: the recommended model of each task becomes a new registry version,
with its lineage; registry/decision.json holds each decision and its rationale. A version
promoted to production is published to models/production/<task>/, the path dvc.yaml's
`artifacts:` section names (`dvc artifacts get . <task>-model`)."""

from __future__ import annotations

import json
from pathlib import Path

from tuneoff.atomic import write_json
from tuneoff.errors import TuneoffError, user_errors
from tuneoff.merge import adapter_dir, deployable_dir
from tuneoff.params import TrackingParams, read_params, section
from tuneoff.tracking import flat, stage_run
from tuneoff import methods
from tuneoff.registry import git_revision, lock_hashes, publish, register

REGISTRY = Path("registry")
PRODUCTION = Path("models/production")


@user_errors
def main() -> None:
    comparison_file = Path("reports/comparison.json")
    if not comparison_file.is_file():
        raise TuneoffError(f"{comparison_file} not found: run `dvc repro report` first")
    report = json.loads(comparison_file.read_text())
    params = read_params()
    tracking_params = section(TrackingParams, "tracking", data=params)
    revision = git_revision()
    PRODUCTION.mkdir(parents=True, exist_ok=True)  # the stage's output, even before any version is promoted
    decisions = {}
    for comparison in report["tasks"]:
        task = comparison["task"]
        decision = report["decisions"][task]
        decisions[task] = dict(decision)
        if decision["method"] is None:
            print(f"register: {task}: nothing registered ({decision['rationale']})")
            continue
        row = next(r for r in comparison["rows"] if r["method"] == decision["method"])
        method = decision["method"]
        path = deployable_dir(task, method)
        stages = ([methods.train_stage(task, method), f"prepare@{task}", "import_base"]
                  + ([] if method == "full" else [f"merge@{task}-{method}"]) + (["quantize"] if method == "qlora" else []))
        version = register(REGISTRY, f"{task}-model", {
            "method": decision["method"], "path": str(path), "main_metric": comparison["main_metric"],
            # the unmerged adapter too: `tuneoff serve` hot-swaps adapters on one base instead of loading merged copies
            **({} if method == "full" else {"adapter": str(adapter_dir(task, method))}),
            "main": row["main"], "ci": [row["ci_low"], row["ci_high"]],
            "lineage": {"git": revision, **lock_hashes(stages)},
            "params": {"train": params["train"], "prepare": params["prepare"], "task": params["tasks"][task]},
            "metrics": {"eval": row["metrics"], "train": row["train"]},
        })
        decisions[task]["registered"] = {"name": f"{task}-model", "version": version["version"],
                                         "stage": version["stage"], "reason": version["reason"]}
        if version["stage"] == "production":
            publish(path, PRODUCTION / task)
            decisions[task]["registered"]["published"] = str(PRODUCTION / task)
        with stage_run("register", {"decide": params["decide"]}, task=task, method=method) as tracker:
            tracker.summary(flat({"registered": decisions[task]["registered"], "main": row["main"]}))
            # the same version and stage as the local registry, as artifact aliases and a registry link
            tracker.link(f"{task}-model", "model", path, {k: v for k, v in version.items() if k != "params"},
                         f"{tracking_params.registry}/{task}-model",
                         (f"v{version['version']}-local", version["stage"]))
        print(f"register: {task}-model v{version['version']} ({decision['method']}) -> {version['stage']}: "
              f"{version['reason']}")
    write_json(REGISTRY / "decision.json", decisions)


if __name__ == "__main__":
    main()
