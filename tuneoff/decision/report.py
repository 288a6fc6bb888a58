"""The comparison: one row per method per task, from the run's own metrics files, as JSON,
Markdown and charts (the paired comparisons: pairs.py; costs and predictions: costs.py)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from tuneoff.core.errors import TuneoffError
from tuneoff.core.methods import BASE, COLOURS, FULL, LORA, QLORA
from tuneoff.core.params import EstimateParams
from tuneoff.core.records import EvalRecord, TaskComparison, TrainRecord, Tuning, read
from tuneoff.decision import general
from tuneoff.decision.costs import _predictions_table, run_costs
from tuneoff.decision.decide import blind
from tuneoff.decision.pairs import (
    form_pairs,
    paired,
    read_items,
    scores,
    seed_runs,
    seed_spread,
)
from tuneoff.evaluation.metrics import CONTINUOUS, FREE_FORM, MAIN_METRIC, SCALE

# the seed article's task types, by the kind of task (and, for a user's JSONL, its scorer)
TASK_TYPE = {"extraction": "format", "triage": "classification", "iso_codes": "knowledge", "csv": "classification", "json_fields": "format",
             "exact": "generation", "restaurants": "generation"}


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise TuneoffError(f"{path} not found: run the stages before report")
    return json.loads(path.read_text())


def compare_task(task: str, methods: list[str], estimate_params: EstimateParams, prices: dict[str, float],
                 runs: Path, prepared: Path, bootstrap_samples: int = 2000,
                 seed: int = 0, more_seeds: tuple[int, ...] = (), sample_replies: int = 0,
                 judge_prices: dict[str, float] | None = None) -> TaskComparison:
    """Rows for the untuned base and each method, the paired comparisons the decision uses, and the
    conditions that make them comparable. Each run's dollars (at `prices`) and the estimator's
    prediction for it are computed here, from what its train.json measured. With `more_seeds`
    (bakeoff.more_seeds), the pairs cover every seed each method trained with. `sample_replies` test
    items (decide.sample_replies) are kept with every model's reply, for a reviewer to read. The task's
    runs are read from `runs`/<task>/<model>/ and its meta.json from `prepared`/<task>/. A judged task's
    rows carry what its grades cost (`judge_usd`, at `judge_prices`: cost.judge_usd_per_million_tokens)."""
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
        rows.append({"method": method, **_quality(ev), "train": run_costs(train, estimate_params, prices)})
    for r in rows:
        asked = r["metrics"].get("judge")
        if asked and judge_prices:  # tokens the stage sent and read, at the price in params
            r["judge_usd"] = round((asked["input_tokens"] * judge_prices["input"]
                                    + asked["output_tokens"] * judge_prices["output"]) / 1e6, 6)
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
        "samples": replies_sample(items, sample_replies, seed),
        "seeds": seed_spread(by_seed, [first.seed, *more_seeds]) if by_seed and first else None,
        "form_pairs": form_pairs(rows, runs / task, bootstrap_samples, seed),
        "general": general.general_ability(task, [r["method"] for r in rows if r["method"] != BASE
                                                  and not r.get("failed")], runs),
        "conditions": {
            "test_examples": meta["examples"]["test"], "train_examples": meta["examples"]["train"],
            "token_budget": first and first.tokens.budget, "seed": first and first.seed, "more_seeds": list(more_seeds),
            "real_tokens": {m: t.tokens.real for m, t in trains.items()},
            "same_tokens": len({t.tokens.real for t in trains.values()}) <= 1,
        },
    }


def replies_sample(items: dict[str, list[dict]], k: int, seed: int) -> list[dict]:
    """`k` test items drawn at random (seeded), each with its prompt (the last user turn), its references
    and every model's reply with its score (0-1; right/wrong as 1/0): what the verdict rests on, to read."""
    n = min(map(len, items.values()), default=0)
    picked = sorted(random.Random(seed).sample(range(n), min(k, n)))
    first = next(iter(items.values()), [])
    return [{"item": i, "prompt": first[i]["input"], "references": first[i].get("references", [first[i]["expected"]]),
             "replies": {m: {"reply": r[i]["produced"], "score": scores(r)[i]} for m, r in items.items()}}
            for i in picked]


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
    on_test = {name: f for name, f in row["forms"].items() if "main" in f}
    forms = "; ".join(f"{name} {100 * f['main']:.1f}% [{100 * f['ci_low']:.1f}, {100 * f['ci_high']:.1f}]"
                      for name, f in on_test.items())
    chosen_on = "; ".join(f"{name} {100 * f['val']['main']:.1f}%, loss {f['val']['loss']:.3f}"
                          for name, f in row["forms"].items() if f.get("val"))
    scored = (f"was scored on the test set in each form it could ship in: {forms}" if len(on_test) > 1 else
              f"was scored on the test set in the form that ships ({forms}; `evaluate.all_forms_on_test` scores "
              "the others there too)")
    return (f" {row['method']} {scored}; its adapter on the 4-bit base computes nf4-merged's function "
            f"(merge-nf4.json). Deployed: {row['deployed_form']}, chosen on the validation split ({chosen_on}: the "
            "best score, then the lower loss; a tie goes to nf4-merged), so the test split chose nothing.")


def _pairs_table(pairs: list[dict], metric: str) -> list[str]:
    scored = any(p.get("sd_points") is not None for p in pairs)  # a score in [0, 1], not right or wrong
    only, test = ("items scored higher by a / by b", "t test p") if scored else ("items right only in a / only in b",
                                                                                  "McNemar p")
    lines = [f"| a - b | {metric}, points [95% CI] | {only} | {test} | test loss a - b [95% CI] |",
             "|---|---|---|---|---|"]
    for p in pairs:
        lo, hi = p["ci_points"]
        loss = p["loss"] and f"{p['loss']['diff']:+.3f} [{p['loss']['ci'][0]:+.3f}, {p['loss']['ci'][1]:+.3f}]"
        exact = "- (seeds)" if p["p_value"] is None else f"{p['p_value']:.3g}"
        only = "-" if p["only_a"] is None else f"{p['only_a']} / {p['only_b']}"
        lines.append(f"| {p['a']} - {p['b']} | {p['diff_points']:+.1f} [{lo:+.1f}, {hi:+.1f}] | {only} | {exact} "
                     f"| {loss or '-'} |")
    return lines


def _rates_table(c: dict) -> list[str]:
    """Each method's learning rate and how it was chosen; pilots are part of the method's cost."""
    trained = [r for r in c["rows"] if r.get("train") and r["train"].get("tuning")]
    if not trained:
        return []
    usd = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    lines = ["Learning rates: a list of candidates in params.yaml is tuned, each on a pilot of part of the budget, the "
             "lowest val loss (validation split) training the whole budget; the pilots are part of the method's cost.",
             "", "| method | lr | how chosen | pilots s | pilots USD | USD with pilots | USD final run alone |",
             "|---|---|---|---|---|---|---|"]
    for r in trained:
        t, tuning = r["train"], r["train"]["tuning"]
        lines.append(f"| {r['method']} | {tuning['lr']:g} | {Tuning(**{k: v for k, v in tuning.items() if k != 'usd'}).line()} "
                     f"| {tuning['seconds']:.0f} | {usd(tuning['usd'])} | {usd(t['cost_usd'])} | {usd(t['cost_usd_final'])} |")
    return lines + [""]


def _metric_head(c: dict) -> str:
    return f"{c['main_metric']} (0-100)" if c.get("scorer") in CONTINUOUS else f"{c['main_metric']} %"


def _interval_name(c: dict) -> str:
    if c.get("scorer") in CONTINUOUS:
        return ("for the score, a t interval on the per-item differences with one pseudo-item at each end of their "
                "range, widened where its skew-corrected form reaches further")
    return "Tango's paired score interval for the 0/1 metric, widened where its skewness-corrected form reaches further"


def _free_form_table(c: dict) -> list[str]:
    """Free-form replies: every metric they were scored on, per model (the main one decides)."""
    scored = [r for r in c["rows"] if not r.get("failed")]
    if c.get("scorer") not in CONTINUOUS or not scored:
        return []
    names = ["rouge_l", "chrf", "bleu", "exact_match"] if c["scorer"] in FREE_FORM else ["judge_grade", "exact_match"]
    judged = c["scorer"] == "judge"

    def asked(r: dict) -> str:  # what the judge was asked for this model's replies, and what it cost
        j = r["metrics"].get("judge") or {}
        usd = "n/a" if r.get("judge_usd") is None else f"{r['judge_usd']:.4f}"
        return (f" | {r['metrics'].get('ungraded', 0)} | {j.get('requests', 0)} ({j.get('cached', 0)} cached) | "
                f"{j.get('input_tokens', 0):,} / {j.get('output_tokens', 0):,} | {usd} |")

    rows = [f"| {r['method']} | " + " | ".join(f"{100 * r['metrics'].get(k, 0.0):.1f}" for k in names)
            + (asked(r) if judged else " |") for r in scored]
    head = " ungraded | judge requests | judge tokens in / out | judge USD |" if judged else ""
    return ["Every metric the replies were scored on, 0-100" + (
            " (the judge's grade mapped from its scale; the items it left ungraded, a failed request or an answer with "
            "no grade on the scale, are counted here and left out of the pairs; its tokens and dollars are part of "
            "evaluating each model, at cost.judge_usd_per_million_tokens)" if judged else
            " (ROUGE-L and chrF per item against the best reference, the mean over items; BLEU over the corpus, every "
            "reference)") + ":", "",
            f"| method | {' | '.join(names)} |" + head, "|---|" + "---:|" * (len(names) + 4 * judged), *rows, ""]


def _replies(c: dict) -> list[str]:
    """A sample of test items with every model's reply and its score: what the verdict rests on, to read."""
    if not c.get("samples"):
        return []
    clip = lambda text: " ".join(str(text).split()).replace("|", "\\|")[:300]  # noqa: E731
    lines = [f"Reading the replies: {len(c['samples'])} test items drawn at random, each model's reply and its "
             f"{c['main_metric']} ({SCALE.get(c['main_metric'], 'points')}):", ""]
    for s in c["samples"]:
        lines += [f"Item {s['item']}: {clip(s['prompt'])}", "",
                  "References: " + " / ".join(clip(r) for r in s["references"]), "",
                  "| model | reply | score |", "|---|---|---:|"]
        for m, r in s["replies"].items():
            lines.append(f"| {m} | {clip(r['reply'])} | {'-' if r['score'] is None else format(100 * r['score'], '.1f')} |")
        lines.append("")
    return lines


def _fields_table(c: dict) -> list[str]:
    """A JSON task's per-key accuracy by method (eval.json field_accuracy): each key over the test
    records whose reference has it, so records of different shapes (intents) each count where they apply."""
    scored = [r for r in c["rows"] if "field_accuracy" in r["metrics"]]
    if not scored:
        return []
    fields = {k: f["n"] for r in scored for k, f in r["metrics"]["field_accuracy"].items()}  # the same test items

    def cells(k: str) -> str:
        found = [r["metrics"]["field_accuracy"].get(k) for r in scored]
        return " | ".join("-" if f is None else f"{100 * f['accuracy']:.1f}" for f in found)

    rows = [f"| {k} | {n} | {cells(k)} |" for k, n in fields.items()]
    extra = " | ".join(str(r["metrics"]["extra_keys"]) for r in scored)
    return ["Accuracy (%) per JSON key, over the test records whose reference has the key (a reply that leaves "
            "it out is wrong); the last row counts the replies with a key their reference lacks:", "",
            f"| key | records | {' | '.join(r['method'] for r in scored)} |", "|---|---:|" + "---:|" * len(scored),
            *rows, f"| (extra keys: replies) | {c['conditions']['test_examples']} | {extra} |", ""]


def _seeds_note(c: dict) -> list[str]:
    """Each method's score per training seed: how much of a difference one run's luck can make."""
    if not c.get("seeds"):
        return []
    rows = [f"| {m} | {' / '.join(f'{v:.1f}' for v in s['main_points'])} | {s['sd_points']:.1f} |"
            for m, s in c["seeds"].items()]
    seeds = ", ".join(str(x) for x in next(iter(c["seeds"].values()))["seeds"])
    return [f"Each method trained with seeds {seeds}, each scored as trained (QLoRA: its adapter on the NF4 base). "
            "The paired intervals above are t intervals over the test items and each method's seeds "
            "(Satterthwaite's degrees of freedom), so the spread between runs is in them and the verdict is about "
            "the methods, not these trained models:", "",
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
    if blind(c):  # a metric on which every model sits at 0 or 100 confirms no claim
        lora_vs_full = qlora_vs_lora = None
    if lora_vs_full:
        if c["task_type"] == "knowledge":
            judged("LoRA 4-7 points behind full fine-tuning on knowledge tasks", lora_vs_full, -7, -4)
        else:
            judged(f"LoRA within 1-3 points of full fine-tuning ({c['task_type']} task; taken as: at most 3 behind)",
                   lora_vs_full, -3, float("inf"))
    if qlora_vs_lora:
        judged("QLoRA within 0.5-1.5 points of LoRA (taken as: at most 1.5 behind)", qlora_vs_lora, -1.5,
               float("inf"))
    for claim, p in general.claims(c.get("general")):
        judged(claim, p, -3, 3)
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


# what each record under runs/<task>/<model>/ says the stage that wrote it did
RECORD_STAGES = {"train.json": "train", "merge.json": "merge", "merge-nf4.json": "merge (NF4)",
                 "eval.json": "evaluate"}


def stage_seconds(runs: Path, quantization: dict | None = None) -> dict[str, float]:
    """Each upstream stage's whole wall time, start-up and imports included (timing.stage_seconds in the
    record it wrote), slowest first. A seed's stage trains and scores in one process: its eval.json has
    both. prepare, import_base and this stage itself write no such record."""
    found = {}
    if quantization and (quantization.get("timing") or {}).get("stage_seconds") is not None:
        found["quantize"] = quantization["timing"]["stage_seconds"]
    for path in sorted(runs.glob("*/*/*.json")) + sorted(runs.glob("*/*/seeds/*/eval.json")):
        seed = path.parent.name if path.parent.parent.name == "seeds" else None
        if path.name not in RECORD_STAGES:
            continue
        task, model = (path.parents[3], path.parents[2]) if seed else (path.parents[1], path.parent)
        seconds = (json.loads(path.read_text()).get("timing") or {}).get("stage_seconds")
        if seconds is not None:
            kind = f"seed {seed} (train + evaluate)" if seed else RECORD_STAGES[path.name]
            found[f"{task.name}/{model.name} {kind}"] = seconds
    return dict(sorted(found.items(), key=lambda kv: -kv[1]))


def _stage_table(seconds: dict[str, float]) -> list[str]:
    if not seconds:
        return []
    total = sum(seconds.values())
    return ["## Where the time went", "",
            f"{len(seconds)} stages, {total:.0f} s in all: each one's wall time from its process's start (Python "
            "and imports included) to its record; `dvc repro`'s own time, prepare, import_base, report and "
            "register not included. `tuneoff run` prints every stage it ran the same way.", "",
            "| stage | seconds | share |", "|---|---:|---:|",
            *(f"| {name} | {s:.1f} | {100 * s / total:.1f}% |" for name, s in seconds.items()), ""]


def markdown(comparisons: list[dict], decisions: dict | None = None, quantization: dict | None = None,
             stages: dict[str, float] | None = None) -> str:
    lines = ["# tuneoff bake-off report", ""]
    for c in comparisons:
        cond = c["conditions"]
        device = next((r["train"]["device"] for r in c["rows"] if r["train"]), "?")
        measure = next((r["train"]["memory_measure"] for r in c["rows"] if r["train"]), "?")
        lines += [f"## {c['task']}", "",
                  f"| method | {_metric_head(c)} [95% CI] | - full, paired (points) | test loss | peak mem GiB "
                  f"| train s | GPU-h | USD | trainable % | artifact MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(_fmt_row(r, c)) + " |" for r in c["rows"]]
        if cond["token_budget"] is None:  # every method failed: its row says why
            lines += ["", "No method finished training: nothing to compare.", ""]
            if decisions and c["task"] in decisions:
                lines += [decisions[c["task"]]["rationale"], ""]
            continue
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
        lines += [f"Main metric: {c['main_metric']}, {SCALE.get(c['main_metric'], 'points')}.", "", *_free_form_table(c)]
        lines += [f"Paired on the same test items (a - b; interval: {_interval_name(c)}, docs/statistics.md; a BCa paired bootstrap "
                  "for the per-example loss of the reference answer, where lower is better). Every number here is on "
                  "the test split; the QLoRA form that ships is chosen on the validation split.", "", *_pairs_table(c["pairs"], c["main_metric"]), "",
                  *(_seeds_note(c) or [f"Each method trained once (seed {cond['seed']}): the intervals are about these "
                                       "trained models, not about the methods; `bakeoff.more_seeds` trains more.", ""])]
        if c["form_pairs"]:
            lines += ["QLoRA in its other deployable forms, against the one deployed (same items):", "",
                      *_pairs_table(c["form_pairs"], c["main_metric"]), ""]
        lines += _rates_table(c)
        lines += _fields_table(c)
        lines += _replies(c)
        lines += general.table(c.get("general"))
        checked = claims(c)
        if checked:
            lines += ["The seed article's claims, as this run can test them:", "", "| claim | this run | evidence |",
                      "|---|---|---|", *(f"| {x['claim']} | {x['status']} | {x['evidence']} |" for x in checked), ""]
        lines += [f"![{c['task']}]({c['task']}.png)", ""]
    lines += _predictions_table(comparisons)
    lines += _stage_table(stages or {})
    return "\n".join(lines)


def _loss_log(runs: Path, task: str, method: str) -> list[dict]:
    with open(runs / task / method / "loss.csv") as f:
        return list(csv.DictReader(f))


COST_COLUMNS = ["peak_memory_gib", "train_seconds", "gpu_hours", "cost_usd", "trainable_percent", "artifact_mib"]
COLUMNS = (["task", "method", "main_metric", "main", "ci_low", "ci_high", "gap_to_full_points", "test_loss"]
           + COST_COLUMNS + ["recommended"])


REPLY_COLUMNS = ["task", "item", "prompt", "references", "model", "reply", "score"]


def reply_rows(comparisons: list[dict]) -> list[list]:
    """The sampled replies (replies_sample), one row per item and model, for a W&B Table."""
    return [[c["task"], s["item"], s["prompt"], "\n".join(s["references"]), m, r["reply"], r["score"]]
            for c in comparisons for s in c.get("samples", []) for m, r in s["replies"].items()]


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

