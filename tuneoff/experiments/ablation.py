"""Rank x target-module sweeps and the escalation ladder, each configuration a DVC experiment.

The seed article's advice, made into procedures: rank 8 for formatting, 16-32 for most work,
64+ for hard reasoning with diminishing returns; q_proj/v_proj as the baseline, all linear
layers for a little more at 2-3x the cost; "run a LoRA baseline first, measure the gap, and
escalate to full fine-tuning only when the data shows a deficit that rank increases cannot close".

- sweep: successive halving. Every grid point trains on `first_budget_fraction` of the token
  budget; the best `keep_fraction` by val loss go on to the full budget and the full evaluation;
  the rest are pruned. The result marks the point of diminishing returns: the cheapest point
  (fewest trainable parameters) whose main metric is within the 95% CI of the best.
- escalate: the ladder's rungs run in the order given (cheapest first), stopping at the first
  that meets the target, or when the budget is spent, or when the ladder ends.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from tuneoff.core.atomic import atomic_dir, write_json
from tuneoff.core.errors import TuneoffError
from tuneoff.core.methods import method as method_named
from tuneoff.core.params import CostParams, EscalateParams, SweepParams, section
from tuneoff.estimator.estimate import cost
from tuneoff.experiments import runner as experiments
from tuneoff.modeling import methods

PRESETS = {"qv": ["q_proj", "v_proj"], "attention": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def target_modules(spec: str | list[str], base_dir: Path) -> list[str]:
    """A preset name or an explicit list -> module names; all-linear = every Linear but the output layer."""
    if isinstance(spec, list):
        return spec
    if spec == "all-linear":
        return sorted(methods.linear_module_names(base_dir) - {"lm_head"})
    return PRESETS[spec]


def label(spec: str | list[str]) -> str:
    return spec if isinstance(spec, str) else "+".join(spec)


def eval_stage(task: str, method: str) -> str:
    """The dvc.yaml stage that scores `method` on `task` (and so runs everything before it)."""
    return method_named(method).stages(task)[-1]


def adapter_params(method: str, rank: int, modules: list[str], alpha_per_rank: float) -> dict:
    return {f"train.{method}.rank": rank, f"train.{method}.alpha": alpha_per_rank * rank,
            f"train.{method}.target_modules": modules}


def survivors(val_losses: dict[str, float], keep_fraction: float) -> list[str]:
    """The names that go on to the next rung: the best ceil(n x keep_fraction) by val loss (at least one)."""
    keep = max(1, math.ceil(len(val_losses) * keep_fraction - 1e-9))
    return sorted(val_losses, key=lambda name: (val_losses[name], name))[:keep]


def diminishing_returns(rows: list[dict]) -> str | None:
    """The cheapest evaluated point (fewest trainable parameters) whose main metric is within
    the 95% CI of the best point's."""
    done = [r for r in rows if r.get("main") is not None]
    if not done:
        return None
    best = max(done, key=lambda r: (r["main"], -r["trainable"]))
    return min((r for r in done if r["main"] >= best["ci_low"]), key=lambda r: (r["trainable"], r["name"]))["name"]


def _run_result(files: dict, task: str, method: str) -> dict:
    """What one experiment measured: train.json's loss, params and cost, and eval.json if it ran."""
    train = files.get(f"runs/{task}/{method}/train.json")
    if not train:
        return {}
    dollars = cost(train["timing"]["wall_seconds"], train["device"], section(CostParams, "cost").price_per_hour)
    out = {"val_loss": train["loss"]["val"], "trainable": train["params"]["trainable"],
           "peak_memory_bytes": train["memory"]["peak_memory_bytes"], "tokens": train["tokens"]["real"],
           **{k: dollars[k] for k in ("device_hours", "gpu_hours")}, "usd": dollars["usd"] or 0.0,
           "wall_seconds": train["timing"]["wall_seconds"],
           "train_seconds": train["timing"]["train_seconds"]}
    ev = files.get(f"runs/{task}/{method}/eval.json")
    if ev:
        m = ev["metrics"]
        out.update(main=m["main"], ci_low=m["ci_low"], ci_high=m["ci_high"], main_metric=m["main_metric"])
    return out


def sweep(params: SweepParams, token_budget: int, base_dir: Path, out_dir: Path) -> dict:
    """Run the sweep; write out_dir/sweep.json, sweep.md and sweep.png; return the result."""
    task, method, halving = params.task, params.method, params.halving
    prefix = f"sweep-{task}-{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    points = {f"r{rank}-{label(spec)}": (rank, spec, target_modules(spec, base_dir))
              for spec in params.target_sets for rank in params.ranks}
    first_budget = max(1, int(token_budget * halving.first_budget_fraction))
    print(f"sweep: {len(points)} points, rung 1 on {first_budget:,} tokens each", flush=True)
    rung1 = experiments.run([
        experiments.Experiment(f"{prefix}-{name}-rung1", method_named(method).train_stage(task),
                               {**adapter_params(method, rank, modules, params.alpha_per_rank),
                                "train.common.token_budget": first_budget})
        for name, (rank, spec, modules) in points.items()])
    first = {name: _run_result(rung1.get(f"{prefix}-{name}-rung1", {}), task, method) for name in points}
    failed = [name for name, r in first.items() if not r]
    if failed:
        raise TuneoffError(f"sweep: rung 1 failed for {failed}: see the output above")
    keep = survivors({name: r["val_loss"] for name, r in first.items()}, halving.keep_fraction)
    print("sweep: rung 1 val loss " + ", ".join(f"{n} {r['val_loss']:.3f}" for n, r in first.items())
          + f"; on to the full budget: {keep}", flush=True)
    rung2 = experiments.run([
        experiments.Experiment(f"{prefix}-{name}", eval_stage(task, method),
                               {**adapter_params(method, points[name][0], points[name][2], params.alpha_per_rank),
                                "train.common.token_budget": token_budget})
        for name in keep])
    finals = {name: _run_result(rung2.get(f"{prefix}-{name}", {}), task, method) for name in keep}
    rows = []
    for name, (rank, spec, modules) in points.items():
        full = finals.get(name, {})
        rows.append({"name": name, "experiment": f"{prefix}-{name}" if full else None, "rank": rank,
                     "targets": label(spec), "target_modules": modules, "trainable": first[name]["trainable"],
                     "rung1_val_loss": first[name]["val_loss"], "rung1_usd": first[name]["usd"],
                     "rung1_device_hours": first[name]["device_hours"], "rung1_gpu_hours": first[name]["gpu_hours"],
                     # what the full budget would have cost: only the optimizer loop scales with tokens
                     "full_budget_factor": round((first[name]["wall_seconds"] + first[name]["train_seconds"]
                                                  * (token_budget / first_budget - 1)) / first[name]["wall_seconds"], 4),
                     "pruned": name not in keep, **{k: full.get(k) for k in (
                         "main", "ci_low", "ci_high", "val_loss", "peak_memory_bytes", "usd", "device_hours", "gpu_hours")}})
    result = {"task": task, "method": method, "token_budget": token_budget, "first_budget": first_budget,
              "main_metric": next((r["main_metric"] for r in finals.values() if "main_metric" in r), None),
              "rows": rows, "diminishing_returns": diminishing_returns(rows), "savings": _savings(rows)}
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "sweep.json", result)
        (tmp / "sweep.md").write_text(sweep_markdown(result), encoding="utf-8")
        plot_sweep(result, tmp / "sweep.png")
    return result


def _savings(rows: list[dict]) -> dict:
    """Spent (both rungs) vs the full grid (every point once at the full budget). A pruned
    point's full-budget cost is extrapolated from its rung-1 run: load and val time as measured,
    optimizer-loop time scaled by tokens. Where fixed costs dominate (tiny models), halving
    can cost more than the grid, and this says so."""
    out = {}
    for unit in ("device_hours", "gpu_hours", "usd"):
        spent = sum(r[f"rung1_{unit}"] + (r[unit] or 0) for r in rows)
        grid = sum(r[unit] if not r["pruned"] else r[f"rung1_{unit}"] * r["full_budget_factor"] for r in rows)
        out[unit] = {"spent": round(spent, 6), "full_grid": round(grid, 6), "saved": round(grid - spent, 6),
                     "saved_percent": round(100 * (grid - spent) / grid, 1) if grid else 0.0}
    return out


def sweep_markdown(result: dict) -> str:
    metric = result["main_metric"] or "main"
    lines = [f"# Sweep: {result['method']} on {result['task']}", "",
             f"Rung 1: every point on {result['first_budget']:,} tokens; the best by val loss on {result['token_budget']:,}.",
             "", f"| point | rank | targets | trainable | rung-1 val loss | {metric} % [95% CI] | val loss | peak GiB | USD | |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        quality = "pruned" if r["pruned"] else f"{100 * r['main']:.1f} [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"
        mark = "diminishing returns" if r["name"] == result["diminishing_returns"] else ""
        lines.append(f"| {r['name']} | {r['rank']} | {r['targets']} | {r['trainable']:,} | {r['rung1_val_loss']:.3f} | {quality} | "
                     + ("" if r["pruned"] else f"{r['val_loss']:.3f}") + " | "
                     + ("" if r["pruned"] else f"{r['peak_memory_bytes'] / 2**30:.2f}") + " | "
                     + f"{r['rung1_usd'] + (r['usd'] or 0):.4f} | {mark} |")
    s = result["savings"]
    lines += ["", f"Diminishing returns: **{result['diminishing_returns']}**, the point with the fewest trainable "
              "parameters whose score is within the 95% CI of the best.",
              f"Successive halving spent {s['device_hours']['spent']:.4f} device-hours ({s['gpu_hours']['spent']:.4f} GPU-hours, "
              f"${s['usd']['spent']:.4f}) against {s['device_hours']['full_grid']:.4f} for the full grid: "
              f"{s['device_hours']['saved_percent']:.0f}% saved (negative: halving cost more; pruned points' full cost "
              "extrapolated from rung 1: optimizer-loop time scaled by tokens)."]
    return "\n".join(lines) + "\n"


def plot_sweep(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for targets in dict.fromkeys(r["targets"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["targets"] == targets]
        done = [r for r in rows if not r["pruned"]]
        if done:
            left.errorbar([r["rank"] for r in done], [100 * r["main"] for r in done], marker="o", capsize=3, label=targets,
                          yerr=[[100 * (r["main"] - r["ci_low"]) for r in done], [100 * (r["ci_high"] - r["main"]) for r in done]])
        line, = right.plot([r["rank"] for r in rows], [r["rung1_val_loss"] for r in rows], marker="o", label=targets)
        pruned = [r for r in rows if r["pruned"]]
        right.scatter([r["rank"] for r in pruned], [r["rung1_val_loss"] for r in pruned], marker="x", s=80,
                      color=line.get_color(), zorder=3)
    best = next((r for r in result["rows"] if r["name"] == result["diminishing_returns"]), None)
    if best:
        left.scatter([best["rank"]], [100 * best["main"]], marker="*", s=250, color="gold", edgecolor="black", zorder=4,
                     label="diminishing returns")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank")
        ax.legend(fontsize=8)
    left.set_ylabel(f"{result['main_metric'] or 'main metric'} (%) at the full budget")
    left.set_title(f"{result['method']} on {result['task']}")
    right.set_ylabel(f"val loss after {result['first_budget']:,} tokens")
    right.set_title("rung 1 (x = pruned)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def escalation_target(params: EscalateParams, comparison_file: Path = Path("reports/comparison.json")) -> tuple[float, str]:
    """The main metric (0-1) a rung must reach, and how it was set."""
    if params.target_kind == "absolute":
        return params.target_points / 100, f"{params.target_points:g} points (absolute)"
    if not comparison_file.is_file():
        raise TuneoffError(f"params.yaml: escalate.target_kind = 'gap_to_best' needs {comparison_file}: run the bake-off first")
    comparison = next((c for c in json.loads(comparison_file.read_text())["tasks"] if c["task"] == params.task), None)
    scores = [r["main"] for r in (comparison or {}).get("rows", []) if r["main"] is not None]
    if not scores:
        raise TuneoffError(f"{comparison_file}: no scores for task {params.task!r} to set a gap_to_best target")
    best = max(scores)
    return best - params.target_points / 100, f"within {params.target_points:g} points of the bake-off's best ({100 * best:.1f})"


def climb(rungs: list[dict], target: float, budget_usd: float, budget_gpu_hours: float, run_rung) -> dict:
    """Run rungs in order until one meets `target`, the budget is spent, or the ladder ends.
    `run_rung(rung)` returns its result (main, usd, gpu_hours, ...); each result is printed with
    the cost so far."""
    done, spent_usd, spent_gpu_hours = [], 0.0, 0.0
    for i, rung in enumerate(rungs, start=1):
        if (budget_usd and spent_usd >= budget_usd) or (budget_gpu_hours and spent_gpu_hours >= budget_gpu_hours):
            return {"rungs": done, "stopped": "budget exhausted", "winner": None,
                    "reason": f"budget spent (${spent_usd:.4f} of ${budget_usd:g}, {spent_gpu_hours:.4f} of "
                              f"{budget_gpu_hours:g} GPU-hours; 0 = no cap) before rung {i} ({rung['name']})"}
        result = run_rung(rung)
        spent_usd += result["usd"]
        spent_gpu_hours += result["gpu_hours"]
        met = result["main"] is not None and result["main"] >= target
        done.append({**rung, **result, "met_target": met, "spent_usd": round(spent_usd, 6),
                     "spent_gpu_hours": round(spent_gpu_hours, 6)})
        main = "failed" if result["main"] is None else f"{100 * result['main']:.1f}"
        print(f"escalate: rung {i} {rung['name']}: {main} (target {100 * target:.1f}); spent so far ${spent_usd:.4f}, "
              f"{spent_gpu_hours:.4f} GPU-hours", flush=True)
        if met:
            return {"rungs": done, "stopped": "target met", "winner": rung["name"],
                    "reason": f"{rung['name']} reached {main} >= {100 * target:.1f}; costlier rungs not tried"}
    best = max((r for r in done if r["main"] is not None), key=lambda r: r["main"], default=None)
    return {"rungs": done, "stopped": "never reached", "winner": None,
            "reason": f"no rung reached {100 * target:.1f}; the best was "
                      + (f"{best['name']} ({100 * best['main']:.1f})" if best else "none")}


def escalate(params: EscalateParams, base_dir: Path, out_dir: Path) -> dict:
    """Climb the ladder as DVC experiments; write out_dir/ladder.json and ladder.md."""
    target, target_text = escalation_target(params)
    prefix = f"ladder-{params.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    rungs = []
    for i, rung in enumerate(params.ladder, start=1):
        adapter = method_named(rung.method).adapter
        name = f"{rung.method}-r{rung.rank}-{label(rung.targets)}" if adapter else rung.method
        sets = adapter_params(rung.method, rung.rank, target_modules(rung.targets, base_dir),
                              params.alpha_per_rank) if adapter else {}
        rungs.append({"name": name, "method": rung.method, "experiment": f"{prefix}-{i}-{name}", "params": sets})

    def run_rung(rung: dict) -> dict:
        exp = experiments.Experiment(rung["experiment"], eval_stage(params.task, rung["method"]), rung["params"])
        files = experiments.run([exp]).get(exp.name, {})
        r = _run_result(files, params.task, rung["method"])
        return {"main": r.get("main"), "ci_low": r.get("ci_low"), "ci_high": r.get("ci_high"), "usd": r.get("usd", 0.0),
                "gpu_hours": r.get("gpu_hours", 0.0), "device_hours": r.get("device_hours", 0.0),
                "peak_memory_bytes": r.get("peak_memory_bytes")}

    print(f"escalate: {params.task}, target {100 * target:.1f} ({target_text}), {len(rungs)} rungs", flush=True)
    result = {"task": params.task, "target": target, "target_text": target_text,
              **climb(rungs, target, params.budget_usd, params.budget_gpu_hours, run_rung)}
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "ladder.json", result)
        (tmp / "ladder.md").write_text(ladder_markdown(result), encoding="utf-8")
    return result


def ladder_markdown(result: dict) -> str:
    lines = [f"# Escalation ladder: {result['task']}", "", f"Target: {100 * result['target']:.1f} ({result['target_text']}).", "",
             "| rung | method | main % [95% CI] | met | USD | spent so far | experiment |", "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(result["rungs"], start=1):
        main = "failed" if r["main"] is None else f"{100 * r['main']:.1f} [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"
        lines.append(f"| {i} {r['name']} | {r['method']} | {main} | {'yes' if r['met_target'] else 'no'} | "
                     f"{r['usd']:.4f} | {r['spent_usd']:.4f} | {r['experiment']} |")
    lines += ["", f"Stopped: **{result['stopped']}**: {result['reason']}."]
    return "\n".join(lines) + "\n"
