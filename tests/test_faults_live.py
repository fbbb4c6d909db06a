"""Issue #12, aggregator side, on a real Mosquitto with real processes: an aggregator killed
at each step of committing a round loses and repeats nothing; a lost registry is refused
until `--reset`, which starts a new fleet epoch the agents follow; a full registry disk
holds a round back without a crash until there is room; rounds without updates stall
with a reason instead of looping. docs/operations.md says what each looks like."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import fill_disk
from tests.livefleet import LiveFleet, wait_for
from turbofed.aggregator.faults import ENV, STEPS
from turbofed.aggregator.registry import ModelRegistry
from turbofed.config import ModelSettings
from turbofed.store import open_store

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("broker", ["mosquitto"], indirect=True)]


def _log(fleet: LiveFleet) -> str:
    return (fleet.work / "aggregator.log").read_text(errors="replace")


def _stop(process: subprocess.Popen | None) -> None:
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _registry_versions(fleet: LiveFleet) -> list[int]:
    with ModelRegistry(fleet.fleet.registry) as reg:
        return [v["version"] for v in reg.versions()]


def _alive(process: subprocess.Popen, fleet: LiveFleet) -> None:
    if process.poll() is not None:
        raise AssertionError(f"aggregator exited ({process.returncode}): {_log(fleet)[-3000:]}")


def test_killed_at_every_commit_step_loses_and_repeats_no_round(broker, pki_dir: Path, cmapss_dir: Path, tmp_path: Path) -> None:
    """One fleet, one aggregator process killed per step (after_merge in round 2,
    after_checkpoint in 3, after_store in 4, after_publish in 5), restarted each time."""
    last = 1 + len(STEPS) + 1
    fleet = LiveFleet(broker, tmp_path, ["site1", "site2"], ModelSettings(rounds=last, local_epochs=1), pki=pki_dir)
    process = None
    try:
        fleet.buffer_training(8, cmapss_dir)
        store = open_store(fleet.fleet.store)

        def stored() -> list[int]:
            return [r["round"] for r in store.rounds()]

        for number, step in enumerate(STEPS, start=2):
            process = fleet.start_aggregator_process(env={**os.environ, ENV: f"{step}:{number}"})
            wait_for(f"the aggregator to kill itself {step} of round {number}", lambda p=process: p.poll() is not None, 90)
            assert process.returncode == -signal.SIGKILL, _log(fleet)[-3000:]
            registry, rounds = _registry_versions(fleet), stored()
            agents = {a.global_version for a in fleet.agents.values()}
            expected = {  # what is durable when the process dies at each step
                "after_merge": (number - 1, number - 1),
                "after_checkpoint": (number, number - 1),
                "after_store": (number, number),
                "after_publish": (number, number),
            }[step]
            assert (registry[-1], rounds[-1]) == expected, (step, registry, rounds)
            if step != "after_publish":
                assert agents == {number - 1}, (step, agents)  # nothing published before it was on disk
        process = fleet.start_aggregator_process()
        wait_for(f"round {last} in the store", lambda: _alive(process, fleet) or last in stored(), 90)
        wait_for(f"every agent to load global v{last}", lambda: all(a.global_version == last for a in fleet.agents.values()), 30)
    finally:
        _stop(process)
        fleet.close()
    rounds = store.rounds()
    assert [r["round"] for r in rounds] == list(range(last + 1))
    with ModelRegistry(fleet.fleet.registry) as reg:
        assert [v["version"] for v in reg.versions()] == list(range(last + 1))
        # Each stored round is the checkpointed one (the same start), not a second run of it.
        assert [reg.fleet_of(v)["round_record"]["started"] for v in range(last + 1)] == [r["started"] for r in rounds]
    recovered = [e["detail"] for e in store.events(1000) if e["kind"] == "round_recovered"]
    assert recovered == [{"round": 3, "version": 3}]  # the one killed between checkpoint and store
    assert "Traceback" not in _log(fleet)


def _start_with_reset(fleet: LiveFleet) -> subprocess.Popen:
    """`turbofed aggregator --config fleet.toml --reset`, logging where start_aggregator_process does."""
    log = open(fleet.work / "aggregator.log", "ab")  # noqa: SIM115 - the child process keeps it
    cmd = [sys.executable, "-m", "turbofed.cli", "aggregator", "--config", str(fleet.fleet_toml()), "--reset"]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=fleet.work)


def test_lost_registry_is_refused_until_reset_and_agents_follow_the_new_epoch(broker, pki_dir: Path, cmapss_dir: Path, tmp_path: Path) -> None:
    fleet = LiveFleet(broker, tmp_path, ["site1", "site2"], ModelSettings(rounds=2, local_epochs=1), pki=pki_dir)
    process = None
    try:
        fleet.buffer_training(8, cmapss_dir)
        store = open_store(fleet.fleet.store)
        process = fleet.start_aggregator_process()
        wait_for("round 2 in the store", lambda: _alive(process, fleet) or 2 in [r["round"] for r in store.rounds()], 90)
        wait_for("agents on v2", lambda: all(a.global_version == 2 for a in fleet.agents.values()), 30)
        _stop(process)
        db = Path(fleet.fleet.registry) / "registry.sqlite"
        db.write_bytes(b"")  # truncated to 0 bytes

        refused = subprocess.run([sys.executable, "-m", "turbofed.cli", "aggregator", "--config", str(fleet.fleet_toml())],
                                 check=False, capture_output=True, text=True, cwd=tmp_path, timeout=60)
        assert refused.returncode == 2, refused.stderr
        (line,) = [ln for ln in refused.stderr.splitlines() if "error" in ln]
        assert f"model registry {db} is empty (0 bytes) but the results store holds rounds up to 2" in line
        assert "--reset" in line and "Traceback" not in refused.stderr

        process = _start_with_reset(fleet)
        wait_for("agents to follow epoch 1 to its v2",
                 lambda: _alive(process, fleet) or all(a.epoch == 1 and a.global_version == 2 for a in fleet.agents.values()), 90)
    finally:
        _stop(process)
        fleet.close()
    resets = [e["detail"] for e in store.events(1000) if e["kind"] == "fleet_reset"]
    assert [(r["old_epoch"], r["epoch"], r["rounds_before"]) for r in resets] == [(0, 1, 3)]
    old_rounds, new_rounds = store.archived_rounds(0), store.rounds()  # the old epoch's rounds are kept, apart
    assert [r["round"] for r in old_rounds] == [0, 1, 2] and all(r["participants"] for r in old_rounds[1:])
    assert [r["round"] for r in new_rounds] == [0, 1, 2] and old_rounds[-1]["closed"] < new_rounds[0]["started"]
    archive = Path(fleet.fleet.registry) / "epoch-0"
    assert (archive / "registry.sqlite").stat().st_size == 0 and (archive / "models" / "v00002.onnx").is_file()
    with ModelRegistry(fleet.fleet.registry) as reg:
        assert reg.epoch() == 1 and [v["version"] for v in reg.versions()] == [0, 1, 2]
    # A plain restart keeps the reset's epoch (fleet.toml still says 0).
    from turbofed.aggregator.service import Aggregator

    again = Aggregator(fleet.fleet)
    try:
        assert (again.epoch, again.version) == (1, 2)
    finally:
        again.store.close()
        again.registry.close()


def test_full_registry_disk_holds_the_round_until_there_is_room(broker, pki_dir: Path, cmapss_dir: Path, tmp_path: Path,
                                                                small_disk: Path) -> None:
    fleet = LiveFleet(broker, tmp_path, ["site1", "site2"], ModelSettings(rounds=1, local_epochs=1), pki=pki_dir)
    fleet.fleet = dataclasses.replace(fleet.fleet, registry=str(small_disk / "registry"))
    process = None
    try:
        fleet.buffer_training(8, cmapss_dir)
        store = open_store(fleet.fleet.store)
        process = fleet.start_aggregator_process()
        wait_for("round 1 in the store", lambda: _alive(process, fleet) or 1 in [r["round"] for r in store.rounds()], 90)
        _stop(process)
        filler = fill_disk(small_disk)

        # Three rounds now, on a full disk: it starts, says so, and holds round 2 back.
        fleet.fleet = dataclasses.replace(fleet.fleet, model=ModelSettings(rounds=3, local_epochs=1))
        process = fleet.start_aggregator_process()
        line = f"registry folder {small_disk / 'registry'}: disk full (No space left on device); round 2 not closed, keeping global v1"
        wait_for("the disk-full line", lambda: _alive(process, fleet) or line in _log(fleet), 90)
        assert "starting anyway" in _log(fleet)
        wait_for("a disk_full event", lambda: any(e["kind"] == "disk_full" for e in store.events(100)), 10)
        _alive(process, fleet)
        assert [r["round"] for r in store.rounds()] == [0, 1] and _registry_versions(fleet) == [0, 1]
        assert {a.global_version for a in fleet.agents.values()} == {1}  # still served v1

        filler.unlink()
        wait_for("round 3 in the store", lambda: _alive(process, fleet) or 3 in [r["round"] for r in store.rounds()], 90)
        wait_for("agents on v3", lambda: all(a.global_version == 3 for a in fleet.agents.values()), 30)
    finally:
        _stop(process)
        fleet.close()
    assert [r["round"] for r in store.rounds()] == [0, 1, 2, 3]
    assert _registry_versions(fleet) == [0, 1, 2, 3]
    kinds = [e["kind"] for e in reversed(store.events(1000)) if e["kind"] in ("disk_full", "disk_ok")]
    assert kinds == ["disk_full", "disk_ok"]
    log = _log(fleet)
    assert "Traceback" not in log and log.count(line) == 1  # one line per interval, not one per retry
    assert not [p.name for p in (small_disk / "registry").rglob("*.tmp")]  # no half-written files left


def test_rounds_without_updates_stall_with_a_reason_and_resume_when_a_site_is_back(broker, pki_dir: Path, cmapss_dir: Path, tmp_path: Path) -> None:
    fleet = LiveFleet(broker, tmp_path, ["site1", "site2"], ModelSettings(rounds=1, local_epochs=1), pki=pki_dir)
    try:
        fleet.buffer_training(8, cmapss_dir)
        first = fleet.start_aggregator()
        wait_for("round 1", lambda: first.version == 1, 60)
        fleet.close()  # every agent and the aggregator stop (agents say they are offline)

        fleet.fleet = dataclasses.replace(fleet.fleet, model=ModelSettings(rounds=2, local_epochs=1), round_deadline_s=1.0,
                                          max_empty_rounds=2, stall_retry_s=600.0)
        aggregator = fleet.start_aggregator()
        store = open_store(fleet.fleet.store)
        wait_for("stalled", lambda: aggregator.stalled is not None, 30)
        (event,) = [e["detail"] for e in store.events(100) if e["kind"] == "stalled"]
        assert event["round"] == 2 and "closed 2 times in a row with no usable update" in event["reason"]
        assert "silent: site1, site2" in event["reason"]

        def empty() -> int:
            return sum(e["kind"] == "round_empty" for e in store.events(100))

        assert empty() == 2
        time.sleep(3.0)  # three round deadlines: no announcing again in a loop
        assert empty() == 2 and aggregator.version == 1

        for site in fleet.sites:  # back online: the round is announced again at once, not in 600 s
            fleet.start_agent(site)
        wait_for("round 2 after the stall", lambda: aggregator.version == 2, 60)
        wait_for("a stall_over event", lambda: any(e["kind"] == "stall_over" for e in store.events(100)), 10)
        assert aggregator.stalled is None
    finally:
        fleet.close()
