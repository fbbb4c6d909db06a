"""RUL evaluation metrics used across the literature, the agents and the dashboard."""

from __future__ import annotations

import numpy as np

RUL_CAP = 125.0
# NASA cut its test engines some time before failure: on FD001 the shortest observed
# history is 31 cycles and the true RUL runs from 7 to 145. Held-out and calibration engines
# are cut the same way: a true RUL drawn uniformly from [5, 150], at least 31 cycles observed.
MIN_OBSERVED_CYCLES = 31
MIN_TRUE_RUL, MAX_TRUE_RUL = 5, 150


def nasa_cut_rul(length: int, rng: np.random.Generator, size: int | None = None) -> np.ndarray:
    """True RUL(s) at which a run to failure of `length` cycles is cut, as NASA cut its test
    engines (uniform in [MIN_TRUE_RUL, MAX_TRUE_RUL], at least MIN_OBSERVED_CYCLES observed;
    a run too short for both keeps MIN_TRUE_RUL and at least one cycle)."""
    longest = max(MIN_TRUE_RUL, min(MAX_TRUE_RUL, length - MIN_OBSERVED_CYCLES))
    rul = rng.integers(MIN_TRUE_RUL, longest + 1, size=size)
    return np.minimum(rul, length - 1)


def rmse(predicted: np.ndarray, true: np.ndarray) -> float:
    """Root mean squared error of RUL predictions, in cycles."""
    d = np.asarray(predicted, dtype=float) - np.asarray(true, dtype=float)
    return float(np.sqrt(np.mean(d * d))) if d.size else float("nan")


def phm08_score(predicted: np.ndarray, true: np.ndarray) -> float:
    """PHM08 challenge score: late predictions (d >= 0) cost more than early ones."""
    d = np.asarray(predicted, dtype=float) - np.asarray(true, dtype=float)
    return float(np.sum(np.where(d < 0, np.exp(-d / 13.0) - 1.0, np.exp(d / 10.0) - 1.0)))


def rul_metrics(predicted: np.ndarray, true: np.ndarray, cap: float = RUL_CAP) -> dict[str, float]:
    """The benchmark's metric map: RMSE against the truth as is, against capped truth, PHM08."""
    true = np.asarray(true, dtype=float)
    return {
        "rmse": round(rmse(predicted, true), 4),
        "rmse_capped": round(rmse(predicted, np.minimum(true, cap)), 4),
        "score": round(phm08_score(predicted, true), 2),
    }
