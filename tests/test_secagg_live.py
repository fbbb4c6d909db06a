"""Secure aggregation on a live fleet (Mosquitto, TLS, signed frames): the fleet statistics
and every round go through the secure sum, the aggregator learns only totals, and a site
that drops out after sharing its keys is recovered from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.livefleet import LiveFleet, wait_for
from turbofed.config import ModelSettings, SecureAggregationSettings, StrategySettings
from turbofed.spec import FleetStats
from turbofed.store import open_store

pytestmark = pytest.mark.slow

SITES = ["site1", "site2", "site3", "site4"]


def _stored_rounds(fleet: LiveFleet, n: int) -> list[dict]:
    store = open_store(fleet.fleet.store)
    try:
        return store.rounds() if len(store.rounds()) >= n else []
    finally:
        store.close()


@pytest.mark.parametrize("broker", ["mosquitto"], indirect=True)
def test_statistics_and_rounds_through_the_secure_sum(broker, pki_dir: Path, cmapss_dir: Path, tmp_path: Path) -> None:
    fleet = LiveFleet(broker, tmp_path, SITES, ModelSettings(rounds=2, local_epochs=1), pki=pki_dir,
                      secure_aggregation=SecureAggregationSettings(phase_timeout_s=20.0), strategy=StrategySettings("fedavg"))
    try:
        fleet.buffer_training(16, cmapss_dir)
        expected = sum((a.buffer.stats(30) for a in fleet.agents.values()), FleetStats())
        aggregator = fleet.start_aggregator()
        wait_for("two secure rounds in the results store", lambda: len(_stored_rounds(fleet, 3)) == 3, 180)
        rounds = _stored_rounds(fleet, 3)
        store = open_store(fleet.fleet.store)
        events = store.events(500)
        store.close()
    finally:
        fleet.close()
    (stats_event,) = [e["detail"] for e in events if e["kind"] == "fleet_statistics"]
    assert stats_event["secure"] is True and stats_event["sites"] == SITES
    got = FleetStats.from_dict(stats_event["stats"])
    # The secure total is the sum of the four sites' statistics, to fixed-point precision.
    assert got.count == expected.count
    np.testing.assert_allclose(got.to_vector(), expected.to_vector(), rtol=1e-9, atol=1.0 / 64)
    assert aggregator.stats_replies == {}  # no site's own statistics reached the aggregator
    for r in rounds[1:]:
        assert sorted(p["site"] for p in r["participants"]) == SITES
        assert {p["action"] for p in r["participants"]} == {"secure-sum"}
        assert all(p["norm"] is None for p in r["participants"])  # nothing of one site's update is known
    assert [e for e in events if e["kind"] == "secure_sum_aborted"] == []


@pytest.mark.parametrize("broker", ["mosquitto"], indirect=True)
def test_a_site_that_drops_after_sharing_every_round_is_recovered_live(broker, pki_dir: Path, cmapss_dir: Path,
                                                                     tmp_path: Path) -> None:
    from turbofed.benchmarks.secure import drop_after_sharing

    fleet = LiveFleet(broker, tmp_path, SITES, ModelSettings(rounds=2, local_epochs=1), pki=pki_dir,
                      secure_aggregation=SecureAggregationSettings(phase_timeout_s=1.0), strategy=StrategySettings("fedavg"))
    try:
        fleet.buffer_training(16, cmapss_dir)
        drop_after_sharing(fleet.agents["site4"])
        fleet.start_aggregator()
        wait_for("two secure rounds in the results store", lambda: len(_stored_rounds(fleet, 3)) == 3, 180)
        rounds = _stored_rounds(fleet, 3)
    finally:
        fleet.close()
    for r in rounds[1:]:
        actions = {p["site"]: p["action"] for p in r["participants"]}
        assert actions == {"site1": "secure-sum", "site2": "secure-sum", "site3": "secure-sum",
                           "site4": "dropped (masks removed)"}
