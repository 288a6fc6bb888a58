"""What tuning on one task cost in general ability: each model against the untuned base on the
lm-eval benchmarks and on the bake-off's other tasks, paired on the same items (the evaluate stages
wrote each model's items, runs/<task>/<model>/benchmark-items.json; tuneoff/evaluation/general.py).

The seed article: "on standard benchmarks like MMLU, TruthfulQA, and HellaSwag, LoRA-tuned models
typically land within 1-3% of fully fine-tuned equivalents"; the claims check tests that per
benchmark, and decide.max_general_drop_points can exclude a method that is shown to lose more.
"""

from __future__ import annotations

import json
from pathlib import Path

from tuneoff.core.methods import BASE, FULL, LORA
from tuneoff.core.records import read_jsonl
from tuneoff.decision import stats


def pair(a: str, b: str, xa: list[bool], xb: list[bool]) -> dict:
    p = stats.paired_binary(xa, xb)
    return {"a": a, "b": b, "n": p["n"], "diff_points": round(100 * p["diff"], 2),
            "ci_points": [round(100 * p["ci"][0], 2), round(100 * p["ci"][1], 2)]}


def general_ability(task: str, methods: list[str], runs: Path = Path("runs")) -> dict | None:
    """{"scores": {benchmark: {model: {"score", "n", "kind"}}}, "pairs": [each method - base, and
    LoRA - full, per benchmark]}; None when the base's benchmark stage has not run."""
    def items(model: str) -> dict | None:
        path = runs / task / model / "benchmark-items.json"
        return json.loads(path.read_text()) if path.is_file() else None

    base = items(BASE)
    if base is not None and "benchmarks_of" in base:  # the base's benchmarks, scored once for every task
        base = json.loads((runs / base["benchmarks_of"] / BASE / "benchmark-items.json").read_text())
    if base is None:
        return None
    scored = {m: found for m in methods if (found := items(m)) is not None}
    per_model: dict[str, dict[str, list[bool]]] = {BASE: dict(base["benchmarks"])}
    kinds = {b: "lm-eval" for b in base["benchmarks"]}
    for m, found in scored.items():
        per_model[m] = {**found["benchmarks"], **found["cross_task"]}
        for other, correct in found["cross_task"].items():  # the base on those items: its own evaluate stage
            kinds[other] = "cross-task"
            base_predictions = runs / other / BASE / "predictions.jsonl"
            if base_predictions.is_file():
                per_model[BASE][other] = [bool(r["correct"]) for r in read_jsonl(base_predictions)[:len(correct)]]
    scores = {b: {m: {"score": sum(x[b]) / len(x[b]), "n": len(x[b]), "kind": kinds[b]}
                  for m, x in per_model.items() if x.get(b)} for b in kinds}
    pairs = [pair(m, BASE, per_model[m][b], per_model[BASE][b]) | {"benchmark": b}
             for b in kinds for m in scored if per_model[m].get(b) and per_model[BASE].get(b)]
    if LORA.name in scored and FULL.name in scored:
        pairs += [pair(LORA.name, FULL.name, per_model[LORA.name][b], per_model[FULL.name][b]) | {"benchmark": b}
                  for b in kinds if kinds[b] == "lm-eval" and b in per_model[LORA.name] and b in per_model[FULL.name]]
    return {"scores": scores, "pairs": pairs}


def vs(general: dict, a: str, b: str, benchmark: str) -> dict | None:
    return next((p for p in general["pairs"] if (p["a"], p["b"], p["benchmark"]) == (a, b, benchmark)), None)


def drops(general: dict | None, method: str, limit: float) -> list[str]:
    """The benchmarks on which `method` is shown to lose more than `limit` points against the base
    (its whole paired interval below -limit), each with its numbers."""
    if not general or not limit:
        return []
    out = []
    for p in general["pairs"]:
        if (p["a"], p["b"]) == (method, BASE) and general["scores"][p["benchmark"]][method]["kind"] == "lm-eval" \
                and stats.below(p["ci_points"], -limit):
            lo, hi = p["ci_points"]
            out.append(f"{p['benchmark']} {p['diff_points']:+.1f} points [{lo:+.1f}, {hi:+.1f}]")
    return out


def claims(general: dict | None) -> list[tuple[str, dict]]:
    """The article's general-benchmark claim, per lm-eval benchmark: (claim, LoRA - full pair)."""
    if not general:
        return []
    return [(f"LoRA within 1-3 points of full fine-tuning on general benchmarks ({p['benchmark']}; taken as: "
             "at most 3 apart)", p) for p in general["pairs"] if (p["a"], p["b"]) == (LORA.name, FULL.name)]


def table(general: dict | None) -> list[str]:
    """Markdown: each benchmark's score per model, and each tuned model's change against the base."""
    if not general or not general["scores"]:
        return []
    models = list(dict.fromkeys(m for s in general["scores"].values() for m in s))
    lines = ["General ability: each model as deployed on lm-eval benchmarks (the same first items for every "
             "model) and on the bake-off's other tasks (cross-task); % right, and for a tuned model its change "
             "against the untuned base, paired on the same items (points [95% CI]):", "",
             "| benchmark | items | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    for b, by_model in general["scores"].items():
        cells = []
        for m in models:
            s, p = by_model.get(m), vs(general, m, BASE, b)
            cells.append("-" if s is None else f"{100 * s['score']:.1f}" + (
                f" ({p['diff_points']:+.1f} [{p['ci_points'][0]:+.1f}, {p['ci_points'][1]:+.1f}])" if p else ""))
        kind = next(iter(by_model.values()))["kind"]
        n = next(iter(by_model.values()))["n"]
        lines.append(f"| {b}{' (cross-task)' if kind == 'cross-task' else ''} | {n} | " + " | ".join(cells) + " |")
    return lines + [""]
