"""Issue #12: a broker outage loses nothing. Mosquitto (TLS, ACL) is stopped for 30 s while
rounds are running and the sites keep getting readings from their plant: predictions,
truth, metrics and updates wait in each agent's outbox and reach the store once the broker
is back, as many as without the outage, even from an agent restarted during the outage
(paho's in-memory queue would have lost those); every round completes with every site, none
closes empty; agents and aggregator log the outage with its duration."""

from __future__ import annotations

import logging
import re
import sqlite3
import time
from pathlib import Path

import pytest

from tests.livefleet import LiveFleet, wait_for
from turbofed.config import ModelSettings
from turbofed.deploy.identities import FleetIdentities
from turbofed.simulation.broker import find_mosquitto, start_broker
from turbofed.simulation.replay import fleet_parts, publish_schedule
from turbofed.store import open_store

pytestmark = pytest.mark.slow

OUTAGE_S = 30.0
ROUNDS = 100_000  # more than the test lasts: a round is always open, before, during and after the outage
# Truths of the test engines (the training engines' failures were reported before the aggregator listened).
TEST_TRUTH = "SELECT COUNT(*) FROM truth WHERE engine LIKE 'FD001-test-%'"


def _count(store: Path, sql: str) -> int:
    with sqlite3.connect(store) as db:
        return db.execute(sql).fetchone()[0]


def test_broker_outage_loses_no_report(fleet_pki: FleetIdentities, cmapss_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    caplog.set_level(logging.INFO, logger="turbofed.edge")
    sites = ["site1", "site2"]
    with start_broker(embedded=False, workdir=tmp_path / "broker", pki=fleet_pki) as broker:  # our own: this test stops it
        # The deadline outlasts the outage: the round in flight waits for its updates, it does not close empty.
        fleet = LiveFleet(broker, tmp_path, sites, ModelSettings(rounds=ROUNDS, local_epochs=1), pki=fleet_pki.root, round_deadline_s=120.0)
        try:
            fleet.buffer_training(6, cmapss_dir)
            aggregator = fleet.start_aggregator()
            wait_for("round 1", lambda: aggregator.version >= 1, 60)
            agents = list(fleet.agents.values())
            wait_for("both models at every site", lambda: all(a.global_version >= 1 and a.local_predictor is not None for a in agents), 30)

            # The test engines' readings and truths come from each site's plant: half before the outage, half during it.
            [(_, engines)] = fleet_parts("FD001", str(cmapss_dir), len(sites), "round-robin", "test", max_engines=6)
            schedule = list(publish_schedule(engines, fleet.topics))
            readings = sum(1 for p in schedule if p.kind == "sensors")

            def feed(part: list) -> None:
                for p in part:
                    fleet.agents[p.site].inbox.put((p.topic, p.payload))
                wait_for("the agents to work through their plant messages", lambda: all(a.inbox.empty() for a in agents), 30)

            half = len(schedule) // 2
            feed(schedule[:half])
            broker.halt()
            down = time.monotonic()
            wait_for("the agents to notice", lambda: all(not a.watch.connected for a in agents), 10)
            feed(schedule[half:])
            wait_for("reports queued in the outboxes", lambda: all(a.outbox.pending > 0 for a in agents), 10)
            stop, thread = fleet.running[1]  # site2's agent (buffer_training started site1, then site2): stopped mid-outage
            stop.set()
            thread.join(20)
            queued = agents[1].outbox.pending  # what it had not got to the broker when it stopped
            time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down)))
            broker.start_again()
            up_at = time.time()
            restarted = fleet.start_agent("site2")  # same state folder: its outbox is sent first
            agents = [agents[0], restarted]

            store_path = Path(fleet.fleet.store)
            expected_predictions = 2 * readings  # local and federated, for every reading
            expected_truth = len(engines)  # revealed at each test engine's last reading
            wait_for("every prediction in the store",
                     lambda: _count(store_path, "SELECT COUNT(*) FROM predictions") == expected_predictions, 45)
            wait_for("every truth in the store", lambda: _count(store_path, TEST_TRUTH) == expected_truth, 10)
            wait_for("the outboxes to empty", lambda: all(a.outbox.pending == 0 for a in agents), 10)
            scored = {s: sum(1 for e in engines if e.site == s) for s in sites}
            store = open_store(fleet.fleet.store)
            wait_for("every site's final metrics", lambda: {(m["site"], m["engines"]) for m in store.latest_metrics()} == set(scored.items()), 10)
            wait_for("the aggregator's outage in the store", lambda: any(e["kind"] == "broker_outage" for e in store.events()), 15)
            wait_for("two rounds closed after the outage", lambda: sum(r["closed"] > up_at for r in store.rounds()) >= 2, 120)
            outages = [e["detail"] for e in store.events() if e["kind"] == "broker_outage"]
        finally:
            fleet.close()
    assert _count(store_path, "SELECT COUNT(*) FROM predictions") == expected_predictions  # nothing more either
    assert all(a.counters[k] == 0 for a in agents for k in a.counters if k.startswith("outbox.dropped"))
    assert agents[0].watch.outages == 1 and agents[1].watch.outages == 0
    lines = [r.getMessage() for r in caplog.records]
    back = [float(m.group(1)) for line in lines if (m := re.search(r"site site1: broker back after ([\d.]+) s", line))]
    assert len(back) == 1 and OUTAGE_S - 1 <= back[0] <= OUTAGE_S + 35, back
    assert sum("broker lost at" in line for line in lines) == 3  # site1, site2 and the aggregator
    rounds = store.rounds()
    assert [r["round"] for r in rounds] == list(range(len(rounds)))
    assert all(r["closed_by"] == "quorum" and sorted(p["site"] for p in r["participants"]) == sites for r in rounds[1:]), rounds
    assert any(r["started"] < up_at < r["closed"] for r in rounds[1:])  # the round open when the broker came back completed
    assert not [e for e in store.events() if e["kind"] in ("round_empty", "stalled")]
    assert len(outages) == 1 and outages[0]["outages"] == 1 and OUTAGE_S - 1 <= outages[0]["seconds"] <= OUTAGE_S + 35, outages
    assert f"site site2: outbox holds {queued} message(s)" in "\n".join(lines)
