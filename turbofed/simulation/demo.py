"""`turbofed demo`: the whole system on one machine, in one command.

It starts a broker (Mosquitto when installed, else the embedded one), four edge agents
and the aggregator as separate processes talking only through MQTT (on Mosquitto, the
secure setup: `fleet init` into the workdir, TLS, and every process with its own
identity; the embedded broker runs insecure, on loopback, with a warning), replays the training
engines (sites label them as they fail), lets the aggregator compute fleet statistics and
run its rounds, replays the test engines (their true RUL is revealed at the end), and
prints each site's local vs federated RMSE on its own test engines.

The demo watches the system the way an operator would, over MQTT (site status, rounds,
metrics); it imports neither `edge` nor `aggregator`. Everything stops cleanly on exit,
on Ctrl-C and on SIGTERM, and nothing outlives a demo that is killed
(`turbofed.simulation.children`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from turbofed.config import BrokerSettings, ModelSettings, resolve_data_dir
from turbofed.deploy.identities import MONITOR, init_for_sites
from turbofed.errors import TurbofedError
from turbofed.messages import Metrics
from turbofed.simulation.broker import BrokerHandle, find_mosquitto, start_broker
from turbofed.simulation.children import Stopped, stop_on_signals
from turbofed.simulation.localfleet import FleetError, FleetWatch, Processes, write_configs
from turbofed.simulation.progress import RoundProgress
from turbofed.simulation.replay import check_dataset
from turbofed.store import ResultsStore, open_store
from turbofed.topics import DEFAULT_TOPICS

log = logging.getLogger("turbofed.simulation.demo")

SYNTHETIC = "SYN001"
# Each site holds a fifth of its failed training engines out of training (holdout_share): both
# models are scored on them every round (the dashboard's learning curve, "RMSE per site, per
# round", there when the demo ends), and they calibrate the fleet's 90% conformal RUL intervals,
# which every federated prediction of the test engines then carries (the dashboard's band).
HOLDOUT_SHARE = 0.2
INTERVALS_TOML = "[intervals]\ncoverage = 0.9\n"
MAX_SITES = 32  # each site is an agent process (~100-250 MB): more does not fit a demo machine
STORES = ("sqlite", "influxdb")
SCORE_NOTE = ("RMSE and score over each site's test engines at their last cycle, in cycles; score = PHM08 score "
              "(sum of e^(-d/13) - 1 for early, e^(d/10) - 1 for late predictions, d = predicted - true RUL): lower is better for both")


def check_options(dataset: str, n_sites: Any, rounds: Any = None, seed: Any = 0, store: str = "sqlite") -> None:
    """Refuse what the demo cannot run before anything starts (no download, no broker, no
    folder removed): an unknown dataset, a site count or round count out of range, a store
    it cannot write to. TurbofedError names the option."""
    check_dataset(dataset)
    for name, value, lo, hi in (("--sites", n_sites, 1, MAX_SITES), ("--rounds", rounds, 1, 1_000_000), ("--seed", seed, 0, 2**32 - 1)):
        if value is None and name == "--rounds":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise TurbofedError(f"{name} must be a whole number in {lo}..{hi}, got {value!r}")
    if store not in STORES:
        raise TurbofedError(f"--store must be one of {', '.join(STORES)}, got {store!r}")
    if store == "influxdb":
        import importlib.util

        from turbofed.store.influx_write import influx_settings  # reads TURBOFED_INFLUX_*: what the aggregator will read

        if importlib.util.find_spec("influxdb_client") is None:
            raise TurbofedError("--store influxdb needs influxdb-client: pip install 'turbofed[influx]'")
        influx_settings("influxdb")


def find_data(dataset: str, data_dir: str | None) -> tuple[str, str | None, str]:
    """(dataset, data dir, how it was found): local files, a download, or the synthetic fleet."""
    folder = resolve_data_dir(data_dir)
    if dataset.upper().startswith("SYN"):
        return dataset, None, "synthetic fleet (asked for)"
    needed = [folder / f"train_{name}.txt" for name in dataset.split("+")]
    if all(p.is_file() for p in needed):
        return dataset, str(folder), f"C-MAPSS {dataset} from {folder}"
    log.info("C-MAPSS %s not in %s; trying to download it", dataset, folder)
    fetch = subprocess.run(
        [sys.executable, "-m", "turbofed.cli", "data", "fetch", "--data-dir", str(folder), "--timeout", "15"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if fetch.returncode == 0 and all(p.is_file() for p in needed):
        return dataset, str(folder), f"C-MAPSS {dataset}, downloaded to {folder}"
    reason = (fetch.stderr.strip().splitlines() or ["download failed"])[-1].removeprefix("turbofed: error: ")
    log.warning("no C-MAPSS data (%s); using the synthetic fleet instead", reason)
    return SYNTHETIC, None, f"synthetic fleet (C-MAPSS unavailable: {reason})"


def run_demo(
    dataset: str = "FD001",
    data_dir: str | None = None,
    n_sites: int = 4,
    settings: ModelSettings | None = None,
    workdir: str | None = None,
    embedded_broker: bool | None = None,
    store: str = "sqlite",
    progress: RoundProgress | None = None,
) -> dict[str, Any]:
    """Run the demo end to end and return its table (see `turbofed demo --json`). `store`:
    the aggregator's results store, "sqlite" (in the workdir) or "influxdb" (the
    TURBOFED_INFLUX_* settings); `progress` shows the rounds (default: on stderr)."""
    settings = settings or ModelSettings()
    check_options(dataset, n_sites, settings.rounds, settings.seed, store)
    started = time.perf_counter()
    work = Path(workdir or ".turbofed/demo").resolve()
    if work.exists():
        shutil.rmtree(work)  # a demo starts from nothing: no old rounds, models or agent state
    (work / "logs").mkdir(parents=True)
    print(f"logs: {work / 'logs'} (one file per process: broker, aggregator, each site, the replays)", file=sys.stderr)
    dataset, data_dir, data_note = find_data(dataset, data_dir)
    print(f"data: {data_note}", file=sys.stderr)
    sites = [f"site{i + 1}" for i in range(n_sites)]
    processes = Processes(work / "logs")
    broker_handle: BrokerHandle | None = None
    watch: FleetWatch | None = None
    try:
        secure = not embedded_broker and find_mosquitto() is not None
        # Identities always (every message is signed); TLS and the ACL on Mosquitto only.
        pki = init_for_sites(work / "pki", sites, DEFAULT_TOPICS, ["127.0.0.1", "localhost"])
        broker_handle = start_broker(embedded=not secure, workdir=work / "broker", pki=pki if secure else None)
        how = f"TLS, one identity per process ({pki.root})" if secure else "INSECURE: anonymous, no TLS, loopback only"
        print(f"broker: {broker_handle.kind} on {broker_handle.host}:{broker_handle.port} ({how})", file=sys.stderr)
        broker = BrokerSettings(host=broker_handle.host, port=broker_handle.port)
        fleet_toml = write_configs(work, sites, broker, settings, pki, tls=secure, site_extra=f"holdout_share = {HOLDOUT_SHARE}",
                                   fleet_extra=INTERVALS_TOML,
                                   store="influxdb" if store == "influxdb" else "results.sqlite")
        watch = FleetWatch(broker_handle.settings(MONITOR), pki.root)
        for site in sites:
            processes.start(site, "edge", "--config", str(work / f"{site}.toml"))
        watch.wait("the edge agents to come online", lambda: sum(watch.site_status(s).online for s in sites) == n_sites, 120, processes)

        replay_args = ["--dataset", dataset, "--sites", str(n_sites), "--rate", "max", "--seed", str(settings.seed), "--broker", f"{broker.host}:{broker.port}"]
        if secure:
            replay_args += ["--pki", str(pki.root)]  # the replay publishes as each site's gateway
        if data_dir:
            replay_args += ["--data-dir", data_dir]
        train = _replay(processes, work, replay_args + ["--part", "train"])
        watch.wait(
            "the sites to label every training engine",
            lambda: sum((watch.site_status(s).samples or 0) + (watch.site_status(s).held_out or 0) for s in sites) >= train["rows"],
            300,
            processes,
        )
        processes.start("aggregator", "aggregator", "--config", str(fleet_toml))
        progress = progress or RoundProgress(settings.rounds)
        try:
            watch.wait(f"{settings.rounds} federated rounds", lambda: _rounds_done(watch, settings.rounds, progress),
                       120 + 60 * settings.rounds, processes)
        finally:
            progress.close()
        watch.wait("every site to load the final global model", lambda: all(watch.site_status(s).model_version == settings.rounds for s in sites), 60, processes)
        # The final announcement carries the interval table, calibrated on the held-out engines.
        watch.wait("the fleet's conformal intervals", lambda: watch.round is not None and watch.round.done, 180, processes)

        test = _replay(processes, work, replay_args + ["--part", "test"])
        n_test = sum(test["engines"].values())
        watch.wait("the sites to score their test engines", lambda: sum(m.engines for m in watch.metrics.values()) >= n_test, 300, processes)
        table = [_site_row(site, watch.metrics.get(site)) for site in sites]
        if store != "influxdb":  # what the sites said is not yet what the aggregator stored: wait for the rows themselves
            held_out = [s for s in sites if watch.site_status(s).held_out]  # a site holding no engine out sends no curve
            with open_store(work / "results.sqlite") as results:
                watch.wait("the aggregator to store the test predictions and the learning curve",
                           lambda: _all_stored(results, held_out, settings.rounds, n_test), 120, processes)
    finally:
        processes.stop()
        if watch:
            watch.close()
        if broker_handle:
            broker_handle.stop()
    return {
        "seconds": round(time.perf_counter() - started, 1),
        "store": str(work / "results.sqlite") if store == "sqlite" else "influxdb",
        "logs": str(work / "logs"),
        "broker": broker_handle.kind if broker_handle else None,
        "secure": bool(broker_handle and broker_handle.secure),
        "data": data_note,
        "dataset": dataset,
        "settings": settings.to_dict(),
        "sites": table,
        "fleet": _pooled(table),
    }


def _rounds_done(watch: FleetWatch, rounds: int, progress: RoundProgress) -> bool:
    """Show the rounds closed so far and the newest fleet RMSE; True once the last round is done."""
    announced = watch.round
    done = 0 if announced is None else (announced.round if announced.done else max(announced.round - 1, 0))
    evaluation = watch.fleet_evaluation()
    version, rmse, n = evaluation if evaluation else (None, None, 0)
    progress.update(min(done, rounds), version, rmse, n)
    return announced is not None and announced.done and announced.round == rounds


def _replay(processes: Processes, work: Path, args: list[str]) -> dict[str, Any]:
    """Run a replay to completion (its progress bar on our stderr) and return its summary.
    It is one of `processes`, so a stop signal stops it with the others."""
    part = args[args.index("--part") + 1]
    out = work / "logs" / f"replay-{part}.json"
    processes.start(f"replay-{part}", "replay", *args, stdout=out)
    code = processes.finish(f"replay-{part}", 3600)
    if code != 0:
        raise FleetError(f"replay of the {part} engines failed (exit {code})")
    return json.loads(out.read_text().strip().splitlines()[-1])


def _all_stored(results: ResultsStore, sites: list[str], rounds: int, n_test: int) -> bool:
    """Every test engine's latest prediction and the learning-curve row of every round of each of
    `sites` (those holding engines out) are in the results store (what the dashboard and the demo's own test read afterwards)."""
    curve = {(r["site"], r["round"]) for r in results.validation_metrics()}
    return len(results.latest_predictions()) >= n_test and curve >= {(s, n) for s in sites for n in range(1, rounds + 1)}


def _site_row(site: str, metrics: Metrics | None) -> dict[str, Any]:
    metrics = metrics or Metrics(site, -1, 0)
    pick = lambda score: {"rmse": score.rmse, "score": score.score}  # noqa: E731
    return {"site": site, "engines": metrics.engines, "local": pick(metrics.local), "federated": pick(metrics.federated)}


def _pooled(table: list[dict[str, Any]]) -> dict[str, Any]:
    """RMSE over every site's test engines together (what the in-process benchmark reports)."""
    out: dict[str, Any] = {"engines": sum(r["engines"] for r in table)}
    for model in ("local", "federated"):
        rows = [r for r in table if r[model]["rmse"] is not None and r["engines"]]
        n = sum(r["engines"] for r in rows)
        out[model] = {
            "rmse": round(math.sqrt(sum(r["engines"] * r[model]["rmse"] ** 2 for r in rows) / n), 4) if n else None,
            "score": round(sum(r[model]["score"] for r in rows), 2) if n else None,
        }
    return out


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{'site':<10}{'engines':>8}{'local RMSE':>12}{'federated RMSE':>16}{'local score':>13}{'fed. score':>12}"]
    for row in [*result["sites"], {"site": "all", **result["fleet"]}]:
        fmt = lambda v, w: f"{v:>{w}.2f}" if v is not None else f"{'-':>{w}}"  # noqa: E731
        lines.append(
            f"{row['site']:<10}{row['engines']:>8}{fmt(row['local']['rmse'], 12)}{fmt(row['federated']['rmse'], 16)}"
            f"{fmt(row['local']['score'], 13)}{fmt(row['federated']['score'], 12)}"
        )
    return "\n".join(lines)


def federation_note(result: dict[str, Any]) -> str | None:
    """One line on whether federation paid off in this run: the mean of the sites' local RMSE
    against the federated model's over every test engine (issue #15 asks for at least 1.2 x,
    as NASA's FD001 shows). On the synthetic fleet a run can land under that, and the line
    says so and by how much the figure moves."""
    local = [r["local"]["rmse"] for r in result["sites"] if r["local"]["rmse"] is not None]
    federated = result["fleet"]["federated"]["rmse"]
    if not local or not federated:
        return None
    mean = sum(local) / len(local)
    line = f"federation: the sites' local models average RMSE {mean:.2f}, {mean / federated:.2f} x the federated model's {federated:.2f}"
    if str(result.get("dataset", "")).upper().startswith("SYN") and mean < 1.2 * federated:
        line += ("; under the 1.2 x that NASA's FD001 shows (1.3 x): with 20 training and 25 test engines a site, one run of "
                 "the synthetic fleet moves this ratio by about 0.1 (1.22 x in a run without held-out engines; 1.27 x in "
                 "`turbofed bench accuracy --dataset SYN --holdout 0.2`)")
    return line


def run_cli(args: argparse.Namespace) -> int:
    """Exit 0 when done; on SIGTERM or SIGINT every child is stopped (agents and replays, then
    the aggregator, then the broker; each has GRACE_S to save its state before SIGKILL) and
    the demo exits with 128 + the signal number (143, 130), as a shell reports it."""
    store = getattr(args, "store", "sqlite")
    check_options(args.dataset, args.sites, args.rounds, args.seed, store)  # before anything starts
    settings = ModelSettings(seed=args.seed).replace(rounds=args.rounds)
    with stop_on_signals():
        try:
            result = run_demo(args.dataset, args.data_dir, args.sites, settings, args.workdir, True if args.embedded_broker else None,
                              store=store)
        except Stopped as stopped:
            print(f"turbofed demo: stopped by {stopped.name}; the broker, aggregator, agents and replay it started "
                  f"have stopped (exit {stopped.exit_code})", file=sys.stderr)
            return stopped.exit_code
    print(format_table(result))
    print(SCORE_NOTE)
    note = federation_note(result)
    if note:
        print(note)
    security = "TLS with per-process identities" if result["secure"] else "INSECURE development broker"
    print(f"\n{result['data']}; broker {result['broker']} ({security}); {result['seconds']:.0f} s")
    store_note = result["store"] if result["store"] != "influxdb" else "InfluxDB (TURBOFED_INFLUX_URL, _ORG, _BUCKET)"
    print(f"results store: {store_note}; logs: {result['logs']}")
    print(f"open the dashboard: turbofed dashboard --store {result['store']}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0
