"""Aggregation strategies: merge site updates into the next global model.

A strategy sees only weights by initializer name (numpy arrays) and sample counts, never
scikit-learn, so any model that exports to ONNX can be federated. A new algorithm is one
class with one method (and, if it has settings, a constructor taking them):

    class MyStrategy(Strategy):
        name = "mine"
        ranges = {"server_lr": POSITIVE}
        def __init__(self, server_lr: float = 1.0) -> None:
            self.server_lr = server_lr          # kept under its own name: recorded per run
        def aggregate(self, current, updates):  # -> next global weights
            ...

`current` is the global model the sites started the round from; `updates` are what the
sites sent back, already validated against it. Server-side optimisers (FedAvgM,
FedAdam) treat the sample-weighted mean of the updates minus `current` as a
pseudo-gradient (Reddi et al., "Adaptive Federated Optimization", 2021).
`aggregate_onnx` is the ONNX-in, ONNX-out entry the aggregator service calls.

Choosing and configuring one (fleet.toml):

    [strategy]
    name = "fedavgm"        # built in: fedavg | fedavgm | fedadam
    server_lr = 1.0         # every other key is a constructor parameter
    momentum = 0.9

`strategy = "fedavg"` (a plain name, no parameters) still works. `name` is resolved by
`make_strategy` in this order: a built-in name; `"package.module:ClassName"`, imported
(the module must be importable by the aggregator, e.g. installed or on PYTHONPATH); an
entry point of that name in the group `turbofed.strategies` (never shadowing a built-in
name), which is how an installed distribution offers a strategy without editing turbofed:

    [project.entry-points."turbofed.strategies"]
    median = "mypkg.robust:Median"

The class must subclass `Strategy`. Parameters are the keyword parameters of its
`__init__`: each is checked before anything starts against the annotation (float, int,
bool or str) and the class's `ranges`; unknown names, wrong types and values out of range
are one-line `ConfigError`s naming the file and key. A strategy keeps each parameter as
an attribute of the same name (scikit-learn's `get_params` convention), so `parameters()`
reports what a run used: the aggregator records it in its "started" event, in every
round row of the results store and in every registry checkpoint.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx

from turbofed.codec import Weights, flatten, load_compatible, read_weights, replace_weights
from turbofed.errors import ConfigError

ENTRY_POINT_GROUP = "turbofed.strategies"


@dataclass(frozen=True)
class SiteUpdate:
    """One site's trained weights and how many samples they were trained on."""

    site: str
    weights: Weights
    samples: int


@dataclass(frozen=True)
class Range:
    """The interval a numeric parameter must lie in; `Range(0, 1, high_open=True)` is [0, 1)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        def bound(x: float) -> str:
            return ("-inf" if x < 0 else "inf") if math.isinf(x) else f"{x:g}"

        return f"{'(' if self.low_open else '['}{bound(self.low)}, {bound(self.high)}{')' if self.high_open else ']'}"


POSITIVE = Range(0.0, math.inf, low_open=True, high_open=True)
FRACTION = Range(0.0, 1.0, high_open=True)  # a decay rate: 1 would never forget


class Strategy:
    """Base class: `aggregate(current, updates) -> next global weights`.

    Subclasses take their settings as keyword parameters of `__init__` with defaults and
    type annotations, keep each under its own attribute name, and declare numeric limits in
    `ranges`; that is all `make_strategy` needs to check a fleet.toml against them.
    """

    name: ClassVar[str] = "base"
    ranges: ClassVar[Mapping[str, Range]] = {}

    def aggregate(self, current: Weights, updates: list[SiteUpdate]) -> Weights:
        raise NotImplementedError

    def parameters(self) -> dict[str, Any]:
        """The constructor parameters this instance runs with, for the run's records."""
        return {n: getattr(self, n) for n in constructor_parameters(type(self))}

    def state(self) -> dict[str, np.ndarray]:
        """Server-side optimiser state, for checkpoints (empty for stateless strategies)."""
        return {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what `state()` returned."""


ACTIONS = ("kept", "clipped", "trimmed", "excluded")  # what a strategy did with a site's update


def stacked_deltas(current: Weights, updates: list[SiteUpdate]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The tensor names, the current weights as one vector, and one row per update of its
    delta (update minus current): what every strategy over deltas starts from."""
    names = list(current)
    base = flatten(current, names)
    return names, base, np.stack([flatten(u.weights, names) - base for u in updates])


def site_report(updates: list[SiteUpdate], deltas: np.ndarray, combined: np.ndarray, actions: list[str]) -> dict[str, dict[str, Any]]:
    """Per site: delta norm, cosine to the aggregate delta (None when either is zero), action."""
    total = float(np.linalg.norm(combined))
    report = {}
    for u, d, action in zip(updates, deltas, actions):
        norm = float(np.linalg.norm(d))
        cosine = float(d @ combined / (norm * total)) if norm > 0 and total > 0 else None
        report[u.site] = {"norm": norm, "cosine": cosine, "action": action}
    return report


def round_report(strategy: "Strategy", current: Weights, updates: list[SiteUpdate], merged: Weights) -> dict[str, dict[str, Any]]:
    """Per site, for the round's records: its delta's norm, the cosine of its delta to the
    aggregate delta (merged - current), and what the strategy did with it. A robust strategy
    measured all of it while merging (`last_report`); the FedAvg family keeps every update."""
    measured = getattr(strategy, "last_report", None)
    if measured and set(measured) == {u.site for u in updates}:
        return measured
    names, base, deltas = stacked_deltas(current, updates)
    return site_report(updates, deltas, flatten(merged, names) - base, ["kept"] * len(updates))


def weighted_mean(updates: list[SiteUpdate]) -> Weights:
    """Sample-weighted average of the updates' weights, computed in float64."""
    if not updates:
        raise ValueError("no updates to aggregate")
    total = float(sum(u.samples for u in updates))
    if total <= 0:
        raise ValueError("updates carry no samples")
    names = updates[0].weights
    return {n: sum(u.weights[n].astype(np.float64) * (u.samples / total) for u in updates) for n in names}


def clip_scales(norms: np.ndarray, clip: float) -> np.ndarray:
    """Per update, the factor that brings its delta norm down to `clip` x the round's median
    delta norm (norm bounding, Sun et al., "Can You Really Backdoor Federated Learning?",
    2019); 1 for those within it, and for all when `clip` is 0 (off)."""
    if clip <= 0 or len(norms) == 0:
        return np.ones(len(norms))
    bound = clip * float(np.median(norms))
    return np.where(norms > bound, bound / np.maximum(norms, 1e-300), 1.0)


class ServerOptimizer(Strategy):
    """Base of FedAvgM and FedAdam: the round's mean update, after optional norm clipping of
    each site's delta (`clip`), feeds a server-side optimiser step."""

    clip: float = 0.0

    def mean_delta(self, current: Weights, updates: list[SiteUpdate]) -> Weights:
        """Sample-weighted mean of the (clipped) updates minus the current weights, per tensor;
        what was clipped is reported per site (`last_report`)."""
        names, base, deltas = stacked_deltas(current, updates)
        scales = clip_scales(np.linalg.norm(deltas, axis=1), self.clip)
        clipped = [SiteUpdate(u.site, {n: current[n].astype(np.float64) + s * (u.weights[n].astype(np.float64) - current[n])
                                       for n in names}, u.samples) for u, s in zip(updates, scales)]
        mean = weighted_mean(clipped)
        delta = {n: mean[n] - current[n].astype(np.float64) for n in names}
        self.last_report = site_report(updates, deltas, flatten(delta, names), ["clipped" if s < 1.0 else "kept" for s in scales])
        return delta


class FedAvg(Strategy):
    """Federated averaging: the sample-weighted mean of the sites' weights.

    McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
    Data", AISTATS 2017. No parameters.
    """

    name = "fedavg"

    def aggregate(self, current: Weights, updates: list[SiteUpdate]) -> Weights:
        mean = weighted_mean(updates)
        return {n: mean[n].astype(current[n].dtype) for n in current}


class FedAvgM(ServerOptimizer):
    """FedAvg with server momentum: steadier on non-IID fleets.

    Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for
    Federated Visual Classification", 2019 (arXiv:1909.06335).

    Parameters:
        server_lr: step size applied to the velocity, > 0 (default 1.0; 1.0 with momentum 0
            is FedAvg).
        momentum: how much of the previous velocity each round keeps, in [0, 1) (default 0.5).
        clip: bound each site's delta to this multiple of the round's median delta norm before
            averaging, >= 0 (default 0: off; 2.0 is a common choice).
    """

    name = "fedavgm"
    ranges = {"server_lr": POSITIVE, "momentum": FRACTION, "clip": Range(0.0, math.inf)}

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.5, clip: float = 0.0) -> None:
        self.server_lr, self.momentum, self.clip = server_lr, momentum, clip
        self.velocity: Weights = {}

    def aggregate(self, current: Weights, updates: list[SiteUpdate]) -> Weights:
        mean_delta = self.mean_delta(current, updates)
        out = {}
        for n, w in current.items():
            delta = mean_delta[n]
            v = self.momentum * self.velocity.get(n, np.zeros_like(delta)) + delta
            self.velocity[n] = v
            out[n] = (w + self.server_lr * v).astype(w.dtype)
        return out

    def state(self) -> dict[str, np.ndarray]:
        return {f"velocity/{n}": v for n, v in self.velocity.items()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.velocity = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith("velocity/")}


class FedAdam(ServerOptimizer):
    """Server-side Adam on the pseudo-gradient (mean of the updates minus the global model).

    Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (Algorithm 2, FedAdam).

    Parameters:
        server_lr: server step size eta, > 0 (default 0.01).
        beta1: decay of the first moment, in [0, 1) (default 0.9).
        beta2: decay of the second moment, in [0, 1) (default 0.99).
        tau: adaptivity (the epsilon under the square root's sum), > 0 (default 1e-3).
        clip: bound each site's delta to this multiple of the round's median delta norm before
            averaging, >= 0 (default 0: off).
    """

    name = "fedadam"
    ranges = {"server_lr": POSITIVE, "beta1": FRACTION, "beta2": FRACTION, "tau": POSITIVE, "clip": Range(0.0, math.inf)}

    def __init__(self, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3, clip: float = 0.0) -> None:
        self.server_lr, self.beta1, self.beta2, self.tau, self.clip = server_lr, beta1, beta2, tau, clip
        self.m: Weights = {}
        self.v: Weights = {}

    def aggregate(self, current: Weights, updates: list[SiteUpdate]) -> Weights:
        mean_delta = self.mean_delta(current, updates)
        out = {}
        for n, w in current.items():
            delta = mean_delta[n]
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


def builtin_strategies() -> dict[str, type[Strategy]]:
    """The strategies turbofed ships: the FedAvg family here, the robust ones in robust.py
    (which builds on this module, hence imported here, not at the top)."""
    from turbofed.aggregator.robust import ROBUST

    return {**STRATEGIES, **ROBUST}


# --- finding and configuring a strategy ------------------------------------------------------


def constructor_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The keyword parameters of `cls.__init__` (not self, *args or **kwargs)."""
    if cls.__init__ is object.__init__:
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return {p.name: p for p in params if p.kind in kinds}


def make_strategy(name: str, params: Mapping[str, Any] | None = None, where: str = "strategy") -> Strategy:
    """The strategy `name` (built in, "module:Class", or an entry point) built with `params`.

    Every refusal is a one-line ConfigError that starts with `where` (e.g. "fleet.toml:
    [strategy]") and names the key, so a bad fleet.toml stops the aggregator before it
    opens anything.
    """
    cls = find_strategy(name, where)
    values = check_parameters(cls, dict(params or {}), name, where)
    try:
        strategy = cls(**values)
    except Exception as exc:  # the class is user code: any refusal is a config problem
        raise ConfigError(f"{where}: strategy {name!r} refused its parameters: {_one_line(exc)}") from None
    try:
        strategy.parameters()
    except AttributeError as exc:
        raise ConfigError(f"{where}: strategy {name!r} does not keep its parameters as attributes of the same "
                          f"name, so a run could not record them ({_one_line(exc)})") from None
    return strategy


def find_strategy(name: str, where: str = "strategy") -> type[Strategy]:
    """The Strategy subclass `name` stands for: built in, "module:Class", or an entry point."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where} name must be a non-empty string, got {name!r}")
    builtin = builtin_strategies()
    if name in builtin:
        return builtin[name]
    if ":" in name:
        obj = _import_object(name, where)
    else:
        found = {ep.value: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=name)}
        if not found:
            raise ConfigError(f"{where} name: unknown strategy {name!r}; choose one of {', '.join(_known_names())}, "
                              "or give \"package.module:ClassName\"")
        if len(found) > 1:
            raise ConfigError(f"{where} name: strategy {name!r} is offered by several entry points in group "
                              f"{ENTRY_POINT_GROUP} ({', '.join(sorted(found))}); give \"package.module:ClassName\"")
        (ep,) = found.values()
        try:
            obj = ep.load()
        except Exception as exc:
            raise ConfigError(f"{where} name: entry point {name!r} ({ep.value}) cannot be loaded: "
                              f"{type(exc).__name__}: {_one_line(exc)}") from None
    if not (isinstance(obj, type) and issubclass(obj, Strategy)):
        raise ConfigError(f"{where} name: {name!r} is not a Strategy subclass "
                          f"(it is {_describe(obj)}); subclass turbofed.aggregator.strategies.Strategy")
    return obj


def _import_object(path: str, where: str) -> object:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{where} name: {path!r} must look like \"package.module:ClassName\"")
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, but also whatever the module raises while importing
        raise ConfigError(f"{where} name: cannot import module {module_name!r} for strategy {path!r}: "
                          f"{type(exc).__name__}: {_one_line(exc)}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{where} name: module {module_name!r} has no attribute {attr!r}") from None
    return obj


def _known_names() -> list[str]:
    builtin = builtin_strategies()
    installed = sorted({ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)} - set(builtin))
    return list(builtin) + installed


_TYPES: dict[type, str] = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}


def check_parameters(cls: type[Strategy], params: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    """`params` checked against `cls`'s constructor (names, types) and `cls.ranges`."""
    accepted = constructor_parameters(cls)
    takes_any = cls.__init__ is not object.__init__ and any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())
    unknown = sorted(set(params) - set(accepted))
    if unknown and not takes_any:
        known = f"known: {', '.join(sorted(accepted))}" if accepted else "it takes no parameters"
        raise ConfigError(f"{where} {unknown[0]}: unknown parameter for strategy {name!r}; {known}")
    missing = sorted(n for n, p in accepted.items() if p.default is inspect.Parameter.empty and n not in params)
    if missing:
        raise ConfigError(f"{where}: strategy {name!r} needs parameter(s) {', '.join(missing)}")
    hints = _hints(cls)
    values = {}
    for key, value in params.items():
        default = accepted[key].default if key in accepted else None
        expected = hints.get(key) or (type(default) if default not in (None, inspect.Parameter.empty) else None)
        if expected in _TYPES:
            value = _coerce(value, expected, key, where)
        bounds = cls.ranges.get(key)
        if bounds is not None and value not in bounds:
            raise ConfigError(f"{where} {key} must be in {bounds}, got {value!r}")
        values[key] = value
    return values


def _coerce(value: Any, expected: type, key: str, where: str) -> Any:
    ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if expected is float and ok and math.isnan(value):
        ok = False
    if not ok:
        raise ConfigError(f"{where} {key} must be {_TYPES[expected]}, got {value!r}")
    return value


def _hints(cls: type) -> dict[str, Any]:
    """The constructor's annotations, resolved where possible (a plugin's may not be)."""
    try:
        return typing.get_type_hints(cls.__init__)
    except Exception:
        return {}


def _describe(obj: object) -> str:
    if isinstance(obj, type):
        return f"the class {obj.__module__}.{obj.__qualname__}"
    return f"a {type(obj).__name__}"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def merge(strategy: Strategy, current: onnx.ModelProto, updates: list[SiteUpdate]) -> onnx.ModelProto:
    """The next global model: `current` with its weights replaced by the strategy's merge."""
    return replace_weights(current, strategy.aggregate(read_weights(current), updates))


def aggregate_onnx(strategy: Strategy, current: onnx.ModelProto, updates: list[tuple[str, bytes, int]]) -> onnx.ModelProto:
    """ONNX in, ONNX out: parse each (site, model bytes, samples), check it is `current`'s
    graph (codec.load_compatible), merge its weights, re-emit."""
    site_updates = [SiteUpdate(site, load_compatible(data, current), samples) for site, data, samples in updates]
    return merge(strategy, current, site_updates)
