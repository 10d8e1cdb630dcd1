"""Confidence intervals for evaluation results: Wilson for pass rates, percentile bootstrap otherwise.

    wilson_ci(17, 24)                                   # 95 % interval of a pass rate 17/24
    bootstrap_ci([0.2, 0.9, 0.4])                       # 95 % interval of the mean
    bootstrap_ci_ratio(nll_sums, token_counts, transform=math.exp)   # perplexity, resampled by item

Bootstrap intervals are deterministic for a seed (numpy's `default_rng(seed)`), resample items with
replacement `n_boot` times and take the `alpha/2` and `1 - alpha/2` quantiles of the statistic
(numpy's default linear interpolation). Nothing is rounded; an empty input gives None.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean (the default statistic of `bootstrap_ci`, which vectorizes it)."""
    return float(np.mean(np.asarray(values, dtype=float)))


def wilson_ci(k: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """Wilson score interval of a binomial proportion k/n.

    Args:
        k: successes, 0 <= k <= n.
        n: trials, >= 0.
        z: normal quantile (1.96: about 95 %).
    Returns:
        (low, high) within [0, 1], low exactly 0.0 when k == 0 and high exactly 1.0 when k == n;
            None when n == 0.
    Raises:
        ValueError: n < 0, k outside [0, n], or z <= 0.
    """
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"wilson_ci needs 0 <= k <= n, got k={k}, n={n}")
    if not z > 0:
        raise ValueError(f"wilson_ci needs z > 0, got {z}")
    if n == 0:
        return None
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # The bounds at k == 0 and k == n are exactly 0 and 1; floating point leaves ~1e-17 otherwise.
    low = 0.0 if k == 0 else max(0.0, center - half)
    high = 1.0 if k == n else min(1.0, center + half)
    return low, high


def _check_boot(n_boot: int, alpha: float) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be an integer >= 1, got {n_boot!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")


def _interval(stats: np.ndarray, alpha: float) -> tuple[float, float]:
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def bootstrap_ci(values: Sequence[float], statistic: Callable[[np.ndarray], float] = mean, n_boot: int = 2000,
                 seed: int = 0, alpha: float = 0.05) -> tuple[float, float] | None:
    """Percentile bootstrap interval of `statistic(values)`.

    Args:
        values: one number per item.
        statistic: maps a resample (a 1-d float array) to a number; the default `mean` is computed
            for all resamples at once.
        n_boot: number of resamples, >= 1.
        seed: seed of numpy's `default_rng`; the same inputs and seed give the same interval.
        alpha: 1 - confidence level, in (0, 1).
    Returns:
        (low, high); None when `values` is empty.
    Raises:
        ValueError: n_boot < 1 or alpha outside (0, 1).
    """
    _check_boot(n_boot, alpha)
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return None
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    if statistic is mean:
        stats = x[idx].mean(axis=1)
    else:
        stats = np.array([statistic(x[row]) for row in idx], dtype=float)
    return _interval(stats, alpha)


def bootstrap_ci_ratio(num: Sequence[float], den: Sequence[float], n_boot: int = 2000, seed: int = 0,
                       alpha: float = 0.05, transform: Callable[[float], float] | None = None
                       ) -> tuple[float, float] | None:
    """Percentile bootstrap interval of `transform(sum(num) / sum(den))`, resampling items (pairs).

    For perplexity pass each item's summed negative log-likelihood as `num`, its token count as
    `den` and `transform=math.exp`: the point estimate is exp(sum nll / sum tokens).

    Args:
        num: numerator per item.
        den: denominator per item, every value > 0 (drop items with no tokens first).
        n_boot: number of resamples, >= 1.
        seed: seed of numpy's `default_rng`; the same inputs and seed give the same interval.
        alpha: 1 - confidence level, in (0, 1).
        transform: applied to each resample's ratio (a plain float) before the quantiles; None = identity.
    Returns:
        (low, high); None when the inputs are empty.
    Raises:
        ValueError: num and den differ in length, a den value is not > 0, n_boot < 1 or alpha outside (0, 1).
    """
    _check_boot(n_boot, alpha)
    a = np.asarray(num, dtype=float)
    b = np.asarray(den, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"num and den must be flat sequences of the same length, got {a.shape} and {b.shape}")
    if a.size == 0:
        return None
    bad = np.flatnonzero(~(b > 0))
    if bad.size:
        raise ValueError(f"every den value must be > 0; item {int(bad[0])} has {float(b[bad[0]])!r}")
    idx = np.random.default_rng(seed).integers(0, a.size, size=(n_boot, a.size))
    ratios = a[idx].sum(axis=1) / b[idx].sum(axis=1)
    if transform is not None:
        ratios = np.array([transform(float(r)) for r in ratios], dtype=float)
    return _interval(ratios, alpha)
