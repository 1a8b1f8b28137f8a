"""Each activation's derivative against central finite differences."""

from __future__ import annotations

import numpy as np
import pytest

from mlp.activations import ACTIVATIONS, get_activation
from mlp.errors import MLPError


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_derivative_matches_finite_differences(name):
    act = get_activation(name)
    # Avoid 0 where relu has no derivative.
    Z = np.linspace(-3, 3, 40) + 0.013
    eps = 1e-6
    numeric = (act.forward(Z + eps) - act.forward(Z - eps)) / (2 * eps)
    A = act.forward(Z.copy())
    analytic = act.backward(A, np.ones_like(Z))
    np.testing.assert_allclose(
        analytic,
        numeric,
        rtol=1e-6,
        atol=1e-8,
        err_msg=f"{name}: ours (analytic) vs finite differences",
    )


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_forward_in_place_matches_out_of_place(name):
    act = get_activation(name)
    Z = np.linspace(-5, 5, 11)
    expected = act.forward(Z)
    buf = Z.copy()
    act.forward(buf, out=buf)
    np.testing.assert_array_equal(buf, expected, err_msg=f"{name}: in place vs out of place")


def test_sigmoid_is_finite_and_saturates_without_overflow():
    sig = get_activation("sigmoid").forward
    with np.errstate(all="raise"):
        values = sig(np.array([-1e4, -50.0, 0.0, 50.0, 1e4]))
    np.testing.assert_allclose(
        values, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-15, err_msg=f"sigmoid values {values}"
    )


def test_unknown_activation_raises():
    with pytest.raises(MLPError, match="unknown activation 'gelu'"):
        get_activation("gelu")
