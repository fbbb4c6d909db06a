"""`turbofed demo` as an operator meets it (issue #17): bad options refused before anything
starts, round progress with the fleet's RMSE (a bar on a terminal, plain lines elsewhere),
and the fleet watcher's RMSE of the newest global model from the sites' evaluations."""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.livefleet import wait_for
from turbofed.config import BrokerSettings
from turbofed.messages import ModelEvaluation, RoundAnnouncement
from turbofed.mqtt import connect, make_client
from turbofed.simulation.broker import find_mosquitto, start_broker
from turbofed.simulation.localfleet import FleetWatch
from turbofed.simulation.progress import RoundProgress, pooled_rmse
from turbofed.topics import Topics


def _demo(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "turbofed.cli", "demo", "--workdir", str(tmp_path / "work"), *args],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("args, message", [
    (["--dataset", "FD999"], "unknown dataset 'FD999'"),
    (["--sites", "0"], "--sites must be a whole number in 1..32, got 0"),
    (["--sites", "1000"], "--sites must be a whole number in 1..32, got 1000"),
    (["--rounds", "-3"], "--rounds must be a whole number in 1..1000000, got -3"),
    (["--rounds", "0"], "--rounds must be a whole number in 1..1000000, got 0"),
    (["--seed", "-1"], "--seed must be a whole number"),
])
def test_bad_options_are_refused_before_anything_starts(tmp_path: Path, args: list[str], message: str) -> None:
    """One line, exit 2, in well under the time a broker takes to start: no download tried,
    no broker started, no workdir made."""
    started = time.monotonic()
    proc = _demo(tmp_path, *args)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("turbofed: error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "work").exists() and not (tmp_path / "data").exists()
    assert time.monotonic() - started < 30


def test_influxdb_store_without_its_settings_is_refused_before_anything_starts(tmp_path: Path) -> None:
    pytest.importorskip("influxdb_client", reason="influxdb-client is not installed: pip install 'turbofed[influx]'")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURBOFED_INFLUX_")}
    proc = _demo(tmp_path, "--store", "influxdb", env=env)
    assert proc.returncode == 2
    assert "InfluxDB settings missing: url (TURBOFED_INFLUX_URL)" in proc.stderr
    assert not (tmp_path / "work").exists()


def test_pooled_rmse_weighs_sites_by_rows() -> None:
    assert pooled_rmse({"a": (10.0, 100), "b": (20.0, 300)}) == pytest.approx(math.sqrt((100 * 100 + 300 * 400) / 400))
    assert pooled_rmse({}) is None


def test_progress_is_plain_lines_off_a_terminal() -> None:
    out = io.StringIO()
    progress = RoundProgress(5, stream=out)
    assert not progress.fancy
    progress.update(0)
    progress.update(2, 2, 21.4, 4)
    progress.update(2, 3, 19.0, 1)  # a newer evaluation within the round: no line
    progress.update(5, 5, 18.25, 1)
    progress.close()
    lines = out.getvalue().splitlines()
    assert lines == ["round 0/5 done; fleet RMSE: waiting for the sites' first evaluation",
                     "round 2/5 done; fleet RMSE 21.40 (global v2 on 4 sites' labelled engines)",
                     "round 5/5 done; fleet RMSE 18.25 (global v5 on 1 site's labelled engines)"]
    assert "\r" not in out.getvalue()


class Terminal(io.StringIO):
    """A text stream that says it is a terminal (what rich draws its bar on)."""

    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal() -> None:
    pytest.importorskip("rich")
    out = Terminal()
    progress = RoundProgress(5, stream=out)
    assert progress.fancy
    progress.update(3, 3, 19.5, 2)
    progress.close()
    text = out.getvalue()
    assert "3/5" in text and "fleet RMSE 19.50 (global v3 on 2 sites' labelled engines)" in text
    assert "━" in text  # the bar


@pytest.mark.timeout(60)
def test_the_watcher_reports_the_newest_versions_fleet_rmse(tmp_path: Path) -> None:
    """Sites' evaluations over MQTT (a real development broker, unsigned like the amqtt demo)."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    topics = Topics()
    with start_broker(embedded=False, workdir=tmp_path / "broker") as broker:
        settings = BrokerSettings(host=broker.host, port=broker.port)
        watch = FleetWatch(settings)
        sender = make_client("t-eval", settings)
        connect(sender, settings)
        try:
            assert watch.fleet_evaluation() is None
            # v3 from both sites, then v4 from one: the newest version every site has evaluated counts
            for site, version, rmse, rows in (("site1", 2, 30.0, 50), ("site1", 3, 10.0, 100), ("site2", 3, 20.0, 300), ("site1", 4, 1.0, 10)):
                sender.publish(topics.site(site, "evaluation"),
                               ModelEvaluation(site, version, rmse, rows).to_payload(), qos=1).wait_for_publish(10)
            sender.publish(topics.round, RoundAnnouncement(3, done=True).to_payload(), qos=1).wait_for_publish(10)
            # Every message the assertions read (two sites' topics and the round's: MQTT orders
            # messages within a topic only), not just the last one sent.
            wait_for("the four evaluations and the done announcement",
                     lambda: set(watch.evaluations.get(3, ())) == {"site1", "site2"} and "site1" in watch.evaluations.get(4, ())
                     and watch.round is not None and watch.round.done, 20)
            version, rmse, sites = watch.fleet_evaluation()
            assert (version, sites) == (3, 2) and rmse == pytest.approx(pooled_rmse({"a": (10.0, 100), "b": (20.0, 300)}))
            assert watch.round is not None and watch.round.done
        finally:
            sender.disconnect()
            sender.loop_stop()
            watch.close()


def test_the_demo_says_whether_federation_paid_off() -> None:
    """The last lines say the mean local / federated ratio; on the synthetic fleet, under the
    1.2 x that FD001 shows, they say so plainly (issue #15 item 6)."""
    from turbofed.simulation.demo import federation_note

    def result(dataset: str, local: list[float], federated: float) -> dict:
        return {"dataset": dataset, "sites": [{"local": {"rmse": v}} for v in local], "fleet": {"federated": {"rmse": federated}}}

    fd001 = federation_note(result("FD001", [15.0, 16.0, 14.0, 15.0], 12.0))
    assert fd001 == "federation: the sites' local models average RMSE 15.00, 1.25 x the federated model's 12.00"
    low = federation_note(result("SYN001", [12.35, 11.42, 13.57, 12.46], 11.16))
    assert low.startswith("federation: the sites' local models average RMSE 12.45, 1.12 x") and "under the 1.2 x" in low
    assert "under" not in federation_note(result("SYN001", [14.0, 13.0, 15.0, 14.0], 11.0))
    assert federation_note(result("FD001", [], 12.0)) is None
