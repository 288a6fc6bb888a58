"""Paired intervals: exact values where they are known, the level they hold where the verdict uses them
(benchmarks/interval_error.py, computed exactly), and the power "what would settle it" promises."""

import importlib.util
import random
from statistics import NormalDist

import numpy as np
import pytest
from conftest import ROOT

from tuneoff.decision import stats

_spec = importlib.util.spec_from_file_location("interval_error", ROOT / "benchmarks/interval_error.py")
interval_error = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(interval_error)


def test_few_discordant_items_keep_an_honest_interval():
    # 300 items, 30 right in both, 2 right only in a
    a = [True] * 32 + [False] * 268
    b = [True] * 30 + [False] * 270
    p = stats.paired_binary(a, b)
    assert p["diff"] == pytest.approx(2 / 300)
    assert p["ci"][0] < 0 < p["ci"][1] and p["ci"][1] < 0.03
    assert (p["only_a"], p["only_b"]) == (2, 0) and p["p_value"] == pytest.approx(0.1573, abs=1e-4)


@pytest.mark.parametrize("only_a, only_b", [(10, 0), (4, 0), (3, 1), (12, 4)])
def test_mcnemar_p_value_agrees_with_the_interval_at_zero(only_a, only_b):
    a = [True] * only_a + [False] * only_b + [False] * 80
    b = [False] * only_a + [True] * only_b + [False] * 80
    p = stats.paired_binary(a, b)
    assert p["p_value"] == pytest.approx(2 * (1 - NormalDist().cdf((only_a - only_b) / (only_a + only_b) ** 0.5)))
    assert (p["p_value"] < 0.05) == (p["ci"][0] > 0)


@pytest.mark.parametrize("n", [20, 90, 300])
def test_identical_scores_keep_the_width_of_n_items(n):
    # no item differs: Tango's bound solves n d / (1 - d) = z^2, so d = z^2 / (n + z^2): +-16.1 points on 20
    # items, +-4.1 on 90 (the default run's iso_codes), +-1.3 on 300; it never collapses to a point
    a = [i % 2 == 0 for i in range(n)]
    p = stats.paired_binary(a, a)
    honest = stats.Z**2 / (n + stats.Z**2)
    assert p["diff"] == 0 and p["ci"] == pytest.approx([-honest, honest], abs=1e-9)


def test_the_score_bound_is_where_the_statistic_reaches_z():
    # Newcombe's table (both 59, only a 6, only b 16, neither 80): each bound is a root of its statistic
    low, high = stats.tango_interval(6, 16, 161)
    plain = [float(stats.tango_statistic(x, 6, 16, 161, skew=False)) for x in (low, high)]
    skewed = [float(stats.tango_statistic(x, 6, 16, 161, skew=True)) for x in (low, high)]
    # the lower bound is the further of the two roots: one statistic is z there, the other already beyond it
    assert min(plain[0], skewed[0]) == pytest.approx(stats.Z, abs=1e-6) and max(plain[0], skewed[0]) > stats.Z
    assert max(plain[1], skewed[1]) == pytest.approx(-stats.Z, abs=1e-6) and min(plain[1], skewed[1]) < -stats.Z
    assert low == pytest.approx(-0.1240, abs=1e-4) and high == pytest.approx(-0.0054, abs=1e-4)


def test_the_interval_holds_its_level_where_the_verdict_uses_it():
    """Exact, not sampled: every table n items can give, weighted by its multinomial probability, over
    n in {20..1000}, 0-20% of items discordant, accuracy 0.1/0.5/0.9, a - b on the bound (0, or the 2-point
    margin). A claim on either side of the bound is wrong at most 2.5% of the time, plus the oscillation
    of an asymptotic interval around its level with n (worst cell 2.66%, n = 300; a 10,000-set simulation
    could not tell it from 2.5%: SE 0.16%). Two-sided coverage at least 93%."""
    grid = interval_error.binary_grid()
    assert len(grid) > 100
    worst = max(grid, key=lambda c: max(c["claims_above"], c["claims_below"]))
    assert max(worst["claims_above"], worst["claims_below"]) <= 0.0270, worst
    assert min(c["coverage"] for c in grid) >= 0.93
    at_margin = [c for c in grid if c["gap"] == -0.02 and c["n"] <= 50]  # small n, few discordant: held too
    assert at_margin and max(c["claims_above"] for c in at_margin) <= 0.025


@pytest.mark.parametrize("seeds", [2, 3])
def test_the_seed_interval_covers_the_method_with_few_seeds(seeds):
    # between-seed spread twice the item sampling spread: 2 or 3 seeds must still cover 93%
    assert interval_error.seeds_coverage(seeds, replicates=2000) >= 0.93


@pytest.mark.parametrize("only_a, only_b, bound", [(0.03, 0.01, -0.02), (0.01, 0.06, -0.02), (0.06, 0.0, 0.0),
                                                   (0.10, 0.08, -0.02)])
def test_what_would_settle_it_has_80_percent_power(only_a, only_b, bound):
    """At the items `items_for_power` names, simulated test sets with these shares decide (the interval
    wholly on the far side of the bound) at least 75% of the time; above 80% where every discordant item
    goes one way (the normal approximation asks for more items there than needed), never absurdly so."""
    n = stats.items_for_power(only_a, only_b, bound)
    rng = np.random.default_rng(0)
    counts = rng.multinomial(n, [only_a, only_b, 1 - only_a - only_b], size=4000)
    low, high = stats.tango_interval(counts[:, 0], counts[:, 1], n)
    decided = np.mean(low > bound) if only_a - only_b > bound else np.mean(high < bound)
    assert 0.75 <= decided <= 0.97, (n, decided)


def test_paired_mean_interval_covers_a_known_shift():
    rng = random.Random(1)
    b = [rng.gauss(2.0, 1.0) for _ in range(300)]
    a = [x - 0.1 + rng.gauss(0, 0.05) for x in b]  # a is 0.1 lower on every item, with a little noise
    p = stats.paired_mean(a, b, samples=1000, seed=0)
    assert p["ci"][0] < -0.1 < p["ci"][1] and p["ci"][1] - p["ci"][0] < 0.03


def test_paired_mean_with_no_spread_is_exact():
    p = stats.paired_mean([1.0, 2.0, 3.0], [0.5, 1.5, 2.5], samples=200, seed=0)
    assert p["diff"] == 0.5 and p["ci"] == [0.5, 0.5]


def test_unpaired_lengths_are_refused():
    with pytest.raises(ValueError, match="same, non-zero number of items"):
        stats.paired_binary([True], [True, False])


def test_non_inferiority():
    assert stats.non_inferiority([-1.5, 1.0], 2.0) == "non-inferior"
    assert stats.non_inferiority([-5.0, -2.5], 2.0) == "inferior"
    assert stats.non_inferiority([-3.0, 0.5], 2.0) == "inconclusive"


def test_over_seeds_the_spread_between_runs_widens_the_interval():
    from tuneoff.decision.stats import paired_over_seeds

    n = 400
    reference = [[1.0 if i < 200 else 0.0 for i in range(n)]] * 3
    steady = [[1.0 if i < 240 else 0.0 for i in range(n)]] * 3  # +10 points on every seed
    shaky = [[1.0 if i < k else 0.0 for i in range(n)] for k in (160, 240, 320)]  # +10 on average, -10 to +30
    calm = paired_over_seeds(steady, reference)
    wide = paired_over_seeds(shaky, reference)
    assert calm["diff"] == pytest.approx(0.10) and wide["diff"] == pytest.approx(0.10)
    assert calm["ci"][0] > 0.06 and calm["ci"][1] < 0.14  # items only: about +-3 points
    # 3 seeds 20 points apart: sd of their mean 11.5 points, t with about 2 degrees of freedom (4.3): about +-50
    assert wide["ci"][0] < -0.3 and wide["ci"][1] > 0.5 and wide["df"] < 3
    assert calm["seeds"] == [3, 3] and calm["method"].startswith("t ")
    with pytest.raises(ValueError, match="same, non-zero number of items"):
        paired_over_seeds([[1.0, 0.0]], [[1.0]])


def test_the_interval_for_scores_in_0_1_holds_its_level():
    """Simulated (benchmarks/interval_error.py --continuous, 2,000 sets a cell here, 10,000 there): n in
    {30..1000}, 0/50/90% of items tied, moves symmetric, skewed either way or piled at a whole point,
    a - b on the bound (0, or the 2-point margin). Each side's claim is wrong at most 2.5% of the time
    plus 3 Monte Carlo standard errors (0.35 points at 2,000 sets); two-sided coverage at least 93%."""
    grid = interval_error.continuous_grid(replicates=2000, seed=1)
    assert len(grid) == 96
    worst = max(grid, key=lambda c: max(c["claims_above"], c["claims_below"]))
    assert max(worst["claims_above"], worst["claims_below"]) <= 0.025 + 3 * (0.025 * 0.975 / 2000) ** 0.5, worst
    assert min(c["coverage"] for c in grid) >= 0.93


def test_the_plain_t_interval_fails_where_most_items_tie():
    # what the pseudo-items are for: 30 items, 90% tied, losses skewed: plain t claims non-inferiority ~30% of the time
    rng = np.random.default_rng(0)
    d = interval_error.differences(rng, "skewed-loss", 0.9, -0.02, (2000, 30))
    plain, honest = stats.bounded_interval(d, pseudo=False, skew=False), stats.bounded_interval(d)
    assert np.mean(plain[0] > -0.02) > 0.2 and np.mean(honest[0] > -0.02) <= 0.025


@pytest.mark.parametrize("n", [30, 300])
def test_identical_replies_keep_an_honest_width(n):
    # every reply the same (all items tie) or every item moved by the same amount: the sample variance is
    # 0, the pseudo-items keep the width n items allow: t x sqrt(2 / ((n + 1) n)), +-9.5 points at 30, +-0.9 at 300
    scores = [i % 7 / 7 for i in range(n)]
    same = stats.paired_scores(scores, scores)
    half = float(stats.scipy_stats.t.ppf(0.975, n - 1)) * (2 / ((n + 1) * n)) ** 0.5
    assert same["diff"] == 0 and same["ci"] == pytest.approx([-half, half], abs=1e-9) and same["p_value"] == 1.0
    moved = stats.paired_scores([min(x + 0.1, 1) for x in scores[: n // 2]] * 2, [x for x in scores[: n // 2]] * 2)
    assert moved["ci"][0] < moved["diff"] - 0.9 * half and moved["ci"][1] > moved["diff"] + 0.9 * half
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        stats.paired_scores([1.5], [1.0])


@pytest.mark.parametrize("shape, ties, mean, bound", [("symmetric", 0.5, 0.02, 0.0), ("skewed-loss", 0.0, 0.0, -0.02),
                                                      ("piled", 0.5, -0.06, -0.02), ("skewed-gain", 0.9, 0.03, 0.0)])
def test_what_would_settle_a_score_has_80_percent_power(shape, ties, mean, bound):
    """At the items `items_for_scores` names for this mean and per-item sd, simulated test sets decide (the
    interval wholly on the far side of the bound) 75-95% of the time: more than 80% where moves are rare and
    skewed (the normal approximation then asks for more items than needed), never absurdly so."""
    rng = np.random.default_rng(0)
    sd = float(interval_error.differences(rng, shape, ties, mean, (1, 200_000)).std())
    n = stats.items_for_scores(mean, sd, bound)
    low, high = stats.bounded_interval(interval_error.differences(rng, shape, ties, mean, (3000, n)))
    decided = np.mean(low > bound) if mean > bound else np.mean(high < bound)
    assert 0.75 <= decided <= 0.95, (n, decided)
