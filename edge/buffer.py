"""A site's labelled training data: histories of failed engines, bounded, saved to disk.

Raw rows are kept (not features) because features depend on the fleet's feature spec,
which can arrive after the data. When the bound is reached the oldest engines go first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from turbofed.edge.features import histories_stats, run_features
from turbofed.edge.state import StateError, read_npz, take_array, write_npz_atomic
from turbofed.layout import N_SENSORS
from turbofed.spec import FeatureSpec, FleetStats
from turbofed.topics import natural_key


class TrainingBuffer:
    """Labelled histories: per engine, cycles, 21 sensors and the RUL at each cycle."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.engines: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
        self.dropped_engines = 0

    @property
    def rows(self) -> int:
        return sum(len(c) for _, c, _, _ in self.engines)

    def add(self, engine: str, cycles: np.ndarray, sensors: np.ndarray, rul: np.ndarray) -> None:
        self.engines.append((engine, np.asarray(cycles, dtype=np.int64), np.asarray(sensors, dtype=float), np.asarray(rul, dtype=float)))
        while self.rows > self.max_rows and len(self.engines) > 1:
            self.engines.pop(0)
            self.dropped_engines += 1

    def in_engine_order(self) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
        """Engines sorted by id (FD001-train-2 before FD001-train-10), not by failure time:
        the same data then trains the same model, however the failures were interleaved."""
        return sorted(self.engines, key=lambda e: natural_key(e[0]))

    def stats(self, window: int) -> FleetStats:
        """This site's fleet statistics for features over a `window`-cycle window."""
        return histories_stats(((c, s, r) for _, c, s, r in self.in_engine_order()), window)

    def training_rows(self, spec: FeatureSpec) -> tuple[np.ndarray, np.ndarray]:
        """Features (float32) and RUL of every buffered cycle under `spec`."""
        return _rows(spec, self.in_engine_order())

    def scoring_rows(self, spec: FeatureSpec, max_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Features and RUL of the engines that failed first, up to about `max_rows` cycles
        (whole engines, at least one): a cheap sample for scoring a model, and the same one
        from version to version until the buffer overflows, so scores compare like with like."""
        first, rows = [], 0
        for engine in self.engines:
            if first and rows + len(engine[1]) > max_rows:
                break
            first.append(engine)
            rows += len(engine[1])
        return _rows(spec, first)

    def save(self, path: Path) -> None:
        save_histories(path, [(e, c, s, r) for e, c, s, r in self.engines], extra={"dropped": self.dropped_engines})

    @classmethod
    def load(cls, path: Path, max_rows: int) -> "TrainingBuffer":
        buf = cls(max_rows)
        histories, extra = load_histories(path)
        buf.engines = [(e, c, s, r) for e, c, s, r in histories]
        buf.dropped_engines = int(extra.get("dropped", 0))
        return buf


History = tuple[str, np.ndarray, np.ndarray, np.ndarray]  # engine, cycles, sensors (n, 21), RUL


HISTORY_ARRAYS = ("names", "lengths", "cycles", "sensors", "rul")


def _rows(spec: FeatureSpec, engines: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if not engines:
        return np.zeros((0, spec.n_features), dtype=np.float32), np.zeros(0)
    x = np.vstack([run_features(spec, c, s) for _, c, s, _ in engines]).astype(np.float32)
    return x, np.concatenate([r for _, _, _, r in engines])


def save_histories(path: Path, histories: list[History], extra: dict[str, int] | None = None) -> None:
    """Engine histories in one .npz, written atomically (a crash leaves the old file)."""
    names = np.array([h[0] for h in histories], dtype=str)
    lengths = np.array([len(h[1]) for h in histories], dtype=np.int64)
    join = lambda k, empty: np.concatenate([h[k] for h in histories]) if histories else empty  # noqa: E731
    arrays = dict(names=names, lengths=lengths, cycles=join(1, np.zeros(0, np.int64)), sensors=join(2, np.zeros((0, N_SENSORS))), rul=join(3, np.zeros(0)))
    write_npz_atomic(path, {**arrays, **{k: np.int64(v) for k, v in (extra or {}).items()}})


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
