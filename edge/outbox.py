"""What the agent sends waits here until the broker has it: a bounded queue on disk.

paho keeps unacknowledged messages in memory, without bound while the broker is away, and
loses them when the agent restarts. Every report (updates, metrics, predictions and truth,
telemetry, statistics answers) is first appended to `outbox.sqlite` in the state folder,
then handed to paho in order, a few at a time and only while connected, and removed only
when the broker has acknowledged it (QoS 1 PUBACK, paho's on_publish). A restarted agent
sends again whatever was not acknowledged (at least once: the receiver keys predictions and
truth by engine and cycle, and takes one update per site and round).

The queue is bounded by `outbox_max_bytes` of payload. When a new message would pass the
bound, the oldest messages go first by kind: predictions, then telemetry, statistics
answers, metrics, model evaluations, then updates for rounds older than the newest queued update. An update
for the newest round is never dropped. What is dropped is counted per kind and logged.

The retained status is not queued: the agent publishes it again on every (re)connect.
Rows read back are not trusted: a kind this agent does not send is deleted unsent.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from turbofed.edge.state import StateError, one_line
from turbofed.ratelog import RateLimitedLog

OUTBOX_DB = "outbox.sqlite"
DROP_ORDER = ("predictions", "telemetry", "stats", "metrics", "evaluation", "update")  # first to last dropped when full
WINDOW = 20  # messages handed to paho and not yet acknowledged, at most
_SCHEMA = "CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, round INTEGER, payload BLOB NOT NULL)"


class Outbox:
    """An ordered, bounded, acknowledged-before-deleted queue of outgoing messages.

    `put` and `pump` run on the agent's worker thread; `acknowledged` is paho's on_publish
    (network thread) and only queues the message id."""

    def __init__(self, path: Path, max_bytes: int, topics: Mapping[str, str], site: str, logger: logging.Logger,
                 counters: Counter[str] | None = None) -> None:
        self.path, self.max_bytes, self.topics, self.site, self.log = path, max_bytes, dict(topics), site, logger
        # outbox.dropped.<kind>: dropped to stay within max_bytes; outbox.unsaved: sent from memory (file not writable)
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self._acks: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._inflight: dict[int, int] = {}  # paho mid -> row id
        self._handed = 0  # highest row id handed to paho
        self._warn = RateLimitedLog(logger)
        self._lock = threading.Lock()
        try:
            self.db = self._open(str(path))
        except sqlite3.OperationalError as exc:  # cannot be created or written (disk full, read-only): bounded, in memory
            logger.warning("site %s: outbox %s cannot be used (%s): reports wait in memory (still at most outbox_max_bytes) "
                           "until the agent restarts", site, path, one_line(exc))
            self.db = self._open(":memory:")
        except sqlite3.DatabaseError as exc:
            raise StateError(f"{path}: not a usable outbox ({one_line(exc)})") from None
        self.bytes, self.count = self.db.execute("SELECT COALESCE(SUM(LENGTH(payload)), 0), COUNT(*) FROM outbox").fetchone()
        if self.count:
            logger.info("site %s: outbox holds %d message(s), %d bytes, not yet acknowledged: sending them first", site, self.count, self.bytes)

    @staticmethod
    def _open(where: str) -> sqlite3.Connection:
        db = sqlite3.connect(where, check_same_thread=False)  # `with db`: one transaction
        with db:
            db.execute(_SCHEMA)
        db.execute("SELECT COUNT(*) FROM outbox").fetchone()  # a file that is not a database fails here
        return db

    # --- queueing ------------------------------------------------------------------

    def put(self, kind: str, payload: bytes, client: Any, round_no: int | None = None) -> None:
        """Queue one message (sent by `pump`). If the file cannot be written (disk full or
        read-only) the message goes straight to paho, as before the outbox, and is counted."""
        if kind not in self.topics:
            raise ValueError(f"outbox: no topic for kind {kind!r}")
        try:
            with self._lock, self.db:
                self._make_room(kind, len(payload))
                if kind == "predictions" and self.bytes + len(payload) > self.max_bytes:
                    self._dropped(kind, 1)  # nothing older left to drop for it: the newest predictions go
                    return
                self.db.execute("INSERT INTO outbox (kind, round, payload) VALUES (?, ?, ?)", (kind, round_no, payload))
                self.bytes, self.count = self.bytes + len(payload), self.count + 1
        except (sqlite3.Error, OSError) as exc:
            self._resync()
            self.counters["outbox.unsaved"] += 1
            self._warn.warning("unsaved", "site %s: outbox %s cannot be written (%s): sending from memory, lost if the agent stops",
                               self.site, self.path, one_line(exc))
            if client is not None:
                client.publish(self.topics[kind], payload, qos=1)

    def _make_room(self, kind: str, size: int) -> None:
        """Drop the oldest messages, in DROP_ORDER, until `size` more bytes fit."""
        newest_update = self.db.execute("SELECT MAX(round) FROM outbox WHERE kind = 'update'").fetchone()[0]
        for victim in DROP_ORDER:
            if self.bytes + size <= self.max_bytes:
                return
            if victim == "update":  # only updates for older rounds than the newest queued one
                where, args = "kind = 'update' AND round < ?", (newest_update if newest_update is not None else -1,)
            else:
                where, args = "kind = ?", (victim,)
            for row_id, length in self.db.execute(f"SELECT id, LENGTH(payload) FROM outbox WHERE {where} ORDER BY id", args).fetchall():
                if self.bytes + size <= self.max_bytes:
                    break
                self.db.execute("DELETE FROM outbox WHERE id = ?", (row_id,))
                self.bytes, self.count = self.bytes - length, self.count - 1
                self._dropped(victim, 1)

    def _dropped(self, kind: str, n: int) -> None:
        self.counters[f"outbox.dropped.{kind}"] += n
        self._warn.warning(("dropped", kind), "site %s: outbox full (%d bytes queued, outbox_max_bytes %d): dropped the oldest %s message(s), "
                           "%d so far", self.site, self.bytes, self.max_bytes, kind, self.counters[f"outbox.dropped.{kind}"])

    def _resync(self) -> None:
        """After a failed transaction: the totals as the file has them."""
        try:
            self.bytes, self.count = self.db.execute("SELECT COALESCE(SUM(LENGTH(payload)), 0), COUNT(*) FROM outbox").fetchone()
        except sqlite3.Error:
            pass

    # --- sending -------------------------------------------------------------------

    def acknowledged(self, client: Any, userdata: Any, mid: int, reason_code: Any = None, properties: Any = None) -> None:
        """paho's on_publish: the broker has the message (QoS 1). Network thread: queue only."""
        self._acks.put(mid)

    def pump(self, client: Any) -> None:
        """Forget what the broker acknowledged; hand the next messages, in order, to paho."""
        done = []
        while True:
            try:
                mid = self._acks.get_nowait()
            except queue.Empty:
                break
            row_id = self._inflight.pop(mid, None)
            if row_id is not None:
                done.append(row_id)
        with self._lock:
            try:
                if done:
                    with self.db:
                        for row_id in done:
                            length = self.db.execute("SELECT LENGTH(payload) FROM outbox WHERE id = ?", (row_id,)).fetchone()
                            if length is not None:
                                self.db.execute("DELETE FROM outbox WHERE id = ?", (row_id,))
                                self.bytes, self.count = self.bytes - length[0], self.count - 1
                if client is None or not client.is_connected() or len(self._inflight) >= WINDOW:
                    return
                rows = self.db.execute("SELECT id, kind, payload FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                                       (self._handed, WINDOW - len(self._inflight))).fetchall()
            except (sqlite3.Error, OSError) as exc:  # a full disk cannot delete a row either: tried again next time
                self._resync()
                self._warn.warning("pump", "site %s: outbox %s: %s; retrying", self.site, self.path, one_line(exc))
                return
        for row_id, kind, payload in rows:
            self._handed = row_id
            topic = self.topics.get(kind)
            if topic is None or not isinstance(payload, bytes):  # not written by this agent
                self._acks.put(-row_id)  # never a paho mid (those are positive): deleted at the next pump
                self._inflight[-row_id] = row_id
                continue
            info = client.publish(topic, payload, qos=1)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: paho queued it, sends it on reconnect
                self._handed = row_id - 1
                return
            self._inflight[info.mid] = row_id

    @property
    def pending(self) -> int:
        """Messages not yet acknowledged."""
        return self.count

    def close(self) -> None:
        self.db.close()
