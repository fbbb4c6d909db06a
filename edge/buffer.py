"""A site's labelled training data: histories of failed engines, bounded, saved to disk.

Raw rows are kept (not features) because features depend on the fleet's feature spec,
which can arrive after the data. When the bound is reached the oldest engines go first.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edge.features import run_features
from turbofed.spec import FeatureSpec, FleetStats


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

    def stats(self) -> FleetStats:
        return sum((FleetStats.from_rows(c, s, r) for _, c, s, r in self.engines), FleetStats())

    def training_rows(self, spec: FeatureSpec) -> tuple[np.ndarray, np.ndarray]:
        """Features (float32) and RUL of every buffered cycle under `spec`."""
        if not self.engines:
            return np.zeros((0, spec.n_features), dtype=np.float32), np.zeros(0)
        x = np.vstack([run_features(spec, c, s) for _, c, s, _ in self.engines]).astype(np.float32)
        return x, np.concatenate([r for _, _, _, r in self.engines])

    def save(self, path: Path) -> None:
        """Write atomically: a crash mid-write leaves the previous file intact."""
        names = np.array([e for e, _, _, _ in self.engines], dtype=str)
        lengths = np.array([len(c) for _, c, _, _ in self.engines], dtype=np.int64)
        cat = (lambda i, w: np.concatenate([e[i] for e in self.engines]) if self.engines else np.zeros((0,) if w == 1 else (0, w)))
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, names=names, lengths=lengths, cycles=cat(1, 1), sensors=cat(2, 21), rul=cat(3, 1), dropped=self.dropped_engines)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, max_rows: int) -> "TrainingBuffer":
        buf = cls(max_rows)
        if not path.exists():
            return buf
        with np.load(path) as data:
            bounds = np.r_[0, np.cumsum(data["lengths"])]
            for k, name in enumerate(data["names"]):
                a, b = bounds[k], bounds[k + 1]
                buf.engines.append((str(name), data["cycles"][a:b], data["sensors"][a:b], data["rul"][a:b]))
            buf.dropped_engines = int(data["dropped"])
        return buf
