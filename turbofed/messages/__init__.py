"""Every JSON message of the protocol as a frozen dataclass, built and checked in one place.

The dataclasses live in `fleet` (aggregator -> sites, and the stats reply), `site` (what a
site reports) and `plant` (sensor traffic); the shared field checks in `_check`. Each
message has `to_payload() -> bytes` and a classmethod `from_payload(payload, ...)` that
parses and validates (types, ranges, bounded lists, finite numbers; for a message that
names its site, that the site is the topic's) and raises `MessageError`, whose `reason` is
a `Refusal`, for anything else. Nothing from another process is used before it passed
`from_payload`. Wire shapes (docs/protocol.md):

    tfl/v1/round                   RoundAnnouncement  {"round", "announce_id", "model_version",
                                   "deadline", "settings", "spec", "min_samples", "strategy", "dp"}
                                   or, when all rounds are done, {"round", "done": true, "spec"}
    tfl/v1/stats/request           StatsRequest       {"request_id", "min_samples", "window"}
    tfl/v1/sites/<site>/stats      StatsReply         {"request_id", "site", "samples", "engines", "stats"}
    tfl/v1/sites/<site>/status     Status             {"site", "online", "agent_version",
                                   "model_version", "samples", "profile", "at", "storage"}
    tfl/v1/sites/<site>/metrics    Metrics            {"site", "model_version", "engines",
                                   "local": {"rmse", "score", "engines"}, "federated": {...}, "counters"}
    tfl/v1/sites/<site>/evaluation ModelEvaluation    {"site", "model_version", "rmse", "rows"}
    tfl/v1/sites/<site>/predictions Predictions       {"site", "rows": [[engine, cycle, local, federated(, lower, upper)]],
                                   "truth": [[engine, cycle, rul]], "out_of_range": {model: [row index]}}
    tfl/v1/sites/<site>/telemetry  Telemetry          {"site", "rows": [[engine, cycle, [3 settings], [21 sensors]]]}
    plant/<site>/<engine>/sensors  SensorReading      {"cycle": 12, "settings": [3 numbers], "sensors": [21 numbers]}
    plant/<site>/<engine>/events   EngineEvent        {"event": "failure", "cycle": 192}
                                                      {"event": "truth", "cycle": 31, "rul": 112}

Sensor traffic comes from outside turbofed (a gateway, a replay), so its parsers are the
strictest (a reading with an unknown field is refused) and an undecodable payload is
`not_json`; site and aggregator messages ignore unknown keys (a newer sender may add one)
and an undecodable payload keeps the envelope's reason (`bad_json`, `too_large`).
"""

from __future__ import annotations

from turbofed.layout import N_SENSORS, N_SETTINGS
from turbofed.messages._check import (
    MAX_COUNTERS,
    MAX_PLANT_BYTES,
    MAX_PREDICTION_ROWS,
    MAX_STATS_VALUES,
    MAX_TELEMETRY_ROWS,
    MAX_TEXT,
    MessageError,
)
from turbofed.messages.fleet import RoundAnnouncement, StatsReply, StatsRequest
from turbofed.messages.plant import EngineEvent, SensorReading
from turbofed.messages.site import Metrics, ModelEvaluation, ModelScore, Predictions, Status, Telemetry

__all__ = [
    "MAX_COUNTERS", "MAX_PLANT_BYTES", "MAX_PREDICTION_ROWS", "MAX_STATS_VALUES", "MAX_TELEMETRY_ROWS", "MAX_TEXT",
    "N_SENSORS", "N_SETTINGS", "EngineEvent", "MessageError", "Metrics", "ModelEvaluation", "ModelScore", "Predictions",
    "RoundAnnouncement", "SensorReading", "StatsReply", "StatsRequest", "Status", "Telemetry",
]
