"""RUL evaluation metrics used across the literature, the agents and the dashboard."""

from __future__ import annotations

import numpy as np

RUL_CAP = 125.0


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
