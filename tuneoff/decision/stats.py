"""Paired comparisons of two models scored on the same test items, and what they can decide.

Every method is scored on the same test items, so the comparison is per item: most of the item-to-item
spread cancels, and the interval is far narrower than two independent intervals side by side.

- 0/1 scores (exact match, accuracy): the difference of proportions with Tango's score interval for
  paired data (Tango 1998, "Equivalence test and confidence interval for the difference in
  proportions for the paired-sample design"), widened on a side where its skewness-corrected form
  (Laud's SCAS, as ratesci's pairbinci) reaches further, and McNemar's test (the score test it inverts
  at 0). A score interval is the set of differences a score test does not reject, so it keeps its
  width when no item differs (20 items alike: +-16 points, not a point), where Newcombe's hybrid
  interval with the uncorrected correlation collapses. Plain Tango claims too much on the side the
  discordance leans away from (4.1% one-sided at n = 300 when every discordant item goes one way),
  the corrected form on the other; the wider of the two keeps both sides near 2.5%
  (docs/statistics.md: the error at the margin computed exactly over n, discordance and accuracy).
- Several training seeds: a t interval whose variance adds the item part (paired, over the items'
  seed-averaged differences) and each method's between-seed part, with Satterthwaite's degrees of
  freedom; with 2 seeds it is wide, as 2 training runs should leave it.
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
POWER = 0.80  # what "what would settle it" sizes a test set for
BISECTIONS = 45  # halvings of [-1, 1]: bounds to 2^-44


def tango_statistic(delta, only_a, only_b, n, skew: bool):
    """Tango's score statistic for H0: a - b = delta from the discordant counts (arrays broadcast), and
    with `skew` its skewness-corrected form (Laud's SCAS: minus gamma (z^2 - 1) / 6, gamma the score's
    skewness at the restricted estimate). It falls as delta rises."""
    a = 2 * n
    b = -only_a - only_b + (2 * n - only_a + only_b) * delta
    c = -only_b * delta * (1 - delta)
    p21 = (np.sqrt(np.maximum(b * b - 4 * a * c, 0.0)) - b) / (2 * a)  # restricted MLE of P(right only in b)
    p12 = p21 + delta
    variance = p12 + p21 - delta**2  # of one item's (a - b), under H0
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (only_a - only_b - n * delta) / np.sqrt(n * variance)
        if not skew:
            return t
        third = p12 * (1 - delta) ** 3 + p21 * (-1 - delta) ** 3 + (1 - p12 - p21) * (-delta) ** 3
        corrected = t - third / (variance**1.5 * np.sqrt(n)) * (Z * Z - 1) / 6
    return np.where(np.isfinite(corrected), corrected, t)


def tango_interval(only_a, only_b, n, skews: tuple[bool, ...] = (False, True)) -> tuple[np.ndarray, np.ndarray]:
    """The 95% interval for a - b, vectorised over tables: each bound the widest of Tango's score
    interval and its skewness-corrected form (`skews` picks which: both unless a benchmark compares
    them), so a one-sided claim needs both. Each bound is found by bisection between the estimate and
    -1 or +1, where the statistic is +-inf."""
    only_a, only_b, n = (np.asarray(v, dtype=float) for v in np.broadcast_arrays(only_a, only_b, n))
    estimate = (only_a - only_b) / n
    low, high = np.full_like(estimate, np.inf), np.full_like(estimate, -np.inf)
    for skew in skews:
        for side, edge in ((+1, -1.0), (-1, 1.0)):  # lower: the statistic = z below the estimate; upper: -z above
            inside, outside = estimate.copy(), np.full_like(estimate, edge)
            for _ in range(BISECTIONS):
                mid = (inside + outside) / 2
                rejected = side * tango_statistic(mid, only_a, only_b, n, skew) > Z
                outside, inside = np.where(rejected, mid, outside), np.where(rejected, inside, mid)
            if side > 0:  # the rejected end: each bound rounded outwards
                low = np.minimum(low, outside)
            else:
                high = np.maximum(high, outside)
    return low, high


def paired_binary(a: list[bool], b: list[bool]) -> dict:
    """a - b for 0/1 scores on the same items: the difference, its 95% interval and McNemar's p: the score
    test the interval inverts at 0 (both of its statistics are (only_a - only_b) / sqrt(only_a + only_b)
    there), so p < 0.05 exactly when the interval excludes 0."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired scores need the same, non-zero number of items (got {len(a)} and {len(b)})")
    n = len(a)
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    low, high = tango_interval(only_a, only_b, n)
    discordant = only_a + only_b
    p_value = float(2 * scipy_stats.norm.sf(abs(only_a - only_b) / math.sqrt(discordant))) if discordant else 1.0
    return {"n": n, "diff": (only_a - only_b) / n, "ci": [float(low), float(high)], "p_value": p_value,
            "only_a": only_a, "only_b": only_b, "method": "tango-paired-score"}


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


def paired_over_seeds(a: list[list[float]], b: list[list[float]]) -> dict:
    """a - b when each method was trained with several seeds (a[s][i]: seed s's score on item i; the
    same items for every seed of both; b may be one run, the untuned base): the mean over items and
    seeds, and a t interval about the methods, not about these trained models. Its variance adds the
    items' part (the variance over items of the seed-averaged difference, / n) and each method's
    between-seed part (the variance of its per-seed means, / seeds); the degrees of freedom are
    Satterthwaite's, so with 2 or 3 seeds that disagree the interval is as wide as they leave it."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or not x.shape[1]:
        raise ValueError(f"seed x item scores need the same, non-zero number of items (got {x.shape} and {y.shape})")
    n = x.shape[1]
    per_item = x.mean(axis=0) - y.mean(axis=0)
    parts = [(per_item.var(ddof=1) / n if n > 1 else 0.0, n - 1)]
    parts += [(runs.mean(axis=1).var(ddof=1) / len(runs), len(runs) - 1) for runs in (x, y) if len(runs) > 1]
    variance = sum(v for v, _ in parts)
    df = variance**2 / sum(v**2 / d for v, d in parts if v > 0) if variance > 0 else math.inf
    half = float(scipy_stats.t.ppf((1 + LEVEL) / 2, df)) * math.sqrt(variance) if variance > 0 else 0.0
    diff = float(per_item.mean())
    return {"n": n, "seeds": [len(x), len(y)], "diff": diff, "ci": [diff - half, diff + half], "df": df,
            "method": "t (items + seeds, Satterthwaite)"}


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


def items_for_power(only_a: float, only_b: float, bound: float, power: float = POWER) -> int:
    """Test items at which Tango's interval would lie wholly on the far side of `bound` with probability
    `power`, if a - b were what these shares of discordant items say (only_a, only_b: fractions of the
    items right only in a, only in b). The statistic at `bound` is about normal, with mean
    sqrt(n) x gap / sd0 (sd0: its null spread, at the restricted estimate) and spread sd1 / sd0 (sd1:
    the per-item spread of a - b), so n = ((z sd0 + z_power sd1) / gap)^2."""
    gap = only_a - only_b - bound
    if gap == 0:
        raise ValueError("the difference sits on the bound: no test set size has power against it")
    b = -only_a - only_b + (2 - only_a + only_b) * bound
    c = -only_b * bound * (1 - bound)
    p21 = (math.sqrt(max(b * b - 8 * c, 0.0)) - b) / 4
    sd0 = math.sqrt(max(2 * p21 + bound * (1 - bound), 0.0))
    sd1 = math.sqrt(max(only_a + only_b - (only_a - only_b) ** 2, 0.0))
    return math.ceil(((Z * sd0 + float(scipy_stats.norm.ppf(power)) * sd1) / abs(gap)) ** 2)
