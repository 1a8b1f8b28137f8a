"""The network's gradients (finite differences), loss, shapes and constructor checks."""

from __future__ import annotations

import numpy as np
import pytest

from mlp import MLP, MLPError


def _numeric_gradients(net: MLP, X, y, l2: float, eps: float = 1e-6):
    """Central finite differences of ``net.loss(...).total`` for every parameter."""
    grads = []
    for p in net.params:
        g = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            old = p[i]
            p[i] = old + eps
            up = net.loss(X, y, l2=l2).total
            p[i] = old - eps
            down = net.loss(X, y, l2=l2).total
            p[i] = old
            g[i] = (up - down) / (2 * eps)
        grads.append(g)
    return grads


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
@pytest.mark.parametrize("hidden_sizes", [[], [4], [4, 3], [4, 3, 3]])
def test_gradients_match_finite_differences(tiny_problem, activation, hidden_sizes):
    X, y = tiny_problem
    net = MLP(5, hidden_sizes, 3, activation=activation, init="glorot", dtype="float64", seed=3)
    # Non-zero biases so every term of the gradient is exercised.
    for b in net.biases:
        b[:] = np.random.default_rng(4).standard_normal(b.shape) * 0.1
    l2 = 0.3
    loss, grads = net.loss_and_gradients(X, y, l2=l2)
    analytic = [g for pair in zip(grads["dW"], grads["db"], strict=True) for g in pair]
    numeric = _numeric_gradients(net, X, y, l2)
    names = [f"{k}{i}" for i in range(len(net.weights)) for k in ("dW", "db")]
    for name, ours, ref in zip(names, analytic, numeric, strict=True):
        np.testing.assert_allclose(
            ours,
            ref,
            rtol=1e-5,
            atol=1e-8,
            err_msg=f"{activation} {hidden_sizes} {name}: ours vs finite differences",
        )
    assert loss.total == pytest.approx(net.loss(X, y, l2=l2).total, rel=1e-12), (
        "loss from loss_and_gradients vs loss()"
    )


def test_bias_gradient_has_one_entry_per_unit(tiny_problem):
    X, y = tiny_problem
    net = MLP(5, [4, 6], 3, dtype="float64")
    _, grads = net.loss_and_gradients(X, y)
    shapes = [g.shape for g in grads["db"]]
    assert shapes == [(4,), (6,), (3,)], f"bias gradient shapes {shapes}"
    # Per unit, not one scalar: the entries differ.
    assert np.ptp(grads["db"][-1]) > 0, f"db of the output layer {grads['db'][-1]}"


def test_loss_reports_data_and_penalty_separately(tiny_problem):
    X, y = tiny_problem
    net = MLP(5, [4], 3, dtype="float64")
    loss = net.loss(X, y, l2=0.5)
    expected_penalty = 0.25 * sum(float((W**2).sum()) for W in net.weights)
    assert loss.penalty == pytest.approx(expected_penalty), (
        f"penalty ours {loss.penalty} vs 0.5/2 * sum ||W||^2 = {expected_penalty}"
    )
    assert loss.data == pytest.approx(net.loss(X, y).total), "data term must not depend on l2"
    assert loss.total == pytest.approx(loss.data + loss.penalty)


def test_shapes_dtypes_and_predictions():
    net = MLP(6, [5, 4], 3, dtype="float32", seed=0)
    X = np.random.default_rng(0).standard_normal((9, 6))  # float64 in, cast once
    logits = net.forward(X)
    proba = net.predict_proba(X)
    pred = net.predict(X)
    assert logits.shape == (9, 3) and logits.dtype == np.float32, f"{logits.shape} {logits.dtype}"
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    assert pred.dtype == np.int64 and pred.shape == (9,), f"{pred.dtype} {pred.shape}"
    np.testing.assert_array_equal(pred, logits.argmax(axis=1))
    assert net.score(X, pred) == 1.0
    assert [W.shape for W in net.weights] == [(6, 5), (5, 4), (4, 3)]
    assert [b.shape for b in net.biases] == [(5,), (4,), (3,)]
    assert net.architecture == {
        "n_features": 6,
        "hidden_sizes": [5, 4],
        "n_classes": 3,
        "activation": "relu",
        "dtype": "float32",
    }


def test_large_inputs_are_predicted_in_chunks_identically():
    net = MLP(3, [4], 2, dtype="float64", seed=0)
    X = np.random.default_rng(0).standard_normal((20000, 3))
    whole = net._forward(X)
    np.testing.assert_allclose(net.forward(X), whole, rtol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_features": 0}, "n_features"),
        ({"n_classes": 1}, "n_classes"),
        ({"hidden_sizes": [4, 0]}, "hidden size"),
        ({"hidden_sizes": 4}, "hidden_sizes"),
        ({"activation": "softplus"}, "activation"),
        ({"init": "xavier"}, "init"),
        ({"dtype": "float16"}, "dtype"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    args = {"n_features": 4, "hidden_sizes": [3], "n_classes": 2, **kwargs}
    with pytest.raises(MLPError, match=match):
        MLP(**args)


def test_init_schemes_have_their_documented_scale():
    rng_sizes = (400, 300)
    he = MLP(400, [300], 2, init="he", dtype="float64").weights[0]
    glorot = MLP(400, [300], 2, init="glorot", dtype="float64").weights[0]
    notebook = MLP(400, [300], 2, init="notebook", dtype="float64")
    assert he.std() == pytest.approx(np.sqrt(2 / 400), rel=0.02), f"he std {he.std()}"
    limit = np.sqrt(6 / sum(rng_sizes))
    assert np.abs(glorot).max() <= limit and np.abs(glorot).max() > 0.99 * limit
    assert notebook.weights[0].std() == pytest.approx(1 / np.sqrt(300), rel=0.02)
    assert notebook.biases[0].std() > 0, "notebook init draws the biases too"


def test_same_seed_same_init_both_dtypes():
    a = MLP(10, [8], 3, seed=5, dtype="float64")
    b = MLP(10, [8], 3, seed=5, dtype="float32")
    c = MLP(10, [8], 3, seed=6, dtype="float64")
    np.testing.assert_allclose(a.weights[0], b.weights[0], rtol=1e-6)
    assert not np.array_equal(a.weights[0], c.weights[0]), "different seeds gave equal weights"


def test_state_round_trip():
    net = MLP(4, [3], 2, activation="tanh", seed=1)
    clone = MLP.from_state(net.get_state())
    X = np.random.default_rng(0).standard_normal((5, 4))
    np.testing.assert_array_equal(clone.forward(X), net.forward(X))
    assert clone.architecture == net.architecture
    clone.weights[0][0, 0] += 1
    assert clone.weights[0][0, 0] != net.weights[0][0, 0], "get_state must copy"
    with pytest.raises(MLPError, match="disagree"):
        MLP.from_arrays([np.zeros((4, 3))], [np.zeros(2)])


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
def test_dropout_gradients_match_finite_differences_for_a_fixed_mask(tiny_problem, activation):
    from mlp.workspace import Workspace, train_step

    X, y = tiny_problem
    net = MLP(5, [6, 4], 3, activation=activation, dtype="float64", seed=1)
    for b in net.biases:  # off zero: a fully dropped row would sit on relu's kink
        b[:] = np.random.default_rng(4).uniform(0.05, 0.2, b.shape)
    ws = Workspace(net, X.shape[0], dropout=0.4, gather=False)

    def objective() -> float:
        # The same seed draws the same masks, so the objective is a smooth function.
        loss_sum, _ = train_step(net, ws, X, y, 0.0, np.random.default_rng(7))
        return loss_sum / X.shape[0]

    objective()
    analytic = [g.copy() for g in ws.grads]
    eps = 1e-6
    for k, p in enumerate(net.params):
        numeric = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            old = p[i]
            p[i] = old + eps
            up = objective()
            p[i] = old - eps
            down = objective()
            p[i] = old
            numeric[i] = (up - down) / (2 * eps)
        np.testing.assert_allclose(
            analytic[k],
            numeric,
            rtol=1e-5,
            atol=1e-8,
            err_msg=f"{activation} param {k} with dropout: ours vs finite differences",
        )


def test_network_pickles_for_worker_processes():
    import pickle

    net = MLP(4, [3], 2, activation="sigmoid", seed=1)
    clone = pickle.loads(pickle.dumps(net))
    X = np.random.default_rng(0).standard_normal((5, 4))
    np.testing.assert_array_equal(clone.forward(X), net.forward(X))
