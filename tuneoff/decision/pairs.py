"""Methods compared on the same test items: a - b per item for the main metric and the per-example
loss, with one seed per method (a paired score interval, about these trained models) or several (a t
interval over items and seeds, about the methods)."""

from __future__ import annotations

import statistics
from pathlib import Path

from tuneoff.core.errors import TuneoffError
from tuneoff.core.methods import METHODS, PAIRS
from tuneoff.core.records import ComparisonRow, Pair, read_jsonl
from tuneoff.decision import stats


def scores(records: list[dict]) -> list[float | None]:
    """Per item, what the main metric averages: the score in [0, 1] of a free-form or judged task
    (None where the judge gave no grade), else 1.0 / 0.0 for right / wrong."""
    return [x["score"] if "score" in x else float(bool(x["correct"])) for x in records]


def continuous(records: list[dict]) -> bool:
    return bool(records) and "score" in records[0]


def read_items(path: Path) -> list[dict]:
    if not path.is_file():
        raise TuneoffError(f"{path} not found: run the stages before report")
    return read_jsonl(path)


def paired(items: dict[str, list[dict]], bootstrap_samples: int, seed: int,
           seed_runs: dict[str, list[list[dict]]] | None = None) -> list[Pair]:
    """a - b on the same test items for each pair in PAIRS that was scored: the main metric (points)
    and the per-example loss of the reference answer (evidence beside it: continuous, so more sensitive).
    A method trained with several seeds (`seed_runs`: every seed's records) is compared over all of them."""
    seed_runs = seed_runs or {}
    return [one_pair(a, b, items, bootstrap_samples, seed) if a not in seed_runs and b not in seed_runs
            else pair_over_seeds(a, b, {m: seed_runs.get(m, [items[m]]) for m in (a, b)})
            for a, b in PAIRS if a in items and b in items]


def pair_over_seeds(a: str, b: str, runs: dict[str, list[list[dict]]]) -> Pair:
    """a - b over every seed each was trained with, on the same items: a t interval over items and seeds
    (stats.paired_over_seeds) for the main metric and for the per-example loss. The main metric's
    interval is never narrower than the first seeds' paired score interval: when no item differs on
    any seed the t interval is a point, which a handful of items cannot show."""
    every = [r for m in (a, b) for r in runs[m]]
    if any([x["expected"] for x in r] != [x["expected"] for x in every[0]] for r in every):
        raise TuneoffError(f"{a} and {b} were not all scored on the same test items: rerun their stages")
    values = {m: [scores(r) for r in runs[m]] for m in (a, b)}  # per seed, per item
    graded = [i for i in range(len(every[0])) if all(v[i] is not None for m in (a, b) for v in values[m])]
    main = stats.paired_over_seeds(*([[v[i] for i in graded] for v in values[m]] for m in (a, b)))
    first = [[values[m][0][i] for i in graded] for m in (a, b)]
    exact = stats.paired_scores(*first) if continuous(every[0]) else stats.paired_binary(*(list(map(bool, f)) for f in first))
    main["ci"] = [min(main["ci"][0], exact["ci"][0]), max(main["ci"][1], exact["ci"][1])]
    kept = [i for i in range(len(every[0])) if all(r[i].get("loss") is not None for r in every)]
    loss = kept and stats.paired_over_seeds([[r[i]["loss"] for i in kept] for r in runs[a]],
                                            [[r[i]["loss"] for i in kept] for r in runs[b]])
    return {"a": a, "b": b, "n": main["n"], "seeds": main["seeds"], "diff_points": round(100 * main["diff"], 2),
            "ci_points": [round(100 * main["ci"][0], 2), round(100 * main["ci"][1], 2)],
            "p_value": None, "only_a": None, "only_b": None, "interval": main["method"],
            "loss": loss and {"diff": round(loss["diff"], 4), "ci": [round(x, 4) for x in loss["ci"]], "n": loss["n"],
                              "interval": loss["method"]}}


def seed_runs(task_runs: Path, methods: list[str], more_seeds: list[int]) -> dict[str, list[list[dict]]]:
    """Every training seed's test records of each method, the first seed first, each scored as trained
    (QLoRA: the function that trained, nf4-merged for the first seed and the adapter on the NF4 base for
    the others, which merge_nf4 checks compute the same). Empty without more seeds."""
    if not more_seeds:
        return {}
    first = {m: "forms/nf4-merged.jsonl" if METHODS[m].quantized else "predictions.jsonl" for m in methods}
    return {m: [read_items(task_runs / m / first[m]),
                *(read_items(task_runs / m / "seeds" / str(s) / "predictions.jsonl") for s in more_seeds)]
            for m in methods}


def seed_spread(runs: dict[str, list[list[dict]]], seeds: list[int]) -> dict:
    """Each method's main metric per training seed and their standard deviation, in points."""
    out = {}
    for method, records in runs.items():
        means = [100 * statistics.mean(v for v in scores(r) if v is not None) for r in records]
        out[method] = {"seeds": seeds, "main_points": [round(v, 2) for v in means],
                       "sd_points": round(statistics.stdev(means), 2)}
    return out


def one_pair(a: str, b: str, items: dict[str, list[dict]], bootstrap_samples: int, seed: int) -> Pair:
    """a - b on the items both were scored on (each model's predictions.jsonl records): 0/1 scores with the
    paired score interval, scores in [0, 1] (free-form, judged) with stats.paired_scores over the items both
    have a score for (`ungraded`: the items a judge left without a grade in either, left out and counted)."""
    if [x["expected"] for x in items[a]] != [x["expected"] for x in items[b]]:
        raise TuneoffError(f"{a} and {b} were not scored on the same test items: rerun their evaluate stages")
    extra = {}
    if continuous(items[a]):
        both = [(x, y) for x, y in zip(scores(items[a]), scores(items[b])) if x is not None and y is not None]
        if not both:
            raise TuneoffError(f"{a} and {b}: no test item has a grade for both: see eval.json ungraded")
        main = stats.paired_scores(*zip(*both))
        main["only_a"], main["only_b"] = main["higher_a"], main["higher_b"]
        extra = {"sd_points": round(100 * main["sd"], 3), "ungraded": len(items[a]) - len(both)}
    else:
        main = stats.paired_binary([bool(x["correct"]) for x in items[a]], [bool(x["correct"]) for x in items[b]])
    both = [(x["loss"], y["loss"]) for x, y in zip(items[a], items[b])
            if x.get("loss") is not None and y.get("loss") is not None]
    loss = stats.paired_mean(*zip(*both), samples=bootstrap_samples, seed=seed) if both else None
    return {"a": a, "b": b, "n": main["n"], "diff_points": round(100 * main["diff"], 2),
             "ci_points": [round(100 * main["ci"][0], 2), round(100 * main["ci"][1], 2)],
             "p_value": round(main["p_value"], 4), "only_a": main["only_a"], "only_b": main["only_b"],
             "interval": main["method"], **extra,
             "loss": loss and {"diff": round(loss["diff"], 4), "ci": [round(x, 4) for x in loss["ci"]], "n": loss["n"],
                               "interval": loss["method"]}}


def form_pairs(rows: list[ComparisonRow], task_runs: Path, bootstrap_samples: int, seed: int) -> list[Pair]:
    """For a method scored on test in several deployable forms (QLoRA with evaluate.all_forms_on_test),
    each other form against the deployed one, on the same items: what deploying it another way would change."""
    out = []
    for r in rows:
        if not r.get("forms"):
            continue
        deployed = f"{r['method']} {r['deployed_form']}"
        items = {f"{r['method']} {form}": read_items(task_runs / r["method"] / "forms" / f"{form}.jsonl")
                 for form, scores in r["forms"].items() if "main" in scores}
        out += [one_pair(other, deployed, items, bootstrap_samples, seed) for other in items if other != deployed]
    return out
