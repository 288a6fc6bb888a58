"""Task scorers: per-example correctness (or a score in [0, 1]), aggregate metrics, and a bootstrap
confidence interval for the main metric so small differences between methods are not over-read.

Free-form replies are scored as their users score them, against every reference the item has:
`rouge_l` (ROUGE-L F1, rouge-score's tokenizer and Porter stemmer, the best reference: its
score_multi) and `chrf` (sacrebleu's sentence chrF, which takes the reference with the best F score),
both per item in [0, 1]; corpus BLEU (sacrebleu, every reference) is reported beside them. The judge's
grades (tuneoff/evaluation/judge.py) are scores in [0, 1] too."""

from __future__ import annotations

import functools
import json
import random
from collections import Counter

MAIN_METRIC = {"json_fields": "exact_match", "exact": "exact_match", "label": "accuracy", "rouge_l": "rouge_l",
               "chrf": "chrf", "judge": "judge_grade"}
# scorers whose per-item result is a score in [0, 1] (a record's `score`), not right or wrong (`correct`)
CONTINUOUS = ("rouge_l", "chrf", "judge")
FREE_FORM = ("rouge_l", "chrf")  # both scored, whichever is the main metric
SCALE = {"exact_match": "% of replies equal to the reference", "accuracy": "% of replies with the right label",
         "rouge_l": "ROUGE-L F1 against the best reference, 0-100", "chrf": "chrF against the best reference, 0-100",
         "judge_grade": "the judge's grade, its scale mapped to 0-100"}


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


@functools.cache
def _free_form():
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import CHRF

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True), CHRF()


def references_of(reference: str | list[str]) -> list[str]:
    return [reference] if isinstance(reference, str) else list(reference)


def per_example(scorer: str, prediction: str, reference: str | list[str]) -> dict:
    """What one prediction got right. `reference` is one string or every reference the item has (a
    reply equal to any of them is an exact match). For json_fields, each key of the reference is right
    when the reply has it with the same value; `extra_keys` are the reply's keys the reference lacks (a
    reply with any is not an exact match either). For rouge_l and chrf, `score` is the main metric's
    value in [0, 1], with both metrics beside it. A judge's grade is not computed here (judge.py)."""
    prediction, refs = prediction.strip(), [r.strip() for r in references_of(reference)]
    if scorer in FREE_FORM:
        rouge, chrf = _free_form()
        values = {"rouge_l": rouge.score_multi(refs, prediction)["rougeL"].fmeasure,
                  "chrf": chrf.sentence_score(prediction, refs).score / 100}
        return {"correct": prediction in refs, "score": values[scorer], **values}
    if scorer == "judge":
        raise ValueError("a judge's grades come from tuneoff.evaluation.judge, not per_example")
    reference = refs[0]
    if scorer != "json_fields":
        return {"correct": prediction in refs}
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


def corpus_bleu(predictions: list[str], references: list[str | list[str]]) -> float:
    """sacrebleu's corpus BLEU over every reference of each item (a shorter list padded with None, as
    sacrebleu takes a varying number of references), in [0, 1]."""
    from sacrebleu.metrics import BLEU

    refs = [references_of(r) for r in references]
    streams = [[r[i].strip() if i < len(r) else None for r in refs] for i in range(max(map(len, refs)))]
    return BLEU().corpus_score([p.strip() for p in predictions], streams).score / 100


def aggregate(scorer: str, rows: list[dict], predictions: list[str], references: list[str | list[str]],
              labels: list[str]) -> dict:
    """The task's metrics over all examples; `rows` are per_example() results (a judge's: judge.py)."""
    n = len(rows)
    metrics = {"n": n}
    if scorer in FREE_FORM:
        metrics["rouge_l"] = sum(r["rouge_l"] for r in rows) / n
        metrics["chrf"] = sum(r["chrf"] for r in rows) / n
        metrics["bleu"] = corpus_bleu(predictions, references)
        metrics["exact_match"] = sum(r["correct"] for r in rows) / n
    elif scorer == "judge":
        graded = [r for r in rows if r["score"] is not None]
        metrics["judge_grade"] = sum(r["score"] for r in graded) / len(graded) if graded else 0.0
        metrics["ungraded"] = n - len(graded)
        metrics["exact_match"] = sum(r["correct"] for r in rows) / n
    elif scorer == "json_fields":
        metrics["exact_match"] = sum(r["correct"] for r in rows) / n
        metrics["valid_json"] = sum(r["valid_json"] for r in rows) / n
        metrics["field_accuracy"] = field_accuracy(rows)
        metrics["extra_keys"] = sum(bool(r["extra_keys"]) for r in rows)  # replies with a key their reference lacks
    elif scorer == "label":
        metrics["accuracy"] = sum(r["correct"] for r in rows) / n
        # a text the data labels twice is one item with two labels: F1 counts the first
        metrics["macro_f1"] = macro_f1([p.strip() for p in predictions], [references_of(r)[0].strip() for r in references])
        metrics["in_label_set"] = sum(p.strip() in set(labels) for p in predictions) / n
    else:
        metrics["exact_match"] = sum(r["correct"] for r in rows) / n
    return metrics


def bootstrap_ci(correct: list[float], samples: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `correct` (0/1 or scores; resampling examples)."""
    rng = random.Random(seed)
    n = len(correct)
    means = sorted(sum(correct[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    lo = means[int((1 - level) / 2 * samples)]
    hi = means[min(samples - 1, int((1 + level) / 2 * samples))]
    return lo, hi


def item_values(scorer: str, rows: list[dict]) -> list[float]:
    """Per item, what the main metric averages: the score (in [0, 1]) or 1/0 for right/wrong."""
    return [float(r["score"]) if scorer in CONTINUOUS else float(r["correct"]) for r in rows]


def main_score(scorer: str, predictions: list[str], references: list[str | list[str]], labels: list[str]) -> float:
    """The main metric alone (no CI)."""
    rows = [per_example(scorer, p, r) for p, r in zip(predictions, references)]
    return aggregate(scorer, rows, predictions, references, labels)[MAIN_METRIC[scorer]]


def score(scorer: str, predictions: list[str], references: list[str | list[str]], labels: list[str],
          bootstrap_samples: int, seed: int, rows: list[dict] | None = None) -> tuple[dict, list[dict]]:
    """Metrics (with `main`, its name and its 95% CI) and the per-example results (`rows`: already
    scored ones, a judge's grades)."""
    rows = rows if rows is not None else [per_example(scorer, p, r) for p, r in zip(predictions, references)]
    metrics = aggregate(scorer, rows, predictions, references, labels)
    main = MAIN_METRIC[scorer]
    lo, hi = bootstrap_ci(item_values(scorer, [r for r in rows if r.get("score", 0) is not None]),
                          bootstrap_samples, seed)
    metrics.update(main_metric=main, main=metrics[main], ci_low=lo, ci_high=hi)
    if scorer == "label":
        firsts = [references_of(r)[0].strip() for r in references]
        metrics["confusions"] = Counter(f"{r} -> {p.strip()}" for p, r, row in zip(predictions, firsts, rows)
                                        if not row["correct"]).most_common(10)
    return metrics, rows
