"""The estimator against a GPU: a real architecture's shape with random weights (nothing downloaded),
a few training steps per method with tuneoff's loss (tuneoff.modeling.loss.batch_loss) on synthetic packed
rows, measured peak memory and tokens/s beside the prediction.

    python benchmarks/gpu_memory.py                       # Llama 3 8B's shape: full, LoRA r16, QLoRA r16
    python benchmarks/gpu_memory.py --model llama-3.2-1b --batch-size 4 --seq-len 2048
    python benchmarks/gpu_memory.py --device cpu --model smollm2-135m --seq-len 128 --steps 3   # the CPU path

Each method runs in a fresh process. Full fine-tuning trains as tuneoff does (float32 master
weights, bf16 autocast, torch AdamW); when the estimator says that does not fit the GPU it falls
back to bitsandbytes' 8-bit AdamW, then to its paged 8-bit AdamW, and says so. QLoRA quantizes the
random bf16 weights to NF4 + double quantization in place (bitsandbytes), as the quantize stage does.

Measured on CUDA: torch.cuda.max_memory_allocated (what the estimate's peak_tensor_bytes predicts),
max_memory_reserved, and the memory outside torch's allocator (the CUDA context: total - free -
reserved, compared with estimate.overhead_gib.cuda). On a CPU: the peak of bytes held in tensors
(measure.TensorPeak; the profiler slows the steps, so the CPU path's tokens/s is not a throughput
figure). Tokens/s counts real tokens over the steps after the first (warm-up).
Writes benchmarks/results/gpu_memory.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GIB = 2**30

from tuneoff.core.methods import METHODS  # noqa: E402


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


def worker(args) -> dict:
    """One method in this process: build, train `steps` steps, measure."""
    import torch

    from tuneoff.core import measure
    from tuneoff.estimator import memory
    from tuneoff.estimator.architectures import resolve
    from tuneoff.modeling.loss import batch_loss

    dev = torch.device(args.device)
    precision = args.precision or ("bf16" if dev.type == "cuda" else "fp32")
    targets = list(memory.expand_targets(args.target_modules.split(",")))
    model = build(args.model, args.method, args.rank, targets, dev, precision)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if METHODS[args.method].adapter:
            model.enable_input_require_grads()
    rows = synthetic_rows(args.batch_size * args.steps, args.seq_len, resolve(args.model).vocab, 0, args.supervised)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(args.optimizer, params)
    steps = [torch.arange(i * args.batch_size, (i + 1) * args.batch_size) for i in range(args.steps)]
    positions = max(int((rows["targets"][idx] != -100).sum()) for idx in steps)
    out = {"method": args.method, "optimizer": args.optimizer, "model_bytes": measure.model_bytes(model),
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


def predict(args, method: str, optimizer: str, positions: int, precision: str):
    from tuneoff.estimator import memory
    from tuneoff.estimator.architectures import resolve

    setup = memory.Setup(method=method, batch_size=args.batch_size, seq_len=args.seq_len, precision=precision,
                         device="cuda" if args.device.startswith("cuda") else "cpu", optimizer=optimizer,
                         gradient_checkpointing=args.gradient_checkpointing, rank=args.rank,
                         target_modules=memory.expand_targets(args.target_modules.split(",")), dropout=0.05,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama-3-8b", help="a catalog name (tuneoff/estimator/architectures.py)")
    parser.add_argument("--methods", default="full,lora,qlora")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--target-modules", default="q_proj,v_proj")
    parser.add_argument("--supervised", type=float, default=0.3, help="share of each example the loss is on")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_memory.json")
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--optimizer", default="adamw", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)  # a worker's (gpu_check.py's cases); default bf16 on CUDA
    args = parser.parse_args()
    if args.method:
        print(json.dumps(worker(args)))
        return
    import torch

    from tuneoff.core.params import EstimateParams, section

    precision = "bf16" if args.device.startswith("cuda") else "fp32"
    params = section(EstimateParams, "estimate", path=ROOT / "params.yaml")
    # the device's memory, asked in a child process so that this one holds no CUDA context
    capacity = int(subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.mem_get_info()[1])"],
                                  capture_output=True, text=True, check=True).stdout) if args.device.startswith("cuda") else 0
    results = {"model": args.model, "device": args.device, "batch_size": args.batch_size, "seq_len": args.seq_len,
               "steps": args.steps, "gradient_checkpointing": args.gradient_checkpointing, "torch": torch.__version__,
               "capacity_bytes": capacity, "methods": {}}
    for method in args.methods.split(","):
        optimizer = "adamw"
        if not METHODS[method].adapter and capacity:  # the estimator picks an optimizer that fits (with a 5% margin)
            overhead = params.overhead_gib.cuda * GIB
            for optimizer in ("adamw", "adamw-8bit", "paged-adamw-8bit"):
                _, est = predict(args, method, optimizer, args.batch_size * args.seq_len, precision)
                if est.peak_tensor_bytes + overhead < 0.95 * capacity:
                    break
        cmd = [sys.executable, __file__, "--model", args.model, "--device", args.device, "--batch-size",
               str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--rank", str(args.rank),
               "--target-modules", args.target_modules, "--supervised", str(args.supervised), "--method", method,
               "--optimizer", optimizer] + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=os.environ)
        if proc.returncode:
            results["methods"][method] = {"optimizer": optimizer, "error": proc.stderr[-2000:]}
            print(f"{method} ({optimizer}): failed\n{proc.stderr[-2000:]}", flush=True)
            continue
        measured = json.loads(proc.stdout.strip().splitlines()[-1])
        setup, est = predict(args, method, optimizer, measured["supervised_positions"], precision)
        error = 100 * (est.peak_tensor_bytes / measured["peak_tensor_bytes"] - 1)
        results["methods"][method] = {"measured": measured, "setup": {**asdict(setup), "target_modules": list(setup.target_modules)},
                                      "predicted": est.as_dict(), "error_percent": round(error, 2),
                                      "throughput": throughput_check(args, setup, measured, params, precision)}
        print(f"{method} ({optimizer}): predicted {est.peak_tensor_bytes / GIB:.2f} GiB ({est.phase}), measured "
              f"{measured['peak_tensor_bytes'] / GIB:.2f} GiB allocated ({error:+.1f}%)"
              + (f", {measured['peak_reserved_bytes'] / GIB:.2f} reserved, "
                 f"{measured['outside_allocator_bytes'] / GIB:.2f} outside the allocator" if "peak_reserved_bytes" in measured else "")
              + (f"; {measured['tokens_per_second']:.0f} tokens/s" if measured["tokens_per_second"] else "")
              + (f" (utilisation {check['utilisation_measured']:.2f}, prior {check['utilisation_prior']:.2f})"
                 if (check := results["methods"][method]["throughput"]) else ""), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
