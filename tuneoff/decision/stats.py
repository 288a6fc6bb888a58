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
- Scores in [0, 1] (ROUGE-L, chrF, a judge's grade): a t interval on the per-item differences whose
  variance counts one pseudo-item at each end of their range (+1 and -1, the largest move such a score
  can make), widened where its Cornish-Fisher skewness-corrected form reaches further. The pseudo-items
  keep an honest width when most items tie or every item moved by the same amount (where the sample
  variance is 0); the skew correction holds the side a long tail of moves leans on
  (docs/statistics.md: the one-sided error at the margin, simulated).
- Unbounded continuous scores (the per-example loss of the reference answer): the mean difference with
  a BCa paired bootstrap interval (scipy.stats.bootstrap), evidence beside the verdict, never its basis.

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


def bounded_interval(d, pseudo: bool = True, skew: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The 95% interval for the mean of per-item differences d (last axis: items; each in [-1, 1]),
    vectorised over sets. The variance is the sample's with one pseudo-item at +1 and one at -1 added
    about the mean (so n + 1 degrees of freedom in the sum of squares: as Agresti and Min's pseudo-counts
    for paired 0/1 data, an honest width where most items tie); each bound is the further of the t
    interval's and the Cornish-Fisher corrected one's, mean - se (z -+ gamma (2 z^2 + 1) / (6 sqrt n)),
    gamma the skewness of the differences and their pseudo-items: a long tail of moves on one side
    leaves the mean's sampling distribution skewed, which a symmetric interval under-covers. `pseudo` and
    `skew` off give the plain t interval (a benchmark compares the forms)."""
    d = np.asarray(d, dtype=float)
    n = d.shape[-1]
    d2 = d * d
    s1, s2, s3 = d.sum(axis=-1), d2.sum(axis=-1), (d2 * d).sum(axis=-1)
    mean = s1 / n
    # central sums of squares and cubes about the mean, the pseudo-items +1 and -1 included
    squares = np.maximum(s2 - n * mean**2, 0.0) + pseudo * ((1 - mean) ** 2 + (1 + mean) ** 2)
    cubes = s3 - 3 * mean * s2 + 2 * n * mean**3 + pseudo * ((1 - mean) ** 3 + (-1 - mean) ** 3)
    items = n + 2 * pseudo
    se = np.sqrt(squares / (items - 1) / n)
    with np.errstate(divide="ignore", invalid="ignore"):
        gamma = np.where(squares > 0, cubes / items / (squares / items) ** 1.5, 0.0)
    half = scipy_stats.t.ppf((1 + LEVEL) / 2, max(n - 1, 1)) * se
    shift = skew * gamma * (2 * Z * Z + 1) / (6 * math.sqrt(n))
    return np.minimum(mean - half, mean - (Z - shift) * se), np.maximum(mean + half, mean + (Z + shift) * se)


def paired_scores(a: list[float], b: list[float]) -> dict:
    """a - b for scores in [0, 1] on the same items (ROUGE-L, chrF, a judge's grade): the mean difference,
    its 95% interval (bounded_interval), the per-item spread of a - b, how many items each scored higher
    on, and the t test's p at 0 with the interval's variance."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or not len(x):
        raise ValueError(f"paired scores need the same, non-zero number of items (got {len(x)} and {len(y)})")
    if ((x < 0) | (x > 1) | (y < 0) | (y > 1)).any():
        raise ValueError("paired_scores needs scores in [0, 1]")
    d = x - y
    n = len(d)
    low, high = bounded_interval(d)
    se = math.sqrt((((d - d.mean()) ** 2).sum() + (1 - d.mean()) ** 2 + (1 + d.mean()) ** 2) / (n + 1) / n)
    p_value = float(2 * scipy_stats.t.sf(abs(d.mean()) / se, max(n - 1, 1)))
    return {"n": n, "diff": float(d.mean()), "ci": [float(low), float(high)], "p_value": p_value,
            "sd": float(d.std(ddof=1)) if n > 1 else 0.0, "higher_a": int((d > 0).sum()),
            "higher_b": int((d < 0).sum()), "method": "t with range pseudo-items, skew-widened"}


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


def items_for_scores(diff: float, sd: float, bound: float, power: float = POWER) -> int:
    """Test items at which bounded_interval would lie wholly on the far side of `bound` with probability
    `power`, if a - b had this mean and per-item sd. The estimate spreads by sd / sqrt(n); the interval's
    half-width is about z sqrt(v / n), v = sd^2 + 2 (1 + diff^2) / n with its pseudo-items; so the smallest
    n with sqrt(n) |gap| >= z sqrt(v) + z_power sd (it grows with n: doubled, then halved down to it)."""
    gap = abs(diff - bound)
    if gap == 0:
        raise ValueError("the difference sits on the bound: no test set size has power against it")
    z_power = float(scipy_stats.norm.ppf(power))
    enough = lambda n: math.sqrt(n) * gap >= Z * math.sqrt(sd * sd + 2 * (1 + diff * diff) / n) + z_power * sd  # noqa: E731
    high = 2
    while not enough(high):
        high *= 2
    low = high // 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if enough(mid) else (mid, high)
    return high


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
