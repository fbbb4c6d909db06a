"""The InfluxDB store's Flux read path, against a stand-in for a real InfluxDB 2 server.

No InfluxDB 2 server installs on this machine, so these tests serve InfluxDB's wire formats
from a local HTTP server on 127.0.0.1 (http.server in a thread):

- POST /api/v2/write takes the line protocol influxdb-client sends and keeps the points
  (same series + timestamp: the fields merge, as InfluxDB does);
- POST /api/v2/query answers each of the store's named Flux queries with annotated CSV,
  computed from those points the way the query's filter / pivot / last / max / count
  steps would (the stand-in does not parse Flux: it reads the query's name from its first
  line, and the few literals it needs from the text).

What this checks: the queries the store sends, that influxdb-client parses the annotated
CSV into the values the store expects, and that every read method returns the same dicts
as SqliteStore given the same records. What it cannot check: that a real InfluxDB 2 runs
these Flux queries as the stand-in assumes (see docs/telemetry.md).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from turbofed.store import StoreError
from turbofed.store.sqlite import SqliteStore

pytest.importorskip("influxdb_client", reason="influxdb-client is not installed: pip install 'turbofed[influx]'")

from turbofed.store.influx_write import InfluxSettings, InfluxStore  # noqa: E402 - after the importorskip

Point = tuple[str, tuple[tuple[str, str], ...], int]  # measurement, sorted tags, ns


# --- line protocol in ------------------------------------------------------------------

def _split(text: str, sep: str) -> list[str]:
    """Split at `sep` outside quotes and backslash escapes."""
    parts, cur, quoted, i = [], "", False, 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            cur += text[i:i + 2]
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
        i += 1
    return parts + [cur]


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _value(text: str) -> Any:
    if text.startswith('"'):
        return re.sub(r'\\(["\\])', r"\1", text[1:-1])
    if text.endswith("i"):
        return int(text[:-1])
    if text in ("true", "false"):
        return text == "true"
    return float(text)


def parse_line(line: str) -> tuple[Point, dict[str, Any]]:
    key, fieldset, ns = _split(line, " ")
    measurement, *tags = _split(key, ",")
    tagpairs = tuple(sorted((_unescape(k), _unescape(v)) for k, v in (_split(t, "=") for t in tags)))
    values = {_unescape(k): _value(v) for k, v in (_split(f, "=") for f in _split(fieldset, ","))}
    return (measurement, tagpairs, int(ns)), values


# --- annotated CSV out -------------------------------------------------------------------

def _rfc3339(ns: int) -> str:
    seconds, rest = divmod(ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") + f".{rest:09d}Z"


def _datatype(values: list[Any]) -> str:
    kinds = {type(v) for v in values if v is not None}
    if kinds == {bool}:
        return "boolean"
    if kinds == {int}:
        return "long"
    if kinds <= {int, float} and kinds:
        return "double"
    return "string"


def _cell(value: Any, datatype: str) -> str:
    if value is None:
        return ""
    if datatype == "dateTime:RFC3339":
        return _rfc3339(value)
    if datatype == "boolean":
        return "true" if value else "false"
    text = repr(float(value)) if datatype == "double" else str(value)
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


Table = tuple[str, list[str], list[dict[str, Any]]]  # result name, group-key columns, rows


def annotated_csv(tables: list[Table]) -> str:
    """InfluxDB's annotated CSV: one annotation block per table, blank line between them."""
    blocks, now = [], time.time_ns()
    for index, (result, group, rows) in enumerate(tables):
        if not rows:
            continue
        rows = [{"_start": 0, "_stop": now, **r} for r in rows]
        columns = ["_start", "_stop"] + sorted({c for r in rows for c in r} - {"_start", "_stop"},
                                               key=lambda c: (not c.startswith("_"), c))
        types = ["dateTime:RFC3339" if c in ("_start", "_stop", "_time") else _datatype([r.get(c) for r in rows])
                 for c in columns]
        lines = [",".join(["#group", "false", "false"] + [str(c in group or c in ("_start", "_stop")).lower()
                                                            for c in columns]),
                 ",".join(["#datatype", "string", "long"] + types),
                 ",".join(["#default", result, ""] + [""] * len(columns)),
                 ",".join(["", "result", "table"] + columns)]
        lines += [",".join(["", "", str(index)] + [_cell(r.get(c), t) for c, t in zip(columns, types)]) for r in rows]
        blocks.append("\r\n".join(lines) + "\r\n")
    return "\r\n".join(blocks) + "\r\n"


# --- the stand-in: points, and what each named query returns ------------------------------

class FakeInflux:
    """What the store writes, and answers to the store's Flux queries computed from it."""

    def __init__(self) -> None:
        self.points: dict[Point, dict[str, Any]] = {}
        self.queries: list[tuple[str, str]] = []  # (org, flux)
        self.writes: list[tuple[str, str, str]] = []  # (org, bucket, precision)
        self.canned: dict[str, str] = {}  # query name -> verbatim annotated CSV
        self.errors: dict[str, tuple[int, str]] = {}  # query name -> HTTP status, message
        self.lock = threading.Lock()

    def write(self, body: str) -> None:
        with self.lock:
            for line in body.splitlines():
                if line.strip():
                    point, values = parse_line(line)
                    self.points.setdefault(point, {}).update(values)  # InfluxDB merges same series+time

    # pivot(rowKey: ["_time"]) tables, one per series: rows of _time, _measurement, tags, fields
    def pivoted(self, keep: Callable[[str, dict[str, str]], bool]) -> list[list[dict[str, Any]]]:
        series: dict[tuple[str, tuple[tuple[str, str], ...]], list[dict[str, Any]]] = defaultdict(list)
        for (m, tags, ns), values in sorted(self.points.items(), key=lambda kv: kv[0][2]):
            if keep(m, dict(tags)):
                series[(m, tags)].append({"_time": ns, "_measurement": m, **dict(tags), **values})
        return list(series.values())

    # last() per series and field, unpivoted
    def last_fields(self, keep: Callable[[str, dict[str, str], str, Any], bool]) -> list[list[dict[str, Any]]]:
        last: dict[tuple[Any, ...], dict[str, Any]] = {}
        for (m, tags, ns), values in sorted(self.points.items(), key=lambda kv: kv[0][2]):
            for field, value in values.items():
                if keep(m, dict(tags), field, value):
                    last[(m, tags, field)] = {"_time": ns, "_measurement": m, **dict(tags), "_field": field,
                                              "_value": value}
        return [[row] for row in last.values()]

    def answer(self, flux: str) -> str:
        name = re.match(r"// turbofed:(\w+)", flux).group(1)
        if name in self.canned:
            return self.canned[name]
        with self.lock:
            return annotated_csv(getattr(self, f"q_{name}")(flux))

    def _tables(self, result: str, tables: list[list[dict[str, Any]]], extra_group: tuple[str, ...] = ()) -> list[Table]:
        out = []
        for rows in tables:
            if rows:
                tags = [c for c in rows[0] if not c.startswith("_") and c in ("site", "engine", "model", "kind", "reason")]
                out.append((result, ["_measurement", *tags, *extra_group], rows))
        return out

    def q_rounds(self, flux: str) -> list[Table]:
        return self._tables("_result", self.pivoted(lambda m, t: m in ("rounds", "round_participants", "round_regions")))

    def q_rejections(self, flux: str) -> list[Table]:
        return self._tables("_result", self.pivoted(lambda m, t: m == "rejections"))

    def q_site_status(self, flux: str) -> list[Table]:
        status = self._tables("status", self.last_fields(lambda m, t, f, v: m == "site_status"), ("_field",))
        online_rows: dict[str, dict[str, Any]] = {}
        for (m, tags, ns), values in sorted(self.points.items(), key=lambda kv: kv[0][2]):
            if m == "site_status" and values.get("online") is True:
                online_rows[dict(tags)["site"]] = {"_time": ns, "_measurement": m, **dict(tags), "_field": "online",
                                                   "_value": True}
        online = self._tables("online", [[r] for r in online_rows.values()], ("_field",))
        seen: dict[str, int] = {}
        for (m, tags, ns), values in self.points.items():
            if (m == "metrics" and "at" in values) or (m in ("predictions", "sensors") and "cycle" in values):
                site = dict(tags)["site"]
                seen[site] = max(seen.get(site, 0), ns)
        return status + online + [("seen", ["site"], [{"_time": ns, "site": site}]) for site, ns in seen.items()]

    def q_metrics(self, flux: str) -> list[Table]:
        site = re.search(r'r\.site == "([^"]*)"', flux)
        return self._tables("_result", self.pivoted(lambda m, t: m == "metrics" and (site is None or t["site"] == site.group(1))))

    def q_validation_metrics(self, flux: str) -> list[Table]:
        return self._tables("_result", self.pivoted(lambda m, t: m == "validation"))

    def q_latest_metrics(self, flux: str) -> list[Table]:
        return self._tables("_result", [[rows[-1]] for rows in self.pivoted(lambda m, t: m == "metrics")])

    def _truth_last(self, keep: Callable[[dict[str, str]], bool] = lambda t: True) -> list[list[dict[str, Any]]]:
        return [[rows[-1]] for rows in self.pivoted(lambda m, t: m == "truth" and keep(t))]

    def q_latest_predictions(self, flux: str) -> list[Table]:
        latest = [[max(rows, key=lambda r: r["cycle"])] for rows in self.pivoted(lambda m, t: m == "predictions")]
        return self._tables("latest", latest) + self._tables("truth", self._truth_last())

    def q_engine_trajectory(self, flux: str) -> list[Table]:
        site, engine = re.search(r'r\.site == "([^"]*)" and r\.engine == "([^"]*)"', flux).groups()
        keep = lambda t: t["site"] == site and t["engine"] == engine  # noqa: E731
        return (self._tables("predictions", self.pivoted(lambda m, t: m == "predictions" and keep(t)))
                + self._tables("truth", self._truth_last(keep)))

    def q_truth(self, flux: str) -> list[Table]:
        return self._tables("_result", self._truth_last())

    def q_truth_predictions(self, flux: str) -> list[Table]:
        sites, engines = (json.loads(s) for s in re.findall(r"set: (\[[^\]]*\])", flux))
        return self._tables("_result", self.pivoted(lambda m, t: m == "predictions" and t["site"] in sites
                                                     and t["engine"] in engines))

    def q_events(self, flux: str) -> list[Table]:
        limit = int(re.search(r"limit\(n: (\d+)\)", flux).group(1))
        rows = sorted((r for rows in self.pivoted(lambda m, t: m == "events") for r in rows),
                      key=lambda r: r["_time"], reverse=True)[:limit]
        return [("_result", [], rows)]

    def q_counts(self, flux: str) -> list[Table]:
        wanted = set(re.findall(r'r\._measurement == "(\w+)" and r\._field == "(\w+)"', flux))
        points: dict[str, int] = defaultdict(int)
        series: dict[str, set[Any]] = defaultdict(set)
        for (m, tags, ns), values in self.points.items():
            for field in values:
                if (m, field) in wanted:
                    points[m] += 1
            if m in ("site_status", "truth") and "at" in values:
                series[m].add(tags)
        return ([("points", ["_measurement"], [{"_measurement": m, "_value": n}]) for m, n in points.items()]
                + [("series", ["_measurement"], [{"_measurement": m, "_value": len(s)}]) for m, s in series.items()])


@pytest.fixture
def fake() -> Iterator[tuple[FakeInflux, str]]:
    """The stand-in on a free port of 127.0.0.1, in a thread; shut down after the test."""
    state = FakeInflux()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(204 if self.path.startswith(("/ping", "/health")) else 404)
            self.end_headers()

        def do_POST(self) -> None:
            url = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if url.path == "/api/v2/write":
                state.writes.append((query.get("org", ""), query.get("bucket", ""), query.get("precision", "")))
                state.write(body.decode())
                self.send_response(204)
                self.end_headers()
            elif url.path == "/api/v2/query":
                flux = json.loads(body)["query"]
                state.queries.append((query.get("org", ""), flux))
                error = state.errors.get(re.match(r"// turbofed:(\w+)", flux).group(1))
                if error is not None:
                    data = json.dumps({"code": "invalid", "message": error[1]}).encode()
                    self.send_response(error[0])
                    self.send_header("Content-Type", "application/json; charset=utf-8")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                data = state.answer(flux).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/csv; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            else:
                self.send_response(404)
                self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _store(url: str, tmp_path: Path) -> InfluxStore:
    return InfluxStore(InfluxSettings(url=url, org="acme", bucket="fleet", token="tok", spool_dir=str(tmp_path / "spool"),
                                      flush_interval_ms=100))


def _record_fleet(store: Any, t0: float) -> None:
    """The same records into any store: what an aggregator records in a short replay."""
    store.record_event("started", {"strategy": "fedavg"}, t0)
    store.record_status("site-1", True, t0 + 1, "0.1.0", 0, 500)
    # The learning curve: round 1 of site-1 re-sent later (the newer report counts), round 2 of both.
    store.record_validation("site-1", 1, 1, {"engines": 3, "local": {"rmse": 30.0}, "federated": {"rmse": 25.0}}, t0 + 3)
    store.record_validation("site-1", 1, 1, {"engines": 3, "local": {"rmse": 31.0}, "federated": {"rmse": 24.0}}, t0 + 4)
    store.record_validation("site-10", 2, 2, {"engines": 2, "local": {"rmse": 20.0}, "federated": {"rmse": None}}, t0 + 5)
    store.record_validation("site-1", 2, 2, {"engines": 3, "local": {"rmse": 21.0}, "federated": {"rmse": 18.5}}, t0 + 6)
    store.record_status("site-10", True, t0 + 1.5, "0.1.0", 0, 300)
    store.record_status("site-2", True, t0 + 2, "0.1.0", 0, 400)
    store.record_status("site-2", False, t0 + 50, None, None, None)  # a bare last will keeps versions
    store.record_status("site-2", True, t0 + 1.8, "0.0.9", 0, 1)  # older, delivered late: loses
    store.record_status("site-2", True, t0 + 2, "0.1.0", 0, 400)  # redelivered: changes nothing
    for cycle in range(1, 31):
        at = t0 + 10 + cycle
        for site in ("site-1", "site-2", "site-10"):
            rows = [(f"engine-{e}", cycle, 130.0 - cycle - e, None if (cycle == 30 and e == 2) else 128.5 - cycle)
                    for e in (1, 2, 10)]
            if cycle > 20:  # the federated RUL's conformal interval, from the interval table on
                rows = [(*r, None, None) if r[3] is None else (*r, r[3] - 10.0, r[3] + 12.5) for r in rows]
            if cycle > 25:  # and whether each model's input was outside its training range (agents that say)
                rows = [(*r, ("federated",) if r[0] == "engine-10" else ("local",) if r[3] is None else ()) for r in rows]
            store.record_predictions(site, rows, at)
    store.record_predictions("site-1", [("engine-1", 7, 99.0, 98.0)], t0 + 45)  # re-sent later: replaces
    store.record_truth("site-1", "engine-1", 30, 0.0, t0 + 41)
    store.record_truth("site-2", "engine-10", 25, 12.0, t0 + 42)
    store.record_truth("site-2", "engine-10", 25, 10.0, t0 + 43)  # re-recorded: replaces
    store.record_sensors("site-10", [("engine-1", 31, [0.0, 0.0, 100.0], [1.0] * 21)], t0 + 46)
    for rnd in (1, 2):
        closed = t0 + 40 + rnd
        store.record_round(rnd, rnd, closed - 5, closed,
                           [{"site": "site-10", "samples": 70 * rnd, "update_bytes": 1000},
                            {"site": "site-2", "samples": 50 * rnd, "update_bytes": 1001}], 1.5 * rnd, "fedavgm", "quorum",
                           {"server_lr": 1.0, "momentum": 0.1 * rnd},
                           {"east": {"sites": 3, "samples": 400, "update_bytes": 7000, "claimed": 400, "norm_max": 2.0}} if rnd == 1 else None)
        for site, rmse in (("site-1", 20.0), ("site-2", 25.0)):
            store.record_metrics(site, rnd, rnd, {"engines": 3, "local": {"rmse": rmse + rnd, "score": 300.0},
                                                  "federated": {"rmse": rmse - rnd, "score": None}}, closed + 0.5)
        store.record_event("round_closed", {"round": rnd, "sites": ["site-2", "site-10"]}, closed)
    store.record_round(2, 2, t0 + 37, t0 + 44, [{"site": "site-2", "samples": 55, "update_bytes": 999}],
                       2.0, "fedavg", "deadline")  # a resumed aggregator re-records round 2
    store.record_rejection(1, "site-1", "stale_round", "update for round 0", t0 + 41.2)
    store.record_rejection(None, "site-2", "bad_envelope", 'hash "mismatch"', t0 + 41.1)
    for i in range(3):
        store.record_event("round_announced", {"round": 3 + i}, t0 + 44.0)  # same instant, three events


def _without_ids(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "id"} for r in rows]


def test_flux_reads_against_stand_in_for_influxdb2_match_sqlite(fake: tuple[FakeInflux, str], tmp_path: Path) -> None:
    """Stand-in for a real InfluxDB 2 server (none installs here): every read method of the
    InfluxDB store returns what SqliteStore returns for the same records."""
    state, url = fake
    t0 = time.time() - 1000
    sqlite = SqliteStore(tmp_path / "r.sqlite")
    store = _store(url, tmp_path)
    _record_fleet(sqlite, t0)
    _record_fleet(store, t0)
    assert store.flush(timeout=20), store.write_stats()
    assert {w for w in state.writes} == {("acme", "fleet", "ns")}

    assert store.rounds() == sqlite.rounds()
    assert store.rounds()[1]["closed_by"] == "deadline" and store.rounds()[1]["samples"] == 55
    assert store.rounds()[0]["regions"] == [{"region": "east", "sites": 3, "samples": 400, "update_bytes": 7000}]
    assert store.rounds()[0]["samples"] == 70 + 50 + 400
    assert store.rounds()[0]["strategy_params"] == {"server_lr": 1.0, "momentum": 0.1}
    assert _without_ids(store.rejections()) == _without_ids(sqlite.rejections())
    assert _without_ids(store.rejections(1)) == _without_ids(sqlite.rejections(1)) != []
    assert _without_ids(store.metrics()) == _without_ids(sqlite.metrics())
    assert _without_ids(store.metrics("site-2")) == _without_ids(sqlite.metrics("site-2")) != []
    assert _without_ids(store.latest_metrics()) == _without_ids(sqlite.latest_metrics())
    assert store.validation_metrics() == sqlite.validation_metrics()
    assert [(r["site"], r["round"], r["model"], r["rmse"]) for r in store.validation_metrics()][:2] == [
        ("site-1", 1, "federated", 24.0), ("site-1", 1, "local", 31.0)]
    assert store.latest_predictions() == sqlite.latest_predictions()
    assert store.engine_trajectory("site-1", "engine-1") == sqlite.engine_trajectory("site-1", "engine-1")
    assert store.engine_trajectory("site-1", "engine-1")[6] == {"cycle": 7, "local": 99.0, "federated": 98.0,
                                                                "lower": None, "upper": None, "out_of_range": None, "true_rul": 23.0}
    assert store.engine_trajectory("site-1", "engine-1")[24] == {"cycle": 25, "local": 104.0, "federated": 103.5,
                                                                 "lower": 93.5, "upper": 116.0, "out_of_range": None, "true_rul": 5.0}
    assert store.engine_trajectory("site-2", "engine-10") == sqlite.engine_trajectory("site-2", "engine-10")
    assert [p["out_of_range"] for p in store.engine_trajectory("site-2", "engine-10")[24:]] == [None, 1, 1, 1, 1, 1]
    assert [(r["engine"], r["out_of_range"]) for r in store.latest_predictions() if r["site"] == "site-1"] == [
        ("engine-1", 0), ("engine-2", 1), ("engine-10", 1)]  # engine-2: its local model's input, at cycle 30
    assert store.engine_trajectory("site-9", "engine-1") == []
    assert store.engines_with_truth() == sqlite.engines_with_truth()
    assert _without_ids(store.events()) == _without_ids(sqlite.events())
    assert _without_ids(store.events(2)) == _without_ids(sqlite.events(2))
    # Counts match, except that InfluxDB counts points: the prediction and the validation
    # report re-sent later are two more points each (reads take the later; SQLite replaced the row).
    assert store.counts() == {**sqlite.counts(), "predictions": sqlite.counts()["predictions"] + 2,
                              "validation_metrics": sqlite.counts()["validation_metrics"] + 2}

    status, expected = store.site_status(), sqlite.site_status()
    for got, want in zip(status, expected, strict=True):
        # last_seen comes from point timestamps (telemetry: the report's millisecond).
        assert got.pop("last_seen") == pytest.approx(want.pop("last_seen"), abs=0.002)
        assert got == want
    assert [s["site"] for s in status] == ["site-1", "site-2", "site-10"]

    # The queries name the bucket, go to the org, and filter on tags where the engine is known.
    assert all(org == "acme" for org, _ in state.queries)
    assert all('from(bucket: "fleet")' in flux for _, flux in state.queries)
    trajectory = next(flux for _, flux in state.queries if flux.startswith("// turbofed:engine_trajectory"))
    assert 'r.site == "site-1" and r.engine == "engine-1"' in trajectory
    store.close()
    sqlite.close()


def test_flux_reads_of_an_empty_bucket_from_stand_in_for_influxdb2(fake: tuple[FakeInflux, str], tmp_path: Path) -> None:
    """Stand-in for a real InfluxDB 2 server: an empty bucket reads as an empty store."""
    state, url = fake
    with _store(url, tmp_path) as store, SqliteStore(tmp_path / "r.sqlite") as sqlite:
        for method in ("rounds", "rejections", "site_status", "metrics", "latest_metrics", "latest_predictions",
                       "engines_with_truth", "events", "counts"):
            assert getattr(store, method)() == getattr(sqlite, method)(), method
        assert store.engine_trajectory("site-1", "engine-1") == []


# InfluxDB 2 answers a pivoted query in this shape: one annotation block per table, the
# group key marked, and the result name as #default. This one is written out by hand.
ROUNDS_CSV = (
    "#group,false,false,true,true,false,true,false,false,false,false,false,false,false,false,false,false\r\n"
    "#datatype,string,long,dateTime:RFC3339,dateTime:RFC3339,dateTime:RFC3339,string,double,double,string,long,long,"
    "long,long,double,string,long\r\n"
    "#default,_result,,,,,,,,,,,,,,,\r\n"
    ",result,table,_start,_stop,_time,_measurement,aggregate_ms,closed,closed_by,model_version,participants,round,"
    "samples,started,strategy,xtra\r\n"
    ",,0,1970-01-01T00:00:00Z,2026-11-26T00:00:00Z,2026-11-25T10:00:05.25Z,rounds,12.5,1795600805.25,quorum,1,2,1,"
    "300,1795600800,fedavg,\r\n"
    "\r\n"
    "#group,false,false,true,true,false,true,true,false,false,false\r\n"
    "#datatype,string,long,dateTime:RFC3339,dateTime:RFC3339,dateTime:RFC3339,string,string,long,long,long\r\n"
    "#default,_result,,,,,,,,,\r\n"
    ",result,table,_start,_stop,_time,_measurement,site,round,samples,update_bytes\r\n"
    ",,1,1970-01-01T00:00:00Z,2026-11-26T00:00:00Z,2026-11-25T10:00:05.25Z,round_participants,site-2,1,100,2048\r\n"
    "\r\n"
    "#group,false,false,true,true,false,true,true,false,false,false\r\n"
    "#datatype,string,long,dateTime:RFC3339,dateTime:RFC3339,dateTime:RFC3339,string,string,long,long,long\r\n"
    "#default,_result,,,,,,,,,\r\n"
    ",result,table,_start,_stop,_time,_measurement,site,round,samples,update_bytes\r\n"
    ",,2,1970-01-01T00:00:00Z,2026-11-26T00:00:00Z,2026-11-25T10:00:05.25Z,round_participants,site-10,1,200,2049\r\n"
    ",,2,1970-01-01T00:00:00Z,2026-11-26T00:00:00Z,2026-11-25T09:00:00Z,round_participants,site-10,1,7,7\r\n"
    "\r\n"
)


def test_verbatim_annotated_csv_from_stand_in_for_influxdb2(fake: tuple[FakeInflux, str], tmp_path: Path) -> None:
    """Stand-in for a real InfluxDB 2 server answering with hand-written annotated CSV:
    types come through (long, double, string, dateTime), and participants of an older
    record of the round (other timestamp) are not mixed in."""
    state, url = fake
    state.canned["rounds"] = ROUNDS_CSV
    with _store(url, tmp_path) as store:
        assert store.rounds() == [{
            "round": 1, "model_version": 1, "started": 1795600800.0, "closed": 1795600805.25, "aggregate_ms": 12.5,
            "strategy": "fedavg", "strategy_params": {}, "closed_by": "quorum", "samples": 300, "regions": [],
            "participants": [{"site": "site-2", "samples": 100, "update_bytes": 2048},
                             {"site": "site-10", "samples": 200, "update_bytes": 2049}]}]


def test_query_error_from_stand_in_for_influxdb2_is_a_store_error(fake: tuple[FakeInflux, str], tmp_path: Path) -> None:
    """Stand-in for a real InfluxDB 2 server answering a query with an error (HTTP 400 and
    InfluxDB's JSON error body): the reader gets a StoreError that carries the message."""
    state, url = fake
    state.errors["events"] = (400, "compilation failed: error @1:1-1:5: undefined identifier frm")
    with _store(url, tmp_path) as store:
        with pytest.raises(StoreError, match="query events failed.*undefined identifier"):
            store.events()


def test_archived_rounds_are_kept_and_a_new_epoch_starts_clean_on_both_stores(fake: tuple[FakeInflux, str], tmp_path: Path) -> None:
    """A fleet reset (`turbofed aggregator --reset`) archives the old epoch's rounds: on SQLite
    into archived_rounds, on the stand-in for InfluxDB 2 behind a `rounds_archived` mark; the
    new epoch's round 0 then replaces nothing and both stores show only the new rounds."""
    _, url = fake
    t0 = time.time() - 1000
    with SqliteStore(tmp_path / "r.sqlite") as sqlite, _store(url, tmp_path) as store:
        for s in (sqlite, store):
            _record_fleet(s, t0)
        assert store.flush(timeout=20)
        old = sqlite.rounds()
        assert store.rounds() == old and len(old) == 2
        assert sqlite.archive_rounds(0) == 2 and store.archive_rounds(0) == 2
        assert store.flush(timeout=20)
        assert sqlite.rounds() == [] and store.rounds() == []
        assert sqlite.archived_rounds(0) == old  # nothing recorded is lost
        time.sleep(0.01)
        for s in (sqlite, store):
            s.record_round(0, 0, time.time(), time.time(), [], 0.0, "fedavg", "initial")
        assert store.flush(timeout=20)
        assert [r["round"] for r in store.rounds()] == [r["round"] for r in sqlite.rounds()] == [0]
        assert sqlite.archived_rounds(0) == old
