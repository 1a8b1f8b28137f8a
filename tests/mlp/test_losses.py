"""Softmax and cross-entropy: stability for huge logits, fused gradient."""

from __future__ import annotations

import numpy as np
import pytest

from mlp.losses import cross_entropy, log_softmax, softmax, softmax_cross_entropy_grad_


def _reference_ce(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-sample CE in extended precision with an explicit log-sum-exp."""
    z = logits.astype(np.longdouble)
    m = z.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
    return lse - z[np.arange(len(y)), y]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_is_stable_for_logits_of_magnitude_1e4(dtype):
    logits = np.array(
        [[1e4, -1e4, 0.0], [-1e4, -1e4 + 1, -1e4 + 2], [1e4, 1e4, 1e4 - 3]], dtype=dtype
    )
    y = np.array([1, 2, 2])
    ours = cross_entropy(logits, y)
    ref = float(_reference_ce(logits, y).mean())
    assert np.isfinite(ours), f"ours {ours} is not finite"
    assert ours == pytest.approx(ref, rel=1e-6), f"ours {ours} vs reference {ref}"


def test_softmax_subtracts_each_rows_max_not_the_global_max():
    # A global-max shift underflows the second row to 0/0; per-row does not.
    logits = np.array([[1e4, 0.0], [0.0, 1.0]])
    p = softmax(logits)
    expected_row2 = np.exp([0.0, 1.0]) / np.exp([0.0, 1.0]).sum()
    assert np.isfinite(p).all(), f"softmax gave {p}"
    np.testing.assert_allclose(p[1], expected_row2, err_msg="row 2: ours vs reference")
    np.testing.assert_allclose(p.sum(axis=1), 1.0, err_msg="rows must sum to one")


def test_log_softmax_matches_reference():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 4)) * 30
    z = logits.astype(np.longdouble)
    ref = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(
        log_softmax(logits),
        ref.astype(np.float64),
        rtol=1e-12,
        atol=1e-12,
        err_msg="ours vs extended-precision reference",
    )


def test_fused_gradient_equals_softmax_minus_onehot_over_n():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((6, 3)) * 5
    y = np.array([0, 1, 2, 2, 1, 0])
    onehot = np.eye(3)[y]
    expected_grad = (softmax(logits) - onehot) / 6
    expected_loss = cross_entropy(logits, y) * 6
    expected_correct = int((logits.argmax(axis=1) == y).sum())
    buf = logits.copy()
    loss_sum, n_correct = softmax_cross_entropy_grad_(buf, y)
    np.testing.assert_allclose(buf, expected_grad, atol=1e-15, err_msg="gradient ours vs ref")
    assert loss_sum == pytest.approx(expected_loss, rel=1e-12), (
        f"loss sum ours {loss_sum} vs {expected_loss}"
    )
    assert n_correct == expected_correct, f"correct ours {n_correct} vs {expected_correct}"
