"""Tests of stage1_core.infra.stats: Wilson against known values, bootstrap determinism and coverage of
the point estimate, ratio bootstrap (perplexity), empty and invalid inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stage1_core.infra.stats import bootstrap_ci, bootstrap_ci_ratio, mean, wilson_ci


@pytest.mark.parametrize(("k", "n", "low", "high"), [
    (5, 10, 0.2366, 0.7634),
    (0, 10, 0.0, 0.2775),
    (10, 10, 0.7225, 1.0),
    (1, 1, 0.2065, 1.0),
    (81, 263, 0.2553, 0.3662),  # Wilson (1927) / Newcombe (1998) worked example
])
def test_wilson_known_values(k: int, n: int, low: float, high: float) -> None:
    ci = wilson_ci(k, n)
    assert ci is not None
    assert ci[0] == pytest.approx(low, abs=1e-4)
    assert ci[1] == pytest.approx(high, abs=1e-4)


def test_wilson_edges() -> None:
    assert wilson_ci(0, 0) is None
    assert wilson_ci(0, 10)[0] == 0.0  # type: ignore[index]
    assert wilson_ci(10, 10)[1] == 1.0  # type: ignore[index]
    narrow, wide = wilson_ci(5, 10, z=1.0), wilson_ci(5, 10, z=2.576)
    assert narrow is not None and wide is not None
    assert wide[0] < narrow[0] < 0.5 < narrow[1] < wide[1]


@pytest.mark.parametrize(("k", "n"), [(-1, 5), (6, 5), (0, -1)])
def test_wilson_rejects_impossible_counts(k: int, n: int) -> None:
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson_ci(k, n)


@given(st.integers(0, 500).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_contains_the_rate(kn: tuple[int, int]) -> None:
    k, n = kn
    ci = wilson_ci(k, n)
    if n == 0:
        assert ci is None
    else:
        assert ci is not None and 0.0 <= ci[0] <= k / n <= ci[1] <= 1.0


VALUES = [0.13, 0.92, 0.41, 0.77, 0.35, 0.86, 0.24, 0.68, 0.51, 0.99, 0.02, 0.47]


def test_bootstrap_is_deterministic_for_a_seed() -> None:
    a = bootstrap_ci(VALUES, seed=7)
    assert a == bootstrap_ci(VALUES, seed=7)
    assert a != bootstrap_ci(VALUES, seed=8)


def test_bootstrap_contains_the_point_estimate_and_narrows_with_confidence() -> None:
    ci = bootstrap_ci(VALUES)
    assert ci is not None
    assert ci[0] < mean(VALUES) < ci[1]
    assert 0.0 <= ci[0] and ci[1] <= 1.0
    ci80 = bootstrap_ci(VALUES, alpha=0.2)
    assert ci80 is not None and ci[0] < ci80[0] < ci80[1] < ci[1]


def test_bootstrap_custom_statistic_matches_the_vectorized_mean() -> None:
    fast = bootstrap_ci(VALUES, seed=3, n_boot=500)
    slow = bootstrap_ci(VALUES, statistic=lambda x: float(np.mean(x)), seed=3, n_boot=500)
    assert fast is not None and slow is not None
    assert fast == pytest.approx(slow, abs=1e-12)
    med = bootstrap_ci(VALUES, statistic=lambda x: float(np.median(x)))
    assert med is not None and med[0] <= float(np.median(VALUES)) <= med[1]


def test_bootstrap_edges() -> None:
    assert bootstrap_ci([]) is None
    assert bootstrap_ci([3.5]) == (3.5, 3.5)
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci(VALUES, n_boot=0)
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci(VALUES, alpha=1.0)


NLL = [12.0, 30.5, 8.25, 22.0, 15.0, 40.0, 9.5, 18.0]
TOKENS = [10, 20, 5, 14, 12, 25, 8, 11]


def test_ratio_bootstrap_perplexity() -> None:
    ppl = math.exp(sum(NLL) / sum(TOKENS))
    ci = bootstrap_ci_ratio(NLL, TOKENS, transform=math.exp)
    assert ci is not None
    assert ci[0] < ppl < ci[1]
    raw = bootstrap_ci_ratio(NLL, TOKENS)
    assert raw is not None
    assert ci == pytest.approx((math.exp(raw[0]), math.exp(raw[1])), rel=1e-3)  # exp is monotone
    assert ci == bootstrap_ci_ratio(NLL, TOKENS, transform=math.exp)
    assert ci != bootstrap_ci_ratio(NLL, TOKENS, transform=math.exp, seed=1)


def test_ratio_is_a_ratio_of_sums_resampled_by_item() -> None:
    # The same resamples by hand: sum of nll over sum of tokens per resample, then the percentiles.
    nll, tok = np.array(NLL), np.array(TOKENS, dtype=float)
    idx = np.random.default_rng(5).integers(0, len(NLL), size=(300, len(NLL)))
    by_hand = np.quantile(nll[idx].sum(axis=1) / tok[idx].sum(axis=1), [0.05, 0.95])
    ci = bootstrap_ci_ratio(NLL, TOKENS, n_boot=300, seed=5, alpha=0.1)
    assert ci == (float(by_hand[0]), float(by_hand[1]))
    mean_of_ratios = np.quantile((nll[idx] / tok[idx]).mean(axis=1), [0.05, 0.95])
    assert ci != pytest.approx((float(mean_of_ratios[0]), float(mean_of_ratios[1])), abs=1e-6)
    assert bootstrap_ci_ratio([5.0], [2]) == (2.5, 2.5)


def test_ratio_edges() -> None:
    assert bootstrap_ci_ratio([], []) is None
    with pytest.raises(ValueError, match="same length"):
        bootstrap_ci_ratio([1.0, 2.0], [1])
    with pytest.raises(ValueError, match="item 1 has 0.0"):
        bootstrap_ci_ratio([1.0, 2.0], [3, 0])
