"""Training time and dollars, from FLOPs: what a method computes per token, the device's peak FLOP/s
and a utilisation factor (achieved / peak, "MFU"), calibrated from measured runs when they exist.

FLOPs per token position of a packed row (padding included: the matmuls run on it), with N the
decoder layers' Linear weights, s the row length, and f = K/T the share of positions the output
layer runs on (tuneoff: the supervised ones):

- forward: 2N (every weight is one multiply-add per token) + 4 x L x n_h x d x s' (Q.K^T and
  attention x V; s' = s with packed rows, where SDPA computes the whole masked s x s, s/2 with a
  causal kernel) + 2 x h x V x f (output layer) + 2 x r x (in + out) per LoRA adapter.
- full fine-tuning: 3 x forward (backward computes the input's and the weight's gradient, 2x the
  forward each matmul; Kaplan et al. 2020, "6N per token").
- LoRA / QLoRA: the frozen base's backward needs only its input gradient: 2 x (2N + head), plus
  3x attention (no weights there: its backward is 2x its forward) and 3x the adapters; the 4-bit
  dequantization is memory traffic, not FLOPs, and shows up as a lower utilisation.
- gradient checkpointing: one more forward of the decoder layers.

time = token positions x FLOPs per position / (utilisation x peak FLOP/s); dollars = hours x GPUs x
the price per hour in `cost.price_per_hour`.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from tuneoff.estimator.architectures import LAYER_LINEARS, Shape
from tuneoff.estimator.memory import Setup


def flops_per_position(shape: Shape, setup: Setup) -> float:
    """Training FLOPs per token position of one step of `setup` (formulas: module docstring)."""
    linear = shape.layers * sum(i * o for i, o, _ in (shape.linear(m) for m in LAYER_LINEARS))
    # the masked row computes every pair; causal half of them; per example, at most that (spans are shorter)
    attended = setup.seq_len if setup.attention == "packed" else setup.seq_len / 2
    attention = 4 * shape.layers * shape.heads * shape.head_dim * attended
    share = setup.positions / setup.tokens
    head = 2 * shape.hidden * shape.vocab * share
    if not setup.adapter:
        total = 3 * (2 * linear + head + attention)
        recompute = 2 * linear + attention
    else:
        adapters = 2 * setup.rank * (shape.layers * sum(sum(shape.linear(m)[:2]) for m in setup.target_modules
                                                        if m != "lm_head")
                                     + (shape.hidden + shape.vocab) * share * ("lm_head" in setup.target_modules))
        total = 2 * (2 * linear + head) + 3 * attention + 3 * adapters
        recompute = 2 * linear + attention + adapters
    return total + (recompute if setup.gradient_checkpointing else 0)


@dataclass(frozen=True)
class Device:
    """A device of `estimate.devices`: what it holds and how fast it multiplies."""

    name: str  # as torch names it (the key of cost.price_per_hour)
    memory_gib: float
    tflops: dict[str, float]  # dense peak by precision: fp32, bf16
    usd_per_hour: float | None
    kind: str  # cpu or cuda

    def peak_flops(self, precision: str) -> float:
        return 1e12 * self.tflops["fp32" if precision == "fp32" else "bf16"]


def train_seconds(positions: float, flops_per_pos: float, device: Device, precision: str, utilisation: float) -> float:
    return positions * flops_per_pos / (utilisation * device.peak_flops(precision))


@dataclass(frozen=True)
class Calibration:
    utilisation: float
    source: str  # "prior" or the runs it was fitted on
    runs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Measured:
    """A train stage's run: what it trained (FLOPs) in how long, on what (estimate.measured_runs)."""

    method: str
    device: str
    precision: str
    train_flops: float
    train_seconds: float
    where: str


def calibrate(runs: list[Measured], device: Device, method: str, precision: str, prior: float) -> Calibration:
    """Utilisation = achieved / peak FLOP/s, the median over this device's measured runs of `method`;
    the prior when there are none."""
    same = [r for r in runs if (r.method, r.device, r.precision) == (method, device.name, precision) and r.train_seconds]
    if not same:
        return Calibration(prior, "prior")
    measured = [r.train_flops / r.train_seconds / device.peak_flops(precision) for r in same]
    return Calibration(statistics.median(measured), f"median of {len(same)} measured run(s)",
                       tuple(r.where for r in same))
