"""Issue #15 item 5, in the live path: an engine whose features lie outside a model's training
range (FeatureSpec.out_of_range, more than OUT_OF_RANGE_Z fleet standard deviations from the
fleet mean) has that model's prediction flagged by its agent, and the aggregator stores the flag.

In-process, with real parts: a real FeatureSpec whose offset and scale are the mean and
standard deviation of training engines' features (what fleet statistics give), a real ONNX
model run by onnxruntime, the agent's own outbox; only the MQTT client is FakeClient
(tests/fakeclient.py: no broker in an in-process test)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.fakeclient import FakeClient
from tests.inprocess import RecordingClient, config
from turbofed.aggregator.service import Aggregator
from turbofed.config import ModelSettings, SiteConfig
from turbofed.edge.agent import EdgeAgent
from turbofed.edge.features import EngineWindow
from turbofed.edge.inference import OnnxPredictor
from turbofed.edge.learner import RulModel
from turbofed.messages import Predictions
from turbofed.spec import OUT_OF_RANGE_Z, FeatureSpec
from turbofed.topics import Topics

SITE, SENSORS, WINDOW, CYCLES = "site1", (1, 6), 10, 40
TOPICS = Topics()


def _sensors(rng: np.random.Generator, cycle: int, shift: float) -> list[float]:
    """21 readings around a level, drifting slowly with the cycle (a wearing engine), plus `shift`."""
    return (500.0 + np.arange(21) + 0.05 * cycle + rng.normal(0.0, 1.0, 21) + shift).tolist()


def _fleet_spec(rng: np.random.Generator) -> FeatureSpec:
    """Offset and scale from six training engines' features at every cycle (their mean and std)."""
    n = FeatureSpec(SENSORS, WINDOW, (), ()).n_features
    probe = FeatureSpec(SENSORS, WINDOW, (0.0,) * n, (1.0,) * n)
    rows = []
    for _ in range(6):
        window = EngineWindow(probe)
        for cycle in range(1, CYCLES + 1):
            window.push(cycle, np.array(_sensors(rng, cycle, 0.0)))
            rows.append(window.features())
    x = np.array(rows)
    return FeatureSpec(SENSORS, WINDOW, tuple(x.mean(axis=0)), tuple(np.maximum(x.std(axis=0), 1e-3)))


def _agent(tmp_path: Path, local_scale: float) -> tuple[EdgeAgent, FeatureSpec]:
    """An agent predicting with a federated model on the fleet spec and a local model on the same
    spec widened `local_scale` times (a site whose own engines spread that much further)."""
    spec = _fleet_spec(np.random.default_rng(0))
    local = FeatureSpec(SENSORS, WINDOW, spec.offset, tuple(s * local_scale for s in spec.scale))
    agent = EdgeAgent(SiteConfig(site=SITE, state_dir=str(tmp_path / "state"), insecure_unsigned=True), training=False)
    agent.client = FakeClient()
    settings = ModelSettings(hidden=(4,), window=WINDOW)
    agent.fleet_spec, agent.fed_predictor = spec, OnnxPredictor(RulModel(settings, spec).to_onnx())
    agent.local_spec, agent.local_predictor = local, OnnxPredictor(RulModel(settings, local).to_onnx())
    return agent, spec


def _published(agent: EdgeAgent) -> list[bytes]:
    agent.flush()
    return [payload for topic, payload in agent.client.sent if topic == TOPICS.predictions(SITE)]


def test_agent_flags_each_model_whose_input_is_outside_its_training_range(tmp_path: Path) -> None:
    agent, spec = _agent(tmp_path, local_scale=1000.0)
    rng = np.random.default_rng(1)  # engines the spec never saw, from the same distribution...
    for cycle in range(1, CYCLES + 1):
        agent.handle(TOPICS.sensors(SITE, "normal"), json.dumps({"cycle": cycle, "settings": [0, 0, 100], "sensors": _sensors(rng, cycle, 0.0)}).encode())
        # ...and one reading 200 units above the fleet on every sensor (a miscalibrated gateway, another engine type)
        agent.handle(TOPICS.sensors(SITE, "far"), json.dumps({"cycle": cycle, "settings": [0, 0, 100], "sensors": _sensors(rng, cycle, 200.0)}).encode())
    assert agent.counters["internal_error"] == 0 and agent.counters["predictions.federated"] == 2 * CYCLES
    # The premise, checked with the spec itself: every far row lies beyond the limit, no normal row does.
    z = {e: np.abs((t.window(spec).features() - np.array(spec.offset)) / np.array(spec.scale)).max() for e, t in agent.engines.items()}
    assert z["far"] > OUT_OF_RANGE_Z > z["normal"]

    payloads = _published(agent)
    assert len(payloads) == 1
    p = Predictions.from_payload(payloads[0], site=SITE)
    flags = {(row[0], row[1]): row[6] for row in p.rows}
    assert len(flags) == 2 * CYCLES
    assert {flags[("far", c)] for c in range(1, CYCLES + 1)} == {("federated",)}  # the local spec is 1000x wider: inside
    assert {flags[("normal", c)] for c in range(1, CYCLES + 1)} == {()}
    assert agent.counters["predictions.out_of_range"] == CYCLES
    assert json.loads(payloads[0])["out_of_range"]["local"] == []

    # The aggregator stores it: the engine reads flagged, the normal one not (0, not unknown).
    aggregator = Aggregator(config(tmp_path))
    aggregator.client = RecordingClient()
    try:
        aggregator._on_predictions(SITE, payloads[0])
        latest = {r["engine"]: r["out_of_range"] for r in aggregator.store.latest_predictions()}
        assert latest == {"far": 1, "normal": 0}
        assert {r["out_of_range"] for r in aggregator.store.engine_trajectory(SITE, "far")} == {1}
    finally:
        aggregator.store.close()
        aggregator.registry.close()


def test_local_model_is_checked_against_the_local_spec(tmp_path: Path) -> None:
    """A local spec narrower than the fleet's flags the local prediction of an engine the fleet
    model still covers: each model is judged by its own training range."""
    agent, _ = _agent(tmp_path, local_scale=0.001)
    rng = np.random.default_rng(2)
    for cycle in range(1, 11):
        agent.handle(TOPICS.sensors(SITE, "e1"), json.dumps({"cycle": cycle, "settings": [0, 0, 100], "sensors": _sensors(rng, cycle, 0.0)}).encode())
    rows = Predictions.from_payload(_published(agent)[0], site=SITE).rows
    assert [row[6] for row in rows] == [("local",)] * 10
    assert agent.counters["predictions.out_of_range"] == 10
