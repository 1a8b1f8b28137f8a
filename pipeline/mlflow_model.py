"""The MLflow pyfunc wrapper of the final model, logged as "models from code".

MLflow copies this file into the logged model and executes it when the model is loaded, so it
must stay importable on its own: it needs only numpy, mlflow and this project's ``mlp`` engine
and ``pipeline.normalize`` (installed with ``mlp-pipeline``). The weights (``MLP.save`` ``.npz``)
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
        """
        pixels = np.asarray(model_input)
        X = self.normalizer.transform(pixels, dtype=self.net.dtype)
        return self.net.predict(X).astype(np.int64, copy=False)


mlflow.models.set_model(MLPClassifierModel())
