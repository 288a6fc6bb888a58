"""The estimator's numbers for Llama 3 8B and 70B beside the seed article's claims and torchtune's
published peaks (docs/estimator.md), from the formulas alone (no GPU, no download).

    .venv/bin/python benchmarks/article_table.py            # markdown table
    .venv/bin/python benchmarks/article_table.py --json     # the same rows as JSON

Each row names its setting; change one with `tuneoff estimate` (e.g. --batch-size, --seq-len,
--gradient-checkpointing, --precision, --optimizer, --gpus).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuneoff.core.params import EstimateParams, section  # noqa: E402
from tuneoff.estimator import (
    architectures,
    memory,  # noqa: E402
)

GIB = 2**30
ARTICLE = {  # the seed article's sentences (reference/seed-article.txt)
    "full-8b": "full 8B: ~60-80 GB with mixed precision, multi-GPU A100 80GB",
    "lora-8b": "LoRA r16 8B: a single 24 GB GPU (RTX 4090, A10G); FAQ: 16-24 GB",
    "qlora-8b": "QLoRA 8B: as little as 12-16 GB",
    "full-70b": "full 70B: 8x A100 80GB",
    "lora-70b": "LoRA 70B: 2x A100 or a single H100",
}
# torchtune README, "Memory and training speed" (Llama 3.1; batch 2, packed to 2048 tokens, bf16,
# activation checkpointing): quoted from memory, offline; check against the README before relying on them
TORCHTUNE = {"full-8b": "18.9 GiB on 1x 4090 (8-bit paged AdamW, optimizer in backward)",
             "lora-8b": "16.2 GiB on 1x 4090", "qlora-8b": "7.4 GiB on 1x 4090",
             "full-70b": "13.9 GiB per GPU on 8x A100 (CPU offload)", "lora-70b": "27.6 GiB per GPU on 8x A100"}


def rows() -> list[dict]:
    overhead = int(section(EstimateParams, "estimate", path=ROOT / "params.yaml").overhead_gib.cuda * GIB)
    out = []

    def add(claim: str, label: str, model: str, **kw):
        kw = {"batch_size": 1, "seq_len": 2048, "precision": "bf16", "device": "cuda", "optimizer": "adamw",
              "gradient_checkpointing": False, "rank": 16, "target_modules": ("q_proj", "v_proj"), "dropout": 0.0,
              "supervised_positions": None, "attention": "causal", "double_quant": True, "gpus": 1, "sharded": True, "accumulates": False,
              **kw}
        setup = memory.Setup(**kw)
        est = memory.estimate(architectures.resolve(model), setup, overhead)
        counts = est.params
        # the train loop runs every precision, optimizer and checkpointing option, on one device or on
        # several (train.common.devices, FSDP through accelerate: GPUs only, not yet run on GPUs by this project)
        out.append({"claim": claim, "setting": label, "model": model, "gpus": setup.gpus,
                    "loop_runs_it": "yes" if setup.gpus == 1 else f"devices: {setup.gpus}, distributed: fsdp (untested on GPUs)",
                    "peak_gib": round(est.peak_bytes / GIB, 1), "phase": est.phase,
                    "trainable_percent": round(100 * counts["trainable"] / counts["total"], 3),
                    "terms_gib": {k: round(v / GIB, 2) for k, v in est.terms.items() if v}})

    add("full-8b", "tuneoff: float32 master weights + AdamW, bf16 autocast", "llama-3-8b", method="full")
    add("full-8b", "bf16 weights and AdamW states (bf16-pure)", "llama-3-8b", method="full", precision="bf16-pure")
    add("full-8b", "bf16-pure, 8-bit AdamW, checkpointing", "llama-3-8b", method="full", precision="bf16-pure",
        optimizer="adamw-8bit", gradient_checkpointing=True)
    add("full-8b", "torchtune-like: bf16-pure, paged 8-bit AdamW, checkpointing, batch 2", "llama-3-8b", method="full",
        precision="bf16-pure", optimizer="paged-adamw-8bit", gradient_checkpointing=True, batch_size=2)
    add("lora-8b", "r16 q,v, bf16 base", "llama-3-8b", method="lora")
    add("lora-8b", "r16 q,v, checkpointing, batch 2", "llama-3-8b", method="lora", gradient_checkpointing=True,
        batch_size=2)
    add("lora-8b", "r16 all linear, checkpointing, batch 2", "llama-3-8b", method="lora", gradient_checkpointing=True,
        batch_size=2, target_modules=memory.expand_targets(["all-linear"]))
    add("qlora-8b", "r16 q,v, NF4 + double quant", "llama-3-8b", method="qlora")
    add("qlora-8b", "r16 q,v, checkpointing, batch 2", "llama-3-8b", method="qlora", gradient_checkpointing=True,
        batch_size=2)
    add("full-70b", "tuneoff's precision, FSDP over 8 GPUs, checkpointing", "llama-3-70b", method="full", gpus=8,
        gradient_checkpointing=True)
    add("full-70b", "bf16-pure, 8-bit AdamW, FSDP over 8 GPUs, checkpointing", "llama-3-70b", method="full",
        precision="bf16-pure", optimizer="adamw-8bit", gpus=8, gradient_checkpointing=True)
    add("lora-70b", "r16 q,v, one GPU, checkpointing", "llama-3-70b", method="lora", gradient_checkpointing=True)
    add("lora-70b", "r16 q,v, FSDP over 2 GPUs, checkpointing", "llama-3-70b", method="lora", gpus=2,
        gradient_checkpointing=True)
    add("lora-70b", "QLoRA r16 q,v, one GPU, checkpointing", "llama-3-70b", method="qlora", gradient_checkpointing=True)
    return out


def main() -> None:
    table = rows()
    if "--json" in sys.argv:
        print(json.dumps(table, indent=2))
        return
    print("| article claim | torchtune (recalled) | estimator setting (batch 1 x 2048 unless named) | peak GiB per GPU "
          "| trainable % | tuneoff's loop runs it |")
    print("|---|---|---|---|---|---|")
    last = None
    for r in table:
        first = r["claim"] != last
        last = r["claim"]
        print(f"| {ARTICLE[r['claim']] if first else ''} | {TORCHTUNE[r['claim']] if first else ''} | {r['setting']} "
              f"| {r['peak_gib']} | {r['trainable_percent']:g} | {r['loop_runs_it']} |")


if __name__ == "__main__":
    main()
