"""`turbofed status` (issue #17): the fleet from the results store, in the terminal."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from turbofed.store import open_store
from turbofed.store.status import fleet_status, render_plain, render_rich

NOW = time.time()


def _store(path: Path) -> Path:
    """Rounds 0..2 (site1 in both trained rounds, site2 in round 1 only), site1 online and
    site2 offline, three refusals of one reason (one row standing for 2 held back) and one of another."""
    with open_store(path) as store:
        store.record_round(0, 0, NOW - 600, NOW - 600, [], 0.0, "fedavg", "initial")
        store.record_round(1, 1, NOW - 500, NOW - 400, [{"site": "site1", "samples": 300, "update_bytes": 25_000},
                                                         {"site": "site2", "samples": 200, "update_bytes": 25_000}], 12.0, "fedavg", "quorum")
        store.record_round(2, 2, NOW - 300, NOW - 90, [{"site": "site1", "samples": 320, "update_bytes": 25_100}], 11.0, "fedavg", "deadline")
        store.record_status("site1", True, NOW - 30, "0.1.0", 2, 320)
        store.record_status("site2", False, NOW - 3 * 3600, "0.1.0", 1, 200)
        store.record_rejection(2, "site2", "stale_round", "update for round 1 after it closed", NOW - 200)
        store.record_rejection(2, "site2", "stale_round", "2 more like it not stored one by one (at most one row per site and reason every 60 s)", NOW - 100)
        store.record_rejection(None, "site1", "implausible", "engine e1: sensors[0] = 1e9", NOW - 50)
        store.record_metrics("site1", 2, 2, {"engines": 10, "local": {"rmse": 15.0, "score": 100.0}, "federated": {"rmse": 12.5, "score": 80.0}}, NOW - 20)
    return path


def test_fleet_status_from_the_store(tmp_path: Path) -> None:
    with open_store(_store(tmp_path / "r.sqlite")) as store:
        status = fleet_status(store, ["site1", "site2", "site3"], now=NOW)
    assert status["rounds"] == 2 and status["last_round"]["round"] == 2 and status["last_round"]["closed_by"] == "deadline"
    assert status["sites_online"] == 1
    by_site = {r["site"]: r for r in status["sites"]}
    assert by_site["site1"]["online"] is True and by_site["site1"]["last_update"]["round"] == 2 and by_site["site1"]["federated_rmse"] == 12.5
    assert by_site["site2"]["online"] is False and by_site["site2"]["last_update"]["round"] == 1
    assert by_site["site3"]["online"] is None and by_site["site3"]["last_update"] is None  # in the fleet, never heard from
    assert [(r["reason"], r["count"], r["sites"]) for r in status["refusals"]] == [("stale_round", 3, ["site2"]), ("implausible", 1, ["site1"])]


def test_plain_and_rich_tables(tmp_path: Path) -> None:
    with open_store(_store(tmp_path / "r.sqlite")) as store:
        status = fleet_status(store, now=NOW)
    text = render_plain(status)
    assert text.startswith("rounds closed: 2 (last: round 2, global v2, 1 update(s), closed by deadline 90 s ago, fedavg); sites online: 1/2")
    lines = text.splitlines()
    assert any(line.split()[:3] == ["site1", "online", "30"] and "round 2, 90 s ago" in line and line.endswith("12.50") for line in lines)
    assert any(line.split()[:2] == ["site2", "offline"] and "3 h ago" in line for line in lines)
    assert any(line.split() == ["stale_round", "3", "100", "s", "ago", "site2"] for line in lines)
    pytest.importorskip("rich")
    out = io.StringIO()
    render_rich(status, out)
    drawn = out.getvalue()
    assert "refusals by reason" in drawn and "stale_round" in drawn and "round 2, 90 s ago" in drawn


def test_the_command_reads_the_store_named_by_the_fleet_config(tmp_path: Path) -> None:
    _store(tmp_path / "results.sqlite")
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('sites = ["site1", "site2", "site3"]\nstore = "results.sqlite"\nregistry = "registry"\ninsecure_unsigned = true\n')
    proc = subprocess.run([sys.executable, "-m", "turbofed.cli", "status", "--config", str(fleet)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "sites online: 1/3" in proc.stdout and "site3  never seen" in proc.stdout  # a pipe: plain columns
    as_json = subprocess.run([sys.executable, "-m", "turbofed.cli", "status", "--store", str(tmp_path / "results.sqlite"), "--json"],
                             capture_output=True, text=True, timeout=60)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["refusals"][0] == {"reason": "stale_round", "count": 3, "last": pytest.approx(NOW - 100), "sites": ["site2"]}


def test_a_missing_store_is_refused_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "nope.sqlite"
    proc = subprocess.run([sys.executable, "-m", "turbofed.cli", "status", "--store", str(missing)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"results store {missing} does not exist" in proc.stderr
    assert not missing.exists()


def test_live_needs_the_fleet_config(capsys: pytest.CaptureFixture) -> None:
    from turbofed.cli import main

    assert main(["status", "--live"]) == 2
    assert "turbofed status --live needs --config fleet.toml" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("broker", ["mosquitto"], indirect=True)
def test_live_status_from_the_broker_as_the_monitor(broker, pki_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    """`--live` reads the retained statuses and round announcement from the secure broker (TLS,
    the read-only monitor identity, every message checked against the fleet's keys): two
    agents online, a third site never seen, no round announced yet."""
    from tests.livefleet import LiveFleet, wait_for
    from turbofed.cli import main

    fleet = LiveFleet(broker, tmp_path, ["site1", "site2", "site3"], pki=pki_dir)
    try:
        fleet.start_agent("site1")
        fleet.start_agent("site2")
        toml = str(fleet.fleet_toml())
        seen: dict = {}

        def live() -> bool:
            assert main(["status", "--live", "--config", toml, "--seconds", "2", "--json"]) == 0
            seen.update(json.loads(capsys.readouterr().out))
            return seen["sites_online"] == 2
        wait_for("two sites online, as the broker has them", live, 60)
    finally:
        fleet.close()
    rows = {r["site"]: r for r in seen["sites"]}
    assert rows["site1"]["online"] is True and rows["site2"]["online"] is True and rows["site3"]["online"] is None
    assert seen["source"] == "broker" and seen["refusals"] is None and seen["announced"] is None
    text = render_plain(seen)
    assert "live from the broker: no round announced; sites online: 2/3" in text and "never seen" in text and "refusals" not in text
