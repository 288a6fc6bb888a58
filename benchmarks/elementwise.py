"""The element-wise parts of a SmolLM2 training step at the default batch (3 x 448 positions), forward +
backward per call: LoRA's dropout (PEFT's nn.Dropout against tuneoff.training.dropout.Dropout), and RMSNorm,
the rotary embedding and SiLU x up, eager against torch.compile (with the seconds the first call spent
compiling; a second process finds the compiled code in inductor's cache and takes less).

    .venv/bin/python benchmarks/elementwise.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tuneoff.training.dropout import Dropout  # noqa: E402

POSITIONS, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = (3, 448), 576, 1536, 9, 3, 64


def fwd_bwd(fn, inputs: list[torch.Tensor]) -> None:
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])


def ms_per_call(fn, inputs: list[torch.Tensor], calls: int = 30) -> float:
    """Mean milliseconds of `calls` forward + backward passes, after 3 warm-up ones."""
    for _ in range(3):
        fwd_bwd(fn, inputs)
    start = time.perf_counter()
    for _ in range(calls):
        fwd_bwd(fn, inputs)
    return 1000 * (time.perf_counter() - start) / calls


def compiled(fn, inputs: list[torch.Tensor]):
    """torch.compile(fn) and the seconds its first forward + backward took (compilation included)."""
    fast = torch.compile(fn)
    start = time.perf_counter()
    fwd_bwd(fast, inputs)
    return fast, time.perf_counter() - start


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(*POSITIONS, HIDDEN, requires_grad=True)
    rows = [("LoRA dropout p=0.05", "nn.Dropout", torch.nn.Dropout(0.05).train(),
             "dropout.Dropout", Dropout(0.05).train(), [x], None)]
    norm = LlamaRMSNorm(HIDDEN, eps=1e-5)
    q = torch.randn(POSITIONS[0], HEADS, POSITIONS[1], HEAD_DIM, requires_grad=True)
    k = torch.randn(POSITIONS[0], KV_HEADS, POSITIONS[1], HEAD_DIM, requires_grad=True)
    cos, sin = torch.randn(*POSITIONS, HEAD_DIM), torch.randn(*POSITIONS, HEAD_DIM)
    gate, up = (torch.randn(*POSITIONS, INTERMEDIATE, requires_grad=True) for _ in range(2))
    regions = [("RMSNorm", norm, [x]),
               ("rotary embedding", lambda q, k: apply_rotary_pos_emb(q, k, cos, sin), [q, k]),
               ("SiLU(gate) x up", lambda g, u: F.silu(g) * u, [gate, up])]
    for name, fn, inputs in regions:
        fast, seconds = compiled(fn, inputs)
        rows.append((name, "eager", fn, "torch.compile", fast, inputs, seconds))
    print(f"forward + backward per call at {POSITIONS[0]} x {POSITIONS[1]} positions, "
          f"{torch.get_num_threads()} threads\n")
    print("| part | baseline | ms | alternative | ms | speed-up | compile s |")
    print("|---|---|---:|---|---:|---:|---:|")
    for name, base_name, base, alt_name, alt, inputs, seconds in rows:
        a, b = ms_per_call(base, inputs), ms_per_call(alt, inputs)
        print(f"| {name} | {base_name} | {a:.2f} | {alt_name} | {b:.2f} | {a / b:.2f}x | "
              f"{'' if seconds is None else f'{seconds:.1f}'} |")


if __name__ == "__main__":
    main()
