"""A small live fleet for integration tests: real broker, real agents, real aggregator.

Agents and the aggregator run in threads of the test process (or as subprocesses where a
test kills one); they talk only over MQTT. Every fleet gets its own topic roots, so tests
can share one broker without hearing each other.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from turbofed.aggregator.service import Aggregator
from turbofed.config import BrokerSettings, FleetConfig, IdentitySettings, ModelSettings, SiteConfig
from turbofed.deploy.identities import AGGREGATOR, FleetIdentities, init_from_fleet, write_acl
from turbofed.edge.agent import EdgeAgent
from turbofed.simulation.broker import BrokerHandle
from turbofed.simulation.replay import replay
from turbofed.topics import DEFAULT_TOPICS, Topics

QUICK = ModelSettings(rounds=2, local_epochs=1)
SESSION_SITES = ["site1", "site2", "site3", "site4"]
_admitted: dict[Path, list[Topics]] = {}


def make_session_pki(folder: Path) -> FleetIdentities:
    """`turbofed fleet init` for the test session's sites (every test fleet uses some of them)."""
    fleet = folder / "fleet.toml"
    fleet.write_text(f'sites = {SESSION_SITES!r}\nstore = "r.sqlite"\nregistry = "reg"\n'.replace("'", '"'))
    return init_from_fleet(fleet, folder / "pki")


def admit_topics(broker: BrokerHandle, topics: Topics) -> None:
    """Add a test fleet's topic roots to a secure broker's ACL (the same rules per root as for
    tfl/v1, so each test keeps its own retained round and sessions) and reload it."""
    if broker.pki is None:
        return
    roots = _admitted.setdefault(broker.pki.root, [DEFAULT_TOPICS])
    if topics in roots:
        return
    roots.append(topics)
    write_acl(broker.pki, SESSION_SITES, roots)
    broker.reload()


def broker_table(b: BrokerSettings) -> str:
    """A config file's [broker] table for these settings, TLS identity included."""
    tls = f'ca = "{b.ca}"\ncert = "{b.cert}"\nkey = "{b.key}"\n' if b.tls else ""
    return f'[broker]\nhost = "{b.host}"\nport = {b.port}\ntopic_root = "{b.topic_root}"\nplant_root = "{b.plant_root}"\n{tls}'


def site_identity(pki: Path, site: str) -> IdentitySettings:
    """A site's [identity] from a fleet identity folder (tests/conftest.py's pki_dir)."""
    fleet_id = json.loads((pki / "fleet.json").read_text())["fleet_id"]
    folder = pki / "identities" / site
    return IdentitySettings(fleet_id, str(folder / "signing.key"), str(folder / "aggregator.pub"))


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


class LiveFleet:
    """Broker settings, configs and running parts of one test fleet."""

    def __init__(self, broker: BrokerHandle, work: Path, sites: list[str], settings: ModelSettings = QUICK, *, pki: Path | None,
                 **fleet: object) -> None:
        """`pki`: the fleet's identity folder (the `pki_dir` fixture: `fleet_pki.root`), or None for an unsigned fleet."""
        tag = uuid.uuid4().hex[:8]
        self.handle = broker
        self.topics = Topics(f"t{tag}/v1", f"plant{tag}")
        admit_topics(broker, self.topics)
        self.broker = self.settings(AGGREGATOR)  # the aggregator's: FleetConfig.broker
        self.work = work
        self.sites = sites
        self.pki = pki
        signing = {"pki": str(pki)} if pki is not None else {"insecure_unsigned": True}
        defaults = dict(round_deadline_s=30.0, stats_retry_s=0.5, min_samples=50, **signing)
        self.fleet = FleetConfig(
            sites=tuple(sites), store=str(work / "results.sqlite"), registry=str(work / "registry"), model=settings, broker=self.broker, **{**defaults, **fleet}
        )
        self.running: list[tuple[threading.Event, threading.Thread]] = []
        self.agents: dict[str, EdgeAgent] = {}
        self.aggregator: Aggregator | None = None

    def settings(self, identity: str) -> BrokerSettings:
        """This fleet's broker settings as `identity` (TLS on the secure broker)."""
        return self.handle.settings(identity, topic_root=self.topics.root, plant_root=self.topics.plant_root)

    def site_config(self, site: str, **overrides: object) -> SiteConfig:
        signing = {"identity": site_identity(self.pki, site)} if self.pki is not None else {"insecure_unsigned": True}
        # Test fleets give each site only a few engines: statistics over at least 2 (default 5).
        values = dict(min_samples=50, predictions_every_s=0.2, min_stats_engines=2, **signing) | overrides
        return SiteConfig(site=site, state_dir=str(self.work / "state" / site), broker=self.settings(site), **values)

    def site_toml(self, site: str) -> Path:
        """The same site as a TOML file, for an agent run as a separate process."""
        path = self.work / f"{site}.toml"
        if self.pki is not None:
            ident = site_identity(self.pki, site)
            signing = (f'[identity]\nfleet_id = "{ident.fleet_id}"\nsigning_key = {json.dumps(ident.signing_key)}\n'
                       f'aggregator_key = {json.dumps(ident.aggregator_key)}\n')
        else:
            signing = ""
        path.write_text(f'site = "{site}"\nstate_dir = "state/{site}"\nmin_samples = 50\npredictions_every_s = 0.2\nmin_stats_engines = 2\n'
                        f'{"" if self.pki is not None else "insecure_unsigned = true"}\n\n'
                        + broker_table(self.settings(site)) + f"\n{signing}")
        return path

    def fleet_toml(self, extra: str = "") -> Path:
        """This fleet as a TOML file, for an aggregator run as a separate process; `extra` is
        more TOML at the top level (e.g. a [strategy] table)."""
        f, b = self.fleet, self.broker
        scalars = {"sites": list(f.sites), "store": f.store, "registry": f.registry, "round_deadline_s": f.round_deadline_s,
                   "stats_retry_s": f.stats_retry_s, "min_samples": f.min_samples, "max_update_bytes": f.max_update_bytes}
        if f.quorum is not None:
            scalars["quorum"] = f.quorum
        scalars.update({"pki": f.pki} if f.pki is not None else {"insecure_unsigned": True})
        model = {k: list(v) if isinstance(v, tuple) else v for k, v in f.model.to_dict().items()}
        table = lambda d: "".join(f"{k} = {json.dumps(v)}\n" for k, v in d.items())  # noqa: E731 - JSON scalars are TOML
        path = self.work / "fleet.toml"
        path.write_text(f"{table(scalars)}\n{broker_table(b)}\n[model]\n{table(model)}\n{extra}")
        return path

    def start_aggregator_process(self, extra_toml: str = "", env: dict[str, str] | None = None) -> subprocess.Popen:
        """`turbofed aggregator` as its own process on `fleet_toml(extra_toml)`, run from the work
        folder (so only `env`'s PYTHONPATH, not the current folder, decides what it can import)."""
        log = open(self.work / "aggregator.log", "ab")
        cmd = [sys.executable, "-m", "turbofed.cli", "aggregator", "--config", str(self.fleet_toml(extra_toml))]
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.work, env=env if env is not None else dict(os.environ))

    def start_agent(self, site: str, **overrides: object) -> EdgeAgent:
        agent = EdgeAgent(self.site_config(site, **overrides))
        agent.start()
        self._spawn(agent.run)
        self.agents[site] = agent
        return agent

    def start_agent_process(self, site: str) -> subprocess.Popen:
        log = open(self.work / f"{site}.log", "ab")
        cmd = [sys.executable, "-m", "turbofed.cli", "edge", "--config", str(self.site_toml(site))]
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    def start_aggregator(self) -> Aggregator:
        self.aggregator = Aggregator(self.fleet)
        self.aggregator.start()
        self._aggregator_run = self._spawn(self.aggregator.run)
        return self.aggregator

    def stop_aggregator(self) -> None:
        stop, thread = self._aggregator_run
        stop.set()
        thread.join(20)

    def _spawn(self, target: Callable[[threading.Event], None]) -> tuple[threading.Event, threading.Thread]:
        stop = threading.Event()
        thread = threading.Thread(target=target, args=(stop,), daemon=True)
        thread.start()
        self.running.append((stop, thread))
        return stop, thread

    def replay(self, part: str, max_engines: int, data_dir: Path, dataset: str = "FD001") -> dict:
        return replay(
            dataset, str(data_dir), len(self.sites), self.broker.host, self.broker.port, None, "round-robin", part,
            progress=False, max_engines=max_engines, topics=self.topics, pki=self.handle.pki.root if self.handle.pki else None,
        )

    def buffer_training(self, max_engines: int, data_dir: Path) -> dict:
        """Start every site's agent, replay training engines to failure and wait until the
        agents have buffered every row (what a round needs); the replay's summary."""
        for site in self.sites:
            self.start_agent(site)
        train = self.replay("train", max_engines, data_dir)
        wait_for("sites to buffer the failed engines", lambda: sum(a.buffer.rows for a in self.agents.values()) == train["rows"])
        return train

    def close(self) -> None:
        for stop, _ in self.running:
            stop.set()
        for _, thread in self.running:
            thread.join(20)


def assert_round_one_is_the_plain_mean(top: Aggregator, bodies: list[bytes], sites: list[str]) -> None:
    """Round 1 in `top`'s store has exactly `sites`, and global v1 is the plain mean of the
    updates' `bodies` (simulated sites all claim the same samples: equal weights)."""
    import numpy as np
    import onnx

    from turbofed.codec import read_weights

    # the stored row itself, not the model at the sites (a proxy that the store write precedes only by design)
    wait_for("round 1 in the top's store", lambda: any(r["round"] == 1 for r in top.store.rounds()), 30)
    rows = [r for r in top.store.rounds() if r["round"] == 1]
    assert [sorted(p["site"] for p in r["participants"]) for r in rows] == [sorted(sites)]
    v1 = read_weights(onnx.load_model_from_string(top.registry.get(1)))
    updates = [read_weights(onnx.load_model_from_string(body)) for body in bodies]
    for name, got in v1.items():
        np.testing.assert_allclose(got, np.mean([u[name].astype(np.float64) for u in updates], axis=0), rtol=0, atol=1e-6)


def stop_live(stop: threading.Event, threads: list[threading.Thread], sims: object | None, top: Aggregator) -> None:
    """Tear down a live two-level or workers test: stop and join its threads, close the
    simulated sites, and close the top's store and registry itself if it never ran."""
    stop.set()
    for t in threads:
        t.join(15)
    if sims is not None:
        sims.close()
    if not threads:
        top.store.close()
        top.registry.close()
