"""The ten-seed trials' summary (docs/accuracy.md's tables come from it): paired differences
by seed, pooled coverage weighted by engines, and the 8-site "beats every local" count."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import turbofed.benchmarks.validation_trials as trials
from turbofed.benchmarks.validation_trials import summary
from turbofed.conformal import Layout
from turbofed.metrics import MIN_OBSERVED_CYCLES, MIN_TRUE_RUL


def _model_run(name: str, subset: str, seed: int, fed: float, central: float, locals_: list[float]) -> dict[str, Any]:
    scored = lambda rmse: {subset: {"rmse": rmse, "rmse_capped": rmse - 1}}  # noqa: E731
    return {"trial_name": name, "dataset": subset, "seed": seed, "federated": scored(fed), "central": scored(central),
            "local": [{"metrics": scored(r)} for r in locals_]}


def _write(folder: Path, runs: list[dict[str, Any]]) -> None:
    for k, run in enumerate(runs):
        (folder / f"{k}.json").write_text(json.dumps(run), encoding="utf-8")


def test_summary_pairs_candidates_with_the_defaults_by_seed(tmp_path: Path) -> None:
    _write(tmp_path, [
        _model_run("defaults", "FD001", 0, 10.0, 10.0, [12.0, 14.0]), _model_run("defaults", "FD002", 0, 20.0, 20.0, [24.0]),
        _model_run("defaults", "FD001", 1, 12.0, 10.0, [12.0]), _model_run("defaults", "FD002", 1, 14.0, 20.0, [21.0]),
        _model_run("recent10", "FD001", 0, 9.0, 10.0, [12.0]), _model_run("recent10", "FD002", 0, 19.0, 20.0, [24.0]),
        _model_run("recent10", "FD001", 1, 12.0, 10.0, [12.0]), _model_run("recent10", "FD002", 1, 16.0, 20.0, [21.0]),
    ])
    lines = summary(str(tmp_path)).splitlines()
    assert "FD001 defaults: 11.00 (10.00; 1.100; 1.15) over 2 seeds" in lines  # local/fed: (13/10 + 12/12) / 2
    # paired: seed 0 (-1 - 1) / 2 = -1, seed 1 (0 + 2) / 2 = +1: mean 0, standard error 1
    assert "recent10 - defaults, mean of FD001 and FD002, paired by seed: +0.000 (se 1.000)" in lines


def test_summary_counts_the_seeds_where_federated_beats_every_local_on_every_subset(tmp_path: Path) -> None:
    subsets = ("FD001", "FD002", "FD003", "FD004")

    def run(seed: int, fed: float, local_fd003: float) -> dict[str, Any]:
        scored = lambda **override: {s: {"rmse": override.get(s, 20.0)} for s in subsets}  # noqa: E731
        return {"trial_name": "defaults", "dataset": "+".join(subsets), "seed": seed,
                "federated": {s: {"rmse": fed} for s in subsets},
                "local": [{"metrics": scored()}, {"metrics": scored(FD003=local_fd003)}]}

    # seed 0 beats every local; seed 1 ties one site on FD003 (a tie is not a win); seed 2 loses there
    _write(tmp_path, [run(0, 10.0, 12.0), run(1, 12.0, 12.0), run(2, 14.0, 12.0)])
    line = next(x for x in summary(str(tmp_path)).splitlines() if x.startswith("8 sites"))
    assert line == "8 sites defaults: mean 12.00, federated beats every local on every subset in 1 of 3 seeds"


def test_summary_pools_coverage_over_seeds_by_engines(tmp_path: Path) -> None:
    def run(seed: int, groups: list[tuple[int, float, float]]) -> dict[str, Any]:
        scored = [{"engines": n, "coverage": c, "mean_width": w} for n, c, w in groups]
        total = sum(n for n, _, _ in groups)
        return {"trial_name": "cuts10", "dataset": "FD001", "seed": seed, "intervals": {"federated": {"FD001": {
            "coverage": sum(n * c for n, c, _ in groups) / total, "mean_width": sum(n * w for n, _, w in groups) / total,
            "groups": scored}}}}

    _write(tmp_path, [run(0, [(1, 1.0, 10.0), (3, 1.0, 30.0)]), run(1, [(0, 0.0, 0.0), (6, 0.5, 20.0)])])
    line = next(x for x in summary(str(tmp_path)).splitlines() if x.startswith("FD001 cuts10"))
    # 10 engines: 7 covered, width (10 + 90 + 120) / 10; group 0 is the seed-0 engine alone
    assert line == "FD001 cuts10: 0.7000, 22.00; 1: 1.000, 10.0 | 9: 0.667, 23.3"


def test_every_cut_scores_each_row_nasas_cut_can_land_on(monkeypatch: pytest.MonkeyPatch) -> None:
    class Run:  # a 100-cycle run to failure: NASA's cut leaves true RUL 5..69 (31 cycles observed at least)
        cycles = np.arange(1, 101)
        settings = np.zeros((100, 3))
        sensors = np.zeros((100, 21))

        def rul(self) -> np.ndarray:
            return (100 - self.cycles).astype(float)

    class Spec:
        n_features = 1

    # the features are each row's true RUL and the prediction 0: a residual names its row
    monkeypatch.setattr(trials.features, "run_features", lambda spec, cycles, sensors, settings: (100 - cycles)[:, None])
    layout = Layout.for_cap(125.0)
    hist = trials.every_cut_histogram(lambda x: np.zeros(len(x)), Spec(), [Run()], layout, 125.0, np.random.default_rng(0))
    scored = np.arange(MIN_TRUE_RUL, 100 - MIN_OBSERVED_CYCLES + 1)
    expected = np.zeros(layout.bins, dtype=np.int64)
    np.add.at(expected, layout.bin_of(scored.astype(float)), 1)
    assert hist.counts[0].tolist() == expected.tolist() and hist.counts[1:].sum() == 0
    assert trials.every_cut_histogram(lambda x: x, Spec(), [], layout, 125.0, np.random.default_rng(0)).total == 0  # a site with none
