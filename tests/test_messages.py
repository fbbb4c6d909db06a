"""Typed protocol messages: every dataclass round-trips through its payload, hostile payloads
are refused with the right Refusal, arbitrary input never raises anything but MessageError,
and the aggregator and agent route by their tables, counting what they refuse."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from turbofed.config import FleetConfig, ModelSettings, SiteConfig
from turbofed.conformal import IntervalTable, Layout, ResidualHistogram
from turbofed.envelope import MAX_JSON_BYTES
from turbofed.messages import (
    MAX_COUNTERS,
    MAX_PLANT_BYTES,
    MAX_PREDICTION_ROWS,
    MAX_TELEMETRY_ROWS,
    N_SENSORS,
    N_SETTINGS,
    EngineEvent,
    MessageError,
    Metrics,
    ModelScore,
    Predictions,
    RoundAnnouncement,
    SensorReading,
    StatsReply,
    StatsRequest,
    Status,
    Telemetry,
)
from turbofed.messages.site import STORAGE_STATES
from turbofed.refusals import Refusal
from turbofed.spec import FeatureSpec, FleetStats
from turbofed.topics import MAX_ID_LEN, Topics

SITE = "site1"
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _spec() -> FeatureSpec:
    n = FeatureSpec((1, 6), 30, (), ()).n_features
    return FeatureSpec((1, 6), 30, tuple(float(i) for i in range(n)), tuple(1.0 + i for i in range(n)))


def _stats() -> FleetStats:
    stats = FleetStats()
    stats.count, stats.sum_y = 12.0, 300.0
    stats.sum[3] = 7.5
    return stats


def _open_round() -> RoundAnnouncement:
    return RoundAnnouncement(3, _spec(), announce_id="abc123", model_version=2, deadline=1_700_000_000.5,
                             settings=ModelSettings(rounds=4, hidden=(8, 4)), min_samples=50, strategy="fedavg")


def _reading() -> SensorReading:
    return SensorReading(7, (0.0, 0.25, 100.0), tuple(float(i) for i in range(N_SENSORS)))


# --- round trips ---------------------------------------------------------------------------

SITE_MESSAGES = [
    StatsReply("r1", SITE, 120, 4, _stats()),
    StatsReply("r1", SITE, 0, 0, None),
    Status(SITE, True, "0.1.0", 3, 1200, "training", 1_700_000_000.25),
    Status(SITE, False),
    Metrics(SITE, 3, 2, ModelScore(12.5, 80.25, 2), ModelScore(), {"readings": 40, "rejected.not_json": 1}),
    Metrics(SITE, -1, 0),
    Predictions(SITE, (("e1", 4, 101.5, None), ("e2", 9, None, 88.0)), (("e3", 31, 112.0), ("e1", 4, 0.0))),
    Telemetry(SITE, (("e1", 4, (0.0, 0.1, 100.0), tuple(float(i) for i in range(N_SENSORS))),)),
    Status(SITE, True, samples=4880, storage="full"),
    Predictions(SITE, (("e1", 4, 101.5, 90.0, 72.0, 104.5), ("e2", 9, None, 88.0))),
    StatsReply("r2", SITE, 900, 5, residuals=ResidualHistogram.from_residuals(
        Layout.for_cap(), np.array([10.0, 50.0, 90.0]), np.array([12.0, 41.0, 125.0]))),
    Predictions(SITE, (("e1", 4, 101.5, 90.0, 72.0, 104.5, ("federated",)), ("e2", 9, 3.0, 88.0, None, None, ("local", "federated")),
                       ("e3", 9, None, 88.0, None, None, ()))),  # an agent that checks each model's input range
]
_TABLE = IntervalTable(0.9, (30.0, 70.0), (-6.0, -15.0, -math.inf), (5.0, 17.0, 30.0), (400, 900, 60), (False, False, True), 5)
FLEET_MESSAGES = [_open_round(), RoundAnnouncement(5, _spec(), done=True), StatsRequest("r1", 50, 30), _reading(),
                  RoundAnnouncement(5, _spec(), done=True, intervals=_TABLE),
                  StatsRequest("r3", 50, 30, "residuals", layout=Layout.for_cap(), model_version=5),
                  EngineEvent("failure", 192), EngineEvent("truth", 31, 112.0)]


@pytest.mark.parametrize("message", SITE_MESSAGES, ids=lambda m: type(m).__name__)
def test_site_messages_round_trip(message: object) -> None:
    payload = message.to_payload()
    back = type(message).from_payload(payload, site=SITE)
    assert back.to_payload() == payload
    if not isinstance(message, StatsReply):  # FleetStats holds arrays: compared through its payload
        assert back == message


@pytest.mark.parametrize("message", FLEET_MESSAGES, ids=lambda m: type(m).__name__)
def test_fleet_and_plant_messages_round_trip(message: object) -> None:
    payload = message.to_payload()
    assert type(message).from_payload(payload) == message
    assert type(message).from_payload(payload).to_payload() == payload


def test_wire_format_is_unchanged() -> None:
    """Byte-compatible with what the dict builders sent: key order and shapes as before."""
    assert EngineEvent("failure", 192).to_payload() == b'{"event":"failure","cycle":192}'
    assert StatsRequest("r1", 50, 30).to_payload() == b'{"request_id":"r1","min_samples":50,"window":30}'
    assert list(json.loads(_open_round().to_payload())) == ["round", "announce_id", "model_version", "deadline", "settings", "spec", "min_samples", "strategy"]
    assert list(json.loads(RoundAnnouncement(5, _spec(), done=True).to_payload())) == ["round", "done", "spec"]
    assert json.loads(SITE_MESSAGES[6].to_payload()) == {"site": SITE, "rows": [["e1", 4, 101.5, None], ["e2", 9, None, 88.0]], "truth": [["e3", 31, 112.0], ["e1", 4, 0.0]]}
    assert list(json.loads(SITE_MESSAGES[4].to_payload())) == ["site", "model_version", "engines", "local", "federated", "counters"]


finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
engines = st.text(st.characters(codec="ascii", categories=("L", "N")), min_size=1, max_size=12)
cycles = st.integers(0, 2**53 - 1)


@FAST
@given(
    rows=st.lists(st.tuples(engines, cycles, st.none() | finite, st.none() | finite), max_size=20),
    truth=st.lists(st.tuples(engines, cycles, st.floats(0, 1e6)), max_size=20),
    sensors=st.lists(finite, min_size=N_SENSORS, max_size=N_SENSORS),
    setting=st.lists(finite, min_size=N_SETTINGS, max_size=N_SETTINGS),
    cycle=cycles,
    online=st.booleans(),
    at=st.none() | st.floats(0, 1e10),
    storage=st.none() | st.sampled_from(STORAGE_STATES),
)
def test_property_round_trips(rows: list, truth: list, sensors: list, setting: list, cycle: int, online: bool, at: float | None,
                              storage: str | None) -> None:
    predictions = Predictions(SITE, tuple(rows), tuple(truth))
    assert Predictions.from_payload(predictions.to_payload(), site=SITE) == predictions
    reading = SensorReading(cycle, tuple(setting), tuple(sensors))
    assert SensorReading.from_payload(reading.to_payload()) == reading
    telemetry = Telemetry(SITE, tuple((e, c, tuple(setting), tuple(sensors)) for e, c, _, _ in rows))
    assert Telemetry.from_payload(telemetry.to_payload(), site=SITE) == telemetry
    status = Status(SITE, online, samples=cycle, at=at, storage=storage)
    assert Status.from_payload(status.to_payload(), site=SITE) == status


def test_out_of_range_is_known_only_from_agents_that_say() -> None:
    """Rows from an agent before the flag stay 4 or 6 values (not known: stored NULL); an
    agent that checks sends the key even when nothing is flagged, and each row gets its tuple."""
    old = {"site": SITE, "rows": [ROW, [*ROW[:2], 101.0, 90.0, 80.0, 99.0]]}
    assert [len(r) for r in Predictions.from_payload(json.dumps(old).encode(), site=SITE).rows] == [4, 6]
    checked = Predictions.from_payload(json.dumps({**old, "out_of_range": {}}).encode(), site=SITE)
    assert checked.rows == (("e1", 4, 100.0, 90.0, None, None, ()), ("e1", 4, 101.0, 90.0, 80.0, 99.0, ()))
    body = json.loads(Predictions(SITE, (("e1", 4, 100.0, 90.0, None, None, ()),)).to_payload())
    assert body == {"site": SITE, "rows": [ROW], "truth": [], "out_of_range": {"local": [], "federated": []}}
    assert "out_of_range" not in json.loads(Predictions(SITE, (tuple(ROW),)).to_payload())  # the old wire, byte for byte
    flagged = json.loads(SITE_MESSAGES[-1].to_payload())
    assert flagged["rows"][1] == ["e2", 9, 3.0, 88.0] and flagged["out_of_range"] == {"local": [1], "federated": [0, 1]}


def test_a_full_flagged_batch_fits_one_message() -> None:
    """The worst batch an agent sends (MAX_PREDICTION_ROWS rows and truths, longest engine ids,
    intervals, both models flagged on every row) stays under MAX_JSON_BYTES with room for the
    signature wrapper (which escapes each quote of the body)."""
    ids = [f"{i:06d}".rjust(MAX_ID_LEN, "e") for i in range(MAX_PREDICTION_ROWS)]
    rows = tuple((e, 99_999, 123.457, 121.125, 100.125, 140.875, ("local", "federated")) for e in ids)
    payload = Predictions(SITE, rows, tuple((e, 99_999, 1.0) for e in ids)).to_payload()
    assert len(payload) + payload.count(b'"') + 1024 < MAX_JSON_BYTES
    assert Predictions.from_payload(payload, site=SITE).rows == rows


# --- nothing but MessageError, whatever arrives ---------------------------------------------


def _parse_all(payload: bytes) -> None:
    """Feed one payload to every parser; each must parse it or raise MessageError with a Refusal."""
    for parse in (RoundAnnouncement.from_payload, StatsRequest.from_payload, SensorReading.from_payload, EngineEvent.from_payload):
        try:
            parse(payload)
        except MessageError as exc:
            assert isinstance(exc.reason, Refusal)
    for cls in (StatsReply, Status, Metrics, Predictions, Telemetry):
        try:
            cls.from_payload(payload, site=SITE)
        except MessageError as exc:
            assert isinstance(exc.reason, Refusal)


@FAST
@given(st.binary(max_size=512))
def test_arbitrary_bytes_raise_only_message_error(payload: bytes) -> None:
    _parse_all(payload)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | finite | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=6),
    max_leaves=30,
)
KEYS = ["site", "round", "done", "spec", "announce_id", "model_version", "deadline", "settings", "min_samples", "strategy",
        "request_id", "window", "samples", "engines", "stats", "online", "agent_version", "profile", "at", "local",
        "federated", "counters", "rows", "truth", "cycle", "settings", "sensors", "event", "rul"]


@FAST
@given(st.dictionaries(st.sampled_from(KEYS), json_values, max_size=10), st.booleans())
def test_arbitrary_json_objects_raise_only_message_error(body: dict, own_site: bool) -> None:
    """Objects with the protocol's keys and hostile values: deeper than random bytes reach."""
    if own_site:
        body["site"] = SITE
    _parse_all(json.dumps(body).encode())


# --- hostile payloads, each refused for its reason ---------------------------------------------


def _refusal(parse, payload: bytes | dict, **kw: object) -> Refusal:
    raw = json.dumps(payload).encode() if isinstance(payload, dict) else payload
    with pytest.raises(MessageError) as info:
        parse(raw, **kw)
    assert isinstance(info.value.reason, Refusal)
    return info.value.reason


def _good_reading(**change: object) -> dict:
    return {**json.loads(_reading().to_payload()), **change}


@pytest.mark.parametrize(("payload", "reason"), [
    (_good_reading(sensors=list(range(20))), Refusal.WRONG_FIELDS),
    (_good_reading(sensors=["abc"] + list(range(20))), Refusal.NOT_A_NUMBER),
    (_good_reading(settings=[0, True, 100]), Refusal.NOT_A_NUMBER),
    (b'{"cycle": 2, "settings": [0, 0, 100], "sensors": [NaN' + b", 1" * 20 + b"]}", Refusal.NOT_FINITE),
    (_good_reading(extra=1), Refusal.WRONG_FIELDS),
    ({"cycle": 2, "settings": [0, 0, 100]}, Refusal.WRONG_FIELDS),
    (_good_reading(cycle=-1), Refusal.BAD_CYCLE),
    (_good_reading(cycle="7"), Refusal.BAD_CYCLE),
    (_good_reading(sensors=list(range(10**4))), Refusal.TOO_LARGE),
    (b"cycle=2 sensors=1,2,3", Refusal.NOT_JSON),
    (b"[1, 2]", Refusal.NOT_JSON),
])
def test_hostile_readings(payload: bytes | dict, reason: Refusal) -> None:
    assert _refusal(SensorReading.from_payload, payload) == reason


def test_plant_payload_limit_is_checked_before_parsing() -> None:
    assert _refusal(SensorReading.from_payload, b"[" * (MAX_PLANT_BYTES + 1)) == Refusal.TOO_LARGE


@pytest.mark.parametrize(("payload", "reason"), [
    ({"event": "explode", "cycle": 3}, Refusal.BAD_EVENT),
    ({"event": "truth", "cycle": 3, "rul": -1}, Refusal.BAD_EVENT),
    ({"event": "truth", "cycle": 3}, Refusal.BAD_EVENT),
    (b'{"event": "truth", "cycle": 3, "rul": NaN}', Refusal.BAD_EVENT),
    ({"event": "failure", "cycle": 2.5}, Refusal.BAD_CYCLE),
    (b"\xff\xfe", Refusal.NOT_JSON),
])
def test_hostile_events(payload: bytes | dict, reason: Refusal) -> None:
    assert _refusal(EngineEvent.from_payload, payload) == reason


def _site_body(message: object, **change: object) -> dict:
    return {**json.loads(message.to_payload()), **change}


ROW = ["e1", 4, 100.0, 90.0]
SENSOR_ROW = ["e1", 4, [0.0, 0.0, 100.0], [1.0] * N_SENSORS]


@pytest.mark.parametrize(("cls", "payload", "reason"), [
    # a site speaking for another, or naming none
    (Status, _site_body(SITE_MESSAGES[2], site="site2"), Refusal.WRONG_SENDER),
    (Metrics, _site_body(SITE_MESSAGES[4], site="site2"), Refusal.WRONG_SENDER),
    (Predictions, _site_body(SITE_MESSAGES[6], site="site2"), Refusal.WRONG_SENDER),
    (Telemetry, _site_body(SITE_MESSAGES[7], site=None), Refusal.WRONG_SENDER),
    (StatsReply, _site_body(SITE_MESSAGES[0], site="site2"), Refusal.WRONG_SENDER),
    (Status, {"online": True}, Refusal.WRONG_FIELDS),
    # missing fields, wrong types, ranges
    (Status, {"site": SITE}, Refusal.WRONG_FIELDS),
    (Status, {"site": SITE, "online": "yes"}, Refusal.WRONG_FIELDS),
    (Status, {"site": SITE, "online": True, "samples": -5}, Refusal.OUT_OF_RANGE),
    (Status, {"site": SITE, "online": True, "samples": 2**60}, Refusal.OUT_OF_RANGE),
    (Status, {"site": SITE, "online": True, "at": "now"}, Refusal.NOT_A_NUMBER),
    (Status, {"site": SITE, "online": True, "storage": "melted"}, Refusal.WRONG_FIELDS),
    (Status, {"site": SITE, "online": True, "storage": 3}, Refusal.WRONG_FIELDS),
    (Status, {"site": SITE, "online": True, "agent_version": "x" * 1000}, Refusal.WRONG_FIELDS),
    (Metrics, _site_body(SITE_MESSAGES[4], model_version=-2), Refusal.OUT_OF_RANGE),
    (Metrics, _site_body(SITE_MESSAGES[4], local={"rmse": -1.0, "score": 0, "engines": 1}), Refusal.OUT_OF_RANGE),
    (Metrics, _site_body(SITE_MESSAGES[4], federated=[1, 2]), Refusal.WRONG_FIELDS),
    (Metrics, _site_body(SITE_MESSAGES[4], counters={f"c{i}": 1 for i in range(MAX_COUNTERS + 1)}), Refusal.WRONG_FIELDS),
    (Metrics, {"site": SITE, "model_version": 1}, Refusal.WRONG_FIELDS),
    # rows: shape, ids, numbers, bounds
    (Predictions, {"site": SITE, "rows": [ROW[:3]]}, Refusal.WRONG_FIELDS),
    (Predictions, {"site": SITE, "rows": "e1"}, Refusal.WRONG_FIELDS),
    (Predictions, {"site": SITE, "rows": [["e/1", 4, 1.0, 2.0]]}, Refusal.BAD_ID),
    (Predictions, {"site": SITE, "rows": [["e1", 4, "far", 2.0]]}, Refusal.NOT_A_NUMBER),
    (Predictions, {"site": SITE, "rows": [["e1", -4, 1.0, 2.0]]}, Refusal.BAD_CYCLE),
    (Predictions, {"site": SITE, "truth": [["e1", 4, -3.0]]}, Refusal.OUT_OF_RANGE),
    (Predictions, {"site": SITE, "rows": [ROW] * (MAX_PREDICTION_ROWS + 1)}, Refusal.TOO_MANY_ROWS),
    (Predictions, {"site": SITE, "truth": [["e1", 4, 1.0]] * (MAX_PREDICTION_ROWS + 1)}, Refusal.TOO_MANY_ROWS),
    (Predictions, b'{"site": "site1", "rows": [["e1", 4, NaN, null]]}', Refusal.BAD_JSON),
    (Telemetry, {"site": SITE, "rows": [["e1", 4, [0.0, 0.0, 100.0], [1.0] * 20]]}, Refusal.WRONG_FIELDS),
    (Telemetry, {"site": SITE, "rows": [SENSOR_ROW] * (MAX_TELEMETRY_ROWS + 1)}, Refusal.TOO_MANY_ROWS),
    (Telemetry, {"site": SITE, "rows": [["e1", 4, [0.0, 0.0, 1e309], [1.0] * N_SENSORS]]}, Refusal.BAD_JSON),
    # statistics: every number finite, every list bounded, sizes as the spec says
    (StatsReply, _site_body(SITE_MESSAGES[0], stats={"count": "nan"}), Refusal.BAD_STATS),
    (StatsReply, _site_body(SITE_MESSAGES[0], stats={**json.loads(SITE_MESSAGES[0].to_payload())["stats"], "sum": [1.0] * 5}), Refusal.BAD_STATS),
    (StatsReply, _site_body(SITE_MESSAGES[0], stats={**json.loads(SITE_MESSAGES[0].to_payload())["stats"], "sumsq": [0.0] * 10**5}), Refusal.BAD_STATS),
    (StatsReply, _site_body(SITE_MESSAGES[0], stats={**json.loads(SITE_MESSAGES[0].to_payload())["stats"], "count": -1}), Refusal.BAD_STATS),
    (StatsReply, _site_body(SITE_MESSAGES[0], stats=[1, 2]), Refusal.BAD_STATS),
    (StatsReply, _site_body(SITE_MESSAGES[0], samples=1.5), Refusal.WRONG_FIELDS),
    # residual histograms: whole positive counts in bins of the layout (tests/test_conformal.py has every case)
    (StatsReply, _site_body(SITE_MESSAGES[0], residuals={"layout": Layout.for_cap().to_dict(), "counts": [[[3, -2]], [], []]}), Refusal.BAD_STATS),
    (StatsReply, _site_body(SITE_MESSAGES[0], residuals={"layout": Layout.for_cap().to_dict(), "counts": [[[9999, 1]], [], []]}), Refusal.BAD_STATS),
    (StatsReply, _site_body(SITE_MESSAGES[0], residuals=[1, 2]), Refusal.BAD_STATS),
    # interval bounds: lower <= upper, the other way round is refused
    (Predictions, {"site": SITE, "rows": [[*ROW, 95.0, 80.0]]}, Refusal.OUT_OF_RANGE),
    (Predictions, {"site": SITE, "rows": [[*ROW, None, 80.0]]}, Refusal.OUT_OF_RANGE),
    (Predictions, {"site": SITE, "rows": [[*ROW, -5.0, 80.0]]}, Refusal.OUT_OF_RANGE),
    (Predictions, {"site": SITE, "rows": [[*ROW, "low", 80.0]]}, Refusal.NOT_A_NUMBER),
    # out_of_range: row indices of this batch per model, each a row that model predicted
    (Predictions, {"site": SITE, "rows": [ROW], "out_of_range": [[0, "local"]]}, Refusal.WRONG_FIELDS),
    (Predictions, {"site": SITE, "rows": [ROW], "out_of_range": {"local": [0, 0]}}, Refusal.TOO_MANY_ROWS),
    (Predictions, {"site": SITE, "rows": [ROW], "out_of_range": {"local": 0}}, Refusal.WRONG_FIELDS),
    (Predictions, {"site": SITE, "rows": [ROW], "out_of_range": {"both": [0]}}, Refusal.WRONG_FIELDS),
    (Predictions, {"site": SITE, "rows": [ROW], "out_of_range": {"local": [1]}}, Refusal.OUT_OF_RANGE),  # no such row
    (Predictions, {"site": SITE, "rows": [ROW], "out_of_range": {"local": [-1]}}, Refusal.OUT_OF_RANGE),
    (Predictions, {"site": SITE, "rows": [ROW], "out_of_range": {"local": ["0"]}}, Refusal.WRONG_FIELDS),
    (Predictions, {"site": SITE, "rows": [ROW], "out_of_range": {"local": [0.0]}}, Refusal.WRONG_FIELDS),
    (Predictions, {"site": SITE, "rows": [ROW], "out_of_range": {"local": [True]}}, Refusal.WRONG_FIELDS),
    (Predictions, {"site": SITE, "rows": [["e1", 4, None, 90.0]], "out_of_range": {"local": [0]}}, Refusal.WRONG_FIELDS),  # not predicted
    (Predictions, {"site": SITE, "out_of_range": {"federated": [0]}}, Refusal.TOO_MANY_ROWS),  # no rows at all
    # not JSON at all, or too big: the envelope's reasons
    (Status, b"online", Refusal.BAD_JSON),
    (Metrics, b"[]", Refusal.BAD_JSON),
    (Telemetry, b'{"site": "site1", "rows": [], "pad": "' + b"x" * (1 << 20) + b'"}', Refusal.TOO_LARGE),
], ids=lambda v: v.__name__ if isinstance(v, type) else None)
def test_hostile_site_messages(cls: type, payload: bytes | dict, reason: Refusal) -> None:
    assert _refusal(cls.from_payload, payload, site=SITE) == reason


def _round_body(**change: object) -> dict:
    return {**json.loads(_open_round().to_payload()), **change}


@pytest.mark.parametrize(("cls", "payload", "reason"), [
    (RoundAnnouncement, _round_body(settings={**ModelSettings().to_dict(), "turbo": True}), Refusal.BAD_ROUND),
    (RoundAnnouncement, _round_body(settings={**ModelSettings().to_dict(), "kind": "forest"}), Refusal.BAD_ROUND),
    (RoundAnnouncement, _round_body(settings=None), Refusal.BAD_ROUND),
    (RoundAnnouncement, _round_body(settings={**ModelSettings().to_dict(), "hidden": [10**9]}), Refusal.BAD_ROUND),
    (RoundAnnouncement, _round_body(settings={**ModelSettings().to_dict(), "hidden": [8] * 1000}), Refusal.BAD_ROUND),
    (RoundAnnouncement, _round_body(settings={**ModelSettings().to_dict(), "window": 10**7}), Refusal.BAD_ROUND),
    (RoundAnnouncement, _round_body(spec={**_spec().to_dict(), "sensors": [1, 99]}), Refusal.BAD_ROUND),
    (RoundAnnouncement, _round_body(spec={**_spec().to_dict(), "scale": [0.0] * _spec().n_features}), Refusal.BAD_ROUND),
    (RoundAnnouncement, _round_body(spec={**_spec().to_dict(), "offset": [1.0]}), Refusal.BAD_ROUND),
    (RoundAnnouncement, {k: v for k, v in _round_body().items() if k != "announce_id"}, Refusal.WRONG_FIELDS),
    (RoundAnnouncement, _round_body(deadline="soon"), Refusal.NOT_A_NUMBER),
    (RoundAnnouncement, _round_body(round=-1), Refusal.OUT_OF_RANGE),
    (RoundAnnouncement, _round_body(done="yes"), Refusal.WRONG_FIELDS),
    (StatsRequest, {"request_id": "r1", "min_samples": 5, "window": 0}, Refusal.BAD_STATS_REQUEST),
    (StatsRequest, {"request_id": "r1", "min_samples": 5, "window": "30"}, Refusal.BAD_STATS_REQUEST),
    (StatsRequest, {"request_id": "r1", "min_samples": 5, "window": 10**7}, Refusal.BAD_STATS_REQUEST),
    (StatsRequest, {"min_samples": 5, "window": 30}, Refusal.BAD_STATS_REQUEST),
    (StatsRequest, b"\x00", Refusal.BAD_JSON),
    (StatsRequest, {"request_id": "r1", "min_samples": 5, "window": 30, "phase": "residuals", "model_version": 3}, Refusal.BAD_STATS_REQUEST),
    (StatsRequest, {"request_id": "r1", "min_samples": 5, "window": 30, "phase": "residuals", "model_version": 3,
                    "layout": {**Layout.for_cap().to_dict(), "bins": 10**7}}, Refusal.BAD_STATS_REQUEST),
    (RoundAnnouncement, _round_body(intervals={**_TABLE.to_dict(), "coverage": 1.5}), Refusal.BAD_ROUND),
    (RoundAnnouncement, _round_body(intervals={**_TABLE.to_dict(), "lower": [1.0, 2.0, 3.0], "upper": [0.0, 0.0, 0.0]}), Refusal.BAD_ROUND),
    (RoundAnnouncement, _round_body(intervals={**_TABLE.to_dict(), "lower": [0.0] * 100}), Refusal.BAD_ROUND),
    (RoundAnnouncement, _round_body(intervals="wide"), Refusal.BAD_ROUND),
], ids=lambda v: v.__name__ if isinstance(v, type) else None)
def test_hostile_aggregator_messages(cls: type, payload: bytes | dict, reason: Refusal) -> None:
    assert _refusal(cls.from_payload, payload) == reason


def test_errors_name_the_message_and_field() -> None:
    with pytest.raises(MessageError, match=r"predictions from site1 rows\[1\] must be a list of 4 values"):
        Predictions.from_payload(json.dumps({"site": SITE, "rows": [ROW, ROW[:2]]}).encode(), site=SITE)
    with pytest.raises(MessageError, match="status from site1 names site 'site2' on 'site1'"):
        Status.from_payload(Status("site2", True).to_payload(), site=SITE)


def test_refusal_values_keep_their_spelling() -> None:
    """Stores and dashboards hold these strings; a member's value never changes."""
    for value in ("too_large", "bad_magic", "hash_mismatch", "bad_json", "not_onnx", "mismatch", "non_finite",
                  "unknown_site", "wrong_sender", "bad_kind", "stale_round", "duplicate", "no_samples",
                  "not_json", "wrong_fields", "not_a_number", "not_finite", "bad_cycle", "bad_event", "bad_stats",
                  "bad_stats_request", "unknown_engine", "cycle_backwards", "bad_global"):
        assert Refusal(value).value == value
    assert f"{Refusal.WRONG_SENDER}" == "wrong_sender" and str(Refusal.BAD_JSON) == "bad_json"


# --- the services route by table and count refusals ----------------------------------------


def test_aggregator_dispatches_by_table_and_counts_refusals(tmp_path: Path) -> None:
    from turbofed.aggregator.service import Aggregator

    aggregator = Aggregator(FleetConfig(sites=(SITE,), store=str(tmp_path / "results.sqlite"), registry=str(tmp_path / "registry"), insecure_unsigned=True))
    topics = aggregator.topics
    try:
        assert set(aggregator._handlers) == {"update", "stats", "status", "metrics", "predictions", "telemetry", "evaluation"}
        sent = [
            (topics.status(SITE), Status(SITE, True, samples=10, at=5.0).to_payload()),  # accepted
            (topics.status(SITE), Status("site2", True).to_payload()),  # another site's name
            (topics.predictions(SITE), b'{"site": "site1", "rows": [["e1", 1, "x", null]]}'),
            (topics.metrics("site9"), Metrics("site9", 1, 0).to_payload()),  # not in the fleet
            (f"{topics.root}/sites/{SITE}/gossip", b"{}"),  # a kind the protocol does not have
        ]
        del aggregator._handlers["telemetry"]  # a kind the topics know but no handler serves
        sent.append((topics.site(SITE, "telemetry"), Telemetry(SITE).to_payload()))
        for topic, payload in sent:
            aggregator.inbox.put((topic, payload))
            aggregator.pump(0)
        assert dict(aggregator.counters) == {"wrong_sender": 1, "not_a_number": 1, "unknown_site": 1, "bad_topic": 1, "unknown_kind": 1}
        assert sorted(r["reason"] for r in aggregator.store.rejections()) == ["bad_topic", "not_a_number", "unknown_kind", "unknown_site", "wrong_sender"]
        assert [(s["site"], s["online"], s["samples"]) for s in aggregator.store.site_status()] == [(SITE, True, 10)]
    finally:
        aggregator.store.close()
        aggregator.registry.close()


def test_agent_routes_by_table_and_counts_refusals(tmp_path: Path) -> None:
    from turbofed.edge.agent import EdgeAgent

    agent = EdgeAgent(SiteConfig(site=SITE, state_dir=str(tmp_path / "state"), insecure_unsigned=True), training=False)
    topics = Topics()
    agent.handle(topics.round, json.dumps(_round_body(settings={"kind": "forest"})).encode())
    agent.handle(topics.stats_request, b'{"request_id": "r1", "min_samples": 5, "window": 0}')
    agent.handle(topics.sensors(SITE, "e1"), _reading().to_payload())
    agent.handle(topics.events(SITE, "e1"), EngineEvent("failure", 3).to_payload())  # not the last cycle
    agent.handle(topics.round, RoundAnnouncement(9, _spec(), done=True).to_payload())
    agent.handle(topics.round, b"")  # a retained message being cleared: nothing to count
    assert {k: v for k, v in agent.counters.items() if k.startswith("rejected.")} == {
        "rejected.bad_round": 1, "rejected.bad_stats_request": 1, "rejected.bad_event": 1}
    assert agent.counters["readings"] == 1 and agent.fleet_spec == _spec()
    assert math.isclose(agent.engines["e1"].history()[1][0][3], 3.0)
