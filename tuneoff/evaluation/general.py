"""General ability: what fine-tuning on a task cost the model, scored by the stage that evaluates it
(evaluate, evaluate_nf4) on the model it already loaded, as that model would be deployed (the base,
full's weights, LoRA merged, QLoRA in the form its evaluation chose):

- the general benchmarks in `benchmarks.tasks`, with EleutherAI's lm-evaluation-harness, on the task
  YAMLs and question files shipped in data/general/ (offline), the same first `benchmarks.limit`
  items for every model;
- the bake-off's other tasks (a model tuned on extraction, scored on iso_codes): the first
  `benchmarks.cross_task_limit` test items, as evaluate scores them. The base needs no such run: its
  evaluation on the other task already scored those items.

Each item's right or wrong is kept (runs/<task>/<model>/benchmark-items.json): the report pairs the
same items across models.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
import yaml

from tuneoff.core.errors import TuneoffError
from tuneoff.core.methods import BASE
from tuneoff.core.params import BenchmarkParams, EvaluateParams
from tuneoff.evaluation.generate import generate, reply_limit
from tuneoff.evaluation.score import load_test, score_replies

TASKS_DIR = Path("data/general")  # relative to the project root, as are the YAMLs' data_files


def run_benchmarks(model, tokenizer, tasks: list[str], limit: int | None, batch_size: int,
                   include_path: Path = TASKS_DIR) -> dict[str, dict]:
    """Score a loaded transformers model on lm-eval tasks defined under `include_path`.

    Returns, per task: {"acc", "acc_norm" (None when the task has none), "n", "correct"}, where
    `correct` holds one bool per document in doc_id order (the first `limit` documents of the file),
    and its mean is lm-eval's acc. lm-eval's own tasks (mmlu, hellaswag, ...) are indexed only when
    one is asked for (~5 s), and read their data from the Hub.
    """
    local = {yaml.safe_load(f.read_text()).get("task") for f in include_path.glob("*.yaml")}
    if set(tasks) <= local:  # datasets reads this once, at import: no download-counter ping offline
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # INFO: seeds, task building, request counts
    manager = TaskManager(include_path=str(include_path), include_defaults=not set(tasks) <= local)
    for name in tasks:
        if name not in manager.all_tasks:
            raise TuneoffError(f"benchmarks.tasks: unknown lm-eval task {name!r} (not lm-eval's, and no YAML under "
                               f"{include_path} defines it)")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    # bootstrap_iters=0: the standard errors go unused; the paired comparison reads `correct`
    out = simple_evaluate(lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=True,
                          use_cache=None, cache_requests=False, bootstrap_iters=0)
    scores = {}
    for name in tasks:
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        metrics = out["results"][name]
        scores[name] = {"acc": metrics["acc,none"], "acc_norm": metrics.get("acc_norm,none"), "n": len(samples),
                        "correct": [s["acc"] == 1.0 for s in samples]}
    return scores


def cross_task(net, tokenizer, other: str, prepared: Path, limit: int, evaluate: EvaluateParams,
               dev: torch.device) -> dict:
    """The model on the first `limit` test items of another bake-off task (prepared in `prepared`/`other`),
    scored as evaluate does."""
    test = load_test(prepared / other)
    n = min(limit, len(test.conversations))
    produced = generate(net, tokenizer, test.conversations[:n], evaluate.batch_size,
                        reply_limit(tokenizer, test.references[:n], evaluate.max_new_tokens), dev, f"cross-task {other}")
    metrics, per_item = score_replies(test, produced, evaluate)
    return {"main_metric": metrics["main_metric"], "main": metrics["main"], "n": n,
            "correct": [bool(row["correct"]) for row in per_item]}


def general_ability(net, tokenizer, model: str, others: list[str], prepared: Path, params: BenchmarkParams,
                    evaluate: EvaluateParams, dev: torch.device) -> tuple[dict, dict]:
    """The loaded model's benchmark.json (scores, and the seconds they took) and benchmark-items.json
    (each item right or wrong, in item order); `others` are the bake-off's other tasks, each prepared
    in a folder of `prepared`."""
    start = time.perf_counter()
    general = (run_benchmarks(net, tokenizer, params.tasks, params.limit or None, params.batch_size)
               if params.tasks else {})
    retained = ({o: cross_task(net, tokenizer, o, prepared, params.cross_task_limit, evaluate, dev) for o in others}
                if model != BASE and params.cross_task_limit else {})
    items = {"benchmarks": {b: s["correct"] for b, s in general.items()},
             "cross_task": {o: s["correct"] for o, s in retained.items()}}
    scores = {"benchmarks": {b: {k: v for k, v in s.items() if k != "correct"} for b, s in general.items()},
              "cross_task": {o: {k: v for k, v in s.items() if k != "correct"} for o, s in retained.items()},
              "timing": {"seconds": round(time.perf_counter() - start, 1)}}
    return scores, items


def ability_line(scores: dict) -> str:
    """benchmark.json in one line, as the stage prints it."""
    shown = [f"{b} {100 * s['acc']:.1f}%" for b, s in scores["benchmarks"].items()]
    shown += [f"{o} (cross-task) {100 * s['main']:.1f}%" for o, s in scores["cross_task"].items()]
    return f"{', '.join(shown) or 'no general benchmark (benchmarks.tasks is empty)'} ({scores['timing']['seconds']:.0f} s)"
