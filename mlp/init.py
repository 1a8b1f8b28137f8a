"""Weight initialisation schemes.

* ``he``: ``N(0, 2 / fan_in)``, for ReLU (He et al. 2015).
* ``glorot``: ``U(-a, a)`` with ``a = sqrt(6 / (fan_in + fan_out))`` (Glorot & Bengio 2010).
* ``notebook``: ``N(0, 1) / sqrt(fan_out)``, the homework notebook's scheme (biases too).

Biases start at zero except for ``notebook``, which draws them like the weights.
"""

from __future__ import annotations

import numpy as np

from mlp.errors import MLPError

INITS = ("he", "glorot", "notebook")


def init_layer(
    name: str, fan_in: int, fan_out: int, rng: np.random.Generator, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one layer's parameters.

    Returns
    -------
    W : ndarray, shape (fan_in, fan_out)
    b : ndarray, shape (fan_out,)
    """
    if name == "he":
        W = rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)
        b = np.zeros(fan_out)
    elif name == "glorot":
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        W = rng.uniform(-limit, limit, size=(fan_in, fan_out))
        b = np.zeros(fan_out)
    elif name == "notebook":
        W = rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_out)
        b = rng.standard_normal(fan_out) / np.sqrt(fan_out)
    else:
        raise MLPError(f"unknown init {name!r}; choose one of {list(INITS)}")
    # Draw in float64 then cast: the same seed gives the same values in both dtypes.
    return np.ascontiguousarray(W, dtype=dtype), np.ascontiguousarray(b, dtype=dtype)
