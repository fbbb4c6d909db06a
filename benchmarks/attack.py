"""`turbofed bench attack`: what compromised sites do to the federated model, per strategy.

The federation runs in process exactly as `turbofed bench accuracy` runs it (sites train
from the global model, every update crosses as ONNX and is merged by the aggregator's
`aggregate_onnx` and strategy), and `--malicious` of the sites are compromised. Attacks:

- scale: the site's trained weights x 1000.
- sign-flip: its weights negated.
- noise: its weights plus Gaussian noise (standard deviation 1).
- inflated-samples: trains on flipped labels and claims 10^9 samples.
- label-flip: trains on 125 - RUL (a broken or malicious labeller).
- little-is-enough: every malicious site sends the honest updates' coordinate-wise mean
  minus z standard deviations, z chosen as Baruch, Baruch and Goldberg, "A Little Is Enough:
  Circumventing Defenses For Distributed Learning", NeurIPS 2019 (section 3).

Scores are on a validation hold-out of training engines (cut the way NASA cut its test
engines), never on the official test set: this benchmark chooses the default strategy, and
choosing on the test set would make its figure meaningless. The table reports RMSE without
attack and under each attack, and the attacked/clean ratio.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from typing import Any

import numpy as np
import onnx
from tqdm import tqdm

from turbofed.aggregator.strategies import make_strategy
from turbofed.benchmarks import emit, machine_info
from turbofed.benchmarks.accuracy import Update, evaluate, federate, fleet_spec, split_sites, training_rows
from turbofed.codec import read_weights, replace_weights
from turbofed.config import ModelSettings
from turbofed.data.datasets import holdout
from turbofed.data.synthetic import generate_fleet

ATTACKS = ("none", "scale", "sign-flip", "noise", "inflated-samples", "label-flip", "little-is-enough")
LABEL_ATTACKS = {"label-flip", "inflated-samples"}
INFLATED_SAMPLES = 10**9


def little_is_enough_z(n_sites: int, n_malicious: int) -> float:
    """Baruch et al. 2019: s = floor(n/2 + 1) - m sites must be swayed; z = Phi^-1((n - s) / n)."""
    s = n_sites // 2 + 1 - n_malicious
    return float(statistics.NormalDist().inv_cdf(min(max((n_sites - s) / n_sites, 1e-6), 1 - 1e-6)))


def make_tamper(attack: str, malicious: set[str], n_sites: int, rng: np.random.Generator):
    """The round hook that turns the malicious sites' updates into the attack's."""

    def tamper(global_model: onnx.ModelProto, updates: list[Update]) -> list[Update]:
        honest = [read_weights(onnx.load_model_from_string(m)) for s, m, _ in updates if s not in malicious]
        out = []
        for site, model_bytes, samples in updates:
            if site not in malicious:
                out.append((site, model_bytes, samples))
                continue
            model = onnx.load_model_from_string(model_bytes)
            weights = read_weights(model)
            if attack == "scale":
                weights = {n: w * 1000 for n, w in weights.items()}
            elif attack == "sign-flip":
                weights = {n: -w for n, w in weights.items()}
            elif attack == "noise":
                weights = {n: (w + rng.normal(0, 1, w.shape)).astype(w.dtype) for n, w in weights.items()}
            elif attack == "inflated-samples":
                samples = INFLATED_SAMPLES
            elif attack == "little-is-enough" and honest:
                z = little_is_enough_z(n_sites, len(malicious))
                weights = {n: (np.mean([h[n] for h in honest], axis=0) - z * np.std([h[n] for h in honest], axis=0)
                               ).astype(w.dtype) for n, w in weights.items()}
            if all(np.all(np.isfinite(w)) for w in weights.values()):
                out.append((site, replace_weights(model, weights).SerializeToString(), samples))
            # else: non-finite weights, which the aggregator refuses (non_finite): the update is dropped
        return out

    return tamper


def run_attack(dataset: str, data_dir: str | None, n_sites: int, n_malicious: int, attacks: list[str],
               strategies: list[str], settings: ModelSettings) -> dict[str, Any]:
    """RMSE on the validation engines for every strategy x attack (attack "none" included)."""
    for attack in attacks:
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}; choose from {', '.join(ATTACKS)}")
    mergers = {name: make_strategy(name, None, "turbofed bench attack --strategy") for name in strategies}
    if not 0 <= n_malicious < n_sites:
        raise ValueError(f"--malicious must be in 0..{n_sites - 1}, got {n_malicious}")
    started = time.perf_counter()
    if dataset.upper().startswith("SYN"):
        subset = generate_fleet(n_train=100, n_test=0, seed=settings.seed, name=dataset.upper())
    else:
        from turbofed.data.cmapss import load_subset

        subset = load_subset(dataset.upper(), data_dir)
    train, validation = holdout(subset, settings.seed)  # validation engines: never the official test set
    sites = split_sites({subset.name: train}, n_sites)
    spec = fleet_spec(sites, settings.window)  # both statistics phases, as the fleet fixes it
    malicious = {s.name for s in sites[-n_malicious:]} if n_malicious else set()
    honest_rows = [training_rows(spec, s.runs) for s in sites]
    flipped = [(x, np.maximum(settings.rul_cap - np.minimum(y, settings.rul_cap), 0.0)) if s.name in malicious else (x, y)
               for s, (x, y) in zip(sites, honest_rows)]
    cases = [(s, a) for s in strategies for a in attacks]
    progress = tqdm(total=len(cases) * settings.rounds, desc=f"bench attack {dataset}", file=sys.stderr, unit="round")
    table: dict[str, dict[str, float]] = {}
    for name, attack in cases:
        progress.set_postfix_str(f"{name} / {attack}")
        merger = make_strategy(name, None, "turbofed bench attack --strategy")  # fresh server state per run
        tamper = None if attack in ("none", "label-flip") else make_tamper(attack, malicious, n_sites, np.random.default_rng(settings.seed))
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # a wrecked model overflows: that is the finding
            model = federate(settings, spec, sites, merger, progress,
                             data=flipped if attack in LABEL_ATTACKS else honest_rows, tamper=tamper)
            table.setdefault(name, {})[attack] = evaluate(model, spec, validation, cap=None)["rmse"]  # unclipped: how far an attack throws the model
    progress.close()
    ratios = {n: {a: (r / row["none"] if "none" in row and row["none"] > 0 else None) for a, r in row.items()}
              for n, row in table.items()}
    return {
        "dataset": dataset, "sites": n_sites, "malicious": sorted(malicious), "attacks": attacks,
        "strategies": {n: m.parameters() for n, m in mergers.items()},
        "eval": f"validation: {len(validation.runs)} training engines held out, cut like NASA's test engines",
        "rmse": table, "attacked_over_clean": ratios, "seed": settings.seed, "settings": settings.to_dict(),
        "seconds": round(time.perf_counter() - started, 1), "machine": machine_info("scikit-learn", "onnxruntime"),
    }


def format_table(result: dict[str, Any]) -> str:
    """Strategy x attack RMSE, with the attacked/clean ratio in brackets."""
    attacks = result["attacks"]
    lines = ["| strategy | " + " | ".join(attacks) + " |", "|---|" + "---|" * len(attacks)]
    for name, row in result["rmse"].items():
        cells = []
        for a in attacks:
            ratio = result["attacked_over_clean"][name].get(a)
            if not math.isfinite(row[a]):
                cells.append("collapsed (NaN)")
                continue
            cells.append(f"{row[a]:.2f}" + (f" ({ratio:.2f}×)" if a != "none" and ratio is not None else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_cli(args: argparse.Namespace) -> int:
    settings = ModelSettings(seed=args.seed).replace(rounds=args.rounds)
    attacks = ["none", *[a for a in (args.attack or ATTACKS[1:]) if a != "none"]]
    try:
        result = run_attack(args.dataset, args.data_dir, args.sites, args.malicious, attacks,
                            args.strategy or ["fedavg", "median", "trimmed-mean", "multi-krum", "clipped-fedavg", "filtered-fedavg"], settings)
    except ValueError as exc:
        from turbofed.errors import ConfigError

        raise ConfigError(f"turbofed bench attack: {exc}") from None
    emit(result, args.json_out)
    print(format_table(result), file=sys.stderr)
    return 0
