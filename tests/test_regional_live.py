"""One two-level round on real Mosquitto: a regional broker bridged (TLS, the region's
certificate, the fleet's ACL on both) to a central broker on 127.0.0.1, a regional
aggregator on the regional broker, the top aggregator on the central one, and three
simulated signed sites (benchmarks/scale.py's SimSites) connected, each as its own TLS
identity, to the regional broker only. Their statistics replies cross the bridge up, the
round announcement and global models cross it down, and their updates reach the top only
as the region's partial. The test waits for global v1 to arrive back at the sites, then
checks it is in the registry and equals the FedAvg of the three updates."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.livefleet import assert_round_one_is_the_plain_mean, stop_live, wait_for
from turbofed.aggregator.regional import RegionalAggregator
from turbofed.aggregator.service import Aggregator
from turbofed.benchmarks.scale import SimSites
from turbofed.config import ModelSettings, RegionConfig, load_fleet_config
from turbofed.data.synthetic import generate_fleet
from turbofed.deploy.bridge import BridgeTLS, render_bridge
from turbofed.deploy.identities import AGGREGATOR, MONITOR, add_identity, init_fleet, write_acl
from turbofed.simulation.broker import find_mosquitto, start_broker
from turbofed.simulation.localfleet import write_configs
from turbofed.topics import DEFAULT_TOPICS

pytestmark = [pytest.mark.slow, pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")]

SITES = ["site1", "site2", "site3"]
TIMEOUT = 90.0  # statistics (two phases), v0, one round: seconds on a loaded 2-core machine


def test_one_round_through_a_bridged_regional_broker(tmp_path: Path) -> None:
    ids = init_fleet(tmp_path / "pki", ["127.0.0.1"])
    for name, role in ((AGGREGATOR, "aggregator"), (MONITOR, "monitor"), ("east", "region")):
        add_identity(ids, name, role)
    for site in SITES:
        add_identity(ids, site, "site")
    regions = {"east": tuple(SITES)}
    write_acl(ids, SITES, DEFAULT_TOPICS, regions)
    with start_broker(embedded=False, workdir=tmp_path / "central", pki=ids) as central:
        bridge = render_bridge("east", "127.0.0.1", central.port, DEFAULT_TOPICS, BridgeTLS.of(ids, "east"))
        with start_broker(embedded=False, workdir=tmp_path / "regional", pki=ids, extra_conf=bridge) as regional:
            fleet_toml = write_configs(tmp_path, [], central.settings(AGGREGATOR), ModelSettings(rounds=1, seed=0), ids, tls=True)
            text = fleet_toml.read_text().replace("sites = []", f"sites = {SITES!r}".replace("'", '"'))
            fleet_toml.write_text(text.replace("round_deadline_s = 120", "round_deadline_s = 60\nmin_samples = 1\nstats_retry_s = 1\n"
                                               '[regions]\neast = ["site1", "site2", "site3"]\n'))
            top = Aggregator(load_fleet_config(fleet_toml), config_path=str(fleet_toml))
            region = RegionalAggregator(RegionConfig("east", tuple(SITES), pki=str(ids.root),
                                                     broker=regional.settings("east"), close_before_s=5.0))
            stop = threading.Event()
            runs = generate_fleet(n_train=6, n_test=0, seed=0, name="SYN001").train
            threads = []
            sims = None
            try:
                top.start()
                region.start()
                threads = [threading.Thread(target=top.run, args=(stop,), daemon=True),
                           threading.Thread(target=region.run, args=(stop,), daemon=True)]
                for t in threads:
                    t.start()
                sims = SimSites(SITES, ids.root, ids.fleet_id, [regional.settings(s) for s in SITES], runs, rate=50.0,
                                name="regional-live")
                sims.run(1, TIMEOUT)  # global v1, through the bridge, at the sites
                assert region.counters == {} and top.counters == {}, (region.counters, top.counters)
                # The region records its partial as sent after the publish returns: wait for that itself.
                wait_for("the region's partial recorded as sent", lambda: 1 in region.sent, 10)
                assert 1 in region.sent  # the partial went up, with every site in it:
                assert_round_one_is_the_plain_mean(top, [sims.bodies[i] for i in range(len(SITES))], SITES)
            finally:
                stop_live(stop, threads, sims, top)
