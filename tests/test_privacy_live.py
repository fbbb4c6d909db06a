"""Distributed DP on a live fleet (Mosquitto): the announcement asks the agents to clip and
noise their own deltas, they do, and the spent budget stops the fleet before its last round."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("dp_accounting")

from tests.livefleet import LiveFleet, wait_for  # noqa: E402
from turbofed.aggregator.privacy import gaussian_epsilon  # noqa: E402
from turbofed.config import ModelSettings, PrivacySettings, StrategySettings  # noqa: E402
from turbofed.store import open_store  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("broker", ["mosquitto"], indirect=True)
def test_distributed_noise_and_a_spent_budget_on_a_live_fleet(broker, pki_dir: Path, cmapss_dir: Path, tmp_path: Path) -> None:
    budget = (gaussian_epsilon(2.0, 2, 1e-5) + gaussian_epsilon(2.0, 3, 1e-5)) / 2  # room for two rounds of three
    privacy = PrivacySettings(clip_norm=1.0, noise_multiplier=2.0, epsilon_budget=budget, mode="distributed")
    fleet = LiveFleet(broker, tmp_path, ["site1", "site2"], ModelSettings(rounds=3, local_epochs=1), pki=pki_dir, privacy=privacy,
                      strategy=StrategySettings("fedavg"))
    try:
        fleet.buffer_training(12, cmapss_dir)
        aggregator = fleet.start_aggregator()
        store = open_store(fleet.fleet.store)
        # What the assertions read: the stored rounds and the budget-spent event (not the
        # aggregator's counter, set before they are written).
        wait_for("the spent budget in the store", lambda: len(store.rounds()) == 3
                 and any(e["kind"] == "privacy_budget_spent" for e in store.events(200)), 120)
        wait_for("sites to hear that training is over",
                 lambda: all(a.announced is not None and a.announced.done for a in fleet.agents.values()), 60)
        events = store.events(200)
    finally:
        fleet.close()
    assert aggregator.version == 2
    rounds = store.rounds()
    store.close()
    assert [r["round"] for r in rounds] == [0, 1, 2]
    # Each site's delta was clipped to norm 1 and then noised at the site (std sqrt(2) per coordinate): far above 1.
    assert all(p["norm"] > 5.0 for r in rounds[1:] for p in r["participants"])
    assert [e["detail"]["round"] for e in events if e["kind"] == "privacy"] == [2, 1]
    (spent,) = [e["detail"] for e in events if e["kind"] == "privacy_budget_spent"]
    assert spent["dp_rounds"] == 2 and spent["epsilon"] == pytest.approx(gaussian_epsilon(2.0, 2, 1e-5))
