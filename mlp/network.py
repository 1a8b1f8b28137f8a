"""The multilayer perceptron: parameters, forward pass, loss and gradients.

Layer ``l`` computes ``Z_l = A_{l-1} @ W_l + b_l`` with ``W_l`` of shape (fan_in, fan_out)
and ``b_l`` of shape (fan_out,); hidden layers apply the activation, the last layer
outputs logits and the loss is the softmax cross-entropy.

L2 convention (stated once, used everywhere in this package): the training objective is

    objective = mean_i CE_i + l2 / 2 * sum_l ||W_l||_F^2

so the penalty's gradient is ``l2 * W_l``; biases are not penalised. This differs from
scikit-learn's ``MLPClassifier``, whose ``alpha`` enters as ``alpha / (2 n) * sum ||W||^2``
(``l2 = alpha / n_samples`` reproduces it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlp.activations import get_activation
from mlp.errors import MLPError
from mlp.init import INITS, init_layer
from mlp.losses import log_softmax, softmax
from mlp.serialization import load_state, model_file_error, save_state
from mlp.validation import check_dtype, check_number, check_X, check_y
from mlp.workspace import Workspace, train_step

# Rows per chunk when predicting: bounds memory for large inputs without slowing BLAS.
_CHUNK = 8192


@dataclass(frozen=True)
class Loss:
    """Mean cross-entropy ``data``, L2 ``penalty`` (l2/2 sum ||W||^2), ``total`` (their sum)."""

    data: float
    penalty: float
    total: float


class MLP:
    """A fully connected network with softmax output, trained by :func:`mlp.fit`.

    Parameters
    ----------
    n_features : int
        Input width.
    hidden_sizes : sequence of int
        Width of each hidden layer; empty means softmax regression.
    n_classes : int
        Number of classes (>= 2).
    activation : {"relu", "tanh", "sigmoid"}
    init : {"he", "glorot", "notebook"}
        See :mod:`mlp.init`.
    dtype : {"float32", "float64"}
    seed : int
        Seeds ``np.random.default_rng`` for the initial weights.

    Attributes
    ----------
    weights : list of ndarray, weights[l] shape (fan_in_l, fan_out_l)
    biases : list of ndarray, biases[l] shape (fan_out_l,)
    """

    def __init__(
        self,
        n_features: int,
        hidden_sizes: Sequence[int] = (),
        n_classes: int = 10,
        activation: str = "relu",
        init: str = "he",
        dtype: str = "float32",
        seed: int | None = 0,
    ) -> None:
        check_number("n_features", n_features, low=1, integer=True)
        check_number("n_classes", n_classes, low=2, integer=True)
        if isinstance(hidden_sizes, int | str) or not isinstance(hidden_sizes, Sequence):
            raise MLPError(f"hidden_sizes must be a list of integers, got {hidden_sizes!r}")
        for h in hidden_sizes:
            check_number("each hidden size", h, low=1, integer=True)
        if init not in INITS:
            raise MLPError(f"unknown init {init!r}; choose one of {list(INITS)}")
        self._act = get_activation(activation)
        self.activation = activation
        self.init = init
        self.dtype = check_dtype(dtype)
        self.seed = seed
        sizes = [int(n_features), *(int(h) for h in hidden_sizes), int(n_classes)]
        rng = np.random.default_rng(seed)
        self.weights: list[np.ndarray] = []
        self.biases: list[np.ndarray] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            W, b = init_layer(init, fan_in, fan_out, rng, self.dtype)
            self.weights.append(W)
            self.biases.append(b)

    # ----------------------------------------------------------------- description
    @property
    def n_features(self) -> int:
        return self.weights[0].shape[0]

    @property
    def hidden_sizes(self) -> list[int]:
        return [W.shape[1] for W in self.weights[:-1]]

    @property
    def n_classes(self) -> int:
        return self.weights[-1].shape[1]

    @property
    def architecture(self) -> dict:
        """``{"n_features", "hidden_sizes", "n_classes", "activation", "dtype"}`` (JSON-ready)."""
        return {
            "n_features": self.n_features,
            "hidden_sizes": self.hidden_sizes,
            "n_classes": self.n_classes,
            "activation": self.activation,
            "dtype": self.dtype.name,
        }

    @property
    def params(self) -> list[np.ndarray]:
        """``[W0, b0, W1, b1, ...]``: the live arrays (optimizers update them in place)."""
        return [p for pair in zip(self.weights, self.biases, strict=True) for p in pair]

    def __repr__(self) -> str:
        a = self.architecture
        return (
            f"MLP(n_features={a['n_features']}, hidden_sizes={a['hidden_sizes']}, "
            f"n_classes={a['n_classes']}, activation={a['activation']!r}, dtype={a['dtype']!r})"
        )

    # ----------------------------------------------------------------- inference
    def forward(self, X: np.ndarray) -> np.ndarray:
        """Logits of a batch (no dropout).

        Parameters
        ----------
        X : ndarray, shape (n, n_features)
            Cast to the network's dtype if needed.

        Returns
        -------
        ndarray, shape (n, n_classes)
        """
        # NaN/inf inputs would otherwise give confident-looking labels (argmax of NaN is 0).
        X = check_X(X, self.n_features, self.dtype, finite=True)
        if X.shape[0] <= _CHUNK:
            return self._forward(X)
        return np.concatenate(
            [self._forward(X[i : i + _CHUNK]) for i in range(0, X.shape[0], _CHUNK)]
        )

    def _forward(self, X: np.ndarray) -> np.ndarray:
        A = X
        last = len(self.weights) - 1
        for layer, (W, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            A = A @ W
            A += b
            if layer < last:
                self._act.forward(A, out=A)
        return A

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (n, n_classes); rows sum to one."""
        return softmax(self.forward(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predicted class labels, shape (n,), int64."""
        return self.forward(X).argmax(axis=1).astype(np.int64)

    def score(self, X: np.ndarray, y: np.ndarray) -> float:
        """Accuracy in [0, 1] on ``X`` (n, n_features) with labels ``y`` (n,)."""
        X = check_X(X, self.n_features, self.dtype)
        y = check_y(y, X.shape[0], self.n_classes)
        return float(np.mean(self.predict(X) == y))

    # ----------------------------------------------------------------- loss, gradients
    def penalty(self, l2: float) -> float:
        """L2 penalty ``l2 / 2 * sum_l ||W_l||^2`` (biases excluded)."""
        if not l2:
            return 0.0
        return 0.5 * float(l2) * sum(float(np.vdot(W, W)) for W in self.weights)

    def loss(self, X: np.ndarray, y: np.ndarray, l2: float = 0.0) -> Loss:
        """Mean cross-entropy on ``(X, y)``, the L2 penalty, and their sum.

        Parameters
        ----------
        X : ndarray, shape (n, n_features)
        y : ndarray of int, shape (n,)
        l2 : float >= 0
        """
        check_number("l2", l2, low=0)
        logits = self.forward(X)
        y = check_y(y, logits.shape[0], self.n_classes)
        data = float(-log_softmax(logits)[np.arange(len(y)), y].mean(dtype=np.float64))
        pen = self.penalty(l2)
        return Loss(data=data, penalty=pen, total=data + pen)

    def loss_and_gradients(
        self, X: np.ndarray, y: np.ndarray, l2: float = 0.0
    ) -> tuple[Loss, dict[str, list[np.ndarray]]]:
        """Objective and its gradient on one batch (no dropout).

        Parameters
        ----------
        X : ndarray, shape (n, n_features)
        y : ndarray of int, shape (n,)
        l2 : float >= 0
            Objective ``mean CE + l2/2 sum ||W||^2``; biases are not decayed.

        Returns
        -------
        loss : Loss
        grads : dict
            ``grads["dW"][l]`` shape (fan_in_l, fan_out_l), ``grads["db"][l]`` shape
            (fan_out_l,): one gradient per bias unit.
        """
        check_number("l2", l2, low=0)
        X = check_X(X, self.n_features, self.dtype)
        y = check_y(y, X.shape[0], self.n_classes)
        ws = Workspace(self, X.shape[0], gather=False)
        loss_sum, _ = train_step(self, ws, X, y, float(l2))
        data = loss_sum / X.shape[0]
        pen = self.penalty(l2)
        return Loss(data=data, penalty=pen, total=data + pen), {"dW": ws.dW, "db": ws.db}

    # ----------------------------------------------------------------- state
    def get_state(self) -> dict:
        """Plain, picklable state: ``architecture``, ``init``, ``weights``, ``biases`` (copies)."""
        return {
            "architecture": self.architecture,
            "init": self.init,
            "weights": [W.copy() for W in self.weights],
            "biases": [b.copy() for b in self.biases],
        }

    @classmethod
    def from_state(cls, state: dict) -> MLP:
        """Inverse of :meth:`get_state`."""
        arch = state["architecture"]
        return cls.from_arrays(
            state["weights"],
            state["biases"],
            activation=arch["activation"],
            dtype=arch["dtype"],
            init=state.get("init", "he"),
        )

    @classmethod
    def from_arrays(
        cls,
        weights: Sequence[np.ndarray],
        biases: Sequence[np.ndarray],
        activation: str = "relu",
        dtype: str | None = None,
        init: str = "he",
    ) -> MLP:
        """Build a network around given parameters (copied, cast to ``dtype``).

        Parameters
        ----------
        weights : sequence of ndarray, weights[l] shape (fan_in_l, fan_out_l)
        biases : sequence of ndarray, biases[l] shape (fan_out_l,)
        activation : str
        dtype : str, optional
            Defaults to the dtype of ``weights[0]``.
        init : str
            Recorded only (saved in model files).
        """
        _check_layer_shapes(weights, biases)
        dt = check_dtype(dtype if dtype is not None else np.asarray(weights[0]).dtype)
        net = cls.__new__(cls)
        net._act = get_activation(activation)
        net.activation = activation
        net.init = init
        net.dtype = dt
        net.seed = None
        net.weights = [np.array(W, dtype=dt, order="C") for W in weights]
        net.biases = [np.array(b, dtype=dt, order="C") for b in biases]
        if net.n_classes < 2:
            raise MLPError(f"the last layer must have >= 2 outputs, got {net.n_classes}")
        return net

    def copy(self) -> MLP:
        """An independent copy (same architecture, copied parameters)."""
        return MLP.from_state(self.get_state())

    def save(self, path: str | Path) -> Path:
        """Write the network to one ``.npz`` file (see :mod:`mlp.serialization`).

        Returns
        -------
        Path
            The file written (exactly ``path``; written atomically).
        """
        return save_state(self.get_state(), path)

    @classmethod
    def load(cls, path: str | Path, expected_architecture: dict | None = None) -> MLP:
        """Read a network written by :meth:`save`; problems raise ModelFileError.

        Parameters
        ----------
        path : str or Path
        expected_architecture : dict, optional
            If given, every key in it must equal the file's architecture (``hidden_sizes``
            compared as lists).
        """
        state = load_state(path, expected_architecture=expected_architecture)
        try:
            return cls.from_state(state)
        except MLPError as exc:  # e.g. an unknown activation: the file is still the problem
            raise model_file_error(path, str(exc)) from None


def _check_layer_shapes(weights: Sequence[np.ndarray], biases: Sequence[np.ndarray]) -> None:
    """>= 1 layer, each ``W`` 2-d with a matching ``b``, each fan_in the previous fan_out."""
    if len(weights) == 0 or len(weights) != len(biases):
        raise MLPError(
            f"need as many weight matrices as bias vectors (>= 1), got "
            f"{len(weights)} and {len(biases)}"
        )
    shapes = [np.shape(W) for W in weights]
    for layer, (s, b) in enumerate(zip(shapes, biases, strict=True)):
        if len(s) != 2 or np.shape(b) != (s[1],):
            raise MLPError(f"layer {layer}: W shape {s} and b shape {np.shape(b)} disagree")
        if layer and shapes[layer - 1][1] != s[0]:
            raise MLPError(
                f"layer {layer}: fan_in {s[0]} != previous fan_out {shapes[layer - 1][1]}"
            )


def save(net: MLP, path: str | Path) -> Path:
    """Write ``net`` to ``path`` as one ``.npz`` file; same as ``net.save(path)``."""
    return net.save(path)


def load(path: str | Path, expected_architecture: dict | None = None) -> MLP:
    """Read a network written by :func:`save`; same as :meth:`MLP.load`."""
    return MLP.load(path, expected_architecture=expected_architecture)
