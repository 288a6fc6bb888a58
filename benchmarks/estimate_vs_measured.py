"""The estimator against measurement on this CPU: SmolLM2-135M, each method in a fresh process running
tuneoff's training loop (tuneoff.training.loop.train) for a few steps at the project's batch, row length, rank
and target modules, on a project's prepared data.

    .venv/bin/python benchmarks/estimate_vs_measured.py --project PROJECT [--steps 2]

`--project` is a project that has run the pipeline (models/base, models/base-nf4,
data/prepared/<task>, runs/); the params come from this project's params.yaml. Per method:

  tensors   torch's profiler replays every CPU allocation (measure.TensorPeak), plus the model's own
            tensors: the peak bytes held in tensors, what torch.cuda.max_memory_allocated reports on
            a GPU. Compared with the estimate's peak_tensor_bytes.
  rss       the peak resident set as the train stage measures it (VmHWM reset after the model is
            built), with MALLOC_MMAP_THRESHOLD_=131072 so that glibc returns freed blocks of 128 KiB
            and more to the system instead of keeping them (docs/estimator.md). Compared with the
            estimate's peak_bytes (tensors + estimate.overhead_gib.cpu).
  stage     the train stage's own runs in <project>/runs/*/*/train.json (default glibc, every step),
            against the estimate for each, and each run's train time predicted from the FLOP/s its
            method reached on the other tasks (leave-one-out, as the report does).

Two steps reach the steady-state peak (the optimizer states exist from the first step on). Also
measures this CPU's GEMM rate (estimate.devices.cpu) and the process's resident set before the model
loads (estimate.overhead_gib.cpu). Writes benchmarks/results/estimate_vs_measured.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import timing  # noqa: E402

from tuneoff.core.methods import METHODS  # noqa: E402

GIB = 2**30


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def worker(method: str, mode: str, project: Path, task: str, steps: int) -> dict:
    """One method, one measurement, in this (fresh) process; imports what the train stage imports."""
    import torch

    import stages.train  # noqa: F401  (the stage's imports: torch, transformers, peft, wandb's seam)
    from tuneoff.core import measure
    from tuneoff.core.params import CommonTrainParams, read_params, section
    from tuneoff.data.rows import load_rows
    from tuneoff.modeling import methods
    from tuneoff.training.loop import plan_steps, train

    data = read_params(ROOT / "params.yaml")
    common = section(CommonTrainParams, "train", "common", data=data)
    params = section(methods.PARAMS_BY_METHOD[method], "train", method, data=data)
    rows = load_rows(project / "data/prepared" / task / "train.safetensors")
    val = {k: v[: common.batch_size] for k, v in load_rows(project / "data/prepared" / task / "val.safetensors").items()}
    plan = plan_steps(rows["real_tokens"], common.batch_size, common.token_budget, common.seed)[:steps]
    budget = int(sum(int(rows["real_tokens"][idx].sum()) for idx in plan))  # train() then plans exactly these steps
    common = common.model_copy(update={"token_budget": budget, "eval_every": 0})
    dev = torch.device("cpu")
    precision = measure.resolve_precision(common.precision, dev)
    torch.manual_seed(common.seed)
    rss_before_model = status_bytes("VmRSS")
    model = methods.build(method, params, project / METHODS[method].base, precision, dev, common.gradient_checkpointing)
    out = {"method": method, "mode": mode, "steps": steps, "rss_before_model_bytes": rss_before_model,
           "model_bytes": measure.model_bytes(model), "params": dict(zip(("trainable", "total"),
                                                                         methods.trainable_and_total(model)))}
    with tempfile.TemporaryDirectory() as logs:
        Path("/proc/self/clear_refs").write_text("5")
        if mode == "tensors":
            with measure.TensorPeak() as peak:
                train(model, rows, val, common, params.rates[0], dev, precision, Path(logs), method)
            out["peak_bytes"] = peak.peak_bytes + out["model_bytes"]
        else:
            result = train(model, rows, val, common, params.rates[0], dev, precision, Path(logs), method)
            out["peak_bytes"] = status_bytes("VmHWM")
            out["tokens_per_second"] = result.real_tokens / result.train_seconds
            out["train_seconds"] = result.train_seconds
    return out


def predict(project: Path, task: str, method: str, steps: int | None) -> tuple[dict, dict]:
    """The train stage's estimate for `method` on `task`'s rows, over the first `steps` planned steps."""
    from tuneoff.core.params import (
        CommonTrainParams,
        CostParams,
        EstimateParams,
        read_params,
        section,
    )
    from tuneoff.data.rows import load_rows
    from tuneoff.estimator import train_stage
    from tuneoff.modeling import methods
    from tuneoff.training.loop import plan_steps

    data = read_params(ROOT / "params.yaml")
    common = section(CommonTrainParams, "train", "common", data=data)
    rows = load_rows(project / "data/prepared" / task / "train.safetensors")
    if steps is not None:
        plan = plan_steps(rows["real_tokens"], common.batch_size, common.token_budget, common.seed)[:steps]
        common = common.model_copy(update={"token_budget": int(sum(int(rows["real_tokens"][i].sum()) for i in plan))})
    return train_stage.for_train_stage(method, section(methods.PARAMS_BY_METHOD[method], "train", method, data=data),
                                       common, "fp32", "cpu", "cpu", project / METHODS[method].base, rows,
                                       section(EstimateParams, "estimate", data=data),
                                       section(CostParams, "cost", data=data).price_per_hour)


def stage_runs(project: Path) -> list[dict]:
    """The train stage's own runs in <project>/runs (every step, default glibc) against their estimate,
    and each run's time predicted leave-one-out from the FLOP/s its method reached on the other tasks."""
    runs = []
    for path in sorted(project.glob("runs/*/*/train.json")):
        stage = json.loads(path.read_text())
        if stage["method"] not in METHODS:
            continue
        estimate, _ = predict(project, stage["task"], stage["method"], None)
        runs.append({"task": stage["task"], "method": stage["method"], "steps": stage["tokens"]["steps"],
                     "peak_bytes": stage["memory"]["peak_memory_bytes"], "predicted_bytes": estimate["peak_memory_bytes"],
                     "error_percent": error(estimate["peak_memory_bytes"], stage["memory"]["peak_memory_bytes"]),
                     "train_seconds": stage["timing"]["train_seconds"], "train_flops": estimate["train_flops"]})
    for r in runs:
        others = [o["train_flops"] / o["train_seconds"] for o in runs if o["method"] == r["method"] and o["task"] != r["task"]]
        r["achieved_tflops"] = round(r["train_flops"] / r["train_seconds"] / 1e12, 4)
        r["seconds_calibrated"] = r["train_flops"] / (sum(others) / len(others)) if others else None
        r["seconds_error_percent"] = error(r["seconds_calibrated"], r["train_seconds"]) if others else None
    return runs


def error(predicted: float, measured: float) -> float:
    return round(100 * (predicted / measured - 1), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--task", default="extraction")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    project = args.project.resolve()
    if args.worker:
        print(json.dumps(worker(*args.worker, project, args.task, args.steps)))
        return
    import torch

    from tuneoff.core import measure

    # bf16 only where the CPU has bf16 instructions: elsewhere it times a slow fallback for minutes
    cpu = torch.device("cpu")
    bf16 = round(timing.matmul_flops(2048, torch.bfloat16, cpu) / 1e12, 4) if measure.cpu_has_bf16() else None
    results = {"project": str(project), "task": args.task, "steps": args.steps, "torch": torch.__version__,
               "cpu_gemm_tflops": {"fp32": round(timing.matmul_flops(2048, torch.float32, cpu) / 1e12, 4), "bf16": bf16},
               "methods": {}}
    print(f"CPU GEMM (2048^3, timing.matmul_flops): {results['cpu_gemm_tflops']}", flush=True)
    for method in METHODS:
        row = results["methods"][method] = {}
        estimate, stage_time = predict(project, args.task, method, args.steps)
        row["estimate"] = {"peak_tensor_bytes": estimate["peak_tensor_bytes"], "peak_bytes": estimate["peak_memory_bytes"],
                           "phase": estimate["phase"], "at_peak": estimate["at_peak"], "params": estimate["params"],
                           "train_flops": estimate["train_flops"], "train_seconds": stage_time["train_seconds"]}
        for mode, env in (("tensors", {}), ("rss", {"MALLOC_MMAP_THRESHOLD_": "131072"})):
            cmd = [sys.executable, __file__, "--project", str(project), "--task", args.task, "--steps", str(args.steps),
                   "--worker", method, mode]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, cwd=ROOT)
            if proc.returncode:
                sys.exit(f"{method} {mode} failed:\n{proc.stderr[-3000:]}")
            row[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        row["tensor_error_percent"] = error(estimate["peak_tensor_bytes"], row["tensors"]["peak_bytes"])
        row["rss_error_percent"] = error(estimate["peak_memory_bytes"], row["rss"]["peak_bytes"])
        row["params_exact"] = row["tensors"]["params"] == {k: estimate["params"][k] for k in ("trainable", "total")}
        print(f"{method}: tensors predicted {estimate['peak_tensor_bytes'] / GIB:.3f} GiB, measured "
              f"{row['tensors']['peak_bytes'] / GIB:.3f} ({row['tensor_error_percent']:+.1f}%); RSS predicted "
              f"{estimate['peak_memory_bytes'] / GIB:.3f}, measured {row['rss']['peak_bytes'] / GIB:.3f} "
              f"({row['rss_error_percent']:+.1f}%); params exact: {row['params_exact']}", flush=True)
    results["stage_runs"] = stage_runs(project)
    for r in results["stage_runs"]:
        print(f"stage run {r['task']}/{r['method']} ({r['steps']} steps, default glibc): peak predicted "
              f"{r['predicted_bytes'] / GIB:.2f} GiB, measured {r['peak_bytes'] / GIB:.2f} ({r['error_percent']:+.1f}%); "
              f"train s {r['train_seconds']:.0f}, predicted from the other task's FLOP/s "
              f"{r['seconds_calibrated']:.0f} ({r['seconds_error_percent']:+.1f}%)", flush=True)
    out = ROOT / "benchmarks" / "results" / "estimate_vs_measured.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"-> {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
