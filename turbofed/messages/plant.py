"""Plant traffic: sensor readings and engine events, from a gateway or a replay."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from turbofed.envelope import encode_json
from turbofed.layout import N_SENSORS, N_SETTINGS
from turbofed.messages._check import (
    MessageError,
    cycle_no,
    finite_vector,
    plant_body,
)
from turbofed.refusals import Refusal


@dataclass(frozen=True)
class SensorReading:
    """One engine cycle: operating settings and sensor values."""

    cycle: int
    settings: tuple[float, ...]
    sensors: tuple[float, ...]

    def to_payload(self) -> bytes:
        return encode_json({"cycle": self.cycle, "settings": list(self.settings), "sensors": list(self.sensors)})

    @classmethod
    def from_payload(cls, payload: bytes) -> "SensorReading":
        """A sensor reading, or MessageError naming the field that is wrong (unknown fields too)."""
        body = plant_body(payload, "sensor reading")
        extra = sorted(set(body) - {"cycle", "settings", "sensors"})
        if extra:
            raise MessageError(f"unexpected field(s) {', '.join(extra)[:200]}", Refusal.WRONG_FIELDS)
        return cls(cycle_no(body.get("cycle"), "cycle"), finite_vector(body.get("settings"), N_SETTINGS, "settings"), finite_vector(body.get("sensors"), N_SENSORS, "sensors"))


@dataclass(frozen=True)
class EngineEvent:
    """`failure` at the engine's last cycle, or `truth`: its true RUL at `cycle` revealed."""

    event: Literal["failure", "truth"]
    cycle: int
    rul: float | None = None

    def to_payload(self) -> bytes:
        body: dict[str, Any] = {"event": self.event, "cycle": self.cycle}
        if self.rul is not None:
            body["rul"] = self.rul
        return encode_json(body)

    @classmethod
    def from_payload(cls, payload: bytes) -> "EngineEvent":
        """A failure or truth event, or MessageError."""
        body = plant_body(payload, "engine event")
        kind = body.get("event")
        if kind == "failure":
            return cls("failure", cycle_no(body.get("cycle"), "cycle"))
        if kind == "truth":
            rul = body.get("rul")
            if isinstance(rul, bool) or not isinstance(rul, (int, float)) or not math.isfinite(rul) or rul < 0:
                raise MessageError(f"truth event needs a non-negative rul, got {rul!r:.40}", Refusal.BAD_EVENT)
            return cls("truth", cycle_no(body.get("cycle"), "cycle"), float(rul))
        raise MessageError(f"event must be 'failure' or 'truth', got {kind!r:.40}", Refusal.BAD_EVENT)
