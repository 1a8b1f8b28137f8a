"""Stopping a training and continuing it later (``fit``'s ``stop_epoch`` and ``state``):
the continued training is the straight one, bit for bit, and malformed states are refused."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mlp import MLP, MLPError, TrainingState, fit
from mlp.optimizers import SGD, Adam

# (optimizer, lr, batch_size), as in test_training.py.
OPTIMIZERS = [
    ("gd", 0.5, None),
    ("sgd", 0.1, 64),
    ("momentum", 0.05, 64),
    ("nesterov", 0.05, 64),
    ("adam", 0.002, 64),
]
SCHEDULES = {"cosine": {}, "step": {"step_size": 3, "gamma": 0.5}}
RUNGS = (3, 7, 10)  # epochs 1-3, then 4-7, then 8-10 of a 10-epoch budget
N_TRAIN = 1000  # of mnist_small's 2000: enough batches per epoch, fast


def _net(**kwargs) -> MLP:
    return MLP(784, kwargs.pop("hidden_sizes", [16]), 10, seed=0, **kwargs)


def _settings(mnist_small, optimizer, lr, batch_size, **kwargs) -> dict:
    """fit's arguments (data included) for a 10-epoch training with validation data."""
    X, y, Xv, yv = mnist_small
    settings = {
        "X": X[:N_TRAIN],
        "y": y[:N_TRAIN],
        "epochs": 10,
        "optimizer": optimizer,
        "lr": lr,
        "batch_size": batch_size,
        "l2": 1e-4,
        "X_val": Xv,
        "y_val": yv,
        "restore_best": False,  # a training to be continued hands back its last weights
        "seed": 7,
    }
    settings.update(kwargs)
    return settings


def _fit(net: MLP, settings: dict, **kwargs):
    args = {**settings, **kwargs}
    return fit(net, args.pop("X"), args.pop("y"), **args)


def _without_seconds(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def _through_file(state: TrainingState, path) -> TrainingState:
    """``state`` written with np.savez and read back with allow_pickle=False."""
    np.savez(path, **state.to_arrays())
    with np.load(path, allow_pickle=False) as npz:
        return TrainingState.from_arrays(npz)


def _in_rungs(settings: dict, rungs=RUNGS, tmp_path=None) -> tuple[MLP, list[dict]]:
    """Train in rungs; with ``tmp_path``, each rung starts from files and a rebuilt network."""
    net, state, records = _net(), None, []
    for stop in rungs:
        history = _fit(net, settings, stop_epoch=stop, state=state)
        assert history.state.epoch == stop, f"state after epoch {history.state.epoch}"
        records += history.records
        state = history.state
        if tmp_path is not None:
            state = _through_file(state, tmp_path / f"state-{stop}.npz")
            net = MLP.from_state(net.get_state())
    return net, records


def _assert_same_training(straight: MLP, straight_records, continued: MLP, records) -> None:
    for i, (a, b) in enumerate(zip(straight.params, continued.params, strict=True)):
        assert np.array_equal(a, b), f"param {i}: continued weights differ from the straight run"
    assert _without_seconds(records) == _without_seconds(straight_records), "records differ"


# ============================================================================ bit for bit


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize(("optimizer", "lr", "batch_size"), OPTIMIZERS)
def test_continued_training_equals_the_straight_one(
    mnist_small, optimizer, lr, batch_size, dropout, schedule
):
    settings = _settings(
        mnist_small, optimizer, lr, batch_size, dropout=dropout,
        schedule=schedule, schedule_kwargs=SCHEDULES[schedule],
    )  # fmt: skip
    straight = _net()
    history = _fit(straight, settings)
    continued, records = _in_rungs(settings)
    assert [r["epoch"] for r in records] == list(range(1, 11))
    _assert_same_training(straight, history.records, continued, records)
    assert history.state.epoch == 10


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize(("optimizer", "lr", "batch_size"), OPTIMIZERS)
def test_continued_training_through_files_equals_the_straight_one(
    mnist_small, tmp_path, optimizer, lr, batch_size, dropout, shuffle
):
    settings = _settings(
        mnist_small, optimizer, lr, batch_size, dropout=dropout, shuffle=shuffle,
        schedule="step", schedule_kwargs=SCHEDULES["step"],
    )  # fmt: skip
    straight = _net()
    history = _fit(straight, settings)
    continued, records = _in_rungs(settings, tmp_path=tmp_path)
    _assert_same_training(straight, history.records, continued, records)


def test_an_optimizer_instance_takes_the_state(mnist_small):
    settings = _settings(mnist_small, "adam", 0.002, 64)
    straight = _net()
    history = _fit(straight, settings, optimizer=Adam(lr=0.002))
    net = _net()
    first = _fit(net, settings, optimizer=Adam(lr=0.002), stop_epoch=4)
    opt = Adam(lr=0.002)
    second = _fit(net, settings, optimizer=opt, state=first.state)
    _assert_same_training(straight, history.records, net, first.records + second.records)
    assert opt.t == history.state.optimizer["t"], "the instance holds the continued state"


def test_the_schedule_spans_the_whole_budget(mnist_small):
    settings = _settings(mnist_small, "sgd", 0.1, 64, schedule="cosine")
    straight = [r["lr"] for r in _fit(_net(), settings).records]
    _, records = _in_rungs(settings)
    assert [r["lr"] for r in records] == straight
    # A fresh 3-epoch training decays over 3 epochs: a first rung must not.
    fresh = [r["lr"] for r in _fit(_net(), settings, epochs=3).records]
    assert fresh != straight[:3], f"3-epoch schedule {fresh} vs the budget's {straight[:3]}"
    assert fresh[-1] < straight[2], "the 3-epoch schedule decays faster"


def test_the_state_is_what_makes_the_continuation_equal(mnist_small):
    # The checks above could pass if the state did nothing (e.g. a constant schedule and an
    # optimizer without state): here leaving out part of it must change the weights.
    settings = _settings(mnist_small, "adam", 0.002, 64, dropout=0.2)
    straight = _net()
    _fit(straight, settings)
    fresh_state = _fit(_net(), settings, stop_epoch=1).state  # streams of epoch 1 only

    for part in ("optimizer", "rng"):
        net = _net()
        state = _fit(net, settings, stop_epoch=3).state
        if part == "optimizer":  # Adam's moments m<i>, v<i> set back to zero
            zeroed = {
                k: np.zeros_like(a) if k[0] in "mv" else a for k, a in state.optimizer.items()
            }
            state = TrainingState(epoch=3, optimizer=zeroed, rng=state.rng)
        else:
            state = TrainingState(epoch=3, optimizer=state.optimizer, rng=fresh_state.rng)
        _fit(net, settings, state=state)
        assert not np.array_equal(net.weights[0], straight.weights[0]), f"{part} unused"


def test_plain_fit_is_unchanged_and_reports_its_state(mnist_small):
    settings = _settings(mnist_small, "momentum", 0.05, 64, dropout=0.2, epochs=3)
    plain, explicit = _net(), _net()
    history = _fit(plain, settings)
    explicit_history = _fit(explicit, settings, stop_epoch=3)
    _assert_same_training(plain, history.records, explicit, explicit_history.records)
    state = history.state
    assert state.epoch == 3 and state.optimizer["t"] == 3 * math.ceil(N_TRAIN / 64)
    arrays = state.to_arrays()
    assert all(isinstance(a, np.ndarray) and a.dtype.kind in "biuf" for a in arrays.values())
    velocities = [f"optimizer.velocity{i}" for i in range(4)]  # W0, b0, W1, b1
    assert sorted(arrays) == sorted(
        ["version", "epoch", "rng.shuffle", "rng.dropout", "rng.augment", "optimizer.kind"]
        + ["optimizer.t", "optimizer.momentum", *velocities]
    )


def test_an_optimizer_state_before_any_update_round_trips():
    opt = SGD(lr=0.1, momentum=0.9)
    arrays = opt.state_arrays()
    assert sorted(arrays) == ["kind", "momentum", "t"], "no buffers before the first update"
    params = _net().params
    other = SGD(lr=0.1, momentum=0.9)
    other.update(params, [np.ones_like(p) for p in params])
    other.load_state_arrays(arrays, params)
    assert other.t == 0 and other.velocities == [], "loading t=0 resets the optimizer"


# ============================================================================ refused


@pytest.fixture(scope="module")
def saved(mnist_small) -> tuple[dict, dict]:
    """fit's settings (adam, 3 of 10 epochs done) and the state's arrays after epoch 3."""
    settings = _settings(mnist_small, "adam", 0.002, 64, X=mnist_small[0][:200])
    settings["y"] = mnist_small[1][:200]
    history = _fit(_net(), settings, stop_epoch=3)
    return settings, history.state.to_arrays()


def _changed(arrays: dict, **changes) -> dict:
    """A copy of ``arrays`` with entries replaced (``None`` deletes; ``__`` stands for ``.``)."""
    out = dict(arrays)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            del out[key]
        else:
            out[key] = value
    return out


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"rng__dropout": None}, r"missing arrays \['rng.dropout'\]"),
        ({"epoch": None}, r"missing arrays \['epoch'\]"),
        ({"optimizer__t": None}, "no 't' array"),
        ({"extra": np.zeros(2)}, r"unexpected arrays \['extra'\]"),
        ({"version": np.array(3)}, "format version"),
        # A state saved before the augmentation stream existed: refused by its version first.
        ({"version": np.array(1), "rng__augment": None}, "format version 1.*older mlp"),
        ({"epoch": np.array(3.0)}, "epoch must be a 0-d integer"),
        ({"epoch": np.array([3])}, "epoch must be a 0-d integer"),
        ({"epoch": np.array(-1)}, "epoch must be >= 0"),
        ({"epoch": np.array(3, dtype=object)}, "'epoch' has dtype object"),
        ({"optimizer__m0": np.zeros((784, 16), dtype=object)}, "'optimizer.m0' has dtype object"),
        ({"optimizer__m0": np.zeros((784, 16), dtype=np.int64)}, "'m0' has dtype int64"),
        ({"optimizer__m0": np.full((784, 16), np.nan)}, "'m0' contains NaN"),
        ({"optimizer__t": np.array(3.0)}, "'t' has dtype float64"),
        ({"optimizer__t": np.array(-1)}, "'t' must be a 0-d integer >= 0"),
        ({"optimizer__kind": np.array([1.5])}, "'kind' has dtype float64"),
        ({"optimizer__kind": np.array([0, 1], dtype=np.uint8)}, "'kind' is not a short name"),
        ({"rng__shuffle": np.zeros(6, dtype=np.int64)}, "must be a uint64 array"),
        ({"rng__shuffle": np.zeros(5, dtype=np.uint64)}, r"shape \(6,\)"),
        ({"rng__shuffle": np.zeros(6, dtype=np.uint64)}, "not a valid PCG64 state"),
        ({"rng__shuffle": "abc"}, "'rng.shuffle' is a str, not an ndarray"),
    ],
)
def test_from_arrays_refuses_malformed_arrays(saved, changes, match):
    _, arrays = saved
    with pytest.raises(MLPError, match=match):
        TrainingState.from_arrays(_changed(arrays, **changes))


def test_from_arrays_refuses_pickled_arrays_from_a_file(saved, tmp_path):
    _, arrays = saved
    path = tmp_path / "state.npz"
    np.savez(path, **_changed(arrays, epoch=np.array(3, dtype=object)))
    with np.load(path, allow_pickle=False) as npz, pytest.raises(MLPError, match="'epoch'"):
        TrainingState.from_arrays(npz)


@pytest.mark.parametrize(
    ("net_kwargs", "fit_kwargs", "match"),
    [
        ({"hidden_sizes": [8]}, {}, r"'m0' has shape \(784, 16\).*parameter 0 .*\(784, 8\)"),
        ({"hidden_sizes": [16, 8]}, {}, "4 'm' arrays.*the network has 6 parameters"),
        ({"dtype": "float64"}, {}, "'m0' has dtype float32.*parameters are float64"),
        ({}, {"optimizer": "momentum"}, "of kind 'adam', this optimizer is 'momentum'"),
        ({}, {"optimizer": Adam(lr=0.002, beta1=0.8)}, "beta1=0.9, this optimizer has beta1=0.8"),
        ({}, {"stop_epoch": 3}, "state is after epoch 3, so stop_epoch must be > 3, got 3"),
        ({}, {"stop_epoch": 2}, "stop_epoch must be > 3, got 2"),
        ({}, {"stop_epoch": 11}, "stop_epoch must be <= 10, got 11"),
        ({}, {"epochs": 3}, r"stop_epoch must be > 3, got 3 \(epochs=3\)"),
        ({}, {"early_stopping": 2}, "early_stopping cannot be combined"),
        ({}, {"restore_best": True}, "restore_best=True with validation data cannot"),
    ],
)
def test_fit_refuses_a_state_that_does_not_fit(saved, net_kwargs, fit_kwargs, match):
    settings, arrays = saved
    net = _net(**net_kwargs)
    before = [p.copy() for p in net.params]
    with pytest.raises(MLPError, match=match):
        _fit(net, settings, state=TrainingState.from_arrays(arrays), **fit_kwargs)
    for p, b in zip(net.params, before, strict=True):
        assert np.array_equal(p, b), "a refused state must not train the network"


def test_a_refused_state_leaves_the_optimizer_unchanged(saved):
    settings, arrays = saved
    opt = Adam(lr=0.002)
    _fit(_net(), settings, optimizer=opt, stop_epoch=1)
    t, m0 = opt.t, opt.m[0].copy()
    bad = _changed(arrays, optimizer__v1=-np.ones(16, np.float32))
    with pytest.raises(MLPError, match="'v1' has negative entries"):
        _fit(_net(), settings, optimizer=opt, state=TrainingState.from_arrays(bad))
    assert opt.t == t and np.array_equal(opt.m[0], m0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stop_epoch": 0}, "stop_epoch must be >= 1, got 0"),
        ({"stop_epoch": 11}, "stop_epoch must be <= 10, got 11"),
        ({"stop_epoch": 2.5}, "stop_epoch must be an integer"),
        ({"stop_epoch": 3, "early_stopping": 2}, "early_stopping cannot be combined"),
        ({"stop_epoch": 3, "restore_best": True}, "restore_best=True with validation data"),
        ({"state": {"epoch": 3}}, "state must be an mlp.TrainingState, got dict"),
    ],
)
def test_fit_validates_the_continuation_arguments(saved, kwargs, match):
    settings, _ = saved
    with pytest.raises(MLPError, match=match):
        _fit(_net(), settings, **kwargs)


def test_stopping_with_restore_best_is_fine_without_validation_data(saved):
    settings, _ = saved
    settings = {**settings, "X_val": None, "y_val": None, "restore_best": True}
    history = _fit(_net(), settings, stop_epoch=2)
    assert [r["epoch"] for r in history.records] == [1, 2] and history.state.epoch == 2
