"""Peak resident set after each training step, per C allocator, with and without returning freed heap pages.

    .venv/bin/python benchmarks/peak_per_step.py --project PROJECT --method qlora --trim never
    .venv/bin/python benchmarks/peak_per_step.py --project PROJECT --method qlora --trim every-step
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 .venv/bin/python benchmarks/peak_per_step.py ...

The process runs on the allocator it was started with (glibc's malloc unless LD_PRELOAD says otherwise;
the train stage starts on tcmalloc through tuneoff.training.launch).

Runs the train loop's step (tuneoff.training.loop: batch_loss, backward, clip, AdamW, with the CPU paths) on the
first `--steps` planned batches of `--task`, and prints the process's peak RSS (VmHWM, reset after the
model is built) after each step and the seconds the steps took. `--trim every-step` calls
train.return_freed_memory() after each step, as the loop does for a 4-bit model on a CPU on glibc.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuneoff.core import measure
from tuneoff.core.methods import method as method_named
from tuneoff.core.params import CommonTrainParams, read_params, section  # noqa: E402
from tuneoff.data.rows import load_rows
from tuneoff.modeling import methods
from tuneoff.modeling.loss import batch_loss
from tuneoff.training import allocator
from tuneoff.training.loop import (  # noqa: E402
    cpu_paths,
    make_optimizer,
    plan_steps,
    return_freed_memory,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--project", type=Path, required=True)
    ap.add_argument("--task", default="extraction")
    ap.add_argument("--method", choices=methods.PARAMS_BY_METHOD, default="qlora")
    ap.add_argument("--trim", choices=["never", "every-step"], default="never")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    args = ap.parse_args()

    data = read_params(args.params)
    common = section(CommonTrainParams, "train", "common", data=data)
    params = section(methods.PARAMS_BY_METHOD[args.method], "train", args.method, data=data)
    dev = torch.device("cpu")
    model = methods.build(args.method, params, args.project / method_named(args.method).base, "fp32", dev, False)
    rows = load_rows(args.project / "data/prepared" / args.task / "train.safetensors")
    steps = plan_steps(rows["real_tokens"], common.batch_size, common.token_budget, common.seed)[: args.steps]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, common.weight_decay, params.rates[0])
    peak = measure.PeakMemory(dev)
    peak.reset()
    peaks, start = [], time.perf_counter()
    with cpu_paths(model, dev):
        model.train()
        for idx in steps:
            loss, n = batch_loss(model, rows, idx, dev, "fp32")
            (loss / n).backward()
            torch.nn.utils.clip_grad_norm_(trainable, common.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if args.trim == "every-step":
                return_freed_memory()
            peaks.append(round(peak.read()["peak_bytes"] / 2**20))
    print(f"{args.method} on {args.task}, {allocator.in_use()} malloc, trim {args.trim}: peak MiB after each step {peaks}; "
          f"{time.perf_counter() - start:.1f} s for {len(steps)} steps")


if __name__ == "__main__":
    main()
