"""The InfluxDB results store: the same `ResultsStore` as SQLite, for real fleets.

Why a second backend: a fleet's telemetry (sensor rows, per-cycle predictions) outgrows an
embedded file, and fleets already run InfluxDB next to Grafana. The schema is documented in
docs/telemetry.md; in short, one measurement per kind of record, tags only for what every
query filters by and what stays small (site, engine, model, kind, reason).

Write path (never blocks the caller, never loses a round result):
- record_* turn their arguments into line protocol and hand it to influxdb-client's
  batching WriteApi (WriteOptions: batch size, flush interval, retries with exponential
  backoff for HTTP 429/5xx).
- When the server cannot be reached (no HTTP answer), batches go to a bounded on-disk
  spool (spool.py) instead, and so do new points until it answers again. A
  drainer thread retries with backoff and empties the spool, oldest first, once it does.
  When the spool is full the oldest telemetry is dropped and counted; round results,
  metrics, status, truth and events are never dropped.

Read path (influx_read.py): Flux through query_api, the dashboard's read
methods answering the same dicts as SqliteStore. Nothing here starts a thread or touches disk until the first write, so a
reader (the dashboard) opening the same store costs one HTTP client.

influxdb-client is imported lazily: the aggregator runs without it when SQLite is used.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from turbofed.envelope import json_default
from turbofed.layout import SENSOR_NAMES, SETTING_NAMES
from turbofed.store.influx_read import FluxReads, http_status
from turbofed.store.interface import ARCHIVE_EVENT, MODELS, PredictionRow, ResultsStore, StoreError, full_row, out_of_range_flag
from turbofed.store.spool import PROTECTED, TELEMETRY, Spool, SpoolError

log = logging.getLogger("turbofed.influx")

ENV = {"url": "TURBOFED_INFLUX_URL", "token": "TURBOFED_INFLUX_TOKEN", "org": "TURBOFED_INFLUX_ORG",
       "bucket": "TURBOFED_INFLUX_BUCKET", "spool_dir": "TURBOFED_INFLUX_SPOOL"}
SETTING_FIELDS = SETTING_NAMES
SENSOR_FIELDS = SENSOR_NAMES
TELEMETRY_MEASUREMENTS = ("sensors", "predictions")  # the only ones the spool may drop
_TELEMETRY_PREFIXES = tuple(f"{m},".encode() for m in TELEMETRY_MEASUREMENTS)
_ROW_FIELDS = SETTING_FIELDS + SENSOR_FIELDS
_ROW_FORMAT = "".join(f",{name}=%r" for name in _ROW_FIELDS)
LINES_PER_ITEM = 200  # one WriteApi item carries at most this many lines (see batch_items)


# --- settings --------------------------------------------------------------------------

@dataclass(frozen=True)
class InfluxSettings:
    """Where and how to write. url/org/bucket are required; the token comes from the
    environment (or the fleet config), never from a URL that ends up in logs."""

    url: str
    org: str
    bucket: str
    token: str = ""
    spool_dir: str | None = None  # default: ~/.local/state/turbofed/influx-spool/<host>-<port>-<org>-<bucket>
    spool_max_mb: float = 512.0  # bound of the on-disk spool; telemetry beyond it is dropped (counted)
    batch_items: int = 50  # WriteApi batch_size: items per request; an item is <= LINES_PER_ITEM lines
    flush_interval_ms: int = 1_000  # a partial batch waits at most this long
    retry_interval_ms: int = 500  # first retry delay (doubles up to max_retry_delay_ms)
    max_retries: int = 5
    max_retry_delay_ms: int = 5_000
    max_retry_time_ms: int = 20_000
    timeout_ms: int = 10_000  # one HTTP request
    close_drain_s: float = 5.0  # on close, how long to keep sending the spool if the server answers
    read_start: str = "0"  # Flux range(start:) of every read: "0" (everything) or e.g. "-30d"

    def resolved_spool_dir(self) -> Path:
        if self.spool_dir:
            return Path(self.spool_dir).expanduser()
        u = urllib.parse.urlsplit(self.url)
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{u.hostname}-{u.port or ''}-{self.org}-{self.bucket}")
        base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
        return base / "turbofed" / "influx-spool" / slug


_SETTING_NAMES = {f.name for f in fields(InfluxSettings)}


def influx_settings(spec: str, *, spool_dir: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
                    env: Mapping[str, str] | None = None) -> InfluxSettings:
    """Settings from `spec` ("influxdb" or "influxdb+http(s)://host:port/?org=..&bucket=.."),
    then TURBOFED_INFLUX_* environment variables for what the spec leaves out, then
    `overrides` (the fleet config's [influx] table) over both."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {k: env[v] for k, v in ENV.items() if env.get(v)}
    if spec != "influxdb":
        u = urllib.parse.urlsplit(spec)
        if u.scheme not in ("influxdb+http", "influxdb+https") or not u.netloc:
            raise StoreError(f"InfluxDB store {spec!r}: expected influxdb+http://host:port/?org=..&bucket=..")
        query = dict(urllib.parse.parse_qsl(u.query, keep_blank_values=True))
        if "token" in query:
            raise StoreError(f"InfluxDB store URL: put the token in {ENV['token']}, not in the URL")
        values["url"] = urllib.parse.urlunsplit((u.scheme.removeprefix("influxdb+"), u.netloc, u.path.rstrip("/"), "", ""))
        values.update(query)
    values.update(overrides or {})
    if spool_dir is not None:
        values["spool_dir"] = str(spool_dir)
    unknown = sorted(set(values) - _SETTING_NAMES)
    if unknown:
        raise StoreError(f"InfluxDB settings: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_SETTING_NAMES))}")
    missing = [k for k in ("url", "org", "bucket") if not values.get(k)]
    if missing:
        raise StoreError("InfluxDB settings missing: " + ", ".join(f"{k} ({ENV[k]})" for k in missing))
    for f in fields(InfluxSettings):  # query-string values arrive as text
        if f.name in values and f.type in ("int", "float"):
            try:
                values[f.name] = (int if f.type == "int" else float)(values[f.name])
            except (TypeError, ValueError):
                raise StoreError(f"InfluxDB settings: {f.name} must be a number, got {values[f.name]!r}") from None
    settings = InfluxSettings(**values)
    if not re.fullmatch(r"0|-?(\d+(ns|us|ms|s|m|h|d|w|mo|y))+|\d{4}-\d\d-\d\dT[\d:.]+Z", settings.read_start):
        raise StoreError(f"InfluxDB settings: read_start {settings.read_start!r} is not a Flux time or duration")
    return settings


def open_influx(spec: str, *, spool_dir: str | Path | None = None,
                overrides: Mapping[str, Any] | None = None) -> "InfluxStore":
    """What open_store() calls for "influxdb" and influxdb+http(s):// URLs."""
    return InfluxStore(influx_settings(spec, spool_dir=spool_dir, overrides=overrides))


def _client_module() -> Any:
    try:
        import influxdb_client
    except ImportError:
        raise StoreError("the InfluxDB store needs influxdb-client: pip install 'turbofed[influx]'") from None
    return influxdb_client


# --- line protocol -----------------------------------------------------------------------

_TAG_ESCAPES = str.maketrans({"\\": "\\\\", ",": "\\,", "=": "\\=", " ": "\\ ", "\n": "\\ ", "\r": "\\ "})


def _tag(value: Any) -> str:
    """A tag value in line protocol; an empty one (not allowed there) becomes "_"."""
    return str(value).translate(_TAG_ESCAPES) or "_"


def _field(value: Any) -> str | None:
    """A typed field value; None (absent, non-finite) means leave the field out."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value}i"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else None
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ").replace("\r", " ")
    return f'"{text}"'


def _line(measurement: str, tags: Mapping[str, Any], values: Mapping[str, Any], ns: int) -> str | None:
    """One point (tags sorted, as InfluxDB prefers), or None when no field has a value."""
    body = ",".join(f"{k}={v}" for k, v in ((k, _field(x)) for k, x in values.items()) if v is not None)
    if not body:
        return None
    tagset = "".join(f",{k}={_tag(tags[k])}" for k in sorted(tags))
    return f"{measurement}{tagset} {body} {ns}"


def _f(value: Any) -> float | None:
    """A float field (None for missing or non-finite: line protocol has no NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _i(value: Any) -> int | None:
    return None if value is None else int(value)


def _flag(outside: Any, model: str) -> str:
    """The out_of_range field of `model`'s prediction point (1i/0i), or nothing when the site did not say."""
    flag = out_of_range_flag(outside, model)
    return "" if flag is None else f",out_of_range={flag}i"


def _ns(at: float) -> int:
    """Unix seconds -> nanoseconds, at the microsecond resolution a float time carries."""
    return round(at * 1e6) * 1_000


def _cycle_ns(at: float, cycle: int) -> int:
    """Telemetry timestamp: the report time to the millisecond, plus the cycle number in
    nanoseconds, so several cycles of one engine in one report stay distinct points and a
    cycle re-sent in the same millisecond replaces itself."""
    return int(at * 1_000) * 1_000_000 + cycle % 1_000_000


def _event_line(kind: str, detail: Mapping[str, Any], at: float, ns: int) -> str | None:
    return _line("events", {"kind": kind}, {"detail": json.dumps(detail, default=json_default), "at": float(at)}, ns)


# --- the store -----------------------------------------------------------------------------

class InfluxStore(FluxReads, ResultsStore):
    """Results and telemetry in an InfluxDB 2 bucket (writes: v2 write API; reads: Flux)."""

    def __init__(self, settings: InfluxSettings) -> None:
        self.settings = settings
        self._ic = _client_module()
        self._client = self._ic.InfluxDBClient(url=settings.url, token=settings.token, org=settings.org,
                                               timeout=settings.timeout_ms)
        self._writer: _Writer | None = None
        self._lock = threading.Lock()
        self._last_ns: dict[str, int] = {}  # per series: protected points never share a timestamp
        self._tags: dict[str, str] = {}  # escaped tag values, cached (the hot path)
        self._closed = False

    # --- write side -------------------------------------------------------------------
    def _emit(self, lane: str, lines: list[str | None]) -> None:
        points = [p for p in lines if p is not None]
        if not points:
            return
        with self._lock:
            if self._closed:
                raise StoreError("the InfluxDB store is closed")
            if self._writer is None:
                self._writer = _Writer(self._client, self.settings, self._ic)
            writer = self._writer
        writer.submit(lane, points)

    def _stamp(self, series: str, at: float) -> int:
        """A timestamp in a millisecond of its own within `series`: two events of one kind
        at the same instant would otherwise overwrite each other (and millisecond servers,
        VictoriaMetrics among them, would merge them). The exact time stays in field `at`."""
        ns = _ns(at)
        with self._lock:
            last = self._last_ns.get(series)
            if last is not None and ns // 1_000_000 <= last // 1_000_000:
                ns = (last // 1_000_000 + 1) * 1_000_000
            self._last_ns[series] = ns
        return ns

    def _t(self, value: Any) -> str:
        text = str(value)
        tag = self._tags.get(text)
        if tag is None:
            tag = self._tags[text] = _tag(text)
            if len(self._tags) > 100_000:
                self._tags.clear()
        return tag

    def record_round(self, round: int, model_version: int, started: float, closed: float,
                     participants: list[dict[str, Any]], aggregate_ms: float, strategy: str,
                     closed_by: str, strategy_params: dict[str, Any] | None = None,
                     regions: dict[str, dict[str, Any]] | None = None) -> None:
        ns = self._stamp("rounds", closed)
        params = json.dumps(strategy_params or {}, default=json_default, sort_keys=True)
        parts = [(str(p["site"]), int(p["samples"]), int(p["update_bytes"]), _report_fields(p)) for p in participants]
        summed = [(str(name), int(t["sites"]), int(t["samples"]), int(t["update_bytes"])) for name, t in (regions or {}).items()]
        lines = [_line("rounds", {}, {"round": int(round), "model_version": int(model_version),
                                      "started": _f(started), "closed": _f(closed), "aggregate_ms": _f(aggregate_ms),
                                      "strategy": str(strategy), "strategy_params": params,
                                      "closed_by": str(closed_by),
                                      "participants": len(parts),
                                      "samples": sum(p[1] for p in parts) + sum(r[2] for r in summed)}, ns)]
        lines += [_line("round_participants", {"site": site},
                        {"round": int(round), "samples": samples, "update_bytes": size, **report}, ns)
                  for site, samples, size, report in parts]
        lines += [_line("round_regions", {"region": name},
                        {"round": int(round), "sites": sites, "samples": samples, "update_bytes": size}, ns)
                  for name, sites, samples, size in summed]
        self._emit(PROTECTED, lines)

    def record_rejection(self, round: int | None, site: str, reason: str, detail: str, at: float) -> None:
        ns = self._stamp(f"rejections\0{site}\0{reason}", at)
        self._emit(PROTECTED, [_line("rejections", {"site": site, "reason": reason},
                                     {"round": _i(round), "detail": str(detail), "at": float(at)}, ns)])

    def record_status(self, site: str, online: bool, at: float, agent_version: str | None,
                      model_version: int | None, samples: int | None) -> None:
        # Timestamp = the status's own time: a redelivered message lands on itself, an
        # older one sorts before the newer, and last() per field keeps versions a bare
        # last will leaves out.
        self._emit(PROTECTED, [_line("site_status", {"site": site},
                                     {"online": bool(online), "at": float(at),
                                      "agent_version": None if agent_version is None else str(agent_version),
                                      "model_version": _i(model_version), "samples": _i(samples)}, _ns(at))])

    def record_metrics(self, site: str, round: int | None, model_version: int | None,
                       metrics: dict[str, Any], at: float) -> None:
        lines = []
        for model in MODELS:
            m = metrics.get(model)
            if isinstance(m, dict):
                ns = self._stamp(f"metrics\0{site}\0{model}", at)
                lines.append(_line("metrics", {"site": site, "model": model},
                                   {"round": _i(round), "model_version": _i(model_version),
                                    "engines": _i(metrics.get("engines")), "rmse": _f(m.get("rmse")),
                                    "score": _f(m.get("score")), "at": float(at)}, ns))
        self._emit(PROTECTED, lines)

    def record_validation(self, site: str, round: int, model_version: int | None, metrics: dict[str, Any], at: float) -> None:
        lines = []
        for model in MODELS:
            m = metrics.get(model)
            if isinstance(m, dict):
                lines.append(_line("validation", {"site": site, "model": model},
                                   {"round": _i(round), "model_version": _i(model_version), "engines": _i(metrics.get("engines")),
                                    "rmse": _f(m.get("rmse")), "at": float(at)}, self._stamp(f"validation\0{site}\0{model}", at)))
        self._emit(PROTECTED, lines)

    def record_predictions(self, site: str, rows: Sequence[PredictionRow], at: float) -> None:
        st, base, lines = self._t(site), int(at * 1_000) * 1_000_000, []
        for engine, cycle, local, federated, lower, upper, outside in map(full_row, rows):
            c = int(cycle)
            head = f"predictions,engine={self._t(engine)},model="
            tail = f",site={st} cycle={c}i,rul="
            t = base + c % 1_000_000
            if local is not None and math.isfinite(local := float(local)):
                lines.append(f"{head}local{tail}{local!r}{_flag(outside, 'local')} {t}")
            if federated is not None and math.isfinite(federated := float(federated)):
                bounds = "".join(f",{k}={float(v)!r}" for k, v in (("lower", lower), ("upper", upper))
                                 if v is not None and math.isfinite(float(v)))  # the federated RUL's interval
                lines.append(f"{head}federated{tail}{federated!r}{bounds}{_flag(outside, 'federated')} {t}")
        self._emit(TELEMETRY, lines)

    def record_sensors(self, site: str, rows: list[tuple[str, int, list[float], list[float]]], at: float) -> None:
        st, base, lines = self._t(site), int(at * 1_000) * 1_000_000, []
        for engine, cycle, settings, sensors in rows:
            c = int(cycle)
            values = (*map(float, settings), *map(float, sensors))
            if len(values) == len(_ROW_FIELDS) and all(map(math.isfinite, values)):
                fieldset = _ROW_FORMAT % values  # the common case, formatted in one C call
            else:
                fieldset = "".join(f",{name}={v!r}" for name, v in zip(_ROW_FIELDS, values) if math.isfinite(v))
            lines.append(f"sensors,engine={self._t(engine)},site={st} cycle={c}i{fieldset} {base + c % 1_000_000}")
        self._emit(TELEMETRY, lines)

    def record_truth(self, site: str, engine: str, cycle: int, rul: float, at: float) -> None:
        self._emit(PROTECTED, [_line("truth", {"site": site, "engine": str(engine)},
                                     {"cycle": int(cycle), "rul": float(rul), "at": float(at)}, _ns(at))])

    def record_event(self, kind: str, detail: dict[str, Any], at: float) -> None:
        self._emit(PROTECTED, [_event_line(kind, detail, at, self._stamp(f"events\0{kind}", at))])

    def archive_rounds(self, epoch: int) -> int:
        """InfluxDB keeps every round as a point at its own time, so nothing is overwritten:
        a `rounds_archived` event marks the reset, and `rounds()` shows only rounds recorded
        after the newest such mark (the older points stay in the bucket, queryable by time)."""
        kept = len(self.rounds())
        self.record_event(ARCHIVE_EVENT, {"epoch": int(epoch), "rounds": kept}, time.time())
        return kept

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything recorded so far is in the server (True) or `timeout` passes."""
        return self._writer.flush(timeout) if self._writer is not None else True

    def write_stats(self) -> dict[str, Any]:
        """Points written, spooled, pending in the spool, dropped (telemetry), rejected by the server."""
        if self._writer is None:
            return {"written": 0, "spooled": 0, "pending": 0, "dropped": 0, "rejected": 0, "in_flight": 0,
                    "offline": False}
        return self._writer.stats()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            writer = self._writer
        if writer is not None:
            writer.close()
        self._client.close()

    def __enter__(self) -> "InfluxStore":
        return self

    # --- read side (Flux) ---------------------------------------------------------------
class _Unreachable(Exception):
    """Raised from the retry callback: no HTTP answer, so the spool takes the batch now."""


def _bad_data(exc: BaseException) -> bool:
    """The server answered that the points themselves are wrong: sending again won't help."""
    return http_status(exc) in (400, 422)


def _unreachable(exc: BaseException) -> bool:
    """No HTTP answer at all (refused, reset, timed out): the server is down or away."""
    from urllib3 import exceptions as ue

    if isinstance(exc, ue.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    if http_status(exc) is not None:
        return False
    return isinstance(exc, (_Unreachable, ue.NewConnectionError, ue.ConnectTimeoutError, ue.ReadTimeoutError,
                            ue.ProtocolError, ue.ProxyError, ConnectionError, TimeoutError, OSError))


class _Writer:
    """Live batches through the WriteApi while the server answers; the spool while it does
    not; a drainer thread that empties the spool (with backoff) once it answers again."""

    def __init__(self, client: Any, settings: InfluxSettings, ic: Any) -> None:
        from influxdb_client.client.write_api import SYNCHRONOUS
        from reactivex.scheduler import ThreadPoolScheduler

        self.settings = settings
        folder = settings.resolved_spool_dir()
        try:
            self.spool = Spool(folder, max_bytes=int(settings.spool_max_mb * 2**20))
        except SpoolError as exc:
            raise StoreError(str(exc)) from None
        self._precision = ic.WritePrecision.NS
        self._count_lock = threading.Lock()
        self._counts = dict.fromkeys(("submitted_live", "written", "spooled", "dropped", "rejected", "lost",
                                      "live_done"), 0)
        self._offline = False
        self._closing = False
        self._backoff = settings.retry_interval_ms / 1000
        self._next_try = 0.0
        options = ic.WriteOptions(
            batch_size=settings.batch_items, flush_interval=settings.flush_interval_ms,
            retry_interval=settings.retry_interval_ms, max_retries=settings.max_retries,
            max_retry_delay=settings.max_retry_delay_ms, max_retry_time=settings.max_retry_time_ms,
            exponential_base=2, max_close_wait=settings.max_retry_time_ms + 5_000,
            write_scheduler=ThreadPoolScheduler(1))  # our own: the default is shared by every WriteApi
        self._api = client.write_api(write_options=options, success_callback=self._on_success,
                                     error_callback=self._on_error, retry_callback=self._on_retry)
        self._sync = client.write_api(write_options=SYNCHRONOUS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="turbofed-influx-drain", daemon=True)
        self._thread.start()

    # --- entry ---
    def submit(self, lane: str, lines: list[str]) -> None:
        """Hand points over without waiting on the network (the recorder's thread)."""
        if self._offline or self._closing:
            self._spool(lane, ("\n".join(lines) + "\n").encode(), len(lines))
            return
        with self._count_lock:
            self._counts["submitted_live"] += len(lines)
        bucket, org = self.settings.bucket, self.settings.org
        for i in range(0, len(lines), LINES_PER_ITEM):
            self._api.write(bucket, org, record="\n".join(lines[i:i + LINES_PER_ITEM]).encode(),
                            write_precision=self._precision)

    def _add(self, **deltas: int) -> None:
        with self._count_lock:
            for k, v in deltas.items():
                self._counts[k] += v

    def _spool(self, lane: str, data: bytes, points: int) -> None:
        try:
            dropped = self.spool.append(lane, data, points)
        except (SpoolError, OSError) as exc:
            log.error("cannot spool %d points (%s): they are lost", points, exc)
            self._add(lost=points)
            return
        self._add(spooled=points)
        if dropped:
            self._dropped(dropped)

    def _dropped(self, points: int) -> None:
        """Count telemetry the full spool gave up, and say so in the store itself (an event)."""
        self._add(dropped=points)
        with self._count_lock:
            total = self._counts["dropped"]
        now = time.time()
        line = _event_line("telemetry_dropped", {"points": points, "total": total}, now, _ns(now))
        try:
            more = self.spool.append(PROTECTED, (line + "\n").encode(), 1) if line else 0
        except (SpoolError, OSError):
            return
        self._add(spooled=1, dropped=more)  # (no event for `more`: the next one's total has it)

    def _spool_batch(self, data: bytes) -> None:
        """A failed WriteApi batch: back to the spool, split into lanes."""
        telemetry, protected = [], []
        for line in data.split(b"\n"):
            if line:
                (telemetry if line.startswith(_TELEMETRY_PREFIXES) else protected).append(line)
        for lane, lines in ((PROTECTED, protected), (TELEMETRY, telemetry)):
            if lines:
                self._spool(lane, b"\n".join(lines) + b"\n", len(lines))

    # --- WriteApi callbacks (its threads) ---
    def _on_success(self, conf: tuple[str, str, str], data: bytes) -> None:
        n = data.count(b"\n") + 1
        self._add(written=n, live_done=n)
        self._set_online()

    def _on_retry(self, conf: tuple[str, str, str], data: bytes, exc: BaseException) -> None:
        # HTTP 429/503 and other answers: WriteOptions' backoff retries the batch in memory.
        # No answer at all: the server is away; the spool takes the batch right now rather
        # than let batches queue in memory behind this one's retries.
        if _unreachable(exc):
            self._set_offline(exc)
            raise _Unreachable(str(exc))

    def _on_error(self, conf: tuple[str, str, str], data: bytes, exc: BaseException) -> None:
        n = data.count(b"\n") + 1
        if _bad_data(exc):
            log.error("InfluxDB refused %d points as invalid: %s", n, exc)
            self._add(rejected=n, live_done=n)
            return
        self._set_offline(exc)
        self._spool_batch(data)
        self._add(live_done=n)

    # --- online / offline ---
    def _set_offline(self, exc: BaseException) -> None:
        now = time.monotonic()
        if not self._offline:
            self._offline = True
            log.warning("InfluxDB at %s not answering (%s): spooling to %s", self.settings.url, exc, self.spool.folder)
        else:
            self._backoff = min(self._backoff * 2, self.settings.max_retry_delay_ms / 1000)
        self._next_try = now + self._backoff * (0.5 + random.random() / 2)

    def _set_online(self) -> None:
        if self._offline:
            self._offline = False
            self._backoff = self.settings.retry_interval_ms / 1000
            log.info("InfluxDB at %s answering again; %d spooled points to send", self.settings.url,
                     self.spool.pending_points())

    # --- drainer (its own thread) ---
    def _drain(self) -> None:
        while not self._stop.is_set():
            delay = self._next_try - time.monotonic() if self._offline else 0.0
            if delay > 0:
                self._stop.wait(min(delay, 0.5))
                continue
            chunk = self.spool.peek(1 << 20)
            if chunk is None:
                self.spool.wait(0.5)
                continue
            try:
                self._sync.write(self.settings.bucket, self.settings.org, record=chunk.data,
                                 write_precision=self._precision)
            except Exception as exc:  # noqa: BLE001 - classify, never die: this thread is the spool's only way out
                if _bad_data(exc):
                    log.error("InfluxDB refused %d spooled points as invalid: %s", chunk.points, exc)
                    self.spool.commit(chunk)
                    self._add(rejected=chunk.points)
                else:
                    self._set_offline(exc)
                continue
            self.spool.commit(chunk)
            self._add(written=chunk.points)
            self._set_online()

    # --- state ---
    def stats(self) -> dict[str, Any]:
        with self._count_lock:
            c = dict(self._counts)
        return {"written": c["written"], "spooled": c["spooled"], "pending": self.spool.pending_points(),
                "dropped": c["dropped"], "rejected": c["rejected"], "lost": c["lost"],
                "in_flight": c["submitted_live"] - c["live_done"], "offline": self._offline}

    def flush(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if s["in_flight"] <= 0 and s["pending"] == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def close(self) -> None:
        """Flush the WriteApi (what fails goes to the spool), give the drainer a moment to
        empty the spool if the server answers, and leave the rest on disk for next time."""
        self._closing = True
        self._api.close()
        deadline = time.monotonic() + self.settings.close_drain_s
        while not self._offline and self.spool.pending_points() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        self._thread.join(timeout=self.settings.timeout_ms / 1000 + 5)
        self._sync.close()
        pending = self.spool.pending_points()
        if pending:
            log.warning("InfluxDB store closed with %d points in the spool %s: they are sent on next start",
                        pending, self.spool.folder)
        self.spool.close()


def _report_fields(participant: Mapping[str, Any]) -> dict[str, Any]:
    """What the strategy did with a site's update (norm, cosine, action), where it was reported."""
    if participant.get("action") is None:
        return {}
    out: dict[str, Any] = {"action": str(participant["action"])}
    for key in ("norm", "cosine"):
        value = participant.get(key)
        if value is not None and math.isfinite(float(value)):
            out[key] = float(value)
    return out
