"""Rollback to the last good global model: the judge on hand-made scores, and a live fleet
whose strategy wrecks one round (tests/plugins/sabotage.py): the sites' scores expose it, the
aggregator publishes the last good weights again as the next version and flags the round."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.livefleet import LiveFleet, wait_for
from turbofed.aggregator.registry import ModelRegistry
from turbofed.aggregator.rollback import MAX_VERSIONS_KEPT, ModelGuard
from turbofed.codec import read_weights
from turbofed.config import ModelSettings, StrategySettings


def test_a_version_worse_than_the_margin_is_bad_and_the_last_good_stays() -> None:
    guard = ModelGuard(margin=0.25)
    for site, v0, v1, v2 in (("a", 40.0, 20.0, 30.0), ("b", 42.0, 21.0, 26.0), ("c", 38.0, 22.0, 21.0)):
        guard.record(site, 0, v0, newest=2)
        guard.record(site, 1, v1, newest=2)
        guard.record(site, 2, v2, newest=2)
    first = guard.judge(1)  # ratios 0.5, 0.5, 0.58: better
    assert (first.bad, first.against, guard.last_good) == (False, 0, 1)
    second = guard.judge(2)  # ratios 1.5, 1.238, 0.955: median 1.238 < 1.25, not bad
    assert not second.bad and second.ratio == pytest.approx(26 / 21) and guard.last_good == 2
    guard.record("a", 3, 45.0, newest=3)
    guard.record("b", 3, 40.0, newest=3)
    guard.record("c", 3, 19.0, newest=3)  # one site happy does not save it: ratios 45/30, 40/26, 19/21, median 1.5
    third = guard.judge(3)
    assert third.bad and third.against == 2 and third.sites == 3 and third.ratio == pytest.approx(45 / 30)
    assert guard.last_good == 2


def test_nothing_to_compare_or_margin_zero_never_rolls_back() -> None:
    guard = ModelGuard(margin=0.25)
    assert not guard.judge(1).bad and guard.last_good == 1  # nobody scored: cannot judge
    off = ModelGuard(margin=0.0)
    off.record("a", 0, 1.0, newest=1)
    off.record("a", 1, 100.0, newest=1)
    assert not off.judge(1).bad


def test_scores_kept_are_bounded() -> None:
    guard = ModelGuard(margin=0.25)
    assert not guard.record("a", 5, 1.0, newest=4)  # a version that does not exist yet
    for v in range(100):
        guard.record("a", v, 1.0, newest=v)
    assert len(guard.evaluations) <= MAX_VERSIONS_KEPT + 2


@pytest.mark.slow
@pytest.mark.parametrize("broker", ["mosquitto"], indirect=True)
def test_a_wrecked_round_is_rolled_back_live(broker, pki_dir: Path, cmapss_dir: Path, tmp_path: Path) -> None:
    strategy = StrategySettings("tests.plugins.sabotage:SabotageOnce", {"bad_round": 2, "shift": 3.0})
    fleet = LiveFleet(broker, tmp_path, ["site1", "site2", "site3"], ModelSettings(rounds=4, local_epochs=1), pki=pki_dir,
                      strategy=strategy)
    try:
        fleet.buffer_training(12, cmapss_dir)
        fleet.start_aggregator()
        from turbofed.store import open_store

        store = open_store(fleet.fleet.store)
        wait_for("round 4 in the store", lambda: len(store.rounds()) == 5, 180)
        wait_for("sites to load global v4", lambda: all(a.global_version == 4 for a in fleet.agents.values()))
    finally:
        fleet.close()
    rounds = store.rounds()
    # v2 was wrecked; round 3 (trained from v2) is where the sites' scores of v2 are judged.
    assert [r["closed_by"] for r in rounds] == ["initial", "quorum", "quorum", "rollback", "quorum"]
    assert all(p["action"] == "excluded" for p in rounds[3]["participants"])
    events = [e["detail"] for e in store.events() if e["kind"] == "rollback"]
    assert len(events) == 1 and events[0]["version"] == 2 and events[0]["last_good"] == 1 and events[0]["ratio"] > 1.25
    registry = ModelRegistry(fleet.fleet.registry)
    v1, v3 = (read_weights(onnx.load_model_from_string(registry.get(v))) for v in (1, 3))
    assert all(np.array_equal(v1[n], v3[n]) for n in v1)  # v3 is v1's weights, published again
