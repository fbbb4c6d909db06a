"""A site's labelled training data: histories of failed engines, bounded, saved to disk.

Raw rows are kept (not features) because features depend on the fleet's feature spec,
which can arrive after the data. When the bound is reached the oldest engines go first.
Each engine's operational settings are kept beside its sensors (the regime of a reading
depends on them); state saved before settings were kept loads with settings of zero, which
is right for a one-regime fleet.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from turbofed.edge.features import histories_stats, regime_stats, run_features, two_phase_spec
from turbofed.edge.state import Stacked, StateError, read_npz, take_array, write_npz_atomic
from turbofed.layout import N_SENSORS, N_SETTINGS
from turbofed.spec import FeatureSpec, FleetStats, Regimes, RegimeStats
from turbofed.topics import natural_key


class Engine(NamedTuple):
    """One failed engine's labelled history, its settings kept with it (regimes need them)."""

    name: str
    cycles: np.ndarray  # (n,) int64
    sensors: np.ndarray  # (n, 21)
    rul: np.ndarray  # (n,) the RUL at each cycle
    settings: np.ndarray  # (n, 3) operational settings


class TrainingBuffer:
    """Labelled histories: per engine, cycles, 21 sensors, the RUL at each cycle and the
    operational settings (`Engine`), oldest failure first."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.engines: list[Engine] = []
        self.dropped_engines = 0

    @property
    def rows(self) -> int:
        return sum(len(e.cycles) for e in self.engines)

    def add(self, engine: str, cycles: np.ndarray, sensors: np.ndarray, rul: np.ndarray, settings: np.ndarray | None = None) -> None:
        n = len(cycles)
        settings = np.zeros((n, N_SETTINGS)) if settings is None else np.asarray(settings, dtype=float).reshape(n, N_SETTINGS)
        self.engines.append(Engine(engine, np.asarray(cycles, dtype=np.int64), np.asarray(sensors, dtype=float),
                                   np.asarray(rul, dtype=float), settings))
        while self.rows > self.max_rows and len(self.engines) > 1:
            self.engines.pop(0)
            self.dropped_engines += 1

    def _ordered(self) -> list[Engine]:
        """Engines sorted by id (FD001-train-2 before FD001-train-10), not by failure time:
        the same data then trains the same model, however the failures were interleaved."""
        return sorted(self.engines, key=lambda e: natural_key(e.name))

    def regime_stats(self) -> RegimeStats:
        """This site's share of phase one of the fleet statistics (operating regimes)."""
        return sum((regime_stats(e.settings, e.sensors) for e in self._ordered()), RegimeStats())

    def stats(self, window: int, regimes: Regimes | None = None) -> FleetStats:
        """This site's fleet statistics for features over a `window`-cycle window, its sensors
        normalised with `regimes`."""
        ordered = self._ordered()
        return histories_stats(((e.cycles, e.sensors, e.rul) for e in ordered), window, regimes, (e.settings for e in ordered))

    def spec(self, window: int) -> FeatureSpec:
        """The spec this site alone would fix (its local model's), both phases over its own data."""
        return two_phase_spec(self.regime_stats(), lambda regimes: self.stats(window, regimes))

    def training_rows(self, spec: FeatureSpec) -> tuple[np.ndarray, np.ndarray]:
        """Features (float32) and RUL of every buffered cycle under `spec`."""
        return _rows(spec, self._ordered())

    def validation_rows(self, spec: FeatureSpec, max_rows: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Features, RUL and the engine count of this (held-out) buffer's engines: whole
        engines, in engine order, up to about `max_rows` cycles, so the rounds' models are
        scored on engines they have not seen and on the same ones from round to round."""
        chosen = _first_engines(self._ordered(), max_rows)
        return (*_rows(spec, chosen), len(chosen))

    def scoring_rows(self, spec: FeatureSpec, max_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Features and RUL of the engines that failed first, up to about `max_rows` cycles
        (whole engines, at least one): a cheap sample for scoring a model, and the same one
        from version to version until the buffer overflows, so scores compare like with like."""
        return _rows(spec, _first_engines(self.engines, max_rows))

    def save(self, path: Path) -> None:
        save_histories(path, [(e.name, e.cycles, e.sensors, e.rul) for e in self.engines], extra={"dropped": self.dropped_engines},
                       settings=[e.settings for e in self.engines])

    @classmethod
    def load(cls, path: Path, max_rows: int) -> "TrainingBuffer":
        buf = cls(max_rows)
        histories, extra = load_histories(path)
        settings = load_history_settings(path, [len(c) for _, c, _, _ in histories])
        buf.engines = [Engine(*history, g) for history, g in zip(histories, settings)]
        buf.dropped_engines = int(extra.get("dropped", 0))
        return buf


def _first_engines(engines: list[Engine], max_rows: int) -> list[Engine]:
    """Whole engines from the front of `engines`, up to about `max_rows` cycles (at least one)."""
    chosen, rows = [], 0
    for engine in engines:
        if chosen and rows + len(engine.cycles) > max_rows:
            break
        chosen.append(engine)
        rows += len(engine.cycles)
    return chosen


History = tuple[str, np.ndarray, np.ndarray, np.ndarray]  # engine, cycles, sensors (n, 21), RUL


def is_held_out(site: str, engine: str, share: float) -> bool:
    """Whether a site holds a failed `engine` out of training (SiteConfig.holdout_share): a
    fixed hash of site and engine below `share`, so the choice is the same whatever order
    engines fail in and after every restart, and an engine never trains a model it later
    validates or calibrates."""
    if share <= 0:
        return False
    digest = hashlib.sha256(f"{site}/{engine}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


HISTORY_ARRAYS = ("names", "lengths", "cycles", "sensors", "rul", "settings")


def _rows(spec: FeatureSpec, engines: list[Engine]) -> tuple[np.ndarray, np.ndarray]:
    """Features (float32) and RUL of every cycle of `engines` under `spec`."""
    if not engines:
        return np.zeros((0, spec.n_features), dtype=np.float32), np.zeros(0)
    x = np.vstack([run_features(spec, e.cycles, e.sensors, e.settings) for e in engines]).astype(np.float32)
    return x, np.concatenate([e.rul for e in engines])


def save_histories(path: Path, histories: list[History], extra: dict[str, int] | None = None, settings: list[np.ndarray] | None = None) -> None:
    """Engine histories in one .npz, written atomically (a crash leaves the old file);
    `settings`, aligned with `histories`, as one more (rows, 3) array."""
    names = np.array([h[0] for h in histories], dtype=str)
    lengths = np.array([len(h[1]) for h in histories], dtype=np.int64)
    arrays: dict[str, np.ndarray | Stacked] = dict(
        names=names, lengths=lengths, cycles=Stacked([h[1] for h in histories], "<i8"),
        sensors=Stacked([h[2] for h in histories], "<f8", (N_SENSORS,)), rul=Stacked([h[3] for h in histories], "<f8"))
    if settings is not None:
        arrays["settings"] = Stacked(settings, "<f8", (N_SETTINGS,))
    write_npz_atomic(path, {**arrays, **{k: np.int64(v) for k, v in (extra or {}).items()}})


def load_history_settings(path: Path, lengths: list[int]) -> list[np.ndarray]:
    """The per-engine settings `save_histories` wrote beside histories of `lengths` rows
    (zeros where the file predates them); wrong shapes or non-finite values raise StateError."""
    total = int(sum(lengths))
    arrays = read_npz(path) if path.exists() else {}
    if "settings" not in arrays:
        return [np.zeros((n, N_SETTINGS)) for n in lengths]
    flat = take_array(arrays, "settings", str(path), "f", (total, N_SETTINGS)).astype(float)
    bounds = np.r_[0, np.cumsum(lengths)].astype(int)
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def load_histories(path: Path) -> tuple[list[History], dict[str, int]]:
    """What `save_histories` wrote; nothing if the file is not there yet. Anything else
    (truncated, object arrays, wrong dtypes or shapes, lengths that do not add up,
    non-finite values) raises StateError naming the file."""
    if not path.exists():
        return [], {}
    arrays = read_npz(path)
    where = str(path)
    names = take_array(arrays, "names", where, "U", (None,))
    lengths = take_array(arrays, "lengths", where, "iu", (len(names),))
    cycles = take_array(arrays, "cycles", where, "iu", (None,))
    sensors = take_array(arrays, "sensors", where, "f", (len(cycles), 21))
    rul = take_array(arrays, "rul", where, "f", (len(cycles),))
    if np.any(lengths < 0) or int(lengths.sum()) != len(cycles):
        raise StateError(f"{path}: array 'lengths' must be non-negative and add up to the {len(cycles)} rows, got sum {int(lengths.sum())}")
    if any(not name for name in names):
        raise StateError(f"{path}: array 'names' holds an empty engine name")
    extra = {k: take_array(arrays, k, where, "iu", ()) for k in arrays if k not in HISTORY_ARRAYS}
    bounds = np.r_[0, np.cumsum(lengths)]
    cycles, sensors, rul = cycles.astype(np.int64), sensors.astype(float), rul.astype(float)
    histories = [(str(name), cycles[a:b], sensors[a:b], rul[a:b]) for name, a, b in zip(names, bounds[:-1], bounds[1:])]
    return histories, {k: int(v) for k, v in extra.items()}
