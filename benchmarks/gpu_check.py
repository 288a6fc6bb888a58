"""The GPU acceptance check: what someone with one GPU runs, offline, in a few minutes, to see the
loop's options against the estimator on a real architecture's shape, and the bake-off on CUDA.

    python benchmarks/gpu_check.py                                   # Llama 3 8B's shape, every case below
    python benchmarks/gpu_check.py --project ~/tuneoff-smollm2       # and `dvc repro` there, end to end
    python benchmarks/gpu_check.py --device cpu --model smollm2-135m --seq-len 64 --batch-size 1 --steps 2 \\
        --cases full:fp32:adamw-8bit:gc,lora:fp32:adamw          # the same path on a CPU (tests/test_memory.py)

1. Packages: torch with a CUDA device, bitsandbytes with its CUDA kernels, peft, transformers, dvc;
   what is missing is named in one line, before anything runs.
2. Each case (method, precision, optimizer, gradient checkpointing) runs in a fresh process
   (benchmarks/gpu_memory.py's worker): the model built from the architecture's config with random
   weights as tuneoff's methods.build would hold it (QLoRA: NF4 + double quantization), then `--steps`
   steps of the loop's step (loss.batch_loss, clipping, the loop's make_optimizer) on synthetic packed
   rows. Measured: peak allocated memory (against the estimator's peak_tensor_bytes), tokens/s over
   the steps after the first, and MFU (model FLOPs per token, tuneoff/estimator/throughput.py, times
   tokens/s over the GPU's bf16 peak in params.yaml estimate.devices). A case the estimator says does
   not fit the device is recorded as skipped with its prediction, not run.
3. With `--project`: `dvc repro` in that project (a tuneoff checkout whose models/base already holds
   SmolLM2-135M-Instruct, e.g. after one `make run`), timed, and each task's verdict.

Writes benchmarks/results/gpu_check.json (or --out); exits 1 when a case that ran failed or missed
the estimate by more than --tolerance percent.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
GIB = 2**30

# what the article's 8B cases need: full fine-tuning as tuneoff trains it by default (float32 master
# weights) does not fit one 80-141 GB GPU; bf16-pure with 8-bit AdamW and checkpointing does
CASES = ("full:bf16:adamw", "full:bf16-pure:adamw:gc", "full:bf16-pure:adamw-8bit:gc",
         "full:bf16-pure:paged-adamw-8bit:gc", "lora:bf16:adamw", "lora:bf16-pure:adamw", "qlora:bf16:adamw",
         "qlora:bf16:paged-adamw-8bit")


def check_packages(device: str) -> None:
    """One line naming what this machine lacks for the check, before any case runs."""
    missing = [name for name in ("torch", "transformers", "peft", "bitsandbytes", "dvc")
               if importlib.util.find_spec(name) is None]
    if missing:
        sys.exit(f"gpu_check: missing {', '.join(missing)}: install the project with its GPU extras "
                 "(README, GPU install); offline, carry the wheels")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device: install a CUDA build of torch "
                     "(README, GPU install) or run with --device cpu")
        try:
            import bitsandbytes.functional as F

            F.quantize_4bit(torch.ones(64, device=device), quant_type="nf4")
        except Exception as e:  # noqa: BLE001 - any failure here means QLoRA cannot run
            sys.exit(f"gpu_check: bitsandbytes cannot quantize on {device}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def parse_case(text: str) -> dict:
    method, precision, optimizer, *rest = text.split(":")
    if rest not in ([], ["gc"]):
        sys.exit(f"gpu_check: case {text!r}: method:precision:optimizer[:gc]")
    return {"name": text, "method": method, "precision": precision, "optimizer": optimizer,
            "gradient_checkpointing": rest == ["gc"]}


def run_case(args, case: dict, estimate_params, capacity: int) -> dict:
    import gpu_memory

    shape = argparse.Namespace(**{**vars(args), "gradient_checkpointing": case["gradient_checkpointing"]})
    positions = args.batch_size * args.seq_len  # at most every position: the prediction that decides whether to run
    _, est = gpu_memory.predict(shape, case["method"], case["optimizer"], positions, case["precision"])
    overhead = estimate_params.overhead_gib.cuda * GIB if capacity else 0
    if capacity and est.peak_tensor_bytes + overhead > capacity:
        return {**case, "skipped": f"predicted {est.peak_tensor_bytes / GIB:.1f} GiB + {overhead / GIB:.1f} overhead "
                                   f"> the device's {capacity / GIB:.1f} GiB"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_memory.py"), "--model", args.model, "--device", args.device,
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
           "--rank", str(args.rank), "--target-modules", args.target_modules, "--supervised", str(args.supervised),
           "--method", case["method"], "--optimizer", case["optimizer"], "--precision", case["precision"]]
    cmd += ["--gradient-checkpointing"] if case["gradient_checkpointing"] else []
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=os.environ)
    if proc.returncode:
        return {**case, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    setup, est = gpu_memory.predict(shape, case["method"], case["optimizer"], measured["supervised_positions"],
                                    case["precision"])
    check = gpu_memory.throughput_check(shape, setup, measured, estimate_params, case["precision"])
    return {**case, "seconds": round(time.perf_counter() - start, 1),
            "predicted_gib": round(est.peak_tensor_bytes / GIB, 3), "measured_gib": round(measured["peak_tensor_bytes"] / GIB, 3),
            "error_percent": round(100 * (est.peak_tensor_bytes / measured["peak_tensor_bytes"] - 1), 2),
            "tokens_per_second": measured["tokens_per_second"] and round(measured["tokens_per_second"], 1),
            "mfu": check and round(check["utilisation_measured"], 4), "measured": measured}


def bakeoff(project: Path) -> dict:
    """`dvc repro` in a prepared project, timed, and each task's verdict from its report."""
    if not (project / "models" / "base" / "config.json").is_file():
        sys.exit(f"gpu_check: {project}/models/base/config.json not found: run `make run` there once (it imports the "
                 "base offline), then this check")
    start = time.perf_counter()
    proc = subprocess.run(["dvc", "repro"], cwd=project, capture_output=True, text=True,
                          env=os.environ | {"HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"})
    seconds = time.perf_counter() - start
    if proc.returncode:
        return {"seconds": round(seconds, 1), "error": (proc.stderr or proc.stdout).strip().splitlines()[-1]}
    decisions = json.loads((project / "reports" / "comparison.json").read_text())["decisions"]
    return {"seconds": round(seconds, 1), "verdicts": {t: d["method"] or d["verdict"] for t, d in decisions.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-3-8b", help="a catalog name (tuneoff/estimator/architectures.py)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cases", default=",".join(CASES), help="method:precision:optimizer[:gc], comma-separated")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--target-modules", default="q_proj,v_proj")
    parser.add_argument("--supervised", type=float, default=0.3, help="share of each example the loss is on")
    parser.add_argument("--tolerance", type=float, default=10.0, help="allowed |estimate error|, percent")
    parser.add_argument("--project", type=Path, help="also run the bake-off there (dvc repro)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check.json")
    args = parser.parse_args()
    check_packages(args.device)
    from tuneoff.core.params import EstimateParams, section

    cases = [parse_case(c) for c in args.cases.split(",")]
    estimate_params = section(EstimateParams, "estimate", path=ROOT / "params.yaml")
    # the device's memory, asked in a child process so that this one holds no CUDA context
    capacity = int(subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.mem_get_info()[1])"],
                                  capture_output=True, text=True, check=True).stdout) if args.device.startswith("cuda") else 0
    results = {"model": args.model, "device": args.device, "batch_size": args.batch_size, "seq_len": args.seq_len,
               "steps": args.steps, "capacity_bytes": capacity, "cases": []}
    for i, case in enumerate(cases, 1):
        result = run_case(args, case, estimate_params, capacity)
        results["cases"].append(result)
        if "skipped" in result or "error" in result:
            print(f"[{i}/{len(cases)}] {case['name']}: {result.get('skipped') or 'failed: ' + result['error']}", flush=True)
        else:
            print(f"[{i}/{len(cases)}] {case['name']}: predicted {result['predicted_gib']:.2f} GiB, measured "
                  f"{result['measured_gib']:.2f} ({result['error_percent']:+.1f}%); "
                  f"{result['tokens_per_second'] or 0:.0f} tokens/s" + (f", MFU {result['mfu']:.2f}" if result["mfu"] else "")
                  + f" ({result['seconds']:.0f} s)", flush=True)
    if args.project:
        results["bakeoff"] = bakeoff(args.project)
        print(f"bake-off in {args.project}: {results['bakeoff']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"-> {args.out}")
    bad = [c["name"] for c in results["cases"] if "error" in c or abs(c.get("error_percent", 0)) > args.tolerance]
    if bad or "error" in results.get("bakeoff", {}):
        sys.exit(f"gpu_check: failed or off the estimate by more than {args.tolerance}%: {', '.join(bad) or 'the bake-off'}")


if __name__ == "__main__":
    main()
