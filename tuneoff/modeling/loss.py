"""The loss every method trains on and is measured by: the mean cross-entropy over assistant tokens of
packed rows (packing.py), with the output layer run only on those positions (`logits_to_keep` with a
boolean mask): SmolLM2's 49,152 x 576 vocabulary projection is about a fifth of its FLOPs per token,
and prompt positions carry no loss. The training loop's steps and val passes use it, and so does the
quantize stage's val loss of each base (what every run on that base starts from).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from tuneoff.data.packing import IGNORE, example_spans

# the name tuneoff/training/attention.py registers its per-example attention under (a model's
# config._attn_implementation while the loop runs on a CPU)
PACKED_ATTENTION = "tuneoff_packed"


def autocast(dev: torch.device, precision: str):
    """bf16 autocasts matmuls over float32 master weights. fp32 and bf16-pure run as the weights are:
    bf16-pure's weights, gradients and optimizer states are bf16 themselves (methods.build), as
    torchtune trains a full fine-tune on one GPU.

    How a bf16-pure update keeps its precision: fused torch AdamW (and bitsandbytes' 8-bit AdamW)
    computes each update in float32 from the bf16 weight, gradient and states, and rounds the new
    values to the nearest bf16 once per step (on a CPU, bit for bit a float64 step rounded once). An
    update under half a bf16 step of its weight (1/512 to 1/256 of the weight) is lost; there is no
    stochastic rounding or compensated summation to carry it over. tests/test_loop_options.py measures instead that
    bf16-pure's train losses stay close to bf16 autocast's on the tiny model."""
    if precision == "bf16":
        return torch.autocast(dev.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batch_loss(model, rows: dict[str, torch.Tensor], idx, dev, precision,
               reduction: str = "sum") -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the loss positions of rows[idx], and how many there are.
    reduction="none" gives one loss per position instead, in the row-major order of
    `rows["targets"][idx] != IGNORE` (both paths below keep that order)."""
    ids, pos, targets = (rows[k][idx] for k in ("input_ids", "position_ids", "targets"))
    n = int((targets != IGNORE).sum())  # counted on the host: no device sync
    extra = {}
    if unwrap(model).config._attn_implementation == PACKED_ATTENTION:
        # attention per example (attention.py, the loop on a CPU) needs no row boundaries: the batch
        # becomes one row of its real tokens, so no compute goes to the rows' trailing padding
        real = torch.arange(ids.shape[1]) < rows["real_tokens"][idx, None]
        ids, pos, targets = (t[real][None] for t in (ids, pos, targets))
        extra["packed_spans"] = example_spans(pos)
    ids, pos, targets = (t.to(dev, non_blocking=True) for t in (ids, pos, targets))
    keep = targets != IGNORE
    with autocast(dev, precision):
        # use_cache=False matters: transformers only reads position-id restarts as example
        # boundaries when there is no KV cache
        logits = model(input_ids=ids, position_ids=pos, logits_to_keep=keep, use_cache=False, **extra).logits
    loss = F.cross_entropy(logits.float(), targets[keep], reduction=reduction)
    return loss, n


def unwrap(model):
    """The model inside DDP's wrapper (FSDP shards a model in place: no wrapper)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def eval_loss(model, rows: dict[str, torch.Tensor], batch_size: int, dev, precision) -> float:
    """Token-weighted mean loss over every row."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows["input_ids"]), batch_size):
        loss, n = batch_loss(model, rows, torch.arange(start, min(start + batch_size, len(rows["input_ids"]))), dev, precision)
        total, count = total + float(loss), count + n
    model.train(was_training)
    return total / max(count, 1)
