"""Two-level (regional) aggregation: a regional aggregator sums its sites' updates and sends
the top aggregator one signed `partial` per round.

Why: one aggregator process validates about 1,000 updates a second (docs/scaling.md); a
region validates its own sites' updates on its own broker and machine, and the top level
sees one message per region. FedAvg (McMahan et al., AISTATS 2017) is Σ w·θ / Σ w, and sums
add, so the top aggregator's Σ over regions of (Σ w·θ, Σ w) gives the flat FedAvg of the same
updates. A region sends its weighted mean Σ w·θ / Σ w as float32 (the size of one update; the
model itself is float32) and the signed Σ w; the top takes Σ w·θ back as mean × Σ w in float64,
equal to the flat FedAvg within float32 rounding of the mean (about 1e-7 relative:
tests/test_regional.py).

The regional aggregator (`turbofed region --config region.toml`, RegionConfig):
- follows the top aggregator's signed round announcements and global models, which reach
  its regional broker over the Mosquitto bridge (broker_config/bridge.conf.template);
- validates each of its sites' updates exactly as the top aggregator does (Round.check of
  aggregator/rounds.py: envelope, site signature, round, graph, finite weights) and folds it
  into a RunningSum at its claim capped by the samples the site reported (stats, status);
- when `quorum` of its sites answered (default all) or `close_before_s` before the round's
  deadline, applies the share cap among its sites and publishes ONE partial, signed with the
  region's key, on `<root>/regions/<region>/partial`.

A partial is a weights envelope (turbofed/envelope.py) of kind `partial`: `site` is the
region, `samples` is Σ w (signed), and the body is

    4 bytes  meta length M, unsigned big-endian
    M bytes  meta, zlib-compressed UTF-8 JSON {"sites": [[site, weight, claimed, update_bytes,
             norm], ...], "missing": [sites that sent no update: skipped or silent],
             "refused": {reason: count}, "length": L} (at most MAX_META_BYTES inflated);
             with `site_records = "summary"` "sites" gives way to "summary": {"sites": n,
             "digest": sites_digest(those sites), "claimed": Σ claimed, "update_bytes": Σ bytes,
             "norm_max": largest delta norm} and the region's other sites are the ones that
             sent an update
    4·L      Σ w·θ / Σ w, float32 little-endian, in the global model's initializer order
             (zeros when Σ w = 0)

The top aggregator (`read_partial`) refuses, with a reason that is counted, a partial from a
region it does not know, not signed by that region's key, for another round or model, or
whose content does not hold together: sites outside the region or named twice, weights out
of range or not summing to the signed Σ w, a vector of the wrong length or not finite.

Per-site records cost O(sites) at the top: about 2 bytes a site compressed when the regions'
records look alike, more for real ones, so a region of 1,250 sites adds 3-10 KB to its
24 KB partial. By default (`site_records = "summary"`) a region sends only which sites
answered (the region's sites minus `missing`) and totals; the top records those sites as
summed in the region, without their weight or norm, and the partial stays the size of one
update plus headers (docs/scaling.md). `site_records = "full"` sends the per-site rows.

Robust strategies (median, Krum, trimmed mean, filtered or clipped FedAvg) need every
update, which a sum hides: the top aggregator refuses `[regions]` with them (ConfigError).

Ingestion workers (RegionConfig.shared_group; fleet.toml `workers = [...]`): the same class
on the top aggregator's own broker, for every site in no region, taking updates from the
MQTT shared subscription `$share/<group>/<root>/sites/+/update` so the broker spreads them
over the workers. A worker cannot know which sites it will get, so it sends a partial per
batch: after `batch` updates, `flush_s` after its first unsent one, and at the round's close;
`missing` then lists only the batch's skip notices, and the top aggregator takes several
partials a round from a worker, refusing one that names a site already counted (`duplicate`).
Nothing is lost when a worker dies: its client acks an update's MQTT message (manual ack,
persistent session) only once the partial holding it is acknowledged by the broker, so the
broker redelivers the rest when the worker comes back with the same client id. A redelivered
message (dup) goes out alone, so a `duplicate` at the top drops only it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import queue
import signal
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx

from turbofed import envelope
from turbofed.aggregator.rounds import Accepted, Rejected, Round
from turbofed.aggregator.streaming import RunningSum
from turbofed.aggregator.weights import MAX_SAMPLES, capped_weights, observe_samples
from turbofed.codec import parse_model, read_weights
from turbofed.config import RegionConfig, load_region_config
from turbofed.errors import Refused
from turbofed.messages import RoundAnnouncement, StatsReply, Status, signed
from turbofed.messages.signed import Sealer, Unsigned, Verifier
from turbofed.mqtt import (
    BoundedInbox,
    ConnectionWatch,
    Subscriptions,
    client_id,
    connect,
    make_client,
    message_inbox,
    on_message_into,
)
from turbofed.ratelog import RateLimitedLog, RefusalLog
from turbofed.refusals import Refusal
from turbofed.topics import Topics

log = logging.getLogger("turbofed.region")

_META_LEN = struct.Struct(">I")
MAX_META_BYTES = 3 * 1024 * 1024  # the site list of a large region; the envelope caps the whole at 4 MiB
MAX_REFUSAL_KINDS = 64
# A worker's batch: under Mosquitto's default max_inflight_messages (20), since its updates
# stay unacknowledged until their partial is at the broker (RegionConfig.batch's bound too).
MAX_BATCH = 16
MAX_HELD = 64  # updates a restarted worker holds until it has the round and global model again


@dataclass(frozen=True)
class Delivery:
    """One message as the broker handed it over: `mid` to ack (None: nothing to ack) and
    whether the broker says it may have delivered it before (`dup`)."""

    topic: str
    payload: bytes
    mid: int | None = None
    dup: bool = False


@dataclass(frozen=True)
class PartialSite:
    """One site inside a partial: the weight its update was summed with, what it claimed,
    the bytes it came in and its delta's L2 norm (for the round's records)."""

    site: str
    weight: int
    claimed: int
    update_bytes: int
    norm: float


@dataclass(frozen=True)
class Partial:
    """A region's checked partial for one round."""

    region: str
    round: int
    model_version: int
    weight: int  # Σ w
    total: np.ndarray  # Σ w·θ, float64 (the wire's float32 mean times Σ w)
    sites: tuple[PartialSite, ...]  # empty for a summary partial
    missing: tuple[str, ...]
    refused: dict[str, int]
    wire_bytes: int
    summed: tuple[str, ...] = ()  # a summary partial: the sites it sums (the region's, less `missing`)
    summary: dict | None = None  # a summary partial's totals: sites, digest, claimed, update_bytes, norm_max


def encode_partial(sealer: Sealer | Unsigned, *, round: int, model_version: int, epoch: int, total: np.ndarray,  # noqa: A002
                   sites: list[PartialSite], missing: list[str], refused: dict[str, int], summary: bool = False) -> bytes:
    """The signed envelope of one partial (layout in the module docstring); `summary`: the
    sites' totals instead of a record per site."""
    records: dict[str, object]
    if summary:
        records = {"summary": {"sites": len(sites), "digest": sites_digest(s.site for s in sites),
                               "claimed": sum(s.claimed for s in sites),
                               "update_bytes": sum(s.update_bytes for s in sites),
                               "norm_max": max((s.norm for s in sites), default=0.0)}}
    else:
        records = {"sites": [[s.site, s.weight, s.claimed, s.update_bytes, s.norm] for s in sites]}
    meta = zlib.compress(json.dumps({**records, "missing": missing, "refused": refused, "length": int(total.size)},
                                    separators=(",", ":")).encode(), 9)
    weight = sum(s.weight for s in sites)
    mean = total / weight if weight else np.zeros_like(total)
    body = _META_LEN.pack(len(meta)) + meta + np.ascontiguousarray(mean, dtype="<f4").tobytes()
    return sealer.envelope(kind="partial", round=round, model_version=model_version, samples=weight, body=body, epoch=epoch)


def _bad(detail: str) -> Rejected:
    return Rejected(Refusal.BAD_PARTIAL, detail)


def sites_digest(sites: Iterable[str]) -> str:
    """A summary's fingerprint of the sites it sums (SHA-256 of the sorted ids, 128 bits in
    hex): the top checks it against its own list, so a region.toml that disagrees with
    fleet.toml's [regions] is refused instead of crediting the wrong sites."""
    return hashlib.sha256("\n".join(sorted(sites)).encode()).hexdigest()[:32]


def _finite_at_least_zero(x: float | int) -> bool:
    """x is a finite number >= 0 (an int too large for a float is not: no OverflowError)."""
    try:
        return math.isfinite(x) and x >= 0
    except OverflowError:
        return False


def read_partial(payload: bytes, region: str, region_sites: frozenset[str], verifier: Verifier | Unsigned, *,
                 round: int, model_version: int, length: int, epoch: int = 0, batch: bool = False) -> Partial:  # noqa: A002
    """Check a partial from `region` (the topic's) for round `round` of global
    `model_version` with `length` weights; raises Rejected (or SignatureError) with the reason.
    `batch`: a worker's partial, one of several a round: at most MAX_BATCH sites, and
    `missing` lists only the sites of the batch that sent a skip notice."""
    try:
        env = envelope.decode(payload)
    except envelope.EnvelopeError as exc:
        raise Rejected(exc.reason, f"partial from region {region}: {exc}") from None
    if env.kind != "partial":
        raise Rejected(Refusal.BAD_KIND, f"region {region} may send 'partial', not {env.kind!r}")
    if env.site != region:
        raise Rejected(Refusal.WRONG_SENDER, f"partial names region {env.site!r} but arrived on {region!r}'s topic")
    verifier.check_envelope(env, signer=region, epoch=epoch)
    if (env.round, env.model_version) != (round, model_version):
        raise Rejected(Refusal.STALE_ROUND, f"partial from region {region} for round {env.round} from v{env.model_version}; "
                                            f"the open round is {round} from v{model_version}")
    body = env.body
    if len(body) < _META_LEN.size:
        raise _bad(f"partial from region {region}: body of {len(body)} bytes has no meta length")
    (meta_len,) = _META_LEN.unpack_from(body)
    if meta_len > min(MAX_META_BYTES, len(body) - _META_LEN.size):
        raise _bad(f"partial from region {region}: meta length {meta_len} exceeds the body or {MAX_META_BYTES} bytes")
    try:
        inflate = zlib.decompressobj()
        text = inflate.decompress(body[_META_LEN.size:_META_LEN.size + meta_len], MAX_META_BYTES)
        if inflate.unconsumed_tail or not inflate.eof:  # bounded: a compression bomb stops here
            raise ValueError(f"not one complete zlib stream of at most {MAX_META_BYTES} bytes")
        meta = json.loads(text)
    except (zlib.error, UnicodeDecodeError, ValueError) as exc:
        raise _bad(f"partial from region {region}: meta is not compressed JSON ({str(exc)[:200]})") from None
    if (not isinstance(meta, dict) or not all(k in meta for k in ("missing", "refused", "length"))
            or ("sites" in meta) == ("summary" in meta) or (batch and "summary" in meta)):
        raise _bad(f"partial from region {region}: meta must be an object with missing, refused, length and "
                   f"either sites or {'' if batch else '(not from a worker) '}summary")
    missing = meta["missing"]
    if (not isinstance(missing, list) or len(missing) > len(region_sites) or not all(isinstance(m, str) for m in missing)
            or len(set(missing)) != len(missing)):
        raise _bad(f"partial from region {region}: missing must be a list of distinct site ids")
    if "summary" in meta:
        absent = set(missing)
        if not absent <= region_sites:
            raise _bad(f"partial from region {region}: missing names a site that is not one of its sites")
        sites, summed = (), tuple(s for s in sorted(region_sites) if s not in absent)
        _check_summary(meta["summary"], region, summed, env.samples)
        named = set(summed)
    else:
        sites, summed = _partial_sites(meta["sites"], region, region_sites), ()
        named = {s.site for s in sites}
    # O(batch), not O(fleet): a round brings a worker's partial every MAX_BATCH updates.
    if batch and (len(sites) + len(missing) > MAX_BATCH or not all(m in region_sites and m not in named for m in missing)):
        raise _bad(f"partial from worker {region}: a batch holds at most {MAX_BATCH} of the fleet's sites, each once")
    if not batch and set(missing) != region_sites - named:
        raise _bad(f"partial from region {region}: missing must list exactly the region's sites not among its updates")
    refused = meta["refused"]
    if (not isinstance(refused, dict) or len(refused) > MAX_REFUSAL_KINDS
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_SAMPLES for v in refused.values())):
        raise _bad(f"partial from region {region}: refused must map at most {MAX_REFUSAL_KINDS} reasons to counts")
    weight = sum(s.weight for s in sites) if not summed else env.samples
    if weight != env.samples:
        raise _bad(f"partial from region {region}: site weights sum to {weight}, the signed total is {env.samples}")
    if meta["length"] != length or len(body) - _META_LEN.size - meta_len != 4 * length:
        raise _bad(f"partial from region {region}: {len(body) - _META_LEN.size - meta_len} bytes of weights, "
                   f"the model has {length} weights ({4 * length} bytes)")
    mean = np.frombuffer(body, dtype="<f4", offset=_META_LEN.size + meta_len).astype(np.float64)
    if not np.isfinite(mean).all():
        raise Rejected(Refusal.NON_FINITE, f"partial from region {region}: its mean holds NaN or infinite values")
    if weight == 0 and np.any(mean):
        raise _bad(f"partial from region {region}: no site weight but a non-zero mean")
    total = mean * weight  # Σ w·θ, float64
    return Partial(region, env.round, env.model_version, weight, total, sites, tuple(missing),
                   {str(k)[:64]: v for k, v in refused.items()}, len(payload), summed,
                   dict(meta["summary"]) if "summary" in meta else None)


SUMMARY_FIELDS = {"sites", "digest", "claimed", "update_bytes", "norm_max"}


def _check_summary(summary: object, region: str, summed: tuple[str, ...], weight: int) -> None:
    """A summary partial's totals hold together: the sites `summed` (the region's sites less
    missing, by the top's [regions]; their digest must match), each of weight 1 to its claim
    (at most MAX_SAMPLES), summing to the signed Σ w `weight`."""
    ok = (isinstance(summary, dict) and set(summary) == SUMMARY_FIELDS and isinstance(summary["digest"], str)
          and all(isinstance(summary[k], int) and not isinstance(summary[k], bool) for k in ("sites", "claimed", "update_bytes"))
          and isinstance(summary["norm_max"], (int, float)) and not isinstance(summary["norm_max"], bool))
    if not ok:
        raise _bad(f"partial from region {region}: summary must be {{sites, claimed, update_bytes (integers), digest, "
                   f"norm_max}}, got {str(summary)[:120]}")
    sites = len(summed)
    if summary["sites"] != sites or summary["digest"] != sites_digest(summed):
        raise _bad(f"partial from region {region}: its summary sums {summary['sites']} sites (digest {summary['digest'][:32]}), "
                   f"the region's sites less missing by this fleet's [regions] are {sites} (digest {sites_digest(summed)}): "
                   "region.toml and fleet.toml disagree")
    if not (sites <= weight <= summary["claimed"] <= sites * MAX_SAMPLES
            and sites <= summary["update_bytes"] <= sites * envelope.MAX_PAYLOAD_BYTES
            and _finite_at_least_zero(summary["norm_max"])):
        raise _bad(f"partial from region {region}: summary of {sites} sites with Σ w {weight}, claimed {summary['claimed']}, "
                   f"{summary['update_bytes']} bytes, largest norm {str(summary['norm_max'])[:40]} out of range")


def _partial_sites(rows: object, region: str, region_sites: frozenset[str]) -> tuple[PartialSite, ...]:
    if not isinstance(rows, list) or len(rows) > len(region_sites):
        raise _bad(f"partial from region {region}: sites must be a list of at most its {len(region_sites)} sites")
    out, seen = [], set()
    for row in rows:
        ok = (isinstance(row, list) and len(row) == 5 and isinstance(row[0], str)
              and all(isinstance(v, int) and not isinstance(v, bool) for v in row[1:4])
              and isinstance(row[4], (int, float)) and not isinstance(row[4], bool))
        if not ok:
            raise _bad(f"partial from region {region}: a site row must be [site, weight, claimed, update_bytes, norm], "
                       f"got {str(row)[:80]}")
        site, weight, claimed, nbytes, norm = row
        if site not in region_sites:
            raise _bad(f"partial from region {region}: site {site[:80]!r} is not one of its sites")
        if site in seen:
            raise _bad(f"partial from region {region}: site {site!r} named twice")
        if not (1 <= weight <= claimed <= MAX_SAMPLES and 1 <= nbytes <= envelope.MAX_PAYLOAD_BYTES
                and _finite_at_least_zero(norm)):
            raise _bad(f"partial from region {region}: site {site!r}: weight {weight}, claimed {claimed}, "
                       f"{nbytes} bytes, norm {norm} out of range")
        seen.add(site)
        out.append(PartialSite(site, weight, claimed, nbytes, float(norm)))
    return tuple(out)


class RegionalAggregator:
    """One region's aggregator: follows the top's rounds, checks and sums its sites' updates,
    sends one signed partial a round."""

    def __init__(self, config: RegionConfig) -> None:
        self.config = config
        self.region = config.region
        self.topics = Topics(config.broker.topic_root, config.broker.plant_root)
        self.sealer, self.top, self.verifier = signed.region_keys(config.pki, config.region)
        self.counters: Counter[str] = Counter()  # refusals, by reason
        self.refusals = RefusalLog(log, "region: rejected from %s (%s, #%d): %s")
        self._errors = RateLimitedLog(log)
        # Bounded (turbofed.mqtt.BoundedInbox); a worker's is never full: the broker hands it at
        # most max_inflight_messages unacked updates.
        self.inbox: BoundedInbox[Delivery] = message_inbox(config.broker.keepalive, lambda d: len(d.payload))
        self.name = f"{'worker' if config.worker else 'region'} {config.region}"  # in logs
        self.watch = ConnectionWatch(self.name, log)
        self.client = None
        self.model: onnx.ModelProto | None = None
        self.version = -1
        self.epoch = 0
        self.announced: RoundAnnouncement | None = None
        self.round: Round | None = None
        self.running: RunningSum | None = None
        self.round_refused: Counter[str] = Counter()  # this round's refused updates, sent in the partial
        self.known_samples: dict[str, int] = {}  # the most samples each site has said it holds (stats, status)
        self.sent: dict[int, int] = {}  # round -> bytes of the partial(s) sent for it
        # Worker only (config.shared_group): the open batch, and the acks its partials hold back.
        self.batch: list[str] = []  # sites of the open batch that sent an update ...
        self.batch_skips: list[str] = []  # ... or a skip notice
        self.batch_mids: list[int] = []  # their MQTT messages, acked once the batch's partial is at the broker
        self.batch_since: float | None = None  # when the open batch got its first update
        self.batches: Counter[int] = Counter()  # round -> batch partials sent
        self.held: list[Delivery] = []  # updates that came before the round (a restart's redeliveries)
        self._unacked: dict[int, list[int]] = {}  # partial's publish mid -> update mids to ack then
        self._published: queue.Queue[int] = queue.Queue()  # publish mids the broker acknowledged (network thread)
        signed.warn_if_unsigned(self.sealer, self.name)

    # --- MQTT ---------------------------------------------------------------------

    def start(self) -> None:
        worker = self.config.worker
        self.client = make_client(client_id(f"region-{self.region}", self.config.broker), self.config.broker,
                                  persistent_session=True, manual_ack=worker)
        self.client.on_message = on_message_into(
            self.inbox, lambda msg: Delivery(msg.topic, msg.payload, msg.mid if msg.qos else None, bool(msg.dup)),
            self.counters, log, self.name)
        self.client.on_publish = lambda c, u, mid, rc, p: self._published.put(mid)
        self.client.on_connect = lambda c, u, f, rc, p: None if rc is not None and rc.is_failure else self.subscriptions.subscribe()
        self.watch.attach(self.client)
        updates = self.topics.all_sites("update")
        if worker:  # the broker gives each update to one worker of the group
            updates = f"$share/{self.config.shared_group}/{updates}"
        self.subscriptions = Subscriptions(self.client, [self.topics.round, self.topics.global_model, updates,
                                                         *(self.topics.all_sites(k) for k in ("stats", "status"))])
        connect(self.client, self.config.broker)
        self.subscriptions.wait()

    def run(self, stop: threading.Event) -> None:
        if self.client is None:
            self.start()
        while not stop.is_set():
            self.pump(0.2)
            self.close_if_due(time.time())
        self.inbox.close()
        self.client.disconnect()
        self.client.loop_stop()

    def pump(self, timeout: float) -> None:
        """Handle one message (or wait up to `timeout`). Nothing a site or broker sends stops us."""
        self._release_acks()
        try:
            delivery = self.inbox.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return
        self.receive(delivery)

    def receive(self, d: Delivery) -> None:
        """A worker's delivery: an update waits in a batch (its ack held back until the batch's
        partial is at the broker); everything else is acked once handled. A region's: handled."""
        if not self.config.worker:
            self.handle(d.topic, d.payload)
            return
        is_update = d.topic.startswith(self.topics.root + "/sites/") and d.topic.endswith("/update")
        if is_update and self._catching_up():
            self._hold(d)
            return
        if is_update and d.dup:
            self.flush_batch()  # a redelivery goes out alone: a `duplicate` at the top drops only it
        before = len(self.batch) + len(self.batch_skips)
        self.handle(d.topic, d.payload)
        if len(self.batch) + len(self.batch_skips) > before:
            if d.mid is not None:
                self.batch_mids.append(d.mid)
            if d.dup or len(self.batch) + len(self.batch_skips) >= self.config.batch:
                self.flush_batch()
        elif d.mid is not None and not self._awaiting(d.mid):
            self.client.ack(d.mid, 1)
        if self.held and not is_update and not self._catching_up():
            held, self.held = self.held, []
            for h in held:
                self.receive(h)

    def _awaiting(self, mid: int) -> bool:
        """A redelivery (after a reconnect) of an update still in a batch whose partial the
        broker has not acknowledged: acked with that batch, once. Acking it twice could ack
        a later message the broker gave the same id."""
        return mid in self.batch_mids or any(mid in mids for mids in self._unacked.values())

    def _catching_up(self) -> bool:
        """No round open and none closed yet: a (re)started worker without its round or global model."""
        ann = self.announced
        return self.round is None and (ann is None or self.model is None or (not ann.done and ann.model_version != self.version))

    def _hold(self, d: Delivery) -> None:
        """Keep an update that came before the round it is for (bounded: the oldest goes)."""
        self.held.append(d)
        if len(self.held) > MAX_HELD:
            old = self.held.pop(0)
            self.refusals.refused(self.counters, Refusal.STALE_ROUND.value, "?", Refusal.STALE_ROUND.value,
                                  f"{old.topic[:200]}: no round open after {MAX_HELD} held updates")
            if old.mid is not None:
                self.client.ack(old.mid, 1)

    def _release_acks(self) -> None:
        """Ack the updates of every batch partial the broker has acknowledged."""
        while True:
            try:
                mid = self._published.get_nowait()
            except queue.Empty:
                return
            for update_mid in self._unacked.pop(mid, []):
                self.client.ack(update_mid, 1)

    def handle(self, topic: str, payload: bytes) -> None:
        who = "aggregator" if topic in (self.topics.round, self.topics.global_model) else "?"
        try:
            if topic == self.topics.round:
                if payload:
                    self.on_round(payload)
            elif topic == self.topics.global_model:
                if payload:
                    self.on_global(payload)
            else:
                who, kind = self.topics.parse_site(topic)
                if who not in self.config.sites:
                    raise Rejected(Refusal.UNKNOWN_SITE, f"site {who!r} is not in region {self.region}")
                if kind == "update":
                    self.on_update(who, payload)
                elif payload:  # stats or status: what the site says it holds bounds its weight
                    self.on_report(who, kind, payload)
        except Refused as exc:
            self.refusals.refused(self.counters, exc.reason.value, who, exc.reason.value, f"{topic[:200]}: {exc}")
            if topic not in (self.topics.round, self.topics.global_model) and self.round is not None:
                self.round_refused[exc.reason.value] += 1
        except Exception:
            self.counters[Refusal.INTERNAL_ERROR.value] += 1
            self._errors.warning(Refusal.INTERNAL_ERROR, "failed to handle a message on %s", topic[:300], exc_info=True)

    # --- from the top aggregator (over the bridge) ----------------------------------

    def on_round(self, payload: bytes) -> None:
        """A signed round announcement: open the round once its starting global is here."""
        opened = self.top.open(signed.ROUND, payload, signer=signed.AGGREGATOR)
        ann = RoundAnnouncement.from_payload(opened.body)
        opened.expect(round=ann.round, version=ann.version)
        if ann.epoch < self.epoch or (self.announced is not None and ann.epoch == self.epoch and ann.round < self.announced.round):
            raise Rejected(Refusal.STALE_ROUND, f"round {ann.round} (epoch {ann.epoch}) announced after round "
                                                f"{self.announced.round if self.announced else '-'} (epoch {self.epoch})")
        self.epoch, self.announced = ann.epoch, ann
        self._open_if_ready()

    def on_global(self, payload: bytes) -> None:
        """A global model signed by the aggregator: the reference every update is checked against."""
        env = envelope.decode(payload)
        if env.kind != "global":
            raise Rejected(Refusal.BAD_GLOBAL, f"global topic carried a {env.kind!r} envelope")
        self.top.check_envelope(env, signer=signed.AGGREGATOR, epoch=self.epoch)
        if env.model_version <= self.version:
            return
        self.model, self.version = parse_model(env.body), env.model_version
        log.info("%s: global v%d received", self.name, self.version)
        self._open_if_ready()

    def _open_if_ready(self) -> None:
        ann = self.announced
        if ann is None or ann.done or self.model is None or ann.model_version != self.version:
            return
        if self.round is not None and self.round.announce_id == ann.announce_id:
            return
        if ann.round in self.sent:
            return  # this round's partial is out (an announcement re-sent after a reconnect)
        if self.config.worker and self.round is not None:
            self.flush_batch()  # the old round's last batch: refused at the top if late, but its acks go
        self.round = Round(ann.round, ann.model_version, ann.announce_id, time.time(), ann.deadline, self.config.sites,
                           on_accept=self._fold)
        self.running = self._new_sum()
        self.round_refused = Counter()
        log.info("%s: round %d open (from global v%d, %d sites)", self.name, ann.round, ann.model_version,
                 len(self.config.sites))

    # --- from the region's sites ----------------------------------------------------

    def on_update(self, site: str, payload: bytes) -> None:
        if self.round is None:
            raise Rejected(Refusal.STALE_ROUND, f"no round is open in region {self.region}")
        accepted = self.round.check(site, payload, self.model, self.config.max_update_bytes, self.verifier, self.epoch)
        if self.config.worker:
            (self.batch if accepted else self.batch_skips).append(site)
            if self.batch_since is None:
                self.batch_since = time.time()

    def on_report(self, site: str, kind: str, payload: bytes) -> None:
        if kind == "stats":
            samples = StatsReply.from_payload(self.verifier.open(signed.STATS, payload, signer=site).body, site=site).samples
        else:
            samples = Status.from_payload(self.verifier.open(signed.STATUS, payload, signer=site).body, site=site).samples
        observe_samples(self.known_samples, site, samples)

    def _fold(self, accepted: Accepted) -> None:
        """As the top aggregator folds a direct update: its claim capped by what the site reported."""
        w = capped_weights({accepted.site: accepted.samples}, self.known_samples, 1.0)[accepted.site]
        self.running.add(accepted.site, accepted.weights, w.used)
        accepted.weights = None

    # --- the partial -----------------------------------------------------------------

    def close_if_due(self, now: float) -> bytes | None:
        """Send the partial once `quorum` of the region's sites answered or the round's
        deadline is `close_before_s` away; returns what was sent."""
        r = self.round
        if r is None:
            return None
        if self.config.worker:
            return self._worker_close_if_due(now)
        answered = r.complete(self.config.effective_quorum) is not None
        if not answered and now < r.deadline - self.config.close_before_s:
            return None
        return self.send_partial()

    def partial_payload(self) -> bytes:
        """The open round's partial: the share cap applied among the region's sites, then Σ w·θ and Σ w."""
        r, running = self.round, self.running
        shares = capped_weights(dict(running.weights), {}, self.config.max_site_share)
        final = {s: w.used for s, w in shares.items()}
        total, _ = running.final_sum(final) if final else (np.zeros_like(running.base), 0)
        sites = [PartialSite(a.site, final[a.site], a.samples, a.wire_bytes, running.norms[a.site]) for a in r.accepted.values()]
        missing = sorted(set(r.sites) - set(r.accepted))
        return encode_partial(self.sealer, round=r.number, model_version=r.model_version, epoch=self.epoch, total=total,
                              sites=sites, missing=missing, refused=dict(self.round_refused),
                              summary=self.config.site_records == "summary")

    def _new_sum(self) -> RunningSum:
        """A worker's batch sum has no share cap (the top cannot apply one to a batch:
        fleet.toml's workers need max_site_share = 1); a region's caps among its sites."""
        return RunningSum(read_weights(self.model), 1.0 if self.config.worker else self.config.max_site_share)

    def _worker_close_if_due(self, now: float) -> bytes | None:
        """A worker: the open batch `flush_s` after its first update; at `close_before_s`
        before the deadline the last batch, and the round is done here."""
        r = self.round
        sent = self.flush_batch() if self.batch_since is not None and now - self.batch_since >= self.config.flush_s else None
        if now >= r.deadline - self.config.close_before_s:
            sent = self.flush_batch() or sent
            self.sent.setdefault(r.number, 0)
            self.round, self.running = None, None
            log.info("worker %s: round %d done here: %d batch partial(s), %d updates", self.region, r.number,
                     self.batches[r.number], len(r.accepted))
        return sent

    def flush_batch(self) -> bytes | None:
        """A worker: send the open batch as one partial (nothing when it is empty); its
        updates are acked once the broker has the partial (`_release_acks`)."""
        r, running = self.round, self.running
        if r is None or not (self.batch or self.batch_skips):
            return None
        total, _ = running.final_sum({}) if self.batch else (np.zeros_like(running.base), 0)
        sites = [PartialSite(s, running.weights[s], r.accepted[s].samples, r.accepted[s].wire_bytes, running.norms[s])
                 for s in self.batch]
        payload = encode_partial(self.sealer, round=r.number, model_version=r.model_version, epoch=self.epoch, total=total,
                                 sites=sites, missing=list(self.batch_skips), refused=dict(self.round_refused))
        info = self.client.publish(self.topics.partial(self.region), payload, qos=1)
        self._unacked[info.mid] = self.batch_mids
        self.sent[r.number] = self.sent.get(r.number, 0) + len(payload)
        self.batches[r.number] += 1
        for old in sorted(self.sent)[:-16]:
            self.sent.pop(old)
            self.batches.pop(old, None)
        log.debug("worker %s: round %d batch %d sent: %d updates, %d skips, %d refused, %d bytes", self.region, r.number,
                 self.batches[r.number], len(self.batch), len(self.batch_skips), sum(self.round_refused.values()), len(payload))
        self.batch, self.batch_skips, self.batch_mids, self.batch_since = [], [], [], None
        self.running, self.round_refused = self._new_sum(), Counter()
        return payload

    def send_partial(self) -> bytes:
        payload = self.partial_payload()
        r, self.round, self.running = self.round, None, None
        self.client.publish(self.topics.partial(self.region), payload, qos=1)
        self.sent[r.number] = len(payload)
        if len(self.sent) > 16:
            self.sent.pop(min(self.sent))
        log.info("region %s: round %d partial sent: %d updates, %d skipped or silent, %d refused, %d bytes",
                 self.region, r.number, len(r.accepted), len(r.sites) - len(r.accepted), sum(self.round_refused.values()),
                 len(payload))
        return payload


def run_cli(args: argparse.Namespace) -> int:
    config = load_region_config(args.config)
    region = RegionalAggregator(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    region.start()
    if config.worker:
        log.info("%s running: %d sites, shared group %s, batches of %d or %.1f s, partials on %s", region.name,
                 len(config.sites), config.shared_group, config.batch, config.flush_s, region.topics.partial(config.region))
    else:
        log.info("%s running: %d sites, quorum %d, partial on %s", region.name, len(config.sites),
                 config.effective_quorum, region.topics.partial(config.region))
    region.run(stop)
    return 0
