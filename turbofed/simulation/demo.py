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
Ctrl-C included.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from turbofed.config import BrokerSettings, ModelSettings, resolve_data_dir
from turbofed.deploy.identities import AGGREGATOR, MONITOR, FleetIdentities, init_for_sites
from turbofed.errors import Refused, TurbofedError
from turbofed.messages import Metrics, RoundAnnouncement, Status, signed
from turbofed.mqtt import Subscriptions, connect, make_client
from turbofed.simulation.broker import BrokerHandle, find_mosquitto, start_broker
from turbofed.topics import DEFAULT_TOPICS, Topics

log = logging.getLogger("turbofed.simulation.demo")

SYNTHETIC = "SYN001"


class DemoError(TurbofedError):
    """A part of the demo did not come up or did not finish in time."""


class FleetWatch:
    """What the fleet says over MQTT: site status, the round announcement, site metrics."""

    def __init__(self, broker: BrokerSettings, pki: Path | None = None) -> None:
        """`pki`: the fleet's identity folder; what the fleet says is then checked against its
        keys (the aggregator's and every site's), as the agents and the aggregator do."""
        self.topics = Topics(broker.topic_root, broker.plant_root)
        self.verifier: signed.Verifier | signed.Unsigned = signed.Unsigned("demo")
        if pki is not None:
            keys = signed.FleetKeys.load(pki)
            everyone = {**keys.sites.keys, signed.AGGREGATOR: keys.aggregator.key.public_key()}
            self.verifier = signed.Verifier(keys.fleet_id, signed.TrustedKeys(everyone))
        self.status: dict[str, Status] = {}
        self.metrics: dict[str, Metrics] = {}
        self.round: RoundAnnouncement | None = None
        self.changed = threading.Condition()
        self.client = make_client(f"turbofed-demo-{os.getpid()}", broker)
        self.client.on_message = self._on_message
        topics = [self.topics.all_sites("status"), self.topics.all_sites("metrics"), self.topics.round]
        self.subscriptions = Subscriptions(self.client, topics)
        self.client.on_connect = lambda *_: self.subscriptions.subscribe()
        connect(self.client, broker)
        self.subscriptions.wait()

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        if not msg.payload:
            return
        try:
            if msg.topic == self.topics.round:
                opened = self.verifier.open(signed.ROUND, msg.payload, signer=signed.AGGREGATOR)
                site, body = "", RoundAnnouncement.from_payload(opened.body)
            else:
                site, kind = self.topics.parse_site(msg.topic)
                opened = self.verifier.open(signed.STATUS if kind == "status" else signed.METRICS, msg.payload, signer=site)
                body = (Status if kind == "status" else Metrics).from_payload(opened.body, site=site)
        except Refused as exc:
            log.warning("ignored a message on %s (%s): %s", msg.topic, exc.reason.value, exc)
            return
        with self.changed:
            if isinstance(body, RoundAnnouncement):
                self.round = body
            elif isinstance(body, Status):
                self.status[site] = body
            else:
                self.metrics[site] = body
            self.changed.notify_all()

    def site_status(self, site: str) -> Status:
        """The site's latest status; offline and empty until it has said anything."""
        return self.status.get(site) or Status(site, online=False)

    def wait(self, what: str, condition, timeout: float, processes: "Processes") -> None:
        """Block until `condition()` holds; fail early if a child process died."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not condition():
                processes.check()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}; logs are in {processes.logs}")
                self.changed.wait(min(left, 1.0))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Processes:
    """The demo's child processes, each logging to its own file, all stopped together."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.children: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        handle = open(self.logs / f"{name}.log", "wb")
        cmd = [sys.executable, "-m", "turbofed.cli", *args]
        self.children[name] = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self.children[name]

    def check(self) -> None:
        for name, proc in self.children.items():
            if proc.poll() not in (None, 0):
                raise DemoError(f"{name} exited with code {proc.returncode}; see {self.logs / (name + '.log')}")

    def stop(self, timeout: float = 15.0) -> None:
        """Agents first, so the aggregator still records their goodbye (offline) status."""
        agents = {n: p for n, p in self.children.items() if n != "aggregator"}
        rest = {n: p for n, p in self.children.items() if n == "aggregator"}
        for group in (agents, rest):
            for proc in group.values():
                if proc.poll() is None:
                    proc.terminate()
            deadline = time.monotonic() + timeout
            for name, proc in group.items():
                try:
                    proc.wait(max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop within %.0f s; killing it", name, timeout)
                    proc.kill()
                    proc.wait()


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


def write_configs(work: Path, sites: list[str], broker: BrokerSettings, settings: ModelSettings,
                  pki: FleetIdentities | None, tls: bool, site_extra: str = "") -> Path:
    """One TOML per site and one for the fleet, as a user would write them. Every process signs
    with its key from `pki` (inside `work`, `turbofed fleet init`'s folder; None: nothing is
    signed, the insecure development setup); with `tls` each also names its own certificate
    and key, relative to the file. `site_extra` is more TOML for every site config."""
    rel = lambda p: p.resolve().relative_to(work.resolve()).as_posix()  # noqa: E731

    def broker_toml(identity: str) -> str:
        text = f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\n'
        if tls:
            text += (f'ca = "{rel(pki.ca_cert)}"\ncert = "{rel(pki.client_cert(identity))}"\n'
                     f'key = "{rel(pki.client_key(identity))}"\n')
        return text

    for site in sites:
        identity = (f'[identity]\nfleet_id = "{pki.fleet_id}"\nsigning_key = "{rel(pki.signing_key(site))}"\n'
                    f'aggregator_key = "{rel(pki.signing_pub(AGGREGATOR))}"\n') if pki else ""
        unsigned = "" if pki else "insecure_unsigned = true\n"
        (work / f"{site}.toml").write_text(f'site = "{site}"\nstate_dir = "state/{site}"\nengines = "*"\n{unsigned}{site_extra}\n'
                                           f'{broker_toml(site)}\n{identity}')
    model = "\n".join(f"{k} = {json.dumps(list(v) if isinstance(v, tuple) else v)}" for k, v in settings.to_dict().items())
    fleet = work / "fleet.toml"
    fleet.write_text(
        f"sites = {json.dumps(sites)}\nstore = \"results.sqlite\"\nregistry = \"registry\"\n"
        + (f"pki = \"{rel(pki.root)}\"\n" if pki else "insecure_unsigned = true\n") +
        f"strategy = \"fedavg\"\nround_deadline_s = 120\n\n{broker_toml(AGGREGATOR)}\n[model]\n{model}\n"
    )
    return fleet


def run_demo(
    dataset: str = "FD001",
    data_dir: str | None = None,
    n_sites: int = 4,
    settings: ModelSettings | None = None,
    workdir: str | None = None,
    embedded_broker: bool | None = None,
) -> dict[str, Any]:
    """Run the demo end to end and return its table (see `turbofed demo --json`)."""
    settings = settings or ModelSettings()
    started = time.perf_counter()
    work = Path(workdir or ".turbofed/demo").resolve()
    if work.exists():
        shutil.rmtree(work)  # a demo starts from nothing: no old rounds, models or agent state
    (work / "logs").mkdir(parents=True)
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
        fleet_toml = write_configs(work, sites, broker, settings, pki, tls=secure)
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
            lambda: sum(watch.site_status(s).samples or 0 for s in sites) >= train["rows"],
            300,
            processes,
        )
        processes.start("aggregator", "aggregator", "--config", str(fleet_toml))
        watch.wait(f"{settings.rounds} federated rounds", lambda: watch.round is not None and watch.round.done and watch.round.round == settings.rounds, 120 + 60 * settings.rounds, processes)
        watch.wait("every site to load the final global model", lambda: all(watch.site_status(s).model_version == settings.rounds for s in sites), 60, processes)

        test = _replay(processes, work, replay_args + ["--part", "test"])
        n_test = sum(test["engines"].values())
        watch.wait("the sites to score their test engines", lambda: sum(m.engines for m in watch.metrics.values()) >= n_test, 300, processes)
        table = [_site_row(site, watch.metrics.get(site)) for site in sites]
    finally:
        processes.stop()
        if watch:
            watch.close()
        if broker_handle:
            broker_handle.stop()
    return {
        "seconds": round(time.perf_counter() - started, 1),
        "store": str(work / "results.sqlite"),
        "broker": broker_handle.kind if broker_handle else None,
        "secure": bool(broker_handle and broker_handle.secure),
        "data": data_note,
        "dataset": dataset,
        "settings": settings.to_dict(),
        "sites": table,
        "fleet": _pooled(table),
    }


def _replay(processes: Processes, work: Path, args: list[str]) -> dict[str, Any]:
    """Run a replay to completion (its progress bar on our stderr) and return its summary."""
    part = args[args.index("--part") + 1]
    out = work / "logs" / f"replay-{part}.json"
    with open(out, "w") as stdout:
        code = subprocess.call([sys.executable, "-m", "turbofed.cli", "replay", *args], stdout=stdout, stdin=subprocess.DEVNULL)
    processes.check()
    if code != 0:
        raise DemoError(f"replay of the {part} engines failed (exit {code})")
    return json.loads(out.read_text().strip().splitlines()[-1])


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


def run_cli(args: argparse.Namespace) -> int:
    settings = ModelSettings(seed=args.seed).replace(rounds=args.rounds)
    result = run_demo(args.dataset, args.data_dir, args.sites, settings, args.workdir, True if args.embedded_broker else None)
    print(format_table(result))
    security = "TLS with per-process identities" if result["secure"] else "INSECURE development broker"
    print(f"\n{result['data']}; broker {result['broker']} ({security}); {result['seconds']:.0f} s")
    print(f"results store: {result['store']}")
    print(f"open the dashboard: turbofed dashboard --store {result['store']}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0
