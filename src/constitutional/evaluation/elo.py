"""Bradley-Terry ratings (reported as Elo) and bootstrap intervals, as pure functions.

The paper (Bai et al. 2022, section 2.1 and Figures 2, 3 and 8) reports harmlessness and
helpfulness as Elo scores computed from pairwise comparisons of model snapshots. Here a
comparison is ``(i, j, p, group)``: snapshot ``i`` beat snapshot ``j`` with probability ``p``
(a judge's soft label, or 1/0 for a hard win), on the prompt ``group``. The Bradley-Terry
model says P(i beats j) = sigmoid(r_i - r_j); the ratings maximise the soft log-likelihood

    sum over comparisons of  p log sigmoid(r_i - r_j) + (1 - p) log sigmoid(r_j - r_i)
    - (prior / 2) * sum_k r_k^2

(a weak Gaussian prior keeps the ratings finite when one snapshot wins every comparison),
with the anchor snapshot fixed at 0. Elo = r * 400 / ln 10, so 100 Elo points mean the better
snapshot wins about 64% of comparisons. Intervals come from a cluster bootstrap over prompts:
all comparisons on a resampled prompt are kept together, since they share its difficulty.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

ELO_PER_LOGIT = 400 / math.log(10)


def elo_win_probability(elo_diff: float) -> float:
    """P(win) of a snapshot rated ``elo_diff`` points above another.

    >>> round(elo_win_probability(0.0), 3), round(elo_win_probability(100.0), 3)
    (0.5, 0.64)
    """
    return 1 / (1 + 10 ** (-elo_diff / 400))


def fit_bradley_terry(comparisons: Sequence[tuple[int, int, float]], n_items: int, anchor: int = 0,
                      prior: float = 0.01, iterations: int = 100) -> np.ndarray:
    """Ratings in Elo points (anchor = 0) from soft comparisons ``(i, j, p_i_beats_j)``.

    Newton's method on the penalised log-likelihood (concave, so it converges fast).

    >>> r = fit_bradley_terry([(0, 1, 0.64)] * 50, 2)
    >>> round(float(r[1]))  # item 1 loses 64% of the time: about 100 points below item 0
    -100
    """
    if n_items < 1:
        raise ValueError("no items to rate")
    comps = np.asarray([(i, j, p) for i, j, p in comparisons], dtype=float).reshape(-1, 3)
    i_idx, j_idx, p = comps[:, 0].astype(int), comps[:, 1].astype(int), comps[:, 2]
    free = [k for k in range(n_items) if k != anchor]
    position = {k: n for n, k in enumerate(free)}
    r = np.zeros(n_items)
    for _ in range(iterations):
        d = r[i_idx] - r[j_idx]
        s = 1 / (1 + np.exp(-d))
        resid = p - s  # d loglik / d r_i for each comparison
        weight = s * (1 - s)
        grad = np.zeros(n_items)
        np.add.at(grad, i_idx, resid)
        np.add.at(grad, j_idx, -resid)
        grad -= prior * r
        hess = np.zeros((n_items, n_items))
        np.add.at(hess, (i_idx, i_idx), weight)
        np.add.at(hess, (j_idx, j_idx), weight)
        np.add.at(hess, (i_idx, j_idx), -weight)
        np.add.at(hess, (j_idx, i_idx), -weight)
        hess += prior * np.eye(n_items)
        if not free:
            break
        sub = hess[np.ix_(free, free)]
        step = np.linalg.solve(sub, grad[free])
        for k in free:
            r[k] += step[position[k]]
        if np.max(np.abs(step)) < 1e-9:
            break
    return (r - r[anchor]) * ELO_PER_LOGIT


def bootstrap_elo(comparisons: Sequence[tuple[int, int, float, str]], n_items: int, anchor: int = 0,
                  samples: int = 1000, seed: int = 0, prior: float = 0.01) -> dict:
    """Elo per item with a 95% cluster-bootstrap interval over the comparisons' groups (prompts).

    Returns ``{"elo": [...], "low": [...], "high": [...]}`` (lists of length ``n_items``).

    >>> comps = [(0, 1, 0.7, f"q{k}") for k in range(20)]
    >>> out = bootstrap_elo(comps, 2, samples=50)
    >>> out["elo"][0], out["elo"][1] < 0, out["low"][1] <= out["elo"][1] <= out["high"][1]
    (0.0, True, True)
    """
    groups: dict[str, list[tuple[int, int, float]]] = {}
    for i, j, p, g in comparisons:
        groups.setdefault(g, []).append((i, j, p))
    keys = sorted(groups)
    point = fit_bradley_terry([c for k in keys for c in groups[k]], n_items, anchor, prior)
    rng = np.random.default_rng(seed)
    draws = np.empty((samples, n_items))
    for b in range(samples):
        picked = rng.integers(0, len(keys), len(keys)) if keys else []
        draws[b] = fit_bradley_terry([c for k in picked for c in groups[keys[k]]], n_items, anchor, prior)
    low, high = np.percentile(draws, [2.5, 97.5], axis=0) if samples else (point, point)
    return {"elo": [round(float(x), 2) for x in point], "low": [round(float(x), 2) for x in low],
            "high": [round(float(x), 2) for x in high]}


def bootstrap_mean(values: Sequence[float], samples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its 95% percentile-bootstrap interval.

    For 0/1 flags this is a rate. An empty input gives NaNs.

    >>> bootstrap_mean([1, 0, 1, 1])[0]
    0.75
    >>> bootstrap_mean([1, 1, 1])
    (1.0, 1.0, 1.0)
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, (samples, x.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return (round(float(x.mean()), 4), round(float(low), 4), round(float(high), 4))


def wilson_rate(flags: Sequence[float], z: float = 1.959964) -> tuple[float, float, float]:
    """(rate, low, high): the share of 1s among 0/1 flags and its 95% Wilson score interval, which, unlike a
    bootstrap or normal interval, does not collapse to a point at 0% or 100%. An empty input gives NaNs.

    >>> wilson_rate([1, 1, 1])
    (1.0, 0.4385, 1.0)
    >>> wilson_rate([0] * 20)
    (0.0, 0.0, 0.1611)
    >>> wilson_rate([1, 0, 1, 1])
    (0.75, 0.3006, 0.9544)
    """
    n = len(flags)
    if n == 0:
        return (math.nan, math.nan, math.nan)
    p = sum(flags) / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (round(p, 4), round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4))


def bootstrap_paired_difference(a: Sequence[float], b: Sequence[float], samples: int = 2000,
                                seed: int = 0) -> tuple[float, float, float]:
    """(mean of a - b, low, high) over paired observations (the same prompts), 95% bootstrap.

    >>> bootstrap_paired_difference([1, 1, 0, 1], [0, 1, 0, 0])[0]
    0.5
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    return bootstrap_mean([x - y for x, y in zip(a, b, strict=True)], samples, seed)
