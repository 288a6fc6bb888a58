"""The comparison: one row per method per task, from the run's own metrics files, as JSON,
Markdown and charts."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from tuneoff.errors import TuneoffError
from tuneoff.scoring import MAIN_METRIC


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise TuneoffError(f"{path} not found: run the stages before report")
    return json.loads(path.read_text())


def compare_task(task: str, methods: list[str], runs: Path = Path("runs"),
                 prepared: Path = Path("data/prepared")) -> dict:
    """Rows for the untuned base and each method, and the conditions that make them comparable."""
    meta = read_json(prepared / task / "meta.json")
    rows, trains = [], {}
    for method in ["base", *methods]:
        failed = runs / task / method / "failed.json"
        if failed.is_file():  # the flow gave up on this method; it stays a row
            rows.append({"method": method, "failed": read_json(failed)["error"].strip().splitlines()[-1][:300],
                         "main": None, "ci_low": None, "ci_high": None, "test_loss": None, "metrics": {},
                         "adapter_check": None, "train": None})
            continue
        ev = read_json(runs / task / method / "eval.json")
        train = None
        if method != "base":
            train = trains[method] = read_json(runs / task / method / "train.json")
        rows.append({"method": method, **_quality(ev), "train": train and {
            "peak_memory_bytes": train["memory"]["peak_memory_bytes"],
            "memory_measure": train["memory"]["measure"],
            "train_seconds": train["timing"]["train_seconds"],
            "gpu_hours": train["cost"]["gpu_hours"],
            "device_hours": train["cost"]["device_hours"],
            "cost_usd": train["cost"]["usd"],
            "trainable_percent": train["params"]["trainable_percent"],
            "artifact_bytes": train["output"]["weights_bytes"],
            "artifact_kind": train["output"]["kind"],
            "device": train["device"],
            "precision": train["precision"],
            "estimate": _estimate(train),
        }})
    full = next((r for r in rows if r["method"] == "full" and r["main"] is not None), None)
    for r in rows:
        r["gap_to_full_points"] = None if full is None or r["main"] is None else round(100 * (full["main"] - r["main"]), 2)
    first = next(iter(trains.values()), None)
    return {
        "task": task,
        "scorer": meta["scorer"],
        "main_metric": MAIN_METRIC[meta["scorer"]],
        "rows": rows,
        "conditions": {
            "test_examples": meta["examples"]["test"], "train_examples": meta["examples"]["train"],
            "token_budget": first and first["tokens"]["budget"], "seed": first and first["seed"],
            "real_tokens": {m: t["tokens"]["real"] for m, t in trains.items()},
            "same_tokens": len({t["tokens"]["real"] for t in trains.values()}) <= 1,
        },
    }


def _estimate(train: dict) -> dict | None:
    """What tuneoff/memory.py and throughput.py predicted for this run (train.json "estimate"), if it has it."""
    est, timing = train.get("estimate"), train.get("estimate_timing") or {}
    return est and {"peak_memory_bytes": est["peak_memory_bytes"], "phase": est["phase"], "train_flops": est["train_flops"],
                    "train_seconds": timing.get("train_seconds"), "utilisation": timing.get("utilisation")}


def predictions(comparisons: list[dict]) -> list[dict]:
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


def _quality(ev: dict) -> dict:
    m = ev["metrics"]
    return {"main": m["main"], "ci_low": m["ci_low"], "ci_high": m["ci_high"], "test_loss": ev["test_loss"],
            "metrics": {k: v for k, v in m.items() if k not in ("main", "ci_low", "ci_high", "confusions")},
            "adapter_check": ev.get("adapter_check")}


def _fmt_row(r: dict) -> list[str]:
    if r.get("failed"):
        return [r["method"], f"failed: {r['failed'][:80]}"] + [""] * 8
    t = r["train"]
    gap = "" if r["gap_to_full_points"] is None or r["method"] == "full" else f"{r['gap_to_full_points']:+.1f}"
    cells = [r["method"], f"{100 * r['main']:.1f} [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]", gap,
             f"{r['test_loss']:.3f}"]
    if t is None:
        return cells + ["(untuned)"] + [""] * 5
    usd = "n/a" if t["cost_usd"] is None else f"{t['cost_usd']:.4f}"
    return cells + [f"{t['peak_memory_bytes'] / 2**30:.2f}", f"{t['train_seconds']:.0f}", f"{t['gpu_hours']:.4f}",
                    usd, f"{t['trainable_percent']:.2f}", f"{t['artifact_bytes'] / 2**20:.1f}"]


def _adapter_note(c: dict) -> str:
    checks = [(r["method"], r["adapter_check"]) for r in c["rows"] if r.get("adapter_check")]
    if not checks:
        return ""
    parts = [f"{m} {100 * a['adapter_main']:.1f}% as trained vs {100 * a['merged_main']:.1f}% merged "
             f"({100 * a['same_predictions']:.0f}% identical answers)" for m, a in checks]
    return f" Adapter before merging, on the first {checks[0][1]['examples']} test examples: {'; '.join(parts)}."


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
                  f"| method | {c['main_metric']} % [95% CI] | gap to full (points) | test loss | peak mem GiB "
                  f"| train s | GPU-h | USD | trainable % | artifact MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(_fmt_row(r)) + " |" for r in c["rows"]]
        lines += ["", f"Fair by construction: every method trained on the same {cond['train_examples']} training "
                      f"examples with a budget of {cond['token_budget']:,} real tokens and seed {cond['seed']} "
                      f"(same batches: {'yes' if cond['same_tokens'] else 'NO'}), and was scored on the same "
                      f"{cond['test_examples']} held-out test examples. Device: {device}; peak memory is {measure}. "
                      "Adapters are scored as merged into the full-precision base (what would be deployed)."
                      + _adapter_note(c), ""]
        error = (quantization or {}).get("error", {}).get(c["task"])
        if error:
            lines += [_quantize_note(quantization) + f" Quantizing moved val loss {error['val_loss_float']:.3f} -> "
                      f"{error['val_loss_quantized']:.3f} (mean |logit diff| {error['mean_abs_logit_diff']:.3f}, "
                      f"top-1 agreement {100 * error['top1_agreement']:.1f}%).", ""]
        if decisions and c["task"] in decisions:
            lines += [f"**Recommendation: {decisions[c['task']]['method'] or 'none'}.** {decisions[c['task']]['rationale']}", ""]
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


def plot(comparison: dict, runs: Path, out: Path) -> None:
    """Accuracy vs cost, peak memory by method, and training loss curves, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task, rows = comparison["task"], comparison["rows"]
    trained = [r for r in rows if r["train"]]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    base = next(r for r in rows if r["method"] == "base")
    for r in trained:
        cost = r["train"]["cost_usd"] or 0.0
        ax1.errorbar(cost, 100 * r["main"], yerr=[[100 * (r["main"] - r["ci_low"])], [100 * (r["ci_high"] - r["main"])]],
                     fmt="o", capsize=4, label=r["method"])
        ax1.annotate(r["method"], (cost, 100 * r["main"]), textcoords="offset points", xytext=(6, 4))
    if base["main"] is not None:
        ax1.axhline(100 * base["main"], color="grey", linestyle="--", label="untuned base")
    ax1.set(xlabel="cost (USD)", ylabel=f"{comparison['main_metric']} (%)", title=f"{task}: quality vs cost")
    ax1.legend(fontsize=8)
    ax2.bar([r["method"] for r in trained], [r["train"]["peak_memory_bytes"] / 2**30 for r in trained],
            color=["C0", "C1", "C2", "C3"][: len(trained)])
    ax2.set(ylabel="GiB", title=f"peak memory ({trained[0]['train']['memory_measure'] if trained else ''})")
    for r in trained:
        log = _loss_log(runs, task, r["method"])
        ax3.plot([int(x["tokens"]) for x in log], [float(x["train_loss"]) for x in log], label=r["method"])
    ax3.set(xlabel="real tokens trained", ylabel="train loss", title="training loss")
    ax3.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
