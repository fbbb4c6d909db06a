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

import numpy as np

from turbofed.edge.features import histories_stats, regime_stats, run_features, two_phase_spec
from turbofed.edge.state import Stacked, StateError, read_npz, take_array, write_npz_atomic
from turbofed.layout import N_SENSORS, N_SETTINGS
from turbofed.spec import FeatureSpec, FleetStats, Regimes, RegimeStats
from turbofed.topics import natural_key


class TrainingBuffer:
    """Labelled histories: per engine, cycles, 21 sensors and the RUL at each cycle (and,
    aligned with `engines`, each engine's (n, 3) settings in `settings`)."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.engines: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
        self.settings: list[np.ndarray] = []
        self.dropped_engines = 0

    @property
    def rows(self) -> int:
        return sum(len(c) for _, c, _, _ in self.engines)

    def add(self, engine: str, cycles: np.ndarray, sensors: np.ndarray, rul: np.ndarray, settings: np.ndarray | None = None) -> None:
        self.engines.append((engine, np.asarray(cycles, dtype=np.int64), np.asarray(sensors, dtype=float), np.asarray(rul, dtype=float)))
        self.settings.append(np.zeros((len(cycles), N_SETTINGS)) if settings is None else np.asarray(settings, dtype=float).reshape(len(cycles), N_SETTINGS))
        while self.rows > self.max_rows and len(self.engines) > 1:
            self.engines.pop(0)
            self.settings.pop(0)
            self.dropped_engines += 1

    def _order(self) -> list[int]:
        """Engines sorted by id (FD001-train-2 before FD001-train-10), not by failure time:
        the same data then trains the same model, however the failures were interleaved."""
        return sorted(range(len(self.engines)), key=lambda i: natural_key(self.engines[i][0]))

    def regime_stats(self) -> RegimeStats:
        """This site's share of phase one of the fleet statistics (operating regimes)."""
        return sum((regime_stats(self.settings[i], self.engines[i][2]) for i in self._order()), RegimeStats())

    def stats(self, window: int, regimes: Regimes | None = None) -> FleetStats:
        """This site's fleet statistics for features over a `window`-cycle window, its sensors
        normalised with `regimes`."""
        order = self._order()
        return histories_stats(((c, s, r) for _, c, s, r in (self.engines[i] for i in order)), window, regimes, (self.settings[i] for i in order))

    def spec(self, window: int) -> FeatureSpec:
        """The spec this site alone would fix (its local model's), both phases over its own data."""
        return two_phase_spec(self.regime_stats(), lambda regimes: self.stats(window, regimes))

    def training_rows(self, spec: FeatureSpec) -> tuple[np.ndarray, np.ndarray]:
        """Features (float32) and RUL of every buffered cycle under `spec`."""
        return _rows(spec, [(*self.engines[i], self.settings[i]) for i in self._order()])

    def validation_rows(self, spec: FeatureSpec, max_rows: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Features, RUL and the engine count of this (held-out) buffer's engines: whole
        engines, in engine order, up to about `max_rows` cycles, so the rounds' models are
        scored on engines they have not seen and on the same ones from round to round."""
        chosen, rows = [], 0
        for i in self._order():
            engine = self.engines[i]
            if chosen and rows + len(engine[1]) > max_rows:
                break
            chosen.append((*engine, self.settings[i]))
            rows += len(engine[1])
        return (*_rows(spec, chosen), len(chosen))

    def scoring_rows(self, spec: FeatureSpec, max_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Features and RUL of the engines that failed first, up to about `max_rows` cycles
        (whole engines, at least one): a cheap sample for scoring a model, and the same one
        from version to version until the buffer overflows, so scores compare like with like."""
        first, rows = [], 0
        for engine, settings in zip(self.engines, self.settings):
            if first and rows + len(engine[1]) > max_rows:
                break
            first.append((*engine, settings))
            rows += len(engine[1])
        return _rows(spec, first)

    def save(self, path: Path) -> None:
        save_histories(path, [(e, c, s, r) for e, c, s, r in self.engines], extra={"dropped": self.dropped_engines}, settings=self.settings)

    @classmethod
    def load(cls, path: Path, max_rows: int) -> "TrainingBuffer":
        buf = cls(max_rows)
        histories, extra = load_histories(path)
        buf.engines = [(e, c, s, r) for e, c, s, r in histories]
        buf.settings = load_history_settings(path, [len(c) for _, c, _, _ in histories])
        buf.dropped_engines = int(extra.get("dropped", 0))
        return buf


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


def _rows(spec: FeatureSpec, engines: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if not engines:
        return np.zeros((0, spec.n_features), dtype=np.float32), np.zeros(0)
    x = np.vstack([run_features(spec, c, s, g) for _, c, s, _, g in engines]).astype(np.float32)
    return x, np.concatenate([r for _, _, _, r, _ in engines])


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
