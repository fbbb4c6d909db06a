"""Streaming aggregation (aggregator/streaming.py): the FedAvg family merges from running
sums folded in as updates arrive, and gets what merging the kept updates gets."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.inprocess import RecordingClient, config, save_versions
from turbofed import envelope
from turbofed.aggregator.service import Aggregator
from turbofed.aggregator.strategies import SiteUpdate, weighted_mean
from turbofed.aggregator.streaming import RunningSum
from turbofed.aggregator.weights import capped_weights
from turbofed.codec import flatten, read_weights, replace_weights
from turbofed.config import PrivacySettings, StrategySettings


def _updates(base: dict, n: int, seed: int) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    return {f"s{i}": {k: (v + rng.normal(0, 0.1, v.shape)).astype(v.dtype) for k, v in base.items()} for i in range(n)}


@pytest.mark.parametrize("share", [0.5, 0.2, 0.34, 1.0])
def test_running_sum_equals_the_mean_of_the_kept_updates_with_share_caps(share: float) -> None:
    base = {"w": np.zeros((20, 3), np.float32), "b": np.zeros(3, np.float32)}
    updates = _updates(base, 12, seed=1)
    rng = np.random.default_rng(2)
    claims = {s: int(rng.integers(10, 100)) for s in updates}
    claims["s3"], claims["s7"] = 5_000, 3_000  # heavy: the share cap lowers them
    running = RunningSum(base, share)
    for s, w in updates.items():
        running.add(s, w, claims[s])
    final = {s: w.used for s, w in capped_weights(claims, {}, share).items()}
    if share < 1.0:
        assert final["s3"] < claims["s3"]
    expected = weighted_mean([SiteUpdate(s, updates[s], final[s]) for s in updates])
    got, weight = running.mean(final)
    assert weight == sum(final.values())
    for k in base:
        np.testing.assert_allclose(got[k], expected[k], rtol=0, atol=1e-7)  # float32 weights
    assert running.norms["s0"] == pytest.approx(float(np.linalg.norm(flatten(updates["s0"], list(base)))))


def test_only_the_heaviest_updates_can_be_cut() -> None:
    base = {"w": np.zeros(4)}
    running = RunningSum(base, 0.5)  # keeps the 2 heaviest
    for i, w in enumerate((5, 50, 40, 1)):
        running.add(f"s{i}", {"w": np.full(4, float(i))}, w)
    with pytest.raises(ValueError, match="only the heaviest updates can be lowered"):
        running.mean({"s0": 4, "s1": 50, "s2": 40, "s3": 1})


def _aggregator(tmp_path: Path, sites: tuple[str, ...] | None = None, **fields: object) -> Aggregator:
    save_versions(tmp_path / "registry", range(1))
    cfg = config(tmp_path, strategy=StrategySettings("fedavg"), **fields)
    aggregator = Aggregator(replace(cfg, sites=sites) if sites else cfg)
    aggregator.client = RecordingClient()
    return aggregator


def _arrive(aggregator: Aggregator, updates: dict[str, dict], claims: dict[str, int]) -> None:
    number = aggregator.version + 1
    for site, weights in updates.items():
        body = replace_weights(aggregator.model, weights).SerializeToString()
        aggregator._on_update(site, envelope.encode(kind="update", site=site, round=number, model_version=aggregator.version,
                                                    samples=claims[site], body=body))


def test_a_streamed_round_keeps_sums_not_updates_and_merges_as_fedavg(tmp_path: Path) -> None:
    sites = tuple(f"site{i}" for i in range(1, 6))
    aggregator = _aggregator(tmp_path, sites=sites)
    try:
        base = read_weights(aggregator.model)
        updates = dict(zip(sites, _updates(base, 5, seed=3).values()))
        claims = {"site1": 100, "site2": 120, "site3": 90, "site4": 110, "site5": 5_000}  # site5 over half the round
        aggregator.open_round(1, 0.0).deadline = 1e12
        _arrive(aggregator, updates, claims)
        assert all(a.weights is None for a in aggregator.round.accepted.values())  # folded in, not kept
        aggregator._close_round("quorum")
        final = capped_weights(claims, {}, aggregator.config.max_site_share)
        expected = weighted_mean([SiteUpdate(s, updates[s], final[s].used) for s in sites])
        merged = read_weights(aggregator.model)
        for k in base:
            np.testing.assert_allclose(merged[k], expected[k], rtol=0, atol=1e-6)
        (row,) = [r for r in aggregator.store.rounds() if r["round"] == 1]
        parts = {p["site"]: p for p in row["participants"]}
        assert parts["site5"]["samples"] == final["site5"].used < 5_000 and "0.5 share of the round" in parts["site5"]["action"]
        assert parts["site1"]["action"] == "kept" and parts["site1"]["cosine"] is None and parts["site1"]["norm"] > 0
    finally:
        aggregator.store.close()
        aggregator.registry.close()


def test_central_dp_clips_each_delta_as_it_arrives(tmp_path: Path) -> None:
    privacy = PrivacySettings(clip_norm=0.5, noise_multiplier=1e-9, seed=0)
    aggregator = _aggregator(tmp_path, privacy=privacy)
    try:
        base = read_weights(aggregator.model)
        names = list(base)
        updates = {"site1": {k: v + 1.0 for k, v in base.items()}, "site2": {k: v + 0.001 for k, v in base.items()}}
        aggregator.open_round(1, 0.0).deadline = 1e12
        _arrive(aggregator, updates, {"site1": 10, "site2": 10})
        aggregator._close_round("quorum")
        start, merged = flatten(base, names), flatten(read_weights(aggregator.model), names)
        d1 = flatten(updates["site1"], names) - start
        d2 = flatten(updates["site2"], names) - start
        expected = start + (d1 * 0.5 / np.linalg.norm(d1) + d2) / 2  # site1 clipped to C = 0.5, site2 within it
        np.testing.assert_allclose(merged, expected, atol=1e-5)
        (row,) = [r for r in aggregator.store.rounds() if r["round"] == 1]
        assert {p["site"]: p["action"] for p in row["participants"]} == {"site1": "clipped", "site2": "kept"}
    finally:
        aggregator.store.close()
        aggregator.registry.close()
