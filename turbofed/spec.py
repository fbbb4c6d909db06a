"""Fleet statistics and the feature spec they fix: the contract between sites and aggregator.

Statistics come in two phases, both additive across sites. First the operating regimes
(`RegimeStats` -> `Regimes`): C-MAPSS engines fly at one (FD001/FD003) or six
(FD002/FD004) operating conditions, and the condition, not wear, dominates every sensor's
level; each sensor is therefore normalised per regime before anything else. Second the
`FleetStats`, over the regime-normalised sensors: count, sums and sums of squares (and sums
of products with the capped RUL) per column (cycle, then the 21 sensors), and count-weighted
sums and sums of squares of the window features of all 21 sensors for one window length. They add up exactly
across sites, so the aggregator learns the fleet's means, spreads and correlations without
pooled data. From them it fixes the `FeatureSpec` every site uses: which sensors are
informative (non-constant and correlated with RUL) and the mean and spread that
standardise each chosen feature. The features themselves are computed on the device
(edge/features.py, which also builds a site's statistics: `turbofed.edge.features.history_stats`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from turbofed.layout import N_ALL_FEATURES, N_SENSORS, N_SETTINGS, feature_columns, n_features
from turbofed.metrics import RUL_CAP

DEFAULT_WINDOW = 30
MIN_CORRELATION = 0.2  # |corr(sensor, capped RUL)| below this is treated as noise; 0.1 and 0.4 did no better on validation (docs/accuracy.md)
MIN_STD = 1e-6
# A feature further than this many fleet standard deviations from the fleet mean marks an
# engine outside the model's training range (FeatureSpec.out_of_range; docs/accuracy.md).
OUT_OF_RANGE_Z = 8.0

# --- operating regimes ------------------------------------------------------------------

# Grid that the three settings (altitude in kft, Mach number, throttle resolver angle) are
# rounded to: 1 kft, 0.01 Mach, 1 degree. C-MAPSS flies at six conditions spaced far wider
# (0/10/20/25/35/42 kft, Mach 0 to 0.84, TRA 60 or 100) with setting noise far below half a
# cell (at most 0.009 kft, 0.0006 Mach), so each condition is exactly one grid cell.
SETTINGS_GRID = (1.0, 0.01, 1.0)
MAX_CELLS = 64  # occupied grid cells a site may report (bounded: hostile input)
MAX_REGIMES = 16
MIN_REGIME_SHARE = 0.005  # a cell holding less of the fleet's cycles is no regime of its own
REGIME_COLUMNS = 1 + 2 * N_SENSORS  # per cell: count, then per-sensor sums, then sums of squares

Cell = tuple[int, int, int]


def grid_cells(settings: np.ndarray) -> np.ndarray:
    """(n, 3) operational settings -> (n, 3) integer grid cells (`SETTINGS_GRID`)."""
    x = np.atleast_2d(np.asarray(settings, dtype=float))
    if x.shape[1] != N_SETTINGS:
        raise ValueError(f"expected {N_SETTINGS} operational settings per reading, got {x.shape[1]}")
    return np.rint(x / np.asarray(SETTINGS_GRID)).astype(np.int64) + 0  # + 0: no negative zero


@dataclass
class RegimeStats:
    """Phase one of the fleet statistics: per occupied settings-grid cell, the number of
    cycles and each raw sensor's sum and sum of squares. Additive across sites: the
    aggregator learns where the fleet flies and each condition's sensor levels and
    spreads without a single pooled row. Regimes are found by rounding, not by k-means:
    one exchange instead of several rounds, exact for C-MAPSS's six conditions, and a cell
    too small to be a regime is merged, sums and all, into the nearest large one.

    `to_vector`/`from_vector` flatten the numbers of the cells in `cells` order; for secure
    aggregation the cell list must be agreed first (the occupied cells are what a site
    reveals in the clear)."""

    cells: dict[Cell, np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_rows(cls, settings: np.ndarray, sensors: np.ndarray) -> "RegimeStats":
        g = grid_cells(settings)
        x = np.asarray(sensors, dtype=float)
        keys, inverse = np.unique(g, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        cells = {}
        for k, key in enumerate(keys):
            rows = x[inverse == k]
            cells[tuple(int(v) for v in key)] = np.concatenate([[float(len(rows))], rows.sum(0), (rows * rows).sum(0)])
        return cls(cells)

    @property
    def count(self) -> float:
        return float(sum(v[0] for v in self.cells.values()))

    def __add__(self, other: "RegimeStats") -> "RegimeStats":
        cells = {k: v.copy() for k, v in self.cells.items()}
        for k, v in other.cells.items():
            cells[k] = cells[k] + v if k in cells else v.copy()
        return RegimeStats(cells)

    def to_vector(self, cells: list[Cell] | None = None) -> np.ndarray:
        """Every additive number, cell after cell in `cells` order (default: sorted); a cell
        this site never saw contributes zeros."""
        order = sorted(self.cells) if cells is None else cells
        zero = np.zeros(REGIME_COLUMNS)
        return np.concatenate([self.cells.get(tuple(c), zero) for c in order]) if order else np.zeros(0)

    @classmethod
    def from_vector(cls, vec: np.ndarray, cells: list[Cell]) -> "RegimeStats":
        v = np.asarray(vec, dtype=np.float64)
        if v.shape != (len(cells) * REGIME_COLUMNS,):
            raise ValueError(f"regime statistics vector must hold {len(cells) * REGIME_COLUMNS} numbers, got {v.shape}")
        blocks = v.reshape(len(cells), REGIME_COLUMNS)
        return cls({tuple(int(x) for x in c): b.copy() for c, b in zip(cells, blocks) if b[0] > 0})

    def to_dict(self) -> dict:
        return {"cells": [[*k, *v.tolist()] for k, v in sorted(self.cells.items())]}

    @classmethod
    def from_dict(cls, d: dict) -> "RegimeStats":
        rows = d.get("cells") if isinstance(d, dict) else None
        if not isinstance(rows, list) or len(rows) > MAX_CELLS:
            raise ValueError(f"regime statistics field 'cells' must be a list of at most {MAX_CELLS} cells")
        cells: dict[Cell, np.ndarray] = {}
        for row in rows:
            if not isinstance(row, list) or len(row) != N_SETTINGS + REGIME_COLUMNS:
                raise ValueError(f"regime statistics cell must be {N_SETTINGS} grid indices and {REGIME_COLUMNS} numbers")
            key = row[:N_SETTINGS]
            if not all(isinstance(i, int) and not isinstance(i, bool) and abs(i) <= 10**6 for i in key):
                raise ValueError("regime statistics cell indices must be whole numbers within ±10^6")
            values = np.asarray(row[N_SETTINGS:], dtype=float)
            if not np.all(np.isfinite(values)) or values[0] < 0 or np.any(values[1 + N_SENSORS :] < 0):
                raise ValueError("regime statistics cell holds a non-finite or negative count or sum of squares")
            if tuple(key) in cells:
                raise ValueError(f"regime statistics cell {key} appears twice")
            cells[tuple(key)] = values
        return cls(cells)


@dataclass(frozen=True)
class Regimes:
    """The fleet's operating regimes (grid cells of the settings) and, per regime, each
    sensor's mean and spread: a reading is assigned to the nearest regime (its own cell, or
    the closest in grid units) and each sensor becomes (value - mean) / spread of that
    regime. A sensor constant within a regime (spread ~0) becomes 0 there."""

    cells: tuple[Cell, ...]
    mean: tuple[tuple[float, ...], ...]  # K x 21
    std: tuple[tuple[float, ...], ...]  # K x 21, 0 where the sensor is constant in the regime
    _arrays: tuple = field(default=(), init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        k = len(self.cells)
        if not 1 <= k <= MAX_REGIMES:
            raise ValueError(f"regimes: between 1 and {MAX_REGIMES} regimes, got {k}")
        cells = np.asarray(self.cells, dtype=float).reshape(k, N_SETTINGS)
        mean, std = np.asarray(self.mean, dtype=float), np.asarray(self.std, dtype=float)
        if mean.shape != (k, N_SENSORS) or std.shape != (k, N_SENSORS) or not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))) or np.any(std < 0):
            raise ValueError(f"regimes: mean and std must be {k} x {N_SENSORS} finite numbers, std not negative")
        inv = np.divide(1.0, std, out=np.zeros_like(std), where=std > 0)
        index = {tuple(c): k for k, c in enumerate(self.cells)}
        object.__setattr__(self, "_arrays", (cells, mean, inv, index))

    @classmethod
    def from_stats(cls, stats: RegimeStats, min_share: float = MIN_REGIME_SHARE) -> "Regimes":
        """Cells holding at least `min_share` of the cycles are the regimes (at most
        MAX_REGIMES, the largest); every other cell's sums join the nearest regime's."""
        total = stats.count
        if total < 2:
            raise ValueError("regime statistics hold fewer than 2 cycles")
        by_size = sorted(stats.cells, key=lambda c: (-stats.cells[c][0], c))
        keep = sorted(c for c in by_size[:MAX_REGIMES] if stats.cells[c][0] >= min_share * total) or [by_size[0]]
        centres = np.asarray(keep, dtype=float)
        sums = {c: stats.cells[c].copy() for c in keep}
        for c in stats.cells:
            if c not in sums:
                nearest = keep[int(np.argmin(((centres - np.asarray(c, dtype=float)) ** 2).sum(1)))]
                sums[nearest] = sums[nearest] + stats.cells[c]
        means, stds = [], []
        for c in keep:
            n, s, q = sums[c][0], sums[c][1 : 1 + N_SENSORS], sums[c][1 + N_SENSORS :]
            m = s / n
            sd = np.sqrt(np.maximum(q / n - m * m, 0.0))
            sd = np.where(sd > MIN_STD * np.maximum(1.0, np.abs(m)), sd, 0.0)  # constant up to float error
            means.append(tuple(m.tolist()))
            stds.append(tuple(sd.tolist()))
        return cls(tuple(keep), tuple(means), tuple(stds))

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(K, 21) per-regime means and reciprocal spreads (0 where a sensor is constant):
        normalised = (raw - mean[r]) * inverse[r]."""
        return self._arrays[1], self._arrays[2]

    def assign_one(self, settings: np.ndarray) -> int:
        """One reading's regime, as `assign` gives it, without array overhead when its cell is
        a regime's own (the agent calls this for every reading)."""
        if len(self.cells) == 1:
            return 0
        key = tuple(round(float(v) / g) for v, g in zip(settings, SETTINGS_GRID))  # round() is half-even, as np.rint
        k = self._arrays[3].get(key)
        return int(self.assign(np.asarray(settings, dtype=float)[None])[0]) if k is None else k

    def assign(self, settings: np.ndarray) -> np.ndarray:
        """(n, 3) settings -> (n,) regime index (the nearest regime's cell, in grid units)."""
        g = grid_cells(settings).astype(float)
        cells = self._arrays[0]
        if len(cells) == 1:
            return np.zeros(len(g), dtype=np.int64)
        return np.argmin(((g[:, None, :] - cells[None]) ** 2).sum(-1), axis=1)

    def normalise(self, settings: np.ndarray, sensors: np.ndarray) -> np.ndarray:
        """(n, 3) settings and (n, 21) raw sensors -> (n, 21) sensors normalised per regime."""
        mean, inv = self.affine()
        r = self.assign(settings)
        return (np.atleast_2d(np.asarray(sensors, dtype=float)) - mean[r]) * inv[r]

    def to_dict(self) -> dict:
        return {"cells": [list(c) for c in self.cells], "mean": [list(m) for m in self.mean], "std": [list(s) for s in self.std]}

    @classmethod
    def from_dict(cls, d: dict) -> "Regimes":
        if not isinstance(d, dict) or not all(isinstance(d.get(k), list) for k in ("cells", "mean", "std")):
            raise ValueError("regimes must be an object with lists 'cells', 'mean' and 'std'")
        if len(d["cells"]) > MAX_REGIMES:
            raise ValueError(f"regimes: at most {MAX_REGIMES} regimes, got {len(d['cells'])}")
        cells = []
        for c in d["cells"]:
            if not isinstance(c, list) or len(c) != N_SETTINGS or not all(isinstance(i, int) and not isinstance(i, bool) and abs(i) <= 10**6 for i in c):
                raise ValueError(f"regimes: each cell must be {N_SETTINGS} whole numbers within ±10^6")
            cells.append(tuple(c))
        if len(set(cells)) != len(cells):
            raise ValueError("regimes: a cell appears twice")
        try:
            mean = tuple(tuple(float(v) for v in row) for row in d["mean"])
            std = tuple(tuple(float(v) for v in row) for row in d["std"])
        except (TypeError, ValueError):
            raise ValueError("regimes: mean and std must be lists of numbers") from None
        return cls(tuple(cells), mean, std)


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

    _VECTOR = ("count", "sum", "sumsq", "sum_y", "sumsq_y", "sum_xy", "feature_sum", "feature_sumsq")

    def to_vector(self) -> np.ndarray:
        """Every additive number as one flat float64 array (the window is not additive: it
        stays with `like` in `from_vector`). Summing vectors sums statistics."""
        return np.concatenate([np.atleast_1d(np.asarray(getattr(self, k), dtype=np.float64)) for k in self._VECTOR])

    @classmethod
    def from_vector(cls, vec: np.ndarray, like: "FleetStats") -> "FleetStats":
        """`to_vector`'s inverse; `like` gives the window (and the layout it was made with)."""
        v = np.asarray(vec, dtype=np.float64)
        sizes = [np.atleast_1d(getattr(like, k)).size for k in cls._VECTOR]
        if v.shape != (sum(sizes),) or not np.all(np.isfinite(v)):
            raise ValueError(f"fleet statistics vector must be {sum(sizes)} finite numbers, got shape {v.shape}")
        parts = np.split(v, np.cumsum(sizes)[:-1])
        values = {k: (float(p[0]) if np.ndim(getattr(like, k)) == 0 else p.copy()) for k, p in zip(cls._VECTOR, parts)}
        return cls(window=like.window, **values)

    def to_dict(self) -> dict:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()}

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
    """Which sensors, how long a window, the offset/scale that normalises features, and the
    operating regimes whose per-regime statistics normalise the raw sensors first (None:
    raw sensors, the spec of a fleet that predates regimes)."""

    sensors: tuple[int, ...]  # 0-based indices into the 21 sensors
    window: int
    offset: tuple[float, ...]
    scale: tuple[float, ...]
    regimes: Regimes | None = None

    @property
    def n_features(self) -> int:
        return n_features(len(self.sensors))

    @classmethod
    def from_stats(cls, stats: FleetStats, window: int | None = None, min_correlation: float = MIN_CORRELATION,
                   regimes: Regimes | None = None) -> "FeatureSpec":
        """Informative sensors: non-constant and correlated with RUL across the fleet; each
        chosen feature standardised by its fleet mean and spread. `window`, if given, must
        be the one the statistics were computed for; `regimes` must be the ones the
        statistics' sensors were normalised with."""
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
        return cls(sensors, stats.window, tuple(offset.tolist()), tuple(scale.tolist()), regimes)

    def out_of_range(self, features: np.ndarray, limit: float = OUT_OF_RANGE_Z) -> np.ndarray:
        """(N, F) or (F,) raw features -> (N,) True where any feature lies more than `limit`
        fleet standard deviations from the fleet mean: the model never saw such an engine
        in training, and its prediction is an extrapolation."""
        offset, scale = self._normalisation
        z = (np.atleast_2d(np.asarray(features, dtype=float)) - offset) / scale
        return np.abs(z).max(axis=1) > limit

    @cached_property
    def _normalisation(self) -> tuple[np.ndarray, np.ndarray]:
        """offset and scale as arrays, built once: the agent checks every reading against them."""
        return np.asarray(self.offset, dtype=float), np.asarray(self.scale, dtype=float)

    def to_dict(self) -> dict:
        d = {"sensors": list(self.sensors), "window": self.window, "offset": list(self.offset), "scale": list(self.scale)}
        if self.regimes is not None:
            d["regimes"] = self.regimes.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSpec":
        regimes = Regimes.from_dict(d["regimes"]) if d.get("regimes") is not None else None
        spec = cls(tuple(int(i) for i in d["sensors"]), int(d["window"]), tuple(map(float, d["offset"])), tuple(map(float, d["scale"])), regimes)
        if len(spec.offset) != spec.n_features or len(spec.scale) != spec.n_features:
            raise ValueError("feature spec offset/scale length does not match its sensors")
        return spec
