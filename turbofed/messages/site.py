"""What a site reports: status, metrics, predictions and (when shared) raw telemetry."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from turbofed.envelope import encode_json
from turbofed.layout import N_SENSORS, N_SETTINGS
from turbofed.messages._check import (
    MAX_COUNTERS,
    MAX_PREDICTION_ROWS,
    MAX_TELEMETRY_ROWS,
    MessageError,
    bounded_list,
    cycle_no,
    engine_id,
    finite,
    finite_vector,
    flag,
    json_body,
    optional,
    required,
    row_of,
    site_of,
    text,
    whole,
)
from turbofed.refusals import Refusal

STORAGE_STATES = ("ok", "full", "read-only", "error")  # Status.storage: can the agent save its state?


def storage_state(value: object, where: str) -> str:
    return one_of(value, STORAGE_STATES, where)


def one_of(value: object, allowed: tuple[str, ...], where: str) -> str:
    if value not in allowed:
        raise MessageError(f"{where} must be one of {', '.join(allowed)}, got {value!r:.40}", Refusal.WRONG_FIELDS)
    return str(value)


@dataclass(frozen=True)
class Status:
    """A site is online or offline (its last will carries only site and online). `storage`
    (optional; absent from older agents) says whether its state folder still takes saves:
    "full" or "read-only" means it serves from memory and keeps its last saved state.
    `held_out` (optional): labelled rows of the engines it holds out of training
    (SiteConfig.holdout_share), not in `samples`."""

    site: str
    online: bool
    agent_version: str | None = None
    model_version: int | None = None
    samples: int | None = None
    profile: str | None = None
    at: float | None = None
    storage: str | None = None
    held_out: int | None = None

    def to_payload(self) -> bytes:
        body = {
            "site": self.site, "online": self.online, "agent_version": self.agent_version, "model_version": self.model_version,
            "samples": self.samples, "profile": self.profile, "at": self.at,
        }
        if self.storage is not None:  # absent, not null: the payload of an agent that does not say stays as it was
            body["storage"] = self.storage
        if self.held_out is not None:
            body["held_out"] = self.held_out
        return encode_json(body)

    @classmethod
    def from_payload(cls, payload: bytes, *, site: str) -> Status:
        what = f"status from {site}"
        body = json_body(payload, what)
        site_of(body, site, what)
        return cls(
            site,
            flag(required(body, "online", what), f"{what} online"),
            optional(body.get("agent_version"), text, f"{what} agent_version"),
            optional(body.get("model_version"), whole, f"{what} model_version"),
            optional(body.get("samples"), whole, f"{what} samples"),
            optional(body.get("profile"), text, f"{what} profile"),
            optional(body.get("at"), finite, f"{what} at", lo=0.0),
            optional(body.get("storage"), storage_state, f"{what} storage"),
            optional(body.get("held_out"), whole, f"{what} held_out"),
        )


@dataclass(frozen=True)
class ModelScore:
    """One model's error on the engines whose true RUL is known (None: not scored yet)."""

    rmse: float | None = None
    score: float | None = None
    engines: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"rmse": self.rmse, "score": self.score, "engines": self.engines}

    @classmethod
    def from_dict(cls, value: Any, where: str) -> ModelScore:
        if not isinstance(value, dict):
            raise MessageError(f"{where} must be an object, got {type(value).__name__}", Refusal.WRONG_FIELDS)
        return cls(
            optional(value.get("rmse"), finite, f"{where} rmse", lo=0.0),
            optional(value.get("score"), finite, f"{where} score"),
            whole(value.get("engines", 0), f"{where} engines"),
        )


METRICS_ON = ("test", "validation")  # which engines a Metrics report scores


@dataclass(frozen=True)
class Metrics:
    """Local vs federated error at a site; `model_version` -1 before any global model.

    `on` says which engines: "test", engines whose true RUL was revealed (scored at that
    cycle, RMSE and PHM08 score), or "validation", the site's held-out labelled engines
    (every cycle, RMSE only; edge/buffer.py), sent once per round for `round`'s global model
    so the learning curve is there while training runs (issue #17)."""

    site: str
    model_version: int
    engines: int
    local: ModelScore = ModelScore()
    federated: ModelScore = ModelScore()
    counters: Mapping[str, int] = field(default_factory=dict)
    on: str = "test"
    round: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The wire object, also what results stores record (test metrics as before `on` existed)."""
        body = {
            "site": self.site, "model_version": self.model_version, "engines": self.engines,
            "local": self.local.to_dict(), "federated": self.federated.to_dict(), "counters": dict(self.counters),
        }
        return body if self.on == "test" and self.round is None else {**body, "on": self.on, "round": self.round}

    def to_payload(self) -> bytes:
        return encode_json(self.to_dict())

    @classmethod
    def from_payload(cls, payload: bytes, *, site: str) -> Metrics:
        what = f"metrics from {site}"
        body = json_body(payload, what)
        site_of(body, site, what)
        counters = body.get("counters", {})
        if not isinstance(counters, dict) or len(counters) > MAX_COUNTERS:
            raise MessageError(f"{what} counters must be an object of at most {MAX_COUNTERS} entries", Refusal.WRONG_FIELDS)
        return cls(
            site,
            whole(required(body, "model_version", what), f"{what} model_version", -1),
            whole(required(body, "engines", what), f"{what} engines"),
            ModelScore.from_dict(required(body, "local", what), f"{what} local"),
            ModelScore.from_dict(required(body, "federated", what), f"{what} federated"),
            {text(k, f"{what} counter name"): whole(v, f"{what} counter {k!r:.40}") for k, v in counters.items()},
            one_of(body.get("on", "test"), METRICS_ON, f"{what} on"),
            optional(body.get("round"), whole, f"{what} round"),
        )


@dataclass(frozen=True)
class ModelEvaluation:
    """A site's RMSE of one global model version on its own labelled rows, sent when the
    version arrives: the aggregator's rollback check compares versions by it
    (turbofed.aggregator.rollback)."""

    site: str
    model_version: int
    rmse: float
    rows: int

    def to_payload(self) -> bytes:
        return encode_json({"site": self.site, "model_version": self.model_version, "rmse": self.rmse, "rows": self.rows})

    @classmethod
    def from_payload(cls, payload: bytes, *, site: str) -> "ModelEvaluation":
        what = f"evaluation from {site}"
        body = json_body(payload, what)
        site_of(body, site, what)
        return cls(
            site,
            whole(required(body, "model_version", what), f"{what} model_version"),
            finite(required(body, "rmse", what), f"{what} rmse", lo=0.0),
            whole(required(body, "rows", what), f"{what} rows", lo=1),
        )


# engine, cycle, local RUL, federated RUL[, lower, upper[, out_of_range]]: the federated RUL's
# conformal interval follows where the site has an interval table, then the models whose
# input lay outside their training range (turbofed.store.interface.full_row)
PredictionRow = tuple[Any, ...]
TruthRow = tuple[str, int, float]  # engine, cycle, true RUL (0 at failure)
MODELS = ("local", "federated")  # the models a site predicts with, in row order (also the stores' model names)


@dataclass(frozen=True)
class Predictions:
    """A batch of per-engine predictions and of true RULs that became known. A row is
    [engine, cycle, local, federated] or, with the federated RUL's conformal interval,
    [engine, cycle, local, federated, lower, upper] (lower <= upper, both >= 0).

    `out_of_range` (optional; absent from older agents, then unknown) is
    {"local": [row index, ...], "federated": [...]}: the rows whose feature row lay outside
    that model's training range (FeatureSpec.out_of_range); present with empty lists means
    none did. Row indices, not engine ids, keep a full batch under MAX_JSON_BYTES. Parsed, it
    becomes each row's 7th value: the tuple of models flagged (rows padded with lower = upper = None)."""

    site: str
    rows: tuple[PredictionRow, ...] = ()
    truth: tuple[TruthRow, ...] = ()

    def to_payload(self) -> bytes:
        rows = [list(r[:6]) if len(r) >= 6 and r[4] is not None else list(r[:4]) for r in self.rows]  # no interval: the 4 values as before
        body: dict[str, Any] = {"site": self.site, "rows": rows, "truth": [list(t) for t in self.truth]}
        if any(len(r) == 7 and r[6] is not None for r in self.rows):  # this agent checks: say so even when nothing is flagged
            body["out_of_range"] = {m: [i for i, r in enumerate(self.rows) if len(r) == 7 and r[6] is not None and m in r[6]]
                                    for m in MODELS}
        return encode_json(body)

    @classmethod
    def from_payload(cls, payload: bytes, *, site: str) -> Predictions:
        what = f"predictions from {site}"
        body = json_body(payload, what)
        site_of(body, site, what)
        rows = []
        for i, row in enumerate(bounded_list(body.get("rows", []), f"{what} rows", MAX_PREDICTION_ROWS)):
            where = f"{what} rows[{i}]"
            engine, cycle, local, fed, lower, upper = row_of(row, where, 6) if isinstance(row, list) and len(row) == 6 else [*row_of(row, where, 4), None, None]
            lower, upper = optional(lower, finite, f"{where} lower", lo=0.0), optional(upper, finite, f"{where} upper", lo=0.0)
            if (lower is None) != (upper is None) or (lower is not None and lower > upper):
                raise MessageError(f"{where}: lower and upper must both be given, lower <= upper, got {lower}, {upper}", Refusal.OUT_OF_RANGE)
            row = (engine_id(engine, where), cycle_no(cycle, f"{where} cycle"), optional(local, finite, f"{where} local"),
                   optional(fed, finite, f"{where} federated"))
            rows.append(row if lower is None else (*row, lower, upper))
        if "out_of_range" in body:
            rows = _flag_out_of_range(rows, body["out_of_range"], f"{what} out_of_range")
        truth = []
        for i, row in enumerate(bounded_list(body.get("truth", []), f"{what} truth", MAX_PREDICTION_ROWS)):
            engine, cycle, rul = row_of(row, f"{what} truth[{i}]", 3)
            where = f"{what} truth[{i}]"
            truth.append((engine_id(engine, where), cycle_no(cycle, f"{where} cycle"), finite(rul, f"{where} rul", 0.0)))
        return cls(site, tuple(rows), tuple(truth))


def _flag_out_of_range(rows: list[PredictionRow], flags: Any, where: str) -> list[PredictionRow]:
    """Rows with their 7th value, the models flagged: `flags` maps a model to the indices of
    rows of this batch that it predicted (bounded by the rows; each index in range)."""
    if not isinstance(flags, dict):
        raise MessageError(f"{where} must be an object of row indices per model, got {type(flags).__name__}", Refusal.WRONG_FIELDS)
    flagged: list[set[str]] = [set() for _ in rows]
    for model, indices in flags.items():
        model = one_of(model, MODELS, f"{where} key")
        column = 2 + MODELS.index(model)
        for j, index in enumerate(bounded_list(indices, f"{where} {model}", len(rows))):
            i = whole(index, f"{where} {model}[{j}]", 0, len(rows) - 1)
            if rows[i][column] is None:
                raise MessageError(f"{where} {model}[{j}]: row {i} has no {model} prediction", Refusal.WRONG_FIELDS)
            flagged[i].add(model)
    return [(*r[:4], *(r[4:6] if len(r) == 6 else (None, None)), tuple(m for m in MODELS if m in f))
            for r, f in zip(rows, flagged)]


TelemetryRow = tuple[str, int, tuple[float, ...], tuple[float, ...]]  # engine, cycle, settings, sensors


@dataclass(frozen=True)
class Telemetry:
    """Raw sensor rows, sent only by a site whose config shares them."""

    site: str
    rows: tuple[TelemetryRow, ...] = ()

    def to_payload(self) -> bytes:
        return encode_json({"site": self.site, "rows": [[e, c, list(st), list(se)] for e, c, st, se in self.rows]})

    @classmethod
    def from_payload(cls, payload: bytes, *, site: str) -> Telemetry:
        what = f"telemetry from {site}"
        body = json_body(payload, what)
        site_of(body, site, what)
        rows = []
        for i, row in enumerate(bounded_list(body.get("rows", []), f"{what} rows", MAX_TELEMETRY_ROWS)):
            where = f"{what} rows[{i}]"
            engine, cycle, settings, sensors = row_of(row, where, 4)
            rows.append((engine_id(engine, where), cycle_no(cycle, f"{where} cycle"), finite_vector(settings, N_SETTINGS, f"{where} settings"), finite_vector(sensors, N_SENSORS, f"{where} sensors")))
        return cls(site, tuple(rows))
