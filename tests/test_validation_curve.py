"""Per-round validation metrics (issue #17): a site holds a share of its failed engines out
of training (`holdout_share`, the engines that also calibrate the conformal intervals), scores the local and the federated model on them as each round's global model
arrives, and the aggregator stores one row per site, round and model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.inprocess import RecordingClient, config, save_versions
from turbofed.aggregator.service import Aggregator
from turbofed.config import SiteConfig
from turbofed.edge.agent import EdgeAgent
from turbofed.edge.buffer import TrainingBuffer, is_held_out
from turbofed.errors import Refused
from turbofed.messages import MessageError, Metrics, ModelScore
from turbofed.spec import FeatureSpec


def test_buffer_samples_whole_engines_with_their_settings(tmp_path: Path) -> None:
    """Validation takes engines in name order, scoring the first failed; both whole engines up
    to about max_rows (at least one); an engine dropped on overflow takes its settings along,
    and a saved buffer loads the same."""
    spec = FeatureSpec((0, 1), 30, (0.5,) * 9, (2.0,) * 9)
    buf = TrainingBuffer(max_rows=150)
    for k, n in ((10, 40), (2, 50), (3, 60), (1, 30)):  # failure order; 180 rows: the first (e10) is dropped
        buf.add(f"e{k}", np.arange(1, n + 1), np.full((n, 21), float(k)), 1000.0 * k + np.arange(n)[::-1], np.full((n, 3), float(k)))
    assert [(e.name, e.settings[0, 0]) for e in buf.engines] == [("e2", 2.0), ("e3", 3.0), ("e1", 1.0)] and buf.dropped_engines == 1

    def engines(y: np.ndarray) -> list[int]:
        return list(dict.fromkeys((y // 1000).astype(int).tolist()))

    assert engines(buf.validation_rows(spec, 90)[1]) == [1, 2] and buf.validation_rows(spec, 90)[2] == 2  # 30 + 50 rows
    assert engines(buf.scoring_rows(spec, 90)[1]) == [2]  # 50, and 60 more would pass 90
    assert engines(buf.scoring_rows(spec, 10)[1]) == [2] and buf.validation_rows(spec, 10)[2] == 1  # at least one engine
    buf.save(tmp_path / "buffer.npz")
    again = TrainingBuffer.load(tmp_path / "buffer.npz", 150)
    assert [(e.name, e.settings[0, 0], len(e.cycles)) for e in again.engines] == [(e.name, e.settings[0, 0], len(e.cycles)) for e in buf.engines]
    np.testing.assert_array_equal(again.training_rows(spec)[0], buf.training_rows(spec)[0])


def test_held_out_engines_are_a_stable_share_by_site_and_engine() -> None:
    names = [f"FD001-train-{k}" for k in range(1, 2001)]
    held = [n for n in names if is_held_out("site1", n, 0.2)]
    assert 0.17 * len(names) < len(held) < 0.23 * len(names)  # about the share asked for
    assert held == [n for n in names if is_held_out("site1", n, 0.2)]  # the same choice every time (restarts)
    assert not any(is_held_out("site1", n, 0.0) for n in names)
    assert set(held) <= {n for n in names if is_held_out("site1", n, 0.4)}  # a larger share only adds engines
    assert held != [n for n in names if is_held_out("site2", n, 0.2)]  # another site holds out other engines


def test_failed_engines_held_out_never_train_and_are_what_validation_scores(tmp_path: Path) -> None:
    """A failure event files the engine's history in the hold-out buffer or the training
    buffer, never both: training rows never include a held-out engine, and the learning
    curve's rows are exactly the held-out engines (whole engines, bounded)."""
    agent = EdgeAgent(SiteConfig("site1", str(tmp_path / "state"), holdout_share=0.25, insecure_unsigned=True))
    rng = np.random.default_rng(0)
    names = [f"E{k}" for k in range(40)]
    for name in names:
        for cycle in range(1, 21):
            agent.on_reading(name, json.dumps({"cycle": cycle, "settings": [0, 0, 100], "sensors": rng.normal(size=21).tolist()}).encode())
        agent.on_event(name, json.dumps({"event": "failure", "cycle": 20}).encode())
    held = {n for n in names if is_held_out("site1", n, 0.25)}
    assert held and len(held) < len(names)
    assert {e for e, *_ in agent.holdout.engines} == held and {e for e, *_ in agent.buffer.engines} == set(names) - held
    spec = FeatureSpec((0, 1), 5, (0.0,) * 5, (1.0,) * 5)
    x_train, _ = agent.buffer.training_rows(spec)
    x_val, y_val, engines = agent.holdout.validation_rows(spec, 10_000)
    assert len(x_train) == 20 * (len(names) - len(held))
    assert engines == len(held) and len(x_val) == len(y_val) == 20 * len(held)
    assert agent.holdout.validation_rows(spec, 30)[2] == 1  # bounded: whole engines up to about max_rows, at least one


def test_site_config_bounds_the_holdout_share(tmp_path: Path) -> None:
    from turbofed.config import load_site_config
    from turbofed.errors import ConfigError

    path = tmp_path / "site.toml"
    path.write_text(f'site = "s1"\nstate_dir = "{tmp_path}"\ninsecure_unsigned = true\nholdout_share = 0.9\n')
    with pytest.raises(ConfigError, match="holdout_share"):
        load_site_config(path)
    path.write_text(f'site = "s1"\nstate_dir = "{tmp_path}"\ninsecure_unsigned = true\nholdout_share = 0.2\n')
    assert load_site_config(path).holdout_share == 0.2
    assert SiteConfig("s1", str(tmp_path), insecure_unsigned=True).holdout_share == 0.0


def test_metrics_say_which_engines_and_refuse_anything_else() -> None:
    m = Metrics("s1", 3, 4, ModelScore(12.5, None, 4), ModelScore(10.0, None, 4), on="validation", round=3)
    assert Metrics.from_payload(m.to_payload(), site="s1") == m
    old = {k: v for k, v in m.to_dict().items() if k not in ("on", "round")}  # an agent from before the field
    assert Metrics.from_payload(json.dumps(old).encode(), site="s1").on == "test"
    for bad in ({"on": "train"}, {"on": 1}, {"round": -1}, {"round": 1.5}):
        with pytest.raises(MessageError):
            Metrics.from_payload(json.dumps({**m.to_dict(), **bad}).encode(), site="s1")


def test_aggregator_stores_each_rounds_validation_metrics_under_that_round(tmp_path: Path) -> None:
    save_versions(tmp_path / "registry", range(3))  # the aggregator resumes at v2
    aggregator = Aggregator(config(tmp_path))
    aggregator.client = RecordingClient()
    try:
        assert aggregator.version == 2
        for rnd in (1, 2):
            for site in ("site1", "site2"):
                body = Metrics(site, rnd, 3, ModelScore(20.0 - rnd, None, 3), ModelScore(15.0 - rnd, None, 3), on="validation", round=rnd)
                aggregator._on_metrics(site, body.to_payload())
        with pytest.raises(Refused, match="round 3"):  # a round that has not closed
            aggregator._on_metrics("site1", Metrics("site1", 2, 3, on="validation", round=3).to_payload())
        aggregator._on_metrics("site1", Metrics("site1", 2, 5, ModelScore(9.0, 1.0, 5)).to_payload())  # test engines: the old table
        rows = aggregator.store.validation_metrics()
        assert {(r["site"], r["round"]) for r in rows} == {(s, r) for s in ("site1", "site2") for r in (1, 2)}
        assert {r["model"] for r in rows} == {"local", "federated"} and len(rows) == 8
        assert [r["engines"] for r in aggregator.store.metrics()] == [5, 5]
    finally:
        aggregator.store.close()
        aggregator.registry.close()


def test_truths_wait_for_an_aggregator_to_record_them(tmp_path: Path) -> None:
    """A training engine that fails before any aggregator has spoken (the demo replays its
    training engines first) is reported once one has: held, not sent to a broker that would
    drop it, so the store learns every engine that ran to failure."""
    from turbofed.messages import StatsRequest, signed

    agent = EdgeAgent(SiteConfig("site1", str(tmp_path / "state"), insecure_unsigned=True))
    for name in ("E1", "E2"):
        for cycle in range(1, 6):
            agent.on_reading(name, json.dumps({"cycle": cycle, "settings": [0, 0, 100], "sensors": [1.0] * 21}).encode())
        agent.on_event(name, json.dumps({"event": "failure", "cycle": 5}).encode())
    agent.flush()
    assert agent.outbox.pending == 0 and [t[0] for t in agent.pending_truth] == ["E1", "E2"]
    with pytest.raises(MessageError, match="statistics are shared over at least 5"):  # too few engines to answer, but heard
        agent._on_stats_request_payload(agent.sealer.seal(signed.STATS_REQUEST, StatsRequest("r1", 10, 30).to_payload()))
    agent.flush()
    assert agent.pending_truth == [] and agent.outbox.pending >= 1
