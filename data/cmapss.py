"""NASA C-MAPSS files: parse, validate, and split into engine runs.

A row is 26 space-separated numbers: unit, cycle, 3 operational settings, 21 sensors.
Train runs end at failure; test runs stop early and the RUL file gives each one's true
remaining life at its last cycle. Errors name the file and line so a user can fix it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from turbofed.config import resolve_data_dir
from turbofed.errors import DataError
from turbofed.layout import N_SENSORS, N_SETTINGS

N_COLUMNS = 2 + N_SETTINGS + N_SENSORS  # unit, cycle, settings, sensors
SUBSETS = ("FD001", "FD002", "FD003", "FD004")
FETCH_HINT = "run `turbofed data fetch`, or point --data-dir / TURBOFED_DATA_DIR at a folder holding it"


@dataclass
class EngineRun:
    """One engine's consecutive cycles. `rul_at_end` is 0 for a run to failure."""

    unit: int
    cycles: np.ndarray  # (n,) int
    settings: np.ndarray  # (n, 3)
    sensors: np.ndarray  # (n, 21)
    rul_at_end: float

    def __len__(self) -> int:
        return len(self.cycles)

    def rul(self) -> np.ndarray:
        """True RUL at every cycle of the run (uncapped)."""
        return self.rul_at_end + (self.cycles[-1] - self.cycles).astype(float)

    def rows(self) -> np.ndarray:
        """The run back in C-MAPSS layout, (n, 26)."""
        unit = np.full((len(self), 1), self.unit, dtype=float)
        return np.hstack([unit, self.cycles[:, None].astype(float), self.settings, self.sensors])

    def cut(self, n: int, unit: int | None = None) -> "EngineRun":
        """The first n cycles, as a test run whose truth is the remaining life."""
        return EngineRun(
            unit=self.unit if unit is None else unit,
            cycles=self.cycles[:n].copy(),
            settings=self.settings[:n].copy(),
            sensors=self.sensors[:n].copy(),
            rul_at_end=float(self.rul_at_end + self.cycles[-1] - self.cycles[n - 1]),
        )


@dataclass
class Subset:
    """A C-MAPSS subset: training runs to failure and (when present) test runs."""

    name: str
    train: list[EngineRun]
    test: list[EngineRun] | None


def read_table(path: Path) -> np.ndarray:
    """Parse a C-MAPSS train/test file into an (N, 26) float array."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; {FETCH_HINT}")
    rows: list[list[str]] = []
    with open(path, encoding="ascii", errors="replace") as handle:
        for lineno, line in enumerate(handle, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != N_COLUMNS:
                raise DataError(f"{path}:{lineno}: expected {N_COLUMNS} numbers, found {len(parts)}")
            rows.append(parts)
    if not rows:
        raise DataError(f"{path}: file holds no rows")
    try:
        table = np.array(rows, dtype=float)
    except ValueError:
        _raise_first_non_number(path, rows)
    if not np.all(np.isfinite(table)):
        _raise_first_non_number(path, rows)
    return table


def _raise_first_non_number(path: Path, rows: list[list[str]]) -> None:
    # Blank lines were skipped, so recount line numbers from the file itself.
    with open(path, encoding="ascii", errors="replace") as handle:
        for lineno, line in enumerate(handle, start=1):
            for column, token in enumerate(line.split(), start=1):
                try:
                    value = float(token)
                except ValueError:
                    value = float("nan")
                if not np.isfinite(value):
                    raise DataError(f"{path}:{lineno}: column {column} is not a finite number: {token!r}")
    raise DataError(f"{path}: holds a value that is not a number")


def split_runs(table: np.ndarray, path: Path, rul_at_end: np.ndarray | None = None) -> list[EngineRun]:
    """Group rows by unit (in file order) and check cycles increase within each engine."""
    units = table[:, 0].astype(int)
    starts = np.flatnonzero(np.r_[True, units[1:] != units[:-1]])
    ends = np.r_[starts[1:], len(units)]
    seen: set[int] = set()
    runs = []
    for k, (a, b) in enumerate(zip(starts, ends)):
        unit = int(units[a])
        if unit in seen:
            raise DataError(f"{path}:{a + 1}: engine {unit} appears again after other engines")
        seen.add(unit)
        cycles = table[a:b, 1].astype(int)
        bad = np.flatnonzero(np.diff(cycles) <= 0)
        if bad.size:
            line = a + bad[0] + 2
            raise DataError(
                f"{path}:{line}: cycles of engine {unit} do not increase "
                f"({cycles[bad[0]]} then {cycles[bad[0] + 1]})"
            )
        runs.append(
            EngineRun(
                unit=unit,
                cycles=cycles,
                settings=table[a:b, 2 : 2 + N_SETTINGS],
                sensors=table[a:b, 2 + N_SETTINGS :],
                rul_at_end=0.0 if rul_at_end is None else float(rul_at_end[k]),
            )
        )
    return runs


def read_rul(path: Path) -> np.ndarray:
    """Parse a RUL file: one non-negative number per line, one line per test engine."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; {FETCH_HINT}")
    values = []
    with open(path, encoding="ascii", errors="replace") as handle:
        for lineno, line in enumerate(handle, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 1:
                raise DataError(f"{path}:{lineno}: expected one number, found {len(parts)}")
            try:
                value = float(parts[0])
            except ValueError:
                raise DataError(f"{path}:{lineno}: not a number: {parts[0]!r}") from None
            if not np.isfinite(value) or value < 0:
                raise DataError(f"{path}:{lineno}: RUL must be a non-negative number, got {parts[0]!r}")
            values.append(value)
    return np.array(values)


def load_subset(name: str, data_dir: str | os.PathLike | None = None, require_test: bool = False) -> Subset:
    """Load train (required) and test + RUL (when both files are present) of one subset."""
    folder = resolve_data_dir(data_dir)
    train_path = folder / f"train_{name}.txt"
    train = split_runs(read_table(train_path), train_path)
    test_path, rul_path = folder / f"test_{name}.txt", folder / f"RUL_{name}.txt"
    if not (test_path.is_file() and rul_path.is_file()):
        if require_test or test_path.is_file() != rul_path.is_file():
            missing = rul_path if test_path.is_file() else test_path
            raise DataError(f"{missing}: file not found; {FETCH_HINT}")
        return Subset(name, train, None)
    truth = read_rul(rul_path)
    test_table = read_table(test_path)
    n_test = len(np.unique(test_table[:, 0]))
    if len(truth) != n_test:
        raise DataError(f"{rul_path}: holds {len(truth)} RUL values but {test_path} has {n_test} engines")
    return Subset(name, train, split_runs(test_table, test_path, truth))
