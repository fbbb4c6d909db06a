"""`turbofed bench soak`: memory stays bounded and nothing is lost under sustained load.

The whole system runs as in `turbofed demo` (Mosquitto with TLS and one identity per process
when installed, else the embedded broker; every message signed; agents and the aggregator as
separate processes). After one training pass labels every site's buffer and the aggregator
has published global model v1, the fleet (training and test engines) is replayed at full rate
over and over for `--minutes`, while rounds keep running (the round limit is never reached).

- **Passes.** Each pass renames its engines `s<pass>-<engine>`, so every sensor row of the
  soak is a distinct (site, engine, cycle) and its prediction a distinct row of the store. A
  pass starts once the previous one's predictions are all in the store (or have stopped
  arriving for `SETTLE_S`): the replay has no end-to-end flow control, and without this an
  ever-growing backlog in the broker's queues and the agents' inboxes would be measured
  instead of the processes' steady state. Each site's buffer holds one pass of training rows
  (`buffer_rows`), so it is full before the measurement starts and stays full.
- **Memory.** VmRSS of the aggregator, every agent and the broker (/proc/<pid>/status),
  sampled every `sample_every` seconds. The first `WARMUP` (20%) of the soak is warm-up
  (caches, the first rounds, the store's page cache). `start` is the median over the
  `WINDOW` (5%) of the soak after the warm-up, `end` the median over its last 5%; medians,
  because a round's training allocates and frees memory. `growth_pct` = end / start - 1;
  `max` is the largest sample after the warm-up. Goal: growth <= 5% for every process.
- **Lost.** A sensor row the broker acknowledged to the replay (QoS 1) during the soak, for
  which the results store holds no federated prediction once the pipeline has drained. It
  covers the whole path: replay -> broker -> agent -> prediction -> broker -> aggregator ->
  store. Every row should arrive (the federated model exists before the soak starts). A row
  an agent refused would count as lost; the agents' own counters, read from their state files
  after a clean stop, are reported beside it: `agent_readings` (rows accepted, the setup
  pass's `setup_rows` included) and every `rejected.*` reason (these include refused model
  messages, e.g. a global model that arrived before its announcement, which lose no row).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any

from turbofed.benchmarks import emit, machine_info
from turbofed.benchmarks.system import rss_mb
from turbofed.config import BrokerSettings, ModelSettings
from turbofed.deploy.identities import MONITOR, FleetIdentities, init_for_sites
from turbofed.simulation.broker import BrokerHandle, find_mosquitto, start_broker
from turbofed.simulation.children import Stopped, stop_on_signals
from turbofed.simulation.fleet import FleetEngine, site_names
from turbofed.simulation.localfleet import FleetWatch, Processes, write_configs
from turbofed.simulation.replay import GatewayReplay, Replay, count_rows, fleet_parts, fleet_schedule, gateway_settings
from turbofed.topics import DEFAULT_TOPICS

WARMUP = 0.2  # share of the soak before the start figure
WINDOW = 0.05  # share of the soak each figure is the median over
GROWTH_GOAL_PCT = 5.0
SETTLE_S = 60.0  # a pass's predictions stopped arriving this long: the rest is lost
ROUNDS = 1_000_000  # never reached: rounds run all through the soak
Parts = list[tuple[str, list[FleetEngine]]]


class Sampler(threading.Thread):
    """VmRSS of named processes every `every` seconds, as (seconds since `t0`, MB)."""

    def __init__(self, pids: dict[str, int], every: float, t0: float) -> None:
        super().__init__(daemon=True)
        self.pids, self.every, self.t0 = pids, every, t0
        self.samples: dict[str, list[tuple[float, float]]] = {name: [] for name in pids}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            now = time.monotonic() - self.t0
            for name, pid in self.pids.items():
                try:
                    self.samples[name].append((round(now, 2), round(rss_mb(pid), 2)))
                except OSError:
                    pass  # exited: the run fails elsewhere
            self.done.wait(self.every)


def memory_report(samples: list[tuple[float, float]], seconds: float) -> dict[str, float]:
    """start, end (medians over a window after the warm-up and at the end), max after the warm-up, growth."""
    warm, window = WARMUP * seconds, max(WINDOW * seconds, 1e-9)

    def median_in(lo: float, hi: float) -> float:
        inside = [mb for t, mb in samples if lo <= t <= hi]
        if not inside:  # a very short soak: the nearest sample
            inside = [min(samples, key=lambda s: abs(s[0] - (lo + hi) / 2))[1]]
        return statistics.median(inside)

    start, end = median_in(warm, warm + window), median_in(seconds - window, seconds)
    after = [mb for t, mb in samples if t >= warm] or [end]
    return {"start_mb": round(start, 1), "end_mb": round(end, 1), "max_mb": round(max(after), 1),
            "growth_pct": round((end / start - 1) * 100, 2)}


def renamed(parts: Parts, k: int) -> Parts:
    """Pass `k`'s engines: `s<k>-<engine>`, distinct from every other pass's."""
    return [(name, [dataclasses.replace(e, engine=f"{prefix(k)}{e.engine}") for e in engines]) for name, engines in parts]


def prefix(k: int) -> str:
    return f"s{k:05d}-"


def rows_per_site(parts: Parts) -> dict[str, int]:
    out: dict[str, int] = {}
    for _, engines in parts:
        for e in engines:
            out[e.site] = out.get(e.site, 0) + len(e.run)
    return out


def stored(store: Path, k: int, sites: list[str]) -> int:
    """Federated predictions of pass `k` in the store (a range of the primary key per site)."""
    lo, hi = prefix(k), prefix(k)[:-1] + "."  # "." sorts right after "-"
    sql = "SELECT COUNT(*) FROM predictions WHERE site = ? AND engine >= ? AND engine < ? AND model = 'federated'"
    try:
        with closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=10)) as db:
            return sum(int(db.execute(sql, (site, lo, hi)).fetchone()[0]) for site in sites)
    except sqlite3.Error:
        return 0


def wait_stored(store: Path, k: int, sites: list[str], expected: int, processes: Processes) -> int:
    """Wait until pass `k`'s predictions are all stored, or stop arriving for SETTLE_S."""
    count, last_change, last = 0, time.monotonic(), -1
    while True:
        processes.check()
        count = stored(store, k, sites)
        if count >= expected:
            return count
        if count != last:
            last, last_change = count, time.monotonic()
        elif time.monotonic() - last_change > SETTLE_S:
            return count
        time.sleep(0.2)


def publisher(handle: BrokerHandle, pki: FleetIdentities, sites: list[str]) -> Replay | GatewayReplay:
    """The replay's publisher: each site's gateway identity on a secure broker."""
    if handle.secure:
        return GatewayReplay(handle.host, handle.port, gateway_settings(pki.root, sites, handle.host, handle.port, DEFAULT_TOPICS))
    return Replay(handle.host, handle.port)


def agent_counters(work: Path, sites: list[str]) -> dict[str, dict[str, int]]:
    """Each agent's counters, from the state file it saved when it stopped."""
    out = {}
    for site in sites:
        try:
            out[site] = json.loads((work / "state" / site / "state.json").read_text())["counters"]
        except (OSError, ValueError, KeyError):
            out[site] = {}
    return out


def run_soak(minutes: float, n_sites: int = 4, dataset: str = "SYN001", data_dir: str | None = None,
             max_engines: int | None = None, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """The soak described in the module docstring; the result dictionary (`--json`)."""
    from tqdm import tqdm

    seconds = minutes * 60.0
    sample_every = min(2.0, max(0.2, seconds / 100))
    settings = ModelSettings(rounds=ROUNDS, local_epochs=1, seed=seed)
    work = Path(tempfile.mkdtemp(prefix="turbofed-bench-soak-"))
    (work / "logs").mkdir()
    sites = site_names(n_sites)
    parts = fleet_parts(dataset, data_dir, n_sites, "round-robin", "both", seed, max_engines)
    train_rows = rows_per_site(parts[:1])
    secure = find_mosquitto() is not None
    pki = init_for_sites(work / "pki", sites, DEFAULT_TOPICS, ["127.0.0.1"])
    processes = Processes(work / "logs")
    passes: list[dict[str, int]] = []
    with start_broker(embedded=not secure, workdir=work / "broker", pki=pki if secure else None) as handle:
        broker = BrokerSettings(host=handle.host, port=handle.port)
        extra = f"buffer_rows = {max(train_rows.values())}\nmin_stats_engines = 2\n"  # full after one pass; tiny fleets too
        fleet_toml = write_configs(work, sites, broker, settings, pki, tls=secure, site_extra=extra)
        watch = FleetWatch(handle.settings(MONITOR), pki.root)
        sampler: Sampler | None = None
        try:
            for site in sites:
                processes.start(site, "edge", "--config", str(work / f"{site}.toml"))
            watch.wait("agents online", lambda: all(watch.site_status(s).online for s in sites), 180, processes)
            with publisher(handle, pki, sites) as pub:
                pub.run(fleet_schedule(parts[:1]), None, count_rows(parts[:1]), progress=False)
                watch.wait("training rows labelled", lambda: all((watch.site_status(s).samples or 0) >= train_rows.get(s, 0) for s in sites),
                           600, processes)
                processes.start("aggregator", "aggregator", "--config", str(fleet_toml))
                watch.wait("global model v1 at every site", lambda: all((watch.site_status(s).model_version or 0) >= 1 for s in sites),
                           600, processes)
                pids = processes.pids() | {"broker": handle.process.pid}
                t0 = time.monotonic()
                sampler = Sampler(pids, sample_every, t0)
                sampler.start()
                bar = tqdm(total=round(seconds), unit="s", desc="soak", file=sys.stderr, disable=not progress)
                k = 0
                while time.monotonic() - t0 < seconds:
                    k += 1
                    this = renamed(parts, k)
                    sent = pub.run(fleet_schedule(this), None, count_rows(this), progress=False)
                    got = wait_stored(work / "results.sqlite", k, sites, sent["rows"], processes)
                    passes.append({"pass": k, "published": sent["rows"], "stored": got, "seconds": round(time.monotonic() - t0, 1)})
                    bar.update(min(round(time.monotonic() - t0), round(seconds)) - bar.n)
                bar.close()
                elapsed = time.monotonic() - t0
                sampler.done.set()
                sampler.join()
        finally:
            if sampler is not None:
                sampler.done.set()
            processes.stop()  # agents save their state (counters) on SIGTERM
            watch.close()
    with closing(sqlite3.connect(work / "results.sqlite")) as db:
        rounds = db.execute("SELECT COUNT(*), MAX(round) FROM rounds WHERE round > 0").fetchone()
    counters = agent_counters(work, sites)
    refused = {s: {name: v for name, v in c.items() if name.startswith("rejected.")} for s, c in counters.items()}
    published, in_store = sum(p["published"] for p in passes), sum(p["stored"] for p in passes)
    memory = {name: memory_report(s, elapsed) for name, s in sampler.samples.items()}
    return {
        "minutes": minutes,
        "seconds": round(elapsed, 1),
        "warmup_s": round(WARMUP * elapsed, 1),
        "window_s": round(WINDOW * elapsed, 1),
        "sample_every_s": sample_every,
        "dataset": dataset,
        "sites": n_sites,
        "max_engines": max_engines,
        "seed": seed,
        "broker": handle.kind,
        "secure": handle.secure,
        "passes": len(passes),
        "rows_per_pass": count_rows(parts),
        "rows_per_s": round(published / elapsed, 1),
        "rounds_completed": int(rounds[0] or 0),
        "last_round": int(rounds[1] or 0),
        "rss": memory,
        "growth_goal_pct": GROWTH_GOAL_PCT,
        "worst_growth_pct": max(m["growth_pct"] for m in memory.values()),
        "growth_goal_met": all(m["growth_pct"] <= GROWTH_GOAL_PCT for m in memory.values()),
        "messages": {"published": published, "stored": in_store, "lost": published - in_store,
                     "agent_readings": sum(c.get("readings", 0) for c in counters.values()), "setup_rows": count_rows(parts[:1]),
                     "agent_refusals": refused, "per_pass": passes},
        "agent_counters": counters,
        "rss_samples": {name: s for name, s in sampler.samples.items()},
        "workdir": str(work),
        "settings": settings.to_dict(),
        "machine": machine_info("paho-mqtt", "onnxruntime", "scikit-learn"),
    }


def summary(result: dict[str, Any]) -> str:
    """A short table for the terminal (stderr): memory per process and messages lost."""
    lines = [f"{'process':<12}{'start MB':>10}{'end MB':>10}{'max MB':>10}{'growth %':>10}"]
    for name, m in result["rss"].items():
        lines.append(f"{name:<12}{m['start_mb']:>10.1f}{m['end_mb']:>10.1f}{m['max_mb']:>10.1f}{m['growth_pct']:>10.2f}")
    msg = result["messages"]
    lines.append(f"{result['passes']} passes, {msg['published']} rows published, {msg['stored']} predicted and stored, "
                 f"lost {msg['lost']}; {result['rounds_completed']} rounds; worst growth {result['worst_growth_pct']:.2f}% "
                 f"(goal <= {result['growth_goal_pct']:.0f}%)")
    return "\n".join(lines)


def run_cli(args: argparse.Namespace) -> int:
    """Exit 0 when nothing was lost and memory stayed within the goal, 1 otherwise; 128 +
    signum when stopped by a signal (every child stopped first)."""
    with stop_on_signals():
        try:
            result = run_soak(args.minutes, args.sites, args.dataset, args.data_dir, args.max_engines, args.seed)
        except Stopped as stopped:
            print(f"turbofed bench soak: stopped by {stopped.name}", file=sys.stderr)
            return stopped.exit_code
    emit(result, args.json_out)
    print(summary(result), file=sys.stderr)
    return 0 if result["messages"]["lost"] == 0 and result["growth_goal_met"] else 1
