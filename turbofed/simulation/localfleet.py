"""A fleet of processes on one host, as the demo and the system benchmark run it: the
config files a user would write (`write_configs`), the child processes with their logs
(`Processes`), and an MQTT watcher of what the fleet says (`FleetWatch`)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from turbofed.config import BrokerSettings, ModelSettings
from turbofed.deploy.identities import AGGREGATOR, FleetIdentities
from turbofed.errors import Refused, TurbofedError
from turbofed.messages import Metrics, ModelEvaluation, RoundAnnouncement, Status, signed
from turbofed.mqtt import Subscriptions, connect, make_client
from turbofed.pki import IdentityFolder
from turbofed.signing import load_public_key
from turbofed.simulation.children import spawn
from turbofed.topics import Topics

log = logging.getLogger("turbofed.simulation.localfleet")
GRACE_S = 10.0  # how long a child has to save its state and exit after SIGTERM


class FleetError(TurbofedError):
    """A part of the fleet did not come up or did not finish in time."""


class FleetWatch:
    """What the fleet says over MQTT: site status, the round announcement, site metrics, and
    each site's RMSE of each global model on its labelled engines (its evaluation)."""

    def __init__(self, broker: BrokerSettings, pki: Path | None = None) -> None:
        """`pki`: the fleet's identity folder; what the fleet says is then checked against its
        keys (the aggregator's and every site's), as the agents and the aggregator do."""
        self.topics = Topics(broker.topic_root, broker.plant_root)
        self.verifier: signed.Verifier | signed.Unsigned = signed.Unsigned("demo")
        if pki is not None:
            folder = IdentityFolder(Path(pki))  # public keys only: a watcher holds no signing key
            manifest = folder.read_manifest()
            everyone = {name: load_public_key(folder.signing_pub(name))
                        for name, role in manifest["identities"].items() if role in ("site", "aggregator")}
            self.verifier = signed.Verifier(manifest["fleet_id"], signed.TrustedKeys(everyone))
        self.status: dict[str, Status] = {}
        self.metrics: dict[str, Metrics] = {}
        self.evaluations: dict[int, dict[str, tuple[float, int]]] = {}  # version -> site -> (RMSE, rows)
        self.round: RoundAnnouncement | None = None
        self.changed = threading.Condition()
        self.client = make_client(f"turbofed-demo-{os.getpid()}", broker)
        self.client.on_message = self._on_message
        topics = [self.topics.all_sites("status"), self.topics.all_sites("metrics"), self.topics.all_sites("evaluation"), self.topics.round]
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
                what, cls = {"status": (signed.STATUS, Status), "evaluation": (signed.EVALUATION, ModelEvaluation)}.get(kind, (signed.METRICS, Metrics))
                body = cls.from_payload(self.verifier.open(what, msg.payload, signer=site).body, site=site)
        except Refused as exc:
            log.warning("ignored a message on %s (%s): %s", msg.topic, exc.reason.value, exc)
            return
        with self.changed:
            if isinstance(body, RoundAnnouncement):
                self.round = body
            elif isinstance(body, Status):
                self.status[site] = body
            elif isinstance(body, ModelEvaluation):
                self.evaluations.setdefault(body.model_version, {})[site] = (body.rmse, body.rows)
                for old in [v for v in self.evaluations if v < max(self.evaluations) - 4]:  # bounded: the newest few
                    del self.evaluations[old]
            elif body.on == "test":  # per-round validation metrics are the dashboard's learning curve, not the final table
                self.metrics[site] = body
            self.changed.notify_all()

    def fleet_evaluation(self) -> tuple[int, float, int] | None:
        """(version, RMSE over every reporting site's labelled rows, sites) of the newest
        global model evaluated by as many sites as any (so the figure does not jump while the
        newest version's evaluations arrive one by one); None before the first evaluation."""
        from turbofed.simulation.progress import pooled_rmse

        if not self.evaluations:
            return None
        most = max(len(scores) for scores in self.evaluations.values())
        version = max(v for v, scores in self.evaluations.items() if len(scores) == most)
        scores = self.evaluations[version]
        rmse = pooled_rmse(scores)
        return None if rmse is None else (version, rmse, len(scores))

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
                    raise FleetError(f"timed out after {timeout:.0f} s waiting for {what}; logs are in {processes.logs}")
                self.changed.wait(min(left, 1.0))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Processes:
    """The demo's child processes, each logging to its own file, all stopped together.

    Each runs in its own session and gets SIGTERM from the kernel should this process die
    without stopping them (`turbofed.simulation.children`)."""

    def __init__(self, logs: Path, grace: float = GRACE_S) -> None:
        self.logs = logs
        self.grace = grace
        self.children: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str, stdout: Path | None = None) -> subprocess.Popen:
        """`turbofed ARGS...` as child `name`, output in logs/<name>.log; with `stdout`, its
        standard output goes to that file and its standard error to ours instead."""
        cmd = [sys.executable, "-m", "turbofed.cli", *args]
        with open(stdout or self.logs / f"{name}.log", "wb") as handle:
            errors = None if stdout else subprocess.STDOUT
            self.children[name] = spawn(cmd, stdout=handle, stderr=errors, stdin=subprocess.DEVNULL)
        return self.children[name]

    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self.children.items()}

    def check(self) -> None:
        for name, proc in self.children.items():
            if proc.poll() not in (None, 0):
                raise FleetError(f"{name} exited with code {proc.returncode}; see {self.logs / (name + '.log')}")

    def finish(self, name: str, timeout: float) -> int:
        """Wait for child `name` to exit by itself (a replay), failing early if another died."""
        proc, deadline = self.children[name], time.monotonic() + timeout
        while proc.poll() is None:
            others = {n: p for n, p in self.children.items() if n != name}
            for other, p in others.items():
                if p.poll() not in (None, 0):
                    raise FleetError(f"{other} exited with code {p.returncode}; see {self.logs / (other + '.log')}")
            if time.monotonic() > deadline:
                raise FleetError(f"{name} did not finish within {timeout:.0f} s")
            try:
                proc.wait(0.5)
            except subprocess.TimeoutExpired:
                pass
        return proc.returncode

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM, then SIGKILL after `timeout` (default: the grace period). Agents and
        replays first, so the aggregator still records their goodbye (offline) status."""
        grace = self.grace if timeout is None else timeout
        agents = {n: p for n, p in self.children.items() if n != "aggregator"}
        rest = {n: p for n, p in self.children.items() if n == "aggregator"}
        for group in (agents, rest):
            for proc in group.values():
                if proc.poll() is None:
                    proc.terminate()
            deadline = time.monotonic() + grace
            for name, proc in group.items():
                try:
                    proc.wait(max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop within %.0f s; killing it", name, grace)
                    proc.kill()
                    proc.wait()


def write_configs(work: Path, sites: list[str], broker: BrokerSettings, settings: ModelSettings,
                  pki: FleetIdentities | None, tls: bool, site_extra: str = "", store: str = "results.sqlite",
                  fleet_extra: str = "") -> Path:
    """One TOML per site and one for the fleet, as a user would write them. Every process signs
    with its key from `pki` (inside `work`, `turbofed fleet init`'s folder; None: nothing is
    signed, the insecure development setup); with `tls` each also names its own certificate
    and key, relative to the file. `site_extra` is more TOML for every site config, `fleet_extra`
    more tables for fleet.toml; `store` the fleet's results store (a file beside fleet.toml, or
    "influxdb")."""
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
        f"sites = {json.dumps(sites)}\nstore = {json.dumps(store)}\nregistry = \"registry\"\n"
        + (f"pki = \"{rel(pki.root)}\"\n" if pki else "insecure_unsigned = true\n") +
        f"strategy = \"fedavg\"\nround_deadline_s = 120\n\n{broker_toml(AGGREGATOR)}\n[model]\n{model}\n"
        + (f"\n{fleet_extra}" if fleet_extra else "")
    )
    return fleet
