"""A site's share of federated conformal calibration (turbofed.conformal): the residual
histogram of a model on the site's calibration engines, never the residuals themselves.

Calibration engines are runs to failure the site held out of training. Each is scored at
`cuts` points drawn the way NASA cut its test engines (`turbofed.conformal.calibration_cuts`),
so the residuals follow the distribution of the predictions the intervals are for. The
benchmark and the agent both call `runs_histogram`: one implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from turbofed.conformal import Layout, ResidualHistogram, calibration_cuts
from turbofed.edge.features import LabelledRun, run_features
from turbofed.spec import FeatureSpec

CUTS_PER_ENGINE = 10  # residuals per calibration engine; more add little (they are correlated within an engine)


def calibration_points(spec: FeatureSpec, runs: Iterable[LabelledRun], rng: np.random.Generator,
                       cuts: int = CUTS_PER_ENGINE) -> tuple[np.ndarray, np.ndarray]:
    """(features, true RUL) at `cuts` NASA-like cut points of each run. The features of a
    history's row i are those of the history cut after row i (they look only backwards)."""
    xs, ys = [], []
    for run in runs:
        rows = calibration_cuts(len(run.cycles), rng, cuts)
        xs.append(run_features(spec, run.cycles, run.sensors, run.settings)[rows])
        ys.append(run.rul()[rows])
    if not xs:
        return np.zeros((0, spec.n_features), dtype=np.float32), np.zeros(0)
    return np.vstack(xs).astype(np.float32), np.concatenate(ys)


def runs_histogram(predict: Callable[[np.ndarray], np.ndarray], spec: FeatureSpec, runs: Iterable[LabelledRun],
                   layout: Layout, cap: float, rng: np.random.Generator, cuts: int = CUTS_PER_ENGINE) -> ResidualHistogram:
    """The residual histogram of `predict` on calibration `runs`."""
    return residual_histogram(predict, *calibration_points(spec, runs, rng, cuts), layout, cap)


def residual_histogram(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, y: np.ndarray, layout: Layout,
                       cap: float) -> ResidualHistogram:
    """The histogram of the residuals (capped truth - prediction clipped to [0, cap]) at the
    points `x` with true RUL `y`: the intervals are for the capped RUL."""
    if not len(y):
        return ResidualHistogram(layout)
    predicted = np.clip(np.asarray(predict(x), dtype=float).ravel(), 0.0, cap)
    return ResidualHistogram.from_residuals(layout, predicted, np.minimum(y, cap))


@dataclass(frozen=True)
class CalibrationRun:
    """A calibration engine's history as the agent keeps it (a `LabelledRun`)."""

    cycles: np.ndarray
    settings: np.ndarray
    sensors: np.ndarray
    rul_values: np.ndarray

    def rul(self) -> np.ndarray:
        return self.rul_values
