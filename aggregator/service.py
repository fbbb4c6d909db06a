"""The aggregator service: fleet statistics first, then rounds, recording everything.

1. Federated analytics: ask every site for count, sums and sums of squares of its labelled
   data; their sum fixes the fleet's feature spec (sensors, normalisation).
2. Round 0: the aggregator builds global v0 itself, the fleet's reference graph for the
   spec and the model settings (turbofed.graph) with seeded initial weights, and publishes
   it; sites propose nothing. Every later update must be that graph with other weights.
3. Rounds 1..R: announce (retained), collect updates until quorum or deadline, validate
   each, weigh each by what is known of the site (aggregator/weights.py), aggregate with
   the strategy, then in this order: checkpoint, record the round in the store, publish
   global v_r (retained). A model is never out before its round is on disk.
It keeps recording site status, metrics and predictions in the results store until
stopped. A restarted aggregator resumes from its last checkpoint (recording the round in
the store from the checkpoint if it died in between): no round is repeated or skipped,
and the retained global model is published again.

Faults (docs/operations.md): a full or read-only disk holds the round's commit back, with
one clear log line per interval and a "disk_full" event, until there is room; rounds that
get no usable update `max_empty_rounds` times in a row report "stalled" and are
re-announced every `stall_retry_s` (or at once when a site comes back online).

It signs every round announcement, statistics request and global model with the fleet's
aggregator key, and checks every site message against that site's key from the fleet's
identity folder (docs/protocol.md, "Signed messages").

With `[regions]` it is the top of a two-level fleet: the sites of a region reach it only
through their regional aggregator's signed partial (aggregator/regional.py), which it
checks, adds to the round's running sums and counts site by site toward the quorum. With
`workers`, it does not subscribe to site updates at all: ingestion workers share them
through an MQTT shared subscription and send signed batch partials, several a round.
"""

from __future__ import annotations

import argparse
import logging
import math
import queue
import signal
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from paho.mqtt import client as mqtt_client

from turbofed.aggregator.diskspace import DiskWatch, check_registry_folder, disk_problem
from turbofed.aggregator.faults import kill_point
from turbofed.aggregator.registry import Checkpoint, RegistryError
from turbofed.aggregator.rollback import ModelGuard, Verdict
from turbofed.aggregator.rounds import Accepted, Rejected, Round
from turbofed.aggregator.secure import SITE_KINDS as SECURE_KINDS
from turbofed.aggregator.secure import SecureCollection
from turbofed.aggregator.secure_rounds import SecureRounds
from turbofed.aggregator.startup import open_registry
from turbofed.aggregator.strategies import STRATEGIES, ServerOptimizer, SiteUpdate, make_strategy, merge, round_report
from turbofed.aggregator.streaming import RunningSum
from turbofed.aggregator.weights import Weight, capped_weights, header_samples, observe_samples, participant_action
from turbofed.codec import Weights, check_graph, read_weights, replace_weights
from turbofed.config import FleetConfig, load_fleet_config
from turbofed.conformal import IntervalTable, Layout, ResidualHistogram
from turbofed.errors import ConfigError, Refused, WeightsError
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
from turbofed.mqtt import ConnectionWatch, Subscriptions, client_id, connect, make_client, message_inbox, on_message_into
from turbofed.ratelog import LOG_INTERVAL_S, RateLimitedLog, RefusalLog, Throttle
from turbofed.refusals import Refusal
from turbofed.spec import FeatureSpec, FleetStats, Regimes, RegimeStats
from turbofed.store import open_store
from turbofed.topics import Topics, natural_key

log = logging.getLogger("turbofed.aggregator")

AGGREGATOR_SITE = signed.AGGREGATOR  # the `site` field of envelopes the aggregator sends
REJECTION_ROW_INTERVAL_S = LOG_INTERVAL_S  # the store gets one rejection row per (site, reason) per interval
STORE_FLUSH_S = 10.0  # at most this long for a batching store to confirm a round before its model is published
# The residuals phase (one-shot conformal calibration) closes when every site has answered, or
# this long after a quorum has: every held-out engine narrows the intervals' uncertainty.
SETTLE_AFTER_QUORUM_S = 10.0
DISK_RETRY_S = 2.0  # a commit held back by a full disk is retried this often (logged once per LOG_INTERVAL_S)


def checkpointed_regions(regions: object, number: int) -> dict[str, dict] | None:
    """The regions' totals of a checkpointed round record, each entry checked (a damaged one
    is left out with a warning rather than stopping the start)."""
    if not isinstance(regions, dict):
        return None
    keys = ("sites", "samples", "update_bytes")
    good = {name: totals for name, totals in regions.items() if isinstance(totals, dict)
            and all(isinstance(totals.get(k), int) and not isinstance(totals.get(k), bool) for k in keys)}
    if len(good) < len(regions):
        log.warning("round %d's checkpointed record: left out the totals of region(s) %s (not {sites, samples, "
                    "update_bytes} integers)", number, ", ".join(sorted(str(n) for n in set(regions) - set(good)))[:300])
    return good


def round_samples(record: dict) -> int:
    """A round's `samples` header: its participants' weights, and the Σ w of each region that
    sent a summary partial (its sites' rows carry none)."""
    return header_samples([p.get("samples", 0) for p in record.get("participants", [])]
                          + [r.get("samples", 0) for r in record.get("regions", {}).values()])


class Aggregator(SecureRounds):
    """Runs the fleet's rounds over MQTT and records what the sites report (secure rounds:
    aggregator/secure_rounds.py)."""

    def __init__(self, config: FleetConfig, *, reset: bool = False, config_path: str = "fleet.toml") -> None:
        """`reset`: archive the registry and start a new fleet epoch (`turbofed aggregator --reset`)."""
        self.config = config
        # First, so a bad [strategy] stops us before anything is opened (ConfigError names file and key).
        self.strategy = make_strategy(config.strategy.name, config.strategy.params, config.strategy.where)
        self.dp = None  # [privacy]: DP-FedAvg around the strategy, with its accountant (aggregator/privacy.py)
        if config.privacy is not None:
            from turbofed.aggregator.privacy import private_strategy

            self.dp = self.strategy = private_strategy(self.strategy, config.privacy, config.model.rounds, len(config.sites),
                                                       f"{config_path}: [privacy]")
        self.secure_settings = config.secure_aggregation
        self.secure: SecureCollection | None = None  # the open secure-sum session (docs/privacy.md)
        self.last_secure: SecureCollection | None = None  # the latest session, open or not (its byte counts)
        if self.secure_settings is not None:
            _check_secure_strategy(self.strategy if self.dp is None else self.dp.inner, f"{config_path}: [secure_aggregation]")
        # Streaming aggregation (aggregator/streaming.py): the FedAvg family folds updates into
        # running sums as they arrive; strategies that need every update keep them.
        self.streaming = self.secure_settings is None and _needs_only_the_sum(self.strategy if self.dp is None else self.dp.inner)
        if (config.regions or config.workers) and not self.streaming:
            raise ConfigError(f"{config_path}: {'[regions]' if config.regions else 'workers'} needs a FedAvg-family strategy ({', '.join(STRATEGIES)}, without "
                              f"clip): a region sends the sum of its sites' updates, and strategy {config.strategy.name!r} "
                              "needs every update")
        self.running: RunningSum | None = None
        self.arrival_weights: dict[str, Weight] = {}  # this round's weights as folded in (observed-samples cap)
        # Buffered rounds: the weights of the globals this round's stale updates are rebased with
        # (the current one, and those they started from), read once each; at most max_staleness + 1.
        self._globals: dict[int, Weights] = {}
        # Shamir x-coordinates: 1-based positions in the natural order of the fleet's sites.
        self.site_ids = {site: i + 1 for i, site in enumerate(sorted(config.sites, key=natural_key))}
        # What every record of this run says it ran with: the configured name, all parameters.
        self.strategy_record = {"strategy": config.strategy.name, "strategy_params": self.strategy.parameters()}
        self.topics = Topics(config.broker.topic_root, config.broker.plant_root)
        check_registry_folder(config.registry)  # at start, with the path, not at the first checkpoint
        # Points wait here while InfluxDB is away (unused with SQLite).
        spool = Path(config.registry).parent / "influx-spool"
        self.store = open_store(config.store, spool_dir=spool, influx=config.influx)
        try:
            self.registry, self.epoch, checkpoint = open_registry(config, self.store, config_path, reset)
        except BaseException:
            self.store.close()
            raise
        try:
            self.sealer, self.verifier = signed.aggregator_keys(config.pki)
            senders = [*config.regions, *config.workers]
            self.partials = signed.partial_verifier(config.pki, senders) if senders else None
        except BaseException:
            self.store.close()
            self.registry.close()
            raise
        self.counters: Counter[str] = Counter()  # refusals, by reason
        self.metrics = None  # turbofed.observability.AggregatorMetrics when fleet.toml sets metrics_port
        # Refusals: counted, the last 100 kept as samples (self.refusals.recent), logged once a
        # minute per reason; the store gets one row per (site, reason) per interval, then a
        # row saying how many more there were (bounded whatever a site sends).
        self.refusals = RefusalLog(log, "rejected from %s (%s, #%d): %s")
        self._rejection_rows = Throttle(REJECTION_ROW_INTERVAL_S)
        self._next_rows_check = 0.0
        self._errors = RateLimitedLog(log)
        self.ignored = 0  # messages on topics we never subscribed to
        self.inbox = message_inbox(config.broker.keepalive)  # bounded: a backlog waits at the broker, not here
        self.model: onnx.ModelProto | None = None
        self.version = -1
        self.spec: FeatureSpec | None = None
        self.stats: FleetStats | None = None
        self.round: Round | None = None
        self.guard = ModelGuard(config.rollback_margin)  # the last good model, by the sites' own scores
        self.watch = ConnectionWatch("aggregator", log)  # broker outages, attached to the client at start
        self._outages_recorded = 0  # outages already recorded as broker_outage events
        self.stats_replies: dict[str, StatsReply] = {}
        self.stats_request_id = ""
        self.stats_layout: Layout | None = None  # the residuals phase's bins (conformal calibration)
        self.client = None
        self.global_samples = 0  # the `samples` header of the published global: its clamped weights' sum
        self.known_samples: dict[str, int] = {}  # the most samples each site has said it holds (stats, status)
        self.site_online: dict[str, bool] = {}
        self.empty_rounds = 0  # rounds in a row closed without a usable update
        self.stalled: str | None = None  # why, while stalled
        self.disk = DiskWatch(self._event, LOG_INTERVAL_S)  # a commit the disk refuses waits, said once per interval
        self._wake = False  # a site came back online: a stalled round is re-announced at once
        self._republish = True  # send the retained global again after the next announcement
        self._stop = threading.Event()
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
        if self.secure_settings is not None:
            self._handlers.update({kind: (lambda site, payload, kind=kind: self._on_secure(site, payload, kind)) for kind in SECURE_KINDS})
        try:
            self._resume(checkpoint, reset)
        except BaseException:
            self.store.close()
            self.registry.close()
            raise
        signed.warn_if_unsigned(self.sealer, "the aggregator")

    # --- start, resume ---------------------------------------------------------------

    def _resume(self, ckpt: Checkpoint | None, reset: bool = False) -> None:
        if ckpt is None:
            self.store.record_event("started", {**self.strategy_record, **self._privacy_record()}, time.time())
            if reset:
                self._reuse_stats()
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
        record = ckpt.fleet.get("round_record") or {}
        self.global_samples = round_samples(record)
        self._reconcile(ckpt)
        self.store.record_event("resumed", {"version": ckpt.version, "round": ckpt.round, **self.strategy_record,
                                            **self._privacy_record()}, time.time())
        if self.dp is not None:
            log.info("privacy: %d noised rounds in checkpoint v%d, epsilon %.3g at delta %g (recomputed)",
                     self.dp.dp_rounds, ckpt.version, self.dp.epsilon(), self.dp.settings.delta)

    def _privacy_record(self) -> dict:
        return {} if self.dp is None else {"privacy": self.dp.privacy_record()}

    def _reuse_stats(self) -> None:
        """After a reset: the fleet statistics the store recorded last (same window), so the
        new epoch has the same feature spec without asking sites again."""
        for event in self.store.events(10_000):
            if event["kind"] != "fleet_statistics" or not isinstance(event["detail"], dict) or "stats" not in event["detail"]:
                continue
            try:
                stats = FleetStats.from_dict(event["detail"]["stats"])
                regimes = Regimes.from_dict(event["detail"]["regimes"]) if event["detail"].get("regimes") is not None else None
                if stats.window == self.config.model.window:
                    self.stats, self.spec = stats, FeatureSpec.from_stats(stats, self.config.model.window, regimes=regimes)
                    log.info("fleet reset: reusing the fleet statistics recorded in the results store (%d labelled cycles)", stats.count)
                    return
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("fleet statistics in the results store cannot be used (%s); asking the sites again", exc)
            return
        log.warning("fleet reset: no fleet statistics in the results store; asking the sites again (they answer "
                    "only over engines they have not answered for)")

    def _reconcile(self, ckpt: Checkpoint) -> None:
        """The checkpoint is the commit point: a round checkpointed but missing from the store
        (a crash in between) is recorded now from what the checkpoint holds; never twice
        (record_round replaces a round's row)."""
        record = ckpt.fleet.get("round_record")
        rows = [r for r in self.store.rounds() if r["round"] == ckpt.round]
        if rows and (not isinstance(record, dict) or rows[0]["started"] == record["started"]):
            return  # recorded (a row of the same round from before a fleet reset has another start)
        if not isinstance(record, dict):
            log.warning("round %d is checkpointed (v%d) but not in the results store, and the checkpoint holds no "
                        "round record (an older turbofed wrote it)", ckpt.round, ckpt.version)
            return
        strategy = ckpt.fleet.get("strategy", self.strategy_record["strategy"])
        self.store.record_round(ckpt.round, ckpt.version, record["started"], record["closed"], record["participants"],
                                record["aggregate_ms"], strategy, record["closed_by"], ckpt.fleet.get("strategy_params", {}),
                                checkpointed_regions(record.get("regions"), ckpt.round))
        log.warning("round %d was checkpointed (v%d) but not in the results store: recorded it from the checkpoint",
                    ckpt.round, ckpt.version)
        self.store.record_event("round_recovered", {"round": ckpt.round, "version": ckpt.version}, time.time())

    def start(self) -> None:
        self.client = make_client(client_id("aggregator", self.config.broker), self.config.broker, persistent_session=True)
        self.client.on_message = on_message_into(self.inbox, lambda msg: (msg.topic, msg.payload), self.counters, log, "aggregator")
        self.client.on_connect = self._on_connect
        self.watch.attach(self.client)  # outages logged with their duration
        # With workers, site updates reach us only inside their batch partials (else counted twice).
        topics = [self.topics.all_sites(k) for k in self._handlers if not (k == "update" and self.config.workers)]
        partials = self.config.regions or self.config.workers
        self.subscriptions = Subscriptions(self.client, topics + ([self.topics.all_partials] if partials else []))
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
        self._stop = stop
        if self.spec is None:
            self._collect_stats(stop)
        if self.model is None and not stop.is_set():
            self._initial_model()
        spent = False
        while not stop.is_set() and self.version < self.config.model.rounds:
            if spent := self._budget_spent():
                break
            self._run_round(self.version + 1, stop)
        if not stop.is_set():
            intervals = self._calibrate(stop) if self.config.intervals is not None and self.model is not None else None
            self._announce(RoundAnnouncement(self.version, self.spec, done=True, epoch=self.epoch, intervals=intervals))
            if not spent:
                log.info("all %d rounds done; recording site reports until stopped", self.config.model.rounds)
        while not stop.is_set():
            self.pump(0.2)
        self.inbox.close()
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
            self._record_outage()
        try:
            topic, payload = self.inbox.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return
        if (self.config.regions or self.config.workers) and topic.startswith(self.topics.root + "/regions/"):
            self._on_partial_topic(topic, payload)
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

    def _record_outage(self) -> None:
        """An ended broker outage becomes a `broker_outage` event (how long, how many so far)."""
        if not self.watch.connected or self.watch.outages == self._outages_recorded:
            return
        self._outages_recorded = self.watch.outages
        self.store.record_event("broker_outage", {"outages": self.watch.outages, "seconds": round(self.watch.last_outage_s or 0.0, 1)}, time.time())

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
        """Two phases of federated statistics: the operating regimes (per settings-grid cell
        counts and sensor sums), then the feature statistics over sensors normalised per
        regime; the spec carries both. Each phase waits for a quorum of sites with enough
        labelled data, or the round deadline with at least one: a site that is down must not
        hold the fleet back. With secure aggregation only the feature statistics are asked,
        through the secure sum, and the fleet is one regime (docs/privacy.md)."""
        if self.secure_settings is not None:
            self._collect_secure_stats(stop)
            return
        regime_replies = self._gather_stats(stop, "regimes")
        if regime_replies is None:
            return
        regimes = Regimes.from_stats(sum((r.regime_stats for r in regime_replies.values()), RegimeStats()))
        ready = self._gather_stats(stop, "features", regimes)
        if ready is None:
            return
        self._fleet_stats(sum((r.stats for r in ready.values()), FleetStats()), sorted(ready), regimes)

    def _fleet_stats(self, stats: FleetStats, sites: list[str], regimes: Regimes | None = None, secure: bool = False) -> None:
        """The fleet's statistics fix the feature spec; the request is cleared and the sums
        recorded (after a `--reset` they fix the same spec again, since sites share statistics
        only over engines they have not answered for: edge/agent.py)."""
        self.stats, self.spec = stats, FeatureSpec.from_stats(stats, self.config.model.window, regimes=regimes)
        self.client.publish(self.topics.stats_request, b"", qos=1, retain=True)  # clear the request
        detail = {"sites": sites, "rows": int(stats.count), "sensors": [i + 1 for i in self.spec.sensors],
                  "stats": stats.to_dict(), "secure": secure, **({"regimes": regimes.to_dict()} if regimes is not None else {})}
        log.info("fleet statistics from %d sites%s, %d labelled cycles; %d operating regime(s); informative sensors %s",
                 len(sites), " (secure sum)" if secure else "", stats.count, len(regimes.cells) if regimes is not None else 1,
                 detail["sensors"])
        self.store.record_event("fleet_statistics", detail, time.time())

    def _calibrate(self, stop: threading.Event) -> IntervalTable | None:
        """Federated conformal calibration (turbofed/conformal.py): the sites' residual
        histograms of the final model on their calibration engines, summed; the interval
        table at the configured coverage. None when no site answered by the round deadline."""
        settings = self.config.intervals
        layout = Layout.for_cap(self.config.model.rul_cap)
        replies = self._gather_stats(stop, "residuals", layout=layout, settle=True)
        if not replies:
            log.warning("conformal intervals: no site sent residuals of v%d by the deadline (do sites hold calibration "
                        "engines out? holdout_share); predictions go without intervals", self.version)
            return None
        hist = sum((r.residuals for r in replies.values()), ResidualHistogram(layout))
        table = IntervalTable.from_histogram(hist, settings.coverage, settings.min_group_residuals, self.version)
        log.info("conformal intervals for v%d at %.0f%% from %d residuals of %d sites: %s", self.version,
                 100 * settings.coverage, hist.total, len(replies), table.to_dict())
        self.store.record_event("intervals", {"sites": sorted(replies), "engines": sum(r.engines for r in replies.values()),
                                              "table": table.to_dict()}, time.time())
        return table

    def _gather_stats(self, stop: threading.Event, phase: str, regimes: Regimes | None = None, layout: Layout | None = None,
                      settle: bool = False) -> dict[str, StatsReply] | None:
        """The replies of one statistics phase from the sites ready to give it (None: stopped;
        with `settle`, whatever came by the deadline, even nothing, and once a quorum is in,
        every site or SETTLE_AFTER_QUORUM_S more)."""
        needed = self.config.effective_quorum
        next_request = 0.0
        give_up = time.monotonic() + self.config.round_deadline_s
        # One request per phase, re-sent until enough sites have answered: a site answers a
        # spec's statistics once per phase (edge/agent.py on_stats_request), so a new id would not get a new answer.
        self.stats_request_id = uuid.uuid4().hex
        self.stats_replies = {}
        field = {"regimes": "regime_stats", "residuals": "residuals"}.get(phase, "stats")
        self.stats_layout = layout
        min_samples = 1 if phase == "residuals" else self.config.min_samples  # residuals: the site's min_stats_engines bounds them
        quorum_at = None
        while not stop.is_set():
            ready = {s: r for s, r in self.stats_replies.items() if r.samples >= min_samples and getattr(r, field) is not None}
            if len(ready) >= needed and settle:  # one-shot calibration: every residual counts, so give the rest a moment
                quorum_at = quorum_at or time.monotonic()
                if len(ready) >= len(self.config.sites) or time.monotonic() - quorum_at >= SETTLE_AFTER_QUORUM_S:
                    return ready
            elif len(ready) >= needed or ((ready or settle) and time.monotonic() >= give_up):
                return ready
            if time.monotonic() >= next_request:
                request = StatsRequest(self.stats_request_id, min_samples, self.config.model.window, phase, regimes,
                                       layout=layout, model_version=self.version if phase == "residuals" else None)
                payload = self.sealer.seal(signed.STATS_REQUEST, request.to_payload())
                self.client.publish(self.topics.stats_request, payload, qos=1, retain=True)
                next_request = time.monotonic() + self.config.stats_retry_s
                log.info("asked sites for fleet statistics, %s phase (%d of %d ready)", phase, len(ready), needed)
            self.pump(0.2)
        return None

    def _on_stats(self, site: str, payload: bytes) -> None:
        if self.secure_settings is not None:
            raise Rejected(Refusal.BAD_KIND, f"statistics from {site} in the clear: with secure aggregation they go "
                                             "through the secure sum (secagg_keys first)")
        reply = StatsReply.from_payload(self.verifier.open(signed.STATS, payload, signer=site).body, site=site)  # statistics validated now, not when summing
        if reply.request_id != self.stats_request_id:
            return  # an answer to an older request
        if reply.stats is not None and reply.stats.window != self.config.model.window:
            raise Rejected(Refusal.BAD_STATS, f"stats from {site} are for a {reply.stats.window}-cycle window, not {self.config.model.window}")
        if reply.residuals is not None and reply.residuals.layout != self.stats_layout:
            raise Rejected(Refusal.BAD_STATS, f"residual histogram from {site} is not in the bins asked for")
        self.stats_replies[site] = reply
        observe_samples(self.known_samples, site, reply.samples)

    # --- phase 2: rounds -------------------------------------------------------------

    def _initial_model(self) -> None:
        """Round 0: global v0 is the reference graph for the fleet's spec and settings with
        seeded initial weights, built here (no site proposes it), checkpointed and published."""
        started = time.time()
        model = reference_model(self.spec, self.config.model)
        if self._commit(0, model, started, [], 0.0, "initial"):
            log.info("round 0: built and published global v0 (%s, seed %d)", self.config.model.kind, self.config.model.seed)

    def _announce(self, announcement: RoundAnnouncement) -> None:
        payload = self.sealer.seal(signed.ROUND, announcement.to_payload(), round=announcement.round, version=announcement.version)
        self.client.publish(self.topics.round, payload, qos=1, retain=True)
        if self._republish and self.model is not None and not announcement.done:
            # The retained global again, after an announcement that vouches for it: a site that
            # refused it before this announcement (a fleet reset raised the epoch) takes it now.
            self._republish = False
            self._publish_global()

    def open_round(self, number: int, now: float) -> Round:
        """Round `number`, from the current global, collecting until the deadline: plain,
        streamed into running sums (FedAvg family), or through a secure sum."""
        buffered = self.config.buffered_rounds
        self.round = Round(number, self.version, uuid.uuid4().hex, now, now + self.config.round_deadline_s, self.config.sites,
                           plain=self.secure_settings is None, on_accept=self._accept_update,
                           max_staleness=buffered.max_staleness if buffered else 0, buffer_size=buffered.size if buffered else 0)
        self._globals = {}
        if self.streaming:
            self.running, self.arrival_weights = RunningSum(read_weights(self.model), self.config.max_site_share), {}
        return self.round

    def _run_round(self, number: int, stop: threading.Event) -> None:
        self.open_round(number, time.time())
        secure = None if self.secure_settings is None else self._round_sum()
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
                epoch=self.epoch,
                dp=None if self.dp is None else self.dp.site_noise(),
                secagg=secure,
            )
        )
        log.info("round %d announced (from global v%d, deadline %.0f s)", number, self.round.model_version, self.config.round_deadline_s)
        if secure is not None:
            self._run_secure_round(number, stop)
            return
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
            self._empty_round(number, closed_by, stop)
            return
        self._close_round(closed_by)

    def _empty_round(self, number: int, closed_by: str, stop: threading.Event) -> None:
        """No usable update: announce the round again; after `max_empty_rounds` in a row,
        report `stalled` and re-announce only every `stall_retry_s` or when a site is back."""
        r, self.round = self.round, None
        self.empty_rounds += 1
        silent = sorted(set(r.sites) - r.responded())
        self.store.record_event("round_empty", {"round": number, "closed_by": closed_by, "skipped": sorted(r.skipped), "silent": silent}, time.time())
        self._republish = True
        if self.empty_rounds < self.config.max_empty_rounds:
            log.warning("round %d closed by %s with no usable update (%d of %d before stalling); announcing it again",
                        number, closed_by, self.empty_rounds, self.config.max_empty_rounds)
            self._wait(self.config.stats_retry_s, stop)
            return
        if self.stalled is None:
            self.stalled = (f"round {number} closed {self.empty_rounds} times in a row with no usable update "
                            f"(skipped: {', '.join(sorted(r.skipped)) or 'none'}; silent: {', '.join(silent) or 'none'})")
            log.warning("stalled: %s; keeping global v%d, re-announcing every %.0f s or when a site comes back online",
                        self.stalled, self.version, self.config.stall_retry_s)
            self.store.record_event("stalled", {"round": number, "reason": self.stalled, "version": self.version,
                                                "retry_s": self.config.stall_retry_s}, time.time())
        self._wake = False
        self._wait(self.config.stall_retry_s, stop, wake=True)

    def _wait(self, seconds: float, stop: threading.Event, wake: bool = False) -> None:
        """Keep recording what sites report for `seconds` (or until a site comes back, with `wake`)."""
        until = time.monotonic() + seconds
        while not stop.is_set() and time.monotonic() < until and not (wake and self._wake):
            self.pump(min(0.2, until - time.monotonic()))

    def _on_update(self, site: str, payload: bytes) -> None:
        if self.round is None:
            raise Rejected(Refusal.STALE_ROUND, "no round is open")
        region = self.config.region_of(site)
        if region is not None:
            raise Rejected(Refusal.WRONG_ROUTE, f"site {site} is in region {region}: its updates count only through "
                                                "that region's partial")
        if self.config.workers:
            raise Rejected(Refusal.WRONG_ROUTE, f"update from {site}: with workers, updates count only through a "
                                                "worker's batch partial")
        accepted = self.round.check(site, payload, self.model, self.config.max_update_bytes, self.verifier, self.epoch)
        if accepted:
            log.info("round %d: update from %s (%d samples, %d bytes)", self.round.number, site, accepted.samples, accepted.wire_bytes)

    def _on_partial_topic(self, topic: str, payload: bytes) -> None:
        """A regional partial: refused with a reason (counted, logged, stored) or taken."""
        region = "?"
        try:
            region = self.topics.parse_partial(topic)
            if region not in self.config.regions and region not in self.config.workers:
                raise Rejected(Refusal.UNKNOWN_REGION, f"region {region!r} is not in the fleet config's [regions] or workers")
            self._on_partial(region, payload)
        except Refused as exc:
            self._reject(f"region:{region}", exc.reason, f"{topic[:200]}: {exc}")
        except Exception:
            self.counters[Refusal.INTERNAL_ERROR.value] += 1
            self._errors.warning(Refusal.INTERNAL_ERROR, "failed to handle a message on %s", topic[:300], exc_info=True)

    def _on_partial(self, region: str, payload: bytes) -> None:
        """Check a region's partial against the open round, add its sums, and record each of
        its sites as accepted (or, sent nothing, as skipped) for quorum and the round's records."""
        from turbofed.aggregator.regional import read_partial

        r = self.round
        if r is None or not self.streaming:
            raise Rejected(Refusal.STALE_ROUND, f"partial from region {region}: no round is open")
        worker = region in self.config.workers
        members = self.config.direct_sites if worker else frozenset(self.config.regions[region])
        p = read_partial(payload, region, members, self.partials, round=r.number, model_version=r.model_version,
                         length=int(self.running.base.size), epoch=self.epoch, batch=worker)
        # A worker's partial is one batch (several a round); a region's holds all its sites.
        named = [s.site for s in p.sites] + list(p.missing) if worker else members  # a batch: O(batch), not O(fleet)
        again = {s for s in named if s in r.accepted or s in r.skipped}
        if again:
            raise Rejected(Refusal.DUPLICATE, f"partial from {'worker' if worker else 'region'} {region}: round {r.number} "
                                              f"already has {len(again)} of its sites (e.g. {sorted(again)[0]})")
        self.running.add_partial(p.total, p.weight, {s.site: (s.weight, s.norm) for s in p.sites}, region, p.summed, p.summary)
        now = time.time()
        for s in p.sites:
            r.accepted[s.site] = Accepted(s.site, s.claimed, None, s.update_bytes, now)
        for site in p.summed:  # a summary partial: which sites, not their weights
            r.accepted[site] = Accepted(site, 0, None, 0, now)
        for site in p.missing:
            r.skipped[site] = 0
        totals = (f", {p.summary['claimed']} claimed, largest update norm {p.summary['norm_max']:.4g}"
                  if p.summary is not None else "")
        (log.debug if worker else log.info)("round %d: partial from %s %s: %d updates (Σw %d%s), %d missing, %d refused there, %d bytes",
                                            r.number, "worker" if worker else "region", region, len(p.sites) + len(p.summed),
                                            p.weight, totals, len(p.missing), sum(p.refused.values()), p.wire_bytes)

    def _accept_update(self, accepted: Accepted) -> None:
        """A stale update (buffered rounds) is rebased onto the current global; then, when
        streaming, folded into the running sums and let go."""
        if accepted.staleness:
            self._rebase(accepted)
        if self.streaming:
            self._fold(accepted)
            accepted.weights = None

    def _rebase(self, accepted: Accepted) -> None:
        """FedBuff (Nguyen et al., AISTATS 2022): the delta from the global the site started
        from, scaled by its staleness (`_staleness_scale`), on top of the current global."""
        start, current = self._global_weights(self.version - accepted.staleness), self._global_weights(self.version)
        scale = self._staleness_scale(accepted.staleness)
        accepted.weights = {n: (current[n] + scale * (accepted.weights[n].astype(np.float64) - start[n])).astype(current[n].dtype)
                            for n in current}

    def _global_weights(self, version: int) -> Weights:
        """Global v`version`'s weights, read once a round (the current one from memory, older
        ones from the registry): a round's stale updates share them."""
        if version not in self._globals:
            model = self.model if version == self.version else onnx.load_model_from_string(self.registry.get(version))
            self._globals[version] = read_weights(model)
        return self._globals[version]

    def _staleness_scale(self, staleness: int) -> float:
        """FedBuff's staleness weight (Nguyen et al., AISTATS 2022): a stale update's delta
        counts 1 / (1 + staleness) ** exponent (buffered_rounds.staleness_exponent)."""
        return (1.0 + staleness) ** -self.config.buffered_rounds.staleness_exponent

    def _fold(self, accepted: Accepted) -> None:
        """Streaming: an accepted update goes into the round's running sums, weighted by its
        claim capped by what is known of the site now (the share cap waits for the close);
        under DP weight 1, and in central mode its delta clipped to C first."""
        w = capped_weights({accepted.site: accepted.samples}, self.known_samples, 1.0)[accepted.site]
        self.arrival_weights[accepted.site] = w
        central = self.dp is not None and self.dp.settings.mode == "central"
        self.running.add(accepted.site, accepted.weights, 1 if self.dp is not None else w.used,
                         self.dp.settings.clip_norm if central else None)

    def _merge_streamed(self, r: Round) -> tuple[onnx.ModelProto, list[dict], dict[str, str]]:
        """The round's model from its running sums, its participants' records and the notes
        on their updates (one pass: this is O(sites) work between the last update and the
        model going out)."""
        running, current = self.running, read_weights(self.model)
        self.running = None
        arrival = self.arrival_weights
        if self.dp is not None:
            used = dict.fromkeys(running.weights, 1)
            caps = {s: w.note for s, w in arrival.items() if w.note}
            weights = self.dp.aggregate_sum(current, running.delta_sum(), running.weight)
            clip = self.dp.settings.clip_norm if self.dp.settings.mode == "central" else math.inf
        else:
            # A partial's sites were share-capped in their region (aggregator/regional.py).
            direct = {s: w for s, w in running.weights.items() if s not in running.from_partials}
            shares = capped_weights(direct, {}, self.config.max_site_share)
            used = {s: running.weights[s] for s in running.from_partials} | {s: w.used for s, w in shares.items()}
            caps = {s: w.note for s, w in arrival.items() if w.note} | {s: w.note for s, w in shares.items() if w.note}
            weights = self.strategy.aggregate(current, [SiteUpdate("streamed-mean", *running.mean(used))])
            clip = math.inf
        norms, participants, notes = running.norms, [], {}
        for a in r.accepted.values():
            if a.site in running.summed:  # a region's summary partial: no weight or norm per site
                participants.append({"site": a.site, "samples": 0, "claimed": None, "update_bytes": 0, "norm": None,
                                     "cosine": None, "action": f"summed in region {running.summed[a.site]}"})
                continue
            note = self._stale_note(a, caps.get(a.site))
            if note is not None:
                notes[a.site] = note
            action = "clipped" if norms[a.site] > clip else "kept"
            participants.append({"site": a.site, "samples": used[a.site], "claimed": a.samples, "update_bytes": a.wire_bytes,
                                 "norm": norms[a.site], "cosine": None, "action": participant_action(action, note)})
        return replace_weights(self.model, weights), participants, notes

    def _merge_kept(self, r: Round) -> tuple[onnx.ModelProto, list[dict], dict[str, str]]:
        """The round's model from every update it kept (strategies that look at each one),
        its participants' records and the notes on their updates."""
        weights = capped_weights({a.site: a.samples for a in r.accepted.values()}, self.known_samples, self.config.max_site_share)
        updates = [SiteUpdate(a.site, a.weights, weights[a.site].used) for a in r.accepted.values()]
        model = merge(self.strategy, self.model, updates)  # updates were checked on arrival; only their weights are used
        report = round_report(self.strategy, read_weights(self.model), updates, read_weights(model))
        notes = {a.site: note for a in r.accepted.values() if (note := self._stale_note(a, weights[a.site].note)) is not None}
        participants = [{"site": a.site, "samples": weights[a.site].used, "claimed": a.samples, "update_bytes": a.wire_bytes,
                         **report[a.site], "action": participant_action(report[a.site].get("action"), notes.get(a.site))}
                        for a in r.accepted.values()]
        return model, participants, notes

    def _stale_note(self, accepted: Accepted, note: str | None) -> str | None:
        """A weight cap's note, and for a stale update (buffered rounds) by how much its delta was scaled."""
        if not accepted.staleness:
            return note
        scale = self._staleness_scale(accepted.staleness)
        stale = f"{accepted.staleness} version(s) stale, delta scaled by {scale:.2f}"
        return stale if note is None else f"{note}; {stale}"

    def _close_round(self, closed_by: str) -> None:
        r, self.round = self.round, None  # closed: a late update is refused, not merged
        last_update = max(a.received for a in r.accepted.values())
        verdict = self.guard.judge(self.version)  # the model this round started from, by the sites' scores
        if verdict.bad:
            self._roll_back(r, verdict, last_update)
            return
        regions = self.running.regions if self.streaming else {}  # summary partials' totals, for the round's record
        model, participants, notes = self._merge_streamed(r) if self.streaming else self._merge_kept(r)
        for site, note in notes.items():  # weight caps and staleness, also in each participant's action
            log.warning("round %d: %s: %s", r.number, site, note)
        kill_point("after_merge", r.number)
        if not self._commit(r.number, model, r.started, participants, last_update, closed_by, regions):
            return
        log.info("round %d closed by %s: %d updates, global v%d published", r.number, closed_by, len(participants), self.version)
        self._round_closed(r.number, len(participants))

    def _round_closed(self, number: int, updates: int) -> None:
        """After a round's model is out: privacy spent, and the end of a stall."""
        if self.dp is not None:
            self._record_privacy(number)
        if self.stalled is not None:
            log.info("no longer stalled: round %d closed with %d updates", number, updates)
            self.store.record_event("stall_over", {"round": number, "updates": updates}, time.time())
        self.stalled, self.empty_rounds = None, 0

    def _record_privacy(self, number: int) -> None:
        """After a noised round: epsilon so far at the configured delta, logged and stored."""
        eps = self.dp.epsilon()
        detail = {"round": number, "version": self.version, "epsilon": eps, "delta": self.dp.settings.delta,
                  "epsilon_budget": self.dp.budget_or_none, "dp_rounds": self.dp.dp_rounds,
                  "noise_multiplier": self.dp.noise_multiplier, "clip_norm": self.dp.settings.clip_norm}
        log.info("round %d: privacy spent so far epsilon %.3g at delta %g (budget %.3g, %d noised rounds)",
                 number, eps, self.dp.settings.delta, self.dp.budget, self.dp.dp_rounds)
        self._event("privacy", detail)

    def _budget_spent(self) -> bool:
        """True (logged, stored as "privacy_budget_spent") when one more noised round would
        take epsilon past the budget: the fleet stops training as when all rounds are done."""
        if self.dp is None or self.dp.budget_allows_another():
            return False
        eps, next_eps = self.dp.epsilon(), self.dp.epsilon(self.dp.dp_rounds + 1)
        log.warning("privacy budget spent: epsilon %.3g at delta %g after %d noised rounds, another would reach %.3g "
                    "(budget %.3g); training stops at global v%d, recording site reports until stopped",
                    eps, self.dp.settings.delta, self.dp.dp_rounds, next_eps, self.dp.budget, self.version)
        self._event("privacy_budget_spent", {"version": self.version, "epsilon": eps, "next_epsilon": next_eps,
                                             "epsilon_budget": self.dp.budget_or_none, "delta": self.dp.settings.delta,
                                             "dp_rounds": self.dp.dp_rounds})
        return True

    def _roll_back(self, r: Round, verdict: Verdict, last_update: float) -> None:
        """Global v`verdict.version` scored clearly worse at the sites than v`verdict.against`:
        this round's updates (trained from the bad model) are set aside and the last good
        weights are published again as the next version, the round flagged `rollback`."""
        weights = check_graph(onnx.load_model_from_string(self.registry.get(verdict.against)), self.model)
        model = reference_model(self.spec, self.config.model, weights)
        participants = [{"site": a.site, "samples": 0, "claimed": a.samples, "update_bytes": a.wire_bytes, "norm": None,
                         "cosine": None, "action": "excluded"} for a in r.accepted.values()]
        log.warning("round %d: global v%d scored %.2fx the RMSE of v%d at %d site(s) (margin %.0f%%): publishing v%d's "
                    "weights again as v%d; this round's updates set aside", r.number, verdict.version, verdict.ratio,
                    verdict.against, verdict.sites, 100 * self.config.rollback_margin, verdict.against, r.number)
        self.store.record_event("rollback", {"round": r.number, **verdict.detail()}, time.time())
        self._commit(r.number, model, r.started, participants, last_update, "rollback")

    def _commit(self, number: int, model: onnx.ModelProto, started: float, participants: list[dict], last_update: float,
                closed_by: str, regions: dict[str, dict] | None = None) -> bool:
        """Global v`number`, in this order: checkpoint, record the round in the store, publish
        it retained. Nothing is published before it is on disk; the checkpoint also holds the
        round's record, so a crash before the store write is mended at the next start.
        `regions`: the totals of regions' summary partials (their sites' rows carry no weight).
        A full disk holds the commit back (retried) instead of crashing; False if stopped meanwhile."""
        closed = time.time()
        record = {"participants": participants, "started": started, "closed": closed, "closed_by": closed_by,
                  "aggregate_ms": (closed - last_update) * 1000.0 if last_update else 0.0, **({"regions": regions} if regions else {})}
        fleet = {"stats": self.stats.to_dict(), "spec": self.spec.to_dict(), **self.strategy_record, "round_record": record,
                 "last_good": self.guard.last_good}
        data, state = model.SerializeToString(), self.strategy.state()
        what = f"registry folder {self.registry.folder}"
        if not self._until_written(what, number, lambda: self.registry.save(number, number, data, state, fleet)):
            return False
        kill_point("after_checkpoint", number)
        what = f"results store {self.config.store}"
        if not self._until_written(what, number, lambda: self.store.record_round(
                number, number, started, closed, participants, record["aggregate_ms"], self.strategy_record["strategy"],
                closed_by, self.strategy_record["strategy_params"], regions)):
            return False
        self._flush_store(number)
        kill_point("after_store", number)
        self.model, self.version = model, number
        self.global_samples = round_samples(record)
        if self.metrics is not None:
            self.metrics.round_closed(participants, record["aggregate_ms"])
        info = self._publish_global()
        kill_point("after_publish", number, settle=lambda: info.wait_for_publish(5.0))
        return True

    def _until_written(self, what: str, number: int, write: Callable[[], object]) -> bool:
        """`write` (part of committing round `number`) until the disk takes it; meanwhile keep
        serving and recording. False if stopped first."""
        def wait() -> bool:
            self._wait(DISK_RETRY_S, self._stop)
            return not self._stop.is_set()

        held = f"round {number} not closed, keeping global v{self.version}"
        return self.disk.until_written(what, write, wait, held, {"round": number, "version": self.version})

    def _flush_store(self, number: int) -> None:
        """A store that batches (InfluxDB) sends the round now, before the model is published;
        bounded, since the checkpoint holds the round's record if this process dies."""
        flush = getattr(self.store, "flush", None)
        if flush is not None and not flush(STORE_FLUSH_S):
            log.warning("results store %s has not confirmed round %d after %.0f s; publishing (the checkpoint holds "
                        "the round's record)", self.config.store, number, STORE_FLUSH_S)

    def _event(self, kind: str, detail: dict) -> None:
        """A store event that must not itself stop us when the store's disk is the full one."""
        try:
            self.store.record_event(kind, detail, time.time())
        except Exception as exc:
            if disk_problem(exc) is None:
                raise

    def _publish_global(self) -> mqtt_client.MQTTMessageInfo:
        payload = self.sealer.envelope(kind="global", round=self.version, model_version=self.version,
                                       samples=self.global_samples, body=self.model.SerializeToString(), epoch=self.epoch)
        return self.client.publish(self.topics.global_model, payload, qos=1, retain=True)

    # --- what sites report -----------------------------------------------------------

    def _on_status(self, site: str, payload: bytes) -> None:
        if not payload:
            return  # a retained status being cleared
        s = Status.from_payload(self.verifier.open(signed.STATUS, payload, signer=site).body, site=site)
        observe_samples(self.known_samples, site, s.samples)
        if s.online and not self.site_online.get(site, False) and self.stalled:
            self._wake = True  # a site is back: a stalled round need not wait for its back-off
        self.site_online[site] = bool(s.online)
        self.store.record_status(site, s.online, s.at or time.time(), s.agent_version, s.model_version, s.samples)

    def _on_metrics(self, site: str, payload: bytes) -> None:
        m = Metrics.from_payload(self.verifier.open(signed.METRICS, payload, signer=site).body, site=site)
        if m.on == "validation":  # one a round, for the round the site names: none that has not closed yet
            if m.round is None or m.round > self.version:
                raise Rejected(Refusal.STALE_ROUND, f"validation metrics from {site} for round {m.round}: not a round that closed (newest v{self.version})")
            self.store.record_validation(site, m.round, m.model_version, m.to_dict(), time.time())
            return
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


def _needs_only_the_sum(strategy: object) -> bool:
    """The FedAvg family without a norm clip merges from a weighted sum of the updates."""
    return type(strategy) in STRATEGIES.values() and not (isinstance(strategy, ServerOptimizer) and strategy.clip)


def _check_secure_strategy(strategy: object, where: str) -> None:
    """Secure aggregation gives the aggregator only a weighted sum: strategies that look at
    each update (median, Krum, trimmed mean, the filtered and clipped FedAvg) cannot run."""
    if type(strategy) not in STRATEGIES.values():
        raise ConfigError(f"{where}: strategy {strategy.name!r} needs every site's own update, and secure aggregation "
                          f"gives the aggregator only their sum: use one of {', '.join(STRATEGIES)}")
    if isinstance(strategy, ServerOptimizer) and strategy.clip:
        raise ConfigError(f"{where}: strategy {strategy.name!r} clip = {strategy.clip:g} needs every site's own update; "
                          "set it to 0 with secure aggregation ([privacy] clip_norm clips at the sites)")


def run_cli(args: argparse.Namespace) -> int:
    config = load_fleet_config(args.config)
    aggregator = Aggregator(config, reset=getattr(args, "reset", False), config_path=args.config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    from turbofed.observability import serve_aggregator_metrics  # Prometheus: only with metrics_port in fleet.toml

    try:
        aggregator.metrics = serve_aggregator_metrics(aggregator, config.metrics_address, config.metrics_port)
        aggregator.start()
    except BaseException:  # no broker, or stopped while connecting: the store and registry close cleanly
        aggregator.store.close()
        aggregator.registry.close()
        raise
    log.info("aggregator running: %d sites, quorum %d, %d rounds, strategy %s", len(config.sites), config.effective_quorum, config.model.rounds, config.strategy.name)
    aggregator.run(stop)
    return 0
