"""A strategy that wrecks one chosen round, for the rollback test only (never installed):
FedAvg, except that round `bad_round`'s result is the FedAvg weights plus `shift` in every
weight, the kind of model a bug or a poisoned merge produces. The aggregator cannot tell
from the weights; the sites' scores of the model must."""

from __future__ import annotations

import math

from turbofed.aggregator.strategies import Range, SiteUpdate, Strategy, weighted_mean
from turbofed.codec import Weights


class SabotageOnce(Strategy):
    """FedAvg whose `bad_round`-th aggregation (1 = the first) adds `shift` to every weight.

    Parameters:
        bad_round: which aggregation to wreck, >= 1 (default 2).
        shift: added to every weight of that result (default 3.0).
    """

    name = "sabotage-once"
    ranges = {"bad_round": Range(1, math.inf), "shift": Range(-math.inf, math.inf)}

    def __init__(self, bad_round: int = 2, shift: float = 3.0) -> None:
        self.bad_round, self.shift = bad_round, shift
        self.calls = 0

    def aggregate(self, current: Weights, updates: list[SiteUpdate]) -> Weights:
        self.calls += 1
        merged = weighted_mean(updates)
        if self.calls == self.bad_round:
            merged = {n: w + self.shift for n, w in merged.items()}
        return {n: w.astype(current[n].dtype) for n, w in merged.items()}
