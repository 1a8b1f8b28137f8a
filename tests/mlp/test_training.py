"""The fit loop on a small real-MNIST subset: optimizers, schedules, L2, dropout,
determinism, early stopping, divergence and argument validation."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from mlp import MLP, DivergenceError, MLPError, fit
from mlp.optimizers import Adam
from mlp.training import RECORD_KEYS

# (optimizer, lr, batch_size): settings that train a small net in a few epochs.
OPTIMIZERS = [
    ("gd", 0.5, None),
    ("sgd", 0.1, 64),
    ("momentum", 0.05, 64),
    ("nesterov", 0.05, 64),
    ("adam", 0.002, 64),
]


def _net(**kwargs) -> MLP:
    return MLP(784, kwargs.pop("hidden_sizes", [32]), 10, seed=kwargs.pop("seed", 0), **kwargs)


@pytest.mark.parametrize(("optimizer", "lr", "batch_size"), OPTIMIZERS)
def test_every_optimizer_lowers_the_loss(mnist_small, optimizer, lr, batch_size):
    X, y, _, _ = mnist_small
    net = _net()
    before = net.loss(X, y).data
    history = fit(net, X, y, epochs=4, optimizer=optimizer, lr=lr, batch_size=batch_size)
    after = net.loss(X, y).data
    assert after < 0.8 * before, f"{optimizer}: loss {before:.3f} -> {after:.3f}"
    losses = [r["train_loss"] for r in history.records]
    assert losses[-1] < losses[0], f"{optimizer}: train_loss per epoch {losses}"


@pytest.mark.parametrize(
    ("schedule", "kwargs"),
    [("constant", {}), ("step", {"step_size": 2, "gamma": 0.5}), ("cosine", {"min_lr": 0.0})],
)
def test_every_schedule_lowers_the_loss_and_is_applied(mnist_small, schedule, kwargs):
    X, y, _, _ = mnist_small
    net = _net()
    before = net.loss(X, y).data
    history = fit(net, X, y, epochs=4, lr=0.1, schedule=schedule, schedule_kwargs=kwargs)
    after = net.loss(X, y).data
    lrs = history.as_columns()["lr"]
    assert after < 0.8 * before, f"{schedule}: loss {before:.3f} -> {after:.3f}"
    assert lrs[0] == pytest.approx(0.1), f"{schedule}: lrs {lrs}"
    if schedule != "constant":
        assert lrs[-1] < lrs[0], f"{schedule}: lr did not decrease: {lrs}"


def test_larger_l2_gives_smaller_weights(mnist_small):
    X, y, _, _ = mnist_small
    norms = []
    for lam in (0.0, 1e-3, 1e-2):
        net = _net()
        fit(net, X, y, epochs=3, lr=0.1, l2=lam)
        norms.append(sum(float(np.sum(W.astype(np.float64) ** 2)) for W in net.weights))
    assert norms[0] > norms[1] > norms[2], f"sum ||W||^2 for l2 = 0, 1e-3, 1e-2: {norms}"


def test_train_objective_adds_the_penalty(mnist_small):
    X, y, _, _ = mnist_small
    net = _net()
    rec = fit(net, X, y, epochs=1, optimizer="gd", lr=0.1, l2=0.01).records[0]
    assert rec["train_objective"] > rec["train_loss"], f"record {rec}"
    rec0 = fit(_net(), X, y, epochs=1, lr=0.1).records[0]
    assert rec0["train_objective"] == rec0["train_loss"], "without l2 both are equal"


def test_full_batch_metrics_are_those_of_the_step_forward_pass(mnist_small):
    X, y, _, _ = mnist_small
    net = _net(dtype="float64")
    X64 = X.astype(np.float64)
    before = net.loss(X64, y)
    acc_before = net.score(X64, y)
    rec = fit(net, X64, y, epochs=1, optimizer="gd", lr=0.1).records[0]
    assert rec["train_loss"] == pytest.approx(before.data, rel=1e-10), f"{rec} vs {before}"
    assert rec["train_accuracy"] == pytest.approx(acc_before), f"{rec} vs {acc_before}"


def test_history_records_and_callback(mnist_small):
    X, y, Xv, yv = mnist_small
    seen = []
    history = fit(_net(), X, y, epochs=2, lr=0.1, X_val=Xv, y_val=yv, callback=seen.append)
    assert [r["epoch"] for r in seen] == [1, 2], f"callback saw {seen}"
    assert seen == history.records
    columns = history.as_columns()
    assert tuple(columns) == RECORD_KEYS and all(len(v) == 2 for v in columns.values())
    assert 0 < history.records[-1]["val_accuracy"] <= 1
    assert history.best_epoch in (1, 2) and history.stopped_epoch is None
    no_val = fit(_net(), X, y, epochs=1, lr=0.1).records[0]
    assert math.isnan(no_val["val_loss"]) and math.isnan(no_val["val_accuracy"])


def test_same_seed_gives_identical_weights_and_different_seed_differs(mnist_small):
    X, y, _, _ = mnist_small

    def train(net_seed, fit_seed, dropout=0.0):
        net = _net(seed=net_seed)
        fit(net, X[:600], y[:600], epochs=2, lr=0.1, dropout=dropout, seed=fit_seed)
        return net.params

    a, b = train(0, 0, dropout=0.2), train(0, 0, dropout=0.2)
    for i, (pa, pb) in enumerate(zip(a, b, strict=True)):
        np.testing.assert_array_equal(pa, pb, err_msg=f"param {i} differs with the same seed")
    for other in (train(0, 1, dropout=0.2), train(1, 0, dropout=0.2), train(0, 0)):
        assert not np.array_equal(a[0], other[0]), "different seed/dropout gave equal weights"


def test_dropout_trains_and_leaves_inference_deterministic(mnist_small):
    X, y, Xv, yv = mnist_small
    net = _net(hidden_sizes=[64])
    fit(net, X, y, epochs=4, lr=0.1, dropout=0.3)
    acc = net.score(Xv, yv)
    assert acc > 0.8, f"validation accuracy with dropout {acc}"
    np.testing.assert_array_equal(net.forward(Xv), net.forward(Xv))


def test_early_stopping_stops_and_restores_the_best_weights(mnist_small):
    X, y, Xv, yv = mnist_small
    # A tiny training set and a large lr overfit quickly, so val_loss turns up early.
    net = _net(hidden_sizes=[64])
    snapshots = {}

    def remember(record):
        snapshots[record["epoch"]] = [W.copy() for W in net.weights]

    history = fit(
        net,
        X[:200],
        y[:200],
        epochs=60,
        lr=0.3,
        X_val=Xv,
        y_val=yv,
        early_stopping=3,
        callback=remember,
    )
    val = history.as_columns()["val_loss"]
    best = history.best_epoch
    assert history.stopped_epoch is not None and history.stopped_epoch < 60, f"val {val}"
    assert history.stopped_epoch == best + 3, f"stopped {history.stopped_epoch}, best {best}"
    assert val[best - 1] == min(val), f"best epoch {best} is not the minimum of {val}"
    for i, W in enumerate(net.weights):
        np.testing.assert_array_equal(W, snapshots[best][i], err_msg=f"W{i} not restored")
    assert net.loss(Xv, yv).data == pytest.approx(min(val), rel=1e-5)


def test_early_stopping_without_restore_best_keeps_the_last_weights(mnist_small):
    X, y, Xv, yv = mnist_small
    # The overfitting setup of the test above, trained twice: restore_best False, then True.

    def train(restore_best: bool):
        net = _net(hidden_sizes=[64])
        snapshots = {}

        def remember(record):
            snapshots[record["epoch"]] = [p.copy() for p in net.params]

        history = fit(
            net, X[:200], y[:200], epochs=60, lr=0.3, X_val=Xv, y_val=yv,
            early_stopping=3, restore_best=restore_best, callback=remember,
        )  # fmt: skip
        return net, history, snapshots

    net, history, snapshots = train(restore_best=False)
    restored, restored_history, _ = train(restore_best=True)

    val = history.as_columns()["val_loss"]
    last, best = history.stopped_epoch, history.best_epoch
    assert last is not None and last == len(val) < 60, f"stopped {last} after {len(val)} epochs"
    assert last == best + 3 and val[best - 1] == min(val), f"best {best}, last {last}: {val}"
    assert val[last - 1] > val[best - 1], f"the last epoch is as good as the best: {val}"
    for i, param in enumerate(net.params):
        np.testing.assert_array_equal(param, snapshots[last][i], err_msg=f"param {i}: not last")
    assert not np.array_equal(net.weights[0], snapshots[best][0]), "the best epoch was restored"
    assert net.loss(Xv, yv).data == pytest.approx(val[last - 1], rel=1e-5)
    # The same seeds give the same training: only the weights handed back differ.
    assert restored_history.as_columns()["val_loss"] == val, "the two trainings differ"
    for i, param in enumerate(restored.params):
        np.testing.assert_array_equal(param, snapshots[best][i], err_msg=f"param {i}: not best")


def test_huge_learning_rate_raises_divergence_error(mnist_small):
    X, y, _, _ = mnist_small
    with pytest.raises(DivergenceError, match="epoch 1.*smaller learning rate") as info:
        fit(_net(), X, y, epochs=3, lr=1e20)
    assert info.value.epoch == 1
    again = pickle.loads(pickle.dumps(info.value))
    assert again.epoch == 1 and str(again) == str(info.value), "must survive pickling"


def test_fit_accepts_an_optimizer_instance(mnist_small):
    X, y, _, _ = mnist_small
    opt = Adam(lr=0.002)
    fit(_net(), X[:256], y[:256], epochs=1, optimizer=opt, lr=0.002, batch_size=100)
    assert opt.t == 3, f"3 batches (100, 100, 56) -> 3 updates, got {opt.t}"


def test_float64_training(mnist_small):
    X, y = mnist_small[0][:500], mnist_small[1][:500]
    nets, histories = {}, {}
    for dtype in ("float32", "float64"):
        nets[dtype] = _net(dtype=dtype)  # the same initial weights, cast to each dtype
        histories[dtype] = fit(nets[dtype], X, y, epochs=2, lr=0.1)
    net32, net64 = nets["float32"], nets["float64"]
    losses32 = [r["train_loss"] for r in histories["float32"].records]
    losses64 = [r["train_loss"] for r in histories["float64"].records]

    # float64 trains: the loss goes down.
    assert losses64[1] < 0.9 * losses64[0], f"float64 train_loss per epoch {losses64}"
    assert net64.loss(X, y).data < 0.8 * _net(dtype="float64").loss(X, y).data
    # It follows the float32 run (same data order, same steps) up to float32 rounding...
    assert losses64 == pytest.approx(losses32, rel=1e-6), f"{losses64} vs {losses32}"
    for i, (p64, p32) in enumerate(zip(net64.params, net32.params, strict=True)):
        np.testing.assert_allclose(p64, p32, rtol=1e-4, atol=1e-6, err_msg=f"param {i}")
    # ...but was computed in float64: the weights are not float32 values stored as float64.
    W0 = net64.weights[0]
    assert W0.dtype == np.float64
    assert not np.array_equal(W0, W0.astype(np.float32).astype(np.float64)), "float32 precision"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"epochs": 2.5}, "epochs must be an integer"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"lr": -1.0}, "lr must be > 0"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"l2": -0.1}, "l2 must be >= 0"),
        ({"dropout": 1.0}, "dropout must be < 1"),
        ({"dropout": -0.1}, "dropout must be >= 0"),
        ({"optimizer": "lbfgs"}, "unknown optimizer"),
        ({"schedule": "linear"}, "unknown schedule"),
        ({"early_stopping": 3}, "needs validation data"),
        ({"X_val": np.zeros((2, 784))}, "both X_val and y_val"),
        ({"X": np.zeros((10, 783))}, r"X must have shape \(n, 784\)"),
        ({"X": np.full((4, 784), np.nan)}, "NaN"),
        ({"y": np.zeros(5, dtype=int)}, r"y must have shape \(4,\)"),
        ({"y": np.array([0, 1, 2, 10])}, r"labels must be in \[0, 10\)"),
        ({"y": np.array([0, 1, -1, 2])}, r"labels must be in \[0, 10\)"),
        ({"y": np.array([0.0, 1.0, 2.0, 3.0])}, "integer class labels"),
        ({"callback": 3}, "callback must be callable"),
        ({"schedule": lambda epoch: 0.0}, "schedule gave learning rate 0.0 at epoch 1"),
    ],
)
def test_fit_validates_its_arguments(kwargs, match):
    args = {"X": np.zeros((4, 784), np.float32), "y": np.array([0, 1, 2, 3]), "epochs": 1}
    args.update(kwargs)
    with pytest.raises(MLPError, match=match):
        fit(_net(), args.pop("X"), args.pop("y"), **args)
