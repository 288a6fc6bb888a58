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

Scores in [0, 1] (ROUGE-L, chrF, a judge's grade; tuneoff.decision.stats.bounded_interval): simulated,
`--continuous`. Per item, a - b is 0 with the tie share (both models gave the same reply), otherwise a
move drawn from one of four shapes, shifted so that the mean over all items is exactly the bound:
symmetric (+-0.25 about its mean), skewed toward losses (85% small gains, 15% losses of 0.30-0.79),
skewed toward gains (its mirror image), symmetric being triangular, and piled at the ends (60% of moves a whole point, +1 or -1, as
when a reply scores 0 or 1; the rest within +-0.2). Grid: n in {30, 100, 300, 1000}, ties in {0, 50, 90%},
a - b on the bound (0 or -2 points); `replicates` test sets per cell.

    .venv/bin/python benchmarks/interval_error.py --out benchmarks/results/interval_error.json
    .venv/bin/python benchmarks/interval_error.py --wide --out benchmarks/results/interval_error_wide.json
    .venv/bin/python benchmarks/interval_error.py --continuous --out benchmarks/results/interval_error_continuous.json
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
from tuneoff.decision.stats import (  # noqa: E402
    bounded_interval,
    paired_over_seeds,
    tango_interval,
)

NS = (20, 30, 50, 100, 300, 1000)
DISCORDANCE = (0.0, 0.01, 0.05, 0.20)
ACCURACY = (0.1, 0.5, 0.9)
GAPS = (0.0, -0.02)  # "beats the base" and the default non-inferiority margin (decide.max_gap_points: 2)
WIDE = {"NS": (20, 30, 50, 100, 300), "DISCORDANCE": (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5), "ACCURACY": (0.5,),
        "GAPS": (0.0, -0.01, -0.02, -0.05, -0.1, -0.2, -0.3)}  # --wide: other margins, larger gaps


SKEWS = {"both": (False, True), "plain": (False,), "skew": (True,)}  # --interval: what stats uses, or one form
# --continuous --interval: bounded_interval's (pseudo-items, skew correction); plain = the t interval alone
CONTINUOUS_FORMS = {"both": (True, True), "plain": (False, False), "pseudo": (True, False), "skew": (False, True)}


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


CONTINUOUS = {"NS": (30, 100, 300, 1000), "TIES": (0.0, 0.5, 0.9), "GAPS": (0.0, -0.02),
              "SHAPES": ("symmetric", "skewed-loss", "skewed-gain", "piled")}
SKEWED_MEAN = 0.85 * 0.1 - 0.15 * (0.30 + 0.79) / 2  # 85% gains U(0, 0.2), 15% losses U(0.30, 0.79)


def differences(rng: np.random.Generator, shape: str, tie: float, gap: float, size: tuple[int, int]) -> np.ndarray:
    """a - b per item: 0 with probability `tie`, else a move drawn from `shape`, so that the mean is `gap`.
    One uniform picks tie / branch / sign, another the move's size (two draws per item keep it fast)."""
    u, v = rng.random(size), rng.random(size)
    mean = gap / (1 - tie)  # of the moves
    w = (u - tie) / (1 - tie)  # uniform on [0, 1) among the moved items
    if shape == "symmetric":  # mean +- 0.25, triangular
        move = mean + 0.25 * (w + v - 1)
    elif shape == "piled":  # 60% a whole point (+1 with the share that gives the mean), 40% within +-0.2
        up = (mean / 0.6 + 1) / 2
        move = np.where(w < 0.6, np.where(w < 0.6 * up, 1.0, -1.0), 0.4 * v - 0.2)
    else:
        sign = 1 if shape == "skewed-loss" else -1
        skewed = np.where(w < 0.15, -(0.30 + 0.49 * v), 0.2 * v)
        move = sign * (skewed - SKEWED_MEAN) + mean
    return np.where(u < tie, 0.0, move)


def continuous_grid(replicates: int = 10000, seed: int = 0, interval=bounded_interval) -> list[dict]:
    """Per cell: how often `interval` lies wholly above / below a - b's true mean (the bound), and covers it."""
    rng, out = np.random.default_rng(seed), []
    for n, tie, gap, shape in itertools.product(*CONTINUOUS.values()):
        low, high = interval(differences(rng, shape, tie, gap, (replicates, n)))
        out.append({"n": n, "ties": tie, "gap": gap, "shape": shape, "replicates": replicates,
                    "claims_above": float(np.mean(low > gap)), "claims_below": float(np.mean(high < gap)),
                    "coverage": float(np.mean((low <= gap) & (gap <= high))),
                    "mean_width_points": round(100 * float(np.mean(high - low)), 3)})
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
    parser.add_argument("--interval", choices=CONTINUOUS_FORMS, default="both",
                        help="both: tuneoff's (the wider of the two); plain: Tango alone; skew: the corrected form alone; "
                             "with --continuous: plain = the t interval, pseudo / skew = with one of its two parts")
    parser.add_argument("--continuous", action="store_true", help="scores in [0, 1]: the simulated grid")
    args = parser.parse_args()
    if args.continuous:
        pseudo, skew = CONTINUOUS_FORMS[args.interval]
        grid = continuous_grid(interval=lambda d: bounded_interval(d, pseudo, skew))
        worst = max(grid, key=lambda c: max(c["claims_above"], c["claims_below"]))
        lowest = min(grid, key=lambda c: c["coverage"])
        print(f"{len(grid)} cells; worst one-sided error {100 * max(worst['claims_above'], worst['claims_below']):.2f}% "
              f"at {worst}; lowest coverage {100 * lowest['coverage']:.2f}% at {lowest}")
        if args.out:
            args.out.write_text(json.dumps({"command": " ".join(["benchmarks/interval_error.py", *sys.argv[1:]]),
                                            "interval": args.interval, "continuous": grid}, indent=1) + "\n")
        return
    if args.wide:
        globals().update(WIDE)
    if args.interval == "pseudo":
        parser.error("--interval pseudo is a form of the continuous interval: add --continuous")
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
