"""RUL prediction with onnxruntime: what every site runs every cycle, trainer or not."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort


class OnnxPredictor:
    """An ONNX RUL model loaded once into onnxruntime, predicting from raw window features."""

    def __init__(self, model: bytes, cap: float | None = None) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # one small model per call: threads cost more than they save
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0].name
        self.cap = np.inf if cap is None else float(cap)  # the RUL cap the model was trained to

    def predict(self, features: np.ndarray) -> np.ndarray:
        """(N, F) or (F,) raw features -> (N,) RUL in cycles, clipped to [0, cap]: the model
        was trained on RUL capped there, so anything outside is extrapolation. A NaN or
        infinite output comes back NaN (not the cap), for the caller to refuse."""
        y = self.predict_unclipped(features)
        return np.where(np.isfinite(y), np.clip(y, 0.0, self.cap), np.nan)  # a blown-up output stays refusable

    def predict_unclipped(self, features: np.ndarray) -> np.ndarray:
        """The model's own output: for judging a model's health (the rollback score), where a
        blown-up model must not hide behind the clip."""
        x = np.atleast_2d(np.asarray(features, dtype=np.float32))
        return self.session.run(None, {self._input: x})[0].reshape(-1)
