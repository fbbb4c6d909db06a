"""`turbofed bench system`: a 50-site fleet on Mosquitto, measured.

Agents run several to a process (threads of one `python -m turbofed.benchmarks.system --worker`
process, 10 each by default) to fit 50 on a 2-core machine; each agent has its own MQTT
connection, state folder and models, exactly as it would on its own device. Reported:

- aggregate_ms: aggregator time from the last update received to the global model published
- update_bytes / raw_weight_bytes: an update on the wire vs its weights as raw float32
- replay_rows_per_s: sensor rows delivered to and processed by the agents, per second
- agent_rss_mb: resident memory per worker process, and per agent
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from turbofed.benchmarks import emit, machine_info
from turbofed.config import BrokerSettings, ModelSettings, load_site_config
from turbofed.deploy.identities import MONITOR, init_for_sites
from turbofed.simulation.broker import start_broker
from turbofed.simulation.children import spawn
from turbofed.simulation.localfleet import FleetWatch, Processes, write_configs
from turbofed.topics import DEFAULT_TOPICS

AGENTS_PER_PROCESS = 10


def rss_mb(pid: int) -> float:
    """Resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def run_worker(configs: list[str]) -> int:
    """Several agents in one process until SIGTERM."""
    import logging

    from turbofed.edge.agent import EdgeAgent

    logging.basicConfig(level=logging.WARNING)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    agents = [EdgeAgent(load_site_config(c)) for c in configs]
    threads = []
    for agent in agents:
        started = time.perf_counter()
        agent.start()  # connect (the TLS handshake, when secure), subscribe, say online
        print(f"CONNECT_MS {agent.site} {(time.perf_counter() - started) * 1000:.2f}", flush=True)
        threads.append(threading.Thread(target=agent.run, args=(stop,)))
        threads[-1].start()
    for t in threads:
        t.join()
    return 0


def run_system(n_sites: int = 50, rounds: int = 3, dataset: str = "SYN001", seed: int = 0, secure: bool = True) -> dict:
    """One fleet on Mosquitto: `secure` is the default setup (TLS with one identity per
    process, the ACL, every message signed), else the insecure development setup (plain
    MQTT, nothing signed), so the cost of security can be measured."""
    from turbofed.simulation.replay import replay

    settings = ModelSettings(rounds=rounds, local_epochs=1, seed=seed)
    work = Path(tempfile.mkdtemp(prefix="turbofed-bench-system-"))
    (work / "logs").mkdir()
    sites = [f"site{i + 1}" for i in range(n_sites)]
    processes = Processes(work / "logs")
    pki = init_for_sites(work / "pki", sites, DEFAULT_TOPICS, ["127.0.0.1"]) if secure else None
    with start_broker(embedded=False, workdir=work / "broker", pki=pki) as handle:
        broker = BrokerSettings(host=handle.host, port=handle.port)
        # A site here has 2 engines (100 over 50 sites): statistics over at least 2 (default 5).
        fleet_toml = write_configs(work, sites, broker, settings, pki, tls=secure, site_extra="min_stats_engines = 2\n")
        watch = FleetWatch(handle.settings(MONITOR), pki.root if pki else None)
        try:
            groups = [sites[i : i + AGENTS_PER_PROCESS] for i in range(0, n_sites, AGENTS_PER_PROCESS)]
            workers = []
            for k, group in enumerate(groups):
                cfgs = [str(work / f"{s}.toml") for s in group]
                log = open(work / "logs" / f"worker{k}.log", "wb")
                workers.append(spawn([sys.executable, "-m", "turbofed.benchmarks.system", "--worker", *cfgs], stdout=log, stderr=subprocess.STDOUT))
                processes.children[f"worker{k}"] = workers[-1]
            watch.wait("agents online", lambda: sum(watch.site_status(s).online for s in sites) == n_sites, 180, processes)

            started = time.perf_counter()
            summary = replay(dataset, None, n_sites, broker.host, broker.port, None, "round-robin", "train", seed=seed, progress=True,
                             pki=pki.root if pki else None)
            watch.wait("rows delivered", lambda: sum(watch.site_status(s).samples or 0 for s in sites) >= summary["rows"], 600, processes)
            delivered_s = time.perf_counter() - started

            processes.start("aggregator", "aggregator", "--config", str(fleet_toml))
            watch.wait("rounds", lambda: watch.round is not None and watch.round.done and watch.round.round == rounds, 300 + 120 * rounds, processes)
            rss = [rss_mb(w.pid) for w in workers]
        finally:
            processes.stop(30)
            watch.close()
    import onnx

    from turbofed.codec import raw_weight_bytes, read_weights
    from turbofed.store import open_store

    store = open_store(str(work / "results.sqlite"))
    recorded = [r for r in store.rounds() if r["round"] > 0]
    aggregate = [r["aggregate_ms"] for r in recorded]
    sizes = [p["update_bytes"] for r in recorded for p in r["participants"]]
    model = onnx.load_model_from_string((work / "registry" / "models" / f"v{rounds:05d}.onnx").read_bytes())
    per_agent = {line.split()[1]: float(line.split()[2]) for path in sorted((work / "logs").glob("worker*.log"))
                 for line in path.read_text(errors="replace").splitlines() if line.startswith("CONNECT_MS ")}
    connect_ms = list(per_agent.values())
    return {
        "secure": secure,
        "sites": n_sites,
        "agents": f"{AGENTS_PER_PROCESS} agents per process (threads), {len(rss)} processes",
        "rounds": rounds,
        "dataset": dataset,
        "seed": seed,
        "replay_rows": summary["rows"],
        "participants_per_round": [len(r["participants"]) for r in recorded],
        "aggregate_ms": {"p50": round(statistics.median(aggregate), 2), "max": round(max(aggregate), 2)},
        "update_bytes": max(sizes),
        "agent_connect_ms": {"p50": round(statistics.median(connect_ms), 2), "max": round(max(connect_ms), 2), "agents": len(connect_ms),
                             "per_agent": per_agent},
        "raw_weight_bytes": raw_weight_bytes(read_weights(model)),
        "replay_rows_per_s": round(summary["rows"] / delivered_s, 1),
        "replay_publish_rows_per_s": summary["rows_per_s"],
        "agent_rss_mb": {
            "per_process": [round(r, 1) for r in rss],
            "per_agent": round(sum(rss) / n_sites, 1),
        },
        "settings": settings.to_dict(),
        "machine": machine_info("paho-mqtt", "onnxruntime", "scikit-learn"),
    }


def run_cli(args: argparse.Namespace) -> int:
    """Both setups in one run (insecure first, then secure), and what security costs."""
    off = run_system(args.sites, args.rounds, secure=False)
    on = run_system(args.sites, args.rounds, secure=True)
    result = {
        "secure": on, "insecure": off,
        "security_cost": {
            "update_bytes": round(on["update_bytes"] / off["update_bytes"], 4),
            "aggregate_ms_p50": round(on["aggregate_ms"]["p50"] / off["aggregate_ms"]["p50"], 3),
            "agent_connect_ms_p50": {"secure": on["agent_connect_ms"]["p50"], "insecure": off["agent_connect_ms"]["p50"]},
        },
    }
    emit(result, args.json_out)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        sys.exit(run_worker(sys.argv[2:]))
    sys.exit("usage: turbofed bench system [--sites N] [--json OUT]")
