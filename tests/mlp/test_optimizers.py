"""Optimizer update formulas recomputed by hand, and the GD step with L2 worked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from mlp import MLP, MLPError, fit
from mlp.optimizers import SGD, Adam, make_optimizer


def _params_and_grads():
    rng = np.random.default_rng(0)
    p = [rng.standard_normal((3, 2)), rng.standard_normal(2)]
    g1 = [rng.standard_normal((3, 2)), rng.standard_normal(2)]
    g2 = [rng.standard_normal((3, 2)), rng.standard_normal(2)]
    return p, g1, g2


def test_sgd_step():
    p, g, _ = _params_and_grads()
    expected = [x - 0.1 * gx for x, gx in zip(p, g, strict=True)]
    g_before = [x.copy() for x in g]
    SGD(lr=0.1).update(p, g)
    for ours, ref in zip(p, expected, strict=True):
        np.testing.assert_allclose(ours, ref, err_msg="sgd: ours vs p - lr g")
    for after, before in zip(g, g_before, strict=True):
        np.testing.assert_array_equal(after, before, err_msg="update must not change grads")


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_two_steps_by_hand(nesterov):
    p, g1, g2 = _params_and_grads()
    lr, mu = 0.05, 0.9
    ref = [x.copy() for x in p]
    v = [np.zeros_like(x) for x in p]
    for g in (g1, g2):
        for i in range(2):
            v[i] = mu * v[i] - lr * g[i]
            ref[i] = ref[i] + (mu * v[i] - lr * g[i] if nesterov else v[i])
    opt = make_optimizer("nesterov" if nesterov else "momentum", lr=lr, momentum=mu)
    opt.update(p, g1)
    opt.update(p, g2)
    for ours, want in zip(p, ref, strict=True):
        np.testing.assert_allclose(ours, want, rtol=1e-12, err_msg=f"nesterov={nesterov}")


def test_adam_two_steps_by_hand():
    p, g1, g2 = _params_and_grads()
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    ref = [x.copy() for x in p]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    for t, g in enumerate((g1, g2), start=1):
        for i in range(2):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            m_hat = m[i] / (1 - b1**t)
            v_hat = v[i] / (1 - b2**t)
            ref[i] = ref[i] - lr * m_hat / (np.sqrt(v_hat) + eps)
    opt = Adam(lr=lr, beta1=b1, beta2=b2, eps=eps)
    opt.update(p, g1)
    np.testing.assert_allclose(  # first step of Adam moves every entry by about lr
        np.abs(p[0] - _params_and_grads()[0][0]), lr, rtol=1e-4, err_msg="adam step 1 size"
    )
    opt.update(p, g2)
    for ours, want in zip(p, ref, strict=True):
        np.testing.assert_allclose(ours, want, rtol=1e-10, err_msg="adam: ours vs by hand")
    assert opt.t == 2


def test_update_uses_given_learning_rate():
    p, g, _ = _params_and_grads()
    expected = p[0] - 0.5 * g[0]
    SGD(lr=0.1).update(p, g, lr=0.5)
    np.testing.assert_allclose(p[0], expected)


def test_one_gd_step_with_l2_matches_the_hand_worked_update(tiny_problem):
    X, y = tiny_problem
    lr, lam = 0.1, 0.5
    net = MLP(5, [4], 3, dtype="float64", seed=0)
    _, data_grads = net.loss_and_gradients(X, y, l2=0.0)
    W_before = [W.copy() for W in net.weights]
    b_before = [b.copy() for b in net.biases]
    fit(net, X, y, epochs=1, optimizer="gd", lr=lr, l2=lam)
    for i, W in enumerate(net.weights):
        expected = W_before[i] - lr * (data_grads["dW"][i] + lam * W_before[i])
        notebook = W_before[i] - (lr * data_grads["dW"][i] - W_before[i] * lam * lr)
        np.testing.assert_allclose(W, expected, rtol=1e-12, err_msg=f"W{i}: ours vs by hand")
        assert not np.allclose(W, notebook), f"W{i} followed the notebook's growing update"
        # Biases are not decayed.
        np.testing.assert_allclose(
            net.biases[i],
            b_before[i] - lr * data_grads["db"][i],
            rtol=1e-12,
            err_msg=f"b{i}: biases must not be decayed",
        )


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: SGD(lr=0), "learning rate"),
        (lambda: SGD(lr=float("nan")), "learning rate"),
        (lambda: SGD(lr=0.1, momentum=1.0), "momentum"),
        (lambda: Adam(beta1=1.0), "beta1"),
        (lambda: make_optimizer("rmsprop"), "unknown optimizer"),
        (lambda: make_optimizer("adam", momentum=0.9), "bad options"),
    ],
)
def test_bad_optimizer_arguments(call, match):
    with pytest.raises(MLPError, match=match):
        call()


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "nesterov"])
def test_one_epoch_equals_the_loop_written_by_hand(tiny_problem, optimizer):
    # fit folds lr into the gradients for these optimizers; the result must not change.
    X, y = tiny_problem  # 7 samples, batches of 3: sizes 3, 3, 1
    lr, lam, mu = 0.2, 0.01, 0.9
    net = MLP(5, [4], 3, dtype="float64", seed=0)
    ref = net.copy()
    velocity = [np.zeros_like(p) for p in ref.params]
    losses = []
    for lo in range(0, 7, 3):
        loss, grads = ref.loss_and_gradients(X[lo : lo + 3], y[lo : lo + 3], l2=lam)
        losses.append(loss.data * len(y[lo : lo + 3]))
        flat = [g for pair in zip(grads["dW"], grads["db"], strict=True) for g in pair]
        for p, g, v in zip(ref.params, flat, velocity, strict=True):
            if optimizer == "sgd":
                p -= lr * g
                continue
            v[...] = mu * v - lr * g
            p += mu * v - lr * g if optimizer == "nesterov" else v
    rec = fit(
        net,
        X,
        y,
        epochs=1,
        optimizer=optimizer,
        lr=lr,
        momentum=mu,
        l2=lam,
        batch_size=3,
        shuffle=False,
    ).records[0]
    for ours, want in zip(net.params, ref.params, strict=True):
        np.testing.assert_allclose(ours, want, rtol=1e-12, err_msg=f"{optimizer}: fit vs by hand")
    assert rec["train_loss"] == pytest.approx(sum(losses) / 7, rel=1e-12), (
        f"train_loss ours {rec['train_loss']} vs sample mean over batches {sum(losses) / 7}"
    )


def test_adam_refuses_lr_folded_gradients():
    p, g, _ = _params_and_grads()
    with pytest.raises(MLPError, match="cannot take lr-folded"):
        Adam().update(p, g, lr_folded=True)
