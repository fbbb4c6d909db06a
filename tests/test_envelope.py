"""Envelope round trip, one test per decode reason, overhead bound; topic names."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest

from turbofed import envelope as env
from turbofed.errors import TurbofedError
from turbofed.refusals import Refusal
from turbofed.topics import TopicError, Topics, validate_site

BODY = np.arange(1000, dtype=np.float32).tobytes()
FIELDS = dict(kind="update", site="site-01", round=3, model_version=2, samples=1234)


def make(body: bytes = BODY, **overrides: object) -> bytes:
    return env.encode(**{**FIELDS, **overrides}, body=body)  # type: ignore[arg-type]


def with_header(header: dict | bytes, body: bytes = BODY, version: int = env.VERSION) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack(">3sBI", env.MAGIC, version, len(raw)) + raw + body


def good_header(body: bytes = BODY) -> dict:
    return {**FIELDS, "sha256": hashlib.sha256(body).hexdigest(), "body_len": len(body), "sig": None}


def test_round_trip() -> None:
    e = env.decode(make())
    assert (e.kind, e.site, e.round, e.model_version, e.samples) == ("update", "site-01", 3, 2, 1234)
    assert e.body == BODY and e.body_len == len(BODY) and e.sig is None and e.version == env.VERSION
    assert e.sha256 == hashlib.sha256(BODY).hexdigest()
    assert e.header()["round"] == 3 and "body" not in e.header()


def test_round_trip_global_with_sig_and_memoryview() -> None:
    payload = make(kind="global", site="aggregator", sig="c2lnbmF0dXJl")
    e = env.decode(memoryview(bytearray(payload)))
    assert e.kind == "global" and e.sig == "c2lnbmF0dXJl" and e.body == BODY


def test_empty_body_round_trips() -> None:
    assert env.decode(make(body=b"")).body == b""


def test_skip_has_an_empty_body() -> None:
    e = env.decode(make(kind="skip", body=b"", samples=3))
    assert e.kind == "skip" and e.body == b"" and e.samples == 3
    with pytest.raises(env.BadHeaderError):
        make(kind="skip")
    assert _reason(with_header({**good_header(), "kind": "skip"})) == Refusal.BAD_HEADER


def test_overhead_bound() -> None:
    body = np.random.default_rng(0).standard_normal(50_000).astype(np.float32).tobytes()  # 200 KB
    payload = make(body=body, site="s" * 64, round=2**31, model_version=2**31, samples=2**40)
    assert len(payload) - len(body) < 400
    assert len(payload) <= 1.05 * len(body) + 2048


def _reason(payload: bytes, **kw: object) -> Refusal:
    with pytest.raises(env.EnvelopeError) as info:
        env.decode(payload, **kw)  # type: ignore[arg-type]
    exc = info.value
    assert isinstance(exc, TurbofedError)
    assert isinstance(exc.reason, Refusal)
    assert exc.reason.value in str(exc)  # the message carries the code, e.g. "hash_mismatch: ..."
    return exc.reason


def test_too_large() -> None:
    payload = make()
    assert _reason(payload, max_bytes=len(payload) - 1) == Refusal.TOO_LARGE
    assert env.decode(payload, max_bytes=len(payload)).body == BODY
    with pytest.raises(env.TooLargeError):
        make(body=b"\0" * env.MAX_PAYLOAD_BYTES)


@pytest.mark.parametrize("payload", [b"", b"TF", b"XYZ\x01" + b"\0" * 100, b"\x89PNG\r\n", "TFW"])
def test_bad_magic(payload: bytes) -> None:
    assert _reason(payload) == Refusal.BAD_MAGIC  # type: ignore[arg-type]


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unknown_version(version: int) -> None:
    payload = bytearray(make())
    payload[3] = version
    assert _reason(bytes(payload)) == Refusal.UNKNOWN_VERSION


def test_truncated() -> None:
    payload = make()
    assert _reason(payload[:6]) == Refusal.TRUNCATED
    header_len = struct.unpack(">I", payload[4:8])[0]
    assert _reason(payload[: 8 + header_len - 1]) == Refusal.TRUNCATED


@pytest.mark.parametrize(
    "header",
    [
        b"\xff\xfe not utf-8",
        b"{not json",
        b"[1, 2]",
        b'{"kind": "update", "kind": "global"}',
        b'{"round": NaN}',
        b"[" * 3000 + b"]" * 1000,
    ],
)
def test_bad_header_not_an_object(header: bytes) -> None:
    assert _reason(with_header(header)) == Refusal.BAD_HEADER


@pytest.mark.parametrize(
    "change",
    [
        {"kind": "weights"},
        {"site": ""},
        {"site": "a/b"},
        {"site": "+"},
        {"site": "#"},
        {"site": 7},
        {"round": -1},
        {"round": "3"},
        {"round": 3.0},
        {"round": True},
        {"samples": 2**60},
        {"model_version": None},
        {"sha256": "ab" * 31},
        {"sha256": "AB" * 32},
        {"sig": 123},
        {"sig": ""},
        {"body_len": -5},
    ],
)
def test_bad_header_fields(change: dict) -> None:
    assert _reason(with_header({**good_header(), **change})) == Refusal.BAD_HEADER


def test_bad_header_missing_key_and_too_long() -> None:
    header = good_header()
    del header["samples"]
    assert _reason(with_header(header)) == Refusal.BAD_HEADER
    long_header = json.dumps({**good_header(), "pad": "x" * env.MAX_HEADER_BYTES}).encode()
    assert _reason(with_header(long_header)) == Refusal.BAD_HEADER


def test_unknown_header_keys_are_ignored() -> None:
    assert env.decode(with_header({**good_header(), "future": 1})).body == BODY


def test_size_mismatch() -> None:
    payload = make()
    assert _reason(payload + b"\0") == Refusal.SIZE_MISMATCH
    assert _reason(payload[:-1]) == Refusal.SIZE_MISMATCH


def test_hash_mismatch() -> None:
    payload = bytearray(make())
    payload[-1] ^= 0x01
    assert _reason(bytes(payload)) == Refusal.HASH_MISMATCH
    assert isinstance(pytest.raises(env.HashMismatchError, env.decode, bytes(payload)).value, env.EnvelopeError)


def test_encode_validates_fields() -> None:
    with pytest.raises(env.BadHeaderError):
        make(site="a/b")
    with pytest.raises(env.BadHeaderError):
        make(round=-1)
    with pytest.raises(env.BadHeaderError):
        make(kind="model")


# --- JSON messages -------------------------------------------------------------


def test_json_round_trip() -> None:
    msg = {"round": 4, "deadline": 12.5, "site": "ü-site", "settings": {"epochs": 2}}
    assert env.decode_json(env.encode_json(msg), "round announcement") == msg


@pytest.mark.parametrize("payload", [b"\xff", b"{", b"[1]", b'"x"', b'{"a": NaN}', b'{"a":1,"a":2}', "{}"])
def test_decode_json_rejects(payload: bytes) -> None:
    with pytest.raises(env.BadJsonError, match="status message"):
        env.decode_json(payload, "status message")  # type: ignore[arg-type]


def test_json_limits() -> None:
    with pytest.raises(env.TooLargeError):
        env.decode_json(b"{}" + b" " * 100, "metrics", max_bytes=10)
    with pytest.raises(env.BadJsonError):
        env.encode_json({"rmse": float("nan")})
    with pytest.raises(env.BadJsonError):
        env.encode_json({"x": object()})


# --- topics --------------------------------------------------------------------


def test_topic_names() -> None:
    t = Topics()
    assert t.round == "tfl/v1/round" and t.global_model == "tfl/v1/global"
    assert t.stats_request == "tfl/v1/stats/request"
    assert t.update("s1") == "tfl/v1/sites/s1/update"
    assert t.stats("s1") == "tfl/v1/sites/s1/stats"
    assert t.status("s1") == "tfl/v1/sites/s1/status"
    assert t.all_sites("metrics") == "tfl/v1/sites/+/metrics"
    assert t.sensors("s1", 7) == "plant/s1/7/sensors"
    assert t.plant_filter("s1", "events") == "plant/s1/+/events"
    assert Topics(root="acme/tfl/v2").predictions("x") == "acme/tfl/v2/sites/x/predictions"


def test_topic_parsing() -> None:
    t = Topics()
    assert t.parse_site("tfl/v1/sites/s1/update") == ("s1", "update")
    site, engine, kind = t.parse_plant("plant/s1/42/sensors")
    assert (site, engine, kind) == ("s1", "42", "sensors")
    for bad in ["tfl/v1/sites/s1", "tfl/v1/sites/s1/update/x", "tfl/v1/sites//update",
                "tfl/v1/sites/s1/weights", "tfl/v2/sites/s1/update", "tfl/v1/round"]:
        with pytest.raises(TopicError):
            t.parse_site(bad)
    for bad in ["plant/s1/sensors", "plant/s1/1/2/sensors", "plant/s1/1/noise", "other/s1/1/sensors"]:
        with pytest.raises(TopicError):
            t.parse_plant(bad)


@pytest.mark.parametrize("site", ["", "a/b", "a+", "#", "$SYS", " a", "a\x00", 5, None, "x" * 200])
def test_site_validation(site: object) -> None:
    with pytest.raises(TopicError):
        validate_site(site)
    with pytest.raises(TopicError):
        Topics().update(site)  # type: ignore[arg-type]


@pytest.mark.parametrize("root", ["", "/tfl", "tfl/", "tfl//v1", "tfl/+", "tfl/#"])
def test_bad_root(root: str) -> None:
    with pytest.raises(TopicError):
        Topics(root=root)
