"""The incremental RUL learner: scikit-learn `partial_fit`, exported to and loaded from ONNX.

The exported graph carries the normalisation (a Scaler node built from fleet or site
statistics) in front of the regressor, so whoever runs it with onnxruntime feeds raw
window features. Only the regressor's float initializers are federated, under the names
of the fleet's reference graph (turbofed.graph, which is exactly what `to_onnx` exports):
`load_weights` copies a global model's weights into the estimator bit for bit (the
estimator trains in float32), and `weights` gives them back for the site to write into
the global model it received (`codec.replace_weights`). The federated model is never
exported by skl2onnx; the site's local-only model is (`to_onnx`).

`state`/`from_state` turn a learner into plain values and back (coefficients, Adam's
moments and counters; edge/state.py saves them as learners.npz, docs/agent-state.md), so
a restarted agent continues training exactly where it was, whatever scikit-learn it has.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np

from turbofed.codec import Weights, check_weights, read_weights
from turbofed.config import ModelSettings
from turbofed.edge.state import (
    StateError,
    settings_from_dict,
    spec_from_dict,
    take,
    take_array,
)
from turbofed.graph import ONNX_OPSET, weight_names, weight_shapes
from turbofed.spec import FeatureSpec

ESTIMATORS = {"mlp": "MLPRegressor", "sgd": "SGDRegressor"}
ADAM_SCALARS = ("learning_rate", "learning_rate_init", "beta_1", "beta_2", "epsilon")

log = logging.getLogger("turbofed.edge")


class RulModel:
    """A scikit-learn regressor behind a fixed feature normalisation."""

    def __init__(self, settings: ModelSettings, spec: FeatureSpec, seed: int | None = None) -> None:
        from sklearn.linear_model import SGDRegressor
        from sklearn.neural_network import MLPRegressor

        self.settings = settings
        self.spec = spec
        seed = settings.seed if seed is None else seed
        if settings.kind == "mlp":
            self.estimator = MLPRegressor(
                hidden_layer_sizes=settings.hidden,
                solver="adam",
                learning_rate_init=settings.learning_rate,
                batch_size=settings.batch_size,
                alpha=settings.alpha,
                random_state=seed,
            )
        else:
            self.estimator = SGDRegressor(
                learning_rate="constant", eta0=settings.learning_rate, alpha=settings.alpha, random_state=seed
            )
        self._offset = np.asarray(spec.offset, dtype=np.float32)
        self._scale = np.asarray(spec.scale, dtype=np.float32)
        self.samples_seen = 0

    @property
    def fitted(self) -> bool:
        return hasattr(self.estimator, "coefs_") or hasattr(self.estimator, "coef_")

    def normalise(self, features: np.ndarray) -> np.ndarray:
        return ((np.asarray(features, dtype=np.float32) - self._offset) / self._scale).astype(np.float32)

    def initialise(self) -> None:
        """Draw the seeded initial weights without learning anything (same seed, same weights)."""
        if not self.fitted:
            self._fit_once()
            if self.settings.kind == "mlp":
                self.estimator._random_state = np.random.RandomState(self.settings.seed)
                self.estimator._initialize(np.zeros((1, 1), dtype=np.float32), [self.spec.n_features, *self.settings.hidden, 1], np.float32)
                del self.estimator._optimizer  # forget the dummy step; the next fit starts Adam afresh
            else:
                self.estimator.coef_[:] = 0.0
                self.estimator.intercept_[:] = 0.0

    def _fit_once(self) -> None:
        """One partial_fit on a single zero row: scikit-learn builds the estimator's structure."""
        x = np.zeros((1, self.spec.n_features), dtype=np.float32)
        with warnings.catch_warnings():  # "batch_size larger than sample size": expected here
            warnings.simplefilter("ignore", UserWarning)
            self.estimator.partial_fit(x, np.zeros(1, dtype=np.float32))

    def train(self, features: np.ndarray, rul: np.ndarray, epochs: int, rng: np.random.Generator | None = None) -> None:
        """`epochs` passes of partial_fit over (features, RUL capped at the settings' cap)."""
        from threadpoolctl import threadpool_limits

        x = self.normalise(features)
        y = np.minimum(np.asarray(rul, dtype=np.float32), np.float32(self.settings.rul_cap))
        self.initialise()
        rng = rng or np.random.default_rng(self.settings.seed)
        # Mini-batches of 64 are far too small to share between BLAS threads: one thread is
        # 1.3-12x faster here (12x on a busy 2-core machine), and leaves the other core free.
        with threadpool_limits(limits=1, user_api="blas"):
            self._epochs(x, y, epochs, rng)
        self.samples_seen += len(x) * epochs

    def _epochs(self, x: np.ndarray, y: np.ndarray, epochs: int, rng: np.random.Generator) -> None:
        for _ in range(epochs):
            if self.settings.kind == "mlp":
                self.estimator.partial_fit(x, y)  # one shuffled pass in mini-batches of batch_size
                continue
            order = rng.permutation(len(x))
            for start in range(0, len(x), self.settings.batch_size):
                idx = order[start : start + self.settings.batch_size]
                self.estimator.partial_fit(x[idx], y[idx])
        if self.settings.kind == "sgd":
            # Hold the float32 that ONNX carries, so the exported model is exactly this one.
            self.estimator.coef_ = self.estimator.coef_.astype(np.float32)
            self.estimator.intercept_ = self.estimator.intercept_.astype(np.float32)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """scikit-learn's own prediction (the ONNX export runs the same arithmetic)."""
        return self.estimator.predict(self.normalise(np.atleast_2d(features)))

    # --- saved state (learners.npz: edge/state.py, docs/agent-state.md) ------------------

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Everything partial_fit needs to continue exactly where it is, as plain values: a
        JSON-able header (settings, spec, counters, Adam's scalars) and arrays (coefficients,
        intercepts, Adam's first and second moments, the loss curve)."""
        import sklearn

        est = self.estimator
        header: dict[str, Any] = {
            "estimator": type(est).__name__,
            "scikit_learn": sklearn.__version__,  # informational: loading never depends on it
            "settings": self.settings.to_dict(),
            "spec": self.spec.to_dict(),
            "random_state": int(est.random_state),
            "samples_seen": int(self.samples_seen),
            "fitted": self.fitted,
        }
        arrays: dict[str, np.ndarray] = {}
        if not self.fitted:
            return header, arrays
        header.update(n_iter_=int(est.n_iter_))
        if self.settings.kind == "sgd":
            header["t_"] = float(est.t_)
            arrays.update(coef=est.coef_, intercept=est.intercept_)
            return header, arrays
        best = float(est.best_loss_) if est.best_loss_ is not None else None
        header.update(
            t_=int(est.t_),
            layers=len(est.coefs_),
            loss_=float(est.loss_) if hasattr(est, "loss_") else None,
            best_loss_=best if best is not None and np.isfinite(best) else None,  # null: infinite
            no_improvement_count=int(est._no_improvement_count),
        )
        arrays.update({f"coef{i}": c for i, c in enumerate(est.coefs_)})
        arrays.update({f"intercept{i}": b for i, b in enumerate(est.intercepts_)})
        arrays["loss_curve"] = np.asarray(est.loss_curve_, dtype=np.float64)
        optimizer = getattr(est, "_optimizer", None)  # absent: the next partial_fit starts Adam afresh
        header["adam"] = None
        if optimizer is not None:
            header["adam"] = {"t": int(optimizer.t), **{k: float(getattr(optimizer, k)) for k in ADAM_SCALARS}}
            arrays.update({f"adam_m{i}": m for i, m in enumerate(optimizer.ms)})
            arrays.update({f"adam_v{i}": v for i, v in enumerate(optimizer.vs)})
        return header, arrays

    @classmethod
    def from_state(cls, header: dict[str, Any], arrays: dict[str, np.ndarray], where: str) -> "RulModel":
        """Rebuild what `state` gave: scikit-learn builds the structure (one partial_fit on a
        zero row), then every value is checked (shape, dtype, finite) and set. Raises
        StateError naming `where` and the key."""
        settings = settings_from_dict(take(header, "settings", "object", where), f"{where}: settings")
        spec = spec_from_dict(take(header, "spec", "object", where), f"{where}: spec")
        estimator = take(header, "estimator", "str", where)
        if estimator != ESTIMATORS[settings.kind]:
            raise StateError(f"{where}: estimator {estimator!r} does not match model kind {settings.kind!r}")
        model = cls(settings, spec, seed=take(header, "random_state", "int", where, minimum=0))
        model.samples_seen = take(header, "samples_seen", "int", where, minimum=0)
        if not take(header, "fitted", "bool", where):
            return model
        model._fit_once()
        est = model.estimator
        est.n_iter_ = take(header, "n_iter_", "int", where, minimum=0)
        if settings.kind == "sgd":
            est.coef_ = _saved_like(arrays, "coef", est.coef_, where)
            # float32 after training, float64 straight after initialise(): either is kept as saved
            est.intercept_ = np.array(take_array(arrays, "intercept", where, "f", est.intercept_.shape), order="C")
            est.t_ = float(take(header, "t_", "number", where, minimum=1))
            return model
        layers = take(header, "layers", "int", where)
        if layers != len(est.coefs_):
            raise StateError(f"{where}: {layers} layers saved, settings.hidden {list(settings.hidden)} makes {len(est.coefs_)}")
        est.coefs_ = [_saved_like(arrays, f"coef{i}", c, where) for i, c in enumerate(est.coefs_)]
        est.intercepts_ = [_saved_like(arrays, f"intercept{i}", b, where) for i, b in enumerate(est.intercepts_)]
        est._best_coefs, est._best_intercepts = [c.copy() for c in est.coefs_], [b.copy() for b in est.intercepts_]
        est.t_ = take(header, "t_", "int", where, minimum=0)
        loss = take(header, "loss_", "number?", where)
        if loss is not None:
            est.loss_ = float(loss)
        best = take(header, "best_loss_", "number?", where)
        est.best_loss_ = np.inf if best is None else float(best)
        est._no_improvement_count = take(header, "no_improvement_count", "int", where, minimum=0)
        est.loss_curve_ = take_array(arrays, "loss_curve", where, "f", (None,)).astype(float).tolist()
        adam = take(header, "adam", "object?", where)
        if adam is None:
            del est._optimizer
        else:
            model._restore_adam(adam, arrays, where)
        return model

    def _restore_adam(self, adam: dict[str, Any], arrays: dict[str, np.ndarray], where: str) -> None:
        """Adam's step count, rates and moments into the optimizer partial_fit created. A
        scikit-learn whose optimizer keeps them differently keeps the weights, restarts Adam."""
        est = self.estimator
        optimizer = est._optimizer
        params = est.coefs_ + est.intercepts_
        if not all(hasattr(optimizer, k) for k in ("t", "ms", "vs", *ADAM_SCALARS)) or len(optimizer.ms) != len(params):
            log.warning("%s: this scikit-learn keeps Adam's state differently; weights restored, Adam restarts", where)
            del est._optimizer
            return
        optimizer.t = take(adam, "t", "int", f"{where}: adam", minimum=0)
        for k in ADAM_SCALARS:
            setattr(optimizer, k, float(take(adam, k, "number", f"{where}: adam", minimum=0)))
        optimizer.ms = [_saved_like(arrays, f"adam_m{i}", p, where) for i, p in enumerate(params)]
        optimizer.vs = [_saved_like(arrays, f"adam_v{i}", p, where) for i, p in enumerate(params)]
        if any(np.any(v < 0) for v in optimizer.vs):
            raise StateError(f"{where}: Adam's second moments (adam_v*) must not be negative")

    # --- ONNX -------------------------------------------------------------------------

    def to_onnx(self) -> bytes:
        """The fitted pipeline (normalisation + regressor) as ONNX bytes."""
        from skl2onnx import to_onnx
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        self.initialise()
        scaler = StandardScaler()
        scaler.mean_ = self._offset.astype(np.float64)
        scaler.scale_ = self._scale.astype(np.float64)
        scaler.var_ = scaler.scale_**2
        scaler.n_features_in_ = self.spec.n_features
        scaler.n_samples_seen_ = 1
        pipeline = Pipeline([("scaler", scaler), ("regressor", self.estimator)])
        sample = np.zeros((1, self.spec.n_features), dtype=np.float32)
        # black_op keeps a linear model's weights as initializers (MatMul), not node attributes.
        model = to_onnx(pipeline, sample, target_opset=ONNX_OPSET, black_op={"LinearRegressor"})
        model.doc_string = f"turbofed RUL model; features={self.spec.n_features}"
        return model.SerializeToString()

    def weights(self) -> Weights:
        """The regressor's parameters as float32, under the reference graph's initializer
        names and shapes (turbofed.graph): what a site writes into the global model."""
        self.initialise()
        est = self.estimator
        if self.settings.kind == "sgd":
            arrays = [est.coef_, est.intercept_]
        else:
            arrays = [a for pair in zip(est.coefs_, est.intercepts_) for a in pair]
        shapes = weight_shapes(self.spec, self.settings)
        return {name: np.asarray(a, dtype=np.float32).reshape(shape) for a, (name, shape) in zip(arrays, shapes.items())}

    def load_weights(self, weights: Weights) -> None:
        """Copy reference-named weights into the estimator (after checking names, shapes,
        dtype and finiteness: raises WeightsError naming the first that differs)."""
        self.initialise()
        expected = {name: np.zeros(shape, dtype=np.float32) for name, shape in weight_shapes(self.spec, self.settings).items()}
        check_weights(weights, expected)
        est = self.estimator
        if self.settings.kind == "sgd":
            est.coef_ = np.array(weights["coef"], dtype=np.float32).reshape(est.coef_.shape)
            est.intercept_ = np.array(weights["intercept"], dtype=np.float32).reshape(est.intercept_.shape)
            return
        for i, (w_name, b_name) in enumerate(weight_names(self.settings)):
            est.coefs_[i] = np.array(weights[w_name], dtype=np.float32).reshape(est.coefs_[i].shape)
            est.intercepts_[i] = np.array(weights[b_name], dtype=np.float32).reshape(est.intercepts_[i].shape)

    def load_onnx(self, data: bytes) -> None:
        """Continue training from a (global) ONNX model's weights."""
        import onnx

        self.load_weights(read_weights(onnx.load_model_from_string(data)))


def _saved_like(arrays: dict[str, np.ndarray], key: str, like: np.ndarray, where: str) -> np.ndarray:
    """A saved array that must have exactly the dtype and shape of `like` (finite)."""
    a = take_array(arrays, key, where, like.dtype.kind, like.shape)
    if a.dtype != like.dtype:
        raise StateError(f"{where}: array {key!r} holds {a.dtype}, expected {like.dtype}")
    return np.array(a, dtype=like.dtype, order="C")

