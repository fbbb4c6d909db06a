"""Fleet statistics and the feature spec they fix: the contract between sites and aggregator.

Statistics are count, sums and sums of squares (and sums of products with the capped
RUL) per column (cycle, then the 21 sensors), and count-weighted sums and sums of squares
of the window features of all 21 sensors for one window length. They add up exactly
across sites, so the aggregator learns the fleet's means, spreads and correlations without
pooled data. From them it fixes the `FeatureSpec` every site uses: which sensors are
informative (non-constant and correlated with RUL) and the mean and spread that
standardise each chosen feature. The features themselves are computed on the device
(edge/features.py, which also builds a site's statistics: `turbofed.edge.features.history_stats`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from turbofed.layout import N_ALL_FEATURES, N_SENSORS, feature_columns, n_features
from turbofed.metrics import RUL_CAP

DEFAULT_WINDOW = 30
MIN_CORRELATION = 0.2  # |corr(sensor, capped RUL)| below this is treated as noise
MIN_STD = 1e-6


@dataclass
class FleetStats:
    """Additive statistics over labelled cycles: column 0 is the cycle, 1..21 the sensors;
    `feature_sum`/`feature_sumsq` cover the N_ALL_FEATURES window features for `window`."""

    count: float = 0.0
    sum: np.ndarray = field(default_factory=lambda: np.zeros(N_SENSORS + 1))
    sumsq: np.ndarray = field(default_factory=lambda: np.zeros(N_SENSORS + 1))
    sum_y: float = 0.0
    sumsq_y: float = 0.0
    sum_xy: np.ndarray = field(default_factory=lambda: np.zeros(N_SENSORS + 1))
    window: int = DEFAULT_WINDOW
    feature_sum: np.ndarray = field(default_factory=lambda: np.zeros(N_ALL_FEATURES))
    feature_sumsq: np.ndarray = field(default_factory=lambda: np.zeros(N_ALL_FEATURES))

    @classmethod
    def from_rows(
        cls, cycles: np.ndarray, sensors: np.ndarray, rul: np.ndarray, features: np.ndarray, window: int, cap: float = RUL_CAP
    ) -> "FleetStats":
        """Statistics of labelled rows (one per cycle) and their all-sensor window features
        (`turbofed.edge.features.history_stats` computes those); RUL is capped before use."""
        x = np.column_stack([np.asarray(cycles, dtype=float), np.asarray(sensors, dtype=float)])
        y = np.minimum(np.asarray(rul, dtype=float), cap)
        f = np.asarray(features, dtype=float)
        if f.shape != (len(x), N_ALL_FEATURES):
            raise ValueError(f"expected {len(x)} x {N_ALL_FEATURES} window features, got {f.shape}")
        return cls(
            float(len(x)), x.sum(0), (x * x).sum(0), float(y.sum()), float((y * y).sum()), (x * y[:, None]).sum(0),
            int(window), f.sum(0), (f * f).sum(0),
        )

    def __add__(self, other: "FleetStats") -> "FleetStats":
        if self.count and other.count and self.window != other.window:
            raise ValueError(f"cannot add statistics of a {self.window}-cycle window to those of a {other.window}-cycle window")
        return FleetStats(
            self.count + other.count,
            self.sum + other.sum,
            self.sumsq + other.sumsq,
            self.sum_y + other.sum_y,
            self.sumsq_y + other.sumsq_y,
            self.sum_xy + other.sum_xy,
            self.window if self.count else other.window,
            self.feature_sum + other.feature_sum,
            self.feature_sumsq + other.feature_sumsq,
        )

    def mean(self) -> np.ndarray:
        return self.sum / self.count

    def std(self) -> np.ndarray:
        return np.sqrt(np.maximum(self.sumsq / self.count - self.mean() ** 2, 0.0))

    def correlation(self) -> np.ndarray:
        """Pearson correlation of each column with the capped RUL (0 where undefined)."""
        my = self.sum_y / self.count
        sy = np.sqrt(max(self.sumsq_y / self.count - my * my, 0.0))
        cov = self.sum_xy / self.count - self.mean() * my
        denom = self.std() * sy
        return np.divide(cov, denom, out=np.zeros_like(cov), where=denom > 0)

    def feature_mean(self) -> np.ndarray:
        return self.feature_sum / self.count

    def feature_std(self) -> np.ndarray:
        return np.sqrt(np.maximum(self.feature_sumsq / self.count - self.feature_mean() ** 2, 0.0))

    def to_dict(self) -> dict:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()}

    def to_vector(self) -> np.ndarray:
        """Every additive number as one float64 vector: what a secure sum adds (docs/privacy.md)."""
        return np.concatenate([[self.count], self.sum, self.sumsq, [self.sum_y, self.sumsq_y], self.sum_xy,
                               self.feature_sum, self.feature_sumsq]).astype(np.float64)

    @classmethod
    def from_vector(cls, vector: np.ndarray, like: "FleetStats") -> "FleetStats":
        """The inverse of `to_vector`, shaped like `like` (whose window it takes)."""
        v = np.asarray(vector, dtype=np.float64)
        if v.shape != like.to_vector().shape:
            raise ValueError(f"fleet statistics vector has {v.size} values, expected {like.to_vector().size}")
        parts = np.split(v, np.cumsum([1, N_SENSORS + 1, N_SENSORS + 1, 2, N_SENSORS + 1, N_ALL_FEATURES]))
        count, total, sumsq, y, xy, fsum, fsumsq = parts
        return cls(float(count[0]), total, sumsq, float(y[0]), float(y[1]), xy, like.window, fsum, fsumsq)

    @classmethod
    def from_dict(cls, d: dict) -> "FleetStats":
        sizes = {"sum": N_SENSORS + 1, "sumsq": N_SENSORS + 1, "sum_xy": N_SENSORS + 1, "feature_sum": N_ALL_FEATURES, "feature_sumsq": N_ALL_FEATURES}
        missing = sorted(set(sizes) - set(d))
        if missing:
            raise ValueError(f"fleet statistics lack field(s) {', '.join(missing)}")
        arrays = {k: np.asarray(d[k], dtype=float) for k in sizes}
        for k, a in arrays.items():
            if a.shape != (sizes[k],) or not np.all(np.isfinite(a)):
                raise ValueError(f"fleet statistics field {k!r} must be {sizes[k]} finite numbers")
        window = d.get("window")
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"fleet statistics field 'window' must be a positive whole number, got {window!r}")
        return cls(
            float(d["count"]), arrays["sum"], arrays["sumsq"], float(d["sum_y"]), float(d["sumsq_y"]), arrays["sum_xy"],
            window, arrays["feature_sum"], arrays["feature_sumsq"],
        )


@dataclass(frozen=True)
class FeatureSpec:
    """Which sensors, how long a window, and the offset/scale that normalises features."""

    sensors: tuple[int, ...]  # 0-based indices into the 21 sensors
    window: int
    offset: tuple[float, ...]
    scale: tuple[float, ...]

    @property
    def n_features(self) -> int:
        return n_features(len(self.sensors))

    @classmethod
    def from_stats(cls, stats: FleetStats, window: int | None = None, min_correlation: float = MIN_CORRELATION) -> "FeatureSpec":
        """Informative sensors: non-constant and correlated with RUL across the fleet; each
        chosen feature standardised by its fleet mean and spread. `window`, if given, must
        be the one the statistics were computed for."""
        if stats.count < 2:
            raise ValueError("fleet statistics hold fewer than 2 labelled cycles")
        if window is not None and window != stats.window:
            raise ValueError(f"fleet statistics are for a {stats.window}-cycle window, not {window}")
        mean, std, corr = stats.mean(), stats.std(), stats.correlation()
        sensors = tuple(
            int(i) for i in range(N_SENSORS) if std[i + 1] > MIN_STD * max(1.0, abs(mean[i + 1])) and abs(corr[i + 1]) >= min_correlation
        )
        if not sensors:
            raise ValueError("no sensor varies with RUL across the fleet")
        chosen = feature_columns(sensors)
        offset = stats.feature_mean()[chosen]
        scale = stats.feature_std()[chosen]
        scale = np.where(scale > MIN_STD, scale, 1.0)
        scale[-1] = max(scale[-1], 1.0)  # the cycle: at least one cycle
        return cls(sensors, stats.window, tuple(offset.tolist()), tuple(scale.tolist()))

    def to_dict(self) -> dict:
        return {"sensors": list(self.sensors), "window": self.window, "offset": list(self.offset), "scale": list(self.scale)}

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSpec":
        spec = cls(tuple(int(i) for i in d["sensors"]), int(d["window"]), tuple(map(float, d["offset"])), tuple(map(float, d["scale"])))
        if len(spec.offset) != spec.n_features or len(spec.scale) != spec.n_features:
            raise ValueError("feature spec offset/scale length does not match its sensors")
        return spec
