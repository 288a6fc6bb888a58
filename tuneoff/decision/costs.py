"""What each run cost and what the estimator predicted for it, from what its train.json measured:
dollars at params.yaml's prices and predictions computed here, where they are reported, so a price
edit retrains nothing."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from tuneoff.core.methods import METHODS
from tuneoff.core.params import CostParams, EstimateParams, section
from tuneoff.core.records import Comparison, RunCosts, TaskComparison, TrainRecord, read
from tuneoff.estimator.estimate import cost, for_record


def run_costs(train: TrainRecord, estimate_params: EstimateParams, prices: dict[str, float]) -> RunCosts:
    """A trained method's row in the report: what it measured, priced, and the estimator's prediction."""
    dollars = cost(train.timing.wall_seconds, train.device, prices)  # a rented device bills the whole stage
    pilots = train.tuning.seconds if train.tuning else 0.0  # the learning-rate pilots, inside the stage's wall time
    final = cost(train.timing.wall_seconds - pilots, train.device, prices)
    predicted, timing = for_record(train, estimate_params, prices)
    return {
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
        "tuning": train.tuning and {**train.tuning.model_dump(),
                                    "usd": None if dollars["usd"] is None else dollars["usd"] - final["usd"]},
        "cost_usd_final": final["usd"],
    }


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


def results(runs: Path = Path("runs"), comparison_file: Path = Path("reports/comparison.json"),
            quantize_file: Path = Path("models/quantize.json")) -> dict:
    """Each (task, method)'s run from runs/<task>/<method>/train.json, in dollars at params.yaml's
    prices, with its score and 95% interval and each task's verdict from the report, if it ran. The
    val loss before training is the base's (float, or NF4 for a method trained on it), as the
    quantize stage measured it on the same val rows."""
    prices = section(CostParams, "cost").price_per_hour
    report = read(Comparison, comparison_file) if comparison_file.is_file() else {"tasks": [], "decisions": {}}
    base_val = json.loads(quantize_file.read_text())["error"] if quantize_file.is_file() else {}
    scores = {(c["task"], r["method"]): r for c in report["tasks"] for r in c["rows"]}
    rows = []
    for path in sorted(runs.glob("*/*/train.json")):
        m = read(TrainRecord, path)
        score = scores.get((m.task, m.method), {})
        rows.append({"task": m.task, "method": m.method, "device": m.device, "precision": m.precision,
                     "trainable_percent": m.params.trainable_percent, "peak_memory_bytes": m.memory.peak_memory_bytes,
                     "memory_measure": m.memory.measure, "train_seconds": m.timing.train_seconds,
                     "tokens_per_second": m.timing.tokens_per_second,
                     "val_loss_before": base_val.get(m.task, {}).get(
                         "val_loss_quantized" if m.method in METHODS and METHODS[m.method].quantized else "val_loss_float"),
                     "val_loss": m.loss.val, "weights_bytes": m.output.weights_bytes,
                     "usd": cost(m.timing.wall_seconds, m.device, prices)["usd"],
                     "main": score.get("main"), "ci": [score.get("ci_low"), score.get("ci_high")]})
    verdicts = {task: {k: d.get(k) for k in ("verdict", "method", "rationale")} for task, d in report["decisions"].items()}
    return {"runs": rows, "verdicts": verdicts}


def results_table(runs: Path = Path("runs"), comparison_file: Path = Path("reports/comparison.json")) -> str:
    """`results` as a table a person reads: one line per (task, method), then each task's verdict."""
    found = results(runs, comparison_file)
    if not found["runs"]:
        return f"no results under {runs}/ yet: run `dvc repro` (or `make run`)"
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}"  # noqa: E731
    rows = [[r["task"], r["method"], r["device"], r["precision"], f"{r['trainable_percent']:.2f}%",
             f"{r['peak_memory_bytes'] / 2**30:.2f}", f"{r['train_seconds']:.0f}", f"{r['tokens_per_second']:.0f}",
             ("" if r["val_loss_before"] is None else f"{r['val_loss_before']:.3f} -> ") + f"{r['val_loss']:.3f}",
             f"{r['weights_bytes'] / 2**20:.1f}",
             "n/a" if r["usd"] is None else f"{r['usd']:.4f}",
             "n/a" if r["main"] is None else f"{pct(r['main'])} [{pct(r['ci'][0])}, {pct(r['ci'][1])}]"]
            for r in found["runs"]]
    header = ["task", "method", "device", "prec", "trainable", "peak GiB", "train s", "tok/s",
              "val loss", "weights MiB", "USD", "score % [95% CI]"]
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    verdicts = [f"verdict {task}: {v['verdict']}" + (f" ({v['method']})" if v["method"] else "")
                + f": {(v['rationale'] or '').split('. ')[0][:200]}" for task, v in found["verdicts"].items()]
    measures = sorted({r["memory_measure"] for r in found["runs"]})
    return "\n".join([fmt(header), *map(fmt, rows), *verdicts,
                      f"(peak memory: {', '.join(measures)}; details in {runs}/<task>/<method>/train.json)"])
