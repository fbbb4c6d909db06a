"""The synthetic fleet: deterministic, C-MAPSS-shaped, round-trips through files, and
carries the degradation signal (per fault mode) that RUL models learn from."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from turbofed.cli import main
from turbofed.data.cmapss import N_COLUMNS, EngineRun, Subset, load_subset, read_table
from turbofed.data.synthetic import (
    CONSTANT_SENSORS,
    MAX_LIFE,
    MIN_LIFE,
    MIN_TEST_CYCLES,
    generate_fleet,
    write_subset,
)

pytestmark = pytest.mark.timeout(60)

S4, S7, S12 = 3, 6, 11  # 0-based sensor columns: T50 (LPT outlet temp), P30, phi


def _runs(subset) -> list[EngineRun]:
    return subset.train + (subset.test or [])


def _same(a: EngineRun, b: EngineRun) -> bool:
    return (
        a.unit == b.unit
        and a.rul_at_end == b.rul_at_end
        and np.array_equal(a.cycles, b.cycles)
        and np.array_equal(a.settings, b.settings)
        and np.array_equal(a.sensors, b.sensors)
    )


def _end_shift(run: EngineRun) -> np.ndarray:
    """Late-life minus early-life mean of every sensor: the degradation signature."""
    return run.sensors[-10:].mean(axis=0) - run.sensors[:30].mean(axis=0)


@pytest.fixture(scope="module")
def fleet():
    return generate_fleet(n_train=300, n_test=100, seed=3)


def test_same_seed_gives_identical_arrays():
    a = generate_fleet(n_train=30, n_test=20, seed=11, fault_modes=2)
    b = generate_fleet(n_train=30, n_test=20, seed=11, fault_modes=2)
    assert len(a.train) == 30 and len(a.test) == 20
    assert all(_same(x, y) for x, y in zip(_runs(a), _runs(b)))


def test_different_seeds_differ():
    a = generate_fleet(n_train=10, n_test=10, seed=1)
    b = generate_fleet(n_train=10, n_test=10, seed=2)
    assert [len(r) for r in a.train] != [len(r) for r in b.train]
    assert not np.array_equal(a.train[0].sensors[:20], b.train[0].sensors[:20])


def test_runs_have_cmapss_shape(fleet):
    for run in _runs(fleet):
        n = len(run)
        assert run.rows().shape == (n, N_COLUMNS)
        assert run.settings.shape == (n, 3) and run.sensors.shape == (n, 21)
        assert np.array_equal(run.cycles, np.arange(1, n + 1))
        assert np.all(np.isfinite(run.sensors))
    assert [r.unit for r in fleet.train] == list(range(1, 301))
    assert [r.unit for r in fleet.test] == list(range(1, 101))
    # Train runs end at failure; test runs stop early with at least 31 cycles shown.
    assert all(r.rul_at_end == 0.0 for r in fleet.train)
    truth = np.array([r.rul_at_end for r in fleet.test])
    assert np.all(truth > 0) and np.all(truth <= 145) and np.all(truth == np.round(truth))
    assert truth.std() > 25  # spread over early, mid and late life, not one point
    assert min(len(r) for r in fleet.test) >= MIN_TEST_CYCLES
    # Sea level: settings near (0, 0, 100), as in FD001.
    settings = np.vstack([r.settings for r in fleet.train])
    assert np.all(np.abs(settings[:, :2]) < 0.02) and np.all(settings[:, 2] == 100.0)
    # The 7 sensors constant in FD001 are constant here; the other 14 are not.
    sensors = np.vstack([r.sensors for r in fleet.train])
    constant = np.flatnonzero(np.ptp(sensors, axis=0) == 0) + 1
    assert tuple(constant) == CONSTANT_SENSORS
    # Levels and noise in FD001's range (T50 ~1400 R with a few R of noise).
    assert 1395 < sensors[:, S4].mean() < 1415
    assert 2.0 < np.diff(fleet.train[0].sensors[:50, S4]).std() / np.sqrt(2) < 6.0


def test_lengths_look_like_fd001(fleet):
    lengths = np.array([len(r) for r in fleet.train])
    assert MIN_LIFE <= lengths.min() and lengths.max() <= MAX_LIFE
    assert 175 < np.median(lengths) < 225  # FD001: 199
    assert lengths.std() > 25  # FD001: 46
    assert np.percentile(lengths, 90) - np.percentile(lengths, 10) > 60


def test_sensors_trend_with_degradation(fleet):
    sensors = np.vstack([r.sensors for r in fleet.train])
    rul = np.concatenate([r.rul() for r in fleet.train])
    # FD001: T50 and RUL correlate at -0.68, phi at +0.67.
    assert np.corrcoef(sensors[:, S4], rul)[0, 1] < -0.6
    assert np.corrcoef(sensors[:, S12], rul)[0, 1] > 0.6
    # Every engine's T50 rises towards failure (it is hotter at the end than at the start).
    assert all(_end_shift(r)[S4] > 5 for r in fleet.train)


def test_two_fault_modes_have_distinct_signatures():
    one = generate_fleet(n_train=120, n_test=0, seed=5, fault_modes=1)
    two = generate_fleet(n_train=120, n_test=0, seed=5, fault_modes=2)
    assert one.test is None
    shift_one = np.array([_end_shift(r) for r in one.train])
    shift_two = np.array([_end_shift(r) for r in two.train])
    # HPC fault (FD001): P30 and phi fall towards failure, for every engine.
    assert np.all(shift_one[:, S7] < 0) and np.all(shift_one[:, S12] < 0)
    # HPC or fan (FD003): fan-fault engines' P30 and phi rise instead; two clusters with a
    # clear gap, P30 and phi agreeing engine by engine, roughly half of each.
    fan = shift_two[:, S7] > 0
    assert 0.3 < fan.mean() < 0.7
    assert np.array_equal(fan, shift_two[:, S12] > 0)
    assert shift_two[fan, S7].min() > 5 and shift_two[~fan, S7].max() < 0
    # Both kinds still heat up towards failure.
    assert np.all(shift_two[:, S4] > 5)


def test_write_then_load_round_trips_exactly(tmp_path: Path):
    fleet = generate_fleet(n_train=12, n_test=8, seed=4, fault_modes=2, name="SYN777")
    paths = write_subset(fleet, tmp_path / "out")
    assert [p.name for p in paths] == ["train_SYN777.txt", "test_SYN777.txt", "RUL_SYN777.txt"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)
    assert read_table(paths[0]).shape == (sum(len(r) for r in fleet.train), N_COLUMNS)
    first = paths[0].read_text().splitlines()[0].split()
    assert len(first) == N_COLUMNS and first[:2] == ["1", "1"]
    loaded = load_subset("SYN777", tmp_path / "out", require_test=True)
    assert len(loaded.train) == 12 and len(loaded.test) == 8
    assert all(_same(x, y) for x, y in zip(_runs(fleet), _runs(loaded)))


def test_write_without_test_runs_removes_stale_test_files(tmp_path: Path):
    write_subset(generate_fleet(n_train=3, n_test=3, seed=1), tmp_path)
    fresh = generate_fleet(n_train=4, n_test=0, seed=2)
    assert write_subset(fresh, tmp_path) == [tmp_path / "train_SYN001.txt"]
    loaded = load_subset("SYN001", tmp_path)
    assert loaded.test is None
    assert all(_same(x, y) for x, y in zip(fresh.train, loaded.train))


def test_write_keeps_values_that_are_not_on_nasa_decimals(tmp_path: Path):
    run = generate_fleet(n_train=1, n_test=0, seed=0).train[0]
    odd = EngineRun(run.unit, run.cycles, run.settings + 1e-7, run.sensors / 3.0, 0.0)
    write_subset(Subset("ODD", [odd], None), tmp_path)
    assert _same(odd, load_subset("ODD", tmp_path).train[0])


def test_cli_writes_a_loadable_fleet(tmp_path: Path, capsys):
    out = tmp_path / "synthetic"
    args = ["--out", str(out), "--engines", "5", "--seed", "9", "--fault-modes", "2", "--name", "SYNX"]
    code = main(["data", "synth", *args])
    assert code == 0
    printed = capsys.readouterr().out
    assert str(out / "train_SYNX.txt") in printed and str(out / "RUL_SYNX.txt") in printed
    loaded = load_subset("SYNX", out, require_test=True)
    expected = generate_fleet(n_train=5, n_test=5, seed=9, fault_modes=2, name="SYNX")
    assert all(_same(x, y) for x, y in zip(_runs(expected), _runs(loaded)))


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError):
        generate_fleet(n_train=0)
    with pytest.raises(ValueError):
        generate_fleet(fault_modes=3)
    with pytest.raises(ValueError):
        generate_fleet(name="../escape")
    assert main(["data", "synth", "--engines", "0"]) == 2
    assert main(["data", "synth", "--engines", "1", "--name", "a/b"]) == 2


def test_thousands_of_engines_are_fast():
    start = time.process_time()
    fleet = generate_fleet(n_train=2000, n_test=0, seed=8)
    elapsed = time.process_time() - start
    assert len(fleet.train) == 2000
    assert sum(len(r) for r in fleet.train) > 2000 * MIN_LIFE
    assert elapsed < 10.0, f"2,000 engines took {elapsed:.1f} s of CPU: is it still vectorised?"
