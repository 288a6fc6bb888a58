"""Paired intervals: exact values where they are known, and coverage by simulation."""

import random

import pytest

from tuneoff.decision import stats


def test_few_discordant_items_keep_an_honest_interval():
    # 300 items, 30 right in both, 2 right only in a: the docstring's example
    a = [True] * 32 + [False] * 268
    b = [True] * 30 + [False] * 270
    p = stats.paired_binary(a, b)
    assert p["diff"] == pytest.approx(2 / 300)
    assert p["ci"] == pytest.approx([-0.0062, 0.0209], abs=1e-4)
    assert (p["only_a"], p["only_b"]) == (2, 0) and p["p_value"] == pytest.approx(0.5)


def test_mcnemar_exact_p_value():
    a = [True] * 10 + [False] * 90
    b = [False] * 100
    assert stats.paired_binary(a, b)["p_value"] == pytest.approx(2 * 0.5**10)


def test_identical_scores_give_a_narrow_interval_around_zero():
    a = [i % 3 == 0 for i in range(300)]
    p = stats.paired_binary(a, a)
    assert p["diff"] == 0 and p["ci"][0] < 0 < p["ci"][1] and p["ci"][1] - p["ci"][0] < 0.02


def test_coverage_of_the_paired_interval_is_near_95_percent():
    rng = random.Random(0)
    covered = 0
    for _ in range(400):  # true difference 0.10 - 0.05 = 0.05, correlated pairs
        a, b = [], []
        for _ in range(200):
            u = rng.random()
            a.append(u < 0.10)
            b.append(u < 0.05)
        lo, hi = stats.paired_binary(a, b)["ci"]
        covered += lo <= 0.05 <= hi
    assert 0.92 <= covered / 400 <= 0.99


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


def test_non_inferiority_and_the_items_that_would_decide():
    assert stats.non_inferiority([-1.5, 1.0], 2.0) == "non-inferior"
    assert stats.non_inferiority([-5.0, -2.5], 2.0) == "inferior"
    assert stats.non_inferiority([-3.0, 0.5], 2.0) == "inconclusive"
    # difference -1 point with an interval of +-5 on 100 items, margin 2 points: the interval clears -2
    # once its half-width is under 1 point, at 100 x (5 / 1)^2 = 2,500 items
    assert stats.items_to_decide(-1.0, [-6.0, 4.0], 100, -2.0) == 2500
    assert stats.items_to_decide(-2.0, [-6.0, 2.0], 100, -2.0) is None
    # every item alike (no discordance) still needs the items that narrow the interval: 90 x (3.6 / 2)^2
    assert stats.items_to_decide(0.0, [-3.6, 3.6], 90, -2.0) == 292


def test_over_seeds_the_spread_between_runs_widens_the_interval():
    from tuneoff.decision.stats import paired_over_seeds

    n = 400
    reference = [[1.0 if i < 200 else 0.0 for i in range(n)]] * 3
    steady = [[1.0 if i < 240 else 0.0 for i in range(n)]] * 3  # +10 points on every seed
    shaky = [[1.0 if i < k else 0.0 for i in range(n)] for k in (160, 240, 320)]  # +10 on average, -10 to +30
    calm = paired_over_seeds(steady, reference, samples=2000, seed=0)
    wide = paired_over_seeds(shaky, reference, samples=2000, seed=0)
    assert calm["diff"] == pytest.approx(0.10) and wide["diff"] == pytest.approx(0.10)
    assert calm["ci"][0] > 0.06 and calm["ci"][1] < 0.14  # items only: about +-3.5 points
    assert wide["ci"][1] - wide["ci"][0] > 3 * (calm["ci"][1] - calm["ci"][0])  # the seeds disagree by 20 points
    assert calm["seeds"] == [3, 3] and calm["method"].startswith("two-level")
    with pytest.raises(ValueError, match="same, non-zero number of items"):
        paired_over_seeds([[1.0, 0.0]], [[1.0]], samples=10, seed=0)
