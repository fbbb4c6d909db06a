"""Hostile input in process: refusals are counted and logged once per reason per minute,
memory stays bounded (engines, scores, refusal samples, store rows), statistics requests
that would reveal more than aggregates are refused, and the agent keeps predicting."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pytest

from turbofed.config import FleetConfig, ModelSettings, SiteConfig
from turbofed.envelope import encode_json
from turbofed.layout import N_SENSORS
from turbofed.messages import Predictions, SensorReading, StatsRequest, Status
from turbofed.ratelog import RateLimitedLog, Throttle
from turbofed.spec import FeatureSpec
from turbofed.topics import Topics

SITE = "site1"
TOPICS = Topics()


class Clock:
    """A settable clock, so an interval passes without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttle_lets_one_per_key_per_interval_and_counts_the_rest() -> None:
    clock = Clock()
    t = Throttle(60.0, clock)
    assert t.allow("a") == 0 and t.allow("a") is None and t.allow("a") is None and t.allow("b") == 0
    assert t.due() == []  # the interval has not passed
    clock.now += 60.0
    assert t.due() == [("a", 2)] and t.due() == []
    assert t.allow("a") is None  # due() restarted a's interval
    clock.now += 61.0
    assert t.allow("a") == 1


def test_rate_limited_log_says_how_many_it_did_not_log(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    rl = RateLimitedLog(logging.getLogger("turbofed.test"), 60.0, clock)
    with caplog.at_level(logging.WARNING, logger="turbofed.test"):
        logged = [rl.warning("not_finite", "bad %d", i) for i in range(1000)]
        clock.now += 60.0
        rl.warning("not_finite", "bad %d", 1000)
    assert sum(logged) == 1
    assert [r.getMessage() for r in caplog.records] == ["bad 0", "bad 1000 (999 more like it in the last 60 s not logged)"]


# --- the agent ------------------------------------------------------------------------------


def _spec() -> FeatureSpec:
    n = FeatureSpec((1, 6), 30, (), ()).n_features
    return FeatureSpec((1, 6), 30, tuple(0.0 for _ in range(n)), tuple(1.0 for _ in range(n)))


def _reading(cycle: int, value: float = 1.0) -> bytes:
    return SensorReading(cycle, (0.0, 0.0, 100.0), tuple(value + i for i in range(N_SENSORS))).to_payload()


def _raw(**kw: object) -> bytes:
    body = {"cycle": 2, "settings": [0, 0, 100], "sensors": list(range(N_SENSORS)), **kw}
    return json.dumps(body).encode()


@pytest.fixture
def agent(tmp_path: Path):  # noqa: ANN201
    from turbofed.edge.agent import EdgeAgent

    return EdgeAgent(SiteConfig(site=SITE, state_dir=str(tmp_path / "state"), max_engines=3, insecure_unsigned=True), training=False)


def _with_a_model(agent) -> None:  # noqa: ANN001
    """A real global model (the seeded initial MLP) so the agent predicts."""
    from turbofed.edge.inference import OnnxPredictor
    from turbofed.edge.learner import RulModel

    spec = _spec()
    agent.fleet_spec, agent.fed_predictor = spec, OnnxPredictor(RulModel(ModelSettings(hidden=(4,)), spec).to_onnx())


def test_hostile_readings_are_refused_counted_and_the_agent_keeps_predicting(agent, caplog: pytest.LogCaptureFixture) -> None:
    _with_a_model(agent)
    caplog.set_level(logging.WARNING, logger="turbofed.edge")
    agent.handle(TOPICS.sensors(SITE, "e1"), _reading(1))
    hostile = {
        "implausible": [_raw(sensors=[1e308] * N_SENSORS), _raw(settings=[0, -1e7, 100]), _reading(2, value=2e6)],
        "not_finite": [_raw(sensors=[float("nan")] + list(range(20))), _raw().replace(b'"sensors": [0', b'"sensors": [Infinity')],
        "bad_cycle": [_raw(cycle=10**30), _raw(cycle=-1)],
        "too_many_engines": [_reading(1)],  # a 4th engine is published below
    }
    for reason, payloads in hostile.items():
        for payload in payloads:
            engine = "e9" if reason == "too_many_engines" else "e1"
            if reason == "too_many_engines":
                agent.handle(TOPICS.sensors(SITE, "e2"), _reading(1))
                agent.handle(TOPICS.sensors(SITE, "e3"), _reading(1))
            agent.handle(TOPICS.sensors(SITE, engine), payload)
    agent.handle(TOPICS.sensors(SITE, "e1"), _reading(2))
    for reason, payloads in hostile.items():
        assert agent.counters[f"rejected.{reason}"] == len(payloads), reason
    assert agent.counters["internal_error"] == 0
    assert agent.engines["e1"].history()[0].tolist() == [1, 2] and set(agent.engines) == {"e1", "e2", "e3"}
    rows = [r for r in agent.pending_rows if r[0] == "e1"]
    assert [r[1] for r in rows] == [1, 2] and all(math.isfinite(r[3]) for r in rows)  # still predicting e1
    Predictions(SITE, tuple(agent.pending_rows)).to_payload()  # what crashed the agent before: encodes
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "(implausible," in m]) == 1  # three refusals, one log line
    assert any("sensors[0] = 1e+308 is beyond the plausible ±1e+06" in m for m in messages)
    assert not any("Traceback" in m for m in messages)


def test_non_finite_predictions_are_counted_not_published(tmp_path: Path) -> None:
    from turbofed.edge.agent import EdgeAgent

    # A site that turned plausibility off: 1e300 passes, and the float32 model overflows on it.
    agent = EdgeAgent(SiteConfig(site=SITE, state_dir=str(tmp_path / "state"), sensor_abs_max=1e300, insecure_unsigned=True), training=False)
    _with_a_model(agent)
    agent.handle(TOPICS.sensors(SITE, "e1"), _reading(1, value=1e300))
    assert agent.counters["rejected.non_finite_output"] == 1 and agent.pending_rows == []
    assert agent.counters["readings"] == 1 and agent.counters["internal_error"] == 0


def test_the_agents_models_predict_within_zero_and_the_cap_for_every_use(agent) -> None:
    """The agent builds its predictors with the cap (issue #15 item 5: predictions, intervals and
    the learning curve go through them), also for a model restored from disk; the unclipped
    output stays at hand for the rollback score (tests/test_rollback.py needs it)."""
    from turbofed.edge.state import load_global
    from turbofed.graph import reference_model, weight_shapes

    settings, spec = ModelSettings(kind="sgd", rul_cap=125.0), _spec()
    shapes = weight_shapes(spec, settings)
    weights = {"coef": np.zeros(shapes["coef"], np.float32), "intercept": np.full(shapes["intercept"], 1e4, np.float32)}
    model = reference_model(spec, settings, weights).SerializeToString()
    x = np.zeros(spec.n_features)
    assert agent._predictor(model).predict(x).tolist() == [1e4]  # no settings yet: nothing to clip to
    agent.settings = settings
    assert agent._predictor(model).predict(x).tolist() == [125.0]
    assert agent._predictor(model).predict_unclipped(x).tolist() == [1e4]
    weights["intercept"][:] = np.inf  # a blown-up model: NaN, refused downstream, not published as the cap
    blown = reference_model(spec, settings, weights).SerializeToString()
    assert np.isnan(agent._predictor(blown).predict(x)).all()
    path = Path(agent.config.state_dir) / "g.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model)
    assert load_global(path, 125.0)[1].predict(x).tolist() == [125.0]


def test_idle_engines_are_forgotten_so_new_ones_fit(agent) -> None:
    for engine in ("e1", "e2", "e3"):
        agent.handle(TOPICS.sensors(SITE, engine), _reading(1))
    agent.handle(TOPICS.sensors(SITE, "e4"), _reading(1))
    assert agent.counters["rejected.too_many_engines"] == 1 and "e4" not in agent.engines
    agent.engines["e2"].last_seen = time.time() - agent.config.engine_idle_s - 1  # e2 went quiet a week ago
    agent.handle(TOPICS.sensors(SITE, "e4"), _reading(1))
    assert set(agent.engines) == {"e1", "e3", "e4"} and agent.counters["engines_evicted"] == 1


def _labelled(agent, n: int, start: int = 0) -> None:  # noqa: ANN001
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        cycles = np.arange(1, 41)
        agent.buffer.add(f"e{i}", cycles, 500 + rng.normal(size=(40, N_SENSORS)), (40 - cycles).astype(float))


def _request(window: int, request_id: str = "r1") -> bytes:
    return StatsRequest(request_id, 10, window).to_payload()


def test_statistics_requests_that_would_reveal_more_than_aggregates_are_refused(agent) -> None:
    """None of these publishes anything (the agent has no MQTT client here: a publish would fail)."""
    _labelled(agent, 4)
    agent.handle(TOPICS.stats_request, _request(2_000))  # within the message bound, over max_stats_window
    agent.handle(TOPICS.stats_request, _request(30))  # 4 labelled engines < min_stats_engines 5
    agent.handle(TOPICS.stats_request, StatsRequest("r2", 10_000, 30).to_payload())  # enough engines? no
    _labelled(agent, 1, start=4)
    agent.handle(TOPICS.stats_request, StatsRequest("r3", 10_000, 30).to_payload())  # 5 engines, 200 rows < 10,000
    agent.fleet_spec = _spec()
    agent.handle(TOPICS.stats_request, _request(31))  # not the current spec's window
    agent.stats_answer = {"request_id": "r0", "spec": agent._stats_spec_key(), "engines": ["e0"]}
    agent.handle(TOPICS.stats_request, _request(30))  # this spec was answered already
    agent.stats_answer = {"request_id": "r0", "spec": "initial", "engines": ["e0", "e1", "e2", "e3"]}
    agent.handle(TOPICS.stats_request, _request(30))  # a new spec, but only e4 changed: the difference is one engine
    rejected = {k: v for k, v in agent.counters.items() if k.startswith("rejected.")}
    assert rejected == {"rejected.stats_unaffordable": 1, "rejected.stats_too_few_engines": 3, "rejected.stats_too_few_samples": 1,
                        "rejected.stats_wrong_window": 1, "rejected.stats_repeated": 1}


def test_the_statistics_answer_survives_a_restart(tmp_path: Path) -> None:
    from turbofed.edge.agent import EdgeAgent

    config = SiteConfig(site=SITE, state_dir=str(tmp_path / "state"), insecure_unsigned=True)
    first = EdgeAgent(config, training=False)
    first.stats_answer = {"request_id": "r1", "spec": "initial", "engines": ["e1", "e2"]}
    first.save()
    again = EdgeAgent(config, training=False)
    assert again.stats_answer == first.stats_answer
    again.handle(TOPICS.stats_request, _request(30, "r2"))
    assert again.counters["rejected.stats_repeated"] == 1


# --- the aggregator -------------------------------------------------------------------------


def test_aggregator_refusals_are_bounded_counters_samples_and_store_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from turbofed.aggregator.service import Aggregator

    caplog.set_level(logging.WARNING, logger="turbofed.aggregator")
    aggregator = Aggregator(FleetConfig(sites=(SITE, "site2"), store=str(tmp_path / "r.sqlite"), registry=str(tmp_path / "reg"), insecure_unsigned=True))
    try:
        flood = encode_json({"site": "site2", "online": True})  # another site's name, 500 times
        for _ in range(500):
            aggregator.inbox.put((TOPICS.status(SITE), flood))
            aggregator.pump(0)
        aggregator.inbox.put((TOPICS.status("site2"), Status("site9", True).to_payload()))
        aggregator.pump(0)
        assert aggregator.counters == {"wrong_sender": 501}
        assert len(aggregator.refusals.recent) == 100 and aggregator.refusals.recent[-1].source == "site2"
        rows = aggregator.store.rejections()
        assert [(r["site"], r["reason"]) for r in rows] == [(SITE, "wrong_sender"), ("site2", "wrong_sender")]
        assert len([r for r in caplog.records if "rejected from" in r.getMessage()]) == 1  # once per reason per minute
        aggregator._record_held_rejections(everything=True)  # what run() does when it stops
        rows = aggregator.store.rejections()
        assert len(rows) == 3 and rows[-1]["detail"].startswith("499 more like it not stored one by one")
    finally:
        aggregator.store.close()
        aggregator.registry.close()


def test_statistics_come_in_two_phases_over_the_same_engines(agent) -> None:
    """Regimes phase, then the features phase with the fleet's regimes, over the very same
    engines: both answered; a phase asked again for the same spec is refused."""
    from tests.fakeclient import FakeClient
    from turbofed.messages import StatsReply
    from turbofed.spec import Regimes

    agent.client = FakeClient()
    rng = np.random.default_rng(0)
    for i in range(5):
        cycles = np.arange(1, 41)
        settings = np.where((cycles % 2 == 0)[:, None], [[0.0, 0.0, 100.0]], [[42.0, 0.84, 100.0]])
        sensors = 500 + rng.normal(size=(40, N_SENSORS)) + 50 * settings[:, :1]
        agent.buffer.add(f"e{i}", cycles, sensors, (40 - cycles).astype(float), settings)
    agent.handle(TOPICS.stats_request, StatsRequest("r1", 10, 30, "regimes").to_payload())
    replies = [StatsReply.from_payload(p, site=SITE) for _, p in agent.client.sent]
    assert len(replies) == 1 and replies[0].stats is None and sorted(replies[0].regime_stats.cells) == [(0, 0, 100), (42, 84, 100)]
    regimes = Regimes.from_stats(replies[0].regime_stats)
    agent.handle(TOPICS.stats_request, StatsRequest("r2", 10, 30, "features", regimes).to_payload())
    second = StatsReply.from_payload(agent.client.sent[-1][1], site=SITE)
    assert second.stats is not None and second.stats.count == 200
    assert abs(second.stats.mean()[1]) < 1e-9  # sensors normalised per regime: the 2100-unit gap is gone
    for request_id, phase in (("r3", "regimes"), ("r4", "features")):
        agent.handle(TOPICS.stats_request, StatsRequest(request_id, 10, 30, phase).to_payload())
    assert agent.counters["rejected.stats_repeated"] == 2 and len(agent.client.sent) == 2


def test_readings_keep_their_settings_for_the_regime_windows(agent) -> None:
    from turbofed.edge.features import run_features
    from turbofed.spec import Regimes, RegimeStats

    rng = np.random.default_rng(1)
    settings = np.array([[0.0, 0.0, 100.0], [42.0, 0.84, 100.0]] * 20)
    sensors = 500 + rng.normal(size=(40, N_SENSORS)) + 10 * settings[:, :1]
    regimes = Regimes.from_stats(RegimeStats.from_rows(settings, sensors))
    base = _spec()
    spec = FeatureSpec(base.sensors, base.window, base.offset, base.scale, regimes)
    for cycle, (g, s) in enumerate(zip(settings, sensors), start=1):
        agent.handle(TOPICS.sensors(SITE, "e1"), SensorReading(cycle, tuple(g), tuple(s)).to_payload())
    np.testing.assert_array_equal(agent.engines["e1"].window(spec).features(), run_features(spec, np.arange(1, 41), sensors, settings)[-1])


def test_a_regimes_answer_too_large_to_send_is_refused_not_sent(agent) -> None:
    from tests.fakeclient import FakeClient
    from turbofed.spec import MAX_CELLS

    agent.client = FakeClient()
    rng = np.random.default_rng(2)
    for i in range(5):
        cycles = np.arange(1, 41)
        settings = np.column_stack([rng.uniform(0, 40, 40), rng.uniform(0, 0.8, 40), np.full(40, 100.0)])  # continuous conditions
        agent.buffer.add(f"e{i}", cycles, 500 + rng.normal(size=(40, N_SENSORS)), (40 - cycles).astype(float), settings)
    assert len(agent.buffer.regime_stats().cells) > MAX_CELLS
    agent.handle(TOPICS.stats_request, StatsRequest("r1", 10, 30, "regimes").to_payload())
    assert agent.counters["rejected.stats_unaffordable"] == 1 and agent.client.sent == [] and agent.stats_answer is None
