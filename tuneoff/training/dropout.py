"""LoRA's dropout with a cheaper random mask, for training on a CPU.

PEFT applies `nn.Dropout` to each adapter's input. On a CPU, torch's dropout draws one random number
per element (`bernoulli_`): on the default task that was 8-10% of a LoRA step, more than every
element-wise op of the model together (profile in docs/performance.md). `Dropout` draws 64 random
bits per four elements and compares each 16-bit lane with p x 2^16: the same independent keep/drop
draw per element with probability p rounded to a multiple of 2^-16 (0.05 becomes 0.0500031), at less
than half the time. `cheaper(model)` swaps it in for the duration; a GPU keeps `nn.Dropout`, whose
mask costs little there.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class Dropout(nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)  # all 64 bits
        lanes = bits.view(torch.int16)[:n].view(x.shape)  # uniform on [-32768, 32767]
        keep = lanes >= round(self.p * 65536) - 32768
        return (x * keep).mul_(1 / (1 - self.p))  # autograd keeps the bool mask for the backward


@contextlib.contextmanager
def cheaper(model):
    """Replace every LoRA adapter's nn.Dropout in `model` with `Dropout` until the block ends."""
    swapped = []
    for module in model.modules():
        for name, drop in getattr(module, "lora_dropout", {}).items():
            if type(drop) is nn.Dropout:
                swapped.append((module.lora_dropout, name, drop))
                module.lora_dropout[name] = Dropout(drop.p).train(drop.training)
    try:
        yield model
    finally:
        for holder, name, drop in swapped:
            holder[name] = drop
