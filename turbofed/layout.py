"""The data layout every part of turbofed agrees on, written once.

A reading (C-MAPSS row, MQTT sensor message, shared telemetry, store) carries 3 operational
settings and 21 sensors (Saxena et al., 2008, table 2). A model's features are blocks of
per-sensor summaries of a window (computed in `turbofed.edge.features`), block after block in
`FEATURE_BLOCKS` order, then the cycle count. Fleet statistics (`turbofed.spec`) cover the
features of all 21 sensors; a `FeatureSpec` picks the informative sensors' columns out of them
with `feature_columns`.
"""

from __future__ import annotations

from collections.abc import Sequence

N_SETTINGS = 3
N_SENSORS = 21
SETTING_NAMES = tuple(f"setting{i}" for i in range(1, N_SETTINGS + 1))
SENSOR_NAMES = tuple(f"s{i}" for i in range(1, N_SENSORS + 1))  # NASA's sensor numbering, 1-based

# Per sensor, in feature order: the mean of the last few cycles and the window mean (both as
# departures from the engine's own baseline), the window's least-squares slope, the baseline.
FEATURE_BLOCKS = ("recent", "window_mean", "slope", "baseline")
CYCLE_FEATURE = "cycle"
N_ALL_FEATURES = len(FEATURE_BLOCKS) * N_SENSORS + 1  # every sensor's blocks, then the cycle


def n_features(n_sensors: int) -> int:
    """How many features a model over `n_sensors` sensors takes."""
    return len(FEATURE_BLOCKS) * n_sensors + 1


def feature_columns(sensors: Sequence[int]) -> list[int]:
    """Columns of the all-sensor feature vector that a model over `sensors` (0-based) uses, in its order."""
    return [block * N_SENSORS + i for block in range(len(FEATURE_BLOCKS)) for i in sensors] + [N_ALL_FEATURES - 1]


def feature_names(sensors: Sequence[int]) -> list[str]:
    """Readable names of a model's features, e.g. "s7.slope", ..., "cycle"."""
    return [f"{SENSOR_NAMES[i]}.{block}" for block in FEATURE_BLOCKS for i in sensors] + [CYCLE_FEATURE]
