"""The GPU acceptance check: what someone with one GPU runs, offline, in a few minutes, to see the
loop's options against the estimator on a real architecture's shape, and the bake-off on CUDA.

    python benchmarks/gpu_check.py                                   # Llama 3 8B's shape, every case below
    python benchmarks/gpu_check.py --project ~/tuneoff-smollm2       # and `dvc repro` there, end to end
    python benchmarks/gpu_check.py --model llama-3.2-1b --cases full:bf16:adamw,lora:bf16:adamw,qlora:bf16:adamw
    python benchmarks/gpu_check.py --device cpu --model smollm2-135m --seq-len 64 --batch-size 1 --steps 2 \\
        --cases full:fp32:adamw-8bit:gc,lora:fp32:adamw          # the same path on a CPU (tests/test_memory.py)

1. Packages: torch with a CUDA device, bitsandbytes with its CUDA kernels, peft, transformers, dvc;
   what is missing is named in one line, before anything runs.
2. Each case (method, precision, optimizer, gradient checkpointing) runs in a fresh process
   (`--worker`): the model built from the architecture's config with random weights (nothing
   downloaded) as tuneoff's methods.build would hold it (QLoRA: the random weights quantized in place
   to NF4 + double quantization, as the quantize stage does), then `--steps` steps of the loop's step
   (loss.batch_loss, clipping, the loop's make_optimizer) on synthetic packed rows. Measured: peak
   allocated memory (torch.cuda.max_memory_allocated, what the estimator's peak_tensor_bytes predicts;
   also max_memory_reserved and the memory outside torch's allocator, the CUDA context, beside
   estimate.overhead_gib.cuda; on a CPU the peak of bytes held in tensors, measure.TensorPeak, whose
   profiler slows the steps so that tokens/s there is no throughput figure), tokens/s over the steps
   after the first, and MFU (model FLOPs per token, tuneoff/estimator/throughput.py, times tokens/s
   over the GPU's bf16 peak in params.yaml estimate.devices). A case the estimator says does not fit
   the device is recorded as skipped with its prediction, not run.
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
sys.path.insert(0, str(ROOT))
GIB = 2**30

from tuneoff.core.methods import METHODS  # noqa: E402

# what the article's 8B cases need: full fine-tuning as tuneoff trains it by default (float32 master
# weights) does not fit one 80-141 GB GPU; bf16-pure with 8-bit AdamW and checkpointing does
CASES = ("full:bf16:adamw", "full:bf16-pure:adamw:gc", "full:bf16-pure:adamw-8bit:gc",
         "full:bf16-pure:paged-adamw-8bit:gc", "lora:bf16:adamw", "lora:bf16-pure:adamw", "qlora:bf16:adamw",
         "qlora:bf16:paged-adamw-8bit")


def synthetic_rows(rows: int, seq_len: int, vocab: int, seed: int, supervised: float) -> dict:
    """Packed rows like prepare's: examples of 60-400 tokens, position ids restarting at each, the
    loss on the last `supervised` share of each example (the assistant's answer)."""
    import torch

    from tuneoff.data.packing import IGNORE

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq_len), generator=gen)
    pos = torch.zeros(rows, seq_len, dtype=torch.long)
    targets = torch.full((rows, seq_len), IGNORE, dtype=torch.long)
    for r in range(rows):
        start = 0
        while start < seq_len:
            n = min(int(torch.randint(60, 400, (1,), generator=gen)), seq_len - start)
            pos[r, start:start + n] = torch.arange(n)
            answer = start + int(n * (1 - supervised))
            targets[r, answer:start + n - 1] = ids[r, answer + 1:start + n]
            start += n
    return {"input_ids": ids, "position_ids": pos, "targets": targets,
            "real_tokens": torch.full((rows,), seq_len, dtype=torch.long)}


def build(shape_name: str, method: str, rank: int, targets: list[str], dev, precision: str):
    """The model as tuneoff's methods.build makes it, from a config, with random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tuneoff.estimator.architectures import CATALOG

    config = AutoConfig.for_model(**CATALOG[shape_name])
    compute = torch.bfloat16 if precision in ("bf16", "bf16-pure") else torch.float32
    m = METHODS[method]
    with torch.device(dev):  # full: float32 master weights under autocast, bf16 ones with bf16-pure
        model = AutoModelForCausalLM.from_config(config, dtype=compute if m.adapter or precision == "bf16-pure"
                                                 else torch.float32)
    model.config.use_cache = False
    if m.quantized:
        quantize_in_place(model, compute)
    if not m.adapter:
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=targets,
                                            task_type="CAUSAL_LM"), autocast_adapter_dtype=precision != "bf16-pure")


def quantize_in_place(model, compute_dtype) -> None:
    """Every decoder-layer Linear to bitsandbytes NF4 with double quantization, one at a time."""
    import bitsandbytes as bnb
    import torch

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if not isinstance(linear, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True,
                                      device="meta")
                q.weight = bnb.nn.Params4bit(linear.weight.data.to("cpu"), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True).to(linear.weight.device)
                if linear.bias is not None:
                    q.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
                setattr(parent, name, q)
                del linear
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_optimizer(name: str, params):
    """The loop's optimizer (tuneoff/training/loop.py make_optimizer); paged 32-bit AdamW, which the
    estimator models but the loop does not offer, from bitsandbytes directly."""
    from tuneoff.training import loop

    if name != "paged-adamw":
        return loop.make_optimizer(params, 0.0, 1e-5, name)
    import bitsandbytes as bnb

    return bnb.optim.PagedAdamW([{"params": params, "weight_decay": 0.0}], lr=1e-5)


def worker(args, case: dict) -> dict:
    """One case in this process: build, train `steps` steps, measure."""
    import torch

    from tuneoff.core import measure
    from tuneoff.estimator import memory
    from tuneoff.estimator.architectures import resolve
    from tuneoff.modeling.loss import batch_loss

    dev = torch.device(args.device)
    precision = case["precision"]
    targets = list(memory.expand_targets(args.target_modules.split(",")))
    model = build(args.model, case["method"], args.rank, targets, dev, precision)
    if case["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if METHODS[case["method"]].adapter:
            model.enable_input_require_grads()
    rows = synthetic_rows(args.batch_size * args.steps, args.seq_len, resolve(args.model).vocab, 0, args.supervised)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(case["optimizer"], params)
    steps = [torch.arange(i * args.batch_size, (i + 1) * args.batch_size) for i in range(args.steps)]
    positions = max(int((rows["targets"][idx] != -100).sum()) for idx in steps)
    out = {"method": case["method"], "optimizer": case["optimizer"], "model_bytes": measure.model_bytes(model),
           "supervised_positions": positions}
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []

    def run_steps():
        model.train()
        for idx in steps:
            start = time.perf_counter()
            loss, n = batch_loss(model, rows, idx, dev, precision)
            (loss / n).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)

    if dev.type == "cuda":
        run_steps()
        free, total = torch.cuda.mem_get_info()
        out.update(peak_tensor_bytes=torch.cuda.max_memory_allocated(), peak_reserved_bytes=torch.cuda.max_memory_reserved(),
                   outside_allocator_bytes=total - free - torch.cuda.memory_reserved(), device=torch.cuda.get_device_name())
    else:
        with measure.TensorPeak() as peak:
            run_steps()
        out.update(peak_tensor_bytes=peak.peak_bytes + out["model_bytes"], device="cpu")
    tokens = args.batch_size * args.seq_len  # synthetic rows have no padding
    out["tokens_per_second"] = tokens * (len(times) - 1) / sum(times[1:]) if len(times) > 1 else None
    return out


def predict(args, method: str, optimizer: str, positions: int, precision: str, gradient_checkpointing: bool):
    from tuneoff.estimator import memory
    from tuneoff.estimator.architectures import resolve

    lora = METHODS[method].adapter  # full fine-tuning has no LoRA fields
    setup = memory.Setup(method=method, batch_size=args.batch_size, seq_len=args.seq_len, precision=precision,
                         device="cuda" if args.device.startswith("cuda") else "cpu", optimizer=optimizer,
                         gradient_checkpointing=gradient_checkpointing, rank=args.rank if lora else None,
                         target_modules=memory.expand_targets(args.target_modules.split(",")) if lora else None,
                         dropout=0.05 if lora else None,
                         supervised_positions=positions, attention="packed", double_quant=True, gpus=1, sharded=True,
                         accumulates=False)
    return setup, memory.estimate(resolve(args.model), setup, 0)


def throughput_check(args, setup, measured: dict, params, precision: str) -> dict | None:
    """Tokens/s at params.yaml's utilisation prior vs measured, and the utilisation this run reached
    (what estimate.utilisation.cuda.<method> would be calibrated to)."""
    from tuneoff.estimator import throughput
    from tuneoff.estimator.architectures import resolve

    spec = params.devices.get(measured["device"])
    if spec is None or not measured["tokens_per_second"]:
        return None
    peak = 1e12 * (spec.tflops_fp32 if precision == "fp32" else spec.tflops_bf16)
    flops = throughput.flops_per_position(resolve(args.model), setup)
    kind = "cpu" if measured["device"] == "cpu" else "cuda"
    prior = getattr(getattr(params.utilisation, kind), setup.method)
    return {"flops_per_position": flops, "predicted_tokens_per_second": prior * peak / flops, "utilisation_prior": prior,
            "measured_tokens_per_second": measured["tokens_per_second"],
            "utilisation_measured": measured["tokens_per_second"] * flops / peak}


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
    """One case in a fresh process (`--worker`), unless the estimate says it does not fit the device."""
    gc = case["gradient_checkpointing"]
    positions = args.batch_size * args.seq_len  # at most every position: the prediction that decides whether to run
    _, est = predict(args, case["method"], case["optimizer"], positions, case["precision"], gc)
    overhead = estimate_params.overhead_gib.cuda * GIB if capacity else 0
    if capacity and est.peak_tensor_bytes + overhead > capacity:
        return {**case, "skipped": f"predicted {est.peak_tensor_bytes / GIB:.1f} GiB + {overhead / GIB:.1f} overhead "
                                   f"> the device's {capacity / GIB:.1f} GiB"}
    cmd = [sys.executable, __file__, "--model", args.model, "--device", args.device, "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--rank", str(args.rank),
           "--target-modules", args.target_modules, "--supervised", str(args.supervised), "--worker", case["name"]]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=os.environ)
    if proc.returncode:
        return {**case, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    setup, est = predict(args, case["method"], case["optimizer"], measured["supervised_positions"], case["precision"], gc)
    check = throughput_check(args, setup, measured, estimate_params, case["precision"])
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
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one case, inside a fresh subprocess
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args, parse_case(args.worker))))
        return
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
