"""One round on real Mosquitto (TLS, the fleet's ACL) with two ingestion workers sharing the
sites' updates through `$share/ingest/<root>/sites/+/update`, the top aggregator taking
only their batch partials, and ten simulated signed sites (benchmarks/scale.py's SimSites),
each its own TLS identity.

Worker w1 sends small batches promptly. Worker w2 holds its updates in one open batch
(flush_s far off), and once every update is either counted at the top (from w1) or in w2's
batch, w2 crashes: its network loop stops and its socket closes with no DISCONNECT, so the
broker keeps its session and the updates it never acked. A new w2 process (same config, same
client id) gets them again (dup), sends each alone, and the round closes with every site
counted and global v1 equal to the FedAvg of the ten updates."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.livefleet import assert_round_one_is_the_plain_mean, stop_live, wait_for
from turbofed.aggregator.regional import RegionalAggregator
from turbofed.aggregator.service import Aggregator
from turbofed.benchmarks.scale import SimSites
from turbofed.config import ModelSettings, RegionConfig, load_fleet_config
from turbofed.data.synthetic import generate_fleet
from turbofed.deploy.identities import AGGREGATOR, MONITOR, add_identity, init_fleet, write_acl
from turbofed.simulation.broker import find_mosquitto, start_broker
from turbofed.simulation.localfleet import write_configs
from turbofed.topics import DEFAULT_TOPICS

pytestmark = [pytest.mark.slow, pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")]

SITES = [f"site{i}" for i in range(1, 11)]
WORKERS = ("w1", "w2")
TIMEOUT = 90.0  # statistics (two phases), v0, one round: seconds on a loaded 2-core machine


def _drive(worker: RegionalAggregator, stop: threading.Event) -> None:
    """What `RegionalAggregator.run` does, without its graceful disconnect at the end."""
    while not stop.is_set():
        worker.pump(0.1)
        worker.close_if_due(time.time())


def _crash(worker: RegionalAggregator) -> None:
    """The worker process dies: no DISCONNECT, its TCP connection just closes."""
    worker.client.loop_stop()
    worker.client.socket().close()



def test_two_workers_one_crashing_mid_round_count_every_site_once(tmp_path: Path) -> None:
    ids = init_fleet(tmp_path / "pki", ["127.0.0.1"])
    for name, role in ((AGGREGATOR, "aggregator"), (MONITOR, "monitor"), *((w, "region") for w in WORKERS)):
        add_identity(ids, name, role)
    for site in SITES:
        add_identity(ids, site, "site")
    write_acl(ids, SITES, DEFAULT_TOPICS, workers=WORKERS)
    with start_broker(embedded=False, workdir=tmp_path / "broker", pki=ids) as broker:
        fleet_toml = write_configs(tmp_path, [], broker.settings(AGGREGATOR), ModelSettings(rounds=1, seed=0), ids, tls=True)
        text = fleet_toml.read_text().replace("sites = []", f"sites = {SITES!r}".replace("'", '"'))
        fleet_toml.write_text(text.replace("round_deadline_s = 120", "round_deadline_s = 80\nmin_samples = 1\nstats_retry_s = 1\n"
                                           'max_site_share = 1\nworkers = ["w1", "w2"]\n'))
        top = Aggregator(load_fleet_config(fleet_toml), config_path=str(fleet_toml))

        def worker(name: str, batch: int, flush_s: float) -> RegionalAggregator:
            return RegionalAggregator(RegionConfig(name, tuple(SITES), pki=str(ids.root), broker=broker.settings(name),
                                                   shared_group="ingest", batch=batch, flush_s=flush_s, close_before_s=5.0))

        w1, w2 = worker("w1", 3, 0.3), worker("w2", 16, 60.0)
        stop, w2_stop = threading.Event(), threading.Event()
        runs = generate_fleet(n_train=6, n_test=0, seed=0, name="SYN001").train
        threads: list[threading.Thread] = []
        sims = None
        try:
            top.start()
            w1.start()
            w2.start()
            threads = [threading.Thread(target=top.run, args=(stop,), daemon=True),
                       threading.Thread(target=_drive, args=(w1, stop), daemon=True),
                       threading.Thread(target=_drive, args=(w2, w2_stop), daemon=True)]
            for t in threads:
                t.start()
            sims = SimSites(SITES, ids.root, ids.fleet_id, [broker.settings(s) for s in SITES], runs, rate=50.0,
                            name="workers-live")
            sims_thread = threading.Thread(target=sims.run, args=(1, TIMEOUT), daemon=True)
            sims_thread.start()

            # Every update is either counted at the top (w1's batches) or in w2's unsent batch.
            def split() -> bool:
                r = top.round
                return r is not None and set(r.accepted) | set(w2.batch) == set(SITES) and not set(r.accepted) & set(w2.batch)

            wait_for("the updates split between w1 (counted) and w2 (held)", split, TIMEOUT)
            held = list(w2.batch)
            assert held and len(held) < len(SITES), held  # the broker gave both workers some
            w2_stop.set()
            threads[2].join(5)
            _crash(w2)
            assert top.round is not None and set(top.round.accepted) == set(SITES) - set(held)  # w2's were never sent

            again = worker("w2", 16, 60.0)  # the same id: the same client id and session
            again.start()
            threads.append(threading.Thread(target=_drive, args=(again, stop), daemon=True))
            threads[-1].start()
            sims_thread.join(TIMEOUT)  # until global v1 is back at the sites
            assert 1 in sims.globals, "global v1 never reached the sites"

            assert top.counters == {} and w1.counters == {} and again.counters == {}, (top.counters, w1.counters, again.counters)
            # The worker counts a batch after its publish returns: wait for that, not for v1 at the sites.
            wait_for("every redelivered update sent in a batch of its own", lambda: again.batches[1] == len(held), 10)
            assert again.batches[1] == len(held)  # each redelivered update went alone
            assert_round_one_is_the_plain_mean(top, [sims.bodies[i] for i in range(len(SITES))], list(SITES))
        finally:
            w2_stop.set()
            stop_live(stop, threads, sims, top)
