"""A compromised site on a live fleet, signed with its real key, on Mosquitto
(tests/plugins/scaling_attacker.py). One agent process sends its weights x 1000 every round:
under the default strategy it is excluded every round and the global model stays within 10%
of the RMSE the same fleet reaches with that site honest. One claims 2^53 - 1 samples: the
aggregator weighs it by the samples it has seen from it, says so, and nothing breaks."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.livefleet import LiveFleet, wait_for
from turbofed.benchmarks.accuracy import evaluate
from turbofed.config import DEFAULT_STRATEGY, ModelSettings
from turbofed.data.cmapss import load_subset
from turbofed.data.datasets import holdout
from turbofed.simulation.localfleet import FleetWatch
from turbofed.store import open_store

pytestmark = pytest.mark.slow

SITES = ["site1", "site2", "site3", "site4"]
ATTACKER = "site4"
ROUNDS = 5
TRAIN_ENGINES = 24  # replayed to failure, six per site; validation engines come from the rest


def alive(process: subprocess.Popen, work: Path) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"attacker exited ({process.returncode}): {(work / f'{ATTACKER}.log').read_text()[-2000:]}")
    return True


def run_fleet(broker, pki_dir: Path, cmapss_dir: Path, work: Path, attack: str | None) -> tuple[float, list[dict], dict[str, int]]:
    """RMSE of the final global model on validation engines, the store's rounds and each
    site's labelled rows. `attack`: None (every site honest), "scale" or "inflate"."""
    work.mkdir()
    fleet = LiveFleet(broker, work, SITES, ModelSettings(rounds=ROUNDS, local_epochs=1), pki=pki_dir)
    attacker: subprocess.Popen | None = None
    watch = FleetWatch(fleet.broker, pki_dir)  # the attacker process's signed status: online, rows buffered
    try:
        honest = SITES[:-1] if attack else SITES
        for site in honest:
            fleet.start_agent(site)
        if attack:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
            with open(work / f"{ATTACKER}.log", "ab") as log:
                attacker = subprocess.Popen([sys.executable, "-m", "tests.plugins.scaling_attacker", str(fleet.site_toml(ATTACKER)),
                                             *(["inflate"] if attack == "inflate" else [])],
                                            stdout=log, stderr=subprocess.STDOUT, cwd=work, env=env)
            wait_for("the attacker process online", lambda: alive(attacker, work) and watch.site_status(ATTACKER).online)
        fleet.replay("train", TRAIN_ENGINES, cmapss_dir)
        # Round-robin: engine k goes to site k mod 4; every row of a failed engine is labelled.
        engines = load_subset("FD001", str(cmapss_dir)).train[:TRAIN_ENGINES]
        expected = {s: sum(len(run.cycles) for k, run in enumerate(engines) if k % len(SITES) == i) for i, s in enumerate(SITES)}
        wait_for("honest sites to buffer their failed engines", lambda: all(fleet.agents[s].buffer.rows == expected[s] for s in honest))
        if attacker is not None:
            wait_for("the attacker to buffer its engines", lambda: alive(attacker, work) and watch.site_status(ATTACKER).samples == expected[ATTACKER])
        aggregator = fleet.start_aggregator()
        store = open_store(fleet.fleet.store)

        wait_for(f"{ROUNDS} rounds in the store", lambda: (attacker is None or alive(attacker, work)) and len(store.rounds()) == ROUNDS + 1, 240)
        model, spec = aggregator.model.SerializeToString(), aggregator.spec
        rounds = store.rounds()
    finally:
        if attacker is not None and attacker.poll() is None:
            attacker.terminate()
            attacker.wait(30)
        watch.close()
        fleet.close()
    subset = load_subset("FD001", str(cmapss_dir))
    _, validation = holdout(replace(subset, train=subset.train[TRAIN_ENGINES:], test=None), seed=0)
    return evaluate(model, spec, validation)["rmse"], rounds, expected


@pytest.mark.parametrize("broker", ["mosquitto"], indirect=True)  # the secure broker: real keys, real TLS
def test_scale_attacker_is_excluded_and_costs_under_ten_percent(broker, pki_dir: Path, cmapss_dir: Path, tmp_path: Path) -> None:
    clean, clean_rounds, _ = run_fleet(broker, pki_dir, cmapss_dir, tmp_path / "clean", attack=None)
    attacked, rounds, _ = run_fleet(broker, pki_dir, cmapss_dir, tmp_path / "attacked", attack="scale")
    assert all(r["strategy"] == DEFAULT_STRATEGY for r in clean_rounds + rounds)
    actions = [{p["site"]: p["action"] for p in r["participants"]} for r in rounds[1:]]
    assert all(a.get(ATTACKER) == "excluded" for a in actions), actions
    assert all(a[s] == "kept" for a in actions for s in SITES[:-1]), actions
    print(f"validation RMSE: clean {clean:.2f}, one site of four scaling x1000 {attacked:.2f}")
    assert attacked <= 1.10 * clean, (attacked, clean)


@pytest.mark.parametrize("broker", ["mosquitto"], indirect=True)
def test_an_inflated_sample_count_weighs_what_the_site_has(broker, pki_dir: Path, cmapss_dir: Path, tmp_path: Path) -> None:
    """Issue #12: an update claiming 2^53 - 1 samples weighs the samples the aggregator has seen
    from that site (its statistics answer and status); every round closes and the fleet follows."""
    _, rounds, rows = run_fleet(broker, pki_dir, cmapss_dir, tmp_path / "inflated", attack="inflate")
    assert [r["round"] for r in rounds] == list(range(ROUNDS + 1))
    for r in rounds[1:]:
        parts = {p["site"]: p for p in r["participants"]}
        assert sorted(parts) == SITES and r["closed_by"] == "quorum"
        assert parts[ATTACKER]["samples"] == rows[ATTACKER], parts[ATTACKER]
        assert f"weight capped at {rows[ATTACKER]} observed samples" in parts[ATTACKER]["action"], parts[ATTACKER]
        assert all(parts[s]["samples"] == rows[s] and "capped" not in parts[s]["action"] for s in SITES[:-1]), parts
