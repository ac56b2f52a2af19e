"""Bradley-Terry Elo and bootstrap intervals (evaluation/elo.py)."""

import math
import random

import pytest

from constitutional.evaluation.elo import (
    bootstrap_elo,
    bootstrap_mean,
    bootstrap_paired_difference,
    elo_win_probability,
    fit_bradley_terry,
)


def _simulate(true_elo, per_pair, seed=0, soft=False):
    rng = random.Random(seed)
    comps = []
    for i in range(len(true_elo)):
        for j in range(i + 1, len(true_elo)):
            p = elo_win_probability(true_elo[i] - true_elo[j])
            for k in range(per_pair):
                outcome = p if soft else float(rng.random() < p)
                comps.append((i, j, outcome, f"prompt-{k}"))
    return comps


def test_fit_recovers_known_ratings_from_simulated_hard_comparisons():
    true_elo = [0.0, 120.0, -80.0, 250.0, 40.0]
    comps = _simulate(true_elo, per_pair=1500)
    fitted = fit_bradley_terry([c[:3] for c in comps], len(true_elo), anchor=0, prior=0.0)
    for got, want in zip(fitted, true_elo, strict=True):
        assert abs(got - want) < 25, (list(fitted), true_elo)


def test_fit_recovers_ratings_exactly_from_soft_labels():
    true_elo = [0.0, -150.0, 60.0]
    comps = _simulate(true_elo, per_pair=3, soft=True)
    fitted = fit_bradley_terry([c[:3] for c in comps], 3, prior=0.0)
    assert fitted == pytest.approx(true_elo, abs=0.5)


def test_anchor_is_zero_and_prior_keeps_a_clean_sweep_finite():
    comps = [(1, 0, 1.0)] * 30
    fitted = fit_bradley_terry(comps, 2, anchor=0, prior=0.01)
    assert fitted[0] == 0.0 and 0 < fitted[1] < 2000 and math.isfinite(fitted[1])


def test_bootstrap_interval_covers_the_truth_and_shrinks_with_more_prompts():
    true_elo = [0.0, 100.0]
    small = bootstrap_elo(_simulate(true_elo, per_pair=40, seed=1), 2, samples=300)
    large = bootstrap_elo(_simulate(true_elo, per_pair=800, seed=1), 2, samples=300)
    assert small["low"][1] <= small["elo"][1] <= small["high"][1]
    assert large["low"][1] < 100 < large["high"][1]
    assert (large["high"][1] - large["low"][1]) < (small["high"][1] - small["low"][1]) / 2


def test_bootstrap_mean_and_paired_difference():
    rate, low, high = bootstrap_mean([1] * 30 + [0] * 70, samples=2000)
    assert rate == 0.3 and 0.2 < low < 0.3 < high < 0.4
    diff, low, high = bootstrap_paired_difference([1] * 50, [0] * 25 + [1] * 25)
    assert diff == 0.5 and low > 0.3 and high < 0.7
    assert all(math.isnan(x) for x in bootstrap_mean([]))
    with pytest.raises(ValueError):
        bootstrap_paired_difference([1], [1, 0])
