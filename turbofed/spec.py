"""Fleet statistics and the feature spec they fix: the contract between sites and aggregator.

Statistics are count, sums and sums of squares (and sums of products with the capped
RUL) per column (cycle, then the 21 sensors). They add up exactly across sites, so the
aggregator learns the fleet's means, spreads and correlations without pooled data.
From them it fixes the `FeatureSpec` every site uses: which sensors are informative
(non-constant and correlated with RUL) and how each window feature is normalised.
The features themselves are computed on the device (edge/features.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from turbofed.metrics import RUL_CAP

N_SENSORS = 21
MIN_CORRELATION = 0.2  # |corr(sensor, capped RUL)| below this is treated as noise
MIN_STD = 1e-6


@dataclass
class FleetStats:
    """Additive statistics over labelled cycles: column 0 is the cycle, 1..21 the sensors."""

    count: float = 0.0
    sum: np.ndarray = field(default_factory=lambda: np.zeros(N_SENSORS + 1))
    sumsq: np.ndarray = field(default_factory=lambda: np.zeros(N_SENSORS + 1))
    sum_y: float = 0.0
    sumsq_y: float = 0.0
    sum_xy: np.ndarray = field(default_factory=lambda: np.zeros(N_SENSORS + 1))

    @classmethod
    def from_rows(cls, cycles: np.ndarray, sensors: np.ndarray, rul: np.ndarray, cap: float = RUL_CAP) -> "FleetStats":
        """Statistics of labelled rows (one per cycle); RUL is capped before use."""
        x = np.column_stack([np.asarray(cycles, dtype=float), np.asarray(sensors, dtype=float)])
        y = np.minimum(np.asarray(rul, dtype=float), cap)
        return cls(float(len(x)), x.sum(0), (x * x).sum(0), float(y.sum()), float((y * y).sum()), (x * y[:, None]).sum(0))

    def __add__(self, other: "FleetStats") -> "FleetStats":
        return FleetStats(
            self.count + other.count,
            self.sum + other.sum,
            self.sumsq + other.sumsq,
            self.sum_y + other.sum_y,
            self.sumsq_y + other.sumsq_y,
            self.sum_xy + other.sum_xy,
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

    def to_dict(self) -> dict:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "FleetStats":
        arrays = {k: np.asarray(d[k], dtype=float) for k in ("sum", "sumsq", "sum_xy")}
        for k, a in arrays.items():
            if a.shape != (N_SENSORS + 1,) or not np.all(np.isfinite(a)):
                raise ValueError(f"fleet statistics field {k!r} must be {N_SENSORS + 1} finite numbers")
        return cls(float(d["count"]), arrays["sum"], arrays["sumsq"], float(d["sum_y"]), float(d["sumsq_y"]), arrays["sum_xy"])


@dataclass(frozen=True)
class FeatureSpec:
    """Which sensors, how long a window, and the offset/scale that normalises features."""

    sensors: tuple[int, ...]  # 0-based indices into the 21 sensors
    window: int
    offset: tuple[float, ...]
    scale: tuple[float, ...]

    @property
    def n_features(self) -> int:
        return 3 * len(self.sensors) + 1

    @classmethod
    def from_stats(cls, stats: FleetStats, window: int = 30, min_correlation: float = MIN_CORRELATION) -> "FeatureSpec":
        """Informative sensors: non-constant and correlated with RUL across the fleet."""
        if stats.count < 2:
            raise ValueError("fleet statistics hold fewer than 2 labelled cycles")
        mean, std, corr = stats.mean(), stats.std(), stats.correlation()
        sensors = tuple(
            int(i) for i in range(N_SENSORS) if std[i + 1] > MIN_STD * max(1.0, abs(mean[i + 1])) and abs(corr[i + 1]) >= min_correlation
        )
        if not sensors:
            raise ValueError("no sensor varies with RUL across the fleet")
        sel = np.array(sensors) + 1
        m, s = mean[sel], std[sel]
        # Feature order: recent level (S), window mean (S), slope (S), cycle (1).
        offset = np.concatenate([m, m, np.zeros_like(m), mean[:1]])
        scale = np.concatenate([s, s, s / window, np.maximum(std[:1], 1.0)])
        return cls(sensors, window, tuple(offset.tolist()), tuple(scale.tolist()))

    def to_dict(self) -> dict:
        return {"sensors": list(self.sensors), "window": self.window, "offset": list(self.offset), "scale": list(self.scale)}

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSpec":
        spec = cls(tuple(int(i) for i in d["sensors"]), int(d["window"]), tuple(map(float, d["offset"])), tuple(map(float, d["scale"])))
        if len(spec.offset) != spec.n_features or len(spec.scale) != spec.n_features:
            raise ValueError("feature spec offset/scale length does not match its sensors")
        return spec
