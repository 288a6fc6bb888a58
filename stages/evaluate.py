"""DVC stage `evaluate@<task>-<model>`: score a model on the task's held-out test split, and its
general ability.

<model> is `base` (the untuned base, always a row), `full`, or an adapter method trained on the
float base, for which the merged model is evaluated: that is what would be deployed (the merge
stage has already proved it computes what the adapter does): `--model-dir`. QLoRA has its own stage,
evaluate_nf4, which scores each of its deployable forms. Writes, in `--run-dir` (runs/<task>/<model>/), eval.json
and predictions.jsonl: per test item, in test.jsonl order, input, expected, produced, correct
and `loss` (the reference answer's mean per-token loss; null for an item with no loss token),
so a person can read the failures and a paired comparison can line the items up. The same loaded
model is then scored on the general benchmarks and the other tasks (tuneoff/evaluation/general.py):
benchmark.json and benchmark-items.json. The base is the same model for every
task, so only the first task's evaluate_base scores its general benchmarks; the others' files say
where they are (`benchmarks_of`). One process does both, so the model
loads once and the stage's start-up (imports, W&B, DVC) is paid once.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneoff.core import measure
from tuneoff.core.atomic import write_json, write_jsonl
from tuneoff.core.errors import TuneoffError, user_errors
from tuneoff.core.methods import BASE, METHODS
from tuneoff.core.params import (
    BakeoffParams,
    BenchmarkParams,
    EvaluateParams,
    check_task,
    read_params,
    section,
)
from tuneoff.core.records import EvalRecord, EvalTiming
from tuneoff.core.tracking import flat, stage_run
from tuneoff.evaluation.general import ability_line, general_ability
from tuneoff.evaluation.score import RECORD_COLUMNS, Scored, TestSet, load_test, score_model


@user_errors
def main(task: str, model: str, model_dir: Path, prepared: Path, run: Path) -> None:
    if model in METHODS and METHODS[model].quantized:
        raise TuneoffError(f"evaluate@{task}-{model}: {model} is scored in each deployable form by "
                           f"`dvc repro evaluate_nf4@{task}-{model}`")
    data = read_params()
    check_task(task, data)
    params = section(EvaluateParams, "evaluate", data=data)
    benchmarks = section(BenchmarkParams, "benchmarks", data=data)
    tasks = section(BakeoffParams, "bakeoff", data=data).tasks
    others = [t for t in tasks if t != task]
    test = load_test(prepared / task)
    if not (model_dir / "config.json").is_file():
        raise TuneoffError(f"{model_dir}/config.json not found: run the stages before evaluate@{task}-{model}")

    config = {"evaluate": params.model_dump(), "benchmarks": benchmarks.model_dump()}
    with stage_run("evaluate", config, task=task, method=model, data=data) as tracker:
        dev = measure.device()
        start = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        net = AutoModelForCausalLM.from_pretrained(model_dir, dtype=measure.eval_dtype(params.dtype, dev)).to(dev).eval()
        load_seconds = time.perf_counter() - start
        scored = score_model(net, tokenizer, test, params, dev, f"evaluate {task}/{model}")
        metrics = scored.metrics
        if model == BASE and task != tasks[0]:  # the same model on the same items: scored once, by the first task's stage
            ability, items = general_ability(net, tokenizer, model, others, prepared,
                                             benchmarks.model_copy(update={"tasks": []}), params, dev)
            ability["benchmarks_of"] = items["benchmarks_of"] = tasks[0]
        else:
            ability, items = general_ability(net, tokenizer, model, others, prepared, benchmarks, params, dev)

        out = write_outputs(run, task, model, model_dir, test, scored, load_seconds, ability, items, tracker)
    print(f"evaluate@{task}-{model}: {metrics['main_metric']} {metrics['main']:.3f} "
          f"[{metrics['ci_low']:.3f}, {metrics['ci_high']:.3f}] on {metrics['n']} test examples, "
          f"test loss {scored.test_loss:.3f} -> {out}/eval.json")
    if "benchmarks_of" in ability:
        print(f"evaluate@{task}-{model}: general ability: the base's, scored by evaluate_base@{tasks[0]}")
    else:
        print(f"evaluate@{task}-{model}: general ability {ability_line(ability)} -> {out}/benchmark.json")


def write_outputs(out: Path, task: str, model: str, evaluated: Path, test: TestSet, scored: Scored,
                  load_seconds: float, ability: dict, items: dict, tracker, **form_fields) -> Path:
    """predictions.jsonl, benchmark-items.json, benchmark.json and eval.json in `out` of the model loaded
    from `evaluated` and scored as `scored`, and their summary to `tracker`; returns `out`.
    `form_fields`: evaluate_nf4's deployed_form and forms, in eval.json and the summary too."""
    write_jsonl(out / "predictions.jsonl", scored.records)
    write_json(out / "benchmark-items.json", items)
    write_json(out / "benchmark.json", ability)
    record = EvalRecord(
        task=task, model=model, evaluated=str(evaluated), scorer=test.scorer, metrics=scored.metrics,
        test_loss=round(scored.test_loss, 6), max_new_tokens=scored.max_new_tokens,
        timing=EvalTiming(load_seconds=round(load_seconds, 3), generate_seconds=round(scored.generate_seconds, 3),
                          examples_per_second=round(scored.examples_per_second, 3),
                          stage_seconds=measure.process_seconds(), read_off=scored.read_off), **form_fields)
    write_json(out / "eval.json", record.model_dump(exclude_none=True))
    tracker.summary(flat({"eval": {k: v for k, v in scored.metrics.items() if k != "confusions"}
                                   | {"test_loss": scored.test_loss, **form_fields}}))
    tracker.summary(flat({"benchmark": ability}))
    tracker.table("eval/predictions", RECORD_COLUMNS, [[r[c] for c in RECORD_COLUMNS] for r in scored.records])
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m stages.evaluate")
    parser.add_argument("task")
    parser.add_argument("model", help="base, full, or an adapter method (its merged model)")
    parser.add_argument("--model-dir", type=Path, required=True, help="the model folder scored")
    parser.add_argument("--prepared", type=Path, required=True, help="the prepared data, a folder per task")
    parser.add_argument("--run-dir", dest="run", type=Path, required=True, help="the folder the scores are written in")
    main(**vars(parser.parse_args()))
