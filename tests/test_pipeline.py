"""`dvc repro` over the whole DAG on the tiny model, in a temporary copy of the project."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import API_KEY, make_project, run, stage_command
from huggingface_hub import ModelCard

from tuneoff.modeling.merge import SCORED_FORMS, deployed_form
from tuneoff.training import allocator

pytestmark = pytest.mark.slow
MEASURED = {"timing", "memory", "cost", "examples_per_second", "seconds"}  # the keys of a metrics file a rerun may
# change, at any depth ("seconds": the learning-rate pilots', train.json tuning)
TRAIN_KEYS = {
    "params": {"trainable", "total", "trainable_percent"},
    "tokens": {"budget", "real", "supervised", "steps", "batch_rows"},
    "loss": {"train_final", "val"},
    "memory": {"peak_memory_bytes", "measure", "load_peak_memory_bytes", "allocator"},
    "output": {"path", "kind", "weights_bytes", "folder_bytes"},
    "timing": {"resumed_from_step", "load_seconds", "train_seconds", "eval_seconds", "wall_seconds", "tokens_per_second"},
    "setup": {"base", "seq_len", "steps", "max_step_tokens", "max_supervised_positions", "gradient_checkpointing", "rank",
              "target_modules", "dropout", "micro_batch_rows", "optimizer"},
}


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_base):
    return make_project(tmp_path_factory.mktemp("project"), tiny_base)


def test_repro_runs_every_stage_and_writes_the_metrics(project):
    out = run(["dvc", "repro"], project)
    tasks = ("extraction", "iso_codes")
    for stage in (["import_base", "quantize"] + [f"{s}@{t}" for s in ("prepare", "evaluate_base", "evaluate_full") for t in tasks]
                  + [f"train@{t}-{m}" for t in tasks for m in ("full", "lora")] + [f"train_nf4@{t}-qlora" for t in tasks]
                  + [f"merge@{t}-{m}" for t in tasks for m in ("lora", "qlora")] + [f"evaluate@{t}-lora" for t in tasks]
                  + [f"{s}@{t}-qlora" for s in ("merge_nf4", "evaluate_nf4") for t in tasks]
                  + ["report", "register"]):
        assert f"Running stage '{stage}'" in out
    for task in ("extraction", "iso_codes"):
        meta = json.loads((project / "data/prepared" / task / "meta.json").read_text())
        assert meta["train"]["loss_tokens"] > 0 and all(meta["examples"][s] > 0 for s in ("train", "val", "test"))
        packed = sorted(p.name for p in (project / "data/prepared" / task).glob("*.safetensors"))
        assert packed == ["train.safetensors", "val.safetensors"]  # test is scored from its jsonl, never packed to disk
        runs = {m: json.loads((project / "runs" / task / m / "train.json").read_text()) for m in ("full", "lora", "qlora")}
        for method, metrics in runs.items():
            for group, keys in TRAIN_KEYS.items():
                assert keys <= set(metrics[group]), (method, group)
            assert metrics["device"] == "cpu" and metrics["memory"]["measure"].startswith("cpu_peak_rss")
            assert metrics["memory"]["allocator"] == ("tcmalloc" if allocator.library() else "system")  # allocator: auto
            assert metrics["tokens"]["real"] >= 1500 and metrics["memory"]["peak_memory_bytes"] > 0
            assert "cost" not in metrics and "estimate" not in metrics  # dollars and predictions are the report's
            lines = (project / "runs" / task / method / "loss.csv").read_text().splitlines()
            assert lines[0] == "step,tokens,train_loss,lr" and len(lines) > 2
        # the same data and budget for every method; the same batches, so the same token counts
        assert len({json.dumps(r["tokens"]) for r in runs.values()}) == 1
        assert runs["full"]["params"]["trainable_percent"] == 100
        assert runs["lora"]["params"]["trainable"] == runs["qlora"]["params"]["trainable"] < runs["full"]["params"]["trainable"]
        assert (project / "runs" / task / "full/model/model.safetensors").is_file()
        for m in ("lora", "qlora"):
            assert (project / "runs" / task / m / "model/adapter_model.safetensors").is_file()
            assert runs[m]["output"]["weights_bytes"] < runs["full"]["output"]["weights_bytes"] / 5
        # the base's val loss before training: quantize measured it once per task, float and NF4
        base_val = json.loads((project / "models/quantize.json").read_text())["error"][task]
        assert runs["lora"]["loss"]["val"] < base_val["val_loss_float"]
        assert runs["qlora"]["loss"]["val"] < base_val["val_loss_quantized"]
        for model in ("base", "full", "lora", "qlora"):
            ev = json.loads((project / "runs" / task / model / "eval.json").read_text())
            m = ev["metrics"]
            assert m["main_metric"] == ("exact_match") and 0 <= m["ci_low"] <= m["main"] <= m["ci_high"] <= 1
            assert m["n"] == meta["examples"]["test"] and ev["test_loss"] > 0
            preds = [json.loads(line) for line in (project / "runs" / task / model / "predictions.jsonl").read_text().splitlines()]
            assert len(preds) == m["n"] and all({"input", "expected", "produced", "correct", "loss"} <= set(p) for p in preds)
            # each test item's reference loss, in test.jsonl order; null for an item packing dropped
            losses = [p["loss"] for p in preds if p["loss"] is not None]
            assert len(preds) - len(losses) == meta["test"]["dropped"] and all(loss > 0 for loss in losses)
            assert min(losses) <= ev["test_loss"] <= max(losses)  # their token-weighted mean
        for m in ("lora", "qlora"):
            merge = json.loads((project / "runs" / task / m / "merge.json").read_text())
            assert merge["max_abs_logit_diff"] <= merge["tolerance"] and merge["positions_checked"] > 0
        # QLoRA: every deployable form scored on val, the one chosen there on test; predictions.jsonl is its
        qlora = project / "runs" / task / "qlora"
        merge_nf4 = json.loads((qlora / "merge-nf4.json").read_text())
        assert merge_nf4["max_abs_logit_diff"] <= merge_nf4["tolerance"] and merge_nf4["positions_checked"] > 0
        ev = json.loads((qlora / "eval.json").read_text())
        assert set(ev["forms"]) == set(SCORED_FORMS) and ev["deployed_form"] in SCORED_FORMS
        on_test = {form for form, scores in ev["forms"].items() if "main" in scores}
        assert on_test == {ev["deployed_form"]}  # evaluate.all_forms_on_test is false by default
        assert sorted(p.name for p in (qlora / "forms").iterdir()) == [f"{ev['deployed_form']}.jsonl"]
        scores = ev["forms"][ev["deployed_form"]]
        assert scores["n"] == meta["examples"]["test"] and scores["test_loss"] > 0
        assert ev["metrics"]["main"] == scores["main"]
        # the form that ships was chosen on val: the best val score, then the lower val loss (not the test score)
        on_val = {form: (s["val"]["main"], -s["val"]["loss"]) for form, s in ev["forms"].items()}
        assert all(s["val"]["n"] == meta["examples"]["val"] for s in ev["forms"].values())
        assert ev["deployed_form"] == deployed_form(on_val)
        assert (qlora / "predictions.jsonl").read_text() == (qlora / "forms" / f"{ev['deployed_form']}.jsonl").read_text()
        # general ability: the shipped lm-eval tasks, the same 4 items for every model; tuned models on the other task
        other = next(t for t in tasks if t != task)
        for model in ("base", "full", "lora", "qlora"):
            bench = json.loads((project / "runs" / task / model / "benchmark.json").read_text())
            once = model == "base" and task != tasks[0]  # the base's benchmarks are scored by the first task's stage
            assert bench.get("benchmarks_of") == (tasks[0] if once else None)
            assert {b: s["n"] for b, s in bench["benchmarks"].items()} == (
                {} if once else {"openbookqa_local": 4, "truthfulqa_local_mc1": 4})
            assert list(bench["cross_task"]) == ([] if model == "base" else [other])
        # the model QLoRA trained (adapter on NF4) differs from its float merge by the quantization error
        gap = json.loads((project / "runs" / task / "qlora/merge.json").read_text())["vs_trained_4bit"]
        assert gap["mean_abs_logit_diff"] > 0 and gap["positions"] > 0

    quantized = json.loads((project / "models/quantize.json").read_text())
    assert quantized["quant_type"] == "nf4" and quantized["double_quant"] is True
    assert quantized["size"]["compression"] > 2
    for task in tasks:
        error = quantized["error"][task]
        assert 0 < error["mean_abs_logit_diff"] <= error["max_abs_logit_diff"] and error["val_loss_quantized"] > 0


    report = (project / "reports/report.md").read_text()
    assert report.splitlines()[2] == "## extraction" and "| method | exact_match % [95% CI] |" in report
    assert (project / "reports/extraction.png").stat().st_size > 10_000
    comparison = json.loads((project / "reports/comparison.json").read_text())
    assert [r["method"] for r in comparison["tasks"][0]["rows"]] == ["base", "full", "lora", "qlora"]
    general = comparison["tasks"][0]["general"]
    assert {(p["a"], p["b"]) for p in general["pairs"]} == {("full", "base"), ("lora", "base"), ("qlora", "base"),
                                                          ("lora", "full")}
    assert "| openbookqa_local | 4 | " in report and "| iso_codes (cross-task) | 4 | " in report
    # where the time went: every record's stage, its process's whole wall time
    seconds = comparison["stage_seconds"]
    assert {"quantize", "extraction/lora train", "extraction/base evaluate", "extraction/qlora merge (NF4)",
            "iso_codes/full evaluate"} <= set(seconds) and all(s > 1 for s in seconds.values())
    assert "## Where the time went" in report and "| extraction/lora train | " in report
    decisions = json.loads((project / "registry/decision.json").read_text())
    stored = project / "registry/registry.json"
    registry = json.loads(stored.read_text())["models"] if stored.exists() else {}
    for task in ("extraction", "iso_codes"):
        d = decisions[task]
        assert d["rationale"]
        if d["method"] is not None:  # a tiny random model may beat its base or not; both are valid outcomes
            v = registry[f"{task}-model"][-1]
            assert v["method"] == d["method"] and v["stage"] == "production" and v["lineage"]["outs"]
            published = project / "models/production" / task
            weights = list((project / v["path"]).glob("*.safetensors"))  # a merged model, or for QLoRA's nf4 form its adapter
            assert weights and all((published / f.name).read_bytes() == f.read_bytes() for f in weights)
    for name in ("curves.csv", "tradeoff.csv"):
        assert len((project / "reports" / name).read_text().splitlines()) > 6


def unmeasured(data):
    """A metrics file's contents without its MEASURED keys (evaluate_nf4's speed is per form)."""
    if isinstance(data, dict):
        return {k: unmeasured(v) for k, v in data.items() if k not in MEASURED}
    return data


def deterministic_outputs(project: Path) -> dict:
    """Every metrics file without its measured keys, the loss logs and predictions, and the hash
    of every DVC output (weights, adapters, prepared data) but the report's and registry's."""
    files = {}
    for path in sorted([*project.glob("runs/*/*/*.json"), project / "models/quantize.json"]):
        files[str(path.relative_to(project))] = unmeasured(json.loads(path.read_text()))
    for path in sorted([*project.glob("runs/*/*/*.csv"), *project.glob("runs/*/*/predictions*.jsonl")]):
        files[str(path.relative_to(project))] = path.read_text()
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    files["dvc.lock outs"] = {o["path"]: o["md5"] for name, s in lock.items() if name not in ("report", "register")
                              for o in s.get("outs", []) if not o["path"].endswith(".json")}  # metrics: above
    return files


def test_forced_rerun_gives_identical_results(project):
    """Every stage of one task (and the shared ones), forced to run again; the other task's stages
    are the same code on other data, so rerunning them would only double the test's time."""
    first = deterministic_outputs(project)
    assert len(first["dvc.lock outs"]) > 20
    scored = [f"{s}@extraction" for s in ("evaluate_base", "evaluate_full")] + ["evaluate@extraction-lora",
                                                                                "evaluate_nf4@extraction-qlora"]
    out = run(["dvc", "repro", "-f", *scored], project)  # forced with their upstream: 13 stages
    assert {"import_base", "quantize", "prepare@extraction", "train@extraction-full", "train_nf4@extraction-qlora",
            "merge_nf4@extraction-qlora"} <= {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    # what changed are the measured times the report prices, so only it and register follow
    out = run(["dvc", "repro"], project)
    assert sorted(line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")) == [
        "register", "report"]
    second = deterministic_outputs(project)
    assert second.keys() == first.keys()
    for name in first:
        assert second[name] == first[name], name


def test_wandb_offline_runs_hold_each_stage(project):
    from wandb_records import read_runs

    runs = {r.name: r for r in read_runs(project / "wandb")}
    tasks = ("extraction", "iso_codes")
    assert {f"train@{t}-{m}" for t in tasks for m in ("full", "lora", "qlora")} | {"report", "quantize"} <= set(runs)
    assert {r.group for r in runs.values()} == {"bakeoff-test"} and all(r.exit_code == 0 for r in runs.values())

    train = runs["train@extraction-lora"]
    assert train.job_type == "train" and {"extraction", "lora"} <= set(train.tags)
    # config: exactly the params sections the stage read, plus git and dvc.lock
    assert set(train.config["params"]) == {"train.common", "train.lora"}
    assert train.config["params"]["train.lora"]["rank"] == 16 and train.config["git"]["commit"]
    metrics = json.loads((project / "runs/extraction/lora/train.json").read_text())
    assert train.summary["timing/wall_seconds"] == metrics["timing"]["wall_seconds"]
    assert train.summary["memory/peak_memory_bytes"] == metrics["memory"]["peak_memory_bytes"]
    steps = [h for h in train.history if "train/loss" in h]
    assert len(steps) >= 2 and all({"train/lr", "train/tokens_per_second", "memory/current_bytes"} <= set(h) for h in steps)
    (model,) = train.artifacts
    assert model["name"] == "extraction-lora" and model["type"] == "model"
    assert model["metadata"]["trained_on"] == "extraction-data" and any(f.endswith("adapter_model.safetensors") for f in model["files"])
    assert not any(model["refs"])  # an adapter is small: its files are in the artifact, for a reviewer to download
    assert runs["prepare@extraction"].artifacts[0]["type"] == "dataset"
    assert runs["merge@extraction-qlora"].artifacts[0]["name"] == "extraction-qlora-merged"

    evaluate = runs["evaluate_nf4@extraction-qlora"]
    ev = json.loads((project / "runs/extraction/qlora/eval.json").read_text())
    assert evaluate.summary["eval/main"] == ev["metrics"]["main"] and evaluate.summary["eval/ci_low"] == ev["metrics"]["ci_low"]
    assert evaluate.summary["eval/predictions/nrows"] == ev["metrics"]["n"]
    assert evaluate.summary["eval/deployed_form"] == ev["deployed_form"]
    assert all(evaluate.summary[f"eval/forms/{form}/val/main"] == ev["forms"][form]["val"]["main"] for form in SCORED_FORMS)
    assert runs["merge_nf4@extraction-qlora"].artifacts[0]["name"] == "extraction-qlora-merged-nf4"

    report = runs["report"]
    assert report.summary["report/comparison/nrows"] == 8  # 2 tasks x (base + 3 methods)
    assert report.summary["report/extraction/_type"] == "image-file"
    assert set(report.config["params"]) == {"bakeoff", "decide", "cost", "estimate"}


def test_api_key_is_in_no_file_the_run_wrote(project):
    leaked = [str(p) for p in project.rglob("*") if p.is_file() and API_KEY.encode() in p.read_bytes()]
    assert not leaked


def test_dvc_plots_and_artifacts_are_declared(project):
    out = run(["dvc", "plots", "show", "--json"], project)
    plots = json.loads(out[out.index("{"):])["data"]
    specs = [p["content"] for key in ("reports/curves.csv", "reports/tradeoff.csv")
             for p in plots[key]]
    assert len(specs) == 2 and all(spec["facet"]["column"]["field"] == "task" for spec in specs)
    curves = specs[0]["data"]["values"]
    assert {row["method"] for row in curves} == {"full", "lora", "qlora"}
    listed = yaml.safe_load((project / "dvc.yaml").read_text())["artifacts"]
    assert {name: a["path"] for name, a in listed.items()} == {f"{t}-model": f"models/production/{t}"
                                                               for t in ("extraction", "iso_codes")}


def test_results_table_lists_every_run(project):
    out = run([sys.executable, "-m", "tuneoff.cli", "results"], project)
    rows = [line.split() for line in out.splitlines()[1:] if line.startswith(("extraction", "iso_codes"))]
    assert sorted((r[0], r[1]) for r in rows) == sorted(
        (t, m) for t in ("extraction", "iso_codes") for m in ("full", "lora", "qlora"))
    assert "cpu_peak_rss" in out.splitlines()[-1]
    found = json.loads(run([sys.executable, "-m", "tuneoff.cli", "results", "--json"], project))
    comparison = json.loads((project / "reports/comparison.json").read_text())
    lora = next(r for r in found["runs"] if (r["task"], r["method"]) == ("extraction", "lora"))
    row = next(r for r in comparison["tasks"][0]["rows"] if r["method"] == "lora")
    assert (lora["main"], lora["ci"]) == (row["main"], [row["ci_low"], row["ci_high"]])
    base_val = json.loads((project / "models/quantize.json").read_text())["error"]["extraction"]
    qlora = next(r for r in found["runs"] if (r["task"], r["method"]) == ("extraction", "qlora"))
    assert (lora["val_loss_before"], qlora["val_loss_before"]) == (base_val["val_loss_float"], base_val["val_loss_quantized"])
    for task, decision in comparison["decisions"].items():
        assert found["verdicts"][task]["verdict"] == decision["verdict"]
        assert f"verdict {task}: {decision['verdict']}" in out


def test_merged_models_load_without_peft_or_bitsandbytes(project):
    code = ("import sys; sys.modules['peft'] = None; sys.modules['bitsandbytes'] = None\n"
            "from transformers import AutoModelForCausalLM\n"
            "for form in ('merged', 'merged-nf4'):\n"
            "    m = AutoModelForCausalLM.from_pretrained(f'runs/extraction/qlora/{form}')\n"
            "    assert not any('lora' in n for n, _ in m.named_parameters())\n")
    run([sys.executable, "-c", code], project)


def test_second_repro_does_nothing_and_rank_reruns_only_lora(project):
    out = run(["dvc", "repro"], project)
    assert "Running stage" not in out
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["lora"]["rank"] = 8
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro"], project)
    ran = sorted(line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage"))
    assert ran == sorted([f"{s}@{t}-lora" for s in ("train", "merge", "evaluate")
                          for t in ("extraction", "iso_codes")] + ["register", "report"])


def test_a_price_or_estimator_edit_reruns_only_report_and_register(project):
    """Dollars and the estimator's predictions are computed where they are reported: no model retrains."""
    def lora_row():
        comparison = json.loads((project / "reports/comparison.json").read_text())
        return next(r for r in comparison["tasks"][0]["rows"] if r["method"] == "lora")["train"]

    before = lora_row()
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["cost"]["price_per_hour"]["cpu"] *= 3
    params["estimate"]["overhead_gib"]["cpu"] += 0.5
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro"], project)
    ran = sorted(line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage"))
    assert ran == ["register", "report"]
    after = lora_row()
    assert after["cost_usd"] == pytest.approx(3 * before["cost_usd"], abs=3e-6)  # both rounded to 1e-6 USD
    assert after["estimate"]["peak_memory_bytes"] == before["estimate"]["peak_memory_bytes"] + 2**29


def test_quantize_params_rerun_only_qlora(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["quantize"]["double_quant"] = False
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro"], project)
    ran = sorted(line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage"))
    assert ran == sorted(["quantize", "register", "report"] + [f"train_nf4@{t}-qlora" for t in ("extraction", "iso_codes")]
                         + [f"{s}@{t}-qlora" for s in ("merge", "merge_nf4", "evaluate_nf4")
                            for t in ("extraction", "iso_codes")])
    assert json.loads((project / "models/quantize.json").read_text())["double_quant"] is False


def test_bad_params_fail_the_stage_with_one_line(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["lora"]["target_modules"] = ["q_proj", "query"]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = (project / "runs/extraction/lora/train.json").read_bytes()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(stage_command("train", task="extraction", method="lora"), cwd=project, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: params.yaml: train.lora.target_modules: ['query']")
    assert "Traceback" not in proc.stderr
    assert (project / "runs/extraction/lora/train.json").read_bytes() == before  # nothing half-written


def test_register_scores_production_beside_the_new_version(project, tiny_base):
    """A decided verdict registered into an empty registry: the first version is promoted and
    published. Registered again unchanged, after its published copy was lost (a crash), it is the
    same version, published again; so is a retrain to the same weights (only train.json's hash differs). Then
    a retrain with another lineage (dvc.lock's hash of the adapter edited) but the same weights is scored
    beside production (reloaded from
    models/production) on the same test items: it answers every item alike (+0.0 points), but a
    handful of items cannot show it is within the margin, so production stays."""
    moved = {name: project / name for name in ("registry", "models/production")}
    for name, path in moved.items():
        if path.exists():
            path.rename(path.with_name(path.name + ".kept"))
    comparison_file, lock_file = project / "reports/comparison.json", project / "dvc.lock"
    original, original_lock = comparison_file.read_text(), lock_file.read_text()
    report = json.loads(original)
    for task in ("extraction", "iso_codes"):
        report["decisions"][task].update(method="lora", verdict="decided")
    comparison_file.write_text(json.dumps(report))
    published = project / "models/production/extraction"
    try:
        run(stage_command("register"), project)
        first = sorted(p.name for p in published.iterdir())
        card = ModelCard.load(published / "README.md")  # a Hugging Face model card, metadata and all
        lora = next(r for r in report["tasks"][0]["rows"] if r["method"] == "lora")
        assert card.data.base_model == str(tiny_base) and card.data.library_name == "transformers"  # merged
        assert card.data.eval_results[0].metric_value == lora["main"] and "# extraction-model v1" in card.text
        shutil.rmtree(published)
        again = run(stage_command("register"), project)
        assert "register: extraction-model v1 (lora) -> production" in again
        assert len(json.loads((project / "registry/registry.json").read_text())["models"]["extraction-model"]) == 1
        assert sorted(p.name for p in published.iterdir()) == first
        lock = yaml.safe_load(original_lock)
        outs = lock["stages"]["train@extraction-lora"]["outs"]
        next(o for o in outs if o["path"].endswith("train.json"))["md5"] = "1" * 32  # a retrain, the same weights
        lock_file.write_text(yaml.safe_dump(lock, sort_keys=False))
        same = run(stage_command("register"), project)
        assert "register: extraction-model v1 (lora) -> production" in same
        assert len(json.loads((project / "registry/registry.json").read_text())["models"]["extraction-model"]) == 1
        next(o for o in outs if o["path"].endswith("model"))["md5"] = "0" * 32 + ".dir"
        lock_file.write_text(yaml.safe_dump(lock, sort_keys=False))
        out = run(stage_command("register"), project)
        versions = json.loads((project / "registry/registry.json").read_text())["models"]["extraction-model"]
    finally:
        comparison_file.write_text(original)
        lock_file.write_text(original_lock)
        for path in moved.values():
            if path.exists():
                shutil.rmtree(path)
            kept = path.with_name(path.name + ".kept")
            if kept.exists():
                kept.rename(path)
    n = json.loads((project / "data/prepared/extraction/meta.json").read_text())["examples"]["test"]
    assert [v["stage"] for v in versions] == ["production", "staging"]
    assert versions[0]["reason"] == "first version of this model"
    assert versions[1]["reason"].startswith("challenger - production +0.0 points [")
    assert f"on the same {n} test items: cannot tell whether it is within the 2-point margin" in versions[1]["reason"]
    assert versions[1]["form"] == "float-merged" and versions[1]["test_sha256"] == versions[0]["test_sha256"]
    assert "register: extraction-model v2 (lora) -> staging" in out
    from wandb_records import read_runs

    # the promotion reached W&B as an alert (Slack or e-mail, as the team set it up there)
    alerts = [a for r in read_runs(project / "wandb") if r.name == "register@extraction-lora" for a in r.alerts]
    assert {"title": "tuneoff: extraction-model v1 (lora) in production", "text": "first version of this model",
            "level": "INFO"} in alerts


def test_more_seeds_train_again_and_the_pairs_cover_them(project):
    """bakeoff.more_seeds: every method trains once more per seed and is scored as trained; the pairs
    then resample items and seeds, and the report shows each seed's score."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["lora"]["target_modules"] = ["q_proj", "v_proj"]  # as trained (the test above broke it)
    params["bakeoff"]["more_seeds"] = [1]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro"], project)
    ran = sorted(line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage"))
    assert ran == sorted([f"train_seed@{t}-{m}-1" for t in ("extraction", "iso_codes") for m in ("full", "lora")]
                         + [f"train_seed_nf4@{t}-qlora-1" for t in ("extraction", "iso_codes")] + ["register", "report"])
    seed_run = project / "runs/extraction/lora/seeds/1"
    assert json.loads((seed_run / "train.json").read_text())["seed"] == 1
    primary = json.loads((project / "runs/extraction/lora/train.json").read_text())
    assert primary["seed"] == 0 and json.loads((seed_run / "eval.json").read_text())["metrics"]["n"] > 0
    comparison = json.loads((project / "reports/comparison.json").read_text())["tasks"][0]
    lora_full = next(p for p in comparison["pairs"] if (p["a"], p["b"]) == ("lora", "full"))
    assert lora_full["seeds"] == [2, 2] and lora_full["interval"].startswith("t (items + seeds")
    assert lora_full["ci_points"][0] <= lora_full["diff_points"] <= lora_full["ci_points"][1]
    assert len(comparison["seeds"]["qlora"]["main_points"]) == 2
    assert "% per seed | sd (points) |" in (project / "reports/report.md").read_text()
