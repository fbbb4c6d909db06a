"""Robust strategies against small examples worked out by hand, and their per-site reports."""

from __future__ import annotations

import numpy as np
import pytest

from turbofed.aggregator.robust import ClippedFedAvg, FilteredFedAvg, Median, MultiKrum, TrimmedMean, capped_shares
from turbofed.aggregator.strategies import FedAvg, SiteUpdate, make_strategy

CURRENT = {"w": np.array([1.0, 1.0], dtype=np.float32), "b": np.array([0.0], dtype=np.float32)}


def updates(deltas: list[list[float]], samples: list[int] | None = None) -> list[SiteUpdate]:
    """Sites whose update is CURRENT + delta; delta = [w0, w1, b]."""
    samples = samples or [10] * len(deltas)
    return [SiteUpdate(f"site{i + 1}", {"w": CURRENT["w"] + np.array(d[:2], dtype=np.float32),
                                        "b": CURRENT["b"] + np.array(d[2:], dtype=np.float32)}, s)
            for i, (d, s) in enumerate(zip(deltas, samples))]


HONEST = [[1.0, 0.0, 1.0], [2.0, 1.0, 0.0], [3.0, -1.0, 2.0], [1.5, 0.5, 1.0]]
ATTACK = [[1000.0, -1000.0, 1000.0]]


def test_median_per_coordinate() -> None:
    s = Median()
    out = s.aggregate(CURRENT, updates(HONEST + ATTACK))
    # w0: median of 1, 2, 3, 1.5, 1000 = 2; w1: of 0, 1, -1, .5, -1000 = 0; b: of 1, 0, 2, 1, 1000 = 1
    assert out["w"].tolist() == [3.0, 1.0] and out["b"].tolist() == [1.0]
    assert s.last_report["site5"]["action"] == "trimmed"


@pytest.mark.parametrize("strategy", [Median(), TrimmedMean(beta=0.2)])
def test_coordinate_wise_reports_name_the_site_that_pushes_one_way(strategy) -> None:
    """In a real model (thousands of weights) an honest site is at an end of the ranking in a
    minority of coordinates; a scaled attacker in nearly all of them."""
    rng = np.random.default_rng(0)
    current = {"w": np.zeros(2000, dtype=np.float32)}
    honest = [SiteUpdate(f"site{i}", {"w": rng.normal(0, 1, 2000).astype(np.float32)}, 10) for i in range(1, 5)]
    attacker = SiteUpdate("site5", {"w": (1000 * np.abs(rng.normal(0, 1, 2000))).astype(np.float32)}, 10)
    strategy.aggregate(current, honest + [attacker])
    assert {s: r["action"] for s, r in strategy.last_report.items()} == {
        "site1": "kept", "site2": "kept", "site3": "kept", "site4": "kept", "site5": "trimmed"}
    assert strategy.last_report["site5"]["norm"] > 100 * strategy.last_report["site1"]["norm"]


def test_trimmed_mean_drops_beta_at_each_end() -> None:
    s = TrimmedMean(beta=0.2)  # 5 sites: one value dropped at each end of every coordinate
    out = s.aggregate(CURRENT, updates(HONEST + ATTACK))
    # w0 sorted 1, 1.5, 2, 3, 1000 -> mean(1.5, 2, 3) = 6.5/3; w1 sorted -1000, -1, 0, .5, 1 -> mean(-1, 0, .5) = -0.5/3
    assert out["w"] == pytest.approx(np.array([1 + 6.5 / 3, 1 - 0.5 / 3], dtype=np.float32))
    assert out["b"] == pytest.approx([(1 + 1 + 2) / 3])
    assert s.last_report["site5"]["action"] == "trimmed"


def test_multi_krum_excludes_the_outlier() -> None:
    s = MultiKrum(f=1)
    out = s.aggregate(CURRENT, updates(HONEST + ATTACK))
    mean = np.mean(HONEST, axis=0)  # m = n - f = 4: the four honest deltas
    assert out["w"] == pytest.approx((CURRENT["w"] + mean[:2]).astype(np.float32))
    assert out["b"] == pytest.approx(mean[2:])
    assert [s.last_report[f"site{i}"]["action"] for i in range(1, 6)] == ["kept"] * 4 + ["excluded"]


def test_filtered_fedavg_excludes_the_far_update_and_averages_the_rest() -> None:
    s = FilteredFedAvg(radius=3.0)
    out = s.aggregate(CURRENT, updates(HONEST + ATTACK, samples=[10, 10, 10, 10, 2**53]))
    # Centre (coordinate-wise median) = [2, 0, 1]; honest distances sqrt(1+0+0)=1, sqrt(0+1+1)=1.414,
    # sqrt(1+1+1)=1.732, sqrt(.25+.25+0)=0.707, the attacker's ~1732: median 1.414, bound 4.24.
    # The attacker is excluded (its 2^53 samples with it); the honest four are within the bound
    # and averaged with equal shares.
    mean = np.mean(HONEST, axis=0)
    assert out["w"] == pytest.approx((CURRENT["w"] + mean[:2]).astype(np.float32))
    assert out["b"] == pytest.approx(mean[2:])
    assert [s.last_report[f"site{i}"]["action"] for i in range(1, 6)] == ["kept"] * 4 + ["excluded"]


def test_filtered_fedavg_is_fedavg_when_nobody_is_far() -> None:
    ups = updates(HONEST, samples=[10, 20, 30, 40])
    out = FilteredFedAvg().aggregate(CURRENT, ups)
    plain = FedAvg().aggregate(CURRENT, ups)
    assert out["w"] == pytest.approx(plain["w"]) and out["b"] == pytest.approx(plain["b"])


def test_filtered_fedavg_never_excludes_half_the_sites() -> None:
    """Four sites, two far in opposite directions: distances to the centre [0, 0, 0] are
    0, 0, 10, 10 (median 5, bound 1.5 x 5 = 7.5). Only a minority, (4 - 1) // 2 = 1 site,
    may be excluded; the other far one is clipped back to distance 7.5."""
    s = FilteredFedAvg(radius=1.5)
    out = s.aggregate(CURRENT, updates([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [-10.0, 0.0, 0.0]]))
    assert [s.last_report[f"site{i}"]["action"] for i in range(1, 5)] == ["kept", "kept", "excluded", "clipped"]
    assert out["w"] == pytest.approx([1 - 7.5 / 3, 1.0])  # mean of 0, 0, -7.5 added to w0


def test_clipped_fedavg_bounds_norms_and_shares() -> None:
    s = ClippedFedAvg(clip=1.0, max_share=0.5)
    # Two sites: deltas of norm 1 and 3 (median 2): the long one is cut to norm 2.
    ups = updates([[1.0, 0.0, 0.0], [3.0, 0.0, 0.0]], samples=[10, 10])
    out = s.aggregate(CURRENT, ups)
    assert out["w"] == pytest.approx([1 + (1 + 2) / 2, 1.0])
    assert [s.last_report[u.site]["action"] for u in ups] == ["kept", "clipped"]
    assert s.last_report["site2"]["norm"] == pytest.approx(3.0)


def test_inflated_sample_count_buys_nothing_beyond_the_cap() -> None:
    shares = capped_shares(np.array([10.0, 10.0, 10.0, 2.0**53]), max_share=0.4)
    assert shares.sum() == pytest.approx(1.0) and shares.max() == pytest.approx(0.4)
    assert shares[:3] == pytest.approx([0.2, 0.2, 0.2])
    assert capped_shares(np.array([0.0, 0.0]), 0.5).tolist() == [0.5, 0.5]


def test_without_attack_robust_strategies_agree_with_fedavg_on_identical_updates() -> None:
    same = updates([[1.0, 2.0, 3.0]] * 5)
    reference = FedAvg().aggregate(CURRENT, same)
    for s in (Median(), TrimmedMean(), MultiKrum(), ClippedFedAvg()):
        out = s.aggregate(CURRENT, same)
        assert all(np.allclose(out[n], reference[n]) for n in CURRENT), s.name
        assert all(r["cosine"] == pytest.approx(1.0) for r in s.last_report.values()), s.name


def test_fedavg_is_wrecked_by_the_same_attack() -> None:
    """The contrast the robust strategies exist for: one scaled update moves FedAvg by ~200 per weight."""
    out = FedAvg().aggregate(CURRENT, updates(HONEST + ATTACK))
    assert abs(float(out["w"][0]) - 1.0) > 100


@pytest.mark.parametrize("name, params", [("median", {}), ("trimmed-mean", {"beta": 0.1}),
                                          ("multi-krum", {"f": 2, "m": 3}), ("clipped-fedavg", {"clip": 1.5})])
def test_configured_by_name_from_the_strategy_table(name: str, params: dict) -> None:
    s = make_strategy(name, params, "fleet.toml: [strategy]")
    assert s.name == name and {k: s.parameters()[k] for k in params} == params


def test_little_is_enough_z_follows_the_paper() -> None:
    """Baruch et al. 2019, section 3: s = floor(n/2 + 1) - m, z = Phi^-1((n - s) / n)."""
    from statistics import NormalDist

    from turbofed.benchmarks.attack import little_is_enough_z

    assert little_is_enough_z(50, 24) == pytest.approx(NormalDist().inv_cdf(48 / 50))
    assert little_is_enough_z(5, 1) == pytest.approx(NormalDist().inv_cdf(3 / 5))


@pytest.mark.slow
def test_attack_bench_shows_fedavg_collapse_and_median_holding() -> None:
    """A short run of `turbofed bench attack` on the synthetic fleet: one of five sites scales
    its weights by 1000; FedAvg's RMSE explodes, the median's stays near its clean figure."""
    from turbofed.benchmarks.attack import format_table, run_attack
    from turbofed.config import ModelSettings

    result = run_attack("SYN", None, 5, 1, ["none", "scale"], ["fedavg", "median"], ModelSettings(rounds=4))
    assert result["malicious"] == ["site5"] and result["eval"].startswith("validation")
    assert result["attacked_over_clean"]["fedavg"]["scale"] > 100
    assert result["attacked_over_clean"]["median"]["scale"] < 1.25
    assert "| median |" in format_table(result)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_norm_clipping_in_front_of_the_server_optimisers(name: str) -> None:
    """Deltas of norm 1, 1 and 100 (median 1), clip 2: the long one is cut to norm 2 before
    the mean, so the mean delta is (1 + 1 + 2) / 3 along w0; momentum 0 / lr 1 makes FedAvgM
    plain averaging, and FedAdam's first step moves every weight by about server_lr in the
    mean delta's direction."""
    params = {"fedavgm": {"server_lr": 1.0, "momentum": 0.0, "clip": 2.0}, "fedadam": {"server_lr": 0.1, "clip": 2.0}}[name]
    s = make_strategy(name, params)
    out = s.aggregate(CURRENT, updates([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [100.0, 0.0, 0.0]]))
    assert [s.last_report[f"site{i}"]["action"] for i in (1, 2, 3)] == ["kept", "kept", "clipped"]
    if name == "fedavgm":
        assert out["w"] == pytest.approx([1 + 4 / 3, 1.0])
    else:
        assert out["w"][0] == pytest.approx(1 + 0.1, rel=1e-3) and out["w"][1] == pytest.approx(1.0)
    unclipped = make_strategy(name, {**params, "clip": 0.0}).aggregate(CURRENT, updates([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [100.0, 0.0, 0.0]]))
    if name == "fedavgm":
        assert unclipped["w"] == pytest.approx([1 + 102 / 3, 1.0])
