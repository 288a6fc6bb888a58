"""The seed article's decision framework as explicit, testable rules.

1. A method that does not beat the untuned base (its CI lies at or below the base's score)
   is out: fine-tuning it bought nothing.
2. A method over the memory budget (`register.memory_budget_gb`, 0 = none) is out.
3. Among the rest, a parameter-efficient method whose gap to full fine-tuning is within
   `register.max_gap_points` wins, the cheapest first (LoRA before full, "run a LoRA baseline
   first"); ties in cost go to less memory.
4. If every adapter is further behind than that, full fine-tuning wins, and the rationale says
   what to try before paying for it (a higher rank on all linear layers).
"""

from __future__ import annotations

from tuneoff.params import RegisterParams

GIB = 2**30


def decide(comparison: dict, rules: RegisterParams) -> dict:
    """{"method": ..., "rationale": ..., "numbers": {...}} for one task's comparison."""
    rows = {r["method"]: r for r in comparison["rows"]}
    base, full = rows["base"], rows.get("full")
    metric = comparison["main_metric"]
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    reasons, eligible = [], []
    if base.get("failed"):
        return {"method": None, "numbers": {}, "rationale": f"The untuned base was not evaluated ({base['failed']}): "
                                                            "without it no method can be judged; nothing is registered."}
    for name, r in rows.items():
        if name == "base":
            continue
        if r.get("failed"):
            reasons.append(f"{name} failed ({r['failed']})")
            continue
        if r["ci_high"] <= base["main"]:
            reasons.append(f"{name} does not beat the untuned base ({pct(r['main'])} vs {pct(base['main'])})")
            continue
        mem = r["train"]["peak_memory_bytes"] / GIB
        if rules.memory_budget_gb and mem > rules.memory_budget_gb:
            reasons.append(f"{name} needs {mem:.1f} GiB, over the {rules.memory_budget_gb:g} GiB budget")
            continue
        eligible.append(r)
    numbers = {name: {"main": r["main"], "ci": [r["ci_low"], r["ci_high"]],
                      "gap_to_full_points": r["gap_to_full_points"],
                      "cost_usd": r["train"] and r["train"]["cost_usd"],
                      "peak_memory_bytes": r["train"] and r["train"]["peak_memory_bytes"]} for name, r in rows.items()}
    if not eligible:
        return {"method": None, "numbers": numbers,
                "rationale": "No method qualifies: " + "; ".join(reasons) + ". Nothing is registered; "
                             "raise the token budget or check the data before spending more."}

    cost = lambda r: (r["train"]["cost_usd"] or 0.0, r["train"]["peak_memory_bytes"])  # noqa: E731
    full_ok = full is not None and any(r is full for r in eligible)
    adapters = [r for r in eligible if r["method"] != "full"]
    close = [r for r in adapters if not full_ok or r["gap_to_full_points"] <= rules.max_gap_points]
    if close:
        pick = min(close, key=cost)
        if full_ok:
            share = pick["main"] / full["main"] if full["main"] else 1.0
            cost_share = (pick["train"]["cost_usd"] or 0) / (full["train"]["cost_usd"] or 1)
            why = (f"{pick['method']} reached {100 * share:.1f}% of full fine-tuning's {metric} "
                   f"({pct(pick['main'])} vs {pct(full['main'])}, a gap of {pick['gap_to_full_points']:.1f} points) "
                   f"at {100 * cost_share:.0f}% of its cost and {pick['train']['peak_memory_bytes'] / GIB:.2f} GiB "
                   f"peak memory vs {full['train']['peak_memory_bytes'] / GIB:.2f}; within the "
                   f"{rules.max_gap_points:g}-point threshold, so {pick['method']}.")
        else:
            why = (f"full fine-tuning is out ({'; '.join(reasons) or 'not run'}); {pick['method']} is the "
                   f"cheapest method that beats the base ({pct(pick['main'])} vs {pct(base['main'])}).")
    else:
        pick = full
        best = max(adapters, key=lambda r: r["main"]) if adapters else None
        why = ("full fine-tuning: " + (f"the best adapter ({best['method']}, {pct(best['main'])}) is "
               f"{best['gap_to_full_points']:.1f} points behind full ({pct(full['main'])}), above the "
               f"{rules.max_gap_points:g}-point threshold. Before paying for full fine-tuning in production, "
               "try LoRA at rank 64 on all linear layers." if best else "no adapter method qualified."))
    if reasons and not why.startswith("full fine-tuning is out"):
        why += " Excluded: " + "; ".join(reasons) + "."
    return {"method": pick["method"], "rationale": why, "numbers": numbers}
