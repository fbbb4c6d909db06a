"""Fleet statistics combine exactly across sites; streaming and batch features agree bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge.cmapss import load_subset
from edge.features import EngineWindow, run_features
from turbofed.spec import FeatureSpec, FleetStats


@pytest.fixture(scope="module")
def fd001(cmapss_dir: Path):
    return load_subset("FD001", cmapss_dir)


def stats_of(runs) -> FleetStats:
    return sum((FleetStats.from_rows(r.cycles, r.sensors, r.rul()) for r in runs), FleetStats())


def test_site_stats_sum_to_pooled_stats(fd001) -> None:
    pooled_rows = np.vstack([r.sensors for r in fd001.train])
    fleet = stats_of(fd001.train[:30]) + stats_of(fd001.train[30:70]) + stats_of(fd001.train[70:])
    np.testing.assert_allclose(fleet.mean()[1:], pooled_rows.mean(0), rtol=1e-12)
    # sums of squares cancel for constant sensors near 2388: a std of ~1e-5 instead of 0
    np.testing.assert_allclose(fleet.std()[1:], pooled_rows.std(0), rtol=1e-6, atol=1e-8 * 2388 * 1e3)
    assert FleetStats.from_dict(fleet.to_dict()).count == fleet.count == len(pooled_rows)


def test_informative_sensors_come_from_statistics(fd001) -> None:
    spec = FeatureSpec.from_stats(stats_of(fd001.train))
    # the 14 sensors the C-MAPSS literature keeps for FD001 (1-based 2,3,4,7,8,9,11,12,13,14,15,17,20,21)
    assert [i + 1 for i in spec.sensors] == [2, 3, 4, 7, 8, 9, 11, 12, 13, 14, 15, 17, 20, 21]
    assert spec.n_features == 3 * 14 + 1


def test_constant_sensor_is_never_informative() -> None:
    rng = np.random.default_rng(0)
    sensors = rng.normal(size=(200, 21))
    sensors[:, 4] = 14.62  # constant
    rul = np.arange(200, 0, -1.0)
    sensors[:, 0] += rul / 50  # one sensor follows RUL
    spec = FeatureSpec.from_stats(FleetStats.from_rows(np.arange(1, 201), sensors, rul))
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
    np.testing.assert_allclose(first[:s], level)  # recent mean of 30 copies of the first reading
    np.testing.assert_allclose(first[2 * s : 3 * s], 0, atol=1e-9)  # no slope yet
    assert first[-1] == run.cycles[0]
