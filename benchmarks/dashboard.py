"""How long each dashboard page waits on the results store, on a realistic fleet.

Builds a seeded store (default 100 engines x 300 cycles x 2 models of predictions, plus
truth, rounds, metrics, status, rejections and events) through the store's record_* methods,
then times, per page, exactly the reads the page makes when it loads (`views.PAGE_READS`,
plus the `counts()` every page makes) and, separately, those reads plus the page's table and
economics computations (everything but drawing). Goal: the slowest page's queries < 1 s.

    python -m turbofed.benchmarks.dashboard [--engines 100 --cycles 300 --repeats 5 --json out.json]

Prints JSON: machine, settings and seed next to the figures (seconds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from turbofed.benchmarks import machine_info
from turbofed.dashboard import economics, views
from turbofed.dashboard.samples import write_big_store
from turbofed.store import ResultsStore, open_store
from turbofed.store.sqlite import SqliteStore

GOAL_S = 1.0


def _compute_fleet(data: dict[str, Any]) -> None:
    fleet = views.fleet_table(data["latest_predictions"], 20, 50)
    views.site_table(data["site_status"], fleet)
    views.urgency_counts(fleet)


def _compute_federated(data: dict[str, Any]) -> None:
    views.round_metrics(data["metrics"])
    views.fleet_rmse(views.final_comparison(data["latest_metrics"]))
    views.engine_options(data["latest_predictions"])
    views.trajectory_long(data["trajectory"])
    views.trajectory_errors(data["trajectory"])


def _compute_rounds(data: dict[str, Any]) -> None:
    views.rounds_table(data["rounds"], data["rejections"])
    views.participants_table(data["rounds"])
    views.rejections_table(data["rejections"])
    views.rejection_reasons(data["rejections"])
    views.events_table(data["events"])


def _compute_economics(data: dict[str, Any]) -> None:
    lives = economics.engine_lives(data["engines_with_truth"], include_revealed=True)
    failed = [e for e in lives if e.observed_to_failure]
    economics.compare_policies(failed, 30, 150, economics.Costs())
    economics.cost_sweep(failed, np.arange(0, 126, 5), economics.Costs())
    economics.engine_detail(failed, 30, 150)


COMPUTE: dict[str, Callable[[dict[str, Any]], None]] = {
    "Fleet": _compute_fleet, "Federated vs local": _compute_federated,
    "Rounds": _compute_rounds, "Maintenance economics": _compute_economics,
}


def _time(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
    """First (cold) call, then median and max over `repeats` calls."""
    runs = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    first, rest = runs[0], runs[1:]
    return {"first_s": round(first, 4), "median_s": round(statistics.median(rest), 4), "max_s": round(max(rest), 4)}


def bench_pages(store: ResultsStore, repeats: int) -> dict[str, dict[str, Any]]:
    """Per page: its store reads alone, and its reads plus computation."""
    out: dict[str, dict[str, Any]] = {}
    for page, read in views.PAGE_READS.items():
        def queries() -> dict[str, Any]:
            store.counts()
            return read(store)

        def page_total() -> None:
            COMPUTE[page](queries())

        q = _time(queries, repeats)
        out[page] = {"queries": q, "queries_and_compute": _time(page_total, repeats)}
    return out


def run(engines: int, cycles: int, sites: int, rounds: int, seed: int, repeats: int,
        store_path: Path | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = store_path or Path(tmp) / "bench.sqlite"
        if path.exists():
            raise SystemExit(f"{path} exists: give a new file")
        t = time.perf_counter()
        with SqliteStore(path) as store:
            counts = write_big_store(store, engines=engines, cycles=cycles, sites=sites, rounds=rounds, seed=seed)
        build_s = time.perf_counter() - t
        with open_store(path) as store:  # a fresh connection, as the dashboard's process would have
            pages = bench_pages(store, repeats)
        size = sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))
    slowest = max(pages, key=lambda p: pages[p]["queries"]["median_s"])
    worst_q = max(max(p["queries"]["first_s"], p["queries"]["max_s"]) for p in pages.values())
    return {
        "benchmark": "dashboard page queries",
        "machine": machine_info("streamlit"),
        "settings": {"engines": engines, "cycles": cycles, "models": 2, "sites": sites, "rounds": rounds,
                     "repeats": repeats, "store": "sqlite"},
        "seed": seed,
        "store_rows": counts,
        "store_bytes": size,
        "build_s": round(build_s, 3),
        "pages": pages,
        "slowest_page": slowest,
        "slowest_queries_median_s": pages[slowest]["queries"]["median_s"],
        "worst_queries_any_run_s": round(worst_q, 4),
        "goal_s": GOAL_S,
        "goal_met": worst_q < GOAL_S,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", type=int, default=100)
    parser.add_argument("--cycles", type=int, default=300)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--store", type=Path, help="keep the built store at this (new) path")
    parser.add_argument("--json", dest="json_out", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    result = run(args.engines, args.cycles, args.sites, args.rounds, args.seed, args.repeats, args.store)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    return 0 if result["goal_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
