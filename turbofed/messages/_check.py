"""Field checks shared by every message parser: each refuses with a Refusal and names the field."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Final

from turbofed.config import MAX_LAYER_WIDTH, MAX_LAYERS, MAX_WINDOW  # noqa: F401 - re-exported: one number each
from turbofed.envelope import EnvelopeError, decode_json
from turbofed.errors import ConfigError, Refused
from turbofed.refusals import Refusal
from turbofed.topics import TopicError, validate_engine

MAX_PLANT_BYTES: Final = 16 * 1024  # one reading is ~300 bytes
MAX_PREDICTION_ROWS: Final = 2000  # per predictions message (and truth rows); the agent batches by it
MAX_TELEMETRY_ROWS: Final = 1000  # per telemetry message
MAX_COUNTERS: Final = 256  # named counters in a metrics message
MAX_STATS_VALUES: Final = 4096  # values in one list of a statistics reply or feature spec
MAX_TEXT: Final = 128  # request ids, announce ids, versions, strategy and profile names
MAX_INT: Final = 2**53 - 1  # exact in every JSON implementation


class MessageError(Refused):
    """A message's content is malformed; `reason` is the Refusal to count it under."""

    def __init__(self, message: str, reason: Refusal) -> None:
        super().__init__(message, reason)


# --- field checks: each names the message and field it refuses --------------------------


def required(body: Mapping[str, Any], key: str, what: str) -> Any:
    if key not in body:
        raise MessageError(f"{what}: missing field {key!r}", Refusal.WRONG_FIELDS)
    return body[key]


def whole(value: Any, where: str, lo: int = 0, hi: int = MAX_INT, reason: Refusal = Refusal.OUT_OF_RANGE) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MessageError(f"{where} must be a whole number, got {value!r:.40}", Refusal.WRONG_FIELDS)
    if not lo <= value <= hi:
        raise MessageError(f"{where} must be in [{lo}, {hi}], got {value}", reason)
    return value


def finite(value: Any, where: str, lo: float = -math.inf) -> float:
    """A finite real number (ints are accepted and returned as floats), at least `lo`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MessageError(f"{where} is not a number: {value!r:.40}", Refusal.NOT_A_NUMBER)
    if not math.isfinite(value):
        raise MessageError(f"{where} is not finite: {value!r}", Refusal.NOT_FINITE)
    if value < lo:
        raise MessageError(f"{where} must be at least {lo}, got {value}", Refusal.OUT_OF_RANGE)
    return float(value)


def optional(value: Any, check: Any, where: str, **kw: Any) -> Any:
    return None if value is None else check(value, where, **kw)


def flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise MessageError(f"{where} must be true or false, got {value!r:.40}", Refusal.WRONG_FIELDS)
    return value


def text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TEXT or not value.isprintable():
        raise MessageError(f"{where} must be printable text of 1 to {MAX_TEXT} characters, got {value!r:.40}", Refusal.WRONG_FIELDS)
    return value


def bounded_list(value: Any, where: str, max_len: int, reason: Refusal = Refusal.TOO_MANY_ROWS) -> list[Any]:
    if not isinstance(value, list):
        raise MessageError(f"{where} must be a list, got {type(value).__name__}", Refusal.WRONG_FIELDS)
    if len(value) > max_len:
        raise MessageError(f"{where} has {len(value)} entries, limit {max_len}", reason)
    return value


def finite_vector(value: Any, count: int, where: str) -> tuple[float, ...]:
    """Exactly `count` finite numbers (sensor and setting vectors)."""
    if not isinstance(value, list):
        raise MessageError(f"{where} must be a list of {count} numbers", Refusal.WRONG_FIELDS)
    if len(value) != count:
        raise MessageError(f"{where} has {len(value)} values, expected {count}", Refusal.WRONG_FIELDS)
    return tuple(finite(v, f"{where}[{i}]") for i, v in enumerate(value))


def row_of(value: Any, where: str, width: int) -> list[Any]:
    if not isinstance(value, list) or len(value) != width:
        raise MessageError(f"{where} must be a list of {width} values", Refusal.WRONG_FIELDS)
    return value


def engine_id(value: Any, where: str) -> str:
    try:
        return validate_engine(value)
    except TopicError as exc:
        raise MessageError(f"{where}: {exc}", Refusal.BAD_ID) from None


def cycle_no(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT:
        raise MessageError(f"{where} must be a non-negative integer, got {value!r:.40}", Refusal.BAD_CYCLE)
    return value


@contextmanager
def refused_as(reason: Refusal, what: str) -> Iterator[None]:
    """Count every defect inside a nested part (settings, spec, statistics) under one reason."""
    try:
        yield
    except MessageError as exc:
        raise MessageError(str(exc), reason) from None
    except (ConfigError, KeyError, TypeError, ValueError, OverflowError) as exc:
        raise MessageError(f"{what}: {exc}", reason) from None


def json_body(payload: bytes, what: str) -> dict[str, Any]:
    """A site or aggregator message as a dict; undecodable payloads keep the envelope's reason."""
    try:
        return decode_json(payload, what)
    except EnvelopeError as exc:
        raise MessageError(str(exc), exc.reason) from None


def plant_body(payload: bytes, what: str) -> dict[str, Any]:
    """Sensor traffic as a dict. NaN is parsed (gateways send it for a dead sensor) so it can
    be refused by name; anything undecodable is `not_json`."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise MessageError(f"{what}: payload must be bytes, got {type(payload).__name__}", Refusal.NOT_JSON)
    raw = bytes(payload)
    if len(raw) > MAX_PLANT_BYTES:
        raise MessageError(f"{what}: payload is {len(raw)} bytes, limit {MAX_PLANT_BYTES}", Refusal.TOO_LARGE)
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MessageError(f"{what}: not valid UTF-8 JSON: {exc}", Refusal.NOT_JSON) from None
    if not isinstance(body, dict):
        raise MessageError(f"{what}: expected a JSON object", Refusal.NOT_JSON)
    return body


def site_of(body: Mapping[str, Any], site: str, what: str) -> str:
    """The message's `site` field, which must be the topic's site (one site cannot speak for another)."""
    named = required(body, "site", what)
    if named != site:
        raise MessageError(f"{what} names site {named!r:.60} on {site!r}'s topic", Refusal.WRONG_SENDER)
    return site
