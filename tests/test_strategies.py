"""Strategies: exact FedAvg arithmetic, ONNX in and out, and no scikit-learn in the aggregator."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from turbofed.aggregator.strategies import (
    FedAdam,
    FedAvg,
    FedAvgM,
    SiteUpdate,
    Strategy,
    aggregate_onnx,
    make_strategy,
)
from turbofed.edge.learner import RulModel

from turbofed.codec import WeightsMismatch, read_weights
from turbofed.config import ModelSettings
from turbofed.spec import FeatureSpec

SPEC = FeatureSpec((0, 1), 30, (0.0,) * 9, (1.0,) * 9)  # 4 features a sensor + the cycle


def updates() -> list[SiteUpdate]:
    return [
        SiteUpdate("a", {"w": np.array([1.0, 2.0], np.float32)}, 100),
        SiteUpdate("b", {"w": np.array([3.0, 6.0], np.float32)}, 300),
    ]


def test_fedavg_is_sample_weighted() -> None:
    out = FedAvg().aggregate({"w": np.zeros(2, np.float32)}, updates())
    np.testing.assert_allclose(out["w"], [2.5, 5.0])
    assert out["w"].dtype == np.float32


def test_fedavgm_accumulates_momentum_and_checkpoints() -> None:
    s = FedAvgM(server_lr=1.0, momentum=0.5)
    current = {"w": np.zeros(2, np.float32)}
    first = s.aggregate(current, updates())
    np.testing.assert_allclose(first["w"], [2.5, 5.0])
    restored = FedAvgM(server_lr=1.0, momentum=0.5)
    restored.load_state(s.state())
    second = restored.aggregate(first, updates())  # delta 0, velocity 0.5 * previous
    np.testing.assert_allclose(second["w"], [2.5 + 1.25, 5.0 + 2.5])


def test_fedadam_moves_toward_the_mean() -> None:
    s = FedAdam(server_lr=0.1)
    out = s.aggregate({"w": np.zeros(2, np.float32)}, updates())
    assert np.all(out["w"] > 0) and np.all(out["w"] <= 2.5 + 1e-6)
    assert set(s.state()) == {"m/w", "v/w"}


def test_unknown_strategy_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'fedsgd'; choose one of fedavg, fedavgm, fedadam"):
        make_strategy("fedsgd")


def test_new_algorithm_is_one_class() -> None:
    class Median(Strategy):
        name = "median"

        def aggregate(self, current, ups):
            return {n: np.median([u.weights[n] for u in ups], axis=0).astype(current[n].dtype) for n in current}

    out = Median().aggregate({"w": np.zeros(2, np.float32)}, updates())
    np.testing.assert_allclose(out["w"], [2.0, 4.0])


def test_onnx_in_onnx_out() -> None:
    models = [RulModel(ModelSettings(seed=s), SPEC) for s in (1, 2)]
    current = onnx.load_model_from_string(models[0].to_onnx())
    merged = aggregate_onnx(FedAvg(), current, [("a", m.to_onnx(), 1) for m in models])
    wa, wb = (read_weights(onnx.load_model_from_string(m.to_onnx())) for m in models)
    out = read_weights(merged)
    for name in out:
        np.testing.assert_allclose(out[name], (wa[name] + wb[name]) / 2, rtol=1e-6)
    wrong = RulModel(ModelSettings(hidden=(4,)), SPEC).to_onnx()
    with pytest.raises(WeightsMismatch):
        aggregate_onnx(FedAvg(), current, [("a", wrong, 1)])


def test_aggregator_never_imports_sklearn() -> None:
    code = (
        "import sys, turbofed.aggregator.strategies, turbofed.codec, turbofed.cli; "
        "bad = [m for m in sys.modules if m.startswith(('sklearn', 'skl2onnx'))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
