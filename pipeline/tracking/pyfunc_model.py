"""The MLflow pyfunc wrapper of the final model, logged as "models from code".

MLflow copies this file into the logged model and executes it when the model is loaded, so it
must stay importable on its own: it needs only numpy, mlflow and this project's ``mlp`` engine
and ``pipeline.normalize``, which are logged with the model (its ``code/`` folder), so serving
it needs no install of this project. The weights (``MLP.save`` ``.npz``)
and the normalizer (``Normalizer.to_dict()`` JSON) come in as the model's artifacts.
"""

from __future__ import annotations

import json
import math
from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel, PythonModelContext

WEIGHTS_ARTIFACT = "weights"
NORMALIZER_ARTIFACT = "normalizer"


class MLPClassifierModel(PythonModel):
    """Raw MNIST-style pixels in; class labels out, or class probabilities when asked."""

    def load_context(self, context: PythonModelContext) -> None:
        # Imported here, at load time in the serving process, not when the file is logged.
        from mlp import MLP
        from pipeline.normalize import Normalizer

        self.net = MLP.load(context.artifacts[WEIGHTS_ARTIFACT])
        with open(context.artifacts[NORMALIZER_ARTIFACT], encoding="utf-8") as handle:
            self.normalizer = Normalizer.from_dict(json.load(handle))

    def predict(
        self, context: PythonModelContext, model_input: np.ndarray, params: dict | None = None
    ) -> np.ndarray:
        """Predict class labels, or with ``params={"probabilities": True}`` class probabilities.

        Parameters
        ----------
        model_input : array-like, shape (n_samples, 784) or (n_samples, 28, 28)
            Raw pixels in [0, 255]: flattened or square images, any integer or float dtype
            (``uint8`` as the files hold them, float32, float64), a NumPy array, nested
            lists or a DataFrame of 784 columns.
        params : dict, optional
            ``probabilities`` (bool, default False).

        Returns
        -------
        np.ndarray
            Labels, shape (n_samples,), int64; or probabilities, shape (n_samples, n_classes),
            float64, rows summing to 1.

        Raises
        ------
        pipeline.errors.DataError
            Input of another shape or type, non-finite, or outside [0, 255], in one line.
        """
        pixels = _check_pixels(model_input, self.net.n_features)
        X = self.normalizer.transform(pixels, dtype=self.net.dtype)
        if _wants_probabilities(params):
            return self.net.predict_proba(X).astype(np.float64)
        return self.net.predict(X).astype(np.int64, copy=False)


def _wants_probabilities(params: dict | None) -> bool:
    from pipeline.errors import DataError

    value = (params or {}).get("probabilities", False)
    if not isinstance(value, bool | np.bool_):
        raise DataError(f"param probabilities must be true or false, got {value!r}")
    return bool(value)


def _check_pixels(model_input: Any, n_features: int) -> np.ndarray:
    """Raw pixels as a float array of shape (n, n_features); DataError for anything else.

    Rejects what would otherwise give silent garbage labels: other shapes, non-numbers,
    NaN, values outside [0, 255] (normalized inputs, not raw pixels).
    """
    from pipeline.errors import DataError

    try:
        pixels = np.asarray(model_input)
    except (ValueError, TypeError) as exc:  # ragged nested lists
        raise DataError(f"model input is not an array of pixels: {exc}") from None
    side = math.isqrt(n_features)
    square = (side, side) if side * side == n_features else None
    if pixels.ndim == 3 and pixels.shape[1:] == square:
        pixels = pixels.reshape(pixels.shape[0], n_features)
    if pixels.ndim != 2 or pixels.shape[1] != n_features:
        images = f" or (n_samples, {side}, {side}) images" if square else ""
        raise DataError(
            f"model input must have shape (n_samples, {n_features}) (flattened images){images}, "
            f"got {pixels.shape}"
        )
    if pixels.shape[0] == 0:
        raise DataError("model input has no rows")
    if pixels.dtype.kind not in "iuf":
        raise DataError(f"model input must be real numbers, got dtype {pixels.dtype}")
    if not np.isfinite(pixels).all():
        raise DataError("model input contains NaN or infinite values")
    low, high = pixels.min(), pixels.max()
    if low < 0 or high > 255:
        raise DataError(
            f"model input must be raw pixels in [0, 255], got values from {low:g} to {high:g}"
        )
    return pixels


mlflow.models.set_model(MLPClassifierModel())
