"""Fleet statistics and window features, computed the same way streaming and in batch.

A model sees, for each engine and cycle, a window of the last W cycles of the informative
sensors (shorter histories padded with their first reading), summarised per sensor as the
mean of the last 5 cycles, the mean of the window and its slope, plus the engine's cycle
count. Summaries average out C-MAPSS's heavy sensor noise; on FD001 they beat a flattened
window (13.3 vs 14.7 RMSE, same MLP) with a tenth of the inputs.

Which sensors are informative, and how features are normalised, comes from fleet
statistics (turbofed/spec.py), which add up exactly across sites.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from turbofed.spec import FeatureSpec

RECENT = 5  # cycles averaged for the "current level" feature


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
    """One engine's last W readings, updated one cycle at a time (what the agent keeps).

    A (2W, S) buffer whose last W rows are always one contiguous block: a push writes a
    row twice (at i and i + W), so the features come straight from a view, without
    copying or stacking, in ~10 us. Results equal `run_features` bit for bit.
    """

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec
        self._columns = list(spec.sensors)
        self._buffer = np.empty((2 * spec.window, len(spec.sensors)))
        self._next = 0  # rows written so far
        self.cycle = 0

    def push(self, cycle: int, sensors: np.ndarray) -> None:
        """Add one reading (all 21 sensors)."""
        row = np.asarray(sensors, dtype=float)[self._columns]
        w = self.spec.window
        if self._next == 0:
            self._buffer[:] = row  # pad with the first reading
        i = self._next % w
        self._buffer[i] = row
        self._buffer[i + w] = row
        self._next += 1
        self.cycle = int(cycle)

    def window(self) -> np.ndarray:
        """The last W readings, oldest first, as a view."""
        start = self._next % self.spec.window
        return self._buffer[start : start + self.spec.window]

    def features(self) -> np.ndarray:
        """The (F,) raw features at the latest cycle."""
        return window_features(self.window()[None], np.array([self.cycle]))[0]
