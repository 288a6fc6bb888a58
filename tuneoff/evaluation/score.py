"""Score one model on a task's test split: its greedy answer to each item, scored, and the loss
of each item's reference answer under the model. The per-item records are what a paired
comparison between methods reads (predictions.jsonl)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tuneoff.core.errors import TuneoffError
from tuneoff.core.params import EvaluateParams
from tuneoff.core.records import read_jsonl
from tuneoff.evaluation.generate import generate, reply_limit
from tuneoff.evaluation.metrics import score
from tuneoff.training.loop import example_losses, load_rows

RECORD_COLUMNS = ["input", "expected", "produced", "correct", "loss"]  # the first keys of each record


@dataclass(frozen=True)
class TestSet:
    scorer: str
    labels: list[str]
    conversations: list[list[dict]]  # each test item without its reference answer, in test.jsonl order
    references: list[str]
    rows: dict[str, torch.Tensor]  # the split packed by prepare; rows["example"] indexes test.jsonl


def load_test(prepared: Path) -> TestSet:
    """data/prepared/<task>/'s test split: the chat examples and their packed rows."""
    for name in ("meta.json", "test.jsonl", "test.safetensors"):
        if not (prepared / name).is_file():
            raise TuneoffError(f"{prepared / name} not found: run `dvc repro prepare@{prepared.name}` first")
    meta = json.loads((prepared / "meta.json").read_text())
    examples = read_jsonl(prepared / "test.jsonl")
    rows = load_rows(prepared / "test.safetensors")
    if "example" not in rows:
        raise TuneoffError(f"{prepared}/test.safetensors predates per-example losses: "
                           f"rerun `dvc repro prepare@{prepared.name}`")
    return TestSet(meta["scorer"], meta["labels"], [ex["messages"][:-1] for ex in examples],
                   [ex["messages"][-1]["content"] for ex in examples], rows)


@dataclass
class Scored:
    metrics: dict  # scoring.score's: main, its 95% CI, n, the scorer's own metrics
    records: list[dict]  # per item, in test.jsonl order: RECORD_COLUMNS (+ the scorer's per-item fields)
    test_loss: float  # mean loss over every reference token (token-weighted, as train's eval_loss)
    generate_seconds: float
    max_new_tokens: int  # the reply limit generation used (generate.reply_limit)

    @property
    def examples_per_second(self) -> float:
        return len(self.records) / self.generate_seconds


def score_model(model, tokenizer, test: TestSet, params: EvaluateParams, dev: torch.device, label: str) -> Scored:
    """Generate, score and compute each reference's loss; the loss runs in float32, as the model loads."""
    start = time.perf_counter()
    limit = reply_limit(tokenizer, test.references, params.max_new_tokens)
    predictions = generate(model, tokenizer, test.conversations, params.batch_size, limit, dev, label)
    generate_seconds = time.perf_counter() - start
    means, counts = example_losses(model, test.rows, params.batch_size, dev, "fp32")
    metrics, per_item = score(test.scorer, predictions, test.references, test.labels, params.bootstrap_samples,
                              params.seed)
    # an item packing dropped (no reference token within prepare.seq_len) has no loss: null
    losses = [round(float(means[i]), 6) if i < len(counts) and counts[i] else None for i in range(len(predictions))]
    items = zip(test.conversations, test.references, predictions, per_item, losses)
    records = [{"input": conv[-1]["content"], "expected": ref, "produced": pred, "correct": row["correct"],
                "loss": loss, **row} for conv, ref, pred, row, loss in items]  # then the scorer's own fields
    test_loss = float(means.nan_to_num().mul(counts).sum() / counts.sum())
    return Scored(metrics, records, test_loss, generate_seconds, limit)
