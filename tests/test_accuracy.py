"""The in-process federation benchmark: right shape of result, disjoint sites, honest holdout.

Small budgets here: the figures themselves are measured by `turbofed bench accuracy`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from turbofed.benchmarks.accuracy import (
    Site,
    Trial,
    _set_rate,
    calibration_split,
    evaluate,
    federate,
    fleet_spec,
    run_accuracy,
    split_sites,
    train_alone,
    training_rows,
    validation_split,
)
from turbofed.cli import main
from turbofed.config import ModelSettings
from turbofed.data.cmapss import EngineRun, load_subset
from turbofed.data.datasets import holdout, load_dataset, split_engines

QUICK = ModelSettings(rounds=2, local_epochs=1)


def test_holdout_never_trains_on_held_out_engines(cmapss_dir: Path) -> None:
    subset = load_subset("FD003", cmapss_dir)
    kept, ev = holdout(subset, seed=3)
    assert ev.kind == "holdout-from-train" and len(ev.runs) == 20 and len(kept) == 80
    assert not {r.unit for r in kept} & {r.unit for r in ev.runs}
    full = {r.unit: len(r) for r in subset.train}
    for run in ev.runs:
        assert 31 <= len(run) < full[run.unit]
        assert run.rul_at_end == full[run.unit] - len(run)
        assert 5 <= run.rul_at_end <= 150  # cut the way NASA cut its test engines
    again, ev2 = holdout(subset, seed=3)
    assert [r.unit for r in ev2.runs] == [r.unit for r in ev.runs]  # seeded


def _runs(units: range) -> list[EngineRun]:
    """Runs to failure of 150 to 239 cycles (by unit), zeros for data: only which engines are chosen matters here."""
    return [EngineRun(u, np.arange(1, 150 + 7 * u % 90 + 1), np.zeros((150 + 7 * u % 90, 3)), np.zeros((150 + 7 * u % 90, 21)), 0.0)
            for u in units]


@pytest.mark.parametrize(("seed", "fraction", "held", "kept"), [
    (7, 0.3, [[1, 7, 8], [16, 17], [20], []], [[2, 3, 4, 5, 6, 9, 10], [11, 12, 13, 14, 15], [18, 19, 21], [22]]),
    (0, 0.2, [[7, 9], [16], [18], []], [[1, 2, 3, 4, 5, 6, 8, 10], [11, 12, 13, 14, 15, 17], [19, 20, 21], [22]]),
    (3, 0.0, [[], [], [], []], [list(range(1, 11)), list(range(11, 18)), list(range(18, 22)), [22]]),
])
def test_calibration_engines_for_a_seed_never_change(seed: int, fraction: float, held: list, kept: list) -> None:
    """The engines calibration_split holds out, pinned per seed (recorded from the code before
    it shared split_engines' draw): every published intervals figure stays reproducible. A
    one-engine site keeps its engine."""
    sites = [Site(f"site{k + 1}", "FD001", _runs(units)) for k, units in enumerate((range(1, 11), range(11, 18), range(18, 22), range(22, 23)))]
    out = calibration_split(sites, seed, fraction)
    assert [[r.unit for r in runs] for runs in out] == held
    assert [[r.unit for r in site.runs] for site in sites] == kept
    assert all(len(r) == 150 + 7 * r.unit % 90 and r.rul_at_end == 0.0 for runs in out for r in runs)  # whole runs to failure


@pytest.mark.parametrize(("seed", "kept", "cut"), [
    (5, [1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15], [(4, 146, 32.0), (8, 106, 100.0), (12, 120, 114.0)]),
    (11, [1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 14, 15], [(3, 48, 123.0), (7, 141, 58.0), (13, 130, 21.0)]),
])
def test_split_engines_for_a_seed_never_changes(seed: int, kept: list[int], cut: list[tuple]) -> None:
    """split_engines' held-out engines and where each is cut, pinned per seed (recorded before
    calibration_split shared its draw): validation and hold-out sets stay the same."""
    k, held = split_engines(_runs(range(1, 16)), seed)
    assert [r.unit for r in k] == kept and [(r.unit, len(r), r.rul_at_end) for r in held] == cut


def test_sites_are_disjoint_and_split_by_subset(cmapss_dir: Path) -> None:
    train, evals = load_dataset("FD001+FD003", str(cmapss_dir), seed=0)
    assert [(e.subset, e.kind) for e in evals] == [("FD001", "official-test"), ("FD003", "holdout-from-train")]
    sites = split_sites(train, 4)
    assert [s.subset for s in sites] == ["FD001", "FD001", "FD003", "FD003"]
    for name in ("FD001", "FD003"):
        units = [r.unit for s in sites if s.subset == name for r in s.runs]
        assert len(units) == len(set(units)) == len(train[name])


def test_validation_holds_out_engines_of_every_site_and_never_the_test(cmapss_dir: Path) -> None:
    train, evals = load_dataset("FD001+FD003", str(cmapss_dir), seed=0)
    sites = split_sites(train, 4)
    before = {s.name: {r.unit for r in s.runs} for s in sites}
    held = validation_split(sites, seed=0)
    assert [(e.subset, e.kind) for e in held] == [("FD001", "validation-from-train"), ("FD003", "validation-from-train")]
    test_units = {ev.subset: {r.unit for r in ev.runs} for ev in evals if ev.kind == "holdout-from-train"}
    for site in sites:
        kept = {r.unit for r in site.runs}
        assert kept < before[site.name] and len(before[site.name] - kept) == round(0.2 * len(before[site.name]))  # a fifth, per site
    for ev in held:
        units = {r.unit for r in ev.runs}
        assert not units & {r.unit for s in sites if s.subset == ev.subset for r in s.runs}  # never trained on
        assert not units & test_units.get(ev.subset, set())  # never the test engines
        assert all(5 <= r.rul_at_end <= 150 for r in ev.runs)  # cut like NASA's


def test_all_four_subsets_run_with_per_regime_normalisation(cmapss_dir: Path) -> None:
    result = run_accuracy("FD001+FD002+FD003+FD004", str(cmapss_dir), 8, QUICK)
    assert result["test_engines"] == {"FD001": 100, "FD002": 259, "FD003": 20, "FD004": 50}
    assert len(result["features"]["regimes"]) == 6
    assert [site["subset"] for site in result["local"]] == ["FD001", "FD001", "FD002", "FD002", "FD003", "FD003", "FD004", "FD004"]
    for model in [result["central"], result["federated"]] + [site["metrics"] for site in result["local"]]:
        assert set(model) == {"FD001", "FD002", "FD003", "FD004"}


def test_result_has_every_figure(cmapss_dir: Path) -> None:
    result = run_accuracy("FD001", str(cmapss_dir), 2, QUICK, holdout=0.2)
    assert result["eval"] == "official-test" and result["test_engines"] == {"FD001": 100}
    for model in ("central", "federated"):
        assert set(result[model]["FD001"]) == {"rmse", "rmse_capped", "score", "out_of_range"}
        assert 5 < result[model]["FD001"]["rmse"] < 60
    assert [site["site"] for site in result["local"]] == ["site1", "site2"]
    assert all(site["subset"] == "FD001" and site["engines"] == 40 for site in result["local"])  # 10 each calibrate
    assert result["federated"]["FD001"]["rmse"] >= result["federated"]["FD001"]["rmse_capped"]


def test_intervals_are_calibrated_on_held_back_training_engines_only(cmapss_dir: Path) -> None:
    """The conformal intervals come from engines no model trained on, and are scored on the test set."""
    train, _ = load_dataset("FD001", str(cmapss_dir), seed=0)
    sites = split_sites(train, 4)
    before = {s.name: {r.unit for r in s.runs} for s in sites}
    held = calibration_split(sites, seed=0)
    for site, cal in zip(sites, held):
        units = {r.unit for r in cal}
        assert len(units) == 5 and not units & {r.unit for r in site.runs} and units | {r.unit for r in site.runs} == before[site.name]
    result = run_accuracy("FD001", str(cmapss_dir), 2, QUICK, holdout=0.2)
    intervals = result["intervals"]
    assert intervals["calibration_engines"] == 20 and intervals["coverage_nominal"] == 0.9
    assert sum(site["engines"] for site in result["local"]) == 80  # the other 80 train
    figures = intervals["federated"]["FD001"]
    assert 0 <= figures["coverage"] <= 1 and figures["mean_width"] > 0
    assert sum(g["engines"] for g in figures["groups"]) == 100
    assert run_accuracy("FD001", str(cmapss_dir), 2, QUICK)["intervals"] is None  # the default: every engine trains


def test_cli_writes_json(cmapss_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "acc.json"
    argv = ["bench", "accuracy", "--data-dir", str(cmapss_dir), "--dataset", "FD001+FD003", "--sites", "2"]
    strategy = ["--strategy", "tests.plugins.median:Median", "--strategy-param", "server_lr=0.5"]  # as in fleet.toml
    assert main([*argv, "--rounds", "1", "--local-epochs", "1", "--seed", "4", *strategy, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result == json.loads(capsys.readouterr().out)
    assert result["strategy"] == "tests.plugins.median:Median" and result["strategy_params"] == {"server_lr": 0.5}
    assert result["seed"] == 4 and result["rounds"] == 1 and set(result["federated"]) == {"FD001", "FD003"}
    assert result["eval"] == {"FD001": "official-test", "FD003": "holdout-from-train"}
    assert [site["subset"] for site in result["local"]] == ["FD001", "FD003"]
    assert set(result["local"][0]["metrics"]) == {"FD001", "FD003"}


def test_missing_data_is_a_clear_cli_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "accuracy", "--data-dir", str(tmp_path)]) == 2
    assert "train_FD001.txt: file not found; run `turbofed data fetch`" in capsys.readouterr().err


def test_bad_strategy_is_refused_before_any_data_is_read(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["bench", "accuracy", "--data-dir", str(tmp_path), "--strategy", "fedavgm"]
    assert main([*argv, "--strategy-param", "momentum=2"]) == 2
    err = capsys.readouterr().err
    assert "--strategy momentum must be in [0, 1), got 2.0" in err and "file not found" not in err
    assert main([*argv, "--strategy-param", "momentum"]) == 2
    assert "--strategy-param 'momentum': give KEY=VALUE" in capsys.readouterr().err


def test_synthetic_fleet_carries_signal() -> None:
    """The default model trained on the synthetic fleet beats predicting the training mean
    RUL by at least 2x in RMSE on its own test set."""
    import numpy as np

    from turbofed.data.synthetic import generate_fleet
    from turbofed.edge.features import runs_stats
    from turbofed.metrics import rmse
    from turbofed.spec import FeatureSpec

    fleet = generate_fleet(n_train=100, n_test=100, seed=0)
    settings = ModelSettings()
    stats = runs_stats(fleet.train, settings.window)
    spec = FeatureSpec.from_stats(stats, settings.window)
    model = train_alone(settings, spec, fleet.train, epochs=settings.rounds * settings.local_epochs)
    from turbofed.data.datasets import EvalSet

    model_rmse = evaluate(model, spec, EvalSet("SYN001", fleet.test, "official-test"))["rmse"]
    train_mean = np.mean(np.concatenate([np.minimum(r.rul(), settings.rul_cap) for r in fleet.train]))
    truth = np.array([r.rul_at_end for r in fleet.test])
    mean_rmse = rmse(np.full_like(truth, train_mean), truth)
    assert model_rmse * 2 <= mean_rmse, (model_rmse, mean_rmse)


@pytest.mark.slow
def test_fd001_figures_the_readme_claims(cmapss_dir: Path) -> None:
    """What the README states for FD001 (default settings, seed 0, 4 sites, NASA's 100 test
    engines): federated RMSE at most 12.5 and within 6% of central, and the mean local model's
    RMSE at least 1.3 x the federated one. About 30 s on a quiet 2-core machine."""
    result = run_accuracy("FD001", str(cmapss_dir), 4, ModelSettings())
    assert result["eval"] == "official-test" and result["test_engines"] == {"FD001": 100}
    federated = result["federated"]["FD001"]["rmse"]
    central = result["central"]["FD001"]["rmse"]
    local = [site["metrics"]["FD001"]["rmse"] for site in result["local"]]
    assert federated <= 12.5, result["federated"]
    assert federated <= 1.06 * central, (federated, central)
    assert sum(local) / len(local) >= 1.3 * federated, (local, federated)


@pytest.mark.slow
def test_fd002_figures_the_readme_claims(cmapss_dir: Path) -> None:
    """FD002 (six operating conditions; default settings, seed 0, 4 sites, NASA's 259 test
    engines), against the truth capped at 125 as the literature scores it: federated at most
    12.5 (measured 12.01; the best published figures are 13.3-14.8) and within 6% of central
    (0.93 x). Before regimes this stopped with "no sensor varies with RUL across the fleet"."""
    result = run_accuracy("FD002", str(cmapss_dir), 4, ModelSettings())
    assert result["eval"] == "official-test" and result["test_engines"] == {"FD002": 259}
    assert len(result["features"]["regimes"]) == 6
    federated = result["federated"]["FD002"]["rmse_capped"]
    assert federated <= 12.5, result["federated"]
    assert federated <= 1.06 * result["central"]["FD002"]["rmse_capped"], (result["federated"], result["central"])
    assert all(site["metrics"]["FD002"]["rmse_capped"] > federated for site in result["local"])


@pytest.mark.slow
def test_four_subsets_eight_sites_figures_the_readme_claims(cmapss_dir: Path) -> None:
    """FD001+FD002+FD003+FD004, two sites per subset (seed 0): the federated model beats every
    site's local model on every subset and stays within 10% of central on each (FD001 and
    FD003 against the raw truth, FD002 and FD004 capped, as the issue scores them). The
    FD003 margins are thin (1.06 x central; 21.33 vs the best local 21.66) and other seeds
    miss them (README)."""
    result = run_accuracy("FD001+FD002+FD003+FD004", str(cmapss_dir), 8, ModelSettings())
    for subset, key in (("FD001", "rmse"), ("FD002", "rmse_capped"), ("FD003", "rmse"), ("FD004", "rmse_capped")):
        federated = result["federated"][subset][key]
        assert federated <= 1.10 * result["central"][subset][key], (subset, result["federated"][subset], result["central"][subset])
        assert all(site["metrics"][subset][key] > federated for site in result["local"]), subset


@pytest.mark.slow
def test_synthetic_fleet_shows_what_real_data_shows() -> None:
    """The offline demo's fleet (synthetic, seed 0, 4 sites, its own 100 test engines): the
    mean local model's RMSE is at least 1.2 x the federated one, as on FD001 (issue #15
    item 6; measured 14.41 vs 11.38, 1.27 x), so a user without NASA's data still sees
    federation pay off. About 20 s."""
    result = run_accuracy("SYN", None, 4, ModelSettings())
    assert result["eval"] == "official-test" and result["test_engines"] == {"SYN": 100}
    federated = result["federated"]["SYN"]["rmse"]
    local = [site["metrics"]["SYN"]["rmse"] for site in result["local"]]
    assert sum(local) / len(local) >= 1.2 * federated, (local, federated)


def test_tail_average_is_the_mean_of_the_last_rounds_global_models(cmapss_dir: Path) -> None:
    """`--average-last K` (a validation trial): the federated model is the mean of the last K
    rounds' global weights, each of which is what a run of that many rounds ends with."""
    import onnx
    from tqdm import tqdm

    from turbofed.aggregator.strategies import make_strategy
    from turbofed.codec import read_weights

    train, _ = load_dataset("FD001", str(cmapss_dir), seed=0)
    sites = split_sites(train, 2)
    spec = fleet_spec(sites, QUICK.window)

    def weights(rounds: int, trial: Trial = Trial()) -> dict[str, np.ndarray]:
        model = federate(QUICK.replace(rounds=rounds), spec, sites, make_strategy("fedavg"), tqdm(disable=True), trial=trial)
        return read_weights(onnx.load_model_from_string(model))

    last2, last3, averaged = weights(2), weights(3), weights(3, Trial(average_last=2))
    assert set(averaged) == set(last3)
    for name, w in averaged.items():
        assert w.dtype == np.float32
        np.testing.assert_allclose(w, (last2[name].astype(np.float64) + last3[name]) / 2, rtol=1e-6, atol=1e-7)
    assert any(not np.array_equal(last2[n], last3[n]) for n in last3)  # the two rounds' models differ: a real average


def test_cosine_rate_trial_runs_from_the_rate_down_to_its_final_share() -> None:
    rates = [Trial(lr_final=0.1).rate(3e-3, r, 80) for r in range(80)]
    assert rates[0] == 3e-3 and abs(rates[-1] - 3e-4) < 1e-12
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert abs(rates[40] - 3e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 40 / 79)))) < 1e-15
    assert Trial().rate(3e-3, 79, 80) == 3e-3  # the default: constant


def test_rate_set_between_rounds_reaches_adam(cmapss_dir: Path) -> None:
    """The trial's per-round rate reaches the optimizer scikit-learn built in the first
    round: at rate 0 a further epoch leaves every weight where it was."""
    from turbofed.edge.learner import RulModel

    train, _ = load_dataset("FD001", str(cmapss_dir), seed=0)
    sites = split_sites(train, 2)
    spec = fleet_spec(sites, QUICK.window)
    x, y = training_rows(spec, sites[0].runs)
    learner = RulModel(QUICK, spec)
    learner.train(x, y, epochs=1)
    before = {n: w.copy() for n, w in learner.weights().items()}  # weights() may share the live arrays
    _set_rate(learner, 0.0)
    learner.train(x, y, epochs=1)
    assert all(np.array_equal(before[n], w) for n, w in learner.weights().items())
    _set_rate(learner, 3e-3)
    learner.train(x, y, epochs=1)
    assert any(not np.array_equal(before[n], w) for n, w in learner.weights().items())


def test_sensor_threshold_trial_reaches_every_model(cmapss_dir: Path) -> None:
    """`--min-correlation`: a lower threshold keeps every sensor the default keeps and more."""
    train, _ = load_dataset("FD001", str(cmapss_dir), seed=0)
    sites = split_sites(train, 2)
    default, loose, strict = (fleet_spec(sites, QUICK.window, r) for r in (0.2, 0.0, 0.7))
    assert set(strict.sensors) < set(default.sensors) < set(loose.sensors)
    result = run_accuracy("FD001", str(cmapss_dir), 2, QUICK.replace(rounds=1), validation=True,
                          trial=Trial(min_correlation=0.7))
    assert result["features"]["sensors"] == [i + 1 for i in strict.sensors]
    assert result["trial"] == {"average_last": 0, "lr_final": 1.0, "min_correlation": 0.7}
