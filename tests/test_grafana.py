"""dashboard/grafana/ (issue #17): the Grafana board's Flux queries name only measurements,
fields and tags turbofed's InfluxDB store writes.

What the store writes is not read off a list: the real `InfluxStore` records one of every
kind into victoria-metrics (an InfluxDB-API server on loopback, as in tests/test_influx.py),
which keeps each field as a series `<measurement>_<field>` labelled with the point's tags."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_influx import vm  # noqa: F401  (the victoria-metrics fixture)
from turbofed.benchmarks.influx import VictoriaMetrics
from turbofed.store import open_store

BOARDS = sorted((Path(__file__).resolve().parent.parent / "dashboard" / "grafana").glob("*.json"))


def _queries(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, Flux) of every panel target (rows' panels too) and every query variable."""
    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(board.get("panels", [])):
        for t in p.get("targets", []):
            yield f"panel {p.get('title')!r}", t["query"]
    for v in board.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            yield f"variable {v['name']!r}", v["query"]


def _names(flux: str) -> tuple[set[str], set[str], set[str]]:
    """Measurements, fields and tags a Flux query names."""
    measurements = set(re.findall(r'r\._measurement == "([^"]+)"', flux)) | set(re.findall(r'measurement: "([^"]+)"', flux))
    fields = set(re.findall(r'r\._field == "([^"]+)"', flux))
    tags = {t for t in re.findall(r'\br\.([A-Za-z]\w*)', flux)} | set(re.findall(r'tag: "([^"]+)"', flux))
    tags |= {c for cols in re.findall(r'group\(columns: \[([^\]]*)\]\)', flux) for c in re.findall(r'"(\w+)"', cols) if not c.startswith("_")}
    return measurements, fields, tags


def test_there_is_a_board_and_every_query_names_one_measurement() -> None:
    assert BOARDS, "no Grafana board in dashboard/grafana/"
    for path in BOARDS:
        board = json.loads(path.read_text())
        queries = list(_queries(board))
        assert len(queries) >= 5, path
        for where, flux in queries:
            measurements, fields, _ = _names(flux)
            assert len(measurements) == 1, f"{path.name} {where}: names {measurements or 'no measurement'}"
            assert fields or "measurementTagValues" in flux, f"{path.name} {where}: names no field"
        titles = " ".join(p["title"] for p in board["panels"])
        for needed in ("RUL", "Federated vs local RMSE", "Refusals"):  # what the issue asks the board to show
            assert needed in titles, needed


def _written(server: VictoriaMetrics, tmp_path: Path) -> dict[str, set[str]]:
    """Every kind of record through the real InfluxStore -> {series name: its label names}."""
    t0 = time.time() - 300  # in the past: the export API ends at now
    store = open_store(f"influxdb+http://127.0.0.1:{server.port}/?org=fleet&bucket=b", spool_dir=tmp_path / "spool")
    try:
        store.record_round(1, 1, t0, t0 + 1, [{"site": "s1", "samples": 100, "update_bytes": 25_000, "norm": 1.5, "cosine": 0.9,
                                               "action": "kept"}], 12.5, "fedavg", "quorum")
        store.record_rejection(1, "s1", "stale_round", "late", t0 + 2)
        store.record_status("s1", True, t0 + 3, "0.1.0", 1, 500)
        store.record_metrics("s1", 1, 1, {"engines": 4, "local": {"rmse": 20.0, "score": 300.0}, "federated": {"rmse": 15.0, "score": 200.0}}, t0 + 4)
        store.record_validation("s1", 1, 1, {"engines": 2, "local": {"rmse": 22.0}, "federated": {"rmse": 16.0}}, t0 + 4.5)
        store.record_predictions("s1", [("e1", 10, 110.0, 105.0, 95.0, 120.0)], t0 + 5)
        store.record_sensors("s1", [("e1", 10, [0.0, 0.0, 100.0], [float(i) for i in range(21)])], t0 + 6)
        store.record_truth("s1", "e1", 10, 0.0, t0 + 7)
        store.record_event("started", {"version": 1}, t0 + 8)
        assert store.flush(30)
    finally:
        store.close()
    return {s["metric"]["__name__"]: set(s["metric"]) - {"__name__"} for s in server.export('{__name__=~".+"}')}


def test_every_query_names_what_the_store_writes(vm: VictoriaMetrics, tmp_path: Path) -> None:  # noqa: F811
    written = _written(vm, tmp_path)
    assert "metrics_rmse" in written and "site_status_online" in written  # the write path worked
    for path in BOARDS:
        for where, flux in _queries(json.loads(path.read_text())):
            (measurement,), fields, tags = _names(flux)
            series = {name: labels for name, labels in written.items() if name.startswith(measurement + "_")}
            assert series, f"{path.name} {where}: the store writes no measurement {measurement!r}"
            for field in fields:
                assert f"{measurement}_{field}" in written, f"{path.name} {where}: {measurement} has no field {field!r}"
            for field in fields or {name.removeprefix(measurement + "_") for name in series}:
                missing = tags - written[f"{measurement}_{field}"]
                assert not missing, f"{path.name} {where}: {measurement}.{field} points have no tag(s) {sorted(missing)}"


def test_a_wrong_name_would_be_caught() -> None:
    """The parsing the check rests on finds what a query names."""
    flux = ('from(bucket: "b") |> filter(fn: (r) => r._measurement == "metrics" and r._field == "rmse" and r.model == "local")\n'
            '  |> filter(fn: (r) => contains(value: r.site, set: ["a"])) |> group(columns: ["site", "engine"])')
    assert _names(flux) == ({"metrics"}, {"rmse"}, {"model", "site", "engine"})


@pytest.mark.parametrize("path", BOARDS, ids=[p.name for p in BOARDS])
def test_board_is_importable_json(path: Path) -> None:
    board = json.loads(path.read_text())
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    assert {i["name"] for i in board["__inputs"]} == {"DS_INFLUXDB"}
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
