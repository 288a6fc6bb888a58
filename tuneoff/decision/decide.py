"""The seed article's decision framework as explicit, testable rules, decided on paired intervals.

Every method is scored on the same test items, so each comparison the decision uses is paired
(tuneoff/decision/stats.py: difference of the main metric with its 95% interval, in points):

1. A method is in only if its interval against the untuned base lies wholly above 0: fine-tuning
   is shown to have bought something. One whose interval straddles 0 is "not shown to beat the base".
2. A method over the memory budget (`decide.memory_budget_gb`, 0 = none) is out, and so is one
   shown to lose more than `decide.max_general_drop_points` (0 = none) against the base on a
   general benchmark (its whole paired interval below -that; tuneoff/decision/general.py).
3. Non-inferiority to full fine-tuning, the article's rule ("LoRA within 1-3% of full"), with
   margin `decide.max_gap_points`: an adapter whose whole interval of (adapter - full) lies above
   -margin is good enough, and the cheapest such adapter wins; when every adapter's interval lies
   wholly below -margin, full fine-tuning wins; otherwise the verdict is **inconclusive**, with
   what would settle it.
4. Only a decided verdict names a method; the register stage promotes nothing otherwise.
"""

from __future__ import annotations

from tuneoff.core.methods import BASE, FULL
from tuneoff.core.params import DecideParams
from tuneoff.core.records import Decision, Pair, TaskComparison
from tuneoff.decision import stats
from tuneoff.decision.general import drops

GIB = 2**30


def pair(comparison: TaskComparison, a: str, b: str) -> Pair | None:
    """The paired comparison a - b from the report's comparison, if both were scored."""
    return next((p for p in comparison.get("pairs", []) if (p["a"], p["b"]) == (a, b)), None)


def interval(p: dict) -> str:
    lo, hi = p["ci_points"]
    return f"{p['diff_points']:+.1f} points [{lo:+.1f}, {hi:+.1f}]"


# a scorer that sees what the task's own scorer cannot (free-form replies: docs/your-data.md)
SEEING_SCORER = {"exact": "rouge_l or chrf", "json_fields": "rouge_l or chrf", "label": "rouge_l or chrf",
                 "rouge_l": "chrf or judge", "chrf": "rouge_l or judge", "judge": "rouge_l or chrf"}


def blind(comparison: TaskComparison) -> str | None:
    """When every model scored, the untuned base included, sits at the floor (0) or the ceiling (100) of
    the main metric, it cannot tell them apart: no verdict, claim or test-set size may rest on it. What
    to say then, naming a scorer that can and what the per-item loss already shows; None otherwise."""
    scored = [r for r in comparison["rows"] if r["main"] is not None]
    ends = {r["main"] for r in scored}
    if not any(r["method"] == BASE for r in scored) or len(scored) < 2 or ends not in ({0.0}, {1.0}):
        return None
    edge = "0, its floor" if ends == {0.0} else "100, its ceiling"
    loss = [f"{p['a']} - {p['b']} {p['loss']['diff']:+.3f} [{p['loss']['ci'][0]:+.3f}, {p['loss']['ci'][1]:+.3f}]"
            for p in comparison.get("pairs", []) if p["b"] == BASE and p.get("loss")]
    seeing = SEEING_SCORER.get(comparison.get("scorer", ""), "rouge_l or chrf")
    return (f"{comparison['main_metric']} cannot tell these models apart on this task: every model, the untuned base "
            f"included, scored {edge}, so no verdict, claim or test-set size rests on it. Score the replies with a "
            f"scorer that sees them: `tasks.{comparison['task']}.scorer: {seeing}`"
            + (f"; the per-item test loss of the reference already tells them apart (lower is better): "
               f"{'; '.join(loss)}." if loss else "."))


def decide(comparison: TaskComparison, rules: DecideParams) -> Decision:
    """{"method", "verdict": decided | inconclusive | none, "rationale", "settle", "numbers"} for one task;
    the rationale ends with what the verdict assumes about learning rates."""
    d = by_the_rules(comparison, rules)
    return {**d, "rationale": d["rationale"] + rates_note(comparison["rows"])}


def rates_note(rows: list[dict]) -> str:
    """Whether each method trained at a tuned learning rate: a verdict between a tuned and an untuned
    method, or at a rate on the edge of its candidates, compares rates as well as methods."""
    tunings = {r["method"]: r["train"]["tuning"] for r in rows if r.get("train") and r["train"].get("tuning")}
    tuned = [m for m, t in tunings.items() if t["tuned"]]
    untuned = [m for m, t in tunings.items() if not t["tuned"]]
    note = ""
    if tuned and untuned:
        note += (f" {', '.join(untuned)} trained at one hand-set learning rate, {', '.join(tuned)} at a tuned one: "
                 "the comparison may favour the tuned.")
    elif untuned:
        note += " No learning rate was tuned (one rate per method in params.yaml): the verdict holds at those rates."
    edge = [f"{m} ({t['lr']:g}, the {t['at_edge']} tried)" for m, t in tunings.items() if t.get("at_edge")]
    if edge:
        note += f" The rate chosen for {', '.join(edge)} is at the edge of its candidates: a better one may lie beyond."
    return note


def by_the_rules(comparison: TaskComparison, rules: DecideParams) -> Decision:
    """The verdict from the paired intervals alone (the rules in this module's docstring)."""
    rows = {r["method"]: r for r in comparison["rows"]}
    base, metric = rows[BASE], comparison["main_metric"]
    numbers = {name: {"main": r["main"], "ci": [r["ci_low"], r["ci_high"]],
                      "cost_usd": r["train"] and r["train"]["cost_usd"],
                      "peak_memory_bytes": r["train"] and r["train"]["peak_memory_bytes"]} for name, r in rows.items()}
    numbers["pairs"] = {f"{p['a']} - {p['b']}": {"diff_points": p["diff_points"], "ci_points": p["ci_points"]}
                        for p in comparison.get("pairs", [])}
    if base.get("failed"):
        return verdict(None, "none", f"The untuned base was not evaluated ({base['failed']}): without it no method "
                                     "can be judged.", numbers)
    nothing = blind(comparison)
    if nothing:
        return verdict(None, "inconclusive", nothing, numbers,
                       settle=f"A scorer that sees the replies ({SEEING_SCORER.get(comparison.get('scorer', ''), 'rouge_l or chrf')}), "
                              "then `dvc repro` (the evaluate stages and the report rerun; training does not).")
    reasons, eligible, unclear = [], [], []
    for name, r in rows.items():
        if name == BASE:
            continue
        if r.get("failed"):
            reasons.append(f"{name} failed ({r['failed']})")
            continue
        mem = r["train"]["peak_memory_bytes"] / GIB
        if rules.memory_budget_gb and mem > rules.memory_budget_gb:
            reasons.append(f"{name} needs {mem:.1f} GiB, over the {rules.memory_budget_gb:g} GiB budget")
            continue
        lost = drops(comparison.get("general"), name, rules.max_general_drop_points)
        if lost:
            reasons.append(f"{name} loses more than the {rules.max_general_drop_points:g}-point limit of general "
                           f"ability against the untuned base ({'; '.join(lost)})")
            continue
        vs_base = pair(comparison, name, BASE)
        if stats.above(vs_base["ci_points"], 0):
            eligible.append(r)
        elif stats.below(vs_base["ci_points"], 0):
            reasons.append(f"{name} is worse than the untuned base ({interval(vs_base)})")
        else:
            reasons.append(f"{name} is not shown to beat the untuned base ({interval(vs_base)})")
            unclear.append(r)
    excluded = listed(reasons)
    if not eligible:
        if unclear:
            return verdict(None, "inconclusive", f"No method is shown to beat the untuned base yet: {'; '.join(reasons)}.",
                           numbers, settle=settle(comparison, settle_base(comparison, [r["method"] for r in unclear])))
        return verdict(None, "none", f"No method qualifies: {'; '.join(reasons)}. Raise the token budget or check the "
                                     "data before spending more.", numbers)

    cost = lambda r: (r["train"]["cost_usd"] or 0.0, r["train"]["peak_memory_bytes"])  # noqa: E731
    full = rows.get(FULL.name)
    adapters = sorted((r for r in eligible if r["method"] != FULL.name), key=cost)
    if full is not None and full.get("failed"):  # missing evidence never decides: the adapters cannot be weighed
        return verdict(None, "inconclusive", f"Full fine-tuning failed ({full['failed']}), so no adapter can be "
                       "weighed against it." + excluded, numbers,
                       settle=f"Fix full fine-tuning (runs/{comparison['task']}/full/failed.json) and rerun it: "
                              "`tuneoff run --methods full`.")
    full_unclear = full is not None and full in unclear
    if full_unclear:  # full is the reference below, not excluded
        excluded = listed([x for x in reasons if not x.startswith(f"{FULL.name} is not shown")])
    if full is None or (full not in eligible and not full_unclear):
        # full is out on evidence (worse than the base, over the memory budget, or losing general ability)
        return among_adapters(comparison, adapters, rules.max_gap_points, excluded, numbers)
    # an adapter not shown to beat the base is still weighed against full: it may yet be good enough
    candidates = sorted(adapters + [r for r in unclear if r["method"] != FULL.name], key=cost)
    if not candidates and not full_unclear:
        return verdict(FULL.name, "decided", "full fine-tuning: the only method shown to beat the untuned base "
                       f"({interval(pair(comparison, FULL.name, BASE))})." + excluded, numbers)

    margin = rules.max_gap_points
    judged = {r["method"]: (stats.non_inferiority(pair(comparison, r["method"], FULL.name)["ci_points"], margin),
                            pair(comparison, r["method"], FULL.name)) for r in candidates}
    good = [r for r in adapters if judged[r["method"]][0] == "non-inferior"]
    # an adapter shown to be more than the margin behind another good one is not a pick
    behind = {r["method"]: o["method"] for r in good for o in good if o is not r and stats.non_inferiority(
        oriented(comparison, r["method"], o["method"])["ci_points"], margin) == "inferior"}
    good = [r for r in good if r["method"] not in behind]
    if good:
        pick = good[0]
        p = judged[pick["method"]][1]
        share = (pick["train"]["cost_usd"] or 0) / (full["train"]["cost_usd"] or 1)
        why = (f"{pick['method']}: against full fine-tuning {interval(p)} of {metric}, the whole interval above the "
               f"-{margin:g}-point margin, so it is non-inferior, at {100 * share:.0f}% of full's cost and "
               f"{pick['train']['peak_memory_bytes'] / GIB:.2f} GiB peak memory vs "
               f"{full['train']['peak_memory_bytes'] / GIB:.2f}.")
        if full_unclear:
            why += (f" Full fine-tuning itself is not shown to beat the untuned base "
                    f"({interval(pair(comparison, FULL.name, BASE))}); {pick['method']} is "
                    f"({interval(pair(comparison, pick['method'], BASE))}).")
        unsized = [f"{o['method']} - {pick['method']} {interval(oriented(comparison, o['method'], pick['method']))}"
                   for o in good[1:]]
        if unsized:
            why += (f" Also within the margin of full, and not shown to be within {margin:g} points of "
                    f"{pick['method']} or beyond: {'; '.join(unsized)}.")
        cheaper = [r["method"] for r in candidates if cost(r) < cost(pick) and r["method"] not in behind]
        if cheaper:
            why += f" {', '.join(cheaper)} would be cheaper still, but this run cannot tell whether it is good enough."
        why += "".join(f" {m} is shown to be more than {margin:g} points behind {better}." for m, better in behind.items())
        return verdict(pick["method"], "decided", why + excluded, numbers)
    if candidates and all(status == "inferior" for status, _ in judged.values()) and not full_unclear:
        best = max(candidates, key=lambda r: r["main"])
        return verdict(FULL.name, "decided", f"full fine-tuning: every adapter is shown to be more than {margin:g} "
                       f"points behind it (best: {best['method']}, {interval(judged[best['method']][1])}). Before "
                       "paying for full fine-tuning in production, try LoRA at rank 64 on all linear layers." + excluded,
                       numbers)
    # what is left open: an adapter whose interval straddles the margin, one within the margin that is not
    # shown to beat the base, or full itself not shown to beat the base
    straddle = [m for m, (status, _) in judged.items() if status == "inconclusive"]
    near_base = [r["method"] for r in unclear if judged.get(r["method"], ("",))[0] == "non-inferior"]
    parts = [f"{m} - full {interval(judged[m][1])} holds both a gap within the {margin:g}-point margin and one "
             "beyond it" for m in straddle]
    parts += [f"{m} is within the margin of full ({interval(judged[m][1])}) but not shown to beat the base"
              for m in near_base]
    if full_unclear:
        parts.append(f"full fine-tuning is not shown to beat the untuned base ({interval(pair(comparison, FULL.name, BASE))})"
                     + (", and no adapter is shown to be within the margin of it" if adapters else ""))
    needs = ([settle_margin(comparison, straddle, margin)] if straddle else []) + (
        [settle_base(comparison, near_base + [FULL.name] * full_unclear)] if near_base or full_unclear else [])
    return verdict(None, "inconclusive", f"Inconclusive on {metric}: {'; '.join(parts)}. This run cannot tell whether "
                   "an adapter is good enough; nothing is promoted." + excluded, numbers, settle=settle(comparison, *needs))


def listed(reasons: list[str]) -> str:
    return (" Excluded: " + "; ".join(reasons) + ".") if reasons else ""


def among_adapters(comparison: TaskComparison, adapters: list, margin: float, excluded: str, numbers: dict) -> Decision:
    """Full fine-tuning out on evidence: the cheapest adapter that beats the base and is non-inferior to
    every other one that does (within the margin by its paired interval); when none is, adapters that
    cannot be told apart are inconclusive, whatever their point estimates say."""
    if not adapters:
        return verdict(None, "none", "No method qualifies." + excluded, numbers)
    vs = {(r["method"], o["method"]): oriented(comparison, r["method"], o["method"])
          for r in adapters for o in adapters if o is not r}
    good = [r for r in adapters if all(stats.non_inferiority(vs[r["method"], o["method"]]["ci_points"], margin)
                                       == "non-inferior" for o in adapters if o is not r)]  # cheapest first
    if not good:
        open_pairs = [f"{a} - {b} {interval(p)}" for (a, b), p in vs.items() if a < b]
        return verdict(None, "inconclusive", f"Full fine-tuning is not in the running, and no adapter is shown to be "
                       f"within {margin:g} points of the others: {'; '.join(open_pairs)}. Nothing is promoted." + excluded,
                       numbers, settle=settle(comparison, items_needed(
                           comparison, [(f"{a} - {b}", p) for (a, b), p in vs.items() if a < b], margin)))
    pick = good[0]
    why = (f"{pick['method']}: shown to beat the untuned base ({interval(pair(comparison, pick['method'], BASE))}); "
           "full fine-tuning is not in the running.")
    others = [f"{o['method']}: {interval(vs[pick['method'], o['method']])}" for o in adapters if o is not pick]
    if others:
        why += f" Against each other adapter that beats the base, within the {margin:g}-point margin: {'; '.join(others)}."
    return verdict(pick["method"], "decided", why + excluded, numbers)


def oriented(comparison: TaskComparison, a: str, b: str) -> Pair:
    """The pair a - b, from the report's a - b or b - a (negated)."""
    found = pair(comparison, a, b)
    if found:
        return found
    p = pair(comparison, b, a)
    return {**p, "a": a, "b": b, "diff_points": 0.0 - p["diff_points"], "ci_points": [-p["ci_points"][1], -p["ci_points"][0]]}


def replaces_champion(challenger: list, champion: list, margin: float, continuous: bool = False) -> tuple[bool, str]:
    """Whether a challenger replaces the production model, both scored on the same test items: only when
    its paired interval lies wholly above -margin and it scored at least as well; a champion that is
    better on these items, or a difference this run cannot size, keeps production where it is. Per item
    right/wrong, or with `continuous` a score in [0, 1] (None: ungraded, the item left out)."""
    if continuous:
        p = stats.paired_scores(*zip(*[(x, y) for x, y in zip(challenger, champion) if x is not None and y is not None]))
    else:
        p = stats.paired_binary([bool(x) for x in challenger], [bool(x) for x in champion])
    lo, hi = (100 * x for x in p["ci"])
    what = f"challenger - production {100 * p['diff']:+.1f} points [{lo:+.1f}, {hi:+.1f}] on the same {p['n']} test items"
    if stats.non_inferiority([lo, hi], margin) == "non-inferior" and p["diff"] >= 0:
        return True, f"{what}: at least as good, within the {margin:g}-point margin; promoted"
    if stats.below([lo, hi], 0):
        return False, f"{what}: production is better; left in staging"
    if p["diff"] < 0:
        return False, f"{what}: production scored higher; left in staging"
    return False, f"{what}: cannot tell whether it is within the {margin:g}-point margin; left in staging"


def verdict(method, kind: str, rationale: str, numbers: dict, settle: str | None = None) -> Decision:
    return {"method": method, "verdict": kind, "rationale": rationale, "settle": settle, "numbers": numbers}


def settle_margin(comparison: dict, adapters: list[str], margin: float) -> tuple[list[str], int]:
    """How many test items would decide each open adapter-vs-full comparison."""
    return items_needed(comparison, [(m, pair(comparison, m, FULL.name)) for m in adapters], margin)


def settle_base(comparison: dict, methods: list[str]) -> tuple[list[str], int]:
    """How many test items would show each method above the base."""
    return items_needed(comparison, [(m, pair(comparison, m, BASE)) for m in methods], 0.0)


def items_needed(comparison: dict, pairs: list[tuple[str, dict]], margin: float) -> tuple[list[str], int]:
    """Per pair, the test items at which its interval would clear -margin on the side the estimate faces
    with 80% power, at the difference and discordance observed; an estimate within a point of the bound
    is sized for a 1-point true gap instead, since it could fall either way."""
    n_now = comparison["conditions"]["test_examples"]
    parts, needed = [], 0
    for m, p in pairs:
        bound = -margin / 100
        if p.get("only_a") is None:  # over seeds: no table of items; the seeds' spread does not shrink with items
            parts.append(f"{m}: {interval(p)} over {p['seeds'][0]} seeds; more seeds narrow it where items cannot")
            continue
        if p.get("sd_points") is not None:  # a score in [0, 1]: its mean and per-item spread
            diff, sd = p["diff_points"] / 100, p["sd_points"] / 100
            size = lambda d: stats.items_for_scores(d, sd, bound)  # noqa: E731
        else:
            only_a, only_b = p["only_a"] / p["n"], p["only_b"] / p["n"]
            diff = only_a - only_b

            def size(d: float) -> int:  # at the observed discordance (at least what a gap of d needs)
                discordant = max(only_a + only_b, abs(d))
                return stats.items_for_power((discordant + d) / 2, (discordant - d) / 2, bound)
        if abs(diff - bound) < 0.01 - 1e-9:
            n = size(bound + (0.01 if diff >= bound else -0.01))
            parts.append(f"{m}: the estimate sits within a point of the bound, so a larger test set decides it either "
                         f"way: about {n:,} test items for {stats.POWER:.0%} power if the true gap is 1 point from it "
                         f"(now {n_now})")
        else:
            n = size(diff)
            parts.append(f"{m}: about {n:,} test items for {stats.POWER:.0%} power at this difference and "
                         f"{'spread' if p.get('sd_points') is not None else 'discordance'} (now {n_now})")
        needed = max(needed, n)
    return parts, needed


def settle(comparison: dict, *needs: tuple[list[str], int]) -> str:
    """What would settle an open verdict: test items, with what scoring them costs, or more training."""
    parts = [part for texts, _ in needs for part in texts]
    needed = max(n for _, n in needs)
    return " ".join(filter(None, ["; ".join(parts) + ".", evaluation_cost(comparison, needed),
                                  training_cost(comparison)]))


def evaluation_cost(comparison: dict, items: int) -> str:
    """Scoring `items` test items with every model, at the rates this run measured."""
    rates = [r["examples_per_second"] for r in comparison["rows"] if r.get("examples_per_second")]
    if not items or not rates:
        return ""
    seconds = sum(items / rate for rate in rates)
    return f"Scoring {items:,} items with all {len(rates)} models takes about {seconds / 60:.0f} min here."


def training_cost(comparison: dict) -> str:
    """What doubling the token budget costs, from this run's measured training (time is linear in tokens)."""
    trained = [r["train"] for r in comparison["rows"] if r.get("train")]
    if not trained:
        return ""
    seconds, usd = sum(t["train_seconds"] for t in trained), sum(t["cost_usd"] or 0 for t in trained)
    return (f"A larger effect needs more training: twice the token budget adds about {seconds / 60:.0f} min "
            f"(${usd:.4f}) of training for these {len(trained)} methods.")
