"""The weight codec refuses every kind of model that does not fit, and says which check failed."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from turbofed.codec import (
    ForeignGraph,
    ModelTooLarge,
    NonFiniteWeights,
    NotOnnx,
    WeightsMismatch,
    graph_signature,
    load_compatible,
    raw_weight_bytes,
    read_weights,
    replace_weights,
)
from turbofed.config import ModelSettings
from turbofed.edge.learner import RulModel
from turbofed.spec import FeatureSpec

SPEC = FeatureSpec((0, 1, 2), 30, (0.0,) * 13, (1.0,) * 13)  # 4 features a sensor + the cycle


@pytest.fixture(scope="module")
def reference() -> onnx.ModelProto:
    return onnx.load_model_from_string(RulModel(ModelSettings(), SPEC).to_onnx())


def test_read_and_replace_by_name(reference: onnx.ModelProto) -> None:
    weights = read_weights(reference)
    assert list(weights) == ["coefficient", "intercepts", "coefficient1", "intercepts1", "coefficient2", "intercepts2"]
    doubled = {n: w * 2 for n, w in weights.items()}
    out = replace_weights(reference, doubled)
    for name, w in read_weights(out).items():
        np.testing.assert_array_equal(w, doubled[name])
    inputs = SPEC.n_features
    assert raw_weight_bytes(weights) == 4 * (inputs * 64 + 64 + 64 * 32 + 32 + 32 + 1)


def test_accepts_same_architecture(reference: onnx.ModelProto) -> None:
    other = RulModel(ModelSettings(seed=3), SPEC).to_onnx()
    assert set(load_compatible(other, reference)) == set(read_weights(reference))


@pytest.mark.parametrize(
    "corrupt, error, message",
    [
        (lambda b: b[: len(b) // 2], NotOnnx, "not a valid ONNX model"),
        (lambda b: bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)), NotOnnx, "not a valid ONNX model"),
        (lambda b: b + b"\0" * 200_000, ModelTooLarge, "over the 100000-byte limit"),
    ],
)
def test_refuses_bytes_that_are_not_a_fitting_model(reference, corrupt, error, message) -> None:
    data = RulModel(ModelSettings(seed=3), SPEC).to_onnx()
    with pytest.raises(error, match=message):
        load_compatible(corrupt(data), reference, max_bytes=100_000)


def test_refuses_other_shapes(reference: onnx.ModelProto) -> None:
    wider = RulModel(ModelSettings(hidden=(65, 32)), SPEC).to_onnx()
    with pytest.raises(WeightsMismatch, match=r"'coefficient' has shape \(13, 65\), expected \(13, 64\)"):
        load_compatible(wider, reference)


def test_refuses_other_names(reference: onnx.ModelProto) -> None:
    model = onnx.load_model_from_string(RulModel(ModelSettings(), SPEC).to_onnx())
    model.graph.initializer[0].name = "renamed"
    for node in model.graph.node:
        node.input[:] = ["renamed" if i == "coefficient" else i for i in node.input]
    with pytest.raises(ForeignGraph, match=r"names differ: missing \['coefficient'\], unexpected \['renamed'\]"):
        load_compatible(model.SerializeToString(), reference)


def test_refuses_other_dtype() -> None:
    with pytest.raises(WeightsMismatch, match="dtype float64, expected float32"):
        from turbofed.codec import check_weights

        check_weights({"w": np.zeros(3)}, {"w": np.zeros(3, dtype=np.float32)})


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_refuses_non_finite(reference: onnx.ModelProto, bad: float) -> None:
    weights = read_weights(reference)
    model = onnx.load_model_from_string(reference.SerializeToString())
    poisoned = {**weights, "intercepts1": weights["intercepts1"].copy()}
    poisoned["intercepts1"][0, 3] = bad
    for init in model.graph.initializer:
        if init.name == "intercepts1":
            init.CopyFrom(onnx.numpy_helper.from_array(poisoned["intercepts1"], "intercepts1"))
    with pytest.raises(NonFiniteWeights, match="'intercepts1' holds 1 non-finite value"):
        load_compatible(model.SerializeToString(), reference)


def test_refuses_changed_graph_with_same_weights(reference: onnx.ModelProto) -> None:
    model = onnx.load_model_from_string(reference.SerializeToString())
    scaler = next(n for n in model.graph.node if n.op_type == "Scaler")
    for attr in scaler.attribute:
        if attr.name == "scale":
            attr.floats[0] = 1000.0
    assert graph_signature(model) != graph_signature(reference)
    with pytest.raises(ForeignGraph, match="graph differs from the reference: node 0 ai.onnx.ml.Scaler 'Scaler' has other inputs, outputs or attributes"):
        load_compatible(model.SerializeToString(), reference)
