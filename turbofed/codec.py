"""Read and replace the float weights of an ONNX model, and refuse models that are more than weights.

Weights travel as whole ONNX models, but a model is data, not code: aggregation only
ever touches its float initializers, and every received model must be exactly the
reference graph (turbofed.graph; the current global model is built from it) with other
numbers in it. `check_graph` refuses, as `foreign_graph`, anything else: weights stored
outside the model (ONNX external data, which a reader would fetch from its own disk),
functions, subgraphs, sparse or extra initializers, other nodes, operators, attributes,
wiring, inputs, outputs, opset or IR version. Initializers with the reference's names
but other shapes or dtypes are a `mismatch`, NaN or infinite values `non_finite`. Each
refusal says which check failed and where. Nothing reads a tensor's values before
`check_data_only` has passed it.
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


class ForeignGraph(WeightsError):
    """A model that is not the reference graph: code, not just other weights."""

    reason = Refusal.FOREIGN_GRAPH


_SUBGRAPH_ATTRS = {onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS}
_SPARSE_ATTRS = {onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.SPARSE_TENSORS}


def parse_model(data: bytes, max_bytes: int = MAX_MODEL_BYTES) -> onnx.ModelProto:
    """Parse ONNX bytes, refusing oversized or malformed ones and any that carry more than a
    graph and its numbers (`check_data_only`) before trusting anything."""
    if len(data) > max_bytes:
        raise ModelTooLarge(f"model is {len(data)} bytes, over the {max_bytes}-byte limit")
    try:
        model = onnx.load_model_from_string(data)  # reads no external data: no base folder
    except Exception as exc:  # protobuf raises several unrelated types
        raise NotOnnx(f"not a valid ONNX model: {_first_line(exc)}") from None
    check_data_only(model)  # before the checker, which would look for external files
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise NotOnnx(f"not a valid ONNX model: {_first_line(exc)}") from None
    return model


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def check_data_only(model: onnx.ModelProto) -> None:
    """Raise ForeignGraph if the model is more than one graph of nodes and the numbers it
    carries: functions, training graphs, subgraphs (If, Loop, Scan bodies), sparse tensors,
    or tensors whose values are stored outside the model (external data, which whoever
    reads the model would fetch from a file on its own disk)."""
    if len(model.functions):
        raise ForeignGraph(f"model defines {len(model.functions)} function(s) ({model.functions[0].name[:64]!r}); a model may only hold the reference graph")
    if len(model.training_info):
        raise ForeignGraph("model carries training graphs (training_info); a model may only hold the reference graph")
    graph = model.graph
    if len(graph.sparse_initializer):
        raise ForeignGraph(f"graph has {len(graph.sparse_initializer)} sparse initializer(s); weights must be dense initializers")
    for init in graph.initializer:
        _check_stored_inside(init, f"initializer {init.name[:64]!r}")
    for node in graph.node:
        where = f"node {node.name[:64]!r} ({node.op_type[:64]})"
        for attr in node.attribute:
            if attr.type in _SUBGRAPH_ATTRS or attr.HasField("g") or len(attr.graphs):
                raise ForeignGraph(f"{where} attribute {attr.name[:64]!r} holds a subgraph; a model may not carry control flow")
            if attr.type in _SPARSE_ATTRS or attr.HasField("sparse_tensor") or len(attr.sparse_tensors):
                raise ForeignGraph(f"{where} attribute {attr.name[:64]!r} holds a sparse tensor")
            for tensor in ([attr.t] if attr.HasField("t") else []) + list(attr.tensors):
                _check_stored_inside(tensor, f"{where} attribute {attr.name[:64]!r}")


def _check_stored_inside(tensor: onnx.TensorProto, where: str) -> None:
    if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
        location = next((e.value for e in tensor.external_data if e.key == "location"), "?")
        raise ForeignGraph(f"{where} is external data (location {location[:200]!r}); a model must carry its weights itself")


def _short(items: list, limit: int = 5) -> str:
    """A list for an error message, bounded whatever a sender put in it."""
    shown = [x[:64] if isinstance(x, str) else x for x in items[:limit]]
    return f"{shown}" + (f" and {len(items) - limit} more" if len(items) > limit else "")


def read_weights(model: onnx.ModelProto) -> Weights:
    """The float initializers of a model, by name, as numpy arrays (in graph order). Raises
    ForeignGraph, reading nothing, for an initializer stored outside the model."""
    for init in model.graph.initializer:
        _check_stored_inside(init, f"initializer {init.name[:64]!r}")
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
        raise WeightsMismatch(f"initializer names differ: missing {_short(missing)}, unexpected {_short(extra)}")
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


# Descriptive model fields no runtime reads; an old checkpoint says "skl2onnx" here.
_DESCRIPTIVE = ("producer_name", "producer_version", "doc_string", "domain", "model_version")


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model without its float initializer values and descriptive fields:
    everything that must never change."""
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    for name in (*_DESCRIPTIVE, "opset_import"):  # opsets are compared as a set first: skl2onnx's order varies
        skeleton.ClearField(name)
    for init in skeleton.graph.initializer:
        if init.data_type in _FLOAT_TYPES:
            for values in ("raw_data", "float_data", "double_data", "int32_data"):
                init.ClearField(values)
    return skeleton


def graph_signature(model: onnx.ModelProto) -> str:
    """SHA-256 of the graph without its float initializer values: ops, attributes, wiring."""
    return hashlib.sha256(_skeleton(model).graph.SerializeToString(deterministic=True)).hexdigest()


def check_graph(model: onnx.ModelProto, reference: onnx.ModelProto) -> Weights:
    """Return the model's weights if it is the reference graph with other (finite) numbers in
    it; raise ForeignGraph for any other structure, WeightsMismatch for initializers of
    another shape or dtype, NonFiniteWeights for NaN or infinity. Cheapest and most telling
    checks first; the last one compares everything but the weights' values."""
    check_data_only(model)
    ours = [(o.domain, o.version) for o in reference.opset_import]
    theirs = [(o.domain, o.version) for o in model.opset_import]
    if (model.ir_version, sorted(theirs)) != (reference.ir_version, sorted(ours)):
        raise ForeignGraph(f"IR version {model.ir_version} with opsets {_short(sorted(theirs))}, expected IR {reference.ir_version} with {sorted(ours)}")
    names = [i.name for i in model.graph.initializer]
    expected = [i.name for i in reference.graph.initializer]
    if names != expected:
        extra = [n for n in names if n not in expected]
        missing = [n for n in expected if n not in names]
        detail = f"missing {_short(missing)}, unexpected {_short(extra)}" if missing or extra else f"order {_short(names, 20)}, expected {expected}"
        raise ForeignGraph(f"graph differs from the reference: initializer names differ: {detail}")
    _check_nodes(list(model.graph.node), list(reference.graph.node))
    for part in ("input", "output", "value_info"):
        if list(getattr(model.graph, part)) != list(getattr(reference.graph, part)):
            raise ForeignGraph(f"graph differs from the reference: its {part.replace('_', ' ')} declarations differ")
    weights = read_weights(model)
    check_weights(weights, read_weights(reference))
    if _skeleton(model).SerializeToString(deterministic=True) != _skeleton(reference).SerializeToString(deterministic=True):
        raise ForeignGraph("model differs from the reference outside its weights (constant initializers, metadata or model fields)")
    return weights


def _check_nodes(nodes: list[onnx.NodeProto], reference: list[onnx.NodeProto]) -> None:
    """Node by node: the same operator, then the same name, wiring and attributes."""
    for i, (got, want) in enumerate(zip(nodes, reference)):
        if (got.domain, got.op_type) != (want.domain, want.op_type):
            raise ForeignGraph(f"graph differs from the reference: node {i} is {_op(got)}, expected {_op(want)}")
        if got != want:
            raise ForeignGraph(f"graph differs from the reference: node {i} {_op(want)} has other inputs, outputs or attributes")
    if len(nodes) > len(reference):
        raise ForeignGraph(f"graph differs from the reference: {len(nodes) - len(reference)} extra node(s), the first {_op(nodes[len(reference)])}")
    if len(nodes) < len(reference):
        raise ForeignGraph(f"graph differs from the reference: {len(reference) - len(nodes)} node(s) missing, the first {_op(reference[len(nodes)])}")


def _op(node: onnx.NodeProto) -> str:
    return f"{node.domain + '.' if node.domain else ''}{node.op_type[:64]} {node.name[:64]!r}"


def load_compatible(data: bytes, reference: onnx.ModelProto, max_bytes: int = MAX_MODEL_BYTES) -> Weights:
    """Parse a received model and return its weights if it is the reference graph (`check_graph`)."""
    return check_graph(parse_model(data, max_bytes), reference)


def flatten(weights: Weights, names: list[str]) -> np.ndarray:
    """The tensors `names` of `weights`, in that order, as one float64 vector."""
    return np.concatenate([np.asarray(weights[n], dtype=np.float64).ravel() for n in names])


def unflatten(vector: np.ndarray, like: Weights) -> Weights:
    """`vector` cut back into tensors shaped and typed like `like` (the inverse of `flatten`)."""
    out, at = {}, 0
    for n, w in like.items():
        out[n] = vector[at:at + w.size].reshape(w.shape).astype(w.dtype)
        at += w.size
    return out


def raw_weight_bytes(weights: Weights) -> int:
    """Size of the weights as raw float32, the yardstick for update size on the wire."""
    return sum(int(np.size(w)) * 4 for w in weights.values())
