"""`turbofed status --live`: the fleet as the broker has it, in the terminal.

Asks the broker, not the results store: the retained round announcement and every site's
retained status, read as the fleet's read-only `monitor` identity and each checked against
the fleet's keys (`FleetWatch`, as the demo's watcher). It works while the aggregator or its
store is down, and knows only what those messages say: no update history, no refusals (the
aggregator's, in the store). The tables are `turbofed.store.status`'s.
"""

from __future__ import annotations

import argparse
import time
import tomllib
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from turbofed.config import load_fleet_config
from turbofed.deploy.identities import MONITOR, FleetIdentities, client_settings
from turbofed.errors import ConfigError
from turbofed.simulation.localfleet import FleetWatch
from turbofed.store import status as store_status

LIVE_SECONDS = 5.0  # wait at most this long for every site's retained status


def live_status(config_path: str, pki: str | None = None, seconds: float = LIVE_SECONDS, now: float | None = None) -> dict[str, Any]:
    """The fleet as the broker has it, in `fleet_status`'s shape: connects with fleet.toml's
    broker address as the `monitor` identity of the fleet's identity folder (`pki`, default
    the config's), collects the retained round announcement and site statuses until every
    site has spoken or `seconds` have passed, and verifies each against the fleet's keys
    (a message that fails is ignored and logged, as the demo's watcher does)."""
    config = load_fleet_config(config_path, keys=False)
    if pki is None:
        with open(config_path, "rb") as handle:
            named = tomllib.load(handle).get("pki")
        pki = str(Path(config_path).parent / named) if isinstance(named, str) else None
    broker = replace(config.broker, tls=False, ca=None, cert=None, key=None)
    if pki is not None:
        if not Path(pki).is_dir():
            raise ConfigError(f"{config_path}: pki folder {pki} does not exist (give --pki DIR: the fleet's identity folder)")
        broker = client_settings(FleetIdentities(Path(pki)), MONITOR, broker)
    elif not config.insecure_unsigned:
        raise ConfigError(f"{config_path}: no pki folder to check the fleet's messages with (give --pki DIR)")
    watch = FleetWatch(broker, Path(pki) if pki else None)
    try:
        deadline = time.monotonic() + seconds
        with watch.changed:
            while not (watch.round is not None and set(config.sites) <= set(watch.status)):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                watch.changed.wait(left)
        statuses, ann = dict(watch.status), watch.round
    finally:
        watch.close()
    now = time.time() if now is None else now
    rows = [store_status.site_row(site, asdict(statuses[site]) if site in statuses else None) for site in config.sites]
    announced = None if ann is None else {"round": ann.round, "model_version": ann.model_version, "done": ann.done,
                                          "deadline": ann.deadline, "strategy": ann.strategy}
    return {"at": now, "source": "broker", "announced": announced, "sites_online": sum(1 for r in rows if r["online"]),
            "sites": rows, "refusals": None}


def run_cli(args: argparse.Namespace) -> int:
    """`turbofed status`: from the store, or with --live from the broker."""
    if not getattr(args, "live", False):
        return store_status.run_cli(args)
    if not getattr(args, "config", None):
        raise ConfigError("turbofed status --live needs --config fleet.toml (the broker and the fleet's sites)")
    return store_status.show(live_status(args.config, getattr(args, "pki", None), getattr(args, "seconds", LIVE_SECONDS)), args)
