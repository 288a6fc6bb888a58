"""Attention alone, forward + backward, on one packed batch: transformers' SDPA over the whole row
with the block-diagonal mask against tuneoff.training.attention.packed_attention (causal SDPA per example).

    .venv/bin/python benchmarks/attention_packed.py --examples-per-row 3 --example-len 147   # extraction
    .venv/bin/python benchmarks/attention_packed.py --examples-per-row 8 --example-len 54    # Banking77
    .venv/bin/python benchmarks/attention_packed.py --dtype bf16   # a bf16 run: per example in bf16 vs float32

Shapes are SmolLM2-135M's (9 query heads, 3 key/value heads, head dim 64) in rows of 448, the
default batch of 3 rows; each row's remainder is padding (its own span). Best of 5 rounds of 10,
kinds alternating; per layer (the model has 30).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

from tuneoff.data.packing import example_spans  # noqa: E402
from tuneoff.training import attention  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples-per-row", type=int, default=3)
    ap.add_argument("--example-len", type=int, default=147)
    ap.add_argument("--rows", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=448)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: inputs as a bf16 run gives them, and a third kind, SDPA per example in bf16 itself "
                         "(packed_attention attends in float32)")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    heads, kv_heads, dim = 9, 3, 64
    lengths = [args.example_len] * args.examples_per_row
    if sum(lengths) > args.seq_len:
        sys.exit("the examples do not fit in a row")
    if sum(lengths) < args.seq_len:
        lengths.append(args.seq_len - sum(lengths))
    position_ids = torch.cat([torch.arange(n) for n in lengths]).expand(args.rows, -1)
    spans = example_spans(position_ids)
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    causal = torch.ones(args.seq_len, args.seq_len, dtype=torch.bool).tril()
    mask = ((segment[:, None] == segment[None, :]) & causal).expand(args.rows, 1, -1, -1)

    class Module(torch.nn.Module):  # what the attention functions read from the layer
        num_key_value_groups = heads // kv_heads

    module = Module()
    torch.manual_seed(0)
    q, k, v = (torch.randn(args.rows, h, args.seq_len, dim, dtype=dtype) for h in (heads, kv_heads, kv_heads))
    sizes = [b - a for a, b in spans[0]]

    def step(kind: str) -> torch.Tensor:
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        if kind == "masked row":
            out, _ = sdpa_attention_forward(module, qq, kk, vv, mask, scaling=dim**-0.5)
        elif kind == "per example in bf16":
            out = torch.cat([torch.nn.functional.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True)
                             for a, b, c in zip(qq.split(sizes, 2), kk.split(sizes, 2), vv.split(sizes, 2))], 2)
        else:
            out, _ = attention.packed_attention(module, qq, kk, vv, None, scaling=dim**-0.5, packed_spans=spans)
        out.sum().backward()
        return out.detach()

    tolerance = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(step("per example"), step("masked row"), **tolerance)
    best = {"masked row": float("inf"), "per example": float("inf")}
    if dtype == torch.bfloat16:
        best["per example in bf16"] = float("inf")
    for _ in range(5):
        for kind in best:
            start = time.perf_counter()
            for _ in range(10):
                step(kind)
            best[kind] = min(best[kind], (time.perf_counter() - start) / 10)
    print(f"{args.rows} rows x {args.seq_len}, {args.examples_per_row} examples of {args.example_len} per row, "
          f"{torch.get_num_threads()} threads, {args.dtype} inputs; attention forward + backward per layer:")
    for kind, seconds in best.items():
        print(f"  {kind:19} {seconds * 1e3:7.2f} ms")
    print(f"  per example / masked row: {best['masked row'] / best['per example']:.2f}x faster, same output")
    if dtype == torch.bfloat16:
        print(f"  per example in float32 / in bf16: {best['per example in bf16'] / best['per example']:.2f}x faster")


if __name__ == "__main__":
    main()
