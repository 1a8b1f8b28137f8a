"""The MLflow pyfunc wrapper of the final model, logged as "models from code".

MLflow copies this file into the logged model and executes it when the model is loaded, so it
must stay importable on its own: it needs only numpy, mlflow and this project's ``mlp`` engine
and ``pipeline.normalize``, which are logged with the model (its ``code/`` folder), so serving
it needs no install of this project. The weights (``MLP.save`` ``.npz``)
and the normalizer (``Normalizer.to_dict()`` JSON) come in as the model's artifacts.
"""

from __future__ import annotations

import json

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel, PythonModelContext

WEIGHTS_ARTIFACT = "weights"
NORMALIZER_ARTIFACT = "normalizer"


class MLPClassifierModel(PythonModel):
    """Raw MNIST-style pixels in, class labels out."""

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
        """Predict class labels.

        Parameters
        ----------
        model_input : np.ndarray, shape (n_samples, 784)
            Raw pixels in [0, 255], float32 (the logged signature).

        Returns
        -------
        np.ndarray, shape (n_samples,), int64

        Raises
        ------
        pipeline.errors.DataError
            Input of the wrong shape or dtype, non-finite, or outside [0, 255].
        """
        pixels = _check_pixels(np.asarray(model_input), self.net.n_features)
        X = self.normalizer.transform(pixels, dtype=self.net.dtype)
        return self.net.predict(X).astype(np.int64, copy=False)


def _check_pixels(pixels: np.ndarray, n_features: int) -> np.ndarray:
    """Reject what would otherwise give silent garbage labels: raw pixels only, (n, n_features)."""
    from pipeline.errors import DataError

    if pixels.ndim != 2 or pixels.shape[1] != n_features:
        raise DataError(
            f"model input must have shape (n_samples, {n_features}) (flattened images), "
            f"got {pixels.shape}"
        )
    if pixels.shape[0] == 0:
        raise DataError("model input has no rows")
    if pixels.dtype.kind not in "biuf":
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
