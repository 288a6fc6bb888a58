"""How the harnesses time things: interleaved rounds, best per kind, and the machine's matmul peak."""

from __future__ import annotations

import math
import time
from collections.abc import Callable


def best_seconds(kinds: dict[str, Callable[[], object]], rounds: int = 5, calls: int = 10) -> dict[str, float]:
    """Seconds per call of each kind: one untimed call each (warm-up), then `rounds` rounds in which every
    kind runs `calls` times in turn, so a drift of the machine's speed touches all kinds alike; the best round."""
    for fn in kinds.values():
        fn()
    best = dict.fromkeys(kinds, math.inf)
    for _ in range(rounds):
        for name, fn in kinds.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / calls)
    return best


def matmul_flops(n: int, dtype, device) -> float:
    """FLOP/s of an n x n x n matmul on `device` (the best of 5 rounds after a warm-up one)."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)

    def product() -> None:
        for _ in range(3 if device.type == "cpu" else 20):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()

    return (3 if device.type == "cpu" else 20) * 2 * n**3 / best_seconds({"mm": product}, rounds=5, calls=1)["mm"]
