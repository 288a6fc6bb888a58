"""Each method at its own learning rate: a short pilot per candidate, the lowest val loss wins.

The best LoRA rate is about 10x full fine-tuning's and moves with rank, data and budget (Biderman et
al. 2024; Schulman et al. 2025), so one hand-set rate per method compares rates as much as methods.
With `train.<method>.lr` a list, each candidate trains `train.common.pilot_fraction` of the token
budget from the same initial weights (its cosine schedule compressed to the pilot's steps), and the
one with the lowest val loss then trains the whole budget, exactly as a run given that rate alone.
Ties go to the earlier candidate in the list and are reported, as is a pick at either end of the
list (the best rate may lie beyond it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from tuneoff.core.params import CommonTrainParams
from tuneoff.core.records import Tuning


def pilot_budget(common: CommonTrainParams) -> CommonTrainParams:
    """The settings one pilot trains with: a share of the budget, nothing else changed."""
    return common.model_copy(update={"token_budget": max(1, math.ceil(common.token_budget * common.pilot_fraction))})


def pick(rates: list[float], common: CommonTrainParams, pilot: Callable[[float, CommonTrainParams], float]) -> Tuning:
    """Run `pilot(rate, settings) -> val loss` for each candidate and choose; one rate runs no pilot."""
    if len(rates) == 1:
        return Tuning(lr=rates[0], tuned=False, candidates=rates)
    settings = pilot_budget(common)
    start = time.perf_counter()
    losses = {rate: pilot(rate, settings) for rate in rates}
    best = min(rates, key=lambda rate: losses[rate])  # min keeps the first of equal losses
    edge = "smallest" if best == min(rates) else "largest" if best == max(rates) else None
    return Tuning(lr=best, tuned=True, candidates=rates, pilot_tokens=settings.token_budget,
                  pilot_val_loss={f"{rate:g}": round(loss, 6) for rate, loss in losses.items()}, at_edge=edge,
                  tied_with=[r for r in rates if r != best and losses[r] == losses[best]],
                  seconds=round(time.perf_counter() - start, 3))
