"""A user strategy outside turbofed: the coordinate-wise median.

Loaded by name, never imported by turbofed: `name = "tests.plugins.median:Median"` in a
fleet.toml's [strategy] table (with tests/' parent folder on PYTHONPATH), or through an
entry point in the group `turbofed.strategies`.
"""

from __future__ import annotations

import numpy as np

from turbofed.aggregator.strategies import POSITIVE, SiteUpdate, Strategy
from turbofed.codec import Weights


class Median(Strategy):
    """Coordinate-wise median of the sites' weights, robust to a minority of bad updates.

    Yin, Chen, Ramchandran and Bartlett, "Byzantine-Robust Distributed Learning: Towards
    Optimal Statistical Rates", ICML 2018.

    Parameters:
        server_lr: how far to step from the current model toward the median, > 0
            (default 1.0: the median itself).
    """

    name = "median"
    ranges = {"server_lr": POSITIVE}

    def __init__(self, server_lr: float = 1.0) -> None:
        self.server_lr = server_lr

    def aggregate(self, current: Weights, updates: list[SiteUpdate]) -> Weights:
        out = {}
        for n, w in current.items():
            median = np.median([u.weights[n].astype(np.float64) for u in updates], axis=0)
            out[n] = (w + self.server_lr * (median - w)).astype(w.dtype)
        return out


def not_a_strategy() -> None:
    """Something an entry point could wrongly name: loading it is refused."""
