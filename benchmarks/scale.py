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
  update sent to the last accepted).
Two-level (regional) topologies are not built yet (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from paho.mqtt import client as mqtt_client

from turbofed.benchmarks import emit, machine_info
from turbofed.benchmarks.system import rss_mb
from turbofed.codec import read_weights, replace_weights
from turbofed.config import BrokerSettings, ModelSettings
from turbofed.data.synthetic import generate_fleet
from turbofed.deploy.identities import AGGREGATOR, add_identity, init_fleet
from turbofed.edge.features import history_stats, regime_stats
from turbofed.envelope import decode
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


def make_identities(root: Path, sites: list[str]) -> Path:
    """An identity folder with signing keys for the aggregator and every site (no gateways)."""
    ids = init_fleet(root, ["127.0.0.1"])
    add_identity(ids, AGGREGATOR, "aggregator")
    for site in sites:
        add_identity(ids, site, "site")
    return ids


def run_n(n: int, rounds: int, rate: float, work: Path, runs: list) -> dict[str, Any]:
    sites = [f"site{i + 1}" for i in range(n)]
    t0 = time.perf_counter()
    pki = make_identities(work / "pki", sites)
    setup_s = time.perf_counter() - t0
    with start_broker(embedded=False, workdir=work / "broker") as handle:
        broker = BrokerSettings(host=handle.host, port=handle.port)
        settings = ModelSettings(rounds=rounds, seed=0)
        fleet_toml = write_configs(work, [], broker, settings, pki, tls=False)
        text = fleet_toml.read_text().replace("sites = []", f"sites = {json.dumps(sites)}")
        fleet_toml.write_text(text.replace("round_deadline_s = 120", "round_deadline_s = 600\nmin_samples = 1"))
        sims = SimSites(sites, pki.root, pki.fleet_id, [broker] * CONNECTIONS, runs, rate)
        log = open(work / "aggregator.log", "ab")
        proc = spawn([sys.executable, "-m", "turbofed.cli", "aggregator", "--config", str(fleet_toml)], stdout=log,
                     stderr=log, cwd=work)
        samples: list[tuple[float, float]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                try:
                    samples.append((time.time(), rss_mb(proc.pid)))
                except OSError:
                    return
                time.sleep(0.2)

        threading.Thread(target=sample, daemon=True).start()
        try:
            sims.run(0, 600)  # statistics answered, v0 out
            cpu0 = _cpu_s(proc.pid)
            sims.run(rounds, 600 + rounds * n / rate * 3)
            cpu = _cpu_s(proc.pid) - cpu0
        finally:
            stop.set()
            if proc.poll() is None:
                samples.append((time.time(), rss_mb(proc.pid)))  # the last, after the last round
            proc.terminate()
            proc.wait(30)
            sims.close()
    store = open_store(str(work / "results.sqlite"))
    try:
        rows = [r for r in store.rounds() if 1 <= r["round"] <= rounds]
    finally:
        store.close()
    latency = [(sims.globals[r["round"]] - (r["closed"] - r["aggregate_ms"] / 1000.0)) * 1000.0 for r in rows]
    after_first = [m for t, m in samples if t >= sims.globals.get(1, 0.0)]
    flow = [len(r["participants"]) / (r["closed"] - r["aggregate_ms"] / 1000.0 - sims.sent[r["round"]][0]) for r in rows]
    return {"sites": n, "rounds": len(rows), "updates_per_round": [len(r["participants"]) for r in rows],
            "close_latency_ms": {"p50": round(statistics.median(latency), 1), "max": round(max(latency), 1)},
            "aggregator_rss_mb": {"max_after_round_1": round(max(after_first), 1), "max": round(max(m for _, m in samples), 1)},
            "aggregator_cpu_ms_per_update": round(cpu * 1000.0 / sum(len(r["participants"]) for r in rows), 3),
            "updates_per_s_into_aggregator": round(statistics.median(flow), 1),
            "update_bytes": len(sims.bodies[0]) if sims.bodies else None, "identity_setup_s": round(setup_s, 1)}


def run_scale(counts: list[int], rounds: int, rate: float) -> dict[str, Any]:
    started = time.perf_counter()
    runs = generate_fleet(n_train=4, n_test=0, seed=0, name="SYN001").train
    results = []
    for n in counts:
        print(f"bench scale: {n} sites ...", file=sys.stderr, flush=True)
        results.append(run_n(n, rounds, rate, Path(tempfile.mkdtemp(prefix=f"turbofed-bench-scale-{n}-")), runs))
    base = results[0]["aggregator_rss_mb"]["max_after_round_1"]
    for r in results:
        r["rss_over_smallest"] = round(r["aggregator_rss_mb"]["max_after_round_1"] / base, 3)
    return {"benchmark": "scale", "topology": "flat: one aggregator (FedAvg, streaming), one Mosquitto",
            "rounds": rounds, "rate_updates_per_s": rate, "connections_shared_by_sites": CONNECTIONS, "fleets": results,
            "seconds": round(time.perf_counter() - started, 1), "machine": machine_info("paho-mqtt", "onnx")}


def run_cli(args: argparse.Namespace) -> int:
    counts = [int(x) for x in args.sites.split(",")]
    result = run_scale(counts, args.rounds, args.rate)
    emit(result, args.json_out)
    for r in result["fleets"]:
        print(f"{r['sites']:>6} sites: close p50 {r['close_latency_ms']['p50']} ms, aggregator RSS "
              f"{r['aggregator_rss_mb']['max_after_round_1']} MB ({r['rss_over_smallest']}x), "
              f"{r['aggregator_cpu_ms_per_update']} ms CPU an update", file=sys.stderr)
    return 0
