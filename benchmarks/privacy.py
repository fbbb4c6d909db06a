"""`turbofed bench privacy`: what client-level differential privacy costs in RMSE.

DP-FedAvg (aggregator/privacy.py; McMahan et al., ICLR 2018) at epsilon = inf (no DP), 8,
4 and 1 (delta 1e-5, RDP accounting, sigma calibrated for the run's rounds) on FD001 split
over 4 sites and on synthetic fleets of 100 and 1,000 sites with few engines each. The
federation runs in process as `turbofed bench accuracy` runs it (benchmarks/accuracy.py
`federate`), every update crossing as ONNX into the aggregator's merge. The DP strategy is
FedAvg; the no-DP baseline (epsilon = inf) is FedAvg with the same clipping and sigma 0, so
the difference is the noise alone. Scores are on validation engines held
out of training (datasets.holdout), never on the official test set.

To stay feasible on two cores every fleet runs the linear model (`kind = "sgd"`) for the
same few rounds (default 10) at every epsilon, with one clip norm (default C = 20, about a
quarter of the first round's median delta norm and above the later ones'); the figures are about the cost of the noise, not about
the best RUL model.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from turbofed.aggregator.privacy import calibrate_noise, gaussian_epsilon, private_strategy
from turbofed.aggregator.strategies import FedAvg
from turbofed.benchmarks import emit, machine_info
from turbofed.benchmarks.accuracy import evaluate, federate, fleet_spec, split_sites
from turbofed.config import ModelSettings, PrivacySettings
from turbofed.data.datasets import holdout
from turbofed.data.synthetic import generate_fleet

EPSILONS = (math.inf, 8.0, 4.0, 1.0)
DELTA = 1e-5


def fleet(kind: str, n_sites: int, engines_per_site: int, data_dir: str | None, seed: int):
    """(training engines split over sites, validation set) for FD001 or a synthetic fleet."""
    if kind == "FD001":
        from turbofed.data.cmapss import load_subset

        subset = load_subset("FD001", data_dir)
    else:
        subset = generate_fleet(n_train=int(n_sites * engines_per_site / 0.8) + 1, n_test=0, seed=seed, name="SYN001")
    train, validation = holdout(subset, seed)
    return split_sites({subset.name: train}, n_sites), validation


def run_privacy(fleets: list[tuple[str, int]], settings: ModelSettings, clip_norm: float, engines_per_site: int,
                data_dir: str | None) -> dict[str, Any]:
    """RMSE on validation engines at every epsilon of EPSILONS, per fleet."""
    started = time.perf_counter()
    sigmas = {eps: (0.0 if math.isinf(eps) else calibrate_noise(eps, settings.rounds, DELTA)) for eps in EPSILONS}
    results = []
    for kind, n_sites in fleets:
        t0 = time.perf_counter()
        sites, validation = fleet(kind, n_sites, engines_per_site, data_dir, settings.seed)
        spec = fleet_spec(sites, settings.window)  # both statistics phases, as the fleet fixes it
        progress = tqdm(total=settings.rounds * len(EPSILONS), desc=f"bench privacy {kind} x{n_sites}", file=sys.stderr, unit="round")
        rows = {}
        for eps, sigma in sigmas.items():
            dp = PrivacySettings(clip_norm=clip_norm, noise_multiplier=sigma or 1.0, seed=settings.seed)
            merger = private_strategy(FedAvg(), dp, settings.rounds, n_sites)
            merger.noise_multiplier = sigma  # 0 for the clipped-only baseline at epsilon = inf
            rmse = evaluate(federate(settings, spec, sites, merger, progress), spec, validation)["rmse"]
            spent = gaussian_epsilon(sigma, settings.rounds, DELTA) if sigma else math.inf
            rows["inf" if math.isinf(eps) else f"{eps:g}"] = {"noise_multiplier": sigma, "epsilon_spent": spent, "rmse": rmse}
        progress.close()
        base = rows["inf"]["rmse"]
        for row in rows.values():
            row["rmse_over_no_dp"] = row["rmse"] / base
        results.append({"fleet": kind, "sites": n_sites, "train_engines": sum(len(s.runs) for s in sites),
                        "validation_engines": len(validation.runs), "by_epsilon": rows,
                        "seconds": round(time.perf_counter() - t0, 1)})
    return {
        "benchmark": "privacy", "mechanism": "DP-FedAvg (McMahan et al. 2018), central noise, every site each round (q = 1)",
        "accountant": "dp-accounting RDP", "delta": DELTA, "clip_norm": clip_norm, "engines_per_synthetic_site": engines_per_site,
        "eval": "validation: training engines held out (datasets.holdout), cut like NASA's test engines",
        "fleets": results, "seed": settings.seed, "settings": settings.to_dict(),
        "seconds": round(time.perf_counter() - started, 1), "machine": machine_info("scikit-learn", "onnxruntime", "dp-accounting"),
    }


def format_table(result: dict[str, Any]) -> str:
    """Fleet x epsilon RMSE, with the ratio to no DP in brackets."""
    eps = [k for k in result["fleets"][0]["by_epsilon"]]
    lines = ["| fleet | sites | " + " | ".join(f"ε = {'∞' if e == 'inf' else e}" for e in eps) + " |",
             "|---|---|" + "---|" * len(eps)]
    for f in result["fleets"]:
        cells = [f"{f['by_epsilon'][e]['rmse']:.2f} ({f['by_epsilon'][e]['rmse_over_no_dp']:.2f}×)" for e in eps]
        lines.append(f"| {f['fleet']} | {f['sites']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_data_dir(given: str | None) -> str | None:
    """--data-dir, else $TURBOFED_DATA_DIR, else ../shared/data/cmapss when present (where the
    tests find C-MAPSS), else None (data/cmapss)."""
    if given or os.environ.get("TURBOFED_DATA_DIR"):
        return given or os.environ["TURBOFED_DATA_DIR"]
    shared = Path.cwd().parent / "shared" / "data" / "cmapss"
    return str(shared) if shared.is_dir() else None


def run_cli(args: argparse.Namespace) -> int:
    settings = ModelSettings(seed=args.seed, kind="sgd").replace(rounds=args.rounds, local_epochs=1)
    fleets = [("FD001", 4), *[("SYN", n) for n in (args.synthetic_sites or [100, 1000])]]
    result = run_privacy(fleets, settings, args.clip_norm, args.engines_per_site, default_data_dir(args.data_dir))
    emit(result, args.json_out)
    print(format_table(result), file=sys.stderr)
    return 0
