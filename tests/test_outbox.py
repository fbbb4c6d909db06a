"""The agent's outbox (edge/outbox.py): reports wait on disk while the broker is away, go
out in order, leave only when acknowledged, survive a restart, and stay within
outbox_max_bytes by dropping the oldest predictions first, never the newest round's update;
and the broker watch (turbofed/mqtt.py) logs outages with their duration."""

from __future__ import annotations

import logging
import sqlite3
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.fakeclient import FakeClient
from turbofed.edge.outbox import Outbox
from turbofed.edge.state import StateError
from turbofed.mqtt import ConnectionWatch

TOPICS = {k: f"t/sites/s1/{k}" for k in ("update", "metrics", "stats", "predictions", "telemetry")}
log = logging.getLogger("test.outbox")


def _outbox(path: Path, max_bytes: int = 1 << 20, counters: Counter | None = None) -> Outbox:
    return Outbox(path / "outbox.sqlite", max_bytes, TOPICS, "s1", log, counters)


class SilentClient(FakeClient):
    """Connected, but acknowledges nothing until told (`ack_all`)."""

    def __init__(self) -> None:
        super().__init__()
        self.unacked: list[int] = []

    def publish(self, topic: str, payload: bytes = b"", qos: int = 0, retain: bool = False) -> SimpleNamespace:
        self._mid += 1
        self.sent.append((topic, payload))
        self.unacked.append(self._mid)
        return SimpleNamespace(mid=self._mid, rc=0)

    def ack_all(self) -> None:
        for mid in self.unacked:
            self.on_publish(self, None, mid, None, None)
        self.unacked = []


def test_waits_while_away_then_goes_in_order_and_leaves_only_when_acknowledged(tmp_path: Path) -> None:
    box = _outbox(tmp_path)
    client = SilentClient()
    client.on_publish = box.acknowledged
    client.connected = False
    for i in range(30):
        box.put("predictions", b"p%d" % i, client)
        box.pump(client)
    box.put("update", b"u1", client, round_no=1)
    assert client.sent == [] and box.pending == 31  # nothing handed to paho while away
    client.connected = True
    box.pump(client)
    assert [p for _, p in client.sent] == [b"p%d" % i for i in range(20)]  # a bounded window, in order
    assert box.pending == 31  # handed to paho is not delivered: kept until acknowledged
    reopened = _outbox(tmp_path)  # a restart now sends everything unacknowledged again
    assert reopened.pending == 31
    client.ack_all()
    box.pump(client)
    assert box.pending == 11
    client.ack_all()
    box.pump(client)
    client.ack_all()
    box.pump(client)
    assert [p for _, p in client.sent][-11:] == [b"p%d" % i for i in range(20, 30)] + [b"u1"]
    assert box.pending == 0 and _outbox(tmp_path).pending == 0


def test_full_outbox_drops_oldest_predictions_never_the_current_update(tmp_path: Path) -> None:
    counters: Counter[str] = Counter()
    box = _outbox(tmp_path, max_bytes=1000, counters=counters)
    box.put("update", b"u" * 300, None, round_no=1)
    for i in range(10):
        box.put("predictions", b"%03d" % i + b"p" * 97, None)
    assert box.bytes <= 1000 and counters["outbox.dropped.predictions"] == 3
    box.put("update", b"U" * 300, None, round_no=2)
    box.put("update", b"V" * 300, None, round_no=2)  # room made from the oldest predictions

    def kinds() -> list[str]:
        return [k for (k,) in sqlite3.connect(tmp_path / "outbox.sqlite").execute("SELECT kind FROM outbox ORDER BY id")]

    assert kinds() == ["update", "predictions", "update", "update"] and box.bytes == 1000
    assert counters["outbox.dropped.predictions"] == 9
    box.put("update", b"W" * 600, None, round_no=2)  # then from round 1's update; round 2's are never dropped, even over the bound
    assert kinds() == ["update"] * 3 and box.bytes == 1200
    assert counters["outbox.dropped.update"] == 1 and counters["outbox.dropped.predictions"] == 10
    box.put("predictions", b"late", None)  # nothing older to drop for it: the new prediction goes
    assert counters["outbox.dropped.predictions"] == 11 and box.pending == 3


def test_rows_read_back_are_not_trusted(tmp_path: Path) -> None:
    box = _outbox(tmp_path)
    with box.db:
        box.db.execute("INSERT INTO outbox (kind, round, payload) VALUES ('status', NULL, x'00')")  # never queued by the agent
        box.db.execute("INSERT INTO outbox (kind, round, payload) VALUES ('predictions', NULL, 'text, not bytes')")
    box.put("metrics", b"m", None)
    box = _outbox(tmp_path)
    client = FakeClient()
    client.on_publish = box.acknowledged
    box.pump(client)
    box.pump(client)
    assert client.sent == [(TOPICS["metrics"], b"m")] and box.pending == 0
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "outbox.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(StateError, match="outbox.sqlite: not a usable outbox"):
        _outbox(tmp_path / "bad")


def test_an_outbox_that_cannot_be_created_waits_in_memory(tmp_path: Path) -> None:
    folder = tmp_path / "no-such-folder"  # stands for a folder that takes no new file (full, read-only)
    box = _outbox(folder, max_bytes=100)
    for i in range(5):
        box.put("predictions", b"x" * 40, None)
    assert box.pending == 2 and box.bytes == 80 and not folder.exists()  # still bounded


def test_connection_watch_logs_outage_with_its_duration(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    watch = ConnectionWatch("site s1", log, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="test.outbox"):
        watch.back()  # the first connection is not a return
        watch.lost("Unspecified error")
        now[0] += 5
        watch.lost("connection refused")  # failed reconnect attempts: the same outage
        now[0] += 7.34
        assert watch.counters() == {"broker.outages": 1, "broker.down_s": 12}
        watch.back()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "broker lost at" in lines[0] and "Unspecified error" in lines[0]
    assert lines[1] == "site s1: broker back after 12.3 s (outage 1)"
    assert watch.outages == 1 and watch.last_outage_s == pytest.approx(12.34) and watch.connected
