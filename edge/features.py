"""Fleet statistics and window features, computed the same way streaming and in batch.

A model sees, for each engine and cycle, a window of the last W cycles of the informative
sensors (shorter histories padded with their first reading), summarised per sensor as the
mean of the last 5 cycles, the mean of the window and its slope, plus the engine's cycle
count. Summaries average out C-MAPSS's heavy sensor noise; on FD001 they beat a flattened
window (13.3 vs 14.7 RMSE, same MLP) with a tenth of the inputs.

Which sensors are informative, and how features are normalised, comes from fleet
statistics: count, sums and sums of squares (and sums of products with the capped RUL),
which add up exactly across sites, so the fleet's figures never need pooled data.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from turbofed.metrics import RUL_CAP

N_SENSORS = 21
RECENT = 5  # cycles averaged for the "current level" feature
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


def _slope_weights(window: int) -> np.ndarray:
    t = np.arange(window, dtype=float) - (window - 1) / 2.0
    return t / (t @ t)


def window_features(windows: np.ndarray, cycles: np.ndarray) -> np.ndarray:
    """(N, W, S) raw sensor windows and (N,) cycle counts -> (N, 3S + 1) raw features."""
    weights = _slope_weights(windows.shape[1])[None, :, None]
    return np.hstack(
        [
            windows[:, -RECENT:].mean(axis=1),
            windows.mean(axis=1),
            (windows * weights).sum(axis=1),
            np.asarray(cycles, dtype=float)[:, None],
        ]
    )


def run_features(spec: FeatureSpec, cycles: np.ndarray, sensors: np.ndarray) -> np.ndarray:
    """Features at every cycle of one engine's history, in batch. (n, 21) -> (n, F)."""
    x = np.asarray(sensors, dtype=float)[:, spec.sensors]
    padded = np.vstack([np.repeat(x[:1], spec.window - 1, axis=0), x])
    windows = sliding_window_view(padded, (spec.window, x.shape[1]))[:, 0]
    return window_features(windows, cycles)


class EngineWindow:
    """One engine's last W readings, updated one cycle at a time (what the agent keeps)."""

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec
        self._rows: deque[np.ndarray] = deque(maxlen=spec.window)
        self._first: np.ndarray | None = None
        self.cycle = 0

    def push(self, cycle: int, sensors: np.ndarray) -> np.ndarray:
        """Add one reading (all 21 sensors) and return the (F,) raw features at this cycle."""
        row = np.asarray(sensors, dtype=float)[list(self.spec.sensors)]
        if self._first is None:
            self._first = row
        self._rows.append(row)
        self.cycle = int(cycle)
        return self.features()

    def features(self) -> np.ndarray:
        pad = self.spec.window - len(self._rows)
        window = np.vstack([np.repeat(self._first[None, :], pad, axis=0), *self._rows]) if pad else np.vstack(self._rows)
        return window_features(window[None], np.array([self.cycle]))[0]
