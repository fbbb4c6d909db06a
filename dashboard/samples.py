"""Sample results stores: a small one with hand-checkable values, and a big seeded one.

The small store backs the dashboard's tests (AppTest and browser) and lets anyone try the
dashboard without running the demo; the big one is the benchmark's fleet (100 engines x
300 cycles x 2 models by default). Both are written only through the store's record_*
methods, exactly as the aggregator's recorder would.

    python -m turbofed.dashboard.samples results.sqlite            # the small store
    python -m turbofed.dashboard.samples big.sqlite --engines 100  # the benchmark's fleet
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from turbofed.store import ResultsStore, open_store

T0 = 1_700_000_000.0  # timestamps of the small store: T0 + seconds


def write_small_store(store: ResultsStore, t0: float = T0) -> None:
    """Two sites, six engines, four rounds, with values small enough to check by hand.

    Engines (failure cycle F = truth cycle + true RUL there):
      s1/e1 failed at 10: local 12 - c, federated 10 - c (cycles 1..10)
      s1/e2 failed at 6:  local 20 flat, federated 6 - c  (cycles 1..6)
      s1/e3 no truth:     cycles 1..3, local 50, 48, 45; federated 60, 55, 40
      s1/e4 no truth:     cycles 1..2, local 16, 15; no federated prediction
      s2/e1 RUL 7 revealed at cycle 5 (F = 12): local -, 9, 8, 2, 1; federated 12 - c
      s2/e2 no truth:     cycles 1..4, local 100 - c*2.5, federated 90 - c*2.5
    """
    store.record_event("started", {"strategy": "fedavg"}, t0)
    store.record_status("s1", True, t0 + 100, "0.1.0", 3, 1200)
    store.record_status("s2", True, t0 + 50, "0.1.0", 2, 800)
    store.record_status("s2", False, t0 + 200, None, None, None)  # its last will

    for r, (started, sites) in enumerate([(10, ["s1", "s2"]), (30, ["s1", "s2"]), (50, ["s1"]), (70, ["s1", "s2"])]):
        parts = [{"site": s, "samples": 100 * (r + 1) * (2 if s == "s1" else 1), "update_bytes": 5000 + 10 * r}
                 for s in sites]
        store.record_round(r, r, t0 + started, t0 + started + 8, parts, 12.5 + r, "fedavg",
                           "quorum" if len(sites) == 2 else "deadline")
        store.record_event("round announced", {"round": r}, t0 + started)
    store.record_rejection(2, "s2", "hash", "sha256 mismatch", t0 + 55)
    store.record_rejection(None, "s1", "wrong_sender", "metrics name site 's9' on 's1''s topic", t0 + 20)

    store.record_metrics("s1", -1, None, {"engines": 1, "local": {"rmse": 40.0, "score": 900.0},
                                          "federated": {"rmse": 40.0, "score": 900.0}}, t0 + 5)
    store.record_metrics("s1", 1, 1, {"engines": 2, "local": {"rmse": 30.0, "score": 500.0},
                                      "federated": {"rmse": 25.0, "score": 300.0}}, t0 + 35)
    store.record_metrics("s1", 1, 1, {"engines": 3, "local": {"rmse": 28.0, "score": 450.0},
                                      "federated": {"rmse": 22.0, "score": 250.0}}, t0 + 36)
    store.record_metrics("s1", 3, 3, {"engines": 4, "local": {"rmse": 20.0, "score": 200.0},
                                      "federated": {"rmse": 15.5, "score": 120.0}}, t0 + 80)
    store.record_metrics("s2", 3, 3, {"engines": 2, "local": {"rmse": 18.0, "score": 150.0},
                                      "federated": {"rmse": 19.0, "score": 160.0}}, t0 + 81)

    s1 = [("e1", c, 12.0 - c, 10.0 - c) for c in range(1, 11)]
    s1 += [("e2", c, 20.0, 6.0 - c) for c in range(1, 7)]
    # e3's readings leave the federated model's training range at its latest cycle (agents that say: a 7th value)
    s1 += [("e3", 1, 50.0, 60.0, None, None, ()), ("e3", 2, 48.0, 55.0, None, None, ()), ("e3", 3, 45.0, 40.0, None, None, ("federated",))]
    s1 += [("e4", 1, 16.0, None), ("e4", 2, 15.0, None)]
    store.record_predictions("s1", s1, t0 + 90)
    s2_local = [None, 9.0, 8.0, 2.0, 1.0]
    s2 = [("e1", c, s2_local[c - 1], 12.0 - c) for c in range(1, 6)]
    s2 += [("e2", c, 100.0 - 2.5 * c, 90.0 - 2.5 * c, None, None, ()) for c in range(1, 5)]
    store.record_predictions("s2", s2, t0 + 95)
    store.record_truth("s1", "e1", 10, 0.0, t0 + 91)
    store.record_truth("s1", "e2", 6, 0.0, t0 + 92)
    store.record_truth("s2", "e1", 5, 7.0, t0 + 96)


def write_big_store(store: ResultsStore, engines: int = 100, cycles: int = 300, sites: int = 4,
                    rounds: int = 20, seed: int = 0, t0: float = T0) -> dict[str, int]:
    """A seeded fleet: every engine predicted by both models at every cycle; half the engines
    run to failure at their last cycle, the other half have their RUL revealed there; metrics
    from every site several times per round; a few rejections. Returns the row counts."""
    rng = np.random.default_rng(seed)
    site_names = [f"site-{i + 1}" for i in range(sites)]
    for i, site in enumerate(site_names):
        store.record_status(site, True, t0 + i, "0.1.0", rounds, int(rng.integers(5_000, 20_000)))
    for r in range(rounds):
        parts = [{"site": s, "samples": int(rng.integers(1_000, 5_000)), "update_bytes": 48_000} for s in site_names]
        store.record_round(r, r, t0 + 60 * r, t0 + 60 * r + 30, parts, float(rng.uniform(5, 50)), "fedavg", "quorum")
        store.record_event("round announced", {"round": r}, t0 + 60 * r)
        if r % 5 == 4:
            store.record_rejection(r, site_names[r % sites], "stale_round", f"round {r - 1} closed", t0 + 60 * r + 5)
        for site in site_names:
            for report in range(3):
                local = 40.0 - r * 0.8 + float(rng.normal(0, 1))
                fed = 40.0 - r * 1.2 + float(rng.normal(0, 1))
                store.record_metrics(site, r, r, {"engines": 10 + report, "local": {"rmse": local, "score": local * 30},
                                                  "federated": {"rmse": fed, "score": fed * 25}},
                                     t0 + 60 * r + 40 + report)
    cycle = np.arange(1, cycles + 1)
    for e in range(engines):
        site = site_names[e % sites]
        failed = e % 2 == 0
        final_rul = 0.0 if failed else float(rng.integers(10, 100))
        true = np.minimum(final_rul + (cycles - cycle), 125.0)
        local = np.maximum(true + rng.normal(0, 20, cycles), 0.0)
        fed = np.maximum(true + rng.normal(0, 12, cycles), 0.0)
        name = f"engine-{e + 1}"
        store.record_predictions(site, [(name, int(c), float(lo), float(fe)) for c, lo, fe in zip(cycle, local, fed)],
                                 t0 + 2_000 + e)
        store.record_truth(site, name, cycles, final_rul, t0 + 2_000 + e)
    return store.counts()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="store file to create (must not exist)")
    parser.add_argument("--engines", type=int, default=0, help="write the big seeded fleet with this many engines")
    parser.add_argument("--cycles", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if Path(args.out).exists():
        parser.error(f"{args.out} exists: give a new file")
    with open_store(args.out) as store:
        if args.engines:
            write_big_store(store, engines=args.engines, cycles=args.cycles, seed=args.seed)
        else:
            write_small_store(store)
        print(store.counts())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
