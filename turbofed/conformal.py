"""Federated split-conformal RUL intervals: every prediction gets a lower and upper RUL that
hold the true (capped) RUL with a stated probability.

Split conformal prediction (Vovk, Gammerman & Shafer, "Algorithmic Learning in a Random
World", 2005; Angelopoulos & Bates, "A Gentle Introduction to Conformal Prediction", 2021):
residuals r = y - ŷ of a fixed model on calibration points it never trained on give, at
coverage 1 - α, the bounds [ŷ + q_lo, ŷ + q_hi] with q_hi the ⌈(n+1)(1 - α/2)⌉-th smallest
residual and q_lo the ⌊(n+1)(α/2)⌋-th (equal tails, each missed with probability at most
α/2). Federated: each site computes its residuals on its own calibration engines and sends
only a `ResidualHistogram` — counts in fixed bins (1 cycle wide over [-cap, cap], the end
bins open) per Mondrian group of predicted RUL. Counts add up across sites, and the
aggregator reads the order statistics off the summed histogram, conservatively on bin edges:
q_hi is the upper edge of the bin holding the k-th residual, q_lo the lower edge of its bin,
so the interval is at most one bin wider on each side than the exact one.

Mondrian groups (Vovk et al. 2005, ch. 4): residuals are pooled per range of predicted RUL
(`GROUP_EDGES`), because an engine predicted near failure is predicted more tightly than
one predicted healthy; a group with fewer than `MIN_GROUP_RESIDUALS` residuals falls back
to the pooled histogram of all groups. The truth is the capped RUL, as the model is trained:
an upper bound at the cap reads "cap or more" (docs/accuracy.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from turbofed.metrics import RUL_CAP, nasa_cut_rul

DEFAULT_COVERAGE = 0.9
BIN_WIDTH = 1.0  # cycles
GROUP_EDGES: tuple[float, ...] = (30.0, 70.0)  # predicted RUL [0, 30), [30, 70), [70, cap]
# A Mondrian group needs this many residuals of its own; with fewer it uses the pooled
# histogram. At 90% coverage each tail then rests on at least 5 residuals beyond its bound.
MIN_GROUP_RESIDUALS = 100
MAX_BINS = 4096  # per group (hostile input: bounded)
MAX_GROUPS = 8
MAX_COUNT = 2**40  # one bin's count, summed over a fleet


class HistogramError(ValueError):
    """A residual histogram or interval table does not fit its layout."""


@dataclass(frozen=True)
class Layout:
    """The fixed bins every site counts residuals in: `bins` bins of `width` cycles from `lo`
    (the first and last bin open-ended), per group of predicted RUL split at `edges`."""

    lo: float
    width: float
    bins: int
    edges: tuple[float, ...] = GROUP_EDGES

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lo) and math.isfinite(self.width) and self.width > 0):
            raise HistogramError(f"histogram layout: lo and width must be finite, width > 0, got {self.lo}, {self.width}")
        if not 2 <= self.bins <= MAX_BINS:
            raise HistogramError(f"histogram layout: between 2 and {MAX_BINS} bins, got {self.bins}")
        if len(self.edges) > MAX_GROUPS - 1 or list(self.edges) != sorted(set(self.edges)) or not all(map(math.isfinite, self.edges)):
            raise HistogramError(f"histogram layout: at most {MAX_GROUPS - 1} increasing finite group edges, got {list(self.edges)[:10]}")

    @classmethod
    def for_cap(cls, cap: float = RUL_CAP, width: float = BIN_WIDTH, edges: tuple[float, ...] = GROUP_EDGES) -> "Layout":
        """Bins covering every residual of a capped truth and a clipped prediction: [-cap, cap]."""
        return cls(-float(cap), float(width), int(math.ceil(2 * cap / width)), tuple(float(e) for e in edges if 0 < e < cap))

    @property
    def groups(self) -> int:
        return len(self.edges) + 1

    def group_of(self, predicted: np.ndarray) -> np.ndarray:
        """Mondrian group index of each prediction."""
        return np.searchsorted(np.asarray(self.edges, dtype=float), np.asarray(predicted, dtype=float), side="right")

    def bin_of(self, residuals: np.ndarray) -> np.ndarray:
        """Bin index of each residual; beyond the ends, the open end bins."""
        b = np.floor((np.asarray(residuals, dtype=float) - self.lo) / self.width)
        return np.clip(b, 0, self.bins - 1).astype(np.int64)

    def lower_edge(self, b: int) -> float:
        return -math.inf if b == 0 else self.lo + b * self.width

    def upper_edge(self, b: int) -> float:
        return math.inf if b == self.bins - 1 else self.lo + (b + 1) * self.width

    def to_dict(self) -> dict[str, Any]:
        return {"lo": self.lo, "width": self.width, "bins": self.bins, "edges": list(self.edges)}

    @classmethod
    def from_dict(cls, d: Any, where: str = "histogram layout") -> "Layout":
        if not isinstance(d, dict):
            raise HistogramError(f"{where} must be an object")
        lo, width, bins, edges = d.get("lo"), d.get("width"), d.get("bins"), d.get("edges", [])
        if not all(_number(v) for v in (lo, width)) or isinstance(bins, bool) or not isinstance(bins, int):
            raise HistogramError(f"{where}: lo and width must be numbers, bins a whole number")
        if not isinstance(edges, list) or len(edges) > MAX_GROUPS - 1 or not all(_number(e) for e in edges):
            raise HistogramError(f"{where}: edges must be a list of at most {MAX_GROUPS - 1} numbers")
        try:
            return cls(float(lo), float(width), bins, tuple(float(e) for e in edges))
        except HistogramError as exc:
            raise HistogramError(f"{where}: {exc}") from None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class ResidualHistogram:
    """Residual counts (groups x bins, whole numbers) in a `Layout`: what a site sends
    instead of its residuals. Adding histograms adds counts."""

    layout: Layout
    counts: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.counts is None:
            self.counts = np.zeros((self.layout.groups, self.layout.bins), dtype=np.int64)
        c = np.asarray(self.counts)
        if c.shape != (self.layout.groups, self.layout.bins):
            raise HistogramError(f"residual histogram must be {self.layout.groups} x {self.layout.bins} counts, got {c.shape}")
        self.counts = c.astype(np.int64)

    @classmethod
    def from_residuals(cls, layout: Layout, predicted: np.ndarray, truth: np.ndarray) -> "ResidualHistogram":
        """Count truth - predicted per group of `predicted` (predictions clipped, truth capped by the caller)."""
        p, y = np.asarray(predicted, dtype=float).ravel(), np.asarray(truth, dtype=float).ravel()
        if p.shape != y.shape:
            raise HistogramError(f"{p.size} predictions for {y.size} true RULs")
        ok = np.isfinite(p) & np.isfinite(y)
        counts = np.zeros((layout.groups, layout.bins), dtype=np.int64)
        np.add.at(counts, (layout.group_of(p[ok]), layout.bin_of(y[ok] - p[ok])), 1)
        return cls(layout, counts)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def __add__(self, other: "ResidualHistogram") -> "ResidualHistogram":
        if other.layout != self.layout:
            raise HistogramError("cannot add residual histograms of different layouts")
        return ResidualHistogram(self.layout, self.counts + other.counts)

    def to_dict(self) -> dict[str, Any]:
        """Sparse on the wire: per group, [bin, count] pairs of the occupied bins."""
        return {"layout": self.layout.to_dict(),
                "counts": [[[int(b), int(g[b])] for b in np.flatnonzero(g)] for g in self.counts]}

    @classmethod
    def from_dict(cls, d: Any, where: str = "residual histogram", layout: Layout | None = None) -> "ResidualHistogram":
        """Parse a site's histogram as hostile: its layout must equal `layout` (the one asked
        for) when given; every count a whole number in [1, MAX_COUNT], every bin in range and
        named once; at most bins x groups entries."""
        if not isinstance(d, dict):
            raise HistogramError(f"{where} must be an object")
        got = Layout.from_dict(d.get("layout"), f"{where} layout")
        if layout is not None and got != layout:
            raise HistogramError(f"{where}: layout {got.to_dict()} is not the one asked for {layout.to_dict()}")
        groups = d.get("counts")
        if not isinstance(groups, list) or len(groups) != got.groups:
            raise HistogramError(f"{where}: counts must be a list of {got.groups} groups")
        counts = np.zeros((got.groups, got.bins), dtype=np.int64)
        for g, pairs in enumerate(groups):
            if not isinstance(pairs, list) or len(pairs) > got.bins:
                raise HistogramError(f"{where}: counts[{g}] must be a list of at most {got.bins} [bin, count] pairs")
            for pair in pairs:
                if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)):
                    raise HistogramError(f"{where}: counts[{g}] entries must be [bin, count] whole numbers, got {pair!r:.40}")
                b, n = pair
                if not 0 <= b < got.bins or not 1 <= n <= MAX_COUNT:
                    raise HistogramError(f"{where}: counts[{g}] bin {b} count {n}: bin outside [0, {got.bins}) or count outside [1, {MAX_COUNT}]")
                if counts[g, b]:
                    raise HistogramError(f"{where}: counts[{g}] names bin {b} twice")
                counts[g, b] = n
        return cls(got, counts)


def residual_bounds(layout: Layout, counts: np.ndarray, coverage: float) -> tuple[float, float]:
    """(q_lo, q_hi) from one group's counts at `coverage`, with the finite-sample correction:
    q_hi the upper edge of the bin holding the ⌈(n+1)(1-α/2)⌉-th smallest residual, q_lo the
    lower edge of the bin holding the (n+1-that)-th; ±inf when n is too small for the rank."""
    c = np.asarray(counts, dtype=np.int64)
    n = int(c.sum())
    k_hi = math.ceil((n + 1) * (1 - (1 - coverage) / 2) - 1e-9)  # 1e-9: (n+1)(1-α/2) whole up to float error
    k_lo = n + 1 - k_hi
    cum = np.cumsum(c)
    hi = math.inf if k_hi > n else layout.upper_edge(int(np.searchsorted(cum, k_hi)))
    lo = -math.inf if k_lo < 1 else layout.lower_edge(int(np.searchsorted(cum, k_lo)))
    return lo, hi


@dataclass(frozen=True)
class IntervalTable:
    """Per Mondrian group, the residual bounds (q_lo, q_hi) at `coverage`, and how many
    calibration residuals each rests on (`pooled` where the group fell back to all groups).
    `interval` turns predictions into [lower, upper], clipped to [0, cap]."""

    coverage: float
    edges: tuple[float, ...]
    lower: tuple[float, ...]
    upper: tuple[float, ...]
    residuals: tuple[int, ...]
    pooled: tuple[bool, ...]
    model_version: int = -1

    def __post_init__(self) -> None:
        k = len(self.edges) + 1
        if not 0 < self.coverage < 1:
            raise HistogramError(f"interval table: coverage must be in (0, 1), got {self.coverage}")
        if not (len(self.lower) == len(self.upper) == len(self.residuals) == len(self.pooled) == k) or k > MAX_GROUPS:
            raise HistogramError(f"interval table: {k} groups need {k} lower, upper, residuals and pooled entries (at most {MAX_GROUPS})")
        if any(math.isnan(v) for v in (*self.lower, *self.upper)) or any(lo > hi for lo, hi in zip(self.lower, self.upper)):
            raise HistogramError("interval table: bounds must be numbers with lower <= upper")

    @classmethod
    def from_histogram(cls, hist: ResidualHistogram, coverage: float = DEFAULT_COVERAGE,
                       min_group: int = MIN_GROUP_RESIDUALS, model_version: int = -1) -> "IntervalTable":
        """The aggregator's step: bounds per group from the fleet's summed histogram."""
        if not 0 < coverage < 1:
            raise HistogramError(f"coverage must be in (0, 1), got {coverage}")
        layout, pooled_counts = hist.layout, hist.counts.sum(0)
        lower, upper, residuals, pooled = [], [], [], []
        for g in range(layout.groups):
            use_pool = int(hist.counts[g].sum()) < min_group
            counts = pooled_counts if use_pool else hist.counts[g]
            lo, hi = residual_bounds(layout, counts, coverage)
            lower.append(lo)
            upper.append(hi)
            residuals.append(int(counts.sum()))
            pooled.append(use_pool)
        return cls(coverage, layout.edges, tuple(lower), tuple(upper), tuple(residuals), tuple(pooled), model_version)

    def interval(self, predicted: np.ndarray, cap: float = RUL_CAP) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) RUL for each prediction, clipped to [0, cap]."""
        edges, lower, upper = self._bounds
        p = np.asarray(predicted, dtype=float)
        g = np.searchsorted(edges, p, side="right")
        with np.errstate(invalid="ignore"):
            lo = np.clip(p + lower[g], 0.0, cap)
            hi = np.clip(p + upper[g], 0.0, cap)
        return lo, hi

    @cached_property
    def _bounds(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """edges, lower and upper as arrays, built once: the agent bounds every prediction."""
        return np.asarray(self.edges, dtype=float), np.asarray(self.lower, dtype=float), np.asarray(self.upper, dtype=float)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: an infinite bound (too few residuals for the rank) travels as null."""
        def num(v: float) -> float | None:
            return None if math.isinf(v) else v
        return {"coverage": self.coverage, "edges": list(self.edges), "lower": [num(v) for v in self.lower],
                "upper": [num(v) for v in self.upper], "residuals": list(self.residuals), "pooled": list(self.pooled),
                "model_version": self.model_version}

    @classmethod
    def from_dict(cls, d: Any, where: str = "interval table") -> "IntervalTable":
        if not isinstance(d, dict):
            raise HistogramError(f"{where} must be an object")
        try:
            edges, lower, upper, residuals, pooled = (d[k] for k in ("edges", "lower", "upper", "residuals", "pooled"))
        except KeyError as exc:
            raise HistogramError(f"{where}: missing field {exc}") from None
        lists = (edges, lower, upper, residuals, pooled)
        if not all(isinstance(v, list) and len(v) <= MAX_GROUPS for v in lists):
            raise HistogramError(f"{where}: edges, lower, upper, residuals and pooled must be lists of at most {MAX_GROUPS}")
        coverage, version = d.get("coverage"), d.get("model_version", -1)
        if not _number(coverage) or not all(_number(e) for e in edges):
            raise HistogramError(f"{where}: coverage and edges must be finite numbers")
        if not all(v is None or _number(v) for v in (*lower, *upper)):
            raise HistogramError(f"{where}: bounds must be finite numbers or null")
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_COUNT for v in (*residuals, version + 1 if isinstance(version, int) else -1)):
            raise HistogramError(f"{where}: residuals and model_version must be whole numbers in range")
        if not all(isinstance(v, bool) for v in pooled):
            raise HistogramError(f"{where}: pooled must be true or false per group")
        return cls(float(coverage), tuple(float(e) for e in edges),
                   tuple(-math.inf if v is None else float(v) for v in lower),
                   tuple(math.inf if v is None else float(v) for v in upper), tuple(residuals), tuple(pooled), version)


def calibration_cuts(length: int, rng: np.random.Generator, cuts: int) -> np.ndarray:
    """Row indices (0-based) at which a run to failure of `length` cycles is scored for
    calibration: `cuts` draws of the cut NASA's test engines have (`turbofed.metrics.nasa_cut_rul`),
    so the calibration residuals come from the distribution the test predictions do."""

    return length - 1 - nasa_cut_rul(length, rng, cuts)


def coverage_and_width(lower: np.ndarray, upper: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Share of true values inside [lower, upper] and the mean width (the benchmark's figures)."""
    y = np.asarray(truth, dtype=float)
    inside = (np.asarray(lower) <= y) & (y <= np.asarray(upper))
    return {"coverage": round(float(inside.mean()), 4), "mean_width": round(float(np.mean(np.asarray(upper) - lower)), 2)}
