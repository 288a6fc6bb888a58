"""How often the verdict's paired intervals claim what is not so, computed where they are used.

0/1 scores (tuneoff.decision.stats.tango_interval): exact, not simulated. For n items the number
right only in a and only in b is multinomial, so every possible table is enumerated once per n, its
interval computed, and each grid cell's probabilities summed: P(lower bound > bound) is how often
"a is above the bound" is claimed when a - b sits exactly on it (non-inferiority at the margin, or
"beats the base" at 0), P(upper < bound) the other side, and coverage P(low <= true <= high). Grid:
n in {20, 30, 50, 100, 300, 1000}, the share of items the two disagree on in {0, 1, 5, 20%} (at a
gap of -2 points at least 2% must disagree: the 0 and 1% cells run at 2%), b's accuracy in {0.1,
0.5, 0.9}, a - b on the bound (0 or -2 points); cells whose shares do not fit in [0, 1] are skipped.

Several seeds (tuneoff.decision.stats.paired_over_seeds): simulated. Each item has its own gap
(normal, sd 1) and each method's training seeds shift its mean score (normal, sd twice the item part
of the mean's spread, 2 / sqrt(n)); coverage of the method-level gap with 2 and 3 seeds each.

    .venv/bin/python benchmarks/interval_error.py --out benchmarks/results/interval_error.json
    .venv/bin/python benchmarks/interval_error.py --wide --out benchmarks/results/interval_error_wide.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
from scipy.special import gammaln, xlogy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tuneoff.decision.stats import paired_over_seeds, tango_interval  # noqa: E402

NS = (20, 30, 50, 100, 300, 1000)
DISCORDANCE = (0.0, 0.01, 0.05, 0.20)
ACCURACY = (0.1, 0.5, 0.9)
GAPS = (0.0, -0.02)  # "beats the base" and the default non-inferiority margin (decide.max_gap_points: 2)
WIDE = {"NS": (20, 30, 50, 100, 300), "DISCORDANCE": (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5), "ACCURACY": (0.5,),
        "GAPS": (0.0, -0.01, -0.02, -0.05, -0.1, -0.2, -0.3)}  # --wide: other margins, larger gaps


SKEWS = {"both": (False, True), "plain": (False,), "skew": (True,)}  # --interval: what stats uses, or one form


def tables(n: int, skews: tuple[bool, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every (only_a, only_b) an n-item comparison can give, with its interval."""
    only_a, only_b = (v.ravel() for v in np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij"))
    keep = only_a + only_b <= n
    only_a, only_b = only_a[keep], only_b[keep]
    low, high = tango_interval(only_a, only_b, n, skews)
    return only_a, only_b, low, high


def probabilities(n: int, only_a: np.ndarray, only_b: np.ndarray, p_only_a: float, p_only_b: float) -> np.ndarray:
    """Multinomial probability of each table when a single item is right only in a with p_only_a, only in b
    with p_only_b."""
    rest = n - only_a - only_b
    log_p = (gammaln(n + 1) - gammaln(only_a + 1) - gammaln(only_b + 1) - gammaln(rest + 1)
             + xlogy(only_a, p_only_a) + xlogy(only_b, p_only_b) + xlogy(rest, 1 - p_only_a - p_only_b))
    return np.exp(log_p)


def cells():
    """(n, discordance, accuracy of b, gap, share only a, share only b) for every cell that exists, once."""
    seen = set()
    for n, d, acc, gap in itertools.product(NS, DISCORDANCE, ACCURACY, GAPS):
        d = max(d, abs(gap))
        if (n, d, acc, gap) in seen:
            continue
        seen.add((n, d, acc, gap))
        p_only_a, p_only_b = (d + gap) / 2, (d - gap) / 2
        both = acc + gap - p_only_a  # right in both
        if both < -1e-12 or both + d > 1 + 1e-12:
            continue
        yield n, d, acc, gap, p_only_a, p_only_b


def binary_grid(skews: tuple[bool, ...] = SKEWS["both"]) -> list[dict]:
    out, enumerated = [], {}
    for n, d, acc, gap, p_only_a, p_only_b in cells():
        if n not in enumerated:
            enumerated[n] = tables(n, skews)
        only_a, only_b, low, high = enumerated[n]
        p = probabilities(n, only_a, only_b, p_only_a, p_only_b)
        out.append({"n": n, "discordance": d, "accuracy_b": acc, "gap": gap,
                    "claims_above": float(p[low > gap].sum()), "claims_below": float(p[high < gap].sum()),
                    "coverage": float(p[(low <= gap) & (gap <= high)].sum())})
    return out


def seeds_coverage(seeds: int, n: int = 100, replicates: int = 4000, seed: int = 0) -> float:
    """Coverage of paired_over_seeds' interval for the method-level gap (0) when between-seed spread is twice
    the item part of the mean's spread; b trained with as many seeds."""
    rng = np.random.default_rng(seed)
    seed_sd = 2 / math.sqrt(n)
    covered = 0
    for _ in range(replicates):
        item_gap = rng.normal(0, 1, n)  # the population gap is 0; this test set's is item_gap.mean()
        a = item_gap + rng.normal(0, seed_sd, (seeds, 1)) + rng.normal(0, 0.3, (seeds, n))
        b = rng.normal(0, seed_sd, (seeds, 1)) + rng.normal(0, 0.3, (seeds, n))
        low, high = paired_over_seeds(a.tolist(), b.tolist())["ci"]
        covered += low <= 0 <= high
    return covered / replicates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the grid as JSON here")
    parser.add_argument("--wide", action="store_true", help="gaps up to 30 points, discordance up to 50%%, accuracy 0.5")
    parser.add_argument("--interval", choices=SKEWS, default="both",
                        help="both: tuneoff's (the wider of the two); plain: Tango alone; skew: the corrected form alone")
    args = parser.parse_args()
    if args.wide:
        globals().update(WIDE)
    grid = binary_grid(SKEWS[args.interval])
    worst = max(grid, key=lambda c: max(c["claims_above"], c["claims_below"]))
    lowest = min(grid, key=lambda c: c["coverage"])
    seeds = {k: seeds_coverage(k) for k in (2, 3)}
    print(f"{len(grid)} cells; worst one-sided error {100 * max(worst['claims_above'], worst['claims_below']):.2f}% "
          f"at {worst}; lowest coverage {100 * lowest['coverage']:.2f}% at {lowest}")
    print("seeds: coverage " + ", ".join(f"{k} seeds {100 * c:.1f}%" for k, c in seeds.items()))
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(["benchmarks/interval_error.py", *sys.argv[1:]]),
                                        "interval": args.interval, "binary": grid,
                                        "seeds_coverage": seeds}, indent=1) + "\n")


if __name__ == "__main__":
    main()
