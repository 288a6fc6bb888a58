"""Task scorers: per-example correctness, aggregate metrics, and a bootstrap confidence interval
for the main metric so small differences between methods are not over-read."""

from __future__ import annotations

import json
import random
from collections import Counter

MAIN_METRIC = {"json_fields": "exact_match", "exact": "exact_match", "label": "accuracy"}


def _parse_json(text: str):
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def macro_f1(predictions: list[str], references: list[str]) -> float:
    """Unweighted mean of per-label F1 over the labels present in the references."""
    scores = []
    for label in sorted(set(references)):
        tp = sum(p == label and r == label for p, r in zip(predictions, references))
        fp = sum(p == label and r != label for p, r in zip(predictions, references))
        fn = sum(p != label and r == label for p, r in zip(predictions, references))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


def per_example(scorer: str, prediction: str, reference: str) -> dict:
    """What one prediction got right. For json_fields, each key of the reference is right when the
    reply has it with the same value; `extra_keys` are the reply's keys the reference lacks (a reply
    with any is not an exact match either)."""
    prediction, reference = prediction.strip(), reference.strip()
    if scorer != "json_fields":
        return {"correct": prediction == reference}
    expected, produced = json.loads(reference), _parse_json(prediction)
    reply = produced or {}
    fields = {k: k in reply and reply[k] == v for k, v in expected.items()}
    return {"correct": produced == expected, "valid_json": produced is not None, "fields": fields,
            "extra_keys": sorted(set(reply) - set(expected))}


def field_accuracy(rows: list[dict]) -> dict[str, dict]:
    """Per key of the references, in the order first seen: how many references have it (`n`) and
    the share of those replies that got it right. Records may carry different keys (a playlist
    request has `playlist`, a weather request `city`): each key is scored where it is expected."""
    seen, right = Counter(), Counter()
    for r in rows:
        for k, ok in r["fields"].items():
            seen[k] += 1
            right[k] += ok
    return {k: {"n": n, "accuracy": right[k] / n} for k, n in seen.items()}


def aggregate(scorer: str, rows: list[dict], predictions: list[str], references: list[str], labels: list[str]) -> dict:
    """The task's metrics over all examples; `rows` are per_example() results."""
    n = len(rows)
    metrics = {"n": n}
    if scorer == "json_fields":
        metrics["exact_match"] = sum(r["correct"] for r in rows) / n
        metrics["valid_json"] = sum(r["valid_json"] for r in rows) / n
        metrics["field_accuracy"] = field_accuracy(rows)
        metrics["extra_keys"] = sum(bool(r["extra_keys"]) for r in rows)  # replies with a key their reference lacks
    elif scorer == "label":
        metrics["accuracy"] = sum(r["correct"] for r in rows) / n
        metrics["macro_f1"] = macro_f1([p.strip() for p in predictions], [r.strip() for r in references])
        metrics["in_label_set"] = sum(p.strip() in set(labels) for p in predictions) / n
    else:
        metrics["exact_match"] = sum(r["correct"] for r in rows) / n
    return metrics


def bootstrap_ci(correct: list[bool], samples: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `correct` (resampling examples)."""
    rng = random.Random(seed)
    n = len(correct)
    means = sorted(sum(correct[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    lo = means[int((1 - level) / 2 * samples)]
    hi = means[min(samples - 1, int((1 + level) / 2 * samples))]
    return lo, hi


def main_score(scorer: str, predictions: list[str], references: list[str], labels: list[str]) -> float:
    """The main metric alone (no CI)."""
    rows = [per_example(scorer, p, r) for p, r in zip(predictions, references)]
    return aggregate(scorer, rows, predictions, references, labels)[MAIN_METRIC[scorer]]


def score(scorer: str, predictions: list[str], references: list[str], labels: list[str],
          bootstrap_samples: int, seed: int) -> tuple[dict, list[dict]]:
    """Metrics (with `main`, its name and its 95% CI) and the per-example results."""
    rows = [per_example(scorer, p, r) for p, r in zip(predictions, references)]
    metrics = aggregate(scorer, rows, predictions, references, labels)
    main = MAIN_METRIC[scorer]
    lo, hi = bootstrap_ci([r["correct"] for r in rows], bootstrap_samples, seed)
    metrics.update(main_metric=main, main=metrics[main], ci_low=lo, ci_high=hi)
    if scorer == "label":
        metrics["confusions"] = Counter(f"{r.strip()} -> {p.strip()}" for p, r in zip(predictions, references)
                                        if p.strip() != r.strip()).most_common(10)
    return metrics, rows
