"""Evaluation's batched greedy generation against generating one example at a time (plain
`generate()`), and batched with transformers' static KV cache: examples and reply tokens per second
for each, the ratio, and whether the predictions are identical.

    .venv/bin/python benchmarks/eval_throughput.py --project PROJECT --task extraction \\
        --examples 64 --out benchmarks/results/eval_throughput_extraction.json

Batched is tuneoff.evaluation.generate.generate as stages/evaluate.py calls it (left padding, prompts sorted by
length, evaluate.batch_size prompts per call, evaluate.max_new_tokens from `--params`). Per-example is
what a user would write: each prompt in the chat template, tokenized alone (no padding), one greedy
model.generate() call, decoded. Both run in this process on the same model (`--model`, default the
project's models/base; a trained model folder such as runs/<task>/full/model works too), on the first
`--examples` test prompts, per-example first and batched second, each after one warm-up call. A
prediction that differs is listed in the JSON and makes the script exit 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def per_example(model, tokenizer, conversations, max_new_tokens: int, dev) -> list[str]:
    import torch

    from tuneoff.evaluation.generate import chat_prompt

    replies = []
    with torch.no_grad():
        for conv in conversations:
            enc = tokenizer(chat_prompt(tokenizer, conv), return_tensors="pt", add_special_tokens=False).to(dev)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                                 top_k=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            replies.append(tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return replies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", type=Path, required=True)
    ap.add_argument("--task", required=True)
    ap.add_argument("--model", type=Path, help="a model folder; default <project>/models/base")
    ap.add_argument("--examples", type=int, default=64, help="the first K test prompts")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--out", type=Path, required=True, help="JSON; a .md table is written beside it")
    ap.add_argument("--label", default="", help="a line saying what this run is (written first in the table)")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneoff.core import measure
    from tuneoff.core.params import EvaluateParams, read_params, section
    from tuneoff.core.records import read_jsonl
    from tuneoff.evaluation.generate import generate

    params = section(EvaluateParams, "evaluate", data=read_params(args.params))
    source = args.model or args.project / "models/base"
    rows = read_jsonl(args.project / "data/prepared" / args.task / "test.jsonl")[: args.examples]
    conversations = [row["messages"][:-1] for row in rows]
    dev = measure.device()
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(dev).eval()

    def timed(fn):
        fn(conversations[:1])  # warm-up: first-call allocations and kernel selection
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn(conversations)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    single, single_s = timed(lambda convs: per_example(model, tokenizer, convs, params.max_new_tokens, dev))
    batched, batched_s = timed(lambda convs: generate(model, tokenizer, convs, params.batch_size, params.max_new_tokens,
                                                      dev, "batched"))
    static, static_s = timed(lambda convs: generate(model, tokenizer, convs, params.batch_size, params.max_new_tokens,
                                                    dev, "batched, static cache", cache="static"))
    # reply tokens, re-tokenized from the decoded text: the same count for each way (identical replies)
    reply_tokens = sum(len(tokenizer(r, add_special_tokens=False).input_ids) + 1 for r in batched)
    mismatches = [{"index": i, "per_example": a, "batched": b, "static": c}
                  for i, (a, b, c) in enumerate(zip(single, batched, static)) if not a == b == c]
    n = len(conversations)
    result = {"label": args.label or "benchmark run", "task": args.task, "model": str(source),
              "device": measure.device_name(dev), "threads": torch.get_num_threads(), "examples": n,
              "batch_size": params.batch_size, "max_new_tokens": params.max_new_tokens,
              "per_example": {"seconds": round(single_s, 3), "examples_per_second": round(n / single_s, 3)},
              "batched": {"seconds": round(batched_s, 3), "examples_per_second": round(n / batched_s, 3)},
              "batched_static_cache": {"seconds": round(static_s, 3), "examples_per_second": round(n / static_s, 3)},
              "reply_tokens": reply_tokens,
              "speedup": round(single_s / batched_s, 3), "identical_predictions": not mismatches,
              "mismatches": mismatches, "meets_target": single_s / batched_s >= 5 and not mismatches}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    md = (f"{result['label']}\n\ntask `{args.task}`, {n} test prompts, batch {params.batch_size}, max_new_tokens "
          f"{params.max_new_tokens}, {result['device']} ({result['threads']} threads)\n\n"
          "| generation | examples/s | reply tokens/s | seconds |\n|---|---:|---:|---:|\n"
          + "".join(f"| {name} | {n / s:.2f} | {reply_tokens / s:.1f} | {s:.2f} |\n" for name, s in
                    (("per-example generate()", single_s), ("batched (evaluate)", batched_s),
                     ("batched, static cache", static_s)))
          + f"\nreply tokens: {reply_tokens} (each reply re-tokenized, + its end token)\n\n"
          f"batched / per-example: {result['speedup']:.2f}x; identical predictions: {not mismatches} "
          f"({len(mismatches)} differ); target (>= 5x, identical) met: {result['meets_target']}\n")
    args.out.with_suffix(".md").write_text(md)
    print(md)
    if mismatches:
        sys.exit(f"{len(mismatches)} of {n} predictions differ between batched and per-example generation")


if __name__ == "__main__":
    main()
