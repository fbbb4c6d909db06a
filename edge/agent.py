"""The edge agent: one per site, between the engines' sensor stream and the aggregator.

It keeps a window per engine and predicts every engine every cycle with two models, the
site's own (local) and the fleet's (the latest global model); when an engine fails it
labels that engine's history and buffers it for training; when a round is announced it
trains from the global model and sends its update. Raw sensor rows never leave the site.

Everything it sends is signed with the site's key, and it pins the aggregator's key: a
round announcement, statistics request or global model that is unsigned, mis-signed or for
another fleet is refused, and a global model is taken only in a version the latest signed
round announcement vouches for (no jumps; no rollback except after a signed fleet reset,
a higher `epoch`). docs/protocol.md, "Signed messages".

MQTT callbacks only enqueue; one worker thread does all the work in arrival order, so
training never stalls the network thread (keepalives, acknowledgements). Everything the
agent knows is saved under its state folder, so a restarted agent resumes where it was:
docs/agent-state.md describes the files and formats (edge/state.py reads and writes
them). A state file that cannot be read stops the agent at start-up with one line naming
it, and is left as it is. Learners pickled by older versions (learners.pkl) are never
unpickled: the file is renamed to learners.pkl.ignored, with a warning, and the learners
restart from the global model and the training buffer at the next round.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import queue
import signal
import threading
import time
from collections import Counter
from typing import Any, Callable

import numpy as np

import turbofed
from turbofed import envelope
from turbofed.config import ModelSettings, SiteConfig, load_site_config, require_writable_dir
from turbofed.conformal import IntervalTable
from turbofed.edge.buffer import TrainingBuffer, is_held_out, load_histories, load_history_settings, save_histories
from turbofed.edge.calibration import CalibrationRun, runs_histogram
from turbofed.edge.features import EngineWindow
from turbofed.edge.inference import OnnxPredictor
from turbofed.edge.outbox import OUTBOX_DB, Outbox
from turbofed.edge.secure import SecureSessions
from turbofed.edge.state import (
    BUFFER_NPZ,
    ENGINES_NPZ,
    GLOBAL_ONNX,
    HOLDOUT_NPZ,
    LEARNERS_NPZ,
    STATE_JSON,
    AgentState,
    load_global,
    load_learners,
    retire_legacy_learners,
    save_learners,
)
from turbofed.edge.storage import StorageWatch
from turbofed.errors import Refused
from turbofed.files import write_atomic
from turbofed.messages import (
    MAX_PREDICTION_ROWS,
    MAX_TELEMETRY_ROWS,
    EngineEvent,
    MessageError,
    Metrics,
    ModelEvaluation,
    ModelScore,
    Predictions,
    RoundAnnouncement,
    SensorReading,
    StatsReply,
    StatsRequest,
    Status,
    Telemetry,
    signed,
)
from turbofed.metrics import phm08_score, rmse
from turbofed.mqtt import ConnectionWatch, Subscriptions, client_id, connect, make_client, message_inbox, on_message_into
from turbofed.ratelog import RateLimitedLog, RefusalLog
from turbofed.refusals import Refusal
from turbofed.spec import MAX_CELLS, FeatureSpec
from turbofed.topics import Topics

log = logging.getLogger("turbofed.edge")

SAVE_EVERY_S = 2.0
SCORE_ROWS = 5_000  # labelled cycles (the first failed engines) a new global model is scored on
MAX_EVALUATION_RMSE = 1e9  # what a global model that predicts nothing finite scores (score_global)
STOP_WAIT_S = 3.0  # at shutdown, how long the outbox may take to reach the broker
SWEEP_EVERY_S = 60.0  # how often engines that went quiet are looked for
MAX_WINDOWS_PER_ENGINE = 4  # feature windows kept per engine (one per spec: local, fleet, and a spare)
FIRST_ROWS = 8  # history rows an engine starts with (grown by doubling as readings come)
# Predictions and truths held back until an aggregator has spoken (nothing would record them: the
# broker drops what no one subscribes to); beyond this many rows the oldest go, counted.
MAX_HELD_REPORT_ROWS = 50_000


class EngineTrack:
    """One engine in service: its history since install (bounded) and its feature windows.

    Memory follows the readings held: the history starts at FIRST_ROWS rows and doubles as
    it fills (up to `history_cycles`), so an engine heard from once costs ~2 KB, not a
    preallocated block; each feature window is (2 x window, sensors) floats, whatever the history."""

    def __init__(self, cycles: np.ndarray | None = None, sensors: np.ndarray | None = None, settings: np.ndarray | None = None) -> None:
        self.cycles = np.zeros(FIRST_ROWS, dtype=np.int64) if cycles is None else np.array(cycles, dtype=np.int64)
        self.sensors = np.zeros((FIRST_ROWS, 21)) if sensors is None else np.array(sensors, dtype=float)
        self.settings = np.zeros((len(self.cycles), 3)) if settings is None else np.array(settings, dtype=float)  # regimes need them
        self.n = 0 if cycles is None else len(cycles)
        self.windows: dict[FeatureSpec, EngineWindow] = {}
        self.last: tuple[int, float | None, float | None] | None = None  # cycle, local, federated
        self.last_seen = time.time()  # wall clock of the last reading (idle engines are forgotten)

    @property
    def last_cycle(self) -> int | None:
        return int(self.cycles[self.n - 1]) if self.n else None

    def history(self) -> tuple[np.ndarray, np.ndarray]:
        return self.cycles[: self.n], self.sensors[: self.n]

    def append(self, cycle: int, sensors: np.ndarray, limit: int, settings: np.ndarray | None = None) -> None:
        """Add a reading; beyond `limit` cycles the oldest is dropped (RUL labels stay exact)."""
        if self.n == limit:
            self.cycles[:-1], self.sensors[:-1], self.settings[:-1] = self.cycles[1:].copy(), self.sensors[1:].copy(), self.settings[1:].copy()
            self.n -= 1
        elif self.n == len(self.cycles):
            grow = max(min(2 * self.n, limit) - self.n, 1)
            self.cycles = np.concatenate([self.cycles, np.zeros(grow, dtype=np.int64)])
            self.sensors = np.vstack([self.sensors, np.zeros((grow, 21))])
            self.settings = np.vstack([self.settings, np.zeros((grow, 3))])
        self.cycles[self.n], self.sensors[self.n] = cycle, sensors
        self.settings[self.n] = 0.0 if settings is None else settings
        self.n += 1
        for window in self.windows.values():
            window.push(cycle, sensors, self.settings[self.n - 1])

    def window(self, spec: FeatureSpec) -> EngineWindow:
        """The window for `spec`, built from the history the first time a spec is seen."""
        w = self.windows.get(spec)
        if w is None:
            while len(self.windows) >= MAX_WINDOWS_PER_ENGINE:  # specs come and go; keep the newest
                del self.windows[next(iter(self.windows))]
            w = self.windows[spec] = EngineWindow(spec)
            # From the first kept reading: the window needs the last W, its baseline the first ones.
            for c, s, g in zip(self.cycles[: self.n], self.sensors[: self.n], self.settings[: self.n]):
                w.push(c, s, g)
        return w


class EdgeAgent:
    """A site's agent. `training=False` is the inference-only profile (no scikit-learn)."""

    def __init__(self, config: SiteConfig, training: bool = True) -> None:
        self.config = config
        self.site = config.site
        self.training = training
        self.topics = Topics(config.broker.topic_root, config.broker.plant_root)
        self.state_dir = require_writable_dir(config.state_dir, "state_dir")  # at start, not at the first save
        self.counters: Counter[str] = Counter()
        self.refusals = RefusalLog(log, "site %s: skipped (%s, #%d): %s")  # counted always, logged once a minute per reason
        self._errors = RateLimitedLog(log)  # tracebacks of internal errors, once a minute per place
        self.stats_answer: dict[str, Any] | None = None  # the last statistics answer (on_stats_request)
        self._next_sweep = time.monotonic() + SWEEP_EVERY_S
        self.inbox = message_inbox(config.broker.keepalive)  # bounded: a replay far ahead waits at the broker
        self.engines: dict[str, EngineTrack] = {}
        self.buffer = TrainingBuffer(config.buffer_rows)
        self.holdout = TrainingBuffer(config.buffer_rows)  # failed engines held out of training (holdout_share)
        self.intervals: IntervalTable | None = None  # the conformal interval table of the global model (signed announcement)
        self.calibrated_version = -1  # the global version whose residual histogram this site sent
        self.settings: ModelSettings | None = None
        self.fleet_spec: FeatureSpec | None = None
        self.local_spec: FeatureSpec | None = None
        self.fed_learner: Any = None
        self.local_learner: Any = None
        self.global_model: bytes | None = None
        self.global_version = -1
        self.fed_predictor: OnnxPredictor | None = None
        self.local_predictor: OnnxPredictor | None = None
        self.answered: list[str] = []
        self.pending_round: RoundAnnouncement | None = None
        self.scored: dict[str, list[float | None]] = {}  # engine -> [truth, local, federated]
        # engine, cycle, local, federated, lower, upper, models out of range (messages.Predictions)
        self.pending_rows: list[tuple[str, int, float | None, float | None, float | None, float | None, tuple[str, ...]]] = []
        self.pending_truth: list[tuple[str, int, float]] = []
        self.pending_sensors: list[tuple[str, int, tuple[float, ...], tuple[float, ...]]] = []
        # Whether any aggregator has spoken to this fleet (a statistics request, a round, a global
        # model): until then predictions and truths (a training engine's failure) are held, not sent.
        self.aggregator_heard = False
        self.metrics_dirty = False
        self.dirty = False
        self._last_save = 0.0
        self._saved_global = -1  # the version in global.onnx
        self.storage = StorageWatch(self.site, self.state_dir, log)
        self.watch = ConnectionWatch(f"site {self.site}", log)
        self._reported_rows = -1
        self._client: Any = None
        identity = config.identity
        self.sealer, self.verifier = signed.site_keys(
            self.site, *((identity.fleet_id, identity.signing_key, identity.aggregator_key) if identity else (None, None, None)))
        self.epoch = 0  # the fleet epoch of the latest signed announcement (a reset raises it)
        self.announced: RoundAnnouncement | None = None  # the latest signed round announcement
        self.deferred_global: bytes | None = None  # a signed global that arrived before its announcement
        # What each subscribed topic carries and who handles it: verified and parsed before it is used.
        self._routes: dict[str, Callable[[bytes], None]] = {
            self.topics.round: self._on_round_payload,
            self.topics.global_model: self.on_global,
            self.topics.stats_request: self._on_stats_request_payload,
        }
        # Secure aggregation (edge/secure.py): the aggregator's roster, this site's inbox, the unmask request.
        self.secure = SecureSessions(self.site, self.sealer, self.verifier, self._send_secure)
        self._routes.update({
            self.topics.secagg_roster: lambda payload: self.secure.on_frame("secagg_roster", payload),
            self.topics.secagg_inbox(self.site): lambda payload: self.secure.on_frame("secagg_shares", payload),
            self.topics.secagg_unmask: lambda payload: self.secure.on_frame("secagg_unmask_request", payload),
        })
        self._plant_routes: dict[str, Callable[[str, bytes], None]] = {"sensors": self.on_reading, "events": self.on_event}
        self._restore()
        # Reports wait on disk until the broker has them (after _restore: a bad state file stops us first).
        reports = {"update": self.topics.update(self.site), "metrics": self.topics.metrics(self.site), "stats": self.topics.stats(self.site),
                   "predictions": self.topics.predictions(self.site), "telemetry": self.topics.site(self.site, "telemetry"),
                   "evaluation": self.topics.site(self.site, "evaluation")}
        self.outbox = Outbox(self.state_dir / OUTBOX_DB, config.outbox_max_bytes, reports, self.site, log, self.counters)
        signed.warn_if_unsigned(self.sealer, f"site {self.site}")

    # --- lifecycle -------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The MQTT client (paho, or a stand-in with publish/is_connected/on_publish)."""
        return self._client

    @client.setter
    def client(self, client: Any) -> None:
        """Whatever client is used, its acknowledgements empty the outbox."""
        self._client = client
        if client is not None:
            client.on_publish = self.outbox.acknowledged

    def start(self) -> None:
        """Connect (reconnects are automatic) and subscribe."""
        # The will is signed now, at connect: a replayed offline status is possible and harmless
        # (the next online status, signed with a later `at`, replaces it).
        offline = self.sealer.seal(signed.STATUS, Status(self.site, online=False).to_payload())
        self.client = make_client(client_id(f"edge-{self.site}", self.config.broker), self.config.broker, will=(self.topics.status(self.site), offline), persistent_session=True)
        self.client.on_message = on_message_into(self.inbox, lambda msg: (msg.topic, msg.payload), self.counters, log,
                                                 f"site {self.site}")
        self.client.on_connect = self._on_connect
        self.watch.attach(self.client)
        self.subscriptions = Subscriptions(
            self.client,
            [
                self.topics.plant_filter(self.site, "sensors"),
                self.topics.plant_filter(self.site, "events"),
                self.topics.round,
                self.topics.global_model,
                self.topics.stats_request,
                self.topics.secagg_roster,
                self.topics.secagg_inbox(self.site),
                self.topics.secagg_unmask,
            ],
        )
        connect(self.client, self.config.broker)  # runs _on_connect: subscribe, say we are online
        self.subscriptions.wait()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code is not None and reason_code.is_failure:
            return
        self.subscriptions.subscribe()
        self.publish_status(online=True)

    def run(self, stop: threading.Event) -> None:
        """Work through messages until `stop` is set, then save and say goodbye."""
        if self.client is None:
            self.start()
        next_flush = time.monotonic() + self.config.predictions_every_s
        while not stop.is_set():
            try:
                topic, payload = self.inbox.get(timeout=0.1)
            except queue.Empty:
                pass
            else:
                self.handle(topic, payload)
            self.outbox.pump(self.client)
            if time.monotonic() >= next_flush:
                self.flush()
                next_flush = time.monotonic() + self.config.predictions_every_s
        self.drain()
        self.inbox.close()  # stopping: what comes now is not read (as before the inbox was bounded)
        self.flush()
        self.save()
        deadline = time.monotonic() + STOP_WAIT_S  # what the broker does not take by then is sent at the next start
        while self.outbox.pending and self.client.is_connected() and time.monotonic() < deadline:
            self.outbox.pump(self.client)
            time.sleep(0.02)
        self.publish_status(online=False)
        self.client.disconnect()
        self.client.loop_stop()
        self.outbox.close()

    def drain(self) -> None:
        """Handle whatever is already queued (used at shutdown and by tests)."""
        while True:
            try:
                topic, payload = self.inbox.get_nowait()
            except queue.Empty:
                return
            self.handle(topic, payload)

    # --- dispatch --------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes) -> None:
        """Route one message; bad input is counted and logged, never fatal."""
        try:
            if topic.startswith(self.topics.plant_root + "/"):
                _, engine, kind = self.topics.parse_plant(topic)
                if self.config.engines is not None and engine not in self.config.engines:
                    raise MessageError(f"engine {engine!r} is not in this site's engine list", Refusal.UNKNOWN_ENGINE)
                plant_handler = self._plant_routes.get(kind)
                if plant_handler is None:
                    raise MessageError(f"no handler for plant messages of kind {kind!r}", Refusal.UNKNOWN_KIND)
                plant_handler(engine, payload)
            elif payload and topic in self._routes:  # an empty payload clears a retained message
                self._routes[topic](payload)
        except Refused as exc:
            self._reject(exc.reason, f"{topic[:300]}: {exc}")
        except Exception:  # keep serving the other engines whatever one message does
            self._internal_error("handle", f"handling a message on {topic[:300]}")

    def _reject(self, reason: Refusal, detail: str) -> None:
        self.refusals.refused(self.counters, f"rejected.{reason.value}", self.site, reason.value, detail)

    def _internal_error(self, where: str, doing: str) -> None:
        """A bug, not bad input: counted, its traceback logged at most once a minute per `where`."""
        self.counters[Refusal.INTERNAL_ERROR.value] += 1
        self._errors.warning(where, "site %s: failed %s", self.site, doing, exc_info=True)

    # --- sensor stream ---------------------------------------------------------------

    def on_reading(self, engine: str, payload: bytes) -> None:
        reading = SensorReading.from_payload(payload)
        limit = self.config.sensor_abs_max
        for name, values in (("settings", reading.settings), ("sensors", reading.sensors)):
            bad = next((i for i, v in enumerate(values) if abs(v) > limit), None)
            if bad is not None:
                raise MessageError(f"engine {engine}: {name}[{bad}] = {values[bad]:g} is beyond the plausible ±{limit:g}", Refusal.IMPLAUSIBLE)
        track = self.engines.get(engine)
        if track is None:
            if len(self.engines) >= self.config.max_engines and not self.evict_idle():
                raise MessageError(f"engine {engine}: already tracking {len(self.engines)} engines (max_engines), none idle", Refusal.TOO_MANY_ENGINES)
            track = self.engines[engine] = EngineTrack()
        if track.n and reading.cycle <= track.last_cycle:
            raise MessageError(f"engine {engine}: cycle {reading.cycle} does not follow {track.last_cycle}", Refusal.CYCLE_BACKWARDS)
        track.append(reading.cycle, np.asarray(reading.sensors, dtype=float), self.config.history_cycles, np.asarray(reading.settings, dtype=float))
        track.last_seen = time.time()
        self.counters["readings"] += 1
        local, local_outside = self._predict(self.local_predictor, self.local_spec, track)
        fed, fed_outside = self._predict(self.fed_predictor, self.fleet_spec, track)
        self.counters["predictions.local"] += local is not None  # counted for Prometheus (turbofed.observability)
        self.counters["predictions.federated"] += fed is not None
        self.counters["predictions.out_of_range"] += local_outside + fed_outside
        track.last = (reading.cycle, local, fed)
        if local is not None or fed is not None:
            lower, upper = self._interval(fed) or (None, None)
            outside = ("local",) * local_outside + ("federated",) * fed_outside
            self.pending_rows.append((engine, reading.cycle, local, fed, lower, upper, outside))
        if self.config.share_sensors:  # raw rows leave the site only when its config says so
            self.pending_sensors.append((engine, reading.cycle, reading.settings, reading.sensors))

    def _predict(self, predictor: OnnxPredictor | None, spec: FeatureSpec | None, track: EngineTrack) -> tuple[float | None, bool]:
        """The model's RUL (None: no model, or NaN or infinite features or output, counted and never
        published) and whether its feature row lies outside the spec's training range
        (FeatureSpec.out_of_range: the prediction is an extrapolation, issue #15)."""
        if predictor is None or spec is None:
            return None, False
        features = track.window(spec).features()
        value = float(predictor.predict(features)[0]) if np.all(np.isfinite(features)) else math.nan
        if not math.isfinite(value):
            self._reject(Refusal.NON_FINITE_OUTPUT, f"engine at cycle {track.last_cycle}: features or prediction not finite; not published")
            return None, False
        return round(value, 3), bool(spec.out_of_range(features)[0])

    def _predictor(self, model: bytes) -> OnnxPredictor:
        """An onnxruntime session for `model`, its output clipped to [0, rul_cap] (the models are
        trained on RUL capped there, so beyond it is extrapolation) for predictions, intervals
        and the learning curve; the rollback score alone takes the unclipped output."""
        return OnnxPredictor(model, cap=None if self.settings is None else self.settings.rul_cap)

    def _interval(self, fed: float | None) -> tuple[float, float] | tuple[()]:
        """The federated RUL's conformal interval (lower, upper), or nothing: without a table for
        the global model this site predicts with, there is no interval to claim."""
        table = self.intervals
        if fed is None or table is None or table.model_version != self.global_version or self.settings is None:
            return ()
        lower, upper = table.interval(np.array([fed]), self.settings.rul_cap)
        return round(float(lower[0]), 3), round(float(upper[0]), 3)

    def evict_idle(self) -> int:
        """Forget engines not heard from for engine_idle_s (memory stays bounded); how many went."""
        cutoff = time.time() - self.config.engine_idle_s
        idle = [e for e, t in self.engines.items() if t.last_seen < cutoff]
        for engine in idle:
            del self.engines[engine]
        if idle:
            self.counters["engines_evicted"] += len(idle)
            self.dirty = True
            log.info("site %s: forgot %d engine(s) idle for over %.0f s", self.site, len(idle), self.config.engine_idle_s)
        return len(idle)

    def on_event(self, engine: str, payload: bytes) -> None:
        event = EngineEvent.from_payload(payload)
        track = self.engines.get(engine)
        if track is None or not track.n:
            raise MessageError(f"engine {engine}: {event.event} event for an engine with no readings", Refusal.UNKNOWN_ENGINE)
        if event.cycle != track.last_cycle:
            raise MessageError(f"engine {engine}: {event.event} at cycle {event.cycle}, last reading was {track.last_cycle}", Refusal.BAD_EVENT)
        if event.event == "failure":
            if self.training:  # labelled history is training data; an inference-only site keeps none
                cycles, sensors = track.history()
                held = is_held_out(self.site, engine, self.config.holdout_share)  # never trained on
                (self.holdout if held else self.buffer).add(
                    engine, cycles.copy(), sensors.copy(), (event.cycle - cycles).astype(float), track.settings[: track.n].copy())
            self.pending_truth.append((engine, event.cycle, 0.0))
            self.counters["failures"] += 1
        else:
            _, local, fed = track.last or (None, None, None)
            self.scored[engine] = [event.rul, local, fed]
            while len(self.scored) > self.config.max_engines:  # the oldest scores go first
                del self.scored[next(iter(self.scored))]
            self.pending_truth.append((engine, event.cycle, event.rul))
            self.metrics_dirty = True
            self.counters["truths"] += 1
        del self.engines[engine]
        self.dirty = True

    # --- federation ------------------------------------------------------------------

    def on_stats_request(self, request: StatsRequest) -> None:
        """Federated analytics: count, sums and sums of squares over all labelled engines, never
        rows, and only what cannot be taken apart: one answer per feature spec and phase (before
        any spec, the first request), for the spec's window, over at least min_stats_engines
        engines, and differing from the previous answer by at least that many engines, except
        the features phase following the regimes phase over exactly the same engines (two views
        of one engine set). Anything else is refused and counted and nothing is published (a
        window sweep recovers nothing).

        With a secure sum in the request (docs/privacy.md) the feature statistics go in masked,
        and the aggregator learns only the fleet total. A session that aborted may be joined
        again for the same spec, but this site unmasks a spec's statistics for one set of sites
        only: two sums over different sets would give away the difference."""
        if request.phase == "residuals":
            self._send_residuals(request)
            return
        k, what = self.config.min_stats_engines, f"stats request {request.request_id!r}"
        if request.window > self.config.max_stats_window:
            raise MessageError(f"{what}: a {request.window}-cycle window is over this site's max_stats_window ({self.config.max_stats_window})", Refusal.STATS_UNAFFORDABLE)
        if self.fleet_spec is not None and request.window != self.fleet_spec.window:
            raise MessageError(f"{what}: window {request.window} is not the current spec's {self.fleet_spec.window}", Refusal.STATS_WRONG_WINDOW)
        spec_key = self._stats_spec_key()
        last = self.stats_answer
        secure_again = request.secagg is not None and last is not None and last["spec"] == spec_key and "survivors" in last
        answered = last.get("phases", ["regimes", "features"]) if last is not None and last["spec"] == spec_key else []
        if secure_again:
            answered = [p for p in answered if p != "features"]
        if request.phase in answered or (last is not None and last["request_id"] == request.request_id):
            raise MessageError(f"{what}: this site already answered {last['request_id']!r} for the current spec", Refusal.STATS_REPEATED)
        engines = {e for e, *_ in self.buffer.engines}
        changed = len(engines.symmetric_difference(last["engines"])) if last is not None and not secure_again else len(engines)
        if answered == ["regimes"] and changed == 0:
            changed = k  # the features phase over the very engines the regimes phase covered
        if len(engines) < k or changed < k:
            raise MessageError(f"{what}: {len(engines)} labelled engines, {changed} changed since the last answer; "
                               f"statistics are shared over at least {k} (min_stats_engines)", Refusal.STATS_TOO_FEW_ENGINES)
        if self.buffer.rows < request.min_samples:
            raise MessageError(f"{what}: {self.buffer.rows} labelled rows, the request needs {request.min_samples}", Refusal.STATS_TOO_FEW_SAMPLES)
        if request.phase == "regimes":
            cells = self.buffer.regime_stats()
            if len(cells.cells) > MAX_CELLS:  # settings that vary continuously: no grid regimes to offer
                raise MessageError(f"{what}: labelled readings fall in {len(cells.cells)} settings-grid cells, over the {MAX_CELLS} "
                                   "a reply may carry", Refusal.STATS_UNAFFORDABLE)
            reply = StatsReply(request.request_id, self.site, self.buffer.rows, len(engines), regime_stats=cells)
        else:
            stats = self.buffer.stats(request.window, request.regimes)
            if request.secagg is not None:
                self._secure_stats(request, stats.to_vector(), spec_key, sorted(engines), answered)
                return
            reply = StatsReply(request.request_id, self.site, self.buffer.rows, len(engines), stats)
        self._report("stats", self.sealer.seal(signed.STATS, reply.to_payload()))
        self._stats_answered({"request_id": request.request_id, "spec": spec_key, "engines": sorted(engines),
                              "phases": [*answered, request.phase]})

    def _send_residuals(self, request: StatsRequest) -> None:
        """Conformal calibration (turbofed/conformal.py): the residual histogram of the global
        model the request names on this site's calibration engines — counts in the request's
        bins, never a residual — once per model version, over at least min_stats_engines engines."""
        what, k = f"stats request {request.request_id!r} (residuals of v{request.model_version})", self.config.min_stats_engines
        if self.fed_predictor is None or self.fleet_spec is None or self.settings is None or request.model_version != self.global_version:
            raise MessageError(f"{what}: this site predicts with global v{self.global_version}", Refusal.STALE_ROUND)
        if request.model_version == self.calibrated_version:
            raise MessageError(f"{what}: already answered for this version", Refusal.STATS_REPEATED)
        engines = self.holdout.engines
        if len(engines) < k:
            raise MessageError(f"{what}: {len(engines)} calibration engines; residuals are shared over at least {k} "
                               "(min_stats_engines; holdout_share holds engines out)", Refusal.STATS_TOO_FEW_ENGINES)
        runs = [CalibrationRun(e.cycles, e.settings, e.sensors, e.rul) for e in engines]
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(f"{self.site}/{request.model_version}".encode()).digest()[:8], "big"))
        hist = runs_histogram(self.fed_predictor.predict, self.fleet_spec, runs, request.layout, self.settings.rul_cap, rng)
        reply = StatsReply(request.request_id, self.site, self.holdout.rows, len(runs), residuals=hist)
        self._report("stats", self.sealer.seal(signed.STATS, reply.to_payload()))
        self.calibrated_version = request.model_version
        self.counters["sent.residuals"] += 1

    def _secure_stats(self, request: StatsRequest, vector: np.ndarray, spec_key: str, engines: list[str],
                      answered: list[str]) -> None:
        """Join the request's secure sum with our statistics (weight 1: the fleet gets the total)."""
        what = f"stats request {request.request_id!r}"
        if not np.all(np.abs(vector) <= request.secagg.clip):
            raise MessageError(f"{what}: this site's statistics exceed the secure sum's range (+-{request.secagg.clip:g})",
                               Refusal.STATS_UNAFFORDABLE)
        answer = {"request_id": request.request_id, "spec": spec_key, "engines": engines, "phases": [*answered, "features"]}

        def before_unmask(survivors: tuple[int, ...]) -> None:
            last = self.stats_answer
            if last is not None and last["spec"] == spec_key and last.get("survivors") not in (None, list(survivors)):
                raise MessageError(f"{what}: this site already unmasked the statistics of this spec with sites "
                                   f"{last['survivors']}; a sum over {list(survivors)} would give away the difference",
                                   Refusal.STATS_REPEATED)

        self.secure.join(request.secagg, vector, 1, "statistics", before_unmask=before_unmask,
                         after_unmask=lambda survivors: self._stats_answered({**answer, "survivors": list(survivors)}))

    def _stats_answered(self, answer: dict[str, Any]) -> None:
        self.stats_answer = answer
        self.counters["sent.stats"] += 1
        self.dirty = True
        self.save()  # the answer is spent even if the agent stops now

    def _stats_spec_key(self) -> str:
        """What one statistics answer is allowed per: the current fleet spec, or 'initial' before one."""
        if self.fleet_spec is None:
            return "initial"
        return hashlib.sha256(json.dumps(self.fleet_spec.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def on_global(self, payload: bytes) -> None:
        """A global model: signed by the aggregator for this fleet and epoch, newer than ours,
        and in a version the latest signed round announcement vouches for."""
        env = envelope.decode(payload)
        if env.kind != "global":
            raise MessageError(f"global topic carried a {env.kind!r} envelope", Refusal.BAD_GLOBAL)
        self.verifier.check_envelope(env, signer=signed.AGGREGATOR, epoch=self.epoch)
        self.aggregator_heard = True
        if env.model_version <= self.global_version:
            return  # the retained copy of a model we already have (or an older one: no rollback)
        if self.verifier.signed and (self.announced is None or env.model_version not in self.announced.versions):
            self.deferred_global = bytes(payload)  # taken if the next signed announcement names it
            latest = f"round {self.announced.round} vouches for v{self.announced.versions}" if self.announced else "none yet"
            raise MessageError(f"global v{env.model_version} was not announced by a signed round (latest: {latest})", Refusal.UNANNOUNCED_VERSION)
        try:
            predictor = self._predictor(env.body)
        except Exception as exc:  # onnxruntime raises its own types for what it cannot run
            raise MessageError(f"global model v{env.model_version}: onnxruntime cannot load it: {exc}", Refusal.NOT_ONNX) from None
        self.global_model, self.global_version, self.fed_predictor = env.body, env.model_version, predictor
        log.info("site %s: global model v%d received (round %d)", self.site, env.model_version, env.round)
        self.dirty = True
        self.save()  # global.onnx before state.json names its version
        self.publish_status(online=True)
        self.score_global()
        self.score_validation(env.round)
        if self.pending_round and self.global_version >= self.pending_round.model_version:
            announcement, self.pending_round = self.pending_round, None
            self.on_round(announcement)

    def score_global(self) -> None:
        """Score the global model on our labelled rows and tell the aggregator, whose rollback
        check compares versions by the sites' scores (aggregator/rollback.py). A model that
        predicts nothing finite gets the largest score we send."""
        if self.fleet_spec is None or self.settings is None or self.fed_predictor is None or self.buffer.rows < self.config.min_samples:
            return
        x, y = self.buffer.scoring_rows(self.fleet_spec, SCORE_ROWS)
        with np.errstate(all="ignore"):  # unclipped: a wrecked model's far-out outputs must count against it
            error = self.fed_predictor.predict_unclipped(x) - np.minimum(y, self.settings.rul_cap)
            rmse = float(np.sqrt(np.mean(error * error)))
        body = ModelEvaluation(self.site, self.global_version, min(rmse, MAX_EVALUATION_RMSE) if math.isfinite(rmse) else MAX_EVALUATION_RMSE, len(y))
        self._report("evaluation", self.sealer.seal(signed.EVALUATION, body.to_payload()))

    def score_validation(self, round_no: int) -> None:
        """The learning curve (issue #17): as each round's global model arrives, the RMSE of it
        and of this site's local model (trained in that round) on the site's validation
        engines (failed engines held out of training: `holdout_share`), sent as "validation"
        metrics for that round. A few thousand rows through two onnxruntime sessions, once a round."""
        if self.config.holdout_share <= 0 or self.fleet_spec is None or self.settings is None:
            return
        scores = []
        engines = 0
        for predictor, spec in ((self.local_predictor, self.local_spec), (self.fed_predictor, self.fleet_spec)):
            if predictor is None or spec is None:
                scores.append(ModelScore())
                continue
            x, y, engines = self.holdout.validation_rows(spec, SCORE_ROWS)
            if not engines:
                return  # no labelled engine held out yet
            with np.errstate(all="ignore"):
                error = rmse(predictor.predict(x), np.minimum(y, self.settings.rul_cap))
            scores.append(ModelScore(round(error, 4) if math.isfinite(error) else None, None, engines))
        body = Metrics(self.site, self.global_version, engines, scores[0], scores[1], on="validation", round=round_no)
        self._report("metrics", self.sealer.seal(signed.METRICS, body.to_payload()))
        self.counters["sent.validation"] += 1

    def _on_stats_request_payload(self, payload: bytes) -> None:
        request = StatsRequest.from_payload(self.verifier.open(signed.STATS_REQUEST, payload, signer=signed.AGGREGATOR).body)
        self.aggregator_heard = True
        self.on_stats_request(request)

    def _on_round_payload(self, payload: bytes) -> None:
        opened = self.verifier.open(signed.ROUND, payload, signer=signed.AGGREGATOR)
        self.aggregator_heard = True
        ann = RoundAnnouncement.from_payload(opened.body)
        opened.expect(round=ann.round, version=ann.version)
        self.on_round(ann)

    def _follow(self, ann: RoundAnnouncement) -> None:
        """Make `ann` the latest announcement: a higher epoch is a fleet reset (start again
        from no global model), a lower one or an older round is refused."""
        if ann.epoch < self.epoch:
            raise MessageError(f"round {ann.round} is from fleet epoch {ann.epoch}, we are at {self.epoch}", Refusal.STALE_EPOCH)
        if ann.epoch > self.epoch:
            log.warning("site %s: fleet reset to epoch %d: dropping global v%d", self.site, ann.epoch, self.global_version)
            self.epoch, self.global_version, self.global_model, self.fed_predictor = ann.epoch, -1, None, None
            self.announced = self.pending_round = None
            self.dirty = True
        elif self.announced is not None and ann.round < self.announced.round:
            raise MessageError(f"round {ann.round} announced after round {self.announced.round}", Refusal.STALE_ROUND)
        if self.pending_round is not None and self.pending_round.announce_id != ann.announce_id:
            self.pending_round = None  # superseded: a round we never got the starting model for
        self.announced = ann
        if self.deferred_global is not None:
            deferred, self.deferred_global = self.deferred_global, None
            if envelope.decode(deferred).model_version in ann.versions:
                self.on_global(deferred)

    def on_round(self, ann: RoundAnnouncement) -> None:
        self._follow(ann)
        if ann.spec is not None:  # also on the final 'done' announcement, for sites that join later
            self.fleet_spec = ann.spec
        if ann.intervals is not None:  # signed with the announcement; used while its model version is ours
            self.intervals = ann.intervals
        if ann.done or ann.announce_id in self.answered:
            return
        self.settings = ann.settings
        for predictor in (self.fed_predictor, self.local_predictor):  # a model that came before any settings
            if predictor is not None:
                predictor.cap = ann.settings.rul_cap
        if ann.model_version > self.global_version:
            self.pending_round = ann  # the retained global model is on its way
            return
        if time.time() > ann.deadline:
            log.info("site %s: round %d closed before we could take part", self.site, ann.round)
            self._answered(ann)
            return
        if not self.training:  # say so, so the round need not wait for us
            self._send(ann, "skip", b"", 0)
            return
        self._take_part(ann)

    def _take_part(self, ann: RoundAnnouncement) -> None:
        from turbofed.codec import flatten, parse_model, read_weights, replace_weights  # training profile only (onnx)
        from turbofed.edge.learner import RulModel

        r = ann.round
        min_samples = ann.min_samples if ann.min_samples is not None else self.config.min_samples
        if self.buffer.rows < min_samples:
            log.info("site %s: round %d: %d labelled rows < %d, sitting it out", self.site, r, self.buffer.rows, min_samples)
            self._send(ann, "skip", b"", self.buffer.rows)
            return
        started = time.perf_counter()
        if self.fed_learner is None or self.fed_learner.spec != self.fleet_spec or self.fed_learner.settings != self.settings:
            self.fed_learner = RulModel(self.settings, self.fleet_spec)
        global_model = parse_model(self.global_model)
        self.fed_learner.load_weights(read_weights(global_model))
        x, y = self.buffer.training_rows(self.fleet_spec)
        self.fed_learner.train(x, y, epochs=self.settings.local_epochs)
        weights = self.fed_learner.weights()
        if ann.dp is not None:  # distributed DP (docs/privacy.md): our delta clipped and noised before it leaves
            from turbofed.dpnoise import noised_delta, unseeded_rng

            weights = noised_delta(read_weights(global_model), weights, ann.dp.clip_norm, ann.dp.noise_std, unseeded_rng())
        if ann.secagg is not None:  # secure aggregation: only our masked delta leaves (edge/secure.py)
            start = read_weights(global_model)
            names = list(start)
            delta = flatten(weights, names) - flatten(start, names)
            weight = 1 if ann.dp is not None else ann.secagg.weight(len(x))
            self.secure.join(ann.secagg, delta, weight, f"round {r}")
            self.counters["sent.secure_update"] += 1
            self._answered(ann)
        else:
            # The update is the global model with our weights in it: the aggregator's graph, by construction.
            update = replace_weights(global_model, weights).SerializeToString()
            self._send(ann, "update", update, len(x))
        self._train_local()
        log.info("site %s: round %d trained on %d rows in %.1f s", self.site, r, len(x), time.perf_counter() - started)

    def _train_local(self) -> None:
        """The site-only model: own statistics, own data, the same epochs per round."""
        from turbofed.edge.learner import RulModel

        if self.local_learner is None:
            self.local_spec = self.buffer.spec(self.settings.window)
            self.local_learner = RulModel(self.settings, self.local_spec)
        x, y = self.buffer.training_rows(self.local_spec)
        self.local_learner.train(x, y, epochs=self.settings.local_epochs)
        self.local_predictor = self._predictor(self.local_learner.to_onnx())

    def _send_secure(self, kind: str, frame: bytes) -> None:
        """A secure-sum frame, straight to the broker (worthless once its phase has closed)."""
        self.client.publish(self.topics.site(self.site, kind), frame, qos=1)
        self.counters[f"sent.{kind}"] += 1

    def _send(self, ann: RoundAnnouncement, kind: str, body: bytes, samples: int) -> None:
        payload = self.sealer.envelope(kind=kind, round=ann.round, model_version=ann.model_version, samples=samples, body=body, epoch=self.epoch)
        self._report("update", payload, ann.round)
        self.counters[f"sent.{kind}"] += 1
        self._answered(ann)

    def _answered(self, ann: RoundAnnouncement) -> None:
        self.answered = (self.answered + [ann.announce_id])[-20:]
        self.dirty = True
        self.save()

    # --- reporting -------------------------------------------------------------------

    def publish_status(self, online: bool) -> None:
        status = Status(
            self.site,
            online,
            agent_version=turbofed.__version__,
            model_version=self.global_version if self.global_version >= 0 else None,
            samples=self.buffer.rows,
            profile="training" if self.training else "inference",
            at=time.time(),
            storage=self.storage.state,
            held_out=self.holdout.rows if self.config.holdout_share > 0 else None,
        )
        self._reported_rows = self.buffer.rows + self.holdout.rows
        # Retained and sent again at every connect: not queued while the broker is away.
        if self.client is not None and (self.client.is_connected() or not online):
            self.client.publish(self.topics.status(self.site), self.sealer.seal(signed.STATUS, status.to_payload()), qos=1, retain=True)

    def flush(self) -> None:
        """Send batched predictions and fresh metrics; forget idle engines; save state if it
        changed. A batch that cannot be sent (a bug) is dropped and counted: the loop goes on."""
        try:
            self._flush()
        except Exception:
            self.pending_rows, self.pending_truth, self.pending_sensors = [], [], []
            self.metrics_dirty = False
            self._internal_error("flush", "publishing reports (the batch was dropped)")
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + SWEEP_EVERY_S
            self.evict_idle()

    def _flush(self) -> None:
        heard = self.aggregator_heard or self.global_version >= 0 or self.fleet_spec is not None  # a model or spec came from one
        if not heard:  # no one records them yet: hold, bounded (the oldest go first)
            for held in (self.pending_rows, self.pending_truth):
                if len(held) > MAX_HELD_REPORT_ROWS:
                    self.counters["dropped.held_reports"] += len(held) - MAX_HELD_REPORT_ROWS
                    del held[: len(held) - MAX_HELD_REPORT_ROWS]
        while heard and (self.pending_rows or self.pending_truth):
            rows, self.pending_rows = self.pending_rows[:MAX_PREDICTION_ROWS], self.pending_rows[MAX_PREDICTION_ROWS:]
            truth, self.pending_truth = self.pending_truth[:MAX_PREDICTION_ROWS], self.pending_truth[MAX_PREDICTION_ROWS:]
            body = Predictions(self.site, tuple(rows), tuple(truth))
            self._report("predictions", self.sealer.seal(signed.PREDICTIONS, body.to_payload()))
        while self.pending_sensors:
            rows, self.pending_sensors = self.pending_sensors[:MAX_TELEMETRY_ROWS], self.pending_sensors[MAX_TELEMETRY_ROWS:]
            self._report("telemetry", self.sealer.seal(signed.TELEMETRY, Telemetry(self.site, tuple(rows)).to_payload()))
        if self.metrics_dirty:
            self._report("metrics", self.sealer.seal(signed.METRICS, self.metrics().to_payload()))
            self.metrics_dirty = False
        if self.buffer.rows + self.holdout.rows != self._reported_rows:  # the dashboard shows training samples per site
            self.publish_status(online=True)
        if self.dirty and time.monotonic() - self._last_save > SAVE_EVERY_S:
            self.save()

    def _report(self, kind: str, payload: bytes, round_no: int | None = None) -> None:
        """Queue a report in the outbox (sent in order, kept until the broker has it)."""
        self.outbox.put(kind, payload, self.client, round_no)
        self.outbox.pump(self.client)

    def metrics(self) -> Metrics:
        """Local vs federated on engines whose true RUL is known (prediction at the truth cycle)."""
        truth = np.array([v[0] for v in self.scored.values()], dtype=float)
        scores = []
        for k in (1, 2):  # local, federated
            pred = [v[k] for v in self.scored.values()]
            ok = np.array([p is not None for p in pred], dtype=bool)
            if ok.any():
                p = np.array([x for x in pred if x is not None], dtype=float)
                scores.append(ModelScore(round(rmse(p, truth[ok]), 4), round(phm08_score(p, truth[ok]), 2), int(ok.sum())))
            else:
                scores.append(ModelScore())
        counters = {**self.counters, **self.watch.counters(), "outbox.pending": self.outbox.pending}
        return Metrics(self.site, self.global_version, len(self.scored), scores[0], scores[1], counters)

    # --- persistence -----------------------------------------------------------------

    def save(self) -> None:
        """Everything needed to resume, each file replaced atomically (docs/agent-state.md).
        A folder that is full or read-only fails the save, never the agent: the previous files
        stay whole, the agent goes on from memory and the next save tries again."""
        try:
            self._write_state()
        except OSError as exc:
            self._last_save = time.monotonic()  # dirty stays set: tried again in SAVE_EVERY_S
            if self.storage.failed(exc, self.buffer.rows):
                self.publish_status(online=True)
            return
        self.dirty = False
        self._last_save = time.monotonic()
        if self.storage.saved(self.buffer.rows):
            self.publish_status(online=True)

    def _write_state(self) -> None:
        if self.global_model is not None and self._saved_global != self.global_version:
            write_atomic(self.state_dir / GLOBAL_ONNX, self.global_model)
            self._saved_global = self.global_version
        self.buffer.save(self.state_dir / BUFFER_NPZ)
        if self.holdout.engines or (self.state_dir / HOLDOUT_NPZ).exists():
            self.holdout.save(self.state_dir / HOLDOUT_NPZ)
        in_service = [(e, *t.history(), np.zeros(t.n)) for e, t in self.engines.items()]
        save_histories(self.state_dir / ENGINES_NPZ, in_service, settings=[t.settings[: t.n] for t in self.engines.values()])
        state = AgentState(self.answered, self.global_version, self.settings, self.fleet_spec, self.scored, dict(self.counters),
                           epoch=self.epoch, stats_answer=self.stats_answer)
        write_atomic(self.state_dir / STATE_JSON, state.to_json())
        if self.training and (self.fed_learner or self.local_learner):
            save_learners(self.state_dir / LEARNERS_NPZ, {"federated": self.fed_learner, "local": self.local_learner})

    def _restore(self) -> None:
        """Read the state folder; any file that cannot be used raises StateError (naming it)
        before anything is changed, so the agent stops and the files stay as they are."""
        self.buffer = TrainingBuffer.load(self.state_dir / BUFFER_NPZ, self.config.buffer_rows)
        self.holdout = TrainingBuffer.load(self.state_dir / HOLDOUT_NPZ, self.config.buffer_rows)
        path = self.state_dir / STATE_JSON
        if not path.exists():
            retire_legacy_learners(self.state_dir)
            return
        state = AgentState.read(path)
        in_service = load_histories(self.state_dir / ENGINES_NPZ)[0]
        in_service_settings = load_history_settings(self.state_dir / ENGINES_NPZ, [len(c) for _, c, _, _ in in_service])
        global_onnx = self.state_dir / GLOBAL_ONNX
        cap = None if state.settings is None else state.settings.rul_cap
        saved_global = load_global(global_onnx, cap) if global_onnx.exists() and state.global_version >= 0 else None
        learners = self.state_dir / LEARNERS_NPZ
        saved_learners = load_learners(learners) if self.training and learners.exists() else {}
        # Everything read and checked: now take it.
        self.answered, self.settings, self.fleet_spec = state.answered, state.settings, state.fleet_spec
        self.scored, self.epoch = state.scored, state.epoch
        self.counters.update(state.counters)
        self.stats_answer = state.stats_answer
        self.aggregator_heard = state.stats_answer is not None or bool(state.answered)
        for (engine, cycles, sensors, _), settings in zip(in_service, in_service_settings):
            keep = slice(-self.config.history_cycles, None)  # a smaller limit than when saved: the newest
            self.engines[engine] = EngineTrack(cycles[keep], sensors[keep], settings[keep])
        if saved_global is not None:
            (self.global_model, self.fed_predictor), self.global_version = saved_global, state.global_version
            self._saved_global = state.global_version
        self.fed_learner, self.local_learner = saved_learners.get("federated"), saved_learners.get("local")
        if self.local_learner is not None:
            self.local_spec = self.local_learner.spec
            self.local_predictor = self._predictor(self.local_learner.to_onnx())
        retire_legacy_learners(self.state_dir)
        log.info("site %s: resumed from %s (global v%d, %d labelled rows, %d engines in service)", self.site, self.state_dir, self.global_version, self.buffer.rows, len(self.engines))


def run_cli(args: argparse.Namespace) -> int:
    config = load_site_config(args.config)
    agent = EdgeAgent(config, training=getattr(args, "profile", "training") != "inference")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    from turbofed.observability import serve_agent_metrics  # Prometheus: only with metrics_port in site.toml

    serve_agent_metrics(agent, config.metrics_address, config.metrics_port)
    agent.start()
    log.info("site %s: agent running (broker %s:%d, state %s)", config.site, config.broker.host, config.broker.port, config.state_dir)
    agent.run(stop)
    return 0
