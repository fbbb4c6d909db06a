"""JSON payloads of the non-weights messages, built and checked in one place.

Sensor traffic is the one stream that comes from outside turbofed (a gateway, a replay),
so its parser is strict and its errors say what was wrong; the agent counts and skips a
bad reading and goes on. Payload shapes:

    plant/<site>/<engine>/sensors  {"cycle": 12, "settings": [3 numbers], "sensors": [21 numbers]}
    plant/<site>/<engine>/events   {"event": "failure", "cycle": 192}
                                   {"event": "truth", "cycle": 31, "rul": 112}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from turbofed.envelope import decode_json, encode_json
from turbofed.errors import TurbofedError

N_SETTINGS = 3
N_SENSORS = 21


class MessageError(TurbofedError):
    """A message's content is malformed; `reason` is a short code to count by."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class SensorReading:
    cycle: int
    settings: tuple[float, ...]
    sensors: tuple[float, ...]

    def to_payload(self) -> bytes:
        return encode_json({"cycle": self.cycle, "settings": list(self.settings), "sensors": list(self.sensors)})


@dataclass(frozen=True)
class EngineEvent:
    """`failure` at the engine's last cycle, or `truth`: its true RUL at `cycle` revealed."""

    event: str
    cycle: int
    rul: float | None = None

    def to_payload(self) -> bytes:
        body: dict[str, Any] = {"event": self.event, "cycle": self.cycle}
        if self.rul is not None:
            body["rul"] = self.rul
        return encode_json(body)


def _numbers(value: Any, count: int, field: str) -> tuple[float, ...]:
    if not isinstance(value, list):
        raise MessageError(f"{field} must be a list of {count} numbers", "wrong_fields")
    if len(value) != count:
        raise MessageError(f"{field} has {len(value)} values, expected {count}", "wrong_fields")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise MessageError(f"{field}[{i}] is not a number: {v!r}", "not_a_number")
        if not math.isfinite(v):
            raise MessageError(f"{field}[{i}] is not finite: {v!r}", "not_finite")
        out.append(float(v))
    return tuple(out)


def _cycle(body: dict[str, Any]) -> int:
    cycle = body.get("cycle")
    if isinstance(cycle, bool) or not isinstance(cycle, int) or cycle < 0:
        raise MessageError(f"cycle must be a non-negative integer, got {cycle!r}", "bad_cycle")
    return cycle


def _body(payload: bytes, what: str) -> dict[str, Any]:
    try:
        return decode_json(payload, what)
    except TurbofedError as exc:
        raise MessageError(str(exc), "not_json") from None


def parse_reading(payload: bytes) -> SensorReading:
    """A sensor reading, or MessageError naming the field that is wrong.

    Gateways do send NaN for a dead sensor; it is parsed so it can be refused by name.
    """
    try:
        body = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MessageError(f"sensor reading: not valid UTF-8 JSON: {exc}", "not_json") from None
    if not isinstance(body, dict):
        raise MessageError("sensor reading: expected a JSON object", "not_json")
    extra = sorted(set(body) - {"cycle", "settings", "sensors"})
    if extra:
        raise MessageError(f"unexpected field(s) {', '.join(extra)}", "wrong_fields")
    return SensorReading(_cycle(body), _numbers(body.get("settings"), N_SETTINGS, "settings"), _numbers(body.get("sensors"), N_SENSORS, "sensors"))


def parse_event(payload: bytes) -> EngineEvent:
    """A failure or truth event, or MessageError."""
    body = _body(payload, "engine event")
    kind = body.get("event")
    if kind == "failure":
        return EngineEvent("failure", _cycle(body))
    if kind == "truth":
        rul = body.get("rul")
        if isinstance(rul, bool) or not isinstance(rul, (int, float)) or not math.isfinite(rul) or rul < 0:
            raise MessageError(f"truth event needs a non-negative rul, got {rul!r}", "bad_event")
        return EngineEvent("truth", _cycle(body), float(rul))
    raise MessageError(f"event must be 'failure' or 'truth', got {kind!r}", "bad_event")
