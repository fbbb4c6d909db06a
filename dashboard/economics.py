"""Maintenance-policy economics: what each policy would have cost on engines whose truth is known.

The dashboard exists to answer "does federation pay off?". Accuracy (RMSE) is one answer;
money is the one a fleet manager acts on. So we replay four policies over the recorded
predictions of every engine whose true end of life is known and count failures, life thrown
away by early removals, and a total cost from editable unit costs.

Conventions (kept simple and stated once, so the numbers can be checked by hand):

- An engine's end of life ``F`` is its truth cycle plus the true RUL recorded there (an
  engine that failed has RUL 0 at ``F``).
- Maintaining at cycle ``m < F`` removes the engine with ``F - m`` cycles of life left: that
  is its *wasted life*. Acting at ``m >= F`` is too late: the engine fails at ``F``.
- **run to failure**: every engine fails at ``F``.
- **fixed interval T**: maintain at cycle ``T`` (counted from the engine's first cycle).
- **model RUL <= k**: maintain at the first recorded cycle whose prediction is ``<= k``.
  Cycles without a prediction cannot trigger anything.
- **federated lower bound <= k**: the same on the lower end of the federated prediction's
  conformal interval (turbofed/conformal.py): act once the engine *may* be within k cycles of
  failure at the interval's coverage. Cycles without an interval cannot trigger anything.
- When an engine's data end before its end of life (a test engine whose RUL was revealed
  at its last cycle ``c``) and the model has not triggered by then, the maintenance is
  *scheduled* from its last prediction ``p`` (at cycle ``c_p``): at ``c_p + ceil(p - k)``,
  the first cycle at which that prediction, counting down one per cycle, reaches k. This is
  the C-MAPSS test convention (judge the prediction at the last cycle), applied the same way
  to both models. Only an engine with no prediction at all stays *open* (no cost, counted).

Pure functions over numpy arrays: no Streamlit, unit-tested with hand-computed values.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Model = Literal["local", "federated", "lower"]  # "lower": the federated RUL's conformal lower bound
Action = Literal["maintained", "failed", "open"]
MODELS: tuple[Model, ...] = ("local", "federated", "lower")
RUN_TO_FAILURE = "run to failure"
FIXED_INTERVAL = "fixed interval"


def threshold_policy_name(model: str) -> str:
    """Display name of "maintain when <model>'s RUL <= k"."""
    return "federated lower bound ≤ k" if model == "lower" else f"{model} RUL ≤ k"


POLICIES = (RUN_TO_FAILURE, FIXED_INTERVAL, *(threshold_policy_name(m) for m in MODELS))


@dataclass(frozen=True)
class Costs:
    """Unit costs, in whatever currency unit the user thinks in (defaults: k$).

    A failure in service is far dearer than a planned shop visit; a cycle of life removed
    early has a value too (the part could have flown it).
    """

    maintenance: float = 100.0
    failure: float = 1000.0
    wasted_cycle: float = 2.0


@dataclass(frozen=True)
class EngineLife:
    """One engine with known truth: its end of life and its predictions per recorded cycle."""

    site: str
    engine: str
    end_of_life: float
    observed_to_failure: bool
    cycles: np.ndarray  # ascending cycles whose truth is known
    local: np.ndarray  # predicted RUL per cycle; NaN = not predicted
    federated: np.ndarray
    lower: np.ndarray = field(default_factory=lambda: np.zeros(0))  # the federated RUL's lower bound; NaN/empty = none

    def predicted(self, model: Model) -> np.ndarray:
        """The model's predictions (or the lower bound) aligned with `cycles`."""
        if model == "lower":
            return self.lower if self.lower.size == self.cycles.size else np.full(self.cycles.size, np.nan)
        return self.local if model == "local" else self.federated


@dataclass(frozen=True)
class Outcome:
    """What a policy did to one engine: maintained at `cycle`, failed at `cycle`, or open."""

    action: Action
    cycle: float | None
    wasted: float = 0.0


@dataclass(frozen=True)
class PolicyResult:
    """A policy's totals over the engines: the row the economics table shows."""

    policy: str
    engines: int
    maintenances: int
    failures: int
    open: int
    wasted_cycles: float
    cost: float

    @property
    def cost_per_engine(self) -> float:
        """Cost per decided engine (open engines have no cost yet), NaN when none."""
        decided = self.engines - self.open
        return self.cost / decided if decided else float("nan")

    def as_row(self) -> dict[str, Any]:
        return {"policy": self.policy, "engines": self.engines, "maintenances": self.maintenances,
                "failures": self.failures, "open": self.open, "wasted_cycles": self.wasted_cycles,
                "cost": self.cost, "cost_per_engine": self.cost_per_engine}


def engine_lives(rows: Iterable[dict[str, Any]], include_revealed: bool = True) -> list[EngineLife]:
    """Turn the store's `engines_with_truth()` rows into arrays, one `EngineLife` per engine.

    Only cycles with a known truth count (a prediction after the truth cycle has nothing to
    be judged against). `include_revealed=False` keeps only engines observed to failure,
    whose outcomes need no scheduling assumption.
    """
    lives = []
    for e in rows:
        failed = float(e["truth_rul"]) <= 0.0
        if not failed and not include_revealed:
            continue
        preds = [p for p in e["predictions"] if p.get("true_rul") is not None]
        lives.append(EngineLife(
            site=str(e["site"]), engine=str(e["engine"]),
            end_of_life=float(e["truth_cycle"]) + float(e["truth_rul"]), observed_to_failure=failed,
            cycles=np.array([p["cycle"] for p in preds], dtype=float),
            local=np.array([np.nan if p["local"] is None else p["local"] for p in preds], dtype=float),
            federated=np.array([np.nan if p["federated"] is None else p["federated"] for p in preds], dtype=float),
            lower=np.array([np.nan if p.get("lower") is None else p["lower"] for p in preds], dtype=float)))
    return lives


def first_trigger(cycles: np.ndarray, predicted: np.ndarray, ks: Sequence[float] | np.ndarray) -> np.ndarray:
    """For each threshold k, the first cycle whose prediction is <= k (NaN when never).

    Vectorised over k so a whole cost-vs-k sweep stays cheap: the running minimum of the
    predictions is non-increasing, so the first cycle at or below k is a binary search.
    """
    ks = np.asarray(ks, dtype=float)
    if cycles.size == 0:
        return np.full(ks.shape, np.nan)
    running_min = np.minimum.accumulate(np.where(np.isnan(predicted), np.inf, predicted))
    idx = np.searchsorted(-running_min, -ks, side="left")  # first i with running_min[i] <= k
    padded = np.append(cycles.astype(float), np.nan)
    return padded[np.minimum(idx, cycles.size)]


def _act_at(life: EngineLife, cycle: float) -> Outcome:
    """Maintain at `cycle` if the engine still has life left there, else it has failed."""
    if cycle < life.end_of_life:
        return Outcome("maintained", cycle, life.end_of_life - cycle)
    return Outcome("failed", life.end_of_life)


def run_to_failure(life: EngineLife) -> Outcome:
    """Never maintain: the engine fails at its end of life."""
    return Outcome("failed", life.end_of_life)


def fixed_interval(life: EngineLife, interval: float) -> Outcome:
    """Maintain every `interval` cycles, whatever the models say."""
    if interval <= 0:
        raise ValueError(f"maintenance interval must be positive, got {interval}")
    return _act_at(life, float(interval))


def threshold_policy(life: EngineLife, model: Model, k: float) -> Outcome:
    """Maintain when `model`'s predicted RUL first drops to k or below."""
    trigger = float(first_trigger(life.cycles, life.predicted(model), [k])[0])
    return _outcome_from_trigger(life, trigger, model, k)


def scheduled_cycle(life: EngineLife, model: Model, ks: Sequence[float] | np.ndarray) -> np.ndarray:
    """For an engine whose data end early: the cycle its last prediction schedules maintenance
    at, for each k (`c_p + ceil(p - k)`, at least the next cycle); NaN without predictions."""
    ks = np.asarray(ks, dtype=float)
    predicted = life.predicted(model)
    known = np.flatnonzero(~np.isnan(predicted))
    if known.size == 0:
        return np.full(ks.shape, np.nan)
    last = known[-1]
    return life.cycles[last] + np.maximum(np.ceil(predicted[last] - ks), 1.0)


def _outcome_from_trigger(life: EngineLife, trigger: float, model: Model, k: float) -> Outcome:
    if not np.isnan(trigger):
        return _act_at(life, trigger)
    if life.observed_to_failure:
        return Outcome("failed", life.end_of_life)
    scheduled = float(scheduled_cycle(life, model, [k])[0])
    return Outcome("open", None) if np.isnan(scheduled) else _act_at(life, scheduled)


def summarize(policy: str, outcomes: Sequence[Outcome], costs: Costs) -> PolicyResult:
    """Count a policy's outcomes and price them."""
    maintenances = sum(o.action == "maintained" for o in outcomes)
    failures = sum(o.action == "failed" for o in outcomes)
    wasted = float(sum(o.wasted for o in outcomes))
    cost = maintenances * costs.maintenance + failures * costs.failure + wasted * costs.wasted_cycle
    return PolicyResult(policy, len(outcomes), maintenances, failures,
                        sum(o.action == "open" for o in outcomes), wasted, float(cost))


def policy_outcomes(lives: Sequence[EngineLife], k: float, interval: float) -> dict[str, list[Outcome]]:
    """Every policy's outcome on every engine, in `POLICIES` order."""
    out = {RUN_TO_FAILURE: [run_to_failure(e) for e in lives],
           FIXED_INTERVAL: [fixed_interval(e, interval) for e in lives]}
    for model in MODELS:
        out[threshold_policy_name(model)] = [threshold_policy(e, model, k) for e in lives]
    return out


def compare_policies(lives: Sequence[EngineLife], k: float, interval: float, costs: Costs) -> list[PolicyResult]:
    """The five policies side by side: the economics page's main table."""
    return [summarize(name, outcomes, costs) for name, outcomes in policy_outcomes(lives, k, interval).items()]


def engine_detail(lives: Sequence[EngineLife], k: float, interval: float) -> list[dict[str, Any]]:
    """Per engine, what each policy did: lets an engineer check a surprising total."""
    outcomes = policy_outcomes(lives, k, interval)
    rows = []
    for i, life in enumerate(lives):
        row: dict[str, Any] = {"site": life.site, "engine": life.engine, "end_of_life": life.end_of_life,
                               "observed_to_failure": life.observed_to_failure}
        for name, per_engine in outcomes.items():
            o = per_engine[i]
            row[name] = o.action if o.cycle is None else f"{o.action} @ {o.cycle:g}"
        rows.append(row)
    return rows


def cost_sweep(lives: Sequence[EngineLife], ks: Sequence[float] | np.ndarray, costs: Costs) -> list[dict[str, Any]]:
    """Failures, wasted life and cost of each model policy for every k in `ks`.

    This is the chart that shows where (and whether) federation pays: the cheapest k of
    each model, and how sensitive the cost is to the choice of k.
    """
    ks = np.asarray(ks, dtype=float)
    rows = []
    for model in MODELS:
        maint = np.zeros(ks.size, dtype=int)
        fail = np.zeros(ks.size, dtype=int)
        open_ = np.zeros(ks.size, dtype=int)
        wasted = np.zeros(ks.size)
        for life in lives:
            act = first_trigger(life.cycles, life.predicted(model), ks)
            if not life.observed_to_failure:  # data end early: schedule from the last prediction
                act = np.where(np.isnan(act), scheduled_cycle(life, model, ks), act)
            in_time = act < life.end_of_life  # NaN compares False
            maint += in_time
            wasted += np.where(in_time, life.end_of_life - act, 0.0)
            never = np.isnan(act)
            open_ += never & (not life.observed_to_failure)
            fail += ~in_time & ~(never & (not life.observed_to_failure))
        cost = maint * costs.maintenance + fail * costs.failure + wasted * costs.wasted_cycle
        rows += [{"k": float(ks[i]), "model": model, "maintenances": int(maint[i]), "failures": int(fail[i]),
                  "open": int(open_[i]), "wasted_cycles": float(wasted[i]), "cost": float(cost[i])}
                 for i in range(ks.size)]
    return rows


def cheapest_k(sweep: Sequence[dict[str, Any]], model: Model) -> dict[str, Any] | None:
    """The sweep row with the lowest cost for `model` (ties: fewer failures, then smaller k)."""
    rows = [r for r in sweep if r["model"] == model]
    return min(rows, key=lambda r: (r["cost"], r["failures"], r["k"])) if rows else None
