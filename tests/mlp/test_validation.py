"""Input checks shared by the network and fit."""

from __future__ import annotations

import numpy as np
import pytest

from mlp import MLPError
from mlp.validation import check_X, check_y


def test_finite_check_accepts_huge_finite_values_whose_sum_overflows():
    X = np.full((4, 3), 3e38, dtype=np.float32)  # X.sum() is inf, every entry is finite
    out = check_X(X, 3, np.dtype(np.float32), finite=True)
    assert out is X, "a C-contiguous array of the right dtype must not be copied"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_finite_check_rejects_nan_and_inf(bad):
    X = np.zeros((4, 3))
    X[2, 1] = bad
    with pytest.raises(MLPError, match="NaN or infinite"):
        check_X(X, 3, np.dtype(np.float64), finite=True)


def test_labels_are_converted_once_and_checked():
    y = np.array([0, 3, 9], dtype=np.uint8)
    out = check_y(y, 3, 10)
    assert out.dtype == np.intp and out.tolist() == [0, 3, 9], f"got {out!r}"
    with pytest.raises(MLPError, match=r"y must have shape \(3,\)"):
        check_y(np.zeros((3, 1), dtype=int), 3, 10)
