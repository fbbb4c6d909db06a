"""Operating regimes found from federated statistics, sensors normalised per regime, the
statistics' vector form, predictions clipped to [0, cap] and out-of-range engines flagged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from turbofed.data.cmapss import load_subset
from turbofed.edge.features import (
    EngineWindow,
    run_features,
    runs_regime_stats,
    runs_stats,
)
from turbofed.spec import MAX_CELLS, FeatureSpec, FleetStats, Regimes, RegimeStats, grid_cells


@pytest.fixture(scope="module")
def fd002(cmapss_dir: Path):
    return load_subset("FD002", cmapss_dir)


@pytest.fixture(scope="module")
def fd001(cmapss_dir: Path):
    return load_subset("FD001", cmapss_dir)


def test_fd002_six_regimes_from_site_sums_equal_pooled(fd002) -> None:
    runs = fd002.train
    sites = [runs_regime_stats(runs[k::4]) for k in range(4)]
    fleet = sum(sites, RegimeStats())
    pooled = runs_regime_stats(runs)
    assert sorted(fleet.cells) == sorted(pooled.cells)
    for c in pooled.cells:
        np.testing.assert_allclose(fleet.cells[c], pooled.cells[c], rtol=1e-12)
    regimes = Regimes.from_stats(fleet)
    assert regimes.cells == ((0, 0, 100), (10, 25, 100), (20, 70, 100), (25, 62, 60), (35, 84, 100), (42, 84, 100))
    settings = np.vstack([r.settings for r in runs])
    sensors = np.vstack([r.sensors for r in runs])
    z = regimes.normalise(settings, sensors)
    r = regimes.assign(settings)
    for k in range(6):
        zk = z[r == k]
        varying = np.asarray(regimes.std[k]) > 0
        np.testing.assert_allclose(zk[:, varying].mean(0), 0, atol=1e-9)
        np.testing.assert_allclose(zk[:, varying].std(0), 1, rtol=1e-6)
        assert np.all(zk[:, ~varying] == 0)  # constant in the regime: 0, not noise blown up


def test_fd001_is_one_regime_and_needs_no_settings(fd001) -> None:
    regimes = Regimes.from_stats(runs_regime_stats(fd001.train))
    assert regimes.cells == ((0, 0, 100),)
    spec = FeatureSpec.from_stats(runs_stats(fd001.train, 30, regimes), regimes=regimes)
    run = fd001.train[0]
    np.testing.assert_array_equal(run_features(spec, run.cycles, run.sensors), run_features(spec, run.cycles, run.sensors, run.settings))
    # per-regime normalisation is affine per sensor on one regime: the standardised features are the old ones
    old = FeatureSpec.from_stats(runs_stats(fd001.train, 30))
    assert old.sensors == spec.sensors
    z_new = (run_features(spec, run.cycles, run.sensors) - spec.offset) / spec.scale
    z_old = (run_features(old, run.cycles, run.sensors) - old.offset) / old.scale
    np.testing.assert_allclose(z_new, z_old, atol=1e-6)


def test_small_cell_joins_the_nearest_regime() -> None:
    rng = np.random.default_rng(0)
    settings = np.vstack([np.tile([0.0, 0.0, 100.0], (500, 1)), np.tile([20.0, 0.7, 100.0], (500, 1)), [[19.0, 0.7, 100.0]]])
    sensors = rng.normal(size=(1001, 21))
    stats = RegimeStats.from_rows(settings, sensors)
    assert len(stats.cells) == 3
    regimes = Regimes.from_stats(stats)
    assert regimes.cells == ((0, 0, 100), (20, 70, 100))
    np.testing.assert_allclose(regimes.mean[1], sensors[500:].mean(0), rtol=1e-9, atol=1e-12)  # its sums joined
    assert regimes.assign(np.array([[19.2, 0.69, 100.0], [1.0, 0.01, 100.0]])).tolist() == [1, 0]


def test_streaming_window_equals_batch_features_with_regimes(fd002) -> None:
    regimes = Regimes.from_stats(runs_regime_stats(fd002.train[:50]))
    spec = FeatureSpec.from_stats(runs_stats(fd002.train[:50], 30, regimes), regimes=regimes)
    run = fd002.train[60]
    batch = run_features(spec, run.cycles, run.sensors, run.settings)
    w = EngineWindow(spec)
    for i, (c, s, g) in enumerate(zip(run.cycles, run.sensors, run.settings)):
        w.push(c, s, g)
        np.testing.assert_array_equal(w.features(), batch[i])
    with pytest.raises(ValueError, match="need their settings"):
        run_features(spec, run.cycles, run.sensors)


def test_spec_with_regimes_round_trips_and_hashes(fd002) -> None:
    regimes = Regimes.from_stats(runs_regime_stats(fd002.train[:40]))
    spec = FeatureSpec.from_stats(runs_stats(fd002.train[:40], 30, regimes), regimes=regimes)
    back = FeatureSpec.from_dict(spec.to_dict())
    assert back == spec and hash(back) == hash(spec)
    assert "regimes" not in FeatureSpec.from_dict({k: v for k, v in spec.to_dict().items() if k != "regimes"}).to_dict()


def test_fleet_stats_vector_round_trip_and_adds(fd001) -> None:
    a, b = runs_stats(fd001.train[:10], 30), runs_stats(fd001.train[10:20], 30)
    back = FleetStats.from_vector(a.to_vector(), like=a)
    for k, v in a.to_dict().items():
        np.testing.assert_array_equal(np.asarray(back.to_dict()[k]), np.asarray(v))
    summed = FleetStats.from_vector(a.to_vector() + b.to_vector(), like=a)
    np.testing.assert_allclose(summed.to_vector(), (a + b).to_vector(), rtol=1e-15)
    assert a.to_vector().dtype == np.float64
    with pytest.raises(ValueError, match="must be"):
        FleetStats.from_vector(a.to_vector()[:-1], like=a)


def test_regime_stats_vector_and_dict_round_trip(fd002) -> None:
    a = runs_regime_stats(fd002.train[:5])
    cells = sorted(runs_regime_stats(fd002.train).cells)
    back = RegimeStats.from_vector(a.to_vector(cells), cells)
    assert sorted(back.cells) == sorted(a.cells)
    d = RegimeStats.from_dict(a.to_dict())
    for c in a.cells:
        np.testing.assert_array_equal(d.cells[c], a.cells[c])


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({"cells": [[0, 0, 100, 1.0]]}, "3 grid indices"),
        ({"cells": [[0, 0, 100.5] + [1.0] * 43]}, "whole numbers"),
        ({"cells": [[0, 0, 100, -1.0] + [1.0] * 42]}, "negative"),
        ({"cells": [[0, 0, 100, float("nan")] + [1.0] * 42]}, "non-finite"),
        ({"cells": [[0, 0, 100] + [1.0] * 43] * 2}, "twice"),
        ({"cells": [[i, 0, 100] + [1.0] * 43 for i in range(MAX_CELLS + 1)]}, "at most"),
        ({"cells": "x"}, "list"),
    ],
)
def test_hostile_regime_stats_refused(bad: dict, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        RegimeStats.from_dict(bad)


def test_grid_rounds_noise_away_and_has_no_negative_zero() -> None:
    g = grid_cells(np.array([[-0.0087, -0.0006, 100.0], [42.008, 0.842, 100.0], [24.9979, 0.6203, 60.0]]))
    assert g.tolist() == [[0, 0, 100], [42, 84, 100], [25, 62, 60]]
    assert not np.signbit(g.astype(float)).any()


def test_out_of_range_flags_a_shifted_engine(fd001) -> None:
    spec = FeatureSpec.from_stats(runs_stats(fd001.train, 30))
    last = np.vstack([run_features(spec, r.cycles, r.sensors)[-1] for r in fd001.test])
    assert spec.out_of_range(last).mean() < 0.05
    run = fd001.test[0]
    shifted = run.sensors.copy()
    shifted[-10:, spec.sensors[0]] += 50 * shifted[:, spec.sensors[0]].std() + 5
    assert spec.out_of_range(run_features(spec, run.cycles, shifted)[-1]).tolist() == [True]


def test_predictions_clipped_to_zero_and_cap(fd001) -> None:
    from turbofed.config import ModelSettings
    from turbofed.edge.inference import OnnxPredictor
    from turbofed.graph import reference_model, weight_shapes

    settings = ModelSettings(kind="sgd")
    spec = FeatureSpec.from_stats(runs_stats(fd001.train[:5], 30))
    shapes = weight_shapes(spec, settings)
    for bias, expected in ((1e4, 125.0), (-1e4, 0.0)):
        weights = {"coef": np.zeros(shapes["coef"], np.float32), "intercept": np.full(shapes["intercept"], bias, np.float32)}
        model = reference_model(spec, settings, weights).SerializeToString()
        assert OnnxPredictor(model, cap=125.0).predict(np.zeros(spec.n_features)).tolist() == [expected]


def test_stats_messages_carry_phase_regimes_and_regime_stats(fd002) -> None:
    import json

    from turbofed.messages import StatsReply, StatsRequest
    from turbofed.messages._check import MessageError

    stats = runs_regime_stats(fd002.train[:3])
    regimes = Regimes.from_stats(stats)
    request = StatsRequest.from_payload(StatsRequest("r", 10, 30, "features", regimes).to_payload())
    assert request.phase == "features" and request.regimes == regimes
    assert StatsRequest.from_payload(StatsRequest("r", 10, 30).to_payload()) == StatsRequest("r", 10, 30)  # the old form
    reply = StatsReply.from_payload(StatsReply("r", "site1", 5, 3, regime_stats=stats).to_payload(), site="site1")
    assert sorted(reply.regime_stats.cells) == sorted(stats.cells)
    for body, reason in (
        ({"request_id": "r", "min_samples": 1, "window": 30, "phase": "everything"}, "phase must be"),
        ({"request_id": "r", "min_samples": 1, "window": 30, "phase": "regimes", "regimes": regimes.to_dict()}, "without regimes"),
        ({"request_id": "r", "min_samples": 1, "window": 30, "regimes": {**regimes.to_dict(), "std": [[-1.0] * 21] * 6}}, "std not negative"),
    ):
        with pytest.raises(MessageError, match=reason):
            StatsRequest.from_payload(json.dumps(body).encode())
    bad = {"request_id": "r", "site": "site1", "samples": 5, "engines": 3, "stats": None, "regime_stats": {"cells": [[0, 0, 100, -5.0] + [0.0] * 42]}}
    with pytest.raises(MessageError, match="negative"):
        StatsReply.from_payload(json.dumps(bad).encode(), site="site1")


def test_assign_one_agrees_with_assign(fd002) -> None:
    regimes = Regimes.from_stats(runs_regime_stats(fd002.train[:20]))
    settings = np.vstack([r.settings for r in fd002.train[:20]] + [np.array([[19.4, 0.7, 100.0], [30.0, 0.73, 80.0], [-0.004, 0.005, 100.0]])])
    assert [regimes.assign_one(g) for g in settings] == regimes.assign(settings).tolist()
