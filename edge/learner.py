"""The incremental RUL learner: scikit-learn `partial_fit`, exported to and loaded from ONNX.

The exported graph carries the normalisation (a Scaler node built from fleet or site
statistics) in front of the regressor, so whoever runs it with onnxruntime feeds raw
window features. Only the regressor's float initializers are federated; loading a global
model back copies them into the estimator bit for bit (the estimator trains in float32).
"""

from __future__ import annotations

import warnings

import numpy as np

from turbofed.codec import Weights, read_weights, replace_weights
from turbofed.config import ModelSettings
from turbofed.errors import WeightsError
from turbofed.spec import FeatureSpec

ONNX_OPSET = 17


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
            x = np.zeros((1, self.spec.n_features), dtype=np.float32)
            with warnings.catch_warnings():  # "batch_size larger than sample size": expected here
                warnings.simplefilter("ignore", UserWarning)
                self.estimator.partial_fit(x, np.zeros(1, dtype=np.float32))
            if self.settings.kind == "mlp":
                self.estimator._random_state = np.random.RandomState(self.settings.seed)
                self.estimator._initialize(np.zeros((1, 1), dtype=np.float32), [x.shape[1], *self.settings.hidden, 1], np.float32)
                del self.estimator._optimizer  # forget the dummy step; the next fit starts Adam afresh
            else:
                self.estimator.coef_[:] = 0.0
                self.estimator.intercept_[:] = 0.0

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
        """The regressor's parameters under the ONNX initializer names skl2onnx gives them."""
        import onnx

        return read_weights(onnx.load_model_from_string(self.to_onnx()))

    def load_weights(self, weights: Weights) -> None:
        """Copy ONNX-named weights into the estimator (after checking names and shapes)."""
        import onnx

        self.initialise()
        template = onnx.load_model_from_string(self.to_onnx())
        replace_weights(template, weights)  # raises WeightsError on any mismatch
        if self.settings.kind == "mlp":
            layers = len(self.estimator.coefs_)
            names = [("coefficient", "intercepts")] + [(f"coefficient{i}", f"intercepts{i}") for i in range(1, layers)]
            for i, (w_name, b_name) in enumerate(names):
                self.estimator.coefs_[i] = np.array(weights[w_name], dtype=np.float32).reshape(self.estimator.coefs_[i].shape)
                self.estimator.intercepts_[i] = np.array(weights[b_name], dtype=np.float32).reshape(self.estimator.intercepts_[i].shape)
        else:
            coef, intercept = _sgd_names(weights)
            self.estimator.coef_ = np.array(weights[coef], dtype=np.float32).reshape(self.estimator.coef_.shape)
            self.estimator.intercept_ = np.array(weights[intercept], dtype=np.float32).reshape(self.estimator.intercept_.shape)

    def load_onnx(self, data: bytes) -> None:
        """Continue training from a (global) ONNX model's weights."""
        import onnx

        self.load_weights(read_weights(onnx.load_model_from_string(data)))


def _sgd_names(weights: Weights) -> tuple[str, str]:
    names = sorted(weights, key=lambda n: np.size(weights[n]), reverse=True)
    if len(names) != 2:
        raise WeightsError(f"a linear model has 2 float initializers, found {len(names)}: {names}")
    return names[0], names[1]
