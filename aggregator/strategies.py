"""Aggregation strategies: merge site updates into the next global model.

A strategy sees only weights by initializer name (numpy arrays) and sample counts, never
scikit-learn, so any model that exports to ONNX can be federated. A new algorithm is one
class with one method:

    class MyStrategy(Strategy):
        name = "mine"
        def aggregate(self, current, updates):  # -> next global weights
            ...

`current` is the global model the sites started the round from; `updates` are what the
sites sent back, already validated against it. Server-side optimisers (FedAvgM,
FedAdam) treat the sample-weighted mean of the updates minus `current` as a
pseudo-gradient (Reddi et al., "Adaptive Federated Optimization", 2021).
`aggregate_onnx` is the ONNX-in, ONNX-out entry the aggregator service calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from turbofed.codec import Weights, check_weights, read_weights, replace_weights


@dataclass(frozen=True)
class SiteUpdate:
    """One site's trained weights and how many samples they were trained on."""

    site: str
    weights: Weights
    samples: int


class Strategy:
    """Base class: `aggregate(current, updates) -> next global weights`."""

    name = "base"

    def aggregate(self, current: Weights, updates: list[SiteUpdate]) -> Weights:
        raise NotImplementedError

    def state(self) -> dict[str, np.ndarray]:
        """Server-side optimiser state, for checkpoints (empty for stateless strategies)."""
        return {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what `state()` returned."""


def weighted_mean(updates: list[SiteUpdate]) -> Weights:
    """Sample-weighted average of the updates' weights, computed in float64."""
    if not updates:
        raise ValueError("no updates to aggregate")
    total = float(sum(u.samples for u in updates))
    if total <= 0:
        raise ValueError("updates carry no samples")
    names = updates[0].weights
    return {n: sum(u.weights[n].astype(np.float64) * (u.samples / total) for u in updates) for n in names}


class FedAvg(Strategy):
    """Federated averaging (McMahan et al., 2017): the sample-weighted mean."""

    name = "fedavg"

    def aggregate(self, current: Weights, updates: list[SiteUpdate]) -> Weights:
        mean = weighted_mean(updates)
        return {n: mean[n].astype(current[n].dtype) for n in current}


class FedAvgM(Strategy):
    """FedAvg with server momentum (Hsu et al., 2019): steadier on non-IID fleets."""

    name = "fedavgm"

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.5) -> None:
        self.server_lr, self.momentum = server_lr, momentum
        self.velocity: Weights = {}

    def aggregate(self, current: Weights, updates: list[SiteUpdate]) -> Weights:
        mean = weighted_mean(updates)
        out = {}
        for n, w in current.items():
            delta = mean[n] - w.astype(np.float64)
            v = self.momentum * self.velocity.get(n, np.zeros_like(delta)) + delta
            self.velocity[n] = v
            out[n] = (w + self.server_lr * v).astype(w.dtype)
        return out

    def state(self) -> dict[str, np.ndarray]:
        return {f"velocity/{n}": v for n, v in self.velocity.items()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.velocity = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith("velocity/")}


class FedAdam(Strategy):
    """Server-side Adam on the pseudo-gradient (Reddi et al., 2021)."""

    name = "fedadam"

    def __init__(self, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        self.server_lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau
        self.m: Weights = {}
        self.v: Weights = {}

    def aggregate(self, current: Weights, updates: list[SiteUpdate]) -> Weights:
        mean = weighted_mean(updates)
        out = {}
        for n, w in current.items():
            delta = mean[n] - w.astype(np.float64)
            self.m[n] = self.beta1 * self.m.get(n, np.zeros_like(delta)) + (1 - self.beta1) * delta
            self.v[n] = self.beta2 * self.v.get(n, np.zeros_like(delta)) + (1 - self.beta2) * delta * delta
            out[n] = (w + self.server_lr * self.m[n] / (np.sqrt(self.v[n]) + self.tau)).astype(w.dtype)
        return out

    def state(self) -> dict[str, np.ndarray]:
        return {**{f"m/{n}": a for n, a in self.m.items()}, **{f"v/{n}": a for n, a in self.v.items()}}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.m = {k[2:]: a for k, a in state.items() if k.startswith("m/")}
        self.v = {k[2:]: a for k, a in state.items() if k.startswith("v/")}


STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (FedAvg, FedAvgM, FedAdam)}


def make_strategy(name: str) -> Strategy:
    """The strategy registered under `name`, with its default settings."""
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}") from None


def merge(strategy: Strategy, current: onnx.ModelProto, updates: list[SiteUpdate]) -> onnx.ModelProto:
    """The next global model: `current` with its weights replaced by the strategy's merge."""
    return replace_weights(current, strategy.aggregate(read_weights(current), updates))


def aggregate_onnx(strategy: Strategy, current: onnx.ModelProto, updates: list[tuple[str, bytes, int]]) -> onnx.ModelProto:
    """ONNX in, ONNX out: parse each (site, model bytes, samples), check it, merge, re-emit."""
    reference = read_weights(current)
    site_updates = []
    for site, data, samples in updates:
        weights = read_weights(onnx.load_model_from_string(data))
        check_weights(weights, reference)
        site_updates.append(SiteUpdate(site, weights, samples))
    return merge(strategy, current, site_updates)
