"""Federated conformal intervals (turbofed/conformal.py, edge/calibration.py): the histogram
quantile against the exact order statistic, federated sums against pooled residuals, coverage
on exchangeable synthetic data, Mondrian groups and their fallback, hostile histograms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from turbofed.conformal import (
    MIN_GROUP_RESIDUALS,
    HistogramError,
    IntervalTable,
    Layout,
    ResidualHistogram,
    calibration_cuts,
    residual_bounds,
)
from turbofed.metrics import MAX_TRUE_RUL, MIN_OBSERVED_CYCLES, MIN_TRUE_RUL

LAYOUT = Layout.for_cap(125.0)


def exact_bounds(residuals: np.ndarray, coverage: float) -> tuple[float, float]:
    """The split-conformal order statistics, straight from numpy on the residuals themselves."""
    n = len(residuals)
    k_hi = math.ceil((n + 1) * (1 - (1 - coverage) / 2) - 1e-9)
    k_lo = n + 1 - k_hi
    s = np.sort(residuals)
    # numpy's inverted-CDF quantile at k/n is the k-th smallest: the same statistic, a second way
    hi = float(np.quantile(residuals, k_hi / n, method="inverted_cdf")) if k_hi <= n else math.inf
    lo = float(s[k_lo - 1]) if k_lo >= 1 else -math.inf
    assert k_hi > n or hi == s[k_hi - 1]
    return lo, hi


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("coverage", [0.8, 0.9, 0.95])
def test_histogram_bounds_are_the_exact_order_statistics_rounded_outwards_by_at_most_a_bin(seed: int, coverage: float) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 3000))
    residuals = rng.standard_t(4, n) * rng.uniform(3, 30)
    hist = ResidualHistogram.from_residuals(LAYOUT, np.full(n, 50.0), 50.0 + residuals)
    lo, hi = residual_bounds(LAYOUT, hist.counts[hist.layout.group_of([50.0])[0]], coverage)
    exact_lo, exact_hi = exact_bounds(residuals, coverage)
    for edge, exact, outward in ((lo, exact_lo, -1), (hi, exact_hi, 1)):
        if math.isinf(edge):  # only in the open end bins, beyond ±cap
            assert abs(exact) >= 125.0 - 1 or math.isinf(exact)
        else:
            assert 0 <= outward * (edge - exact) <= LAYOUT.width, (edge, exact)


def test_too_few_residuals_for_the_rank_give_an_unbounded_side() -> None:
    # at 90%, k = ceil((n+1) * 0.95) exceeds n below n = 19
    counts = ResidualHistogram.from_residuals(LAYOUT, np.zeros(18), np.arange(18.0)).counts.sum(0)
    assert residual_bounds(LAYOUT, counts, 0.9) == (-math.inf, math.inf)
    counts = ResidualHistogram.from_residuals(LAYOUT, np.zeros(19), np.arange(19.0)).counts.sum(0)
    lo, hi = residual_bounds(LAYOUT, counts, 0.9)
    assert (lo, hi) == (0.0, 19.0)  # the smallest and the largest residual, on their bins' outer edges


def test_site_histograms_sum_to_the_histogram_of_the_pooled_residuals() -> None:
    rng = np.random.default_rng(1)
    sites = [(rng.uniform(0, 125, m), rng.uniform(0, 125, m)) for m in (50, 300, 7)]
    federated = sum((ResidualHistogram.from_residuals(LAYOUT, p, y) for p, y in sites), ResidualHistogram(LAYOUT))
    pooled = ResidualHistogram.from_residuals(LAYOUT, np.concatenate([p for p, _ in sites]), np.concatenate([y for _, y in sites]))
    np.testing.assert_array_equal(federated.counts, pooled.counts)
    assert federated.total == 357


def test_coverage_on_exchangeable_synthetic_data_is_nominal_within_the_binomial_tolerance() -> None:
    """Calibration n = 3000 and test m = 20000 points from one distribution, residual scale
    growing with predicted RUL (so each Mondrian group has its own width). The coverage given
    the calibration set is Beta-distributed with sd sqrt(0.9 * 0.1 / n) = 0.0055, the test
    estimate adds binomial sd sqrt(0.9 * 0.1 / m) = 0.0021: together 0.0059. Split conformal
    promises at least 0.9 in expectation and at most 0.9 + 2/(n+1); outward rounding to 1-cycle
    bins adds at most 2 x (density at the bounds, <= 0.006 per cycle here) = 0.012. Asserted:
    within 4 sd below 0.9 and 4 sd above 0.9 + 0.012 + 0.001, overall and per group."""
    rng = np.random.default_rng(7)

    def draw(m: int) -> tuple[np.ndarray, np.ndarray]:
        p = rng.uniform(0, 125, m)
        return p, p + rng.normal(0, 4 + 0.15 * p)

    table = IntervalTable.from_histogram(ResidualHistogram.from_residuals(LAYOUT, *draw(3000)), 0.9)
    assert not any(table.pooled)
    p, y = draw(20_000)
    lower, upper = table.interval(p, cap=math.inf)
    inside = (lower <= y) & (y <= upper)
    sd = math.sqrt(0.9 * 0.1 / 3000 + 0.9 * 0.1 / 20_000)
    assert 0.9 - 4 * sd <= inside.mean() <= 0.913 + 4 * sd
    groups = LAYOUT.group_of(p)
    for g in range(LAYOUT.groups):  # Mondrian: each group's own coverage (fewer points, wider tolerance)
        n_g = int((LAYOUT.group_of(draw(3000)[0]) == g).sum())
        sd_g = math.sqrt(0.09 / n_g + 0.09 / int((groups == g).sum()))
        assert 0.9 - 4 * sd_g <= inside[groups == g].mean() <= 0.913 + 4 * sd_g
    widths = [table.upper[g] - table.lower[g] for g in range(LAYOUT.groups)]
    assert widths == sorted(widths) and widths[0] < widths[-1] / 2  # tight near failure, wide when healthy


def test_a_group_with_too_few_residuals_falls_back_to_the_pooled_histogram() -> None:
    rng = np.random.default_rng(3)
    p = np.concatenate([rng.uniform(0, 29, MIN_GROUP_RESIDUALS - 1), rng.uniform(80, 125, 2000)])
    table = IntervalTable.from_histogram(ResidualHistogram.from_residuals(LAYOUT, p, p + rng.normal(0, 5, len(p))), 0.9)
    assert table.pooled == (True, True, False)  # [30, 70) is empty, [0, 30) one short
    assert table.residuals == (len(p), len(p), 2000)
    assert (table.lower[0], table.upper[0]) == (table.lower[1], table.upper[1])


def test_intervals_are_clipped_to_the_rul_range_and_the_table_survives_json() -> None:
    table = IntervalTable(0.9, (30.0, 70.0), (-5.0, -12.0, -math.inf), (4.0, 15.0, math.inf), (200, 300, 10), (False, False, True), 7)
    lower, upper = table.interval(np.array([2.0, 50.0, 120.0]), cap=125.0)
    np.testing.assert_allclose(lower, [0.0, 38.0, 0.0])
    np.testing.assert_allclose(upper, [6.0, 65.0, 125.0])
    assert IntervalTable.from_dict(table.to_dict()) == table


HOSTILE = [
    ("not an object", []),
    ("layout not asked for", {"layout": Layout.for_cap(100.0).to_dict(), "counts": [[], [], []]}),
    ("too many bins", {"layout": {**LAYOUT.to_dict(), "bins": 10**6}, "counts": [[], [], []]}),
    ("wrong number of groups", {"layout": LAYOUT.to_dict(), "counts": [[], []]}),
    ("negative count", {"layout": LAYOUT.to_dict(), "counts": [[[3, -1]], [], []]}),
    ("zero count listed", {"layout": LAYOUT.to_dict(), "counts": [[[3, 0]], [], []]}),
    ("count beyond bound", {"layout": LAYOUT.to_dict(), "counts": [[[3, 2**41]], [], []]}),
    ("fractional count", {"layout": LAYOUT.to_dict(), "counts": [[[3, 1.5]], [], []]}),
    ("boolean count", {"layout": LAYOUT.to_dict(), "counts": [[[3, True]], [], []]}),
    ("bin out of range", {"layout": LAYOUT.to_dict(), "counts": [[[250, 1]], [], []]}),
    ("negative bin", {"layout": LAYOUT.to_dict(), "counts": [[[-1, 1]], [], []]}),
    ("bin twice", {"layout": LAYOUT.to_dict(), "counts": [[[3, 1], [3, 2]], [], []]}),
    ("too many pairs", {"layout": LAYOUT.to_dict(), "counts": [[[i % 250, 1] for i in range(251)], [], []]}),
    ("non-finite layout", {"layout": {**LAYOUT.to_dict(), "width": float("nan")}, "counts": [[], [], []]}),
    ("unsorted edges", {"layout": {**LAYOUT.to_dict(), "edges": [70.0, 30.0]}, "counts": [[], [], []]}),
]


@pytest.mark.parametrize("case,body", HOSTILE, ids=[c for c, _ in HOSTILE])
def test_hostile_histograms_are_refused_with_a_reason(case: str, body: object) -> None:
    with pytest.raises(HistogramError) as err:
        ResidualHistogram.from_dict(body, "histogram from s1", layout=LAYOUT)
    assert "histogram from s1" in str(err.value)


def test_a_well_formed_histogram_round_trips() -> None:
    hist = ResidualHistogram.from_residuals(LAYOUT, np.array([10.0, 50.0, 100.0, 100.0]), np.array([12.0, 40.0, 125.0, 90.0]))
    assert (ResidualHistogram.from_dict(hist.to_dict(), layout=LAYOUT).counts == hist.counts).all()


def test_calibration_cuts_follow_nasas_test_cut() -> None:
    rng = np.random.default_rng(0)
    for length in (40, 128, 200, 362):
        rows = calibration_cuts(length, rng, 2000)
        rul = length - 1 - rows
        assert rul.min() >= min(MIN_TRUE_RUL, length - 1) and rul.max() <= max(MIN_TRUE_RUL, min(MAX_TRUE_RUL, length - MIN_OBSERVED_CYCLES))
        assert rows.min() >= 0
    assert len(set((362 - 1 - calibration_cuts(362, rng, 5000)).tolist())) == MAX_TRUE_RUL - MIN_TRUE_RUL + 1  # uniform over the range
