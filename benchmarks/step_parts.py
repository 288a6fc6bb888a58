"""One part of a training step at a time, each implementation tuneoff could use against the one it does use,
on SmolLM2-135M's shapes at the default batch (3 rows x 448 positions), timed by timing.best_seconds
(interleaved rounds, best per kind). train_throughput.py `--impls tuneoff+<variant>` measures the same
choices in the whole loop; this says where the difference comes from.

    .venv/bin/python benchmarks/step_parts.py adamw --model PROJECT/models/base
    .venv/bin/python benchmarks/step_parts.py attention --examples-per-row 3 --example-len 147   # extraction
    .venv/bin/python benchmarks/step_parts.py attention --examples-per-row 8 --example-len 54    # Banking77
    .venv/bin/python benchmarks/step_parts.py attention --dtype bf16    # per example in bf16 as well
    .venv/bin/python benchmarks/step_parts.py elementwise

adamw        one AdamW step over every parameter of a model (a full fine-tune's optimizer step): PyTorch's
             per-tensor loop (its CPU default), foreach, and fused (tuneoff/training/loop.py make_optimizer).
attention    attention alone, forward + backward, per layer, on one packed batch: transformers' SDPA over
             the whole row with the block-diagonal mask against tuneoff.training.attention.packed_attention
             (causal SDPA per example); checks first that both give the same output.
elementwise  forward + backward per call: LoRA's dropout (PEFT's nn.Dropout against
             tuneoff.training.dropout.Dropout), and RMSNorm, the rotary embedding and SiLU x up, eager against
             torch.compile, with the seconds the first call spent compiling (a second process finds the
             compiled code in inductor's cache and takes less).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import timing  # noqa: E402

ROWS, SEQ_LEN, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 3, 448, 576, 1536, 9, 3, 64


def header(what: str) -> None:
    print(f"{what}, {torch.get_num_threads()} threads, best of interleaved rounds:")


def adamw(args) -> None:
    from transformers import AutoModelForCausalLM

    params = list(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).parameters())
    torch.manual_seed(0)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    kinds = {"per-tensor": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    # each kind keeps its own states (created by best_seconds' untimed first call)
    steps = {name: torch.optim.AdamW(params, lr=1e-5, **options).step for name, options in kinds.items()}
    best = timing.best_seconds(steps, rounds=args.rounds, calls=3)
    header(f"AdamW step over {sum(p.numel() for p in params) / 1e6:.0f}M float32 parameters")
    for kind, seconds in best.items():
        print(f"  {kind:10} {seconds * 1e3:7.1f} ms   {best['per-tensor'] / seconds:.2f}x per-tensor")


def attention(args) -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from tuneoff.core import measure
    from tuneoff.data.packing import example_spans
    from tuneoff.training import attention as packed

    if args.dtype == "bf16" and not measure.cpu_has_bf16():
        sys.exit("attention --dtype bf16: this CPU has no bf16 instructions, so bf16 would time a slow fallback")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    lengths = [args.example_len] * args.examples_per_row
    if sum(lengths) > SEQ_LEN:
        sys.exit(f"{args.examples_per_row} examples of {args.example_len} do not fit in a row of {SEQ_LEN}")
    if sum(lengths) < SEQ_LEN:
        lengths.append(SEQ_LEN - sum(lengths))  # the row's remainder is padding: its own span
    spans = example_spans(torch.cat([torch.arange(n) for n in lengths]).expand(ROWS, -1))
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    causal = torch.ones(SEQ_LEN, SEQ_LEN, dtype=torch.bool).tril()
    mask = ((segment[:, None] == segment[None, :]) & causal).expand(ROWS, 1, -1, -1)

    class Module(torch.nn.Module):  # what the attention functions read from the layer
        num_key_value_groups = HEADS // KV_HEADS

    module = Module()
    torch.manual_seed(0)
    q, k, v = (torch.randn(ROWS, h, SEQ_LEN, HEAD_DIM, dtype=dtype) for h in (HEADS, KV_HEADS, KV_HEADS))
    sizes = [b - a for a, b in spans[0]]

    def step(kind: str) -> torch.Tensor:
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        if kind == "masked row":
            out, _ = sdpa_attention_forward(module, qq, kk, vv, mask, scaling=HEAD_DIM**-0.5)
        elif kind == "per example in bf16":
            out = torch.cat([torch.nn.functional.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True)
                             for a, b, c in zip(qq.split(sizes, 2), kk.split(sizes, 2), vv.split(sizes, 2))], 2)
        else:
            out, _ = packed.packed_attention(module, qq, kk, vv, None, scaling=HEAD_DIM**-0.5, packed_spans=spans)
        out.sum().backward()
        return out.detach()

    tolerance = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(step("per example"), step("masked row"), **tolerance)
    kinds = ["masked row", "per example"] + (["per example in bf16"] if dtype == torch.bfloat16 else [])
    best = timing.best_seconds({kind: lambda kind=kind: step(kind) for kind in kinds}, rounds=args.rounds, calls=10)
    header(f"{ROWS} rows x {SEQ_LEN}, {args.examples_per_row} examples of {args.example_len} per row, {args.dtype} "
           "inputs; attention forward + backward per layer")
    for kind, seconds in best.items():
        print(f"  {kind:19} {seconds * 1e3:7.2f} ms")
    print(f"  per example / masked row: {best['masked row'] / best['per example']:.2f}x faster, same output")
    if dtype == torch.bfloat16:
        print(f"  per example in float32 / in bf16: {best['per example in bf16'] / best['per example']:.2f}x faster")


def fwd_bwd(fn, inputs: list[torch.Tensor]) -> None:
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])


def elementwise(args) -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    from tuneoff.training.dropout import Dropout

    torch.manual_seed(0)
    x = torch.randn(ROWS, SEQ_LEN, HIDDEN, requires_grad=True)
    rows = [("LoRA dropout p=0.05", "nn.Dropout", torch.nn.Dropout(0.05).train(),
             "dropout.Dropout", Dropout(0.05).train(), [x], None)]
    q = torch.randn(ROWS, HEADS, SEQ_LEN, HEAD_DIM, requires_grad=True)
    k = torch.randn(ROWS, KV_HEADS, SEQ_LEN, HEAD_DIM, requires_grad=True)
    cos, sin = torch.randn(ROWS, SEQ_LEN, HEAD_DIM), torch.randn(ROWS, SEQ_LEN, HEAD_DIM)
    gate, up = (torch.randn(ROWS, SEQ_LEN, INTERMEDIATE, requires_grad=True) for _ in range(2))
    regions = [("RMSNorm", LlamaRMSNorm(HIDDEN, eps=1e-5), [x]),
               ("rotary embedding", lambda q, k: apply_rotary_pos_emb(q, k, cos, sin), [q, k]),
               ("SiLU(gate) x up", lambda g, u: torch.nn.functional.silu(g) * u, [gate, up])]
    for name, fn, inputs in regions:
        fast = torch.compile(fn)
        start = time.perf_counter()
        fwd_bwd(fast, inputs)  # compiles
        rows.append((name, "eager", fn, "torch.compile", fast, inputs, time.perf_counter() - start))
    header(f"forward + backward per call at {ROWS} x {SEQ_LEN} positions")
    print("\n| part | baseline | ms | alternative | ms | speed-up | compile s |")
    print("|---|---|---:|---|---:|---:|---:|")
    for name, base_name, base, alt_name, alt, inputs, seconds in rows:
        best = timing.best_seconds({"base": lambda: fwd_bwd(base, inputs), "alt": lambda: fwd_bwd(alt, inputs)},
                                   rounds=args.rounds, calls=10)
        a, b = 1000 * best["base"], 1000 * best["alt"]
        print(f"| {name} | {base_name} | {a:.2f} | {alt_name} | {b:.2f} | {a / b:.2f}x | "
              f"{'' if seconds is None else f'{seconds:.1f}'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    parts = ap.add_subparsers(dest="part", required=True)
    parts.add_parser("adamw").add_argument("--model", required=True, help="a local model folder (no download)")
    att = parts.add_parser("attention")
    att.add_argument("--examples-per-row", type=int, default=3)
    att.add_argument("--example-len", type=int, default=147)
    att.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                     help="bf16: inputs as a bf16 run gives them, and a third kind, SDPA per example in bf16 itself "
                          "(packed_attention attends in float32)")
    parts.add_parser("elementwise")
    args = ap.parse_args()
    {"adamw": adamw, "attention": attention, "elementwise": elementwise}[args.part](args)


if __name__ == "__main__":
    main()
