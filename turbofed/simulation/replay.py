"""Replay C-MAPSS (or synthetic) engines as live sensor traffic over MQTT.

The fleet runs the way a real one does: every engine of a part advances one cycle per
tick (engine k's cycle t goes out in tick t, an engine that has ended drops out), and
each engine belongs to one site, as `turbofed.simulation.fleet.assign` says. Per engine::

    plant/<site>/<engine>/sensors   one SensorReading per cycle, in cycle order
    plant/<site>/<engine>/events    right after its last row: EngineEvent("failure")
                                    for a training run, EngineEvent("truth", rul) for a
                                    test run

The engines are exactly those `turbofed.data.datasets.load_dataset` trains and evaluates
on (NASA's official test set, or the benchmark's seeded hold-out when a subset has
none), so a replayed fleet and the in-process benchmark see the same data. Part "both"
replays all training engines, then all test engines.

Everything goes at QoS 1 through a bounded window of unacknowledged messages, paced by
a token bucket of rows per second (or as fast as the broker acknowledges, "max"), and
`replay()` returns only once the broker has acknowledged every message.

`publish_schedule` / `fleet_schedule` are the pure part (no broker): the exact order of
(topic, payload), for tests and benchmarks.

On a secure broker the replay acts as each site's sensor gateway: one connection per
site, as `gateway-<site>` (TLS client certificate), since the ACL lets a gateway publish
only `plant/<its site>/...` (`GatewayReplay`; `turbofed replay --pki DIR`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from turbofed.config import BrokerSettings, load_gateway_config
from turbofed.data.cmapss import SUBSETS, EngineRun
from turbofed.errors import TurbofedError
from turbofed.messages import EngineEvent, SensorReading
from turbofed.simulation.fleet import ASSIGN_MODES, FleetEngine, assign
from turbofed.topics import DEFAULT_TOPICS, Topics

log = logging.getLogger(__name__)

PARTS = ("train", "test", "both")
DEFAULT_INFLIGHT = 100  # unacknowledged QoS 1 messages on the wire (paho's window)
CONNECT_TIMEOUT = 10.0  # seconds for TCP connect + CONNACK
ACK_TIMEOUT = 30.0  # seconds without a single PUBACK before the replay gives up


MIN_SLEEP = 0.005  # seconds: the pacing granularity of the token bucket


class ReplayError(TurbofedError):
    """A replay setting is wrong or the replay could not be completed."""


class BrokerUnreachableError(ReplayError):
    """The broker at host:port could not be reached or refused the connection."""


class Publish(NamedTuple):
    """One scheduled message: where it goes, what it carries, and what it is."""

    topic: str
    payload: bytes
    kind: str  # "sensors" | "events"
    site: str
    engine: str
    cycle: int
    tick: int  # 0-based tick within its part


# --------------------------------------------------------------------------- settings


def parse_rate(value: str | float | int | None) -> float | None:
    """Rows per second (a positive, finite number), or None for "max" (as fast as acked)."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("max", "inf", "unlimited"):
            return None
        try:
            rate = float(text)
        except ValueError:
            raise ReplayError(f"--rate must be a positive number of rows per second or 'max', got {value!r}") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        rate = float(value)
    else:
        raise ReplayError(f"--rate must be a positive number of rows per second or 'max', got {value!r}")
    if not math.isfinite(rate) or rate <= 0:
        raise ReplayError(f"--rate must be a positive number of rows per second or 'max', got {value!r}")
    return rate


def parse_broker(value: str) -> tuple[str, int]:
    """'host:port' (also '[::1]:1883', or 'host' for port 1883) -> (host, port)."""
    text = (value or "").strip()
    host, port_text = text, "1883"
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ReplayError(f"--broker must be host:port, got {value!r}")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ReplayError(f"--broker must be host:port, got {value!r}")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        raise ReplayError(f"--broker: write an IPv6 address as [addr]:port, got {value!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ReplayError(f"--broker port must be a number, got {value!r}") from None
    if not host or not 0 < port < 65536:
        raise ReplayError(f"--broker must be host:port with a port in 1..65535, got {value!r}")
    return host, port


def check_dataset(dataset: str) -> list[str]:
    """Subset names of `dataset` ('FD001', 'FD001+FD003', 'SYN', ...), or ReplayError."""
    names = [n.strip().upper() for n in (dataset or "").split("+")]
    bad = [n for n in names if not (n in SUBSETS or n.startswith("SYN"))]
    if not names or bad or any(not n for n in names):
        raise ReplayError(
            f"unknown dataset {dataset!r}: use one of {', '.join(SUBSETS)}, SYN (synthetic, e.g. SYN001), "
            "or several joined with '+' (e.g. FD001+FD003)"
        )
    if len(set(names)) != len(names):
        raise ReplayError(f"dataset {dataset!r} names a subset twice")
    return names


# --------------------------------------------------------------------------- schedule


def fleet_parts(
    dataset: str,
    data_dir: str | None,
    n_sites: int,
    assign_mode: str = "round-robin",
    part: str = "both",
    seed: int = 0,
    max_engines: int | None = None,
) -> list[tuple[str, list[FleetEngine]]]:
    """The engines to replay, per part in replay order: [("train", [...]), ("test", [...])].

    Training runs and evaluation engines come from `turbofed.data.datasets.load_dataset`
    (same seed -> same hold-out and synthetic fleet as the benchmark). `max_engines`
    keeps the first N engines of each subset and part (a quick slice; sites are then
    assigned among those N).
    """
    check_dataset(dataset)
    if part not in PARTS:
        raise ReplayError(f"unknown part {part!r}; choose one of {', '.join(PARTS)}")
    if assign_mode not in ASSIGN_MODES:
        raise ReplayError(f"unknown assignment {assign_mode!r}; choose one of {', '.join(ASSIGN_MODES)}")
    if isinstance(n_sites, bool) or not isinstance(n_sites, int) or n_sites < 1:
        raise ReplayError(f"--sites must be a positive whole number, got {n_sites!r}")
    if max_engines is not None and max_engines < 1:
        raise ReplayError(f"max_engines must be at least 1, got {max_engines!r}")

    from turbofed.data.datasets import (
        load_dataset,  # lazy: loading C-MAPSS needs numpy's parsers only here
    )

    train, evals = load_dataset(dataset, data_dir, seed)
    by_part: dict[str, dict[str, list[EngineRun]]] = {
        "train": train,
        "test": {ev.subset: ev.runs for ev in evals},
    }
    wanted = ["train", "test"] if part == "both" else [part]
    out = []
    for name in wanted:
        runs = {s: r[:max_engines] if max_engines else r for s, r in by_part[name].items()}
        try:
            engines = assign(runs, n_sites, name, assign_mode)
        except ValueError as exc:
            raise ReplayError(str(exc)) from None
        out.append((name, engines))
    return out


def publish_schedule(engines: Iterable[FleetEngine], topics: Topics = DEFAULT_TOPICS) -> Iterator[Publish]:
    """The publish order of one part: tick-major, engines in fleet order within a tick.

    In tick t every engine that still runs publishes its cycle at index t; an engine's
    event (failure for "train", truth for "test") follows its last row in the same tick.
    """
    prepared = []
    for e in engines:
        run = e.run
        if len(run) == 0:
            continue
        prepared.append(
            (
                e,
                topics.sensors(e.site, e.engine),
                topics.events(e.site, e.engine),
                run.cycles.tolist(),
                run.settings.tolist(),
                run.sensors.tolist(),
            )
        )
    n_ticks = max((len(p[3]) for p in prepared), default=0)
    for t in range(n_ticks):
        for e, sensors_topic, events_topic, cycles, settings, sensors in prepared:
            if t >= len(cycles):
                continue
            cycle = int(cycles[t])
            reading = SensorReading(cycle, tuple(settings[t]), tuple(sensors[t]))
            yield Publish(sensors_topic, reading.to_payload(), "sensors", e.site, e.engine, cycle, t)
            if t == len(cycles) - 1:
                yield Publish(events_topic, end_event(e).to_payload(), "events", e.site, e.engine, cycle, t)


def end_event(engine: FleetEngine) -> EngineEvent:
    """What is published after an engine's last row: failure (train) or revealed truth (test)."""
    last = int(engine.run.cycles[-1])
    if engine.part == "train":
        return EngineEvent("failure", last)
    rul = float(engine.run.rul_at_end)
    return EngineEvent("truth", last, int(rul) if rul.is_integer() else rul)


def fleet_schedule(parts: list[tuple[str, list[FleetEngine]]], topics: Topics = DEFAULT_TOPICS) -> Iterator[Publish]:
    """All parts one after the other (train, then test)."""
    for _, engines in parts:
        yield from publish_schedule(engines, topics)


def count_rows(parts: list[tuple[str, list[FleetEngine]]]) -> int:
    return sum(len(e.run) for _, engines in parts for e in engines)


# --------------------------------------------------------------------------- pacing


class TokenBucket:
    """Rows per second with a small burst allowance: take() blocks until a token is there.

    The bucket starts empty and holds at most `burst` tokens (default 50 ms of traffic),
    so after a stall (a slow broker) the replay catches up by at most one burst instead
    of firing everything it fell behind by.
    """

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not rate > 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.capacity = max(1.0, burst if burst is not None else rate * 0.05)
        self.tokens = 0.0
        self._clock, self._sleep = clock, sleep
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        self.tokens = min(self.capacity, self.tokens + (now - self._last) * self.rate)
        self._last = now

    def take(self, n: float = 1.0) -> None:
        self._refill()
        while self.tokens < n:
            # Sleep for a batch of rows (at least 5 ms, within the bucket), not per row:
            # short sleeps cost more than they pace and oversleep by more than they last.
            self._sleep(max((n - self.tokens) / self.rate, min(MIN_SLEEP, self.capacity / self.rate)))
            self._refill()
        self.tokens -= n


# --------------------------------------------------------------------------- publisher


class Replay:
    """A paho-mqtt 2.x publisher with a bounded window of unacknowledged QoS 1 messages.

    Use as a context manager: connect on enter, wait for every PUBACK and disconnect on
    a clean exit. `publish()` blocks while `max_pending` messages await their PUBACK, so
    memory stays bounded and "max" means as fast as the broker acknowledges.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        inflight: int = DEFAULT_INFLIGHT,
        connect_timeout: float = CONNECT_TIMEOUT,
        ack_timeout: float = ACK_TIMEOUT,
        client_id: str | None = None,
        tls: BrokerSettings | None = None,
    ) -> None:
        import paho.mqtt.client as mqtt

        from turbofed.mqtt import ConnectError, configure_tls

        self.host, self.port = host, port
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.connect_timeout, self.ack_timeout = connect_timeout, ack_timeout
        # Our window equals paho's: publish() blocks instead of paho queueing without bound.
        self.max_pending = inflight
        self._cond = threading.Condition()
        self._sent = 0
        self._acked = 0
        self._connected = False
        self._connect_result: str | None = None
        self._disconnect_reason: str | None = None
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"turbofed-replay-{uuid.uuid4().hex[:10]}",
            clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        self._client.max_inflight_messages_set(inflight)
        self._client.max_queued_messages_set(0)  # unbounded in paho; we bound it ourselves
        self._client.reconnect_delay_set(min_delay=1, max_delay=5)
        if tls is not None:
            try:
                configure_tls(self._client, tls)
            except ConnectError as exc:
                raise BrokerUnreachableError(str(exc)) from None
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._loop_started = False

    # paho callbacks (network thread)
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        with self._cond:
            self._connect_result = str(reason_code)
            self._connected = not reason_code.is_failure
            if self._connected:
                self._disconnect_reason = None
            self._cond.notify_all()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        with self._cond:
            self._connected = False
            self._disconnect_reason = str(reason_code)
            self._cond.notify_all()
        if reason_code.is_failure:
            log.warning("lost the broker at %s (%s); reconnecting", self.address, reason_code)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        with self._cond:
            self._acked += 1
            self._cond.notify_all()

    # lifecycle
    def connect(self) -> None:
        try:
            self._client.connect(self.host, self.port, keepalive=60)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
            raise BrokerUnreachableError(f"cannot reach the MQTT broker at {self.address}: {reason}") from None
        self._client.loop_start()
        self._loop_started = True
        deadline = time.monotonic() + self.connect_timeout
        with self._cond:
            while self._connect_result is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            result, ok = self._connect_result, self._connected
        if not ok:
            self.close(wait=False)
            why = f"refused the connection: {result}" if result else f"did not answer within {self.connect_timeout:g}s"
            raise BrokerUnreachableError(f"the MQTT broker at {self.address} {why}")

    @property
    def pending(self) -> int:
        with self._cond:
            return self._sent - self._acked

    def _wait_until(self, done: Callable[[], bool], what: str) -> None:
        """Wait (holding the condition) until done(); fail after ack_timeout without any PUBACK."""
        last_acked, last_progress = self._acked, time.monotonic()
        while not done():
            self._cond.wait(0.5)
            now = time.monotonic()
            if self._acked != last_acked:
                last_acked, last_progress = self._acked, now
            elif now - last_progress > self.ack_timeout:
                state = "connected" if self._connected else f"disconnected ({self._disconnect_reason})"
                raise ReplayError(
                    f"the MQTT broker at {self.address} acknowledged nothing for {self.ack_timeout:g}s "
                    f"while {what}; {self._sent - self._acked} messages unacknowledged, {state}"
                )

    def publish(self, topic: str, payload: bytes) -> None:
        """Queue one QoS 1 message; blocks while the window of unacknowledged messages is full."""
        with self._cond:
            if self._sent - self._acked >= self.max_pending:
                self._wait_until(lambda: self._sent - self._acked < self.max_pending, "publishing")
            self._sent += 1  # before publish(): the PUBACK may arrive before it returns
        info = self._client.publish(topic, payload, qos=1)
        if info.rc not in (0, 4):  # MQTT_ERR_SUCCESS, MQTT_ERR_NO_CONN (queued; sent on reconnect)
            with self._cond:
                self._sent -= 1
            raise ReplayError(f"could not publish to {topic} on {self.address}: paho error {info.rc}")

    def flush(self) -> None:
        """Block until the broker has acknowledged every message published so far."""
        with self._cond:
            self._wait_until(lambda: self._acked >= self._sent, "waiting for the last acknowledgements")

    def close(self, wait: bool = True) -> None:
        try:
            if wait:
                self.flush()
        finally:
            if self._loop_started:
                self._client.disconnect()
                self._client.loop_stop()
                self._loop_started = False

    def __enter__(self) -> Replay:
        self.connect()
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.close(wait=exc_type is None)

    # the replay itself
    def send(self, item: Publish) -> None:
        self.publish(item.topic, item.payload)

    def run(self, schedule: Iterable[Publish], rate: float | None, total_rows: int | None = None, progress: bool = True) -> dict:
        """Publish the schedule, pacing sensor rows at `rate` per second (None: max), then flush."""
        return run_schedule(self, schedule, rate, total_rows, progress)


class GatewayReplay:
    """The replay as every site's sensor gateway: one `Replay` per site, each with that
    site's gateway identity (`gateway-<site>`), each message sent by its site's gateway.
    Same interface as `Replay` (context manager, send, flush, run)."""

    def __init__(self, host: str, port: int, gateways: Mapping[str, BrokerSettings], **options: Any) -> None:
        if not gateways:
            raise ReplayError("a gateway replay needs at least one site's gateway identity")
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.publishers = {site: Replay(host, port, tls=settings, client_id=f"turbofed-replay-{site}-{uuid.uuid4().hex[:6]}",
                                        **options) for site, settings in gateways.items()}

    def connect(self) -> None:
        try:
            for publisher in self.publishers.values():
                publisher.connect()
        except BaseException:
            self.close(wait=False)
            raise

    def send(self, item: Publish) -> None:
        publisher = self.publishers.get(item.site)
        if publisher is None:
            raise ReplayError(f"no gateway identity for site {item.site!r} (topic {item.topic}); "
                              f"have: {', '.join(sorted(self.publishers))}")
        publisher.publish(item.topic, item.payload)

    def flush(self) -> None:
        for publisher in self.publishers.values():
            publisher.flush()

    def close(self, wait: bool = True) -> None:
        errors = []
        for publisher in self.publishers.values():
            try:
                publisher.close(wait=wait)
            except ReplayError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> GatewayReplay:
        self.connect()
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.close(wait=exc_type is None)

    def run(self, schedule: Iterable[Publish], rate: float | None, total_rows: int | None = None, progress: bool = True) -> dict:
        return run_schedule(self, schedule, rate, total_rows, progress)


def gateway_settings(pki: str | Path, sites: Iterable[str], host: str, port: int, topics: Topics | None = None) -> dict[str, BrokerSettings]:
    """Each site's gateway identity from the fleet's identity folder, as client settings."""
    from turbofed.deploy.identities import FleetIdentities, IdentityError, client_settings, gateway_name

    ids = FleetIdentities(Path(pki))
    topics = topics or DEFAULT_TOPICS
    base = BrokerSettings(host=host, port=port, topic_root=topics.root, plant_root=topics.plant_root)
    try:
        return {site: client_settings(ids, gateway_name(site), base) for site in sites}
    except IdentityError as exc:
        raise ReplayError(f"--pki {pki}: {exc}") from None


def run_schedule(publisher: Replay | GatewayReplay, schedule: Iterable[Publish], rate: float | None,
                 total_rows: int | None = None, progress: bool = True) -> dict:
    """Publish the schedule through `publisher`, pacing sensor rows at `rate` per second
    (None: max), then flush."""
    from tqdm import tqdm

    bucket = TokenBucket(rate) if rate else None
    rows = events = 0
    bar = tqdm(total=total_rows, unit="row", desc="replay", file=sys.stderr, disable=not progress,
               unit_scale=True, dynamic_ncols=True)
    started = time.perf_counter()
    batch = 0
    try:
        for item in schedule:
            if item.kind == "sensors":
                if bucket is not None:
                    bucket.take()
                rows += 1
                batch += 1
                if batch >= 256:
                    bar.update(batch)
                    batch = 0
            else:
                events += 1
            publisher.send(item)
        publisher.flush()
    finally:
        bar.update(batch)
        bar.close()
    seconds = time.perf_counter() - started
    return {
        "rows": rows,
        "events": events,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds, 1) if seconds > 0 else None,
    }


# --------------------------------------------------------------------------- front doors


def replay(
    dataset: str,
    data_dir: str | None,
    n_sites: int,
    host: str,
    port: int,
    rate: float | None,
    assign_mode: str,
    part: str,
    seed: int = 0,
    progress: bool = True,
    *,
    max_engines: int | None = None,
    topics: Topics | None = None,
    inflight: int = DEFAULT_INFLIGHT,
    connect_timeout: float = CONNECT_TIMEOUT,
    ack_timeout: float = ACK_TIMEOUT,
    pki: str | Path | None = None,
    gateways: Mapping[str, BrokerSettings] | None = None,
) -> dict:
    """Replay a fleet to the broker at host:port; returns once the broker acknowledged all.

    `rate` is rows per second (None = as fast as the broker acknowledges). The summary
    holds rows, events, engines, sites, seconds and rows/s. With `pki` (the fleet's
    identity folder) it connects over TLS as each site's gateway (`GatewayReplay`); with
    `gateways` (site -> settings, from gateway TOML files) as exactly those gateways.
    """
    rate = parse_rate(rate)
    parts = fleet_parts(dataset, data_dir, n_sites, assign_mode, part, seed, max_engines)
    topics = topics or DEFAULT_TOPICS
    total = count_rows(parts)
    log.info(
        "replaying %s (%s): %d engines, %d rows to %d sites at %s",
        dataset, part, sum(len(e) for _, e in parts), total, n_sites,
        "max rate" if rate is None else f"{rate:g} rows/s",
    )
    options: dict[str, Any] = dict(inflight=inflight, connect_timeout=connect_timeout, ack_timeout=ack_timeout)
    publisher: Replay | GatewayReplay
    if gateways:
        publisher = GatewayReplay(host, port, gateways, **options)
    elif pki is not None:
        sites = sorted({engine.site for _, engines in parts for engine in engines})
        publisher = GatewayReplay(host, port, gateway_settings(pki, sites, host, port, topics), **options)
    else:
        publisher = Replay(host, port, **options)
    with publisher:
        summary = publisher.run(fleet_schedule(parts, topics), rate, total, progress)
    return {
        "dataset": dataset,
        "part": part,
        "broker": publisher.address,
        "sites": n_sites,
        "assign": assign_mode,
        "engines": {name: len(engines) for name, engines in parts},
        "rate": "max" if rate is None else rate,
        **summary,
    }


def _gateways(files: list[str], n_sites: int) -> dict[str, BrokerSettings]:
    """`--gateway FILE` (repeated): one gateway TOML per site replayed (site1..siteN), all on one broker."""
    configs = [load_gateway_config(f) for f in files]
    gateways = {c.site: c.broker for c in configs}
    if not configs:
        return gateways
    wanted = {f"site{i + 1}" for i in range(n_sites)}
    if len(gateways) != len(configs) or set(gateways) != wanted:
        raise ReplayError(f"--gateway: the files name sites {', '.join(c.site for c in configs)}; "
                          f"--sites {n_sites} replays {', '.join(sorted(wanted))}: give one gateway file for each")
    if len({(b.host, b.port, b.plant_root) for b in gateways.values()}) > 1:
        raise ReplayError("--gateway: the files name different brokers or plant roots; the replay publishes to one")
    return gateways


def run_cli(args: argparse.Namespace) -> int:
    """`turbofed replay`: print the summary as JSON on stdout."""
    rate = parse_rate(args.rate)  # check settings before loading any data
    host, port = parse_broker(args.broker)
    check_dataset(args.dataset)
    gateways = _gateways(getattr(args, "gateway", None) or [], args.sites)
    topics = None
    if gateways:
        first = next(iter(gateways.values()))
        host, port, topics = first.host, first.port, Topics(first.topic_root, first.plant_root)
    summary = replay(
        dataset=args.dataset,
        data_dir=args.data_dir,
        n_sites=args.sites,
        host=host,
        port=port,
        rate=rate,
        assign_mode=args.assign,
        part=args.part,
        seed=getattr(args, "seed", 0) or 0,
        progress=getattr(args, "progress", True),
        max_engines=getattr(args, "max_engines", None),
        pki=getattr(args, "pki", None),
        gateways=gateways,
        topics=topics,
    )
    print(json.dumps(summary))
    print(
        f"replay: {summary['rows']} rows and {summary['events']} events to {summary['broker']} "
        f"in {summary['seconds']:.2f} s ({summary['rows_per_s']} rows/s)",
        file=sys.stderr,
    )
    return 0
