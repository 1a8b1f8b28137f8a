"""Hidden-layer activations, each forward next to its derivative.

Every derivative is written in terms of the activation's *output* ``A = f(Z)`` so the
training loop can apply ``f`` in place and drop ``Z``:

* relu:    f'(Z) = [A > 0]
* tanh:    f'(Z) = 1 - A**2
* sigmoid: f'(Z) = A * (1 - A)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def relu(Z: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``max(Z, 0)`` elementwise; ``out=Z`` works in place."""
    # A zero row broadcast over the batch takes numpy's vectorised path; a scalar 0 is
    # slower (benchmarks/engine_speed.py).
    return np.maximum(Z, np.zeros(Z.shape[-1], Z.dtype), out=out)


def relu_backward(A: np.ndarray, dA: np.ndarray) -> np.ndarray:
    """Turn ``dA`` (gradient w.r.t. the output) into ``dZ`` in place, given ``A = relu(Z)``."""
    return np.multiply(dA, A > 0, out=dA)


def tanh(Z: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``tanh(Z)`` elementwise; ``out=Z`` works in place."""
    return np.tanh(Z, out=out)


def tanh_backward(A: np.ndarray, dA: np.ndarray) -> np.ndarray:
    """``dZ = dA * (1 - A**2)`` in place, given ``A = tanh(Z)``."""
    dA -= dA * A * A
    return dA


def sigmoid(Z: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Logistic function, written as ``(1 + tanh(Z/2)) / 2``.

    The tanh form never overflows (``1 / (1 + exp(-Z))`` does for ``Z << 0``).
    """
    out = np.multiply(Z, 0.5, out=out)
    np.tanh(out, out=out)
    out += 1
    out *= 0.5
    return out


def sigmoid_backward(A: np.ndarray, dA: np.ndarray) -> np.ndarray:
    """``dZ = dA * A * (1 - A)`` in place, given ``A = sigmoid(Z)``."""
    dA *= A * (1 - A)
    return dA


@dataclass(frozen=True)
class Activation:
    """An activation's forward ``f(Z, out)`` and its in-place ``backward(A, dA) -> dZ``."""

    name: str
    forward: Callable[..., np.ndarray]
    backward: Callable[[np.ndarray, np.ndarray], np.ndarray]


ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation("relu", relu, relu_backward),
    "tanh": Activation("tanh", tanh, tanh_backward),
    "sigmoid": Activation("sigmoid", sigmoid, sigmoid_backward),
}


def get_activation(name: str) -> Activation:
    """Look an activation up by name; unknown names raise :class:`~mlp.errors.MLPError`."""
    from mlp.errors import MLPError

    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise MLPError(
            f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}"
        ) from None
