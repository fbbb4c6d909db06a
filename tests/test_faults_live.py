"""Issue #12, aggregator side, on a real Mosquitto with real processes: an aggregator killed
at each step of committing a round loses and repeats nothing; a lost registry is refused
until `--reset`, which starts a new fleet epoch the agents follow; a full registry disk
holds a round back without a crash until there is room; rounds without updates stall
with a reason instead of looping. docs/operations.md says what each looks like."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

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
