"""Read and replace the float weights of an ONNX model, and refuse weights that don't fit.

Weights travel as whole ONNX models, but aggregation only ever touches their float
initializers. Every received model is checked against a reference (the current global
model): same initializer names, shapes and dtypes, the same graph around them, finite
values, and a size limit. Each refusal says which check failed and where.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
from onnx import numpy_helper

from turbofed.errors import WeightsError
from turbofed.refusals import Refusal

MAX_MODEL_BYTES = 4 * 1024 * 1024  # largest model a site may send (fits the broker limit)
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}

Weights = dict[str, np.ndarray]


class ModelTooLarge(WeightsError):
    reason = Refusal.TOO_LARGE


class NotOnnx(WeightsError):
    reason = Refusal.NOT_ONNX


class WeightsMismatch(WeightsError):
    reason = Refusal.MISMATCH


class NonFiniteWeights(WeightsError):
    reason = Refusal.NON_FINITE


def parse_model(data: bytes, max_bytes: int = MAX_MODEL_BYTES) -> onnx.ModelProto:
    """Parse ONNX bytes, refusing oversized or malformed ones before trusting anything."""
    if len(data) > max_bytes:
        raise ModelTooLarge(f"model is {len(data)} bytes, over the {max_bytes}-byte limit")
    try:
        model = onnx.load_model_from_string(data)
        onnx.checker.check_model(model)
    except Exception as exc:  # protobuf and checker raise several unrelated types
        raise NotOnnx(f"not a valid ONNX model: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return model


def read_weights(model: onnx.ModelProto) -> Weights:
    """The float initializers of a model, by name, as numpy arrays (in graph order)."""
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer if init.data_type in _FLOAT_TYPES}


def replace_weights(model: onnx.ModelProto, weights: Weights) -> onnx.ModelProto:
    """A copy of `model` with the named float initializers replaced (same dtype and shape)."""
    check_weights(weights, read_weights(model))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name in weights:
            dtype = numpy_helper.to_array(init).dtype
            init.CopyFrom(numpy_helper.from_array(np.asarray(weights[init.name], dtype=dtype), init.name))
    return out


def check_weights(candidate: Weights, reference: Weights) -> None:
    """Raise unless candidate has exactly reference's names, shapes and dtypes, all finite."""
    missing = sorted(set(reference) - set(candidate))
    extra = sorted(set(candidate) - set(reference))
    if missing or extra:
        raise WeightsMismatch(f"initializer names differ: missing {missing}, unexpected {extra}")
    for name, ref in reference.items():
        got = np.asarray(candidate[name])
        if got.shape != ref.shape:
            raise WeightsMismatch(f"initializer {name!r} has shape {got.shape}, expected {ref.shape}")
        if got.dtype != ref.dtype:
            raise WeightsMismatch(f"initializer {name!r} has dtype {got.dtype}, expected {ref.dtype}")
    check_finite(candidate)


def check_finite(weights: Weights) -> None:
    """Raise NonFiniteWeights naming the first initializer that holds NaN or infinity."""
    for name, w in weights.items():
        bad = np.size(w) - np.count_nonzero(np.isfinite(w))
        if bad:
            raise NonFiniteWeights(f"initializer {name!r} holds {bad} non-finite value(s)")


def graph_signature(model: onnx.ModelProto) -> str:
    """SHA-256 of the graph without its float initializer values: ops, attributes, wiring."""
    skeleton = onnx.GraphProto()
    skeleton.CopyFrom(model.graph)
    for init in skeleton.initializer:
        if init.data_type in _FLOAT_TYPES:
            for values in ("raw_data", "float_data", "double_data", "int32_data"):
                init.ClearField(values)
    return hashlib.sha256(skeleton.SerializeToString(deterministic=True)).hexdigest()


def load_compatible(data: bytes, reference: onnx.ModelProto, max_bytes: int = MAX_MODEL_BYTES) -> Weights:
    """Parse a received model and return its weights if it fits the reference in every way."""
    model = parse_model(data, max_bytes)
    weights = read_weights(model)
    check_weights(weights, read_weights(reference))
    if graph_signature(model) != graph_signature(reference):
        raise WeightsMismatch("graph differs from the reference model (operators, attributes or wiring)")
    return weights


def raw_weight_bytes(weights: Weights) -> int:
    """Size of the weights as raw float32, the yardstick for update size on the wire."""
    return sum(int(np.size(w)) * 4 for w in weights.values())
