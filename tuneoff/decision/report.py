"""The comparison: one row per method per task, from the run's own metrics files, as JSON,
Markdown and charts."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from tuneoff.core.errors import TuneoffError
from tuneoff.core.methods import BASE, COLOURS, FULL, LORA, METHODS, PAIRS, QLORA
from tuneoff.core.params import CostParams, EstimateParams, section
from tuneoff.core.records import (
    ComparisonRow,
    EvalRecord,
    Pair,
    TaskComparison,
    TrainRecord,
    read,
    read_jsonl,
)
from tuneoff.decision import stats
from tuneoff.estimator.estimate import cost, for_record
from tuneoff.evaluation.metrics import MAIN_METRIC

# the seed article's task types, by the kind of task (and, for a user's JSONL, its scorer)
TASK_TYPE = {"extraction": "format", "iso_codes": "knowledge", "csv": "classification", "json_fields": "format",
             "exact": "generation"}


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise TuneoffError(f"{path} not found: run the stages before report")
    return json.loads(path.read_text())


def read_items(path: Path) -> list[dict]:
    if not path.is_file():
        raise TuneoffError(f"{path} not found: run the stages before report")
    return read_jsonl(path)


def compare_task(task: str, methods: list[str], estimate_params: EstimateParams, prices: dict[str, float],
                 runs: Path = Path("runs"), prepared: Path = Path("data/prepared"), bootstrap_samples: int = 2000,
                 seed: int = 0, more_seeds: tuple[int, ...] = ()) -> TaskComparison:
    """Rows for the untuned base and each method, the paired comparisons the decision uses, and the
    conditions that make them comparable. Each run's dollars (at `prices`) and the estimator's
    prediction for it are computed here, from what its train.json measured. With `more_seeds`
    (bakeoff.more_seeds), the pairs cover every seed each method trained with."""
    meta = read_json(prepared / task / "meta.json")
    rows, trains, items = [], {}, {}
    for method in [BASE, *methods]:
        failed = runs / task / method / "failed.json"
        if failed.is_file():  # the flow gave up on this method; it stays a row
            rows.append({"method": method, "failed": read_json(failed)["error"].strip().splitlines()[-1][:300],
                         "main": None, "ci_low": None, "ci_high": None, "test_loss": None, "metrics": {},
                         "forms": None, "deployed_form": None, "train": None})
            continue
        ev = read(EvalRecord, runs / task / method / "eval.json")
        items[method] = read_items(runs / task / method / "predictions.jsonl")
        if method == BASE:
            rows.append({"method": method, **_quality(ev), "train": None})
            continue
        train = trains[method] = read(TrainRecord, runs / task / method / "train.json")
        dollars = cost(train.timing.wall_seconds, train.device, prices)  # a rented device bills the whole stage
        predicted, timing = for_record(train, estimate_params, prices)
        rows.append({"method": method, **_quality(ev), "train": {
            "peak_memory_bytes": train.memory.peak_memory_bytes,
            "memory_measure": train.memory.measure,
            "train_seconds": train.timing.train_seconds,
            "gpu_hours": dollars["gpu_hours"],
            "device_hours": dollars["device_hours"],
            "cost_usd": dollars["usd"],
            "trainable_percent": train.params.trainable_percent,
            "artifact_bytes": train.output.weights_bytes,
            "artifact_kind": train.output.kind,
            "device": train.device,
            "precision": train.precision,
            "estimate": {"peak_memory_bytes": predicted["peak_memory_bytes"], "phase": predicted["phase"],
                         "train_flops": predicted["train_flops"], "train_seconds": timing.get("train_seconds"),
                         "utilisation": timing.get("utilisation")},
        }})
    full = next((r for r in rows if r["method"] == FULL.name and r["main"] is not None), None)
    for r in rows:
        r["gap_to_full_points"] = None if full is None or r["main"] is None else round(100 * (full["main"] - r["main"]), 2)
    first = next(iter(trains.values()), None)
    by_seed = seed_runs(runs / task, [m for m in methods if m in items], list(more_seeds))
    return {
        "task": task,
        "scorer": meta["scorer"],
        "task_type": TASK_TYPE.get(meta["kind"], TASK_TYPE.get(meta["scorer"], "generation")),
        "main_metric": MAIN_METRIC[meta["scorer"]],
        "rows": rows,
        "pairs": paired(items, bootstrap_samples, seed, by_seed),
        "seeds": seed_spread(by_seed, [first.seed, *more_seeds]) if by_seed and first else None,
        "form_pairs": form_pairs(rows, runs / task, bootstrap_samples, seed),
        "conditions": {
            "test_examples": meta["examples"]["test"], "train_examples": meta["examples"]["train"],
            "token_budget": first and first.tokens.budget, "seed": first and first.seed, "more_seeds": list(more_seeds),
            "real_tokens": {m: t.tokens.real for m, t in trains.items()},
            "same_tokens": len({t.tokens.real for t in trains.values()}) <= 1,
        },
    }


def paired(items: dict[str, list[dict]], bootstrap_samples: int, seed: int,
           seed_runs: dict[str, list[list[dict]]] | None = None) -> list[Pair]:
    """a - b on the same test items for each pair in PAIRS that was scored: the main metric (points)
    and the per-example loss of the reference answer (evidence beside it: continuous, so more sensitive).
    A method trained with several seeds (`seed_runs`: every seed's records) is compared over all of them."""
    seed_runs = seed_runs or {}
    return [one_pair(a, b, items, bootstrap_samples, seed) if a not in seed_runs and b not in seed_runs
            else pair_over_seeds(a, b, {m: seed_runs.get(m, [items[m]]) for m in (a, b)}, bootstrap_samples, seed)
            for a, b in PAIRS if a in items and b in items]


def pair_over_seeds(a: str, b: str, runs: dict[str, list[list[dict]]], bootstrap_samples: int, seed: int) -> Pair:
    """a - b over every seed each was trained with, on the same items: a two-level bootstrap interval
    (items and seeds) for the main metric and for the per-example loss."""
    every = [r for m in (a, b) for r in runs[m]]
    if any([x["expected"] for x in r] != [x["expected"] for x in every[0]] for r in every):
        raise TuneoffError(f"{a} and {b} were not all scored on the same test items: rerun their stages")
    main = stats.paired_over_seeds([[float(x["correct"]) for x in r] for r in runs[a]],
                                   [[float(x["correct"]) for x in r] for r in runs[b]], bootstrap_samples, seed)
    kept = [i for i in range(main["n"]) if all(r[i].get("loss") is not None for r in every)]
    loss = kept and stats.paired_over_seeds([[r[i]["loss"] for i in kept] for r in runs[a]],
                                            [[r[i]["loss"] for i in kept] for r in runs[b]], bootstrap_samples, seed)
    return {"a": a, "b": b, "n": main["n"], "seeds": main["seeds"], "diff_points": round(100 * main["diff"], 2),
            "ci_points": [round(100 * main["ci"][0], 2), round(100 * main["ci"][1], 2)],
            "p_value": None, "only_a": None, "only_b": None, "interval": main["method"],
            "loss": loss and {"diff": round(loss["diff"], 4), "ci": [round(x, 4) for x in loss["ci"]], "n": loss["n"],
                              "interval": loss["method"]}}


def seed_runs(task_runs: Path, methods: list[str], more_seeds: list[int]) -> dict[str, list[list[dict]]]:
    """Every training seed's test records of each method, the first seed first, each scored as trained
    (QLoRA: its adapter on the NF4 base, the form its other seeds are scored in). Empty without more seeds."""
    if not more_seeds:
        return {}
    first = {m: "predictions-nf4.jsonl" if METHODS[m].quantized else "predictions.jsonl" for m in methods}
    return {m: [read_items(task_runs / m / first[m]),
                *(read_items(task_runs / m / "seeds" / str(s) / "predictions.jsonl") for s in more_seeds)]
            for m in methods}


def seed_spread(runs: dict[str, list[list[dict]]], seeds: list[int]) -> dict:
    """Each method's main metric per training seed and their standard deviation, in points."""
    out = {}
    for method, records in runs.items():
        scores = [100 * sum(bool(x["correct"]) for x in r) / len(r) for r in records]
        out[method] = {"seeds": seeds, "main_points": [round(v, 2) for v in scores],
                       "sd_points": round(statistics.stdev(scores), 2)}
    return out


def one_pair(a: str, b: str, items: dict[str, list[dict]], bootstrap_samples: int, seed: int) -> Pair:
    """a - b on the items both were scored on (each model's predictions.jsonl records)."""
    if [x["expected"] for x in items[a]] != [x["expected"] for x in items[b]]:
        raise TuneoffError(f"{a} and {b} were not scored on the same test items: rerun their evaluate stages")
    main = stats.paired_binary([bool(x["correct"]) for x in items[a]], [bool(x["correct"]) for x in items[b]])
    both = [(x["loss"], y["loss"]) for x, y in zip(items[a], items[b])
            if x.get("loss") is not None and y.get("loss") is not None]
    loss = stats.paired_mean(*zip(*both), samples=bootstrap_samples, seed=seed) if both else None
    return {"a": a, "b": b, "n": main["n"], "diff_points": round(100 * main["diff"], 2),
             "ci_points": [round(100 * main["ci"][0], 2), round(100 * main["ci"][1], 2)],
             "p_value": round(main["p_value"], 4), "only_a": main["only_a"], "only_b": main["only_b"],
             "interval": main["method"],
             "loss": loss and {"diff": round(loss["diff"], 4), "ci": [round(x, 4) for x in loss["ci"]], "n": loss["n"],
                               "interval": loss["method"]}}


def form_pairs(rows: list[ComparisonRow], task_runs: Path, bootstrap_samples: int, seed: int) -> list[Pair]:
    """For a method scored in several deployable forms (QLoRA), each other form against the deployed
    one, on the same items: what deploying it another way would change."""
    out = []
    for r in rows:
        if not r.get("forms"):
            continue
        deployed = f"{r['method']} {r['deployed_form']}"
        items = {f"{r['method']} {form}": read_items(task_runs / r["method"] / f"predictions-{form}.jsonl")
                 for form in r["forms"]}
        out += [one_pair(other, deployed, items, bootstrap_samples, seed) for other in items if other != deployed]
    return out


def predictions(comparisons: list[TaskComparison]) -> list[dict]:
    """Predicted vs measured peak memory and train time, per task and method. Time is predicted twice:
    at params.yaml's utilisation prior, and calibrated leave-one-out on the FLOP/s the same method
    reached on the report's other tasks (same device and precision): a prediction this run did not inform."""
    runs = [(c["task"], r["method"], r["train"]) for c in comparisons for r in c["rows"]
            if r.get("train") and r["train"].get("estimate")]
    out = []
    for task, method, t in runs:
        est = t["estimate"]
        others = [o["estimate"]["train_flops"] / o["train_seconds"] for task2, method2, o in runs
                  if method2 == method and task2 != task and (o["device"], o["precision"]) == (t["device"], t["precision"])
                  and o["train_seconds"]]
        calibrated = est["train_flops"] / statistics.median(others) if others else None
        out.append({"task": task, "method": method, "measure": t["memory_measure"],
                    "peak_predicted_bytes": est["peak_memory_bytes"], "peak_measured_bytes": t["peak_memory_bytes"],
                    "peak_error_percent": _error(est["peak_memory_bytes"], t["peak_memory_bytes"]),
                    "seconds_prior": est["train_seconds"], "seconds_calibrated": calibrated,
                    "seconds_measured": t["train_seconds"],
                    "seconds_error_percent": _error(calibrated if calibrated else est["train_seconds"], t["train_seconds"])})
    return out


def _error(predicted: float | None, measured: float | None) -> float | None:
    return None if not predicted or not measured else round(100 * (predicted / measured - 1), 1)


def _predictions_table(comparisons: list[dict]) -> list[str]:
    rows = predictions(comparisons)
    if not rows:
        return []
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    lines = ["## Predicted vs measured", "",
             "`tuneoff estimate`'s numbers for each run, computed from the model's config and the run's settings "
             "before it trained (train.json `estimate`), beside what the run measured. Time: at params.yaml's "
             "utilisation prior, and calibrated on the FLOP/s the same method reached on the other tasks "
             "(the error is the calibrated one when there is one). Formulas: docs/estimator.md.", "",
             "| task | method | peak predicted GiB | peak measured GiB | error % | train s predicted (prior) "
             "| train s predicted (calibrated) | train s measured | error % |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['method']} | {r['peak_predicted_bytes'] / 2**30:.2f} | "
                     f"{r['peak_measured_bytes'] / 2**30:.2f} | {fmt(r['peak_error_percent'], '+.1f')} | "
                     f"{fmt(r['seconds_prior'], '.0f')} | {fmt(r['seconds_calibrated'], '.0f')} | "
                     f"{r['seconds_measured']:.0f} | {fmt(r['seconds_error_percent'], '+.1f')} |")
    measure = rows[0]["measure"]
    if measure.startswith("cpu"):
        lines += ["", "On a CPU the measured peak is the process's resident set: the prediction adds "
                      "estimate.overhead_gib.cpu to the tensors, and glibc's malloc keeps freed blocks resident on "
                      "top of both (docs/estimator.md: why CPU runs measure above the prediction)."]
    return lines + [""]


def _quality(ev: EvalRecord) -> dict:
    m = ev.metrics
    return {"main": m["main"], "ci_low": m["ci_low"], "ci_high": m["ci_high"], "test_loss": ev.test_loss,
            "metrics": {k: v for k, v in m.items() if k not in ("main", "ci_low", "ci_high", "confusions")},
            "examples_per_second": ev.timing.examples_per_second, "forms": ev.forms, "deployed_form": ev.deployed_form}


def _fmt_row(r: dict, c: dict) -> list[str]:
    if r.get("failed"):
        return [r["method"], f"failed: {r['failed'][:80]}"] + [""] * 8
    t = r["train"]
    vs_full = next((p for p in c["pairs"] if (p["a"], p["b"]) == (r["method"], FULL.name)), None)
    gap = "" if vs_full is None else (f"{vs_full['diff_points']:+.1f} [{vs_full['ci_points'][0]:+.1f}, "
                                      f"{vs_full['ci_points'][1]:+.1f}]")
    cells = [r["method"], f"{100 * r['main']:.1f} [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]", gap,
             f"{r['test_loss']:.3f}"]
    if t is None:
        return cells + ["(untuned)"] + [""] * 5
    usd = "n/a" if t["cost_usd"] is None else f"{t['cost_usd']:.4f}"
    return cells + [f"{t['peak_memory_bytes'] / 2**30:.2f}", f"{t['train_seconds']:.0f}", f"{t['gpu_hours']:.4f}",
                    usd, f"{t['trainable_percent']:.2f}", f"{t['artifact_bytes'] / 2**20:.1f}"]


def _forms_note(c: dict) -> str:
    """QLoRA scored in each form it could be deployed in, and which one ships."""
    row = next((r for r in c["rows"] if r.get("forms")), None)
    if row is None:
        return ""
    forms = "; ".join(f"{name} {100 * f['main']:.1f}% [{100 * f['ci_low']:.1f}, {100 * f['ci_high']:.1f}]"
                      for name, f in row["forms"].items())
    return (f" {row['method']} was scored on the whole test set in each form it could be deployed in: {forms}. "
            f"Deployed: {row['deployed_form']} (the best score; ties go to the function that trained: nf4-merged, "
            "then nf4).")


def _pairs_table(pairs: list[dict], metric: str) -> list[str]:
    lines = [f"| a - b | {metric}, points [95% CI] | items right only in a / only in b | McNemar p "
             "| test loss a - b [95% CI] |", "|---|---|---|---|---|"]
    for p in pairs:
        lo, hi = p["ci_points"]
        loss = p["loss"] and f"{p['loss']['diff']:+.3f} [{p['loss']['ci'][0]:+.3f}, {p['loss']['ci'][1]:+.3f}]"
        exact = "- (seeds)" if p["p_value"] is None else f"{p['p_value']:.3g}"
        only = "-" if p["only_a"] is None else f"{p['only_a']} / {p['only_b']}"
        lines.append(f"| {p['a']} - {p['b']} | {p['diff_points']:+.1f} [{lo:+.1f}, {hi:+.1f}] | {only} | {exact} "
                     f"| {loss or '-'} |")
    return lines


def _seeds_note(c: dict) -> list[str]:
    """Each method's score per training seed: how much of a difference one run's luck can make."""
    if not c.get("seeds"):
        return []
    rows = [f"| {m} | {' / '.join(f'{v:.1f}' for v in s['main_points'])} | {s['sd_points']:.1f} |"
            for m, s in c["seeds"].items()]
    seeds = ", ".join(str(x) for x in next(iter(c["seeds"].values()))["seeds"])
    return [f"Each method trained with seeds {seeds}, each scored as trained (QLoRA: its adapter on the NF4 base). "
            "The paired intervals above resample the test items and, for each method, its seeds "
            "(a two-level bootstrap), so the spread between runs is in them:", "",
            f"| method | {c['main_metric']} % per seed | sd (points) |", "|---|---|---|", *rows, ""]


def claims(c: TaskComparison) -> list[dict]:
    """The seed article's claims this run can test, each: holds, does not hold, or cannot tell at this power."""
    rows = {r["method"]: r for r in c["rows"] if not r.get("failed")}
    pairs = {(p["a"], p["b"]): p for p in c["pairs"]}
    out = []

    def judged(claim, p, low, high):
        """Holds when the interval lies inside [low, high], does not when it lies wholly outside."""
        lo, hi = p["ci_points"]
        status = ("holds" if lo >= low and hi <= high else "does not hold" if hi < low or lo > high
                  else "cannot tell at this power")
        out.append({"claim": claim, "status": status,
                    "evidence": f"{p['a']} - {p['b']}: {p['diff_points']:+.1f} points [{lo:+.1f}, {hi:+.1f}]"})

    lora_vs_full, qlora_vs_lora = pairs.get((LORA.name, FULL.name)), pairs.get((QLORA.name, LORA.name))
    if lora_vs_full:
        if c["task_type"] == "knowledge":
            judged("LoRA 4-7 points behind full fine-tuning on knowledge tasks", lora_vs_full, -7, -4)
        else:
            judged(f"LoRA within 1-3 points of full fine-tuning ({c['task_type']} task; taken as: at most 3 behind)",
                   lora_vs_full, -3, float("inf"))
    if qlora_vs_lora:
        judged("QLoRA within 0.5-1.5 points of LoRA (taken as: at most 1.5 behind)", qlora_vs_lora, -1.5,
               float("inf"))
    measured = "one run each, no interval"
    # each method's training record; None when it did not train (or failed)
    lora, qlora, full = (rows.get(m.name, {}).get("train") for m in (LORA, QLORA, FULL))
    if lora:
        share = lora["trainable_percent"]
        out.append({"claim": "LoRA trains a fraction of a percent of the parameters",
                    "status": "holds" if share < 1 else "does not hold", "evidence": f"{share:.2f}% trainable"})
    if lora and qlora:
        saving = 100 * (1 - qlora["peak_memory_bytes"] / lora["peak_memory_bytes"])
        out.append({"claim": "QLoRA needs 40-60% less memory than LoRA", "status": "holds" if 40 <= saving <= 60
                    else "does not hold", "evidence": (f"{saving:.0f}% less" if saving >= 0 else f"{-saving:.0f}% more")
                    + " peak memory "
                    f"({lora['memory_measure']}; {measured})"})
    if lora and full:
        lora_usd, full_usd = (t["cost_usd"] or 0 for t in (lora, full))
        if full_usd:
            share = 100 * lora_usd / full_usd
            out.append({"claim": "LoRA costs 10-20% of full fine-tuning's compute", "status": "holds" if 10 <= share <= 20
                        else "does not hold", "evidence": f"{share:.0f}% of full's cost ({measured})"})
    return out


def _quantize_note(quantization: dict | None) -> str:
    if not quantization:
        return ""
    size, name = quantization["size"], quantization["quant_type"].upper() + (" + double quant" if quantization["double_quant"] else "")
    return (f"QLoRA's base is {name}: {size['float_bytes'] / 2**20:.0f} MiB -> {size['quantized_bytes'] / 2**20:.0f} MiB "
            f"on disk ({size['compression']:.1f}x smaller).")


def markdown(comparisons: list[dict], decisions: dict | None = None, quantization: dict | None = None) -> str:
    lines = ["# tuneoff bake-off report", ""]
    for c in comparisons:
        cond = c["conditions"]
        device = next((r["train"]["device"] for r in c["rows"] if r["train"]), "?")
        measure = next((r["train"]["memory_measure"] for r in c["rows"] if r["train"]), "?")
        lines += [f"## {c['task']}", "",
                  f"| method | {c['main_metric']} % [95% CI] | - full, paired (points) | test loss | peak mem GiB "
                  f"| train s | GPU-h | USD | trainable % | artifact MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(_fmt_row(r, c)) + " |" for r in c["rows"]]
        lines += ["", f"Fair by construction: every method trained on the same {cond['train_examples']} training "
                      f"examples with a budget of {cond['token_budget']:,} real tokens and seed {cond['seed']} "
                      f"(same batches: {'yes' if cond['same_tokens'] else 'NO'}), and was scored on the same "
                      f"{cond['test_examples']} held-out test examples. Device: {device}; peak memory is {measure}. "
                      "LoRA is scored merged into the full-precision base (what would be deployed)."
                      + _forms_note(c), ""]
        error = (quantization or {}).get("error", {}).get(c["task"])
        if error:
            lines += [_quantize_note(quantization) + f" Quantizing moved val loss {error['val_loss_float']:.3f} -> "
                      f"{error['val_loss_quantized']:.3f} (mean |logit diff| {error['mean_abs_logit_diff']:.3f}, "
                      f"top-1 agreement {100 * error['top1_agreement']:.1f}%).", ""]
        if decisions and c["task"] in decisions:
            d = decisions[c["task"]]
            head = {"decided": f"Recommendation: {d['method']}", "inconclusive": "Verdict: inconclusive",
                    "none": "Verdict: no method qualifies"}[d["verdict"]]
            lines += [f"**{head}.** {d['rationale']}", ""] + ([f"What would settle it: {d['settle']}", ""] if d["settle"] else [])
        lines += ["Paired on the same test items (a - b; interval: Newcombe's paired score interval for the "
                  "0/1 metric, a BCa paired bootstrap for the per-example loss of the reference answer, where lower "
                  "is better):", "", *_pairs_table(c["pairs"], c["main_metric"]), "", *_seeds_note(c)]
        if c["form_pairs"]:
            lines += ["QLoRA in its other deployable forms, against the one deployed (same items):", "",
                      *_pairs_table(c["form_pairs"], c["main_metric"]), ""]
        checked = claims(c)
        if checked:
            lines += ["The seed article's claims, as this run can test them:", "", "| claim | this run | evidence |",
                      "|---|---|---|", *(f"| {x['claim']} | {x['status']} | {x['evidence']} |" for x in checked), ""]
        lines += [f"![{c['task']}]({c['task']}.png)", ""]
    lines += _predictions_table(comparisons)
    return "\n".join(lines)


def _loss_log(runs: Path, task: str, method: str) -> list[dict]:
    with open(runs / task / method / "loss.csv") as f:
        return list(csv.DictReader(f))


COST_COLUMNS = ["peak_memory_gib", "train_seconds", "gpu_hours", "cost_usd", "trainable_percent", "artifact_mib"]
COLUMNS = (["task", "method", "main_metric", "main", "ci_low", "ci_high", "gap_to_full_points", "test_loss"]
           + COST_COLUMNS + ["recommended"])


def comparison_rows(comparisons: list[dict], decisions: dict) -> list[dict]:
    """One flat row per task and method: the report table, for W&B and other tools (None = untuned base)."""
    rows = []
    for c in comparisons:
        for r in c["rows"]:
            if r.get("failed"):
                continue
            t = r["train"]
            cost = {"peak_memory_gib": round(t["peak_memory_bytes"] / 2**30, 3), "train_seconds": t["train_seconds"],
                    "gpu_hours": t["gpu_hours"], "cost_usd": t["cost_usd"], "trainable_percent": t["trainable_percent"],
                    "artifact_mib": round(t["artifact_bytes"] / 2**20, 2)} if t else {}
            rows.append({"task": c["task"], "method": r["method"], "main_metric": c["main_metric"], "main": r["main"],
                         "ci_low": r["ci_low"], "ci_high": r["ci_high"], "gap_to_full_points": r["gap_to_full_points"],
                         "test_loss": r["test_loss"], **{k: cost.get(k) for k in COST_COLUMNS},
                         "recommended": decisions[c["task"]]["method"] == r["method"]})
    return rows


def write_plot_data(comparisons: list[dict], runs: Path, out_dir: Path) -> None:
    """Long-format CSVs behind dvc.yaml's top-level plots: loss curves, and quality vs cost."""
    with open(out_dir / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "method", "step", "tokens", "train_loss"])
        for c in comparisons:
            for r in c["rows"]:
                if r["train"]:
                    w.writerows([c["task"], r["method"], x["step"], x["tokens"], x["train_loss"]]
                                for x in _loss_log(runs, c["task"], r["method"]))
    with open(out_dir / "tradeoff.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "method", "main_percent", "cost_usd", "peak_memory_gib", "train_seconds"])
        for c in comparisons:
            for r in c["rows"]:
                if r.get("failed"):
                    continue
                t = r["train"] or {}
                w.writerow([c["task"], r["method"], round(100 * r["main"], 2), t.get("cost_usd", 0.0) or 0.0,
                            round(t.get("peak_memory_bytes", 0) / 2**30, 3), t.get("train_seconds", 0.0)])


def plot(comparison: dict, runs: Path, out: Path, margin_points: float | None = None, verdict: str = "") -> None:
    """The verdict (each method's paired difference from full fine-tuning, with the non-inferiority
    margin), cost and peak memory by method, and training loss curves, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task, rows = comparison["task"], comparison["rows"]
    trained = [r for r in rows if r["train"]]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    vs_full = [p for p in comparison["pairs"] if p["b"] == FULL.name]
    for y, p in enumerate(vs_full):
        lo, hi = p["ci_points"]
        ax1.errorbar(p["diff_points"], y, xerr=[[p["diff_points"] - lo], [hi - p["diff_points"]]], fmt="o", capsize=4,
                     color=COLOURS.get(p["a"]))
    ax1.axvline(0, color="black", linewidth=0.8)
    if margin_points is not None and vs_full:
        ax1.axvline(-margin_points, color="C3", linestyle="--", label=f"margin: -{margin_points:g} points")
        ax1.legend(fontsize=8, loc="lower right")
    ax1.set_yticks(range(len(vs_full)), [p["a"] for p in vs_full])
    ax1.set_ylim(-0.7, len(vs_full) - 0.3)
    ax1.set(xlabel=f"{comparison['main_metric']} - full fine-tuning (points, paired 95% CI)",
            title=f"{task}: each method against full" + (f"\nverdict: {verdict}" if verdict else ""))
    names = [r["method"] for r in trained]
    ax2.bar(names, [r["train"]["cost_usd"] or 0.0 for r in trained], color=[COLOURS.get(n) for n in names])
    ax2.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"${x:.2g}"))
    memory = ax2.twinx()
    memory.plot(names, [r["train"]["peak_memory_bytes"] / 2**30 for r in trained], "kD", label="peak memory")
    memory.set_ylim(bottom=0)
    memory.set_ylabel(f"peak memory, GiB ({trained[0]['train']['memory_measure'] if trained else ''})")
    ax2.set(ylabel="training cost (USD)", title="cost (bars) and peak memory (diamonds)")
    for r in trained:
        log = _loss_log(runs, task, r["method"])
        ax3.plot([int(x["tokens"]) for x in log], [float(x["train_loss"]) for x in log], label=r["method"],
                 color=COLOURS.get(r["method"]))
    ax3.set(xlabel="real tokens trained", ylabel="train loss", title="training loss")
    ax3.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def results_table(runs: Path = Path("runs")) -> str:
    """One line per (task, method) from runs/<task>/<method>/train.json, in dollars at params.yaml's prices."""
    prices = section(CostParams, "cost").price_per_hour
    rows, measures = [], set()
    for path in sorted(runs.glob("*/*/train.json")):
        m = read(TrainRecord, path)
        usd = cost(m.timing.wall_seconds, m.device, prices)["usd"]
        measures.add(m.memory.measure)
        rows.append([m.task, m.method, m.device, m.precision, f"{m.params.trainable_percent:.2f}%",
                     f"{m.memory.peak_memory_bytes / 2**30:.2f}", f"{m.timing.train_seconds:.0f}",
                     f"{m.timing.tokens_per_second:.0f}", f"{m.loss.val_before:.3f} -> {m.loss.val:.3f}",
                     f"{m.output.weights_bytes / 2**20:.1f}", "n/a" if usd is None else f"{usd:.4f}"])
    if not rows:
        return f"no results under {runs}/ yet: run `dvc repro` (or `make run`)"
    header = ["task", "method", "device", "prec", "trainable", "peak GiB", "train s", "tok/s",
              "val loss", "weights MiB", "USD"]
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(header), *map(fmt, rows),
                      f"(peak memory: {', '.join(sorted(measures))}; details in {runs}/<task>/<method>/train.json)"])
