"""`turbofed bench secure`: secure aggregation against plain FedAvg on a live fleet.

For each fleet size, three runs on the same data, each a fresh fleet on one Mosquitto with
TLS (one identity per site, every message signed), the real aggregator and N real edge
agents (threads of this process, each with its own MQTT connection):

- **plain**: FedAvg, every update an ONNX envelope;
- **secure**: `[secure_aggregation]`, the statistics and every round through the secure sum
  (aggregator/secure.py, edge/secure.py);
- **secure, 10% dropouts**: as secure, and a tenth of the sites (at least one) stop
  answering right after they have sent their encrypted shares, every round: their masks are
  removed with the other sites' shares. Each of those rounds waits `--phase-timeout` for
  them in the masking phase, so that timeout is part of its round time.

Agents start with their training engines already labelled (the replay is not what is
measured). Figures per run: round time (the store's `closed - started`, rounds 1..R: the
announcement, training at every site, the protocol, the merge and checkpoint), bytes per
site per round over the sites whose update is in the round (plain: the update envelope the
site sends; secure: every secure-sum frame the site sends and is sent: keys, roster, shares
out and in, masked input, unmask request and reply), and the RMSE of the final global model on validation engines held out of
training (datasets.holdout; never an official test set). Sites share one Python process, so
their training runs one at a time: round times are longer than on a real fleet, equally so
for every run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from turbofed.aggregator.service import Aggregator
from turbofed.benchmarks import emit, machine_info
from turbofed.benchmarks.accuracy import evaluate
from turbofed.benchmarks.privacy import default_data_dir, fleet
from turbofed.config import FleetConfig, IdentitySettings, ModelSettings, SecureAggregationSettings, SiteConfig, StrategySettings
from turbofed.deploy.identities import AGGREGATOR, FleetIdentities, init_for_sites, write_acl
from turbofed.edge.agent import EdgeAgent
from turbofed.simulation.broker import BrokerHandle, find_mosquitto, start_broker
from turbofed.store import open_store
from turbofed.topics import DEFAULT_TOPICS, Topics

DROPOUT_SHARE = 0.1


def _identity(pki: FleetIdentities, site: str) -> IdentitySettings:
    fleet_id = json.loads((pki.root / "fleet.json").read_text())["fleet_id"]
    folder = pki.root / "identities" / site
    return IdentitySettings(fleet_id, str(folder / "signing.key"), str(folder / "aggregator.pub"))


def drop_after_sharing(agent: EdgeAgent) -> None:
    """This site stops answering a round's session once it has sent its shares (a crash
    between ShareKeys and MaskedInputCollection); statistics sessions it still answers."""
    on_frame = agent.secure.on_frame

    def crashed(kind: str, payload: bytes) -> None:
        if kind in ("secagg_shares", "secagg_unmask_request") and any(
                s.purpose.startswith("round") for s in agent.secure.sessions.values()):
            return
        on_frame(kind, payload)

    agent.secure.on_frame = crashed


class _Fleet:
    """One fleet on a shared broker: its own topic roots, store, registry and agents."""

    def __init__(self, handle: BrokerHandle, pki: FleetIdentities, roots: list[Topics], work: Path, sites: list[str],
                 settings: ModelSettings, secure: SecureAggregationSettings | None) -> None:
        tag = uuid.uuid4().hex[:8]
        self.topics = Topics(f"b{tag}/v1", f"plant{tag}")
        roots.append(self.topics)
        write_acl(pki, sites, roots)
        handle.reload()
        self.work, self.sites = work, sites
        broker = handle.settings(AGGREGATOR, topic_root=self.topics.root, plant_root=self.topics.plant_root)
        self.config = FleetConfig(sites=tuple(sites), store=str(work / "results.sqlite"), registry=str(work / "registry"),
                                  model=settings, broker=broker, pki=str(pki.root), strategy=StrategySettings("fedavg"),
                                  secure_aggregation=secure, round_deadline_s=600.0, stats_retry_s=1.0, min_samples=100)
        self.agents = [EdgeAgent(SiteConfig(site=s, state_dir=str(work / "state" / s), identity=_identity(pki, s), min_samples=100,
                                            min_stats_engines=2, predictions_every_s=30.0,
                                            broker=handle.settings(s, topic_root=self.topics.root, plant_root=self.topics.plant_root)))
                       for s in sites]
        self.threads: list[tuple[threading.Event, threading.Thread]] = []

    def spawn(self, run: Any) -> None:  # noqa: ANN401 - a run(stop) method
        stop = threading.Event()
        thread = threading.Thread(target=run, args=(stop,), daemon=True)
        thread.start()
        self.threads.append((stop, thread))

    def rounds(self) -> list[dict]:
        store = open_store(self.config.store)
        try:
            return store.rounds()
        finally:
            store.close()

    def close(self) -> None:
        for stop, _ in self.threads:
            stop.set()
        for _, thread in self.threads:
            thread.join(30)


def run_fleet(handle: BrokerHandle, pki: FleetIdentities, roots: list[Topics], work: Path, site_data: list, validation: Any,
              settings: ModelSettings, secure: SecureAggregationSettings | None, dropouts: int) -> dict[str, Any]:
    """One run: rounds 1..R on a fresh fleet; its round times, bytes per site and RMSE."""
    sites = [s.name for s in site_data]
    f = _Fleet(handle, pki, roots, work, sites, settings, secure)
    try:
        for agent, site in zip(f.agents, site_data):
            for i, run in enumerate(site.runs):
                agent.buffer.add(f"e{i}", run.cycles.copy(), run.sensors.copy(), run.rul().astype(float), run.settings.copy())
            agent.start()
            f.spawn(agent.run)
        for agent in f.agents[:dropouts]:
            drop_after_sharing(agent)
        aggregator = Aggregator(f.config)
        aggregator.start()
        f.spawn(aggregator.run)
        deadline = time.monotonic() + 1800
        while len(f.rounds()) < settings.rounds + 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(f.rounds())} of {settings.rounds + 1} rounds stored after 30 min ({work})")
            time.sleep(0.5)
        rounds = f.rounds()[1:]
        model = aggregator.model.SerializeToString()
        spec = aggregator.spec
    finally:
        f.close()
    times = [r["closed"] - r["started"] for r in rounds]
    # Bytes of the sites whose update is in the round (a dropped site's, cut short, would flatter the mean).
    sent = [p["update_bytes"] for r in rounds for p in r["participants"] if p["action"] in ("kept", "secure-sum")]
    in_sum = [sum(p["action"] == "secure-sum" for p in r["participants"]) for r in rounds] if secure else None
    return {"round_s": {"median": round(statistics.median(times), 3), "each": [round(t, 3) for t in times]},
            "bytes_per_site": {"mean": round(statistics.mean(sent)), "max": max(sent)},
            "rmse": evaluate(model, spec, validation)["rmse"], "sites_in_sum": in_sum}


def run_secure(fleets: list[tuple[str, int]], settings: ModelSettings, engines_per_site: int, data_dir: str | None,
               phase_timeout_s: float) -> dict[str, Any]:
    if find_mosquitto() is None:
        raise SystemExit("bench secure needs Mosquitto (apt-get install mosquitto): it measures the secure setup over TLS")
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="turbofed-bench-secure-"))
    names = sorted({f"site{i + 1}" for _, n in fleets for i in range(n)}, key=lambda s: int(s[4:]))
    pki = init_for_sites(work / "pki", names, DEFAULT_TOPICS, ["127.0.0.1"])
    roots = [DEFAULT_TOPICS]
    results = []
    with start_broker(embedded=False, workdir=work / "broker", pki=pki) as handle:
        for kind, n in fleets:
            site_data, validation = fleet(kind, n, engines_per_site, data_dir, settings.seed)
            secure = SecureAggregationSettings(phase_timeout_s=phase_timeout_s)
            drop = max(1, round(DROPOUT_SHARE * n))
            row: dict[str, Any] = {"fleet": kind, "sites": n, "dropouts": drop}
            for name, cfg, d in (("plain", None, 0), ("secure", secure, 0), ("secure_dropouts", secure, drop)):
                print(f"bench secure: {kind} x{n}: {name} ...", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                row[name] = run_fleet(handle, pki, roots, work / f"{kind}-{n}-{name}", site_data, validation, settings, cfg, d)
                row[name]["seconds"] = round(time.perf_counter() - t0, 1)
            plain = row["plain"]
            for name in ("secure", "secure_dropouts"):
                row[name]["round_time_ratio"] = round(row[name]["round_s"]["median"] / plain["round_s"]["median"], 3)
                row[name]["bytes_ratio"] = round(row[name]["bytes_per_site"]["mean"] / plain["bytes_per_site"]["mean"], 3)
                row[name]["rmse_ratio"] = round(row[name]["rmse"] / plain["rmse"], 4)
            results.append(row)
    return {"benchmark": "secure", "protocol": "Bonawitz et al. 2017 (turbofed/secagg), FedAvg, live over Mosquitto with TLS",
            "settings": settings.to_dict(), "phase_timeout_s": phase_timeout_s, "dropout_share": DROPOUT_SHARE,
            "engines_per_synthetic_site": engines_per_site, "fleets": results, "seed": settings.seed,
            "eval": "validation: training engines held out (datasets.holdout), cut like NASA's test engines",
            "seconds": round(time.perf_counter() - started, 1), "machine": machine_info("cryptography", "paho-mqtt", "onnxruntime")}


def format_table(result: dict[str, Any]) -> str:
    lines = ["| fleet | sites | run | round time (median) | bytes per site per round | RMSE |", "|---|---|---|---|---|---|"]
    for f in result["fleets"]:
        for name in ("plain", "secure", "secure_dropouts"):
            r = f[name]
            ratio = "" if name == "plain" else f" ({r['round_time_ratio']:.2f}×)"
            bytes_ratio = "" if name == "plain" else f" ({r['bytes_ratio']:.2f}×)"
            rmse_ratio = "" if name == "plain" else f" ({r['rmse_ratio']:.3f}×)"
            run = {"plain": "plain FedAvg", "secure": "secure", "secure_dropouts": f"secure, {f['dropouts']} dropped"}[name]
            lines.append(f"| {f['fleet']} | {f['sites']} | {run} | {r['round_s']['median']:.2f} s{ratio} | "
                         f"{r['bytes_per_site']['mean']:,}{bytes_ratio} | {r['rmse']:.2f}{rmse_ratio} |")
    return "\n".join(lines)


def run_cli(args: argparse.Namespace) -> int:
    settings = ModelSettings(seed=args.seed).replace(rounds=args.rounds, local_epochs=1)
    fleets = [("FD001", 4), *[("SYN", n) for n in (args.synthetic_sites or [20, 100])]]
    result = run_secure(fleets, settings, args.engines_per_site, default_data_dir(args.data_dir), args.phase_timeout)
    emit(result, args.json_out)
    print(format_table(result), file=sys.stderr)
    return 0
