"""DVC stage `benchmark*@<task>-<model>`: what fine-tuning on <task> cost the model in general ability.

The model as it would be deployed (the base, full's weights, LoRA merged, QLoRA in the form its
evaluation chose) is scored on
- the general benchmarks in `benchmarks.tasks`, with EleutherAI's lm-evaluation-harness
  (tuneoff/evaluation/general.py; offline, the shipped local tasks under data/general/), the same
  first `benchmarks.limit` items for every model;
- the bake-off's other tasks (a model tuned on extraction, scored on iso_codes): the first
  `benchmarks.cross_task_limit` test items, as its evaluate stage scores them. The base needs no
  such run: its evaluate stage on the other task already scored those items.

Writes runs/<task>/<model>/benchmark.json (the scores) and benchmark-items.json (each item right or
wrong, in item order: the report pairs them with the base's, the same items for every model).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from tuneoff.core import measure
from tuneoff.core.atomic import write_json
from tuneoff.core.errors import TuneoffError, user_errors
from tuneoff.core.methods import BASE, FLOAT_BASE
from tuneoff.core.params import (
    BakeoffParams,
    BenchmarkParams,
    EvaluateParams,
    check_task,
    read_params,
    section,
)
from tuneoff.core.tracking import flat, stage_run
from tuneoff.evaluation.general import run_benchmarks
from tuneoff.evaluation.generate import generate, reply_limit
from tuneoff.evaluation.metrics import score
from tuneoff.evaluation.score import load_test
from tuneoff.modeling.merge import deployment, load_shipped


def load_deployed(task: str, model: str, dev: torch.device, dtype: torch.dtype):
    """The model as it would ship, computing in `dtype` (evaluate's), and its tokenizer."""
    if model == BASE:
        return load_shipped(FLOAT_BASE, None, dev, dtype)
    shipped = deployment(task, model)  # for QLoRA's nf4 form, its adapter folder
    folder = shipped.path
    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        raise TuneoffError(f"{folder} holds no model: run the stages before benchmark@{task}-{model}")
    return load_shipped(folder, shipped.base, dev, dtype)


def cross_task(net, tokenizer, other: str, limit: int, evaluate: EvaluateParams, dev: torch.device) -> dict:
    """The model on the first `limit` test items of another bake-off task, scored as evaluate does."""
    test = load_test(Path("data/prepared") / other)
    n = min(limit, len(test.conversations))
    produced = generate(net, tokenizer, test.conversations[:n], evaluate.batch_size,
                        reply_limit(tokenizer, test.references[:n], evaluate.max_new_tokens), dev, f"cross-task {other}")
    metrics, per_item = score(test.scorer, produced, test.references[:n], test.labels, evaluate.bootstrap_samples,
                              evaluate.seed)
    return {"main_metric": metrics["main_metric"], "main": metrics["main"], "n": n,
            "correct": [bool(row["correct"]) for row in per_item]}


@user_errors
def main(task: str, model: str) -> None:
    data = read_params()
    check_task(task, data)
    params = section(BenchmarkParams, "benchmarks", data=data)
    evaluate = section(EvaluateParams, "evaluate", data=data)
    others = [t for t in section(BakeoffParams, "bakeoff", data=data).tasks if t != task]
    out = Path("runs") / task / model
    with stage_run("benchmark", {"benchmarks": params.model_dump()}, task=task, method=model, data=data) as tracker:
        dev = measure.device()
        start = time.perf_counter()
        net, tokenizer = load_deployed(task, model, dev, measure.eval_dtype(evaluate.dtype, dev))
        general = (run_benchmarks(net, tokenizer, params.tasks, params.limit or None, params.batch_size)
                   if params.tasks else {})
        retained = ({o: cross_task(net, tokenizer, o, params.cross_task_limit, evaluate, dev) for o in others}
                    if model != BASE and params.cross_task_limit else {})
        seconds = time.perf_counter() - start
        write_json(out / "benchmark-items.json", {"benchmarks": {b: s["correct"] for b, s in general.items()},
                                                  "cross_task": {o: s["correct"] for o, s in retained.items()}})
        scores = {"benchmarks": {b: {k: v for k, v in s.items() if k != "correct"} for b, s in general.items()},
                  "cross_task": {o: {k: v for k, v in s.items() if k != "correct"} for o, s in retained.items()},
                  "timing": {"seconds": round(seconds, 1), "stage_seconds": measure.process_seconds()}}
        write_json(out / "benchmark.json", scores)
        tracker.summary(flat({"benchmark": scores}))
    shown = [f"{b} {100 * s['acc']:.1f}%" for b, s in general.items()]
    shown += [f"{o} (cross-task) {100 * s['main']:.1f}%" for o, s in retained.items()]
    print(f"benchmark@{task}-{model}: {', '.join(shown) or 'nothing to score (benchmarks.tasks is empty)'} "
          f"({seconds:.0f} s) -> {out}/benchmark.json")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m stages.benchmark <task> <base|full|lora|qlora>")
    main(sys.argv[1], sys.argv[2])
