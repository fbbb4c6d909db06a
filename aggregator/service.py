"""The aggregator service: fleet statistics first, then rounds, recording everything.

1. Federated analytics: ask every site for count, sums and sums of squares of its labelled
   data; their sum fixes the fleet's feature spec (sensors, normalisation).
2. Round 0: the aggregator builds global v0 itself, the fleet's reference graph for the
   spec and the model settings (turbofed.graph) with seeded initial weights, and publishes
   it; sites propose nothing. Every later update must be that graph with other weights.
3. Rounds 1..R: announce (retained), collect updates until quorum or deadline, validate
   each, aggregate with the strategy, checkpoint, then publish global v_r (retained).
It keeps recording site status, metrics and predictions in the results store until
stopped. A restarted aggregator resumes from its last checkpoint: no round is repeated
or skipped, and the retained global model is published again.

It signs every round announcement, statistics request and global model with the fleet's
aggregator key, and checks every site message against that site's key from the fleet's
identity folder (docs/protocol.md, "Signed messages").
"""

from __future__ import annotations

import argparse
import logging
import queue
import signal
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Callable

import onnx

from turbofed.aggregator.registry import ModelRegistry, RegistryError
from turbofed.aggregator.rollback import ModelGuard, Verdict
from turbofed.aggregator.rounds import Rejected, Round
from turbofed.aggregator.strategies import SiteUpdate, make_strategy, merge, round_report
from turbofed.codec import check_graph, read_weights
from turbofed.config import FleetConfig, load_fleet_config, require_writable_dir
from turbofed.errors import Refused, WeightsError
from turbofed.graph import reference_model
from turbofed.messages import (
    Metrics,
    ModelEvaluation,
    Predictions,
    RoundAnnouncement,
    StatsReply,
    StatsRequest,
    Status,
    Telemetry,
    signed,
)
from turbofed.mqtt import Subscriptions, client_id, connect, make_client
from turbofed.ratelog import LOG_INTERVAL_S, RateLimitedLog, RefusalLog, Throttle
from turbofed.refusals import Refusal
from turbofed.spec import FeatureSpec, FleetStats
from turbofed.store import open_store
from turbofed.topics import Topics

log = logging.getLogger("turbofed.aggregator")

AGGREGATOR_SITE = signed.AGGREGATOR  # the `site` field of envelopes the aggregator sends
REJECTION_ROW_INTERVAL_S = LOG_INTERVAL_S  # the store gets one rejection row per (site, reason) per interval


class Aggregator:
    """Runs the fleet's rounds over MQTT and records what the sites report."""

    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        # First, so a bad [strategy] stops us before anything is opened (ConfigError names file and key).
        self.strategy = make_strategy(config.strategy.name, config.strategy.params, config.strategy.where)
        # What every record of this run says it ran with: the configured name, all parameters.
        self.strategy_record = {"strategy": config.strategy.name, "strategy_params": self.strategy.parameters()}
        self.topics = Topics(config.broker.topic_root, config.broker.plant_root)
        require_writable_dir(config.registry, "registry")  # at start, with the path, not at the first checkpoint
        # Points wait here while InfluxDB is away (unused with SQLite).
        spool = Path(config.registry).parent / "influx-spool"
        self.store = open_store(config.store, spool_dir=spool, influx=config.influx)
        self.registry = ModelRegistry(config.registry)
        try:
            self.sealer, self.verifier = signed.aggregator_keys(config.pki)
        except BaseException:
            self.store.close()
            self.registry.close()
            raise
        self.counters: Counter[str] = Counter()  # refusals, by reason
        # Refusals: counted, the last 100 kept as samples (self.refusals.recent), logged once a
        # minute per reason; the store gets one row per (site, reason) per interval, then a
        # row saying how many more there were (bounded whatever a site sends).
        self.refusals = RefusalLog(log, "rejected from %s (%s, #%d): %s")
        self._rejection_rows = Throttle(REJECTION_ROW_INTERVAL_S)
        self._next_rows_check = 0.0
        self._errors = RateLimitedLog(log)
        self.ignored = 0  # messages on topics we never subscribed to
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.model: onnx.ModelProto | None = None
        self.version = -1
        self.spec: FeatureSpec | None = None
        self.stats: FleetStats | None = None
        self.round: Round | None = None
        self.guard = ModelGuard(config.rollback_margin)  # the last good model, by the sites' own scores
        self.stats_replies: dict[str, StatsReply] = {}
        self.stats_request_id = ""
        self.client = None
        # Who handles each kind of site topic; a kind missing here is refused, not looked up by name.
        self._handlers: dict[str, Callable[[str, bytes], None]] = {
            "update": self._on_update,
            "stats": self._on_stats,
            "status": self._on_status,
            "metrics": self._on_metrics,
            "predictions": self._on_predictions,
            "telemetry": self._on_telemetry,
            "evaluation": self._on_evaluation,
        }
        try:
            self._resume()
        except BaseException:
            self.store.close()
            self.registry.close()
            raise
        signed.warn_if_unsigned(self.sealer, "the aggregator")

    # --- start, resume ---------------------------------------------------------------

    def _resume(self) -> None:
        ckpt = self.registry.latest()
        if ckpt is None:
            self.store.record_event("started", dict(self.strategy_record), time.time())
            return
        self.version = ckpt.version
        try:
            self.spec = FeatureSpec.from_dict(ckpt.fleet["spec"])
            self.stats = FleetStats.from_dict(ckpt.fleet["stats"])
        except (KeyError, TypeError, ValueError) as exc:
            raise RegistryError(
                f"checkpoint v{ckpt.version} in {self.registry.folder} holds fleet statistics or a feature spec this "
                f"turbofed cannot use ({exc}); it was probably written by an older version. It is left as it is: "
                "start this fleet with a new registry folder."
            ) from None
        # The checkpoint's weights, in the reference graph this fleet.toml's [model] makes.
        try:
            weights = check_graph(onnx.load_model_from_string(ckpt.model), reference_model(self.spec, self.config.model))
        except (WeightsError, ValueError) as exc:
            raise RegistryError(
                f"checkpoint v{ckpt.version} in {self.registry.folder} is not the model this fleet config's [model] "
                f"settings make ({exc}); restore the settings it was made with, or start with a new registry folder."
            ) from None
        self.model = reference_model(self.spec, self.config.model, weights)
        self.strategy.load_state(ckpt.strategy_state)
        self.guard.last_good = int(ckpt.fleet.get("last_good", ckpt.version))
        log.info("resumed from checkpoint v%d (round %d)", ckpt.version, ckpt.round)
        previous = {k: ckpt.fleet[k] for k in self.strategy_record if k in ckpt.fleet}
        if previous and previous != self.strategy_record:
            log.warning("checkpoint v%d was made with %s; continuing with %s", ckpt.version, previous, self.strategy_record)
        self.store.record_event("resumed", {"version": ckpt.version, "round": ckpt.round, **self.strategy_record}, time.time())

    def start(self) -> None:
        self.client = make_client(client_id("aggregator", self.config.broker), self.config.broker, persistent_session=True)
        self.client.on_message = lambda c, u, msg: self.inbox.put((msg.topic, msg.payload))
        self.client.on_connect = self._on_connect
        self.subscriptions = Subscriptions(self.client, [self.topics.all_sites(k) for k in self._handlers])
        connect(self.client, self.config.broker)  # runs _on_connect: subscribe, say we are online
        self.subscriptions.wait()
        if self.model is not None:
            self._publish_global()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code is not None and reason_code.is_failure:
            return
        self.subscriptions.subscribe()

    # --- main loop -------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Statistics, then rounds until the configured number is done, then keep recording."""
        if self.client is None:
            self.start()
        if self.spec is None:
            self._collect_stats(stop)
        if self.model is None and not stop.is_set():
            self._initial_model()
        while not stop.is_set() and self.version < self.config.model.rounds:
            self._run_round(self.version + 1, stop)
        if not stop.is_set():
            self._announce(RoundAnnouncement(self.version, self.spec, done=True, epoch=self.config.epoch))
            log.info("all %d rounds done; recording site reports until stopped", self.config.model.rounds)
        while not stop.is_set():
            self.pump(0.2)
        self.client.disconnect()
        self.client.loop_stop()
        self._record_held_rejections(everything=True)
        self.store.close()
        self.registry.close()

    def pump(self, timeout: float) -> None:
        """Handle one message (or wait up to `timeout`). Nothing a site sends can stop us."""
        if time.monotonic() >= self._next_rows_check:
            self._next_rows_check = time.monotonic() + 1.0
            self._record_held_rejections()
        try:
            topic, payload = self.inbox.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return
        if not topic.startswith(self.topics.root + "/sites/"):
            # Not a topic we subscribed to: the embedded broker (amqtt 0.12) can hand a
            # resumed session retained messages of unrelated topics. Broker noise, not input.
            self.ignored += 1
            log.debug("ignored a message on unsubscribed topic %s", topic)
            return
        site = "?"
        try:
            site, kind = self.topics.parse_site(topic)
            if site not in self.config.sites:
                raise Rejected(Refusal.UNKNOWN_SITE, f"site {site!r} is not in the fleet config")
            handler = self._handlers.get(kind)
            if handler is None:
                raise Rejected(Refusal.UNKNOWN_KIND, f"{topic}: no handler for site messages of kind {kind!r}")
            handler(site, payload)
        except Rejected as exc:
            self._reject(site, exc.reason, str(exc))
        except Refused as exc:
            self._reject(site, exc.reason, f"{topic}: {exc}")
        except Exception:
            self.counters[Refusal.INTERNAL_ERROR.value] += 1
            self._errors.warning(Refusal.INTERNAL_ERROR, "failed to handle a message on %s", topic[:300], exc_info=True)

    def _reject(self, site: str, reason: Refusal, detail: str) -> None:
        self.refusals.refused(self.counters, reason.value, site, reason.value, detail)
        if self._rejection_rows.allow((site, reason.value)) is not None:
            self.store.record_rejection(self._round_number(), site, reason.value, detail[:1000], time.time())

    def _round_number(self) -> int | None:
        return self.round.number if self.round else None

    def _record_held_rejections(self, everything: bool = False) -> None:
        """One row per (site, reason) whose interval has passed with refusals held back: how many."""
        held = list(self._rejection_rows.held.items()) if everything else self._rejection_rows.due()
        for (site, reason), n in held:
            detail = f"{n} more like it not stored one by one (at most one row per site and reason every {REJECTION_ROW_INTERVAL_S:.0f} s)"
            self.store.record_rejection(self._round_number(), site, reason, detail, time.time())
        if everything:
            self._rejection_rows.held.clear()

    # --- phase 1: federated statistics ------------------------------------------------

    def _collect_stats(self, stop: threading.Event) -> None:
        """Until a quorum of sites has enough labelled data, or the round deadline has
        passed with at least one: a site that is down must not hold the fleet back."""
        needed = self.config.effective_quorum
        next_request = 0.0
        give_up = time.monotonic() + self.config.round_deadline_s
        # One request, re-sent until enough sites have answered: a site answers a spec's
        # statistics once (edge/agent.py on_stats_request), so a new id would not get a new answer.
        self.stats_request_id = uuid.uuid4().hex
        while not stop.is_set():
            ready = {s: r for s, r in self.stats_replies.items() if r.samples >= self.config.min_samples and r.stats is not None}
            if len(ready) >= needed or (ready and time.monotonic() >= give_up):
                break
            if time.monotonic() >= next_request:
                request = StatsRequest(self.stats_request_id, self.config.min_samples, self.config.model.window)
                payload = self.sealer.seal(signed.STATS_REQUEST, request.to_payload())
                self.client.publish(self.topics.stats_request, payload, qos=1, retain=True)
                next_request = time.monotonic() + self.config.stats_retry_s
                log.info("asked sites for fleet statistics (%d of %d ready)", len(ready), needed)
            self.pump(0.2)
        if stop.is_set():
            return
        self.stats = sum((r.stats for r in ready.values()), FleetStats())
        self.spec = FeatureSpec.from_stats(self.stats, self.config.model.window)
        self.client.publish(self.topics.stats_request, b"", qos=1, retain=True)  # clear the request
        detail = {"sites": sorted(ready), "rows": int(self.stats.count), "sensors": [i + 1 for i in self.spec.sensors]}
        log.info("fleet statistics from %d sites, %d labelled cycles; informative sensors %s", len(ready), self.stats.count, detail["sensors"])
        self.store.record_event("fleet_statistics", detail, time.time())

    def _on_stats(self, site: str, payload: bytes) -> None:
        reply = StatsReply.from_payload(self.verifier.open(signed.STATS, payload, signer=site).body, site=site)  # statistics validated now, not when summing
        if reply.request_id != self.stats_request_id:
            return  # an answer to an older request
        if reply.stats is not None and reply.stats.window != self.config.model.window:
            raise Rejected(Refusal.BAD_STATS, f"stats from {site} are for a {reply.stats.window}-cycle window, not {self.config.model.window}")
        self.stats_replies[site] = reply

    # --- phase 2: rounds -------------------------------------------------------------

    def _initial_model(self) -> None:
        """Round 0: global v0 is the reference graph for the fleet's spec and settings with
        seeded initial weights, built here (no site proposes it), checkpointed and published."""
        started = time.time()
        model = reference_model(self.spec, self.config.model)
        self._commit(0, model, started, [], 0.0, "initial")
        log.info("round 0: built and published global v0 (%s, seed %d)", self.config.model.kind, self.config.model.seed)

    def _announce(self, announcement: RoundAnnouncement) -> None:
        payload = self.sealer.seal(signed.ROUND, announcement.to_payload(), round=announcement.round, version=announcement.version)
        self.client.publish(self.topics.round, payload, qos=1, retain=True)

    def _run_round(self, number: int, stop: threading.Event) -> None:
        now = time.time()
        self.round = Round(number, self.version, uuid.uuid4().hex, now, now + self.config.round_deadline_s, self.config.sites)
        self._announce(
            RoundAnnouncement(
                number,
                self.spec,
                announce_id=self.round.announce_id,
                model_version=self.round.model_version,
                deadline=self.round.deadline,
                settings=self.config.model,
                min_samples=self.config.min_samples,
                strategy=self.strategy.name,
                epoch=self.config.epoch,
            )
        )
        log.info("round %d announced (from global v%d, deadline %.0f s)", number, self.round.model_version, self.config.round_deadline_s)
        closed_by = None
        while not stop.is_set():
            closed_by = self.round.complete(self.config.effective_quorum)
            if closed_by or time.time() >= self.round.deadline:
                closed_by = closed_by or "deadline"
                break
            self.pump(min(0.2, self.round.deadline - time.time()))
        if stop.is_set():
            return
        if not self.round.accepted:
            log.warning("round %d closed by %s with no usable update; announcing it again", number, closed_by)
            self.store.record_event("round_empty", {"round": number, "closed_by": closed_by, "skipped": sorted(self.round.skipped)}, time.time())
            stop.wait(self.config.stats_retry_s)
            return
        self._close_round(closed_by)

    def _on_update(self, site: str, payload: bytes) -> None:
        if self.round is None:
            raise Rejected(Refusal.STALE_ROUND, "no round is open")
        accepted = self.round.check(site, payload, self.model, self.config.max_update_bytes, self.verifier, self.config.epoch)
        if accepted:
            log.info("round %d: update from %s (%d samples, %d bytes)", self.round.number, site, accepted.samples, accepted.wire_bytes)

    def _close_round(self, closed_by: str) -> None:
        r = self.round
        last_update = max(a.received for a in r.accepted.values())
        verdict = self.guard.judge(self.version)  # the model this round started from, by the sites' scores
        if verdict.bad:
            self._roll_back(verdict, last_update)
            return
        updates = [SiteUpdate(a.site, a.weights, a.samples) for a in r.accepted.values()]
        model = merge(self.strategy, self.model, updates)  # updates were checked on arrival; only their weights are used
        report = round_report(self.strategy, read_weights(self.model), updates, read_weights(model))
        participants = [{"site": a.site, "samples": a.samples, "update_bytes": a.wire_bytes, **report[a.site]} for a in r.accepted.values()]
        self._commit(r.number, model, r.started, participants, last_update, closed_by)
        log.info("round %d closed by %s: %d updates, global v%d published", r.number, closed_by, len(participants), self.version)
        self.round = None

    def _roll_back(self, verdict: Verdict, last_update: float) -> None:
        """Global v`verdict.version` scored clearly worse at the sites than v`verdict.against`:
        this round's updates (trained from the bad model) are set aside and the last good
        weights are published again as the next version, the round flagged `rollback`."""
        r = self.round
        weights = check_graph(onnx.load_model_from_string(self.registry.get(verdict.against)), self.model)
        model = reference_model(self.spec, self.config.model, weights)
        participants = [{"site": a.site, "samples": a.samples, "update_bytes": a.wire_bytes, "norm": None, "cosine": None,
                         "action": "excluded"} for a in r.accepted.values()]
        log.warning("round %d: global v%d scored %.2fx the RMSE of v%d at %d site(s) (margin %.0f%%): publishing v%d's "
                    "weights again as v%d; this round's updates set aside", r.number, verdict.version, verdict.ratio,
                    verdict.against, verdict.sites, 100 * self.config.rollback_margin, verdict.against, r.number)
        self.store.record_event("rollback", {"round": r.number, **verdict.detail()}, time.time())
        self._commit(r.number, model, r.started, participants, last_update, "rollback")
        self.round = None

    def _commit(self, number: int, model: onnx.ModelProto, started: float, participants: list[dict], last_update: float, closed_by: str) -> None:
        """Global v`number`: checkpoint it (before publishing), publish it retained, record the round."""
        fleet = {"stats": self.stats.to_dict(), "spec": self.spec.to_dict(), "last_good": self.guard.last_good, **self.strategy_record}
        self.registry.save(number, number, model.SerializeToString(), self.strategy.state(), fleet)
        self.model, self.version = model, number
        self._publish_global()
        closed = time.time()
        aggregate_ms = (closed - last_update) * 1000.0 if last_update else 0.0
        self.store.record_round(number, self.version, started, closed, participants, aggregate_ms, self.strategy_record["strategy"], closed_by, self.strategy_record["strategy_params"])

    def _publish_global(self) -> None:
        data = self.model.SerializeToString()
        total = sum(a.samples for a in self.round.accepted.values()) if self.round else 0
        payload = self.sealer.envelope(kind="global", round=self.version, model_version=self.version, samples=total, body=data, epoch=self.config.epoch)
        self.client.publish(self.topics.global_model, payload, qos=1, retain=True)

    # --- what sites report -----------------------------------------------------------

    def _on_status(self, site: str, payload: bytes) -> None:
        if not payload:
            return  # a retained status being cleared
        s = Status.from_payload(self.verifier.open(signed.STATUS, payload, signer=site).body, site=site)
        self.store.record_status(site, s.online, s.at or time.time(), s.agent_version, s.model_version, s.samples)

    def _on_metrics(self, site: str, payload: bytes) -> None:
        m = Metrics.from_payload(self.verifier.open(signed.METRICS, payload, signer=site).body, site=site)
        self.store.record_metrics(site, self.version, m.model_version, m.to_dict(), time.time())

    def _on_evaluation(self, site: str, payload: bytes) -> None:
        """A site's RMSE of a global version on its labelled rows: what the rollback check uses."""
        e = ModelEvaluation.from_payload(self.verifier.open(signed.EVALUATION, payload, signer=site).body, site=site)
        if not self.guard.record(site, e.model_version, e.rmse, newest=self.version):
            raise Rejected(Refusal.STALE_ROUND, f"evaluation of v{e.model_version} from {site}: not a recent version (newest v{self.version})")

    def _on_predictions(self, site: str, payload: bytes) -> None:
        p = Predictions.from_payload(self.verifier.open(signed.PREDICTIONS, payload, signer=site).body, site=site)
        now = time.time()
        if p.rows:
            self.store.record_predictions(site, list(p.rows), now)
        for engine, cycle, rul in p.truth:
            self.store.record_truth(site, engine, cycle, rul, now)

    def _on_telemetry(self, site: str, payload: bytes) -> None:
        """Raw sensor rows, from a site whose config shares them."""
        t = Telemetry.from_payload(self.verifier.open(signed.TELEMETRY, payload, signer=site).body, site=site)
        if t.rows:
            self.store.record_sensors(site, [(e, c, list(st), list(se)) for e, c, st, se in t.rows], time.time())


def run_cli(args: argparse.Namespace) -> int:
    config = load_fleet_config(args.config)
    aggregator = Aggregator(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    aggregator.start()
    log.info("aggregator running: %d sites, quorum %d, %d rounds, strategy %s", len(config.sites), config.effective_quorum, config.model.rounds, config.strategy.name)
    aggregator.run(stop)
    return 0
