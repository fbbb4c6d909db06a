"""The learner: ONNX export matches scikit-learn; ONNX round trip keeps weights bit-identical."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from turbofed.config import ModelSettings
from turbofed.data.cmapss import load_subset
from turbofed.edge.features import run_features, runs_stats
from turbofed.edge.inference import OnnxPredictor
from turbofed.edge.learner import RulModel
from turbofed.errors import ConfigError, WeightsError
from turbofed.spec import DEFAULT_WINDOW, FeatureSpec


@pytest.fixture(scope="module")
def data(cmapss_dir: Path):
    runs = load_subset("FD001", cmapss_dir).train[:20]
    stats = runs_stats(runs, DEFAULT_WINDOW)
    spec = FeatureSpec.from_stats(stats)
    x = np.vstack([run_features(spec, r.cycles, r.sensors) for r in runs])
    return spec, x, np.concatenate([r.rul() for r in runs])


@pytest.mark.parametrize("kind", ["mlp", "sgd"])
def test_onnxruntime_agrees_with_sklearn(data, kind: str) -> None:
    spec, x, y = data
    model = RulModel(ModelSettings(kind=kind), spec)
    model.train(x, y, epochs=3)
    sk = model.predict(x)
    ort = OnnxPredictor(model.to_onnx()).predict(x)
    assert np.std(sk) > 1.0  # it learned something, so agreement means something
    np.testing.assert_allclose(ort, np.maximum(sk, 0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["mlp", "sgd"])
def test_onnx_round_trip_is_bit_identical(data, kind: str) -> None:
    spec, x, y = data
    trained = RulModel(ModelSettings(kind=kind), spec)
    trained.train(x, y, epochs=2)
    fresh = RulModel(ModelSettings(kind=kind, seed=99), spec)
    before = fresh.weights()
    fresh.load_onnx(trained.to_onnx())
    after, source = fresh.weights(), trained.weights()
    assert any(not np.array_equal(before[n], source[n]) for n in source)
    for name in source:
        assert after[name].dtype == source[name].dtype
        assert np.array_equal(after[name], source[name]), name
    np.testing.assert_array_equal(fresh.predict(x), trained.predict(x))


def test_training_continues_from_loaded_weights(data) -> None:
    spec, x, y = data
    a = RulModel(ModelSettings(), spec)
    a.train(x, y, epochs=3)
    b = RulModel(ModelSettings(seed=7), spec)
    b.load_onnx(a.to_onnx())
    err_loaded = np.sqrt(np.mean((b.predict(x) - np.minimum(y, 125)) ** 2))
    b.train(x, y, epochs=1)
    err_after = np.sqrt(np.mean((b.predict(x) - np.minimum(y, 125)) ** 2))
    assert err_loaded < 40 and err_after < err_loaded * 1.2


def test_same_seed_same_initial_weights(data) -> None:
    spec, _, _ = data
    w1, w2 = RulModel(ModelSettings(), spec).weights(), RulModel(ModelSettings(), spec).weights()
    w3 = RulModel(ModelSettings(seed=1), spec).weights()
    assert all(np.array_equal(w1[n], w2[n]) for n in w1)
    assert not all(np.array_equal(w1[n], w3[n]) for n in w1)


def test_loading_other_architecture_is_refused(data) -> None:
    spec, _, _ = data
    small = RulModel(ModelSettings(hidden=(8,)), spec)
    with pytest.raises(WeightsError, match="initializer names differ"):
        RulModel(ModelSettings(), spec).load_onnx(small.to_onnx())


def test_bad_settings_are_named() -> None:
    with pytest.raises(ConfigError, match="unknown setting\\(s\\) hiden"):
        ModelSettings.from_dict({"hiden": [3]})
    with pytest.raises(ConfigError, match=r"model settings batch_size must be an integer in 1..1000000, got 0$"):
        ModelSettings(batch_size=0)
