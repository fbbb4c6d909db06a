"""`turbofed status`: the fleet at a glance in the terminal, read from the results store
(SQLite or InfluxDB, through the store interface): rounds, sites online, each site's last
status and last update, and refusals by reason.

The store is what the aggregator writes, so this works wherever the store is reachable,
with no broker credentials. `--live` asks the broker instead
(turbofed/simulation/livestatus.py); the tables here draw both. On a terminal the tables are drawn with `rich` when it
is installed (the `[console]` extra); otherwise, and into a pipe or file, as plain aligned
columns; `--json` prints the same facts for scripts.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from turbofed.errors import TurbofedError
from turbofed.store import ResultsStore, open_store
from turbofed.topics import natural_key

DEFAULT_STORE = ".turbofed/demo/results.sqlite"
# The aggregator stores at most one rejection row per (site, reason) per interval and then one
# row standing for the rest (aggregator/service.py): "<n> more like it not stored one by one ...".
_HELD = re.compile(r"^(\d+) more like it not stored")


def refusals_in(row: dict[str, Any]) -> int:
    """How many refusals one rejection row stands for."""
    held = _HELD.match(str(row.get("detail") or ""))
    return int(held.group(1)) if held else 1


def site_row(site: str, status: dict[str, Any] | None, last_update: dict[str, Any] | None = None,
             federated_rmse: float | None = None) -> dict[str, Any]:
    """One site's row of the tables, from its latest status (a store row, or a Status message's
    fields; None or empty: never heard from)."""
    s = status or {}
    return {"site": site, "online": bool(s.get("online")) if s else None, "status_at": s.get("at"),
            "model_version": s.get("model_version"), "samples": s.get("samples"), "agent_version": s.get("agent_version"),
            "last_update": last_update, "federated_rmse": federated_rmse}


def fleet_status(store: ResultsStore, sites: list[str] | tuple[str, ...] | None = None, now: float | None = None) -> dict[str, Any]:
    """What `turbofed status` shows, as plain data. `sites`: the fleet config's (sites never
    heard from are listed too); otherwise every site the store knows."""
    now = time.time() if now is None else now
    rounds = store.rounds()
    status = {s["site"]: s for s in store.site_status()}
    last_update: dict[str, dict[str, Any]] = {}
    for r in rounds:  # in round order: the last one a site took part in wins
        for p in r["participants"]:
            last_update[p["site"]] = {"round": r["round"], "at": r["closed"], "samples": p["samples"], "bytes": p["update_bytes"]}
    fed: dict[str, float | None] = {m["site"]: m.get("rmse") for m in store.latest_metrics() if m.get("model") == "federated"}
    names = list(sites) if sites else sorted(set(status) | set(last_update), key=natural_key)
    rows = []
    for site in names:
        s = status.get(site, {})
        rows.append(site_row(site, s, last_update.get(site), fed.get(site)))
    refusals: Counter[str] = Counter()
    last_refusal: dict[str, float] = {}
    refused_sites: dict[str, set[str]] = {}
    for r in store.rejections():
        refusals[r["reason"]] += refusals_in(r)
        last_refusal[r["reason"]] = max(last_refusal.get(r["reason"], 0.0), float(r["at"]))
        refused_sites.setdefault(r["reason"], set()).add(r["site"])
    last = rounds[-1] if rounds else None
    return {
        "at": now,
        "rounds": sum(1 for r in rounds if r["round"] > 0),  # round 0 is the initial model, not a round trained
        "last_round": None if last is None else {"round": last["round"], "model_version": last["model_version"], "closed": last["closed"],
                                                  "closed_by": last["closed_by"], "updates": len(last["participants"]),
                                                  "strategy": last["strategy"]},
        "sites_online": sum(1 for r in rows if r["online"]),
        "sites": rows,
        "refusals": [{"reason": reason, "count": n, "last": last_refusal[reason], "sites": sorted(refused_sites[reason], key=natural_key)}
                     for reason, n in refusals.most_common()],
    }


def ago(at: float | None, now: float) -> str:
    """'12 s ago', '5 min ago', '3 h ago', '2 d ago'; '-' for never."""
    if at is None:
        return "-"
    s = max(now - float(at), 0.0)
    for limit, unit, size in ((120, "s", 1), (7200, "min", 60), (172_800, "h", 3600)):
        if s < limit:
            return f"{s / size:.0f} {unit} ago"
    return f"{s / 86_400:.0f} d ago"


def _tables(status: dict[str, Any]) -> tuple[str, list[tuple[str, list[str], list[list[str]]]]]:
    """The headline and (title, columns, rows) of each table, as text cells."""
    now = status["at"]
    n = len(status["sites"])
    if status.get("source") == "broker":
        ann = status["announced"]
        headline = "live from the broker: " + ("no round announced" if ann is None else
                                               "all rounds done" if ann["done"] else
                                               f"round {ann['round']} open (from global v{ann['model_version']}, {ann['strategy']})")
    else:
        last = status["last_round"]
        headline = f"rounds closed: {status['rounds']}"
        if last:
            headline += (f" (last: round {last['round']}, global v{last['model_version']}, {last['updates']} update(s), "
                         f"closed by {last['closed_by']} {ago(last['closed'], now)}, {last['strategy']})")
    headline += f"; sites online: {status['sites_online']}/{n}"
    site_rows = []
    for r in status["sites"]:
        online = "never seen" if r["online"] is None else ("online" if r["online"] else "offline")
        upd = r["last_update"]
        update = "-" if upd is None else f"round {upd['round']}, {ago(upd['at'], now)}"
        rmse = "-" if r["federated_rmse"] is None else f"{r['federated_rmse']:.2f}"
        site_rows.append([r["site"], online, ago(r["status_at"], now), "-" if r["model_version"] is None else f"v{r['model_version']}",
                          "-" if r["samples"] is None else f"{r['samples']:,}", update, rmse])
    sites = ("sites", ["site", "status", "last seen", "model", "rows", "last update", "fed. RMSE"], site_rows)
    if status["refusals"] is None:  # live: refusals are the aggregator's, kept in the store
        return headline, [sites]
    refusal_rows = [[r["reason"], f"{r['count']:,}", ago(r["last"], now), ", ".join(r["sites"][:5]) + (" ..." if len(r["sites"]) > 5 else "")]
                    for r in status["refusals"]]
    refusals = ("refusals by reason", ["reason", "count", "last", "from"], refusal_rows)
    return headline, [sites, refusals]


def render_plain(status: dict[str, Any]) -> str:
    """Aligned text columns, for a log file or a terminal without rich."""
    headline, tables = _tables(status)
    out = [headline, "rows: labelled cycles in the site's training buffer; fed. RMSE: its federated model on its scored engines"]
    for title, columns, rows in tables:
        out.append("")
        out.append(f"{title}:" if rows else f"{title}: none")
        if not rows:
            continue
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
        out.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
        out.extend("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)
    return "\n".join(out)


def render_rich(status: dict[str, Any], file: Any) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file, highlight=False)
    headline, tables = _tables(status)
    console.print(headline)
    console.print("rows: labelled cycles in the site's training buffer; fed. RMSE: its federated model on its scored engines")
    for title, columns, rows in tables:
        if not rows:
            console.print(f"{title}: none")
            continue
        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for c in columns:
            table.add_column(c, justify="right" if c in ("rows", "count", "fed. RMSE") else "left", no_wrap=c != "from")
        for r in rows:
            table.add_row(*r)
        console.print(table)


def _open(args: argparse.Namespace) -> tuple[ResultsStore, list[str] | None, str]:
    """The store named by --store, else by --config's fleet.toml, else the demo's."""
    sites, influx = None, None
    where = getattr(args, "store", None)
    if getattr(args, "config", None):
        from turbofed.config import load_fleet_config

        config = load_fleet_config(args.config, keys=False)  # the store's name only: no signing keys needed
        sites, influx = list(config.sites), config.influx
        where = where or config.store
    where = where or DEFAULT_STORE
    text = str(where)
    if text != "influxdb" and "://" not in text and not Path(text).is_file():
        raise TurbofedError(f"results store {text} does not exist (give --store PATH or --config fleet.toml; "
                            f"the aggregator creates it)")
    return open_store(text, influx=influx), sites, text


def run_cli(args: argparse.Namespace) -> int:
    store, sites, where = _open(args)
    with store:
        status = fleet_status(store, sites)
    status["store"] = where
    return show(status, args)


def show(status: dict[str, Any], args: argparse.Namespace) -> int:
    """Print `status` as --json asks, with rich on a terminal, else as plain columns."""
    if getattr(args, "json_out", False):
        print(json.dumps(status, indent=2, default=str))
        return 0
    if sys.stdout.isatty():
        try:
            render_rich(status, sys.stdout)
            return 0
        except ImportError:  # rich is optional ([console])
            pass
    print(render_plain(status))  # a pipe or a log file: plain columns, never cut to a guessed width
    return 0
