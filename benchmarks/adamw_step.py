"""One AdamW step over a model's parameters on this machine: PyTorch's per-tensor loop (its CPU default),
foreach, and fused, interleaved over rounds; best per kind.

    .venv/bin/python benchmarks/adamw_step.py --model /path/to/SmolLM2-135M   # a local model folder

What a full fine-tune's optimizer step costs (every parameter has states); an adapter's few
parameters make any kind cheap. tuneoff's loop uses fused (tuneoff/training/loop.py make_optimizer).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM

KINDS = {"per-tensor": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a local model folder (no download)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    params = list(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).parameters())
    torch.manual_seed(0)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    best = dict.fromkeys(KINDS, float("inf"))
    for _ in range(args.rounds):
        for kind, options in KINDS.items():
            optimizer = torch.optim.AdamW(params, lr=1e-5, **options)
            optimizer.step()  # the states are created on the first step: not timed
            start = time.perf_counter()
            for _ in range(args.steps):
                optimizer.step()
            best[kind] = min(best[kind], (time.perf_counter() - start) / args.steps)
            del optimizer
    print(f"AdamW step over {sum(p.numel() for p in params) / 1e6:.0f}M float32 parameters, "
          f"{torch.get_num_threads()} threads, best of {args.rounds} rounds:")
    for kind, seconds in best.items():
        print(f"  {kind:10} {seconds * 1e3:7.1f} ms   {best['per-tensor'] / seconds:.2f}x per-tensor")


if __name__ == "__main__":
    main()
