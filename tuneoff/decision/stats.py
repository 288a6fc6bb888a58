"""Paired comparisons of two models scored on the same test items, and what they can decide.

Every method is scored on the same items, so the comparison is per item: most of the item-to-item
spread cancels, and the interval is far narrower than two independent intervals side by side.

- 0/1 scores (exact match, accuracy): the difference of proportions with Newcombe's hybrid score
  interval for paired data (Newcombe 1998, "Improved confidence intervals for the difference
  between binomial proportions based on paired data", method 10), and the exact McNemar test on
  the discordant items. Unlike a bootstrap it stays honest when few items disagree: of 300 items,
  2 right only in a and none only in b give a percentile bootstrap interval of [0, +1.7] points,
  and this one [-0.6, +2.1] (tests/test_stats.py).
- Continuous scores (the per-example loss of the reference answer): the mean difference with a
  BCa paired bootstrap interval (scipy.stats.bootstrap).

Differences are `a - b`, in the score's own units (fractions for 0/1 scores).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as scipy_stats

LEVEL = 0.95
Z = 1.959963984540054  # two-sided 95% normal quantile


def wilson(successes: int, n: int, z: float = Z) -> tuple[float, float]:
    """Wilson score interval of a proportion."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_binary(a: list[bool], b: list[bool]) -> dict:
    """a - b for 0/1 scores on the same items: the difference, its 95% interval and the exact McNemar p."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired scores need the same, non-zero number of items (got {len(a)} and {len(b)})")
    n = len(a)
    both = sum(x and y for x, y in zip(a, b))
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    neither = n - both - only_a - only_b
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    (l1, u1), (l2, u2) = wilson(both + only_a, n), wilson(both + only_b, n)
    denominator = (both + only_a) * (neither + only_b) * (both + only_b) * (neither + only_a)
    phi = (both * neither - only_a * only_b) / math.sqrt(denominator) if denominator else 0.0
    diff = p1 - p2
    low = diff - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = diff + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    discordant = only_a + only_b
    p_value = float(scipy_stats.binomtest(only_a, discordant).pvalue) if discordant else 1.0
    return {"n": n, "diff": diff, "ci": [max(-1.0, low), min(1.0, high)], "p_value": p_value,
            "only_a": only_a, "only_b": only_b, "method": "newcombe-paired-score"}


def paired_mean(a: list[float], b: list[float], samples: int, seed: int) -> dict:
    """a - b for continuous scores on the same items: the mean difference and its BCa paired bootstrap interval."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or not len(x):
        raise ValueError(f"paired scores need the same, non-zero number of items (got {len(x)} and {len(y)})")
    d = x - y
    diff = float(d.mean())
    if np.ptp(d) == 0:  # every item moved by the same amount: no spread to resample
        low = high = diff
    else:
        ci = scipy_stats.bootstrap((x, y), lambda u, v, axis=-1: (u - v).mean(axis=axis), paired=True,
                                   vectorized=True, n_resamples=samples, confidence_level=LEVEL, method="BCa",
                                   rng=np.random.default_rng(seed)).confidence_interval
        low, high = float(ci.low), float(ci.high)
    return {"n": len(d), "diff": diff, "ci": [low, high], "method": "bca-paired-bootstrap"}


def paired_over_seeds(a: list[list[float]], b: list[list[float]], samples: int, seed: int) -> dict:
    """a - b when each method was trained with several seeds (a[s][i]: seed s's score on item i; the
    same items for every seed of both): the mean difference over items and seeds, and a two-level
    percentile bootstrap interval that resamples the items (paired, as one test set) and, apart for
    each method, its seeds, so the spread between training runs widens it as it should."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or not x.shape[1]:
        raise ValueError(f"seed x item scores need the same, non-zero number of items (got {x.shape} and {y.shape})")
    rng = np.random.default_rng(seed)
    n = x.shape[1]
    items = rng.integers(0, n, size=(samples, n))
    runs_a = rng.integers(0, len(x), size=(samples, len(x)))
    runs_b = rng.integers(0, len(y), size=(samples, len(y)))
    # per replicate: the chosen seeds' mean score on each chosen item, a minus b, averaged over items
    per_item_a = x[runs_a].mean(axis=1)  # samples x n
    per_item_b = y[runs_b].mean(axis=1)
    diffs = np.take_along_axis(per_item_a - per_item_b, items, axis=1).mean(axis=1)
    low, high = np.quantile(diffs, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return {"n": n, "seeds": [len(x), len(y)], "diff": float(x.mean() - y.mean()), "ci": [float(low), float(high)],
            "method": "two-level-bootstrap (items, seeds)"}


def above(ci: list[float], bound: float) -> bool:
    return ci[0] > bound


def below(ci: list[float], bound: float) -> bool:
    return ci[1] < bound


def non_inferiority(ci: list[float], margin: float) -> str:
    """For (challenger - reference) with a margin: "non-inferior" when the whole interval lies above
    -margin, "inferior" when it lies wholly below, else "inconclusive"."""
    if above(ci, -margin):
        return "non-inferior"
    if below(ci, -margin):
        return "inferior"
    return "inconclusive"


def items_to_decide(diff: float, ci: list[float], n: int, bound: float) -> int | None:
    """Test items at which an interval like `ci` (on n items) around the same difference would lie
    wholly on one side of `bound`, at the spread this run observed: the interval narrows as 1/sqrt(n),
    so n x (half-width / distance to the bound)^2. None when the difference sits on the bound itself."""
    distance = abs(diff - bound)
    if distance < 1e-9:
        return None
    half_width = (ci[1] - ci[0]) / 2
    return max(n, math.ceil(n * (half_width / distance) ** 2))
