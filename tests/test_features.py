"""Fleet statistics combine exactly across sites; streaming and batch features agree bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from turbofed.data.cmapss import load_subset
from turbofed.edge.features import (
    BASELINE,
    EngineWindow,
    history_stats,
    run_features,
    runs_stats,
)
from turbofed.spec import FeatureSpec, FleetStats


@pytest.fixture(scope="module")
def fd001(cmapss_dir: Path):
    return load_subset("FD001", cmapss_dir)


def stats_of(runs, window: int = 30) -> FleetStats:
    return runs_stats(runs, window)


def test_site_stats_sum_to_pooled_stats(fd001) -> None:
    pooled_rows = np.vstack([r.sensors for r in fd001.train])
    fleet = stats_of(fd001.train[:30]) + stats_of(fd001.train[30:70]) + stats_of(fd001.train[70:])
    np.testing.assert_allclose(fleet.mean()[1:], pooled_rows.mean(0), rtol=1e-12)
    # sums of squares cancel for constant sensors near 2388: a std of ~1e-5 instead of 0
    np.testing.assert_allclose(fleet.std()[1:], pooled_rows.std(0), rtol=1e-6, atol=1e-8 * 2388 * 1e3)
    assert FleetStats.from_dict(fleet.to_dict()).count == fleet.count == len(pooled_rows)
    pooled_features = np.vstack([history_stats_features(r) for r in fd001.train])
    np.testing.assert_allclose(fleet.feature_mean(), pooled_features.mean(0), rtol=1e-9, atol=1e-9)


def history_stats_features(run) -> np.ndarray:
    from turbofed.edge.features import history_features

    return history_features(run.cycles, run.sensors, 30)


def test_spec_standardises_the_chosen_features(fd001) -> None:
    spec = FeatureSpec.from_stats(stats_of(fd001.train[:60]) + stats_of(fd001.train[60:]))
    x = np.vstack([run_features(spec, r.cycles, r.sensors) for r in fd001.train])
    z = (x - np.array(spec.offset)) / np.array(spec.scale)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(z.std(0), 1, rtol=1e-5)  # sums of squares of levels near 2388 cancel a little


def test_statistics_of_different_windows_do_not_mix(fd001) -> None:
    with pytest.raises(ValueError, match="30-cycle window to those of a 40-cycle window"):
        stats_of(fd001.train[:2], 30) + stats_of(fd001.train[2:4], 40)
    with pytest.raises(ValueError, match="for a 30-cycle window, not 40"):
        FeatureSpec.from_stats(stats_of(fd001.train[:2], 30), window=40)
    d = stats_of(fd001.train[:2]).to_dict()
    del d["feature_sumsq"]
    with pytest.raises(ValueError, match="lack field.*feature_sumsq"):
        FleetStats.from_dict(d)


def test_informative_sensors_come_from_statistics(fd001) -> None:
    spec = FeatureSpec.from_stats(stats_of(fd001.train))
    # the 14 sensors the C-MAPSS literature keeps for FD001 (1-based 2,3,4,7,8,9,11,12,13,14,15,17,20,21)
    assert [i + 1 for i in spec.sensors] == [2, 3, 4, 7, 8, 9, 11, 12, 13, 14, 15, 17, 20, 21]
    assert spec.n_features == 4 * 14 + 1


def test_constant_sensor_is_never_informative() -> None:
    rng = np.random.default_rng(0)
    sensors = rng.normal(size=(200, 21))
    sensors[:, 4] = 14.62  # constant
    rul = np.arange(200, 0, -1.0)
    sensors[:, 0] += rul / 50  # one sensor follows RUL
    spec = FeatureSpec.from_stats(history_stats(np.arange(1, 201), sensors, rul, 30))
    assert 0 in spec.sensors and 4 not in spec.sensors


def test_streaming_equals_batch_bit_for_bit(fd001) -> None:
    spec = FeatureSpec.from_stats(stats_of(fd001.train), window=30)
    for run in (fd001.train[0], fd001.test[1], fd001.test[0].cut(5)):  # long, short, shorter than W
        batch = run_features(spec, run.cycles, run.sensors)
        window = EngineWindow(spec)
        streamed = []
        for c, s in zip(run.cycles, run.sensors):
            window.push(c, s)
            streamed.append(window.features())
        streamed = np.vstack(streamed)
        assert batch.shape == (len(run), spec.n_features)
        np.testing.assert_array_equal(streamed, batch)


def test_short_history_is_padded_with_first_reading(fd001) -> None:
    spec = FeatureSpec.from_stats(stats_of(fd001.train), window=30)
    run = fd001.train[0]
    first = run_features(spec, run.cycles[:1], run.sensors[:1])[0]
    s = len(spec.sensors)
    level = run.sensors[0, list(spec.sensors)]
    np.testing.assert_allclose(first[:s], 0, atol=1e-9)  # recent level = the baseline = the first reading
    np.testing.assert_allclose(first[2 * s : 3 * s], 0, atol=1e-9)  # no slope yet
    np.testing.assert_allclose(first[3 * s : 4 * s], level)
    assert first[-1] == run.cycles[0]


def test_baseline_is_the_mean_of_the_first_readings_only(fd001) -> None:
    spec = FeatureSpec.from_stats(stats_of(fd001.train), window=30)
    run = fd001.train[0]
    s = len(spec.sensors)
    x = run_features(spec, run.cycles, run.sensors)
    early = run.sensors[:BASELINE, list(spec.sensors)].mean(0)
    np.testing.assert_allclose(x[BASELINE - 1, 3 * s : 4 * s], early)
    np.testing.assert_allclose(x[-1, 3 * s : 4 * s], early)  # frozen after the first BASELINE cycles
    recent = run.sensors[-5:, list(spec.sensors)].mean(0)
    np.testing.assert_allclose(x[-1, :s], recent - early)


def test_feature_names_follow_the_computed_layout() -> None:
    """`turbofed.layout` names each column `window_features` computes: a sensor that ramps by
    k per cycle from level b shows slope k, baseline b, and departures from b in the right columns."""
    from turbofed.edge.features import RECENT, window_features
    from turbofed.layout import N_SENSORS, feature_columns, feature_names

    window, slopes, bases = 10, np.arange(1.0, N_SENSORS + 1), np.linspace(100.0, 300.0, N_SENSORS)
    t = np.arange(window, dtype=float)[:, None]
    windows = (bases + slopes * t)[None]  # (1, W, S)
    feats = window_features(windows, bases[None], np.array([42.0]))[0]
    sensors = [0, 6, 20]
    named = dict(zip(feature_names(sensors), feats[feature_columns(sensors)]))
    for i in sensors:
        s = f"s{i + 1}"
        assert named[f"{s}.slope"] == pytest.approx(slopes[i])
        assert named[f"{s}.baseline"] == pytest.approx(bases[i])
        assert named[f"{s}.window_mean"] == pytest.approx(slopes[i] * (window - 1) / 2)
        assert named[f"{s}.recent"] == pytest.approx(slopes[i] * (window - 1 - (RECENT - 1) / 2))
    assert named["cycle"] == 42.0
    assert len(named) == FeatureSpec((0, 6, 20), window, (0.0,) * 13, (1.0,) * 13).n_features
