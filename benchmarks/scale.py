"""`turbofed bench scale`: one aggregator, N sites, real Mosquitto, measured (flat topology).

The aggregator is the real one (`turbofed aggregator`, its own process, FedAvg: streaming
aggregation, aggregator/streaming.py). The sites are lightweight simulations, many per
process: each has its own Ed25519 key from the fleet's identity folder and sends real signed
messages (a statistics reply, then an update per round: the reference model with other
weights, the real model's size) through a few shared MQTT connections to a real Mosquitto
on loopback (plain MQTT: TLS and ACLs are measured by `bench system`). Updates are sent at
`--rate` a second, spread as sites finishing their training at different times would be.

Per N, over `--rounds` rounds:
- close latency: the last update accepted by the aggregator (the store's `closed -
  aggregate_ms`) to the global model arriving at the sites (same clock);
- aggregator RSS (VmRSS, sampled every 0.2 s: the largest after the first round) and CPU
  seconds per update (utime + stime over the rounds / updates);
- the broker's message rate while updates flow (updates accepted / the time from the first
  update sent to the last accepted);
- end to end: the last update sent to the global model arriving at the sites.

`--topology two-level`: 4 regional Mosquittos, each bridged to a central one
(broker_config/bridge.conf.template, plain MQTT on loopback), a regional aggregator on each
(`turbofed region`, its own process), the top aggregator on the central broker; the sites,
split evenly, on their region's broker. Per N the same figures for the top aggregator (its
close latency runs from the last partial it accepted), the regional aggregators' RSS and CPU,
and the bytes crossing to the top per round: the 4 partials, against 4 x one update's bytes
(issue #16's goal), counted by a client subscribed to the partials at the central broker.
`--site-records full` has the regions send a record per site instead of totals
(RegionConfig.site_records; docs/scaling.md).

`--topology workers`: ingestion workers (docs/scaling.md) on the one broker: the top
aggregator with fleet.toml `workers = [...]` and `--workers` (default 2) worker processes
(`turbofed region`, shared_group "ingest") that take the sites' updates through an MQTT shared
subscription and send the top batch partials. Per N the top's figures as two-level (close
latency from the last partial it accepted), the workers' RSS (the largest) and CPU (together)
an update, the partials a round, and whether every round counted every site once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from paho.mqtt import client as mqtt_client

from turbofed.benchmarks import emit, machine_info
from turbofed.benchmarks.system import rss_mb
from turbofed.codec import read_weights, replace_weights
from turbofed.config import BrokerSettings, ModelSettings
from turbofed.data.synthetic import generate_fleet
from turbofed.deploy.bridge import render_bridge
from turbofed.deploy.identities import AGGREGATOR, FleetIdentities, add_identity, init_fleet
from turbofed.edge.features import history_stats, regime_stats
from turbofed.envelope import decode
from turbofed.errors import ConfigError
from turbofed.messages import RoundAnnouncement, StatsReply, StatsRequest, signed
from turbofed.messages.signed import Sealer
from turbofed.mqtt import connect, make_client
from turbofed.signing import SigningKey
from turbofed.simulation.broker import start_broker
from turbofed.simulation.children import spawn
from turbofed.simulation.localfleet import write_configs
from turbofed.spec import FleetStats, RegimeStats
from turbofed.store import open_store
from turbofed.topics import DEFAULT_TOPICS

CONNECTIONS = 8  # MQTT connections the simulated sites share
BODIES = 16  # distinct update bodies (weights) sent round-robin


class SimSites:
    """N simulated sites: keys, a few connections, and what they have seen. `brokers`: one
    BrokerSettings per connection; site i sends through connection i mod len(brokers) (on a
    broker with ACLs, give one connection per site, as that site's TLS identity)."""

    def __init__(self, sites: list[str], pki: Path, fleet_id: str, brokers: list[BrokerSettings], runs: list, rate: float,
                 name: str = "scale") -> None:
        self.sites, self.rate, self.runs = sites, rate, runs
        self.sealers = [Sealer(fleet_id, SigningKey.load(s, pki / "identities" / s / "signing.key")) for s in sites]
        self.topics = DEFAULT_TOPICS
        self.events: queue.Queue[tuple[str, bytes, float]] = queue.Queue()
        self.clients = [self._client(f"{name}-{i}", b) for i, b in enumerate(brokers)]
        listener = self.clients[0]
        listener.on_message = lambda c, u, m: self.events.put((m.topic, m.payload, time.time()))
        listener.subscribe([(self.topics.round, 1), (self.topics.global_model, 1), (self.topics.stats_request, 1)])
        self.bodies: list[bytes] = []
        self.globals: dict[int, float] = {}  # version -> when it arrived
        self.sent: dict[int, tuple[float, float]] = {}  # round -> (first, last) update sent

    @staticmethod
    def _client(name: str, broker: BrokerSettings) -> mqtt_client.Client:
        c = make_client(name, broker)
        connect(c, broker)
        return c

    def _send(self, i: int, topic: str, payload: bytes) -> None:
        self.clients[i % len(self.clients)].publish(topic, payload, qos=1)

    def answer_stats(self, request: StatsRequest) -> None:
        """Both phases of the fleet statistics (docs/protocol.md): every site answers with the
        same statistics, of a few synthetic engines."""
        if request.phase == "regimes":
            answer = {"regime_stats": sum((regime_stats(r.settings, r.sensors) for r in self.runs), RegimeStats())}
        else:
            answer = {"stats": sum((history_stats(r.cycles, r.sensors, r.rul(), request.window, r.settings, request.regimes)
                                    for r in self.runs), FleetStats())}
        rows = sum(len(r.cycles) for r in self.runs)
        for i, (site, sealer) in enumerate(zip(self.sites, self.sealers)):
            reply = StatsReply(request.request_id, site, rows, len(self.runs), **answer)
            self._send(i, self.topics.stats(site), sealer.seal(signed.STATS, reply.to_payload()))

    def send_updates(self, ann: RoundAnnouncement) -> None:
        gap, start = 1.0 / self.rate, time.time()
        for i, sealer in enumerate(self.sealers):
            delay = start + i * gap - time.time()
            if delay > 0:
                time.sleep(delay)
            payload = sealer.envelope(kind="update", round=ann.round, model_version=ann.model_version, samples=200,
                                      body=self.bodies[i % BODIES])
            self._send(i, self.topics.update(sealer.name), payload)
        self.sent[ann.round] = (start, time.time())

    def make_bodies(self, global_body: bytes) -> None:
        import onnx

        model = onnx.load_model_from_string(global_body)
        base, rng = read_weights(model), np.random.default_rng(0)
        self.bodies = [replace_weights(model, {n: (w + rng.normal(0, 0.01, w.shape)).astype(w.dtype) for n, w in base.items()})
                       .SerializeToString() for _ in range(BODIES)]

    def run(self, rounds: int, timeout: float) -> None:
        """Answer what the aggregator asks until global v`rounds` has arrived."""
        deadline = time.monotonic() + timeout
        answered: set[str] = set()
        while rounds not in self.globals:
            if time.monotonic() > deadline:
                raise RuntimeError(f"global v{rounds} not received after {timeout:.0f} s (have {sorted(self.globals)})")
            try:
                topic, payload, at = self.events.get(timeout=1.0)
            except queue.Empty:
                continue
            if not payload:
                continue
            if topic == self.topics.global_model:
                env = decode(payload)
                self.globals.setdefault(env.model_version, at)
                if not self.bodies:
                    self.make_bodies(env.body)
            elif topic == self.topics.stats_request:
                request = StatsRequest.from_payload(json.loads(payload)["signed"].encode())
                if request.request_id not in answered:
                    answered.add(request.request_id)
                    self.answer_stats(request)
            elif topic == self.topics.round:
                ann = RoundAnnouncement.from_payload(json.loads(payload)["signed"].encode())
                if not ann.done and ann.announce_id not in answered and self.bodies:
                    answered.add(ann.announce_id)
                    threading.Thread(target=self.send_updates, args=(ann,), daemon=True).start()

    def close(self) -> None:
        for c in self.clients:
            c.disconnect()
            c.loop_stop()


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_identities(root: Path, sites: Sequence[str], regions: Sequence[str] = ()) -> FleetIdentities:
    """An identity folder with signing keys for the aggregator, every site (no gateways) and every
    region (also a worker's role): the benchmarks' fleets and the in-process two-level tests'."""
    ids = init_fleet(root, ["127.0.0.1"])
    add_identity(ids, AGGREGATOR, "aggregator")
    for site in sites:
        add_identity(ids, site, "site")
    for region in regions:
        add_identity(ids, region, "region")
    return ids


class Watch:
    """RSS (VmRSS, every 0.2 s) and CPU seconds of some processes."""

    def __init__(self, procs: dict[str, Any]) -> None:
        self.procs, self.samples = procs, {name: [] for name in procs}
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            for name, proc in self.procs.items():
                try:
                    self.samples[name].append((time.time(), rss_mb(proc.pid)))
                except OSError:
                    pass
            time.sleep(0.2)

    def cpu(self) -> dict[str, float]:
        return {name: _cpu_s(proc.pid) for name, proc in self.procs.items()}

    def stop(self) -> None:
        self._stop.set()
        for name, proc in self.procs.items():
            if proc.poll() is None:
                self.samples[name].append((time.time(), rss_mb(proc.pid)))

    def rss(self, name: str, since: float) -> dict[str, float]:
        samples = self.samples[name]
        after = [m for t, m in samples if t >= since] or [m for _, m in samples]
        return {"max_after_round_1": round(max(after), 1), "max": round(max(m for _, m in samples), 1)}


def _fleet_toml(work: Path, sites: list[str], broker: BrokerSettings, rounds: int, pki: Path, extra: str = "") -> Path:
    fleet_toml = write_configs(work, [], broker, ModelSettings(rounds=rounds, seed=0), pki, tls=False)
    text = fleet_toml.read_text().replace("sites = []", f"sites = {json.dumps(sites)}")
    fleet_toml.write_text(text.replace("round_deadline_s = 120", f"round_deadline_s = 600\nmin_samples = 1\n{extra}"))
    return fleet_toml


def _aggregator(args: list[str], work: Path, name: str) -> Any:
    log = open(work / f"{name}.log", "ab")
    return spawn([sys.executable, "-m", "turbofed.cli", *args], stdout=log, stderr=log, cwd=work)


def _stop(procs: list) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(30)


def _rounds(work: Path, rounds: int) -> list[dict]:
    store = open_store(str(work / "results.sqlite"))
    try:
        return [r for r in store.rounds() if 1 <= r["round"] <= rounds]
    finally:
        store.close()


def _last_accepted(row: dict) -> float:
    """When the round's last update (flat) or partial (two-level) was accepted: the store's close less aggregate_ms."""
    return row["closed"] - row["aggregate_ms"] / 1000.0


def _p50_max(values: list[float]) -> dict[str, float]:
    return {"p50": round(statistics.median(values), 1), "max": round(max(values), 1)}


def run_n(n: int, rounds: int, rate: float, work: Path, runs: list) -> dict[str, Any]:
    """Flat: one Mosquitto, one aggregator, N sites."""
    sites = [f"site{i + 1}" for i in range(n)]
    t0 = time.perf_counter()
    pki = make_identities(work / "pki", sites)
    setup_s = time.perf_counter() - t0
    with start_broker(embedded=False, workdir=work / "broker") as handle:
        broker = BrokerSettings(host=handle.host, port=handle.port)
        fleet_toml = _fleet_toml(work, sites, broker, rounds, pki)
        sims = SimSites(sites, pki.root, pki.fleet_id, [broker] * CONNECTIONS, runs, rate)
        proc = _aggregator(["aggregator", "--config", str(fleet_toml)], work, "aggregator")
        watch = Watch({"aggregator": proc})
        try:
            sims.run(0, 600)  # statistics answered, v0 out
            cpu0 = watch.cpu()["aggregator"]
            sims.run(rounds, 600 + rounds * n / rate * 3)
            cpu = watch.cpu()["aggregator"] - cpu0
        finally:
            watch.stop()
            _stop([proc])
            sims.close()
    rows = _rounds(work, rounds)
    latency = [(sims.globals[r["round"]] - _last_accepted(r)) * 1000.0 for r in rows]
    end_to_end = [(sims.globals[r["round"]] - sims.sent[r["round"]][1]) * 1000.0 for r in rows]
    flow = [len(r["participants"]) / (_last_accepted(r) - sims.sent[r["round"]][0]) for r in rows]
    return {"sites": n, "rounds": len(rows), "updates_per_round": [len(r["participants"]) for r in rows],
            "close_latency_ms": _p50_max(latency), "last_update_sent_to_global_ms": _p50_max(end_to_end),
            "aggregator_rss_mb": watch.rss("aggregator", sims.globals.get(1, 0.0)),
            "aggregator_cpu_ms_per_update": round(cpu * 1000.0 / sum(len(r["participants"]) for r in rows), 3),
            "updates_per_s_into_aggregator": round(statistics.median(flow), 1),
            "update_bytes": len(sims.bodies[0]) if sims.bodies else None, "identity_setup_s": round(setup_s, 1)}


REGIONS = 4


class TopBytes:
    """Counts the partials crossing to the top level (regions' or workers'), per round, at the top's broker."""

    def __init__(self, broker: BrokerSettings) -> None:
        self.bytes: dict[int, int] = {}
        self.count: dict[int, int] = {}
        self.by_sender: dict[str, dict[int, int]] = {}  # region or worker -> round -> partials
        self.client = make_client("scale-top-bytes", broker)
        self.client.on_message = self._on_message
        connect(self.client, broker)
        self.client.subscribe(DEFAULT_TOPICS.all_partials, qos=1)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        env = decode(message.payload)
        self.bytes[env.round] = self.bytes.get(env.round, 0) + len(message.payload)
        self.count[env.round] = self.count.get(env.round, 0) + 1
        sender = self.by_sender.setdefault(env.site, {})
        sender[env.round] = sender.get(env.round, 0) + 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _region_toml(name: str, sites: list[str], broker: BrokerSettings, extra: str = "") -> str:
    """A `turbofed region` config (RegionConfig) in the run's folder: identities in ./pki, plain MQTT."""
    return (f'region = "{name}"\nsites = {json.dumps(sites)}\npki = "pki"\n{extra}\n'
            f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\n')


def _run_with_partials(n: int, rounds: int, rate: float, work: Path, sites: list[str], top_broker: BrokerSettings,
                       fleet_toml: Path, subs: dict[str, str], make_groups: Callable[[], list[SimSites]],
                       sub: str, into: str) -> dict[str, Any]:
    """What two-level and workers share: the top aggregator on `top_broker`, a `turbofed region`
    process per entry of `subs` (its name -> its region.toml), then the simulated site groups
    (`make_groups`), run until global v`rounds` reached every group. Returns the top's figures
    and the sub-aggregators' (named `<sub>_...` in the result; the broker(s) the sites send to:
    `updates_per_s_into_<into>`); `every_site_counted_once`: every round is in the store and
    its participants are `sites`, each once."""
    counter = TopBytes(top_broker)
    procs = {"top": _aggregator(["aggregator", "--config", str(fleet_toml)], work, "aggregator")}
    for name, text in subs.items():
        (work / f"{name}.toml").write_text(text)
        procs[name] = _aggregator(["region", "--config", str(work / f"{name}.toml")], work, name)
    watch = Watch(procs)
    groups: list[SimSites] = []
    try:
        groups = make_groups()
        _run_groups(groups, 0, 600)
        cpu0 = watch.cpu()
        _run_groups(groups, rounds, 600 + rounds * n / rate * 3)
        cpu = {k: v - cpu0[k] for k, v in watch.cpu().items()}
    finally:
        watch.stop()
        _stop(list(procs.values()))
        for g in groups:
            g.close()
        counter.close()
    rows = _rounds(work, rounds)
    arrived = {r["round"]: max(g.globals[r["round"]] for g in groups) for r in rows}  # the last group to get it
    latency = [(arrived[r["round"]] - _last_accepted(r)) * 1000.0 for r in rows]
    end_to_end = [(arrived[r["round"]] - max(g.sent[r["round"]][1] for g in groups)) * 1000.0 for r in rows]
    flow = [len(r["participants"]) / (_last_accepted(r) - min(g.sent[r["round"]][0] for g in groups)) for r in rows]
    updates = sum(len(r["participants"]) for r in rows)
    once = len(rows) == rounds and all(sorted(p["site"] for p in r["participants"]) == sorted(sites) for r in rows)
    return {"sites": n, "rounds": len(rows), "updates_per_round": [len(r["participants"]) for r in rows],
            "every_site_counted_once": once,
            "close_latency_ms": _p50_max(latency), "last_update_sent_to_global_ms": _p50_max(end_to_end),
            "aggregator_rss_mb": watch.rss("top", arrived.get(1, 0.0)),
            "aggregator_cpu_ms_per_update": round(cpu["top"] * 1000.0 / updates, 3),
            f"{sub}_rss_mb_max": round(max(watch.rss(name, arrived.get(1, 0.0))["max_after_round_1"] for name in subs), 1),
            f"{sub}_cpu_ms_per_update": round(sum(cpu[name] for name in subs) * 1000.0 / updates, 3),
            f"updates_per_s_into_{into}": round(statistics.median(flow), 1),
            "partials_per_round": [counter.count.get(r["round"], 0) for r in rows],
            "partials_per_round_by_sender": {name: [counter.by_sender.get(name, {}).get(r["round"], 0) for r in rows]
                                            for name in subs},
            "top_level_partial_bytes_per_round": [counter.bytes.get(r["round"], 0) for r in rows],
            "update_bytes": len(groups[0].bodies[0]) if groups[0].bodies else 0}


def run_two_level(n: int, rounds: int, rate: float, work: Path, runs: list, site_records: str = "summary") -> dict[str, Any]:
    """Two-level: 4 regional Mosquittos bridged to a central one, 4 regional aggregators, the top
    aggregator; `site_records`: what each partial tells the top of its sites (RegionConfig)."""
    sites = [f"site{i + 1}" for i in range(n)]
    names = [f"region{r + 1}" for r in range(REGIONS)]
    members = {name: sites[r * n // REGIONS:(r + 1) * n // REGIONS] for r, name in enumerate(names)}
    t0 = time.perf_counter()
    pki = make_identities(work / "pki", sites, names)
    setup_s = time.perf_counter() - t0
    with contextlib.ExitStack() as stack:
        central = stack.enter_context(start_broker(embedded=False, workdir=work / "central"))
        top_broker = BrokerSettings(host=central.host, port=central.port)
        brokers = {}
        for name in names:
            bridge = render_bridge(name, central.host, central.port, DEFAULT_TOPICS, None)
            handle = stack.enter_context(start_broker(embedded=False, workdir=work / name, extra_conf=bridge))
            brokers[name] = BrokerSettings(host=handle.host, port=handle.port)
        regions_toml = "[regions]\n" + "".join(f"{name} = {json.dumps(members[name])}\n" for name in names)
        fleet_toml = _fleet_toml(work, sites, top_broker, rounds, pki, regions_toml)
        subs = {name: _region_toml(name, members[name], brokers[name], f'site_records = "{site_records}"\n') for name in names}

        def groups() -> list[SimSites]:
            return [SimSites(members[name], pki.root, pki.fleet_id, [brokers[name]] * (CONNECTIONS // REGIONS), runs,
                             rate / REGIONS, name=f"scale-{name}") for name in names]

        result = _run_with_partials(n, rounds, rate, work, sites, top_broker, fleet_toml, subs, groups, "regional", "regions")
    update_bytes, top_bytes = result["update_bytes"], result["top_level_partial_bytes_per_round"]
    return {**result, "site_records": site_records, "four_updates_bytes": REGIONS * update_bytes,
            "top_level_bytes_over_four_updates": round(max(top_bytes) / (REGIONS * update_bytes), 2) if update_bytes else None,
            "identity_setup_s": round(setup_s, 1)}


WORKERS = 2  # default --workers


def run_workers(n: int, rounds: int, rate: float, work: Path, runs: list, workers: int = WORKERS) -> dict[str, Any]:
    """Ingestion workers (docs/scaling.md): one Mosquitto, the top aggregator (fleet.toml `workers
    = [...]`, `max_site_share = 1`) and `workers` worker processes (`turbofed region`, shared_group
    "ingest", every site) sharing the sites' updates through `$share/ingest/<root>/sites/+/update`
    and sending the top batch partials; the sites publish to the one broker, as in the flat run."""
    sites = [f"site{i + 1}" for i in range(n)]
    names = [f"w{i + 1}" for i in range(workers)]
    t0 = time.perf_counter()
    pki = make_identities(work / "pki", sites, names)  # a worker is an identity of role region
    setup_s = time.perf_counter() - t0
    with start_broker(embedded=False, workdir=work / "broker") as handle:
        broker = BrokerSettings(host=handle.host, port=handle.port)
        fleet_toml = _fleet_toml(work, sites, broker, rounds, pki, f"max_site_share = 1\nworkers = {json.dumps(names)}\n")
        subs = {name: _region_toml(name, sites, broker, 'shared_group = "ingest"\n') for name in names}

        def groups() -> list[SimSites]:
            return [SimSites(sites, pki.root, pki.fleet_id, [broker] * CONNECTIONS, runs, rate)]

        result = _run_with_partials(n, rounds, rate, work, sites, broker, fleet_toml, subs, groups, "workers", "broker")
    return {**result, "workers": workers, "identity_setup_s": round(setup_s, 1)}


def _run_groups(groups: list[SimSites], rounds: int, timeout: float) -> None:
    """Each region's sites answer in their own thread until global v`rounds` reached them all."""
    errors: list[BaseException] = []

    def one(g: SimSites) -> None:
        try:
            g.run(rounds, timeout)
        except BaseException as exc:  # reported below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(g,), daemon=True) for g in groups]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


TOPOLOGIES = {"flat": (run_n, "flat: one aggregator (FedAvg, streaming), one Mosquitto"),
              "two-level": (run_two_level, f"two-level: {REGIONS} regional Mosquittos bridged to a central one, "
                                           f"{REGIONS} regional aggregators, the top aggregator (FedAvg, streaming)"),
              "workers": (run_workers, "workers: one Mosquitto, ingestion workers sharing the updates ($share/ingest), "
                                       "the top aggregator taking their batch partials (FedAvg, streaming)")}


def run_scale(counts: list[int], rounds: int, rate: float, topologies: list[str] = ("flat",),
              site_records: str = "summary", workers: int = WORKERS) -> dict[str, Any]:
    started = time.perf_counter()
    runs = generate_fleet(n_train=4, n_test=0, seed=0, name="SYN001").train
    out: dict[str, Any] = {"benchmark": "scale", "rounds": rounds, "rate_updates_per_s": rate,
                           "connections_shared_by_sites": CONNECTIONS}
    for topology in topologies:
        run, label = TOPOLOGIES[topology]
        results = []
        for n in counts:
            print(f"bench scale ({topology}): {n} sites ...", file=sys.stderr, flush=True)
            work = Path(tempfile.mkdtemp(prefix=f"turbofed-bench-scale-{topology}-{n}-"))
            extra = {"two-level": {"site_records": site_records}, "workers": {"workers": workers}}.get(topology, {})
            results.append(run(n, rounds, rate, work, runs, **extra))
        base = results[0]["aggregator_rss_mb"]["max_after_round_1"]
        for r in results:
            r["rss_over_smallest"] = round(r["aggregator_rss_mb"]["max_after_round_1"] / base, 3)
        if topology == "flat":  # the flat-only output keeps its earlier shape
            out.update({"topology": label, "fleets": results})
        else:
            out.setdefault("topologies", {})[topology] = {"topology": label, "fleets": results}
    if "flat" not in topologies:
        out["topology"] = None
    out.update({"seconds": round(time.perf_counter() - started, 1), "machine": machine_info("paho-mqtt", "onnx")})
    return out


def run_cli(args: argparse.Namespace) -> int:
    counts = [int(x) for x in args.sites.split(",")]
    topologies = [t.strip() for t in args.topology.split(",")]
    unknown = [t for t in topologies if t not in TOPOLOGIES]
    if unknown:
        raise ConfigError(f"--topology: unknown {', '.join(unknown)}; known: {', '.join(TOPOLOGIES)}")
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    result = run_scale(counts, args.rounds, args.rate, topologies, args.site_records, args.workers)
    emit(result, args.json_out)
    sets = ([("flat", result["fleets"])] if "fleets" in result else []) + \
        [(k, v["fleets"]) for k, v in result.get("topologies", {}).items()]
    for topology, fleets in sets:
        for r in fleets:
            extra = (f"; top-level {max(r['top_level_partial_bytes_per_round'])} bytes a round "
                     f"({r['top_level_bytes_over_four_updates']}x 4 updates)" if "top_level_bytes_over_four_updates" in r else "")
            if "workers_cpu_ms_per_update" in r:
                extra = (f"; {r['workers']} workers {r['workers_cpu_ms_per_update']} ms CPU an update, "
                         f"{max(r['partials_per_round'])} partials a round")
            print(f"{topology:>9} {r['sites']:>6} sites: close p50 {r['close_latency_ms']['p50']} ms, aggregator RSS "
                  f"{r['aggregator_rss_mb']['max_after_round_1']} MB ({r['rss_over_smallest']}x), "
                  f"{r['aggregator_cpu_ms_per_update']} ms CPU an update{extra}", file=sys.stderr)
    return 0
