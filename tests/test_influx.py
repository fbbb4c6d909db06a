"""The InfluxDB store's write path, against a real server speaking the InfluxDB v2 write API.

The server is Debian's victoria-metrics on loopback (no InfluxDB 2 server installs here):
points go in through influxdb-client's /api/v2/write and come back through
VictoriaMetrics's /api/v1/export, where each field is a series named
<measurement>_<field> with the point's tags as labels and millisecond timestamps.
Also here: line protocol, settings, open_store routing, the spool, SQLite's sensors table.
"""

from __future__ import annotations

import json
import math
import sqlite3
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from turbofed.benchmarks.influx import VictoriaMetrics, find_victoria_metrics, free_port
from turbofed.store import StoreError, open_store
from turbofed.store.spool import PROTECTED, TELEMETRY, Spool, SpoolError
from turbofed.store.sqlite import SCHEMA_VERSION, SqliteStore

pytest.importorskip("influxdb_client", reason="influxdb-client is not installed: pip install 'turbofed[influx]'")

from turbofed.store.influx_write import (  # noqa: E402 - after the importorskip
    SENSOR_FIELDS,
    SETTING_FIELDS,
    InfluxSettings,
    InfluxStore,
    _cycle_ns,
    _line,
    _tag,
    influx_settings,
)


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[VictoriaMetrics]:
    """victoria-metrics on a free loopback port, storage in tmp_path; always stopped."""
    if find_victoria_metrics() is None:
        pytest.skip("victoria-metrics is not installed (apt-get install -y victoria-metrics)")
    server = VictoriaMetrics(tmp_path / "vm")
    server.start(timeout=20)
    try:
        yield server
    finally:
        server.stop()


def _series(export: list[dict[str, Any]]) -> dict[tuple[Any, ...], dict[int, float]]:
    """Export lines -> {(name, sorted labels): {timestamp ms: value}} (duplicates would show)."""
    out: dict[tuple[Any, ...], dict[int, float]] = {}
    for s in export:
        labels = dict(s["metric"])
        name = labels.pop("__name__")
        key = (name, *sorted(labels.items()))
        assert len(set(s["timestamps"])) == len(s["timestamps"]), f"two samples share a timestamp in {key}"
        out[key] = dict(zip(s["timestamps"], s["values"]))
    return out


# --- write path against victoria-metrics ----------------------------------------------

def test_write_path_against_victoria_metrics(vm: VictoriaMetrics, tmp_path: Path) -> None:
    store = open_store(f"influxdb+http://127.0.0.1:{vm.port}/?org=fleet&bucket=telemetry", spool_dir=tmp_path / "spool")
    assert isinstance(store, InfluxStore)
    t0 = time.time() - 400  # everything in the past: the export API ends at now
    sites, engines = ("site-1", "site-2"), ("engine-1", "engine-2", "eng 7,a=b")  # the last needs escaping
    expected_pred: dict[tuple[str, str, str], dict[int, tuple[int, float]]] = defaultdict(dict)
    # 1 Hz reports, one cycle per engine each: every point its own millisecond in VictoriaMetrics.
    for cycle in range(1, 41):
        at = t0 + cycle
        for site in sites:
            rows = []
            for e, engine in enumerate(engines):
                local = 150.0 - cycle + e / 4
                federated = None if cycle % 10 == 0 else 140.5 - cycle
                outside = ("local",) if (site, engine, cycle) == ("site-1", "engine-1", 40) else ()
                rows.append((engine, cycle, local, federated, None, None, outside))  # an agent that checks its input range
                ms = int(at * 1000)
                expected_pred[(site, engine, "local")][ms] = (cycle, local)
                if federated is not None:
                    expected_pred[(site, engine, "federated")][ms] = (cycle, federated)
            store.record_predictions(site, rows, at)
    store.record_predictions("site-1", [("engine-9", 1, math.nan, math.inf)], t0)  # nothing finite: no point
    expected_sensor: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(dict)
    for cycle in range(1, 11):
        at = t0 + 100 + cycle
        rows = []
        for e, engine in enumerate(engines):
            settings = [0.001 * e, -0.0002, 100.0]
            sensors = [518.67 + i + cycle / 100 for i in range(21)]
            if cycle == 5:
                sensors[3] = math.nan  # non-finite: the field is left out of that point
            rows.append((engine, cycle, settings, sensors))
            expected_sensor[("site-1", engine)][int(at * 1000)] = [cycle, *settings, *sensors]
        store.record_sensors("site-1", rows, at)
    closed1, closed2 = t0 + 200.25, t0 + 230.5
    store.record_round(1, 1, t0 + 190, closed1, [{"site": "site-1", "samples": 120, "update_bytes": 5000},
                                                {"site": "site-2", "samples": 80, "update_bytes": 5001}],
                       12.5, "fedavg", "quorum")
    store.record_round(2, 2, t0 + 220, closed2, [{"site": "site-2", "samples": 90, "update_bytes": 5002}],
                       3.25, "fedavgm", "deadline", None, {"east": {"sites": 4, "samples": 410, "update_bytes": 20_000,
                                                                      "claimed": 410, "norm_max": 1.0}})
    store.record_metrics("site-1", 2, 2, {"engines": 3, "local": {"rmse": 20.5, "score": 410.0},
                                          "federated": {"rmse": 17.25, "score": None}}, t0 + 231)
    store.record_status("site-1", True, t0 + 1, "0.1.0", 2, 120)
    store.record_status("site-2", False, t0 + 2, None, None, None)
    store.record_truth("site-1", "engine-1", 40, 0.0, t0 + 41)
    for i in range(5):  # same kind, same instant: still five points
        store.record_event("round_announced", {"round": i}, t0 + 300)
    store.record_rejection(2, "site-2", "stale_round", 'round 1 "late"\nsecond line', t0 + 301)

    assert store.flush(timeout=30), store.write_stats()
    stats = store.write_stats()
    pred_points = sum(len(v) for v in expected_pred.values())
    assert stats["spooled"] == 0 and stats["dropped"] == 0 and stats["rejected"] == 0
    assert stats["written"] == pred_points + 30 + 3 + 2 + 1 + 2 + 2 + 1 + 5 + 1
    store.close()

    # Predictions: every point, its cycle and RUL, at its report's millisecond.
    got = _series(vm.export('{__name__=~"predictions_.*"}'))
    assert {k[0] for k in got} == {"predictions_cycle", "predictions_rul", "predictions_out_of_range"}
    assert len(got) == 3 * len(expected_pred)
    for (site, engine, model), points in expected_pred.items():
        labels = (("engine", engine), ("model", model), ("site", site))
        cycles, ruls, flags = (got[(f"predictions_{f}", *labels)] for f in ("cycle", "rul", "out_of_range"))
        assert set(cycles) == set(ruls) == set(flags) == set(points)
        assert all(cycles[ms] == c and ruls[ms] == pytest.approx(r) for ms, (c, r) in points.items())
        flagged = {cycles[ms] for ms, v in flags.items() if v == 1}
        assert flagged == ({40} if (site, engine, model) == ("site-1", "engine-1", "local") else set()), (site, engine, model)

    # Sensor rows: 25 fields per point; the NaN reading is absent, everything else exact.
    got = _series(vm.export('{__name__=~"sensors_.*"}'))
    for (site, engine), points in expected_sensor.items():
        labels = (("engine", engine), ("site", site))
        for i, name in enumerate(("cycle", *SETTING_FIELDS, *SENSOR_FIELDS)):
            want = {ms: v[i] for ms, v in points.items() if math.isfinite(v[i])}
            assert got[(f"sensors_{name}", *labels)] == pytest.approx(want), name
    assert len(got[("sensors_s4", ("engine", "engine-1"), ("site", "site-1"))]) == 9

    # Round results, participants, metrics, status, truth, events, rejections.
    got = _series(vm.export('{__name__=~"(rounds|round_participants|round_regions|metrics|site_status|truth|events|rejections)_.*"}'))
    rounds = {name: sorted(v.items()) for (name, *_), v in got.items() if name.startswith("rounds_")}
    ms1, ms2 = int(closed1 * 1000), int(closed2 * 1000)
    assert rounds["rounds_round"] == [(ms1, 1), (ms2, 2)]
    assert rounds["rounds_samples"] == [(ms1, 200), (ms2, 90 + 410)]  # round 2 counts its region's summary
    assert rounds["rounds_participants"] == [(ms1, 2), (ms2, 1)]
    assert rounds["rounds_aggregate_ms"] == [(ms1, 12.5), (ms2, 3.25)]
    assert rounds["rounds_closed"] == [(ms1, pytest.approx(closed1)), (ms2, pytest.approx(closed2))]
    assert got[("round_participants_samples", ("site", "site-2"))] == {ms1: 80, ms2: 90}
    assert got[("round_participants_update_bytes", ("site", "site-1"))] == {ms1: 5000}
    assert got[("round_regions_samples", ("region", "east"))] == {ms2: 410}
    assert got[("round_regions_sites", ("region", "east"))] == {ms2: 4}
    assert list(got[("metrics_rmse", ("model", "federated"), ("site", "site-1"))].values()) == [17.25]
    assert list(got[("metrics_score", ("model", "local"), ("site", "site-1"))].values()) == [410.0]
    assert ("metrics_score", ("model", "federated"), ("site", "site-1")) not in got  # None: no field
    assert list(got[("site_status_online", ("site", "site-1"))].values()) == [1]
    assert list(got[("site_status_online", ("site", "site-2"))].values()) == [0]
    assert list(got[("site_status_model_version", ("site", "site-1"))].values()) == [2]
    assert ("site_status_model_version", ("site", "site-2")) not in got
    assert list(got[("truth_cycle", ("engine", "engine-1"), ("site", "site-1"))].values()) == [40]
    assert list(got[("truth_rul", ("engine", "engine-1"), ("site", "site-1"))].values()) == [0]
    assert len(got[("events_at", ("kind", "round_announced"))]) == 5
    assert list(got[("rejections_round", ("reason", "stale_round"), ("site", "site-2"))].values()) == [2]


def test_export_reads_back_samples_stamped_this_second(vm: VictoriaMetrics) -> None:
    """The helper's read-back sees a point the moment the server acknowledged it: without an
    explicit end, /api/v1/export stops at now rounded down to the second, and a point
    stamped in the current second (a replay's last predictions) would look lost."""
    for i in range(3):
        ms = int(time.time() * 1000)
        body = f"probe,i={i} v={i}i {ms * 1_000_000}".encode()
        request = urllib.request.Request(f"{vm.url}/api/v2/write?org=o&bucket=b&precision=ns", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=10) as r:
            assert r.status == 204
        got = vm.export(f'probe_v{{i="{i}"}}')
        assert [(s["timestamps"], s["values"]) for s in got] == [([ms], [i])]


def test_recorder_never_blocks_while_server_unreachable(tmp_path: Path) -> None:
    """Nothing listens: every call returns at once, the points wait in the spool, close is prompt."""
    store = InfluxStore(InfluxSettings(url=f"http://127.0.0.1:{free_port()}", org="o", bucket="b",
                                       spool_dir=str(tmp_path / "spool"), retry_interval_ms=100, timeout_ms=2000))
    slowest, at = 0.0, time.time()
    for i in range(200):
        started = time.perf_counter()
        store.record_predictions("site-1", [(f"engine-{e}", i, 100.0 - i, 99.0 - i) for e in range(50)], at + i)
        store.record_event("tick", {"i": i}, at + i)
        slowest = max(slowest, time.perf_counter() - started)
    assert slowest < 0.25
    deadline = time.monotonic() + 15
    while store.write_stats()["pending"] < 200 * 101 and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = store.write_stats()
    assert stats["offline"] and stats["pending"] == 200 * 101 and stats["written"] == 0
    assert not store.flush(timeout=0.2)
    started = time.perf_counter()
    store.close()
    assert time.perf_counter() - started < 10
    with pytest.raises(StoreError, match="closed"):
        store.record_event("late", {}, at)
    # The spool outlives the process: the next store picks the points up.
    reopened = Spool(tmp_path / "spool")
    assert reopened.pending_points() == 200 * 101
    reopened.close()


def test_full_spool_drops_telemetry_keeps_rounds_and_drains_when_server_returns(tmp_path: Path) -> None:
    """The server is away and the spool small: the oldest predictions go (counted, and an
    event says so), every round stays; a later store on the same spool delivers the rest."""
    if find_victoria_metrics() is None:
        pytest.skip("victoria-metrics is not installed (apt-get install -y victoria-metrics)")
    server = VictoriaMetrics(tmp_path / "vm")  # not started yet
    settings = InfluxSettings(url=server.url, org="o", bucket="b", spool_dir=str(tmp_path / "spool"),
                              spool_max_mb=0.25, retry_interval_ms=100, max_retry_delay_ms=500)
    store = InfluxStore(settings)
    at = time.time() - 100
    for i in range(100):
        store.record_predictions("site-1", [(f"engine-{e}", i, 100.0, 90.0) for e in range(50)], at + i / 2)
        store.record_round(i + 1, i + 1, at + i / 2 - 0.25, at + i / 2, [{"site": "site-1", "samples": 10,
                                                                          "update_bytes": 1}], 1.0, "fedavg", "quorum")
    store.close()
    stats = store.write_stats()
    assert stats["offline"] and stats["dropped"] > 0 and stats["lost"] == 0 and stats["written"] == 0
    drop_events = stats["spooled"] - 100 * 100 - 100 * 2  # spooled: every point recorded, plus those events
    assert drop_events >= 1
    server.start(timeout=20)
    try:
        with InfluxStore(settings) as later:
            later.record_event("resumed", {}, time.time())  # a writer's first write starts the drainer
            assert later.flush(timeout=30), later.write_stats()
        assert {int(v) for s in server.export("rounds_round") for v in s["values"]} == set(range(1, 101))
        assert sum(len(s["values"]) for s in server.export("round_participants_samples")) == 100
        assert sum(len(s["values"]) for s in server.export("predictions_rul")) == 100 * 100 - stats["dropped"]
        dropped = server.export('events_at{kind="telemetry_dropped"}')
        assert sum(len(s["values"]) for s in dropped) == drop_events
    finally:
        server.stop()


# --- line protocol, settings, routing ----------------------------------------------------

def test_line_protocol() -> None:
    assert _tag("a b,c=d\\") == "a\\ b\\,c\\=d\\\\"
    assert _tag("") == "_"
    line = _line("events", {"kind": "x y", "a": "1"}, {"detail": 'say "hi"\n\\', "n": 3, "ok": True, "f": 1.5,
                                                       "nan": math.nan, "none": None}, 123)
    assert line == 'events,a=1,kind=x\\ y detail="say \\"hi\\" \\\\",n=3i,ok=true,f=1.5 123'
    assert _line("events", {}, {"none": None, "nan": math.inf}, 1) is None
    # Telemetry timestamps: report millisecond + cycle in nanoseconds.
    assert _cycle_ns(1700000000.1234, 17) == 1700000000123_000_017


def test_settings_env_url_overrides(tmp_path: Path) -> None:
    env = {"TURBOFED_INFLUX_URL": "http://influx:8086", "TURBOFED_INFLUX_TOKEN": "secret",
           "TURBOFED_INFLUX_ORG": "acme", "TURBOFED_INFLUX_BUCKET": "fleet"}
    s = influx_settings("influxdb", env=env)
    assert (s.url, s.token, s.org, s.bucket) == ("http://influx:8086", "secret", "acme", "fleet")
    s = influx_settings("influxdb+https://db.example:8443/?org=o2&bucket=b2&spool_max_mb=64&batch_items=5",
                        spool_dir=tmp_path, env={"TURBOFED_INFLUX_TOKEN": "t"})
    assert (s.url, s.org, s.bucket, s.token) == ("https://db.example:8443", "o2", "b2", "t")
    assert (s.spool_max_mb, s.batch_items, s.spool_dir) == (64.0, 5, str(tmp_path))
    s = influx_settings("influxdb", env=env, overrides={"bucket": "other", "read_start": "-30d"})
    assert (s.bucket, s.read_start) == ("other", "-30d")
    assert influx_settings("influxdb", env=env).resolved_spool_dir().name == "influx-8086-acme-fleet"
    with pytest.raises(StoreError, match="TURBOFED_INFLUX_ORG"):
        influx_settings("influxdb", env={"TURBOFED_INFLUX_URL": "http://x", "TURBOFED_INFLUX_BUCKET": "b"})
    with pytest.raises(StoreError, match="token"):
        influx_settings("influxdb+http://x:1/?org=o&bucket=b&token=leak", env={})
    with pytest.raises(StoreError, match="unknown"):
        influx_settings("influxdb+http://x:1/?org=o&bucket=b&colour=red", env={})
    with pytest.raises(StoreError, match="number"):
        influx_settings("influxdb+http://x:1/?org=o&bucket=b&batch_items=many", env={})
    with pytest.raises(StoreError, match="read_start"):
        influx_settings("influxdb", env=env, overrides={"read_start": "0) |> drop()"})


def test_open_store_routes_and_readers_start_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURBOFED_INFLUX_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("TURBOFED_INFLUX_ORG", "o")
    monkeypatch.setenv("TURBOFED_INFLUX_BUCKET", "b")
    spool = tmp_path / "spool"
    with open_store("influxdb", spool_dir=spool) as store:
        assert isinstance(store, InfluxStore)
        with pytest.raises(StoreError, match="query rounds failed"):
            store.rounds()  # nothing listens; a reader gets a StoreError, not a traceback from the client
    assert not spool.exists()  # a reader (the dashboard) never creates a spool or a thread
    with pytest.raises(StoreError, match="unsupported"):
        open_store("influxdb://localhost:8086")
    with open_store(tmp_path / "r.sqlite") as sqlite_store:
        assert isinstance(sqlite_store, SqliteStore)


def test_influxdb_client_is_optional(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "influxdb_client", None)  # import now fails
    with pytest.raises(StoreError, match="pip install"):
        open_store("influxdb+http://127.0.0.1:1/?org=o&bucket=b")
    with open_store(tmp_path / "r.sqlite") as store:  # SQLite never needs it
        store.record_event("started", {}, 1.0)


# --- the spool -----------------------------------------------------------------------------

def _lines(prefix: str, n: int, start: int = 0) -> bytes:
    return b"".join(f"{prefix},engine=e x={i}i {i}\n".encode() for i in range(start, start + n))


def test_spool_drops_oldest_telemetry_never_protected(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=64 * 1024, segment_bytes=8 * 1024)
    dropped = 0
    for i in range(40):
        dropped += spool.append(TELEMETRY, _lines("predictions", 100, i * 100), 100)
        spool.append(PROTECTED, _lines("rounds", 1, i), 1)
    assert spool.pending_bytes() <= 64 * 1024 and dropped == spool.dropped_points > 0
    assert spool.pending_points() + dropped == 40 * 101
    # Drain: every protected point is there; the telemetry left is the newest.
    protected, telemetry = [], []
    while (chunk := spool.peek(4096)) is not None:
        (protected if chunk.lane == PROTECTED else telemetry).extend(chunk.data.splitlines())
        spool.commit(chunk)
    assert len(protected) == 40
    assert telemetry[-1].startswith(b"predictions,engine=e x=3999i")
    assert len(telemetry) == 40 * 100 - dropped
    # Protected data beyond the bound is kept (and the bound is not enforced on it).
    for i in range(400):
        spool.append(PROTECTED, _lines("events", 10, i * 10), 10)
    assert spool.pending_points() == 4000 and spool.pending_bytes() > 64 * 1024
    spool.close()


def test_spool_survives_restart_and_torn_lines(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append(TELEMETRY, _lines("predictions", 10), 10)
    spool.append(PROTECTED, _lines("rounds", 3), 3)
    chunk = spool.peek(1 << 20)
    assert chunk is not None and chunk.lane == PROTECTED and chunk.points == 3
    spool.commit(chunk)
    chunk = spool.peek(200)  # part of the telemetry segment, whole lines only
    assert chunk is not None and chunk.data.endswith(b"\n") and 0 < chunk.points < 10
    spool.commit(chunk)
    sent = chunk.points
    with pytest.raises(SpoolError, match="in use"):
        Spool(tmp_path)  # one writer per folder
    spool.close()
    segment = next(tmp_path.glob("telemetry-*.lp"))
    with open(segment, "ab") as handle:
        handle.write(b"predictions,engine=e x=")  # a crash mid-append
    spool = Spool(tmp_path)
    assert spool.pending_points() == 10 - sent  # committed offset kept, torn line cut
    data = b""
    while (chunk := spool.peek(1 << 20)) is not None:
        data += chunk.data
        spool.commit(chunk)
    assert data == _lines("predictions", 10 - sent, sent)
    assert list(tmp_path.glob("*.lp")) == []
    spool.close()


# --- SQLite: raw sensor rows -------------------------------------------------------------

def test_sqlite_record_sensors_and_migration(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    with SqliteStore(path) as store:
        store.record_status("site-1", True, 1.0, "0.1", 1, 10)
        store.record_sensors("site-1", [("e1", 1, [0.1, 0.2, 100.0], [float(i) for i in range(21)]),
                                        ("e1", 2, [0.1, 0.2, 100.0], [math.nan] + [1.0] * 20)], 5.0)
        store.record_sensors("site-1", [("e1", 2, [0.0, 0.0, 0.0], [2.0] * 21)], 6.0)  # re-sent: replaces
        assert store.counts()["sensors"] == 2
        assert store.site_status()[0]["last_seen"] == 6.0  # a site that shares rows is alive
    db = sqlite3.connect(path)
    rows = db.execute("SELECT engine, cycle, settings, sensors, at FROM sensors ORDER BY cycle").fetchall()
    assert json.loads(rows[0][3]) == [float(i) for i in range(21)]
    assert rows[1][2:] == ("[0.0, 0.0, 0.0]", json.dumps([2.0] * 21), 6.0)
    # A version-1 store (before sensors) is migrated on open.
    db.execute("DROP TABLE sensors")
    db.execute("ALTER TABLE rounds DROP COLUMN strategy_params")  # added in version 3
    for column in ("norm", "cosine", "action"):  # added in version 4
        db.execute(f"ALTER TABLE round_participants DROP COLUMN {column}")
    db.execute("DROP TABLE archived_rounds")  # added in version 5
    for column in ("lower", "upper"):  # added in version 6
        db.execute(f"ALTER TABLE predictions DROP COLUMN {column}")
    db.execute("DROP TABLE validation_metrics")  # added in version 7
    db.execute("ALTER TABLE predictions DROP COLUMN out_of_range")  # added in version 8
    db.execute("DROP TABLE round_regions")  # added in version 9
    db.execute("UPDATE schema_version SET version = 1")
    db.commit()
    db.close()
    with SqliteStore(path) as store:
        store.record_sensors("site-1", [("e1", 3, [0.0] * 3, [1.0] * 21)], 7.0)
        assert store.counts()["sensors"] == 1
    assert sqlite3.connect(path).execute("SELECT version FROM schema_version").fetchone() == (SCHEMA_VERSION,) == (9,)
