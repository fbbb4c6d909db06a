"""The reference ONNX graph of a RUL model, built from the feature spec and model settings.

Models are data, not code: the aggregator builds the one graph a fleet's models may have
(`reference_model`), fills it with seeded initial weights for global v0, and accepts an
update only if it is that graph with other numbers in it (`turbofed.codec.check_graph`).
Sites never export their own graph for the fleet: they write their trained weights into
the global model they received (`codec.replace_weights`).

The graph is node for node what skl2onnx exports for the sites' scikit-learn pipeline
(`turbofed.edge.learner`, a StandardScaler-equivalent in front of an MLPRegressor or an
SGDRegressor), so a site's own local model and the federated one run the same arithmetic:

    mlp: Scaler -> Cast -> (MatMul -> Add -> Relu) per hidden layer -> MatMul -> Add -> Reshape
    sgd: Scaler -> MatMul -> Add -> Reshape

Built with `onnx.helper` only: the aggregator never imports scikit-learn.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from turbofed.config import ModelSettings
from turbofed.spec import FeatureSpec

ONNX_OPSET = 17  # the default ONNX domain's opset every turbofed model uses
ONNX_ML_OPSET = 1  # ai.onnx.ml, for the Scaler node
ONNX_IR_VERSION = 8  # what opset 17 pairs with (and what skl2onnx writes for it)
INPUT = "X"
OUTPUT = "variable"

Weights = dict[str, np.ndarray]


def weight_names(settings: ModelSettings) -> list[tuple[str, str]]:
    """(matrix, bias) initializer names per layer, as skl2onnx names them."""
    if settings.kind == "sgd":
        return [("coef", "intercept")]
    layers = len(settings.hidden) + 1
    return [(f"coefficient{i or ''}", f"intercepts{i or ''}") for i in range(layers)]


def weight_shapes(spec: FeatureSpec, settings: ModelSettings) -> dict[str, tuple[int, ...]]:
    """Every float initializer's name and shape, in graph order."""
    if settings.kind == "sgd":
        return {"coef": (spec.n_features, 1), "intercept": (1,)}
    units = [spec.n_features, *settings.hidden, 1]
    shapes: dict[str, tuple[int, ...]] = {}
    for (w, b), fan_in, fan_out in zip(weight_names(settings), units, units[1:]):
        shapes[w], shapes[b] = (fan_in, fan_out), (1, fan_out)
    return shapes


def initial_weights(spec: FeatureSpec, settings: ModelSettings) -> Weights:
    """Global v0's weights, seeded by `settings.seed`: for the MLP, scikit-learn's own scheme
    (Glorot uniform, bound sqrt(6 / (fan_in + fan_out)), matrix then bias per layer from one
    RandomState), so they are the weights MLPRegressor(random_state=seed) starts from; a
    linear model starts from zeros, as SGDRegressor does."""
    shapes = weight_shapes(spec, settings)
    if settings.kind == "sgd":
        return {name: np.zeros(shape, dtype=np.float32) for name, shape in shapes.items()}
    rng = np.random.RandomState(settings.seed)
    weights: Weights = {}
    for w, b in weight_names(settings):
        fan_in, fan_out = shapes[w]
        bound = np.sqrt(6.0 / (fan_in + fan_out))
        weights[w] = rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32)
        weights[b] = rng.uniform(-bound, bound, fan_out).astype(np.float32).reshape(1, fan_out)
    return weights


def _node(op: str, inputs: list[str], output: str, name: str, domain: str = "", **attrs: object) -> onnx.NodeProto:
    """One node, its domain set explicitly (as skl2onnx writes it, so the bytes match too)."""
    return helper.make_node(op, inputs, [output], name=name, domain=domain, **attrs)


def reference_model(spec: FeatureSpec, settings: ModelSettings, weights: Weights | None = None) -> onnx.ModelProto:
    """The fleet's model for `spec` and `settings`, holding `weights` (default: `initial_weights`)."""
    weights = initial_weights(spec, settings) if weights is None else weights
    shapes = weight_shapes(spec, settings)
    if set(weights) != set(shapes):
        raise ValueError(f"weights are named {sorted(weights)}, the model needs {sorted(shapes)}")
    offset = np.asarray(spec.offset, dtype=np.float32).astype(np.float64)
    scale = 1.0 / np.asarray(spec.scale, dtype=np.float32).astype(np.float64)  # Scaler multiplies
    nodes = [_node("Scaler", [INPUT], "variable1", "Scaler", "ai.onnx.ml", offset=offset.tolist(), scale=scale.tolist())]
    if settings.kind == "sgd":
        nodes += [
            _node("MatMul", ["variable1", "coef"], "multiplied", "MatMul"),
            _node("Add", ["multiplied", "intercept"], "resh", "Add"),
        ]
        last = "resh"
    else:
        nodes.append(_node("Cast", ["variable1"], "cast_input", "Cast", to=TensorProto.FLOAT))
        last = "cast_input"
        names = weight_names(settings)
        for i, (w, b) in enumerate(names):
            k = f"{i or ''}"
            nodes += [
                _node("MatMul", [last, w], f"mul_result{k}", f"MatMul{k}"),
                _node("Add", [f"mul_result{k}", b], f"add_result{k}", f"Add{k}"),
            ]
            last = f"add_result{k}"
            if i < len(names) - 1:
                nodes.append(_node("Relu", [last], f"next_activations{k}", f"Relu{k}"))
                last = f"next_activations{k}"
    nodes.append(_node("Reshape", [last, "shape_tensor"], OUTPUT, "Reshape"))
    initializers = [numpy_helper.from_array(np.asarray(weights[name], dtype=np.float32).reshape(shape), name) for name, shape in shapes.items()]
    initializers.append(helper.make_tensor("shape_tensor", TensorProto.INT64, [2], [-1, 1]))
    graph = helper.make_graph(
        nodes,
        "ONNX(Pipeline)",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [None, spec.n_features])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [None, 1])],
        initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid("ai.onnx.ml", ONNX_ML_OPSET)],
        ir_version=ONNX_IR_VERSION,
        producer_name="turbofed",
        doc_string=f"turbofed RUL model; features={spec.n_features}",
    )
    onnx.checker.check_model(model)
    return model
