"""The validation trials of 2026-12-05 (second session) that `turbofed bench accuracy` has no option for.

docs/accuracy.md ("Ten-seed trials") records the decision rules, fixed before any run, and
the results: no candidate met its rule, so the defaults stay and none of these is an option
of the benchmark. This script reproduces the runs, one per call, always on validation
engines (`--validation`), never on a test set:

    python -m turbofed.benchmarks.validation_trials recent10 FD001 --seed 3 --json out.json
    python -m turbofed.benchmarks.validation_trials --summary benchmarks/results/validation/seeds0-9

Candidates (each against `defaults`, run the same way):
- `fedavgm`: FedAvg with server momentum 0.5 (Hsu et al. 2019) instead of filtered FedAvg.
- `window40`: a 40-cycle feature window instead of 30.
- `recent10`: the "recent level" feature averaged over the last 10 cycles instead of 5.
- `cap120`, `cap130`, `cap140`: the RUL cap of the training labels and the prediction clip
  (`rul_cap`; 125, the literature's convention, was never checked on validation). Scores
  against the capped truth stay capped at 125.
- `fullwindow`: every model trains only on rows with at least 31 cycles observed, as
  every scored point has (NASA's cut).
- `cuts10`, `cuts50`, `everycut` (with `--holdout 0.2`): the conformal residuals of each
  calibration engine at 10 (the default) or 50 random NASA-like cuts, or at every row
  whose true RUL the cut can give (each once, so a longer run adds more rows: 93 to 146 an
  engine on FD001, not a per-engine weighted expectation).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import turbofed.benchmarks.accuracy as accuracy
import turbofed.edge.features as features
from turbofed.config import ModelSettings
from turbofed.conformal import Layout, ResidualHistogram
from turbofed.edge import calibration
from turbofed.metrics import MAX_TRUE_RUL, MIN_OBSERVED_CYCLES, MIN_TRUE_RUL
from turbofed.spec import FeatureSpec

MODEL_TRIALS = ("defaults", "fedavgm", "window40", "recent10", "fullwindow", "cap120", "cap130", "cap140")
INTERVAL_TRIALS = ("cuts10", "cuts50", "everycut")
CUTS: dict[str, int | str] = {"cuts10": 10, "cuts50": 50, "everycut": "every"}  # residuals per calibration engine


def full_window_rows(spec: FeatureSpec, runs: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """`accuracy.training_rows` without the rows of a run's first 30 cycles (a run no longer
    than 31 cycles keeps all its rows)."""
    xs, ys = [], []
    for run in runs:
        keep = slice(MIN_OBSERVED_CYCLES - 1, None) if len(run.cycles) > MIN_OBSERVED_CYCLES else slice(None)
        xs.append(features.run_features(spec, run.cycles, run.sensors, run.settings)[keep])
        ys.append(run.rul()[keep])
    return np.vstack(xs).astype(np.float32), np.concatenate(ys)


def every_cut_histogram(predict: Callable[[np.ndarray], np.ndarray], spec: FeatureSpec, runs: list[Any],
                        layout: Layout, cap: float, rng: np.random.Generator) -> ResidualHistogram:
    """`calibration.runs_histogram` at every row NASA's cut can land on, each once (`rng` unused)."""
    xs, ys = [], []
    for run in runs:
        n = len(run.cycles)
        longest = max(MIN_TRUE_RUL, min(MAX_TRUE_RUL, n - MIN_OBSERVED_CYCLES))
        rows = np.unique(n - 1 - np.minimum(np.arange(MIN_TRUE_RUL, longest + 1), n - 1))
        xs.append(features.run_features(spec, run.cycles, run.sensors, run.settings)[rows])
        ys.append(run.rul()[rows])
    if not xs:
        return ResidualHistogram(layout)
    return calibration.residual_histogram(predict, np.vstack(xs).astype(np.float32), np.concatenate(ys), layout, cap)


def run_trial(candidate: str, dataset: str, sites: int, seed: int, data_dir: str | None) -> dict[str, Any]:
    """One validation run of `candidate` (the module's globals it changes stay changed: one run per process)."""
    settings, strategy, holdout = ModelSettings(seed=seed), accuracy.DEFAULT_STRATEGY, 0.0
    if candidate == "fedavgm":
        strategy = "fedavgm"
    elif candidate == "window40":
        settings = settings.replace(window=40)
    elif candidate == "recent10":
        features.RECENT = 10
    elif candidate.startswith("cap"):
        settings = settings.replace(rul_cap=float(candidate[3:]))
    elif candidate == "fullwindow":
        accuracy.training_rows = full_window_rows
    elif candidate in INTERVAL_TRIALS:
        holdout = 0.2
        if candidate == "cuts50":
            accuracy.runs_histogram = functools.partial(calibration.runs_histogram, cuts=50)
        elif candidate == "everycut":
            accuracy.runs_histogram = every_cut_histogram
    result = accuracy.run_accuracy(dataset, data_dir, sites, settings, strategy, {}, validation=True, holdout=holdout)
    if result["intervals"] is not None:  # run_accuracy writes the default's count
        result["intervals"]["cuts_per_engine"] = CUTS[candidate]
    return {**result, "trial_name": candidate}


SUBSETS = ("FD001", "FD002", "FD003", "FD004")


def summary(folder: str) -> str:
    """The tables of docs/accuracy.md ("Ten-seed trials") from the trials' JSONs in `folder`."""
    runs: dict[tuple[str, str], dict[int, dict[str, Any]]] = defaultdict(dict)
    for path in Path(folder).glob("*.json"):
        result = json.loads(path.read_text(encoding="utf-8"))
        runs[(result["trial_name"], result["dataset"])][result["seed"]] = result
    lines = ["federated validation RMSE, raw truth (capped; federated/central; mean local/federated), mean over seeds"]
    for subset in ("FD001", "FD002"):
        for name in MODEL_TRIALS:
            by_seed = runs.get((name, subset), {})
            if by_seed:
                fed = [r["federated"][subset] for r in by_seed.values()]
                central = [r["central"][subset]["rmse"] for r in by_seed.values()]
                local = [statistics.mean(s["metrics"][subset]["rmse"] for s in r["local"]) for r in by_seed.values()]
                lines.append(f"{subset} {name}: {statistics.mean(f['rmse'] for f in fed):.2f} "
                             f"({statistics.mean(f['rmse_capped'] for f in fed):.2f}; "
                             f"{statistics.mean(f['rmse'] / c for f, c in zip(fed, central)):.3f}; "
                             f"{statistics.mean(lo / f['rmse'] for lo, f in zip(local, fed)):.2f}) over {len(fed)} seeds")
    for name in MODEL_TRIALS[1:]:
        diffs = [sum(runs[(name, s)][seed]["federated"][s]["rmse"] - runs[("defaults", s)][seed]["federated"][s]["rmse"]
                     for s in ("FD001", "FD002")) / 2
                 for seed in runs.get((name, "FD001"), {}) if all(seed in runs.get((c, s), {}) for c in (name, "defaults")
                                                               for s in ("FD001", "FD002"))]
        if len(diffs) > 1:
            se = statistics.stdev(diffs) / math.sqrt(len(diffs))
            lines.append(f"{name} - defaults, mean of FD001 and FD002, paired by seed: {statistics.mean(diffs):+.3f} (se {se:.3f})")
    mixed = "+".join(SUBSETS)
    for name in MODEL_TRIALS:
        by_seed = runs.get((name, mixed), {})
        if by_seed:
            means = [statistics.mean(r["federated"][s]["rmse"] for s in SUBSETS) for r in by_seed.values()]
            beats = sum(all(r["federated"][s]["rmse"] < site["metrics"][s]["rmse"] for s in SUBSETS for site in r["local"])
                        for r in by_seed.values())
            lines.append(f"8 sites {name}: mean {statistics.mean(means):.2f}, federated beats every local on every subset "
                         f"in {beats} of {len(by_seed)} seeds")
    lines.append("intervals on validation engines (coverage, mean width; per predicted-RUL group: engines, coverage, width)")
    for subset in ("FD001", "FD002"):
        for name in INTERVAL_TRIALS:
            scored = [r["intervals"]["federated"][subset] for r in runs.get((name, subset), {}).values()]
            if scored:
                groups = [[g for s in scored if (g := s["groups"][k])["engines"]] for k in range(len(scored[0]["groups"]))]
                lines.append(f"{subset} {name}: {_pooled(scored, 'coverage'):.4f}, {_pooled(scored, 'mean_width'):.2f}; " + " | ".join(
                    f"{sum(g['engines'] for g in gs)}: {_pooled(gs, 'coverage'):.3f}, {_pooled(gs, 'mean_width'):.1f}" for gs in groups))
    return "\n".join(lines)


def _pooled(scored: list[dict[str, Any]], key: str) -> float:
    """A per-engine figure pooled over runs (weighted by each run's engines)."""
    engines = [s["engines"] if "engines" in s else sum(g["engines"] for g in s["groups"]) for s in scored]
    return sum(s[key] * n for s, n in zip(scored, engines)) / sum(engines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("candidate", nargs="?", choices=MODEL_TRIALS + INTERVAL_TRIALS)
    parser.add_argument("dataset", nargs="?", help="FD001..FD004 or subsets joined by +")
    parser.add_argument("--summary", metavar="DIR", help="print the tables from the trials' JSONs in DIR instead")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="C-MAPSS folder (default: $TURBOFED_DATA_DIR, else data/cmapss/)")
    parser.add_argument("--json", dest="json_out", help="write the result JSON here")
    args = parser.parse_args(argv)
    if args.summary:
        print(summary(args.summary))
        return 0
    if not (args.candidate and args.dataset):
        parser.error("a candidate and a dataset are needed (or --summary DIR)")
    result = run_trial(args.candidate, args.dataset, args.sites, args.seed, args.data_dir)
    text = json.dumps(result, indent=1)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
