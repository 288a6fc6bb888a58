"""General-ability benchmarks through EleutherAI's lm-eval, on the task YAMLs and question files
shipped in data/general/, so they run offline. Each task's per-document record is kept: the
comparison pairs the same documents across models."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import yaml

from tuneoff.core.errors import TuneoffError

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
