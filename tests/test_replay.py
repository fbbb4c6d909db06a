"""The replay: its publish schedule (pure), pacing, and delivery through both real brokers."""

from __future__ import annotations

import argparse
import json
import queue
import socket
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from tests.livefleet import admit_topics
from turbofed.cli import main as cli_main
from turbofed.data.cmapss import EngineRun
from turbofed.data.datasets import load_dataset
from turbofed.messages import EngineEvent, SensorReading
from turbofed.mqtt import configure_tls
from turbofed.simulation.broker import BrokerHandle
from turbofed.simulation.fleet import FleetEngine, assign
from turbofed.simulation.replay import (
    BrokerUnreachableError,
    ReplayError,
    TokenBucket,
    count_rows,
    fleet_parts,
    fleet_schedule,
    parse_broker,
    parse_rate,
    publish_schedule,
    replay,
    run_cli,
)
from turbofed.topics import Topics

TIMEOUT = 20.0


def fake_run(unit: int, n: int, rul_at_end: float = 0.0) -> EngineRun:
    cycles = np.arange(1, n + 1)
    return EngineRun(unit, cycles, np.zeros((n, 3)) + unit, np.ones((n, 21)) * cycles[:, None], rul_at_end)


# --------------------------------------------------------------------------- schedule


def check_schedule(items, engines: list[FleetEngine], topics: Topics) -> None:
    """Tick-major, cycles increasing per engine, the end event right after the last row."""
    by_engine = {e.engine: e for e in engines}
    ticks = [p.tick for p in items]
    assert ticks == sorted(ticks), "not tick-major"
    seen: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(items):
        e = by_engine[p.engine]
        plant = topics.parse_plant(p.topic)
        assert (plant.site, plant.engine, plant.kind) == (e.site, e.engine, p.kind)
        if p.kind == "sensors":
            reading = SensorReading.from_payload(p.payload)
            assert reading.cycle == p.cycle == int(e.run.cycles[p.tick])
            assert reading.sensors == tuple(e.run.sensors[p.tick])
            assert reading.settings == tuple(e.run.settings[p.tick])
            assert p.engine not in seen or seen[p.engine][-1] < reading.cycle
            seen[p.engine].append(reading.cycle)
        else:
            event = EngineEvent.from_payload(p.payload)
            prev = items[i - 1]
            assert (prev.engine, prev.kind) == (p.engine, "sensors"), "event must follow the engine's last row"
            assert seen[p.engine] == e.run.cycles.tolist(), "event before all rows"
            assert event.cycle == int(e.run.cycles[-1])
            if e.part == "train":
                assert event.event == "failure" and event.rul is None
            else:
                assert event.event == "truth" and event.rul == pytest.approx(e.run.rul_at_end)
    assert set(seen) == set(by_engine)
    for e in engines:
        assert seen[e.engine] == e.run.cycles.tolist()
    assert sum(p.kind == "events" for p in items) == len(engines)


def test_schedule_tick_major_with_events_after_last_row() -> None:
    runs = {"FD001": [fake_run(1, 5), fake_run(2, 2), fake_run(3, 4)]}
    engines = assign(runs, 2, "train")
    items = list(publish_schedule(engines))
    check_schedule(items, engines, Topics())
    # tick 0: 1, 2, 3; tick 1: 1, 2 + event(2), 3; ...
    head = [(p.engine.split("-")[-1], p.kind, p.cycle) for p in items[:7]]
    assert head == [("1", "sensors", 1), ("2", "sensors", 1), ("3", "sensors", 1),
                    ("1", "sensors", 2), ("2", "sensors", 2), ("2", "events", 2), ("3", "sensors", 2)]
    assert [(p.engine, p.kind) for p in items[-2:]] == [("FD001-train-1", "sensors"), ("FD001-train-1", "events")]


def test_schedule_truth_event_for_test_runs() -> None:
    engines = assign({"FD001": [fake_run(7, 3, rul_at_end=42.0), fake_run(8, 1, rul_at_end=7.5)]}, 1, "test")
    items = list(publish_schedule(engines, Topics(plant_root="x/plant")))
    check_schedule(items, engines, Topics(plant_root="x/plant"))
    events = {p.engine: EngineEvent.from_payload(p.payload) for p in items if p.kind == "events"}
    assert events["FD001-test-7"].rul == 42 and events["FD001-test-8"].rul == 7.5
    assert json.loads(items[2].payload) == {"event": "truth", "cycle": 1, "rul": 7.5}


@pytest.mark.parametrize("mode", ["round-robin", "contiguous", "subset"])
def test_fleet_schedule_on_cmapss_matches_fleet_assign(cmapss_dir, mode: str) -> None:
    parts = fleet_parts("FD001", str(cmapss_dir), 4, mode, "both")
    assert [name for name, _ in parts] == ["train", "test"]
    train, evals = load_dataset("FD001", str(cmapss_dir), 0)
    expected = {
        "train": assign(train, 4, "train", mode),
        "test": assign({ev.subset: ev.runs for ev in evals}, 4, "test", mode),
    }
    topics = Topics()
    items = list(fleet_schedule(parts, topics))
    n_train = count_rows(parts[:1]) + len(parts[0][1])
    for (name, engines), chunk in zip(parts, (items[:n_train], items[n_train:])):
        # every engine to exactly one site: the one turbofed.simulation.fleet.assign names
        assert [(e.site, e.engine) for e in engines] == [(e.site, e.engine) for e in expected[name]]
        owners = defaultdict(set)
        for p in chunk:
            owners[p.engine].add(topics.parse_plant(p.topic).site)
        assert owners == {e.engine: {e.site} for e in engines}
        assert all(p.engine.split("-")[1] == name for p in chunk)
        if mode == "round-robin":  # the full check parses every payload: once is enough
            check_schedule(chunk, engines, topics)
    assert count_rows(parts) == 20631 + 13096


def test_fleet_parts_restrict_and_synthetic() -> None:
    parts = fleet_parts("SYN", None, 3, "round-robin", "test", seed=1, max_engines=5)
    ((name, engines),) = parts
    assert name == "test" and len(engines) == 5
    assert sorted({e.site for e in engines}) == ["site1", "site2", "site3"]
    check_schedule(list(publish_schedule(engines)), engines, Topics())


def test_settings_errors(cmapss_dir) -> None:
    assert parse_rate("max") is None and parse_rate("MAX") is None and parse_rate("2000") == 2000.0
    for bad in ("fast", "0", "-5", "nan", "inf1"):
        with pytest.raises(ReplayError, match="--rate"):
            parse_rate(bad)
    assert parse_broker("localhost:1884") == ("localhost", 1884)
    assert parse_broker("[::1]:1883") == ("::1", 1883)
    assert parse_broker("broker") == ("broker", 1883)
    for bad in ("host:port", "host:0", ":1883", "a:b:c"):
        with pytest.raises(ReplayError, match="--broker"):
            parse_broker(bad)
    with pytest.raises(ReplayError, match="unknown dataset 'FD009'"):
        fleet_parts("FD009", str(cmapss_dir), 4)
    with pytest.raises(ReplayError, match="--sites"):
        fleet_parts("FD001", str(cmapss_dir), 0)
    with pytest.raises(ReplayError, match="cannot cover"):
        fleet_parts("FD001+SYN", str(cmapss_dir), 1)


# --------------------------------------------------------------------------- pacing


def test_token_bucket_paces_without_sleeping_per_row() -> None:
    now = [0.0]
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        now[0] += s

    bucket = TokenBucket(1000.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(2000):
        bucket.take()
    assert now[0] == pytest.approx(2.0, abs=0.01)  # 2000 rows at 1000 rows/s
    assert len(sleeps) <= 2000 / 4  # each sleep covers a batch of rows (5 ms = 5 rows)
    slow = TokenBucket(10.0, clock=lambda: now[0], sleep=sleep)
    start = now[0]
    for _ in range(5):
        slow.take()
    assert now[0] - start == pytest.approx(0.5, abs=0.01)


# --------------------------------------------------------------------------- real brokers


class Subscriber:
    """Paho clients that record every message under a plant root, in arrival order (per
    topic). On the secure broker only a site may read its own plant topics: one client per
    site, as that site; on the development broker one client reads them all."""

    def __init__(self, broker: BrokerHandle, root: str, sites: list[str]) -> None:
        admit_topics(broker, Topics(plant_root=root))
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.clients = []
        for site in sites if broker.secure else [None]:
            acks: queue.Queue[str] = queue.Queue()
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-replay-{uuid.uuid4().hex[:8]}",
                            protocol=mqtt.MQTTv311)
            configure_tls(c, broker.settings(site))
            c.on_connect = lambda c, u, f, rc, p, acks=acks: acks.put(f"connect:{rc}")
            c.on_subscribe = lambda c, u, mid, rcs, p, acks=acks: acks.put(f"suback:{rcs[0]}")
            # amqtt 0.12 also hands a new '#' subscriber retained messages of unrelated topics
            # (other tests' rounds and global models): count only our own plant traffic.
            c.on_message = lambda c, u, msg: msg.topic.startswith(root + "/") and self.messages.put((msg.topic, msg.payload))
            c.connect(broker.host, broker.port, keepalive=30)
            c.loop_start()
            self.clients.append(c)
            assert acks.get(timeout=TIMEOUT) == "connect:Success"
            c.subscribe(f"{root}/{site}/#" if site else f"{root}/#", qos=1)
            assert acks.get(timeout=TIMEOUT).startswith("suback:Granted")

    def collect(self, n: int) -> list[tuple[str, bytes]]:
        out = []
        deadline = time.monotonic() + TIMEOUT
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                out.append(self.messages.get(timeout=left))
            except queue.Empty:
                break
        time.sleep(0.2)  # anything extra (a duplicate) would arrive now
        while not self.messages.empty():
            out.append(self.messages.get_nowait())
        return out

    def close(self) -> None:
        for c in self.clients:
            c.disconnect()
            c.loop_stop()


def pki_of(broker: BrokerHandle) -> Path | None:
    return broker.pki.root if broker.pki else None


def test_replay_delivers_every_row_once_in_order(broker: BrokerHandle, cmapss_dir) -> None:
    root = f"plant-{uuid.uuid4().hex[:8]}"
    topics = Topics(plant_root=root)
    parts = fleet_parts("FD001", str(cmapss_dir), 2, "round-robin", "both", max_engines=3)
    expected = list(fleet_schedule(parts, topics))
    sub = Subscriber(broker, root, ["site1", "site2"])
    try:
        summary = replay("FD001", str(cmapss_dir), 2, broker.host, broker.port, None, "round-robin", "both",
                         progress=False, max_engines=3, topics=topics, pki=pki_of(broker))
        got = sub.collect(len(expected))
    finally:
        sub.close()
    assert summary["rows"] == count_rows(parts) == sum(p.kind == "sensors" for p in expected)
    assert summary["events"] == 6 and summary["engines"] == {"train": 3, "test": 3}
    assert len(got) == len(expected), f"{len(got)} messages arrived, {len(expected)} sent"
    assert sorted(got) == sorted((p.topic, p.payload) for p in expected), "a row was lost or duplicated"
    # per-topic order is what MQTT guarantees (one publisher, QoS 1): each engine's rows in
    # cycle order, and its event after its last row
    per_engine: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
    for topic, payload in got:
        per_engine[topics.parse_plant(topic).engine].append((topic, payload))
    want: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
    for p in expected:
        want[p.engine].append((p.topic, p.payload))
    for engine, msgs in want.items():
        sensors = [SensorReading.from_payload(pl).cycle for t, pl in per_engine[engine] if t.endswith("/sensors")]
        assert sensors == [SensorReading.from_payload(pl).cycle for t, pl in msgs if t.endswith("/sensors")]
        events = [EngineEvent.from_payload(pl) for t, pl in per_engine[engine] if t.endswith("/events")]
        assert len(events) == 1 and events[0].cycle == sensors[-1]
        assert events[0].event == ("failure" if "-train-" in engine else "truth")


def test_rate_is_respected(broker: BrokerHandle, cmapss_dir) -> None:
    topics = Topics(plant_root=f"plant-{uuid.uuid4().hex[:8]}")
    admit_topics(broker, topics)
    started = time.monotonic()
    summary = replay("FD001", str(cmapss_dir), 2, broker.host, broker.port, 1000.0, "round-robin", "test",
                     progress=False, max_engines=5, topics=topics, pki=pki_of(broker))
    elapsed = time.monotonic() - started
    assert summary["rows"] == 31 + 49 + 126 + 106 + 98  # first five FD001 test engines
    assert summary["rate"] == 1000.0
    assert elapsed >= 0.9 * summary["rows"] / 1000.0 and summary["seconds"] >= 0.36
    assert summary["rows_per_s"] <= 1000.0 * 1.1


# --------------------------------------------------------------------------- CLI


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_args(**kw: object) -> argparse.Namespace:
    base = dict(data_dir=None, dataset="FD001", sites=4, rate="2000", assign="round-robin",
                broker="127.0.0.1:1883", part="both")
    base.update(kw)
    return argparse.Namespace(**base)


def test_cli_unreachable_broker(cmapss_dir, capsys) -> None:
    port = closed_port()
    code = cli_main(["replay", "--data-dir", str(cmapss_dir), "--broker", f"127.0.0.1:{port}", "--part", "test"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"127.0.0.1:{port}" in err and "cannot reach" in err
    with pytest.raises(BrokerUnreachableError, match=f"127.0.0.1:{port}"):
        run_cli(cli_args(data_dir=str(cmapss_dir), broker=f"127.0.0.1:{port}"))


def test_cli_bad_rate_and_dataset(capsys) -> None:
    assert cli_main(["replay", "--rate", "fast"]) == 2
    assert "--rate" in capsys.readouterr().err
    assert cli_main(["replay", "--dataset", "FD042"]) == 2
    assert "unknown dataset 'FD042'" in capsys.readouterr().err


def test_cli_replays_and_prints_summary(broker: BrokerHandle, cmapss_dir, capsys) -> None:
    code = run_cli(cli_args(data_dir=str(cmapss_dir), dataset="SYN", sites=3, rate="max",
                            broker=broker.address, part="test", max_engines=4, progress=False, pki=pki_of(broker)))
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["events"] == 4 and summary["rows"] > 0 and summary["rate"] == "max"
    assert summary["broker"] == broker.address


def test_broker_that_stops_acknowledging_is_reported(cmapss_dir) -> None:
    """A peer that accepts the connection but never sends PUBACKs: bounded wait, clear error."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    stop = threading.Event()

    def fake_broker() -> None:
        conn, _ = server.accept()
        conn.settimeout(0.2)
        conn.recv(1024)
        conn.sendall(b"\x20\x02\x00\x00")  # CONNACK accepted, then silence
        while not stop.is_set():
            try:
                if not conn.recv(65536):
                    break
            except OSError:
                continue
        conn.close()

    t = threading.Thread(target=fake_broker, daemon=True)
    t.start()
    try:
        with pytest.raises(ReplayError, match=f"127.0.0.1:{port} acknowledged nothing"):
            replay("FD001", str(cmapss_dir), 1, "127.0.0.1", port, None, "round-robin", "test",
                   progress=False, max_engines=2, inflight=10, ack_timeout=1.0)
    finally:
        stop.set()
        server.close()
        t.join(5)
