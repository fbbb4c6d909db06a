"""The aggregator's secure rounds in process (no broker): the real service code, the real
site sessions (edge/secure.py) and real signed frames, routed by a test client that hands
each frame the aggregator publishes to the sites it is addressed to, as the broker would."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.inprocess import SETTINGS, SITES, save_versions
from tests.livefleet import site_identity
from turbofed.aggregator.rounds import Round
from turbofed.aggregator.secure import SecureCollection
from turbofed.aggregator.service import Aggregator
from turbofed.codec import flatten, read_weights
from turbofed.config import FleetConfig, PrivacySettings, SecureAggregationSettings, StrategySettings, load_fleet_config
from turbofed.edge.secure import SecureSessions
from turbofed.errors import ConfigError
from turbofed.messages import MessageError, RoundAnnouncement, StatsRequest, signed
from turbofed.messages.secure import SecureSum
from turbofed.refusals import Refusal
from turbofed.topics import Topics

FOUR = ("site1", "site2", "site3", "site4")


class Router:
    """Stands in for the broker between one aggregator and its sites' sessions: `silent`
    sites receive nothing from the phase named (they have dropped out)."""

    def __init__(self, topics: Topics) -> None:
        self.topics, self.sessions, self.globals = topics, {}, []
        self.silent: dict[str, str] = {}  # site -> the first frame kind it never answers

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> object:
        kinds = {self.topics.secagg_roster: "secagg_roster", self.topics.secagg_unmask: "secagg_unmask_request"}
        if topic in kinds:
            targets = [(s, kinds[topic]) for s in self.sessions]
        else:
            targets = [(s, "secagg_shares") for s in self.sessions if topic == self.topics.secagg_inbox(s)]
            if topic.endswith("/global"):
                self.globals.append(payload)
        order = ["secagg_roster", "secagg_shares", "secagg_unmask_request"]
        for site, kind in targets:
            if site in self.silent and order.index(kind) >= order.index(self.silent[site]):
                continue
            self.sessions[site].on_frame(kind, payload)
        return type("Info", (), {"wait_for_publish": lambda self, t=None: None})()


def _fleet(tmp_path: Path, pki: Path, sites: tuple[str, ...], **fields: object) -> Aggregator:
    save_versions(tmp_path / "registry", range(1))
    cfg = FleetConfig(sites=sites, store=str(tmp_path / "results.sqlite"), registry=str(tmp_path / "registry"), model=SETTINGS,
                      pki=str(pki), strategy=StrategySettings("fedavg"), **fields)
    aggregator = Aggregator(cfg)
    aggregator.client = Router(aggregator.topics)
    for site in sites:
        ident = site_identity(pki, site)
        sealer, verifier = signed.site_keys(site, ident.fleet_id, ident.signing_key, ident.aggregator_key)
        aggregator.client.sessions[site] = SecureSessions(
            site, sealer, verifier, lambda kind, frame, site=site: aggregator.inbox.put((aggregator.topics.site(site, kind), frame)))
    return aggregator


def _secure_round(aggregator: Aggregator, deltas: dict[str, np.ndarray], weights: dict[str, int]) -> None:
    """Round version+1: every site joins with its delta, then the aggregator drives the session."""
    number = aggregator.version + 1
    aggregator.round = Round(number, aggregator.version, "id", 0.0, 1e12, aggregator.config.sites, plain=False)
    spec = aggregator._round_sum()
    for site, delta in deltas.items():
        aggregator.client.sessions[site].join(spec, delta, weights[site], f"round {number}")
    aggregator._run_secure_round(number, threading.Event())


def _global(aggregator: Aggregator) -> np.ndarray:
    current = read_weights(aggregator.model)
    return flatten(current, list(current))


def test_secure_round_equals_plain_fedavg_to_fixed_point_precision(tmp_path: Path, pki_dir: Path) -> None:
    aggregator = _fleet(tmp_path, pki_dir, FOUR, secure_aggregation=SecureAggregationSettings(clip=4.0))
    start = _global(aggregator)
    rng = np.random.default_rng(0)
    deltas = {s: rng.normal(0, 0.3, start.size) for s in FOUR}
    weights = {"site1": 1, "site2": 7, "site3": 20, "site4": 64}
    _secure_round(aggregator, deltas, weights)
    assert aggregator.version == 1 and len(aggregator.client.globals) == 1
    plain = start + sum(weights[s] * deltas[s] for s in FOUR) / sum(weights.values())
    scale = aggregator.last_secure.spec.scale
    assert scale >= 2.0**16  # the finest scale 4 sites x weight 64 x clip 4 leave room for in 32 bits
    np.testing.assert_allclose(_global(aggregator), plain, rtol=0, atol=1.0 / scale + 1e-6)  # + float32 weights
    assert np.abs(_global(aggregator) - start).max() > 0.05  # the round did move the model
    (row,) = [r for r in aggregator.store.rounds() if r["round"] == 1]
    assert {p["action"] for p in row["participants"]} == {"secure-sum"}


def test_a_site_that_drops_after_sharing_is_recovered(tmp_path: Path, pki_dir: Path) -> None:
    aggregator = _fleet(tmp_path, pki_dir, FOUR, secure_aggregation=SecureAggregationSettings(phase_timeout_s=0.3))
    aggregator.client.silent["site3"] = "secagg_shares"  # shares sent, then gone before masking
    start = _global(aggregator)
    rng = np.random.default_rng(1)
    deltas = {s: rng.normal(0, 0.3, start.size) for s in FOUR}
    _secure_round(aggregator, deltas, dict.fromkeys(FOUR, 1))
    kept = [s for s in FOUR if s != "site3"]
    np.testing.assert_allclose(_global(aggregator), start + sum(deltas[s] for s in kept) / 3, atol=1e-4)
    (row,) = [r for r in aggregator.store.rounds() if r["round"] == 1]
    assert {p["site"]: p["action"] for p in row["participants"]}["site3"] == "dropped (masks removed)"


def test_too_few_sites_left_unmask_nothing_and_the_round_is_announced_again(tmp_path: Path, pki_dir: Path) -> None:
    aggregator = _fleet(tmp_path, pki_dir, FOUR, secure_aggregation=SecureAggregationSettings(phase_timeout_s=0.3),
                        stats_retry_s=0.01)
    for site in ("site2", "site3"):  # t = 3: two gone before masking leave two
        aggregator.client.silent[site] = "secagg_shares"
    rng = np.random.default_rng(2)
    _secure_round(aggregator, {s: rng.normal(0, 0.3, _global(aggregator).size) for s in FOUR}, dict.fromkeys(FOUR, 1))
    assert aggregator.version == 0 and aggregator.client.globals == []
    kinds = [e["kind"] for e in aggregator.store.events(50)]
    assert "secure_sum_aborted" in kinds and "round_empty" in kinds


def test_distributed_dp_over_the_secure_sum_tops_up_only_the_missing_noise(tmp_path: Path, pki_dir: Path) -> None:
    privacy = PrivacySettings(clip_norm=1.0, noise_multiplier=1.0, mode="distributed", seed=5)
    aggregator = _fleet(tmp_path, pki_dir, FOUR, secure_aggregation=SecureAggregationSettings(), privacy=privacy)
    spec_noise = aggregator.dp.site_noise()
    assert spec_noise.noise_std == pytest.approx(0.5)  # sigma C / sqrt(4)
    start = _global(aggregator)
    deltas = {s: np.full(start.size, 0.01 * (i + 1)) for i, s in enumerate(FOUR)}
    _secure_round(aggregator, deltas, dict.fromkeys(FOUR, 1))
    # All four expected sites answered: the aggregator adds no noise of its own.
    np.testing.assert_allclose(_global(aggregator), start + sum(deltas.values()) / 4, atol=1e-4)
    assert aggregator.dp.dp_rounds == 1
    assert aggregator.last_secure.spec.max_weight == 1  # every site weighs the same under DP


@pytest.mark.parametrize("strategy", ["median", "multi-krum", "filtered-fedavg", "trimmed-mean", "clipped-fedavg"])
def test_strategies_that_need_individual_updates_are_refused(tmp_path: Path, pki_dir: Path, strategy: str) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(f'sites = ["site1", "site2"]\nstore = "r.sqlite"\nregistry = "reg"\npki = "{pki_dir}"\n'
                    f'strategy = "{strategy}"\n[secure_aggregation]\n')
    with pytest.raises(ConfigError, match=rf"fleet.toml: \[secure_aggregation\]: strategy '{strategy}' needs every site's own update"):
        Aggregator(load_fleet_config(path), config_path=str(path))


@pytest.mark.parametrize(("table", "error"), [
    ("[secure_aggregation]\nthreshold = 1\n", r"\[secure_aggregation\] threshold must be 0 \(a majority\) or between 2"),
    ("[secure_aggregation]\nbits = 48\n", r"\[secure_aggregation\] bits"),
    ("[secure_aggregation]\nclip = 0\n", r"\[secure_aggregation\] clip"),
    ("[secure_aggregation]\nneighbours = 2\nthreshold = 4\n", r"threshold \(4\) counts within a neighbourhood"),
    ("[secure_aggregation]\n[privacy]\nclip_norm = 1\nnoise_multiplier = 1\n", r'needs \[privacy\] mode = "distributed"'),
])
def test_secure_aggregation_settings_are_checked_with_file_and_key(tmp_path: Path, pki_dir: Path, table: str, error: str) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(f'sites = ["site1", "site2", "site3", "site4"]\nstore = "r.sqlite"\nregistry = "reg"\npki = "{pki_dir}"\n{table}')
    with pytest.raises(ConfigError, match=error):
        load_fleet_config(path)


def test_secure_aggregation_defaults_to_fedavg_and_needs_the_identity_folder(tmp_path: Path, pki_dir: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(f'sites = ["site1", "site2"]\nstore = "r.sqlite"\nregistry = "reg"\npki = "{pki_dir}"\n[secure_aggregation]\n')
    assert load_fleet_config(path).strategy.name == "fedavg"
    path.write_text('sites = ["site1", "site2"]\nstore = "r.sqlite"\nregistry = "reg"\ninsecure_unsigned = true\n[secure_aggregation]\n')
    with pytest.raises(ConfigError, match=r"\[secure_aggregation\] needs the fleet's identity folder"):
        load_fleet_config(path)


def test_a_plain_update_or_statistics_in_the_clear_are_refused_under_secure_aggregation(tmp_path: Path, pki_dir: Path) -> None:
    from turbofed import envelope  # noqa: PLC0415

    aggregator = _fleet(tmp_path, pki_dir, SITES, secure_aggregation=SecureAggregationSettings())
    aggregator.round = Round(1, 0, "id", 0.0, 1e12, SITES, plain=False)
    ident = site_identity(pki_dir, "site1")
    sealer, _ = signed.site_keys("site1", ident.fleet_id, ident.signing_key, ident.aggregator_key)
    update = sealer.envelope(kind="update", round=1, model_version=0, samples=10, body=aggregator.model.SerializeToString())
    aggregator.inbox.put((aggregator.topics.update("site1"), update))
    aggregator.inbox.put((aggregator.topics.stats("site1"), sealer.seal(signed.STATS, json.dumps({"x": 1}).encode())))
    aggregator.pump(0.1)
    aggregator.pump(0.1)
    assert aggregator.counters["bad_kind"] == 2 and aggregator.round.accepted == {}
    assert envelope.decode(update).kind == "update"


def _announced(aggregator: Aggregator) -> SecureSum:
    aggregator.round = Round(1, 0, "id", 0.0, 1e12, aggregator.config.sites, plain=False)
    return aggregator._round_sum()


def test_the_session_travels_in_the_signed_announcement_and_is_checked(tmp_path: Path, pki_dir: Path) -> None:
    aggregator = _fleet(tmp_path, pki_dir, FOUR, secure_aggregation=SecureAggregationSettings())
    spec = _announced(aggregator)
    ann = RoundAnnouncement(1, announce_id="a", model_version=0, deadline=1.0, settings=SETTINGS, secagg=spec)
    assert RoundAnnouncement.from_payload(ann.to_payload()).secagg == spec
    assert spec.ids == (("site1", 1), ("site2", 2), ("site3", 3), ("site4", 4)) and spec.threshold == 3
    assert spec.params().quantizer.scale >= 2.0**16
    too_fine = {**spec.to_dict(), "scale": spec.scale * 4}  # 4 sites x 64 x 4 x scale no longer fits 32 bits
    with pytest.raises(MessageError, match="does not fit 32-bit signed sums") as info:
        SecureSum.from_dict(too_fine, "round announcement secagg")
    assert info.value.reason is Refusal.BAD_ROUND
    twins = {**spec.to_dict(), "ids": {"site1": 1, "site2": 1}}
    with pytest.raises(MessageError, match="two sites share an id"):
        SecureSum.from_dict(twins, "round announcement secagg")


_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=12)
_FIELDS = ("session", "threshold", "dim", "ids", "bits", "scale", "clip", "max_weight", "neighbours", "weight_unit")


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(_FIELDS), _json, max_size=10), st.booleans())
def test_any_secagg_field_parses_or_is_refused_with_a_reason(fields: dict, base: bool) -> None:
    good = {"session": 7, "threshold": 2, "dim": 10, "ids": {"a": 1, "b": 2}, "bits": 32, "scale": 256.0, "clip": 1.0,
            "max_weight": 1}
    value = {**good, **fields} if base else fields
    try:
        parsed = SecureSum.from_dict(value, "secagg")
    except MessageError as exc:
        assert exc.reason is Refusal.BAD_ROUND and "\n" not in str(exc)
    else:
        assert SecureSum.from_dict(parsed.to_dict(), "secagg") == parsed


class Bus:
    """Stands in for the broker between an aggregator and in-process agents: site topics go
    to the aggregator's inbox, everything else to the agents that route it; `deaf` agents
    receive nothing (they have dropped out)."""

    def __init__(self, aggregator: Aggregator, agents: list) -> None:
        self.aggregator, self.agents, self.deaf = aggregator, agents, set()
        self.on_publish = None

    def is_connected(self) -> bool:
        return True

    def publish(self, topic: str, payload: bytes = b"", qos: int = 0, retain: bool = False) -> object:
        if topic.startswith(self.aggregator.topics.root + "/sites/"):
            self.aggregator.inbox.put((topic, payload))
        else:
            for agent in self.agents:
                if agent.site not in self.deaf and payload:
                    agent.handle(topic, payload)
        return type("Info", (), {"mid": 1, "rc": 0, "wait_for_publish": lambda self, t=None: None})()


def test_statistics_through_the_secure_sum_are_unmasked_for_one_set_of_sites_only(tmp_path: Path, pki_dir: Path) -> None:
    from turbofed.config import SiteConfig  # noqa: PLC0415
    from turbofed.data.synthetic import generate_fleet  # noqa: PLC0415
    from turbofed.edge.agent import EdgeAgent  # noqa: PLC0415
    from turbofed.spec import FleetStats  # noqa: PLC0415

    sites = ("site1", "site2", "site3")
    cfg = FleetConfig(sites=sites, store=str(tmp_path / "results.sqlite"), registry=str(tmp_path / "registry"), model=SETTINGS,
                      pki=str(pki_dir), strategy=StrategySettings("fedavg"), min_samples=50, stats_retry_s=0.01,
                      secure_aggregation=SecureAggregationSettings(threshold=2, phase_timeout_s=0.3))
    aggregator = Aggregator(cfg)
    runs = generate_fleet(n_train=6, n_test=0, seed=4, name="SYN001").train
    agents = []
    for i, site in enumerate(sites):
        agent = EdgeAgent(SiteConfig(site=site, state_dir=str(tmp_path / site), identity=site_identity(pki_dir, site),
                                     min_samples=50, min_stats_engines=2))
        for j, run in enumerate(runs[2 * i:2 * i + 2]):
            agent.buffer.add(f"e{j}", run.cycles.copy(), run.sensors.copy(), run.rul().astype(float))
        agents.append(agent)
    aggregator.client = bus = Bus(aggregator, agents)
    for agent in agents:
        agent.client = bus
    expected = sum((a.buffer.stats(SETTINGS.window) for a in agents), FleetStats())

    aggregator._collect_secure_stats(threading.Event())
    assert aggregator.stats.count == expected.count
    np.testing.assert_allclose(aggregator.stats.to_vector(), expected.to_vector(), rtol=1e-12, atol=1e-3)
    assert aggregator.stats_replies == {} and all(a.stats_answer["survivors"] == [1, 2, 3] for a in agents)

    # A second session for the same spec over fewer sites would give site3's statistics away
    # (the difference of the two sums): the others join it, but refuse to unmask it.
    bus.deaf.add("site3")
    aggregator.stats = None
    spec = aggregator._new_session(FleetStats(window=SETTINGS.window).to_vector().size, 2.0**46, 64, 1)
    aggregator.secure = SecureCollection(spec, 0.3, aggregator.sealer, aggregator.verifier, aggregator.topics,
                                         aggregator._publish_secure)
    request = StatsRequest("again", 50, SETTINGS.window, secagg=spec)
    bus.publish(aggregator.topics.stats_request, aggregator.sealer.seal(signed.STATS_REQUEST, request.to_payload()))
    result, why = aggregator._secure_result(threading.Event(), lambda: "quorum" if len(aggregator.secure.keyed()) == 2 else None)
    assert result is None and why == "secure sum aborted in phase unmask"
    assert [a.counters["rejected.stats_repeated"] for a in agents] == [1, 1, 0]
