"""In-process federation against its baselines: federated vs local-only vs central.

Same model and the same budget of passes over the data for all three: central trains
R x E epochs on the pooled engines, each local model R x E epochs on its own site's
engines, and the federation R rounds of E local epochs from the global model, merged by
a strategy. Everything crosses the site boundary as ONNX, exactly as on the wire.
Fleet statistics for normalisation are summed from per-site statistics (federated
analytics), in two phases as in the fleet: the operating regimes and their per-regime
sensor statistics, then the feature statistics over the regime-normalised sensors; nobody
pools raw rows except the central baseline, which exists to be beaten. Predictions are
clipped to [0, RUL cap]; each evaluation also says what share of the test engines the
model flags as outside its training range (`FeatureSpec.out_of_range`).

`--dataset` takes subsets joined by `+` (FD001+FD002+FD003+FD004): the sites are split
among the subsets (non-IID) and every model is scored on every subset. `--validation`
scores on engines held out of each site's training engines instead of the official test
(the tuning protocol, docs/accuracy.md): choices are made there, never on a test set.

With `--holdout SHARE` every federated prediction also gets a conformal interval
(turbofed/conformal.py): each site holds a seeded share of its training engines out of training
(by engine, apart from any validation engines; a site's `holdout_share` in the fleet), sends the residual histogram of the final federated model on them
(edge/calibration.py, the agent's code), and the summed histogram fixes the interval table;
the result reports the intervals' empirical coverage and mean width on every evaluation set.

`--average-last K`, `--lr-final RATIO` and `--min-correlation R` are validation trials
(`Trial`: tail averaging, a cosine rate decay, the sensor-choice threshold); docs/accuracy.md
records what they gave. `turbofed bench accuracy ... --json OUT` prints (and writes) the
result as JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
from tqdm import tqdm

from turbofed.aggregator.strategies import Strategy, aggregate_onnx, make_strategy
from turbofed.benchmarks import emit, machine_info
from turbofed.codec import read_weights, replace_weights
from turbofed.config import DEFAULT_STRATEGY, ModelSettings
from turbofed.conformal import DEFAULT_COVERAGE, IntervalTable, Layout, ResidualHistogram, coverage_and_width
from turbofed.data.cmapss import EngineRun
from turbofed.data.datasets import EvalSet, draw_engines, load_dataset, split_engines
from turbofed.edge.calibration import CUTS_PER_ENGINE, runs_histogram
from turbofed.edge.features import run_features, runs_regime_stats, runs_stats, two_phase_spec
from turbofed.edge.inference import OnnxPredictor
from turbofed.edge.learner import RulModel
from turbofed.errors import ConfigError
from turbofed.graph import reference_model
from turbofed.metrics import RUL_CAP, rul_metrics
from turbofed.simulation.fleet import assign, site_names
from turbofed.spec import MIN_CORRELATION, FeatureSpec, FleetStats, Regimes, RegimeStats


@dataclass
class Site:
    """One site in the simulation: its engines, statistics and training rows."""

    name: str
    subset: str
    runs: list[EngineRun]

    def regime_stats(self) -> RegimeStats:
        return runs_regime_stats(self.runs)

    def stats(self, window: int, regimes: Regimes | None = None) -> FleetStats:
        return runs_stats(self.runs, window, regimes)

    def spec(self, window: int, min_correlation: float = MIN_CORRELATION) -> FeatureSpec:
        """What a lone site fixes from its own two phases of statistics."""
        return fleet_spec([self], window, min_correlation)


def fleet_spec(sites: list[Site], window: int, min_correlation: float = MIN_CORRELATION) -> FeatureSpec:
    """The fleet's spec from summed per-site statistics (federated analytics), phase by phase."""
    return two_phase_spec(sum((s.regime_stats() for s in sites), RegimeStats()),
                          lambda regimes: sum((s.stats(window, regimes) for s in sites), FleetStats(window=window)),
                          min_correlation)


def split_sites(train: dict[str, list[EngineRun]], n_sites: int) -> list[Site]:
    """Disjoint engines per site, assigned exactly as the replay assigns them."""
    engines = assign(train, n_sites, "train")
    subset_of = {e.site: e.engine.split("-")[0] for e in engines}
    return [Site(name, subset_of[name], [e.run for e in engines if e.site == name]) for name in site_names(n_sites)]


def validation_split(sites: list[Site], seed: int) -> list[EvalSet]:
    """Hold a seeded fifth of every site's engines out of its training (by engine, per site),
    cut like NASA's test engines; one validation set per subset. The sites keep the rest."""
    held: dict[str, list[EngineRun]] = {}
    for k, site in enumerate(sites):
        site.runs, cut = split_engines(site.runs, seed * 1000 + k)
        held.setdefault(site.subset, []).extend(cut)
    return [EvalSet(subset, runs, "validation-from-train") for subset, runs in held.items()]


HOLDOUT_FOR_INTERVALS = 0.2  # the share of each site's training engines the intervals' figures hold out (docs/accuracy.md)


def calibration_split(sites: list[Site], seed: int, fraction: float = HOLDOUT_FOR_INTERVALS) -> list[list[EngineRun]]:
    """Hold a seeded `fraction` of every site's engines out of its training as its calibration
    engines (whole runs to failure, by engine, per site; a seed stream apart from the
    validation split's). The sites keep the rest; at least one engine stays for training."""
    held = []
    for k, site in enumerate(sites):
        n_out = min(int(round(fraction * len(site.runs))), len(site.runs) - 1) if fraction > 0 else 0
        site.runs, out = draw_engines(site.runs, n_out, np.random.default_rng([seed, k, 0xCA1]))
        held.append(out)
    return held


def fleet_intervals(model: bytes, spec: FeatureSpec, calibration: list[list[EngineRun]], cap: float, coverage: float,
                    seed: int) -> IntervalTable:
    """What the fleet does: every site sends the residual histogram of `model` on its own
    calibration engines; the aggregator sums them and reads the interval table off the sum."""
    layout, predictor = Layout.for_cap(cap), OnnxPredictor(model, cap=cap)
    hist = ResidualHistogram(layout)
    for k, runs in enumerate(calibration):
        hist = hist + runs_histogram(predictor.predict, spec, runs, layout, cap, np.random.default_rng([seed, k, 0xC07]))
    return IntervalTable.from_histogram(hist, coverage)


def interval_metrics(model: bytes, spec: FeatureSpec, ev: EvalSet, table: IntervalTable, cap: float) -> dict[str, Any]:
    """Coverage and mean width of the intervals at the last observed cycle of each test engine:
    against the capped truth (what the intervals are for: an upper bound at the cap reads "cap
    or more"), against the raw truth, and per Mondrian group against the capped truth."""
    features = np.vstack([run_features(spec, r.cycles, r.sensors, r.settings)[-1] for r in ev.runs])
    predicted = OnnxPredictor(model, cap=cap).predict(features)
    truth = np.array([r.rul_at_end for r in ev.runs], dtype=float)
    lower, upper = table.interval(predicted, cap)
    capped = coverage_and_width(lower, upper, np.minimum(truth, cap))
    groups = np.searchsorted(np.asarray(table.edges), predicted, side="right")
    per_group = []
    for g in range(len(table.edges) + 1):
        mask = groups == g
        per_group.append({"engines": int(mask.sum()),
                          **(coverage_and_width(lower[mask], upper[mask], np.minimum(truth[mask], cap)) if mask.any() else {})})
    return {**capped, "coverage_raw_truth": coverage_and_width(lower, upper, truth)["coverage"], "groups": per_group}


def training_rows(spec: FeatureSpec, runs: list[EngineRun]) -> tuple[np.ndarray, np.ndarray]:
    x = np.vstack([run_features(spec, r.cycles, r.sensors, r.settings) for r in runs])
    return x.astype(np.float32), np.concatenate([r.rul() for r in runs])


def evaluate(model: bytes, spec: FeatureSpec, ev: EvalSet, cap: float | None = RUL_CAP) -> dict[str, float]:
    """The standard protocol: one prediction at the last observed cycle of each test engine,
    clipped to [0, cap] (None: only at 0, to see how far a wrecked model goes); `out_of_range`
    is the share of engines the spec flags."""
    features = np.vstack([run_features(spec, r.cycles, r.sensors, r.settings)[-1] for r in ev.runs])
    metrics = rul_metrics(OnnxPredictor(model, cap=cap).predict(features), np.array([r.rul_at_end for r in ev.runs]))
    return {**metrics, "out_of_range": round(float(spec.out_of_range(features).mean()), 4)}


def train_alone(settings: ModelSettings, spec: FeatureSpec, runs: list[EngineRun], epochs: int) -> bytes:
    model = RulModel(settings, spec)
    model.train(*training_rows(spec, runs), epochs=epochs)
    return model.to_onnx()


Update = tuple[str, bytes, int]  # site, ONNX model, claimed samples
Tamper = Callable[[onnx.ModelProto, list[Update]], list[Update]]


@dataclass(frozen=True)
class Trial:
    """Variants tried on validation only (docs/accuracy.md).

    Federated model only: `average_last` K > 1: the final model is the mean of the last K
    rounds' global weights (tail / Polyak averaging: Polyak & Juditsky 1992; SWA, Izmailov
    et al. 2018). `lr_final` < 1: each site's Adam rate follows a cosine from the settings'
    rate in round 1 down to `lr_final` times it in the last round (Loshchilov & Hutter 2017,
    without restarts). Every model: `min_correlation`, the sensor-choice threshold."""

    average_last: int = 0
    lr_final: float = 1.0
    min_correlation: float = MIN_CORRELATION

    def rate(self, base: float, round_index: int, rounds: int) -> float:
        if self.lr_final == 1.0 or rounds < 2:
            return base
        progress = round_index / (rounds - 1)
        return float(base) * (self.lr_final + (1 - self.lr_final) * 0.5 * (1 + np.cos(np.pi * progress)))


def _set_rate(learner: RulModel, rate: float) -> None:
    """Adam's base rate for the next partial_fit (scikit-learn reads it from the optimizer once built)."""
    est = learner.estimator
    est.learning_rate_init = rate
    if getattr(est, "_optimizer", None) is not None:
        est._optimizer.learning_rate_init = rate


def federate(settings: ModelSettings, spec: FeatureSpec, sites: list[Site], strategy: Strategy, progress: tqdm,
             data: list[tuple[np.ndarray, np.ndarray]] | None = None, tamper: Tamper | None = None,
             trial: Trial = Trial()) -> bytes:
    """R rounds: every site trains E epochs from the global model; the strategy merges them.
    As in the fleet: the aggregator builds v0, sites write their weights into the global model.

    `data` replaces the sites' training rows (a site training on flipped labels, say) and
    `tamper` may rewrite the round's updates before they are merged: the attack benchmark
    (benchmarks/attack.py) uses both to play compromised sites."""
    learners = [RulModel(settings, spec) for _ in sites]
    data = data or [training_rows(spec, s.runs) for s in sites]
    global_model = reference_model(spec, settings)  # v0, built by the aggregator
    tail: list[dict[str, np.ndarray]] = []
    for r in range(settings.rounds):
        if trial.lr_final != 1.0:
            for learner in learners:
                _set_rate(learner, trial.rate(settings.learning_rate, r, settings.rounds))
        updates = []
        for site, learner, (x, y) in zip(sites, learners, data):
            try:
                learner.load_weights(read_weights(global_model))
                learner.train(x, y, epochs=settings.local_epochs)
                updates.append((site.name, replace_weights(global_model, learner.weights()).SerializeToString(), len(x)))
            except ValueError:  # a wrecked global model (non-finite training): the site sends it back unchanged
                updates.append((site.name, global_model.SerializeToString(), len(x)))
        if tamper is not None:
            updates = tamper(global_model, updates)
        global_model = aggregate_onnx(strategy, global_model, updates)
        if trial.average_last > 1:
            tail = [*tail, read_weights(global_model)][-trial.average_last:]
        progress.update(1)
    if len(tail) > 1:
        mean = {name: np.mean([w[name] for w in tail], axis=0, dtype=np.float64).astype(np.float32) for name in tail[0]}
        global_model = replace_weights(global_model, mean)
    return global_model.SerializeToString()


def run_accuracy(
    dataset: str = "FD001",
    data_dir: str | None = None,
    n_sites: int = 4,
    settings: ModelSettings | None = None,
    strategy: str = DEFAULT_STRATEGY,
    strategy_params: dict[str, Any] | None = None,
    validation: bool = False,
    holdout: float = 0.0,
    coverage: float = DEFAULT_COVERAGE,
    trial: Trial = Trial(),
) -> dict:
    """Train central, local and federated models and score them on every evaluation set;
    with `holdout` > 0, calibrate the federated model's conformal intervals on that share of
    each site's engines, held out of every model's training, and score those too (0, the
    default and the literature's protocol: every engine trains, no intervals).

    `strategy` takes what fleet.toml's [strategy] name does (built in, "module:Class" or an
    entry point); it is checked with `strategy_params` before any data is read.
    """
    merger = make_strategy(strategy, strategy_params, "turbofed bench accuracy --strategy")
    if not 0 <= holdout < 1:
        raise ConfigError(f"turbofed bench accuracy --holdout must be a share in [0, 1), got {holdout}")
    if not 0 < coverage < 1:
        raise ConfigError(f"turbofed bench accuracy --coverage must be in (0, 1), got {coverage}")
    if trial.average_last < 0 or not 0 < trial.lr_final <= 1 or not 0 <= trial.min_correlation < 1:
        raise ConfigError(f"turbofed bench accuracy: --average-last must be >= 0, --lr-final in (0, 1] and "
                          f"--min-correlation in [0, 1), got {trial}")
    settings = settings or ModelSettings()
    if trial.lr_final != 1.0 and settings.kind != "mlp":
        raise ConfigError(f"turbofed bench accuracy --lr-final decays Adam's rate: it needs --model kind=mlp, not {settings.kind!r}")
    started = time.perf_counter()
    train, evals = load_dataset(dataset, data_dir, settings.seed)
    sites = split_sites(train, n_sites)
    if validation:  # the official test (or subset hold-out) stays unseen: score on engines cut from the sites' own
        evals = validation_split(sites, settings.seed)
    held = calibration_split(sites, settings.seed, holdout)  # never trained on, by any model
    spec = fleet_spec(sites, settings.window, trial.min_correlation)
    cap = settings.rul_cap
    budget = settings.rounds * settings.local_epochs
    progress = tqdm(total=settings.rounds + len(sites) + 1, desc=f"bench {dataset}", file=sys.stderr, unit="step")

    progress.set_postfix_str("central")
    central = train_alone(settings, spec, [r for s in sites for r in s.runs], budget)
    progress.update(1)
    local = []
    for site in sites:
        progress.set_postfix_str(f"local {site.name}")
        site_spec = site.spec(settings.window, trial.min_correlation)  # a lone site knows only itself
        model = train_alone(settings, site_spec, site.runs, budget)
        local.append(
            {
                "site": site.name,
                "subset": site.subset,
                "engines": len(site.runs),
                "metrics": {ev.subset: evaluate(model, site_spec, ev, cap) for ev in evals},
            }
        )
        progress.update(1)
    progress.set_postfix_str(f"federated ({strategy})")
    federated = federate(settings, spec, sites, merger, progress, trial=trial)
    progress.close()
    intervals = None
    if holdout > 0:
        table = fleet_intervals(federated, spec, held, cap, coverage, settings.seed)
        intervals = {"coverage_nominal": coverage, "calibration_engines": sum(len(h) for h in held),
                     "cuts_per_engine": CUTS_PER_ENGINE, "table": table.to_dict(),
                     "federated": {ev.subset: interval_metrics(federated, spec, ev, table, cap) for ev in evals}}

    return {
        "dataset": dataset,
        "sites": n_sites,
        "rounds": settings.rounds,
        "local_epochs": settings.local_epochs,
        "strategy": strategy,
        "strategy_params": merger.parameters(),
        "seed": settings.seed,
        **({"trial": asdict(trial)} if trial != Trial() else {}),
        "eval": evals[0].kind if len(evals) == 1 else {ev.subset: ev.kind for ev in evals},
        "test_engines": {ev.subset: len(ev.runs) for ev in evals},
        "seconds": round(time.perf_counter() - started, 2),
        "central": {ev.subset: evaluate(central, spec, ev, cap) for ev in evals},
        "federated": {ev.subset: evaluate(federated, spec, ev, cap) for ev in evals},
        "local": local,
        "intervals": intervals,
        "holdout": holdout,
        "settings": settings.to_dict(),
        "features": {"sensors": [i + 1 for i in spec.sensors], "count": spec.n_features,
                     "regimes": [list(c) for c in spec.regimes.cells] if spec.regimes else []},
        "machine": machine_info("scikit-learn", "onnxruntime"),
    }


def run_cli(args: argparse.Namespace) -> int:
    model = dict(parse_param(text, "--model") for text in getattr(args, "model", []))
    settings = ModelSettings(seed=args.seed).replace(rounds=args.rounds, local_epochs=args.local_epochs, **model)
    params = dict(parse_param(text) for text in args.strategy_param)
    result = run_accuracy(args.dataset, args.data_dir, args.sites, settings, args.strategy or DEFAULT_STRATEGY, params,
                          validation=getattr(args, "validation", False), holdout=getattr(args, "holdout", 0.0),
                          coverage=getattr(args, "coverage", DEFAULT_COVERAGE),
                          trial=Trial(getattr(args, "average_last", 0), getattr(args, "lr_final", 1.0),
                                      getattr(args, "min_correlation", MIN_CORRELATION)))
    emit(result, args.json_out)
    return 0


def parse_param(text: str, option: str = "--strategy-param") -> tuple[str, Any]:
    """`--strategy-param KEY=VALUE` (or `--model`): VALUE as a TOML value (0.7, 3, true, "x", [64, 32]), else the bare text."""
    import tomllib

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{option} {text!r}: give KEY=VALUE, e.g. {'batch_size=128' if option == '--model' else 'momentum=0.7'}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip(), value
