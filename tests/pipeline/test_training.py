"""train_fold / train_final / predict_test on the bundled sample, checked against by-hand runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix

from mlp import MLP, DivergenceError, fit
from pipeline import training
from pipeline.config import PipelineConfig, build_config
from pipeline.data import DatasetRef, Normalizer, load_dataset
from pipeline.errors import ConfigError, DataError
from pipeline.folds import fold_seed, make_folds, train_indices
from pipeline.training import evaluation_from, predict_test, train_final, train_fold

SUMMARY = ("l2_lambda", "fold", "seed", "val_accuracy", "val_loss", "train_accuracy", "train_loss",
           "epochs", "diverged")  # fmt: skip

CONFIGS = {
    # The default protocol: mini-batch Nesterov, standardized inputs, stratified shuffled folds.
    "default": {
        "model.hidden_sizes": [32],
        "training.epochs": 2,
        "training.final_epochs": 2,
        "cv.folds": 2,
        "data.normalization": "standardize",
    },
    # The notebook's: full-batch GD, x/255, contiguous folds, float64.
    "notebook": {
        "model.hidden_sizes": [32],
        "model.init": "notebook",
        "model.dtype": "float64",
        "training.optimizer": "gd",
        "training.schedule": "constant",
        "training.batch_size": None,
        "training.epochs": 2,
        "cv.folds": 2,
        "cv.shuffle": False,
        "cv.stratify": False,
        "data.normalization": "scale",
    },
    # Early stopping on the validation fold: the best epoch's weights are put back.
    "early_stopping": {
        "model.hidden_sizes": [32],
        "training.epochs": 25,
        "training.lr": 0.1,
        "training.early_stopping": 2,
        "cv.folds": 2,
    },
}


def _config(name: str = "default", **extra) -> PipelineConfig:
    overrides = {"data.dataset": "mnist-sample", "execution.runner": "sequential"}
    overrides.update(CONFIGS[name])
    overrides.update(extra)
    return build_config(overrides=overrides)


@pytest.fixture(scope="module")
def sample():
    """The bundled sample, cut to 2000 training and 500 test images to stay fast."""
    return load_dataset("mnist-sample").limit(2000, 500)


def _by_hand(cfg: PipelineConfig, dataset, l2_lambda: float, fold: int):
    """Recompute a fold's training from its parts, without pipeline.training."""
    folds = make_folds(
        dataset.y_train, cfg.cv.folds, shuffle=cfg.cv.shuffle, stratify=cfg.cv.stratify,
        seed=cfg.cv.seed,
    )  # fmt: skip
    tr, va = train_indices(folds, fold), folds[fold]
    norm = Normalizer.fit(dataset.X_train[tr], method=cfg.data.normalization)
    dtype = cfg.model.dtype
    X_tr, X_va = (
        norm.transform(dataset.X_train[tr], dtype=dtype),
        norm.transform(dataset.X_train[va], dtype=dtype),
    )
    y_tr, y_va = dataset.y_train[tr].astype(np.int64), dataset.y_train[va].astype(np.int64)
    seed = fold_seed(cfg.cv.seed, l2_lambda, fold)
    net = MLP(
        n_features=784, hidden_sizes=cfg.model.hidden_sizes, n_classes=10,
        activation=cfg.model.activation, init=cfg.model.init, dtype=dtype, seed=seed,
    )  # fmt: skip
    t = cfg.training
    history = fit(
        net, X_tr, y_tr, epochs=t.epochs, optimizer=t.optimizer, lr=t.lr, momentum=t.momentum,
        batch_size=None if t.optimizer == "gd" else t.batch_size, l2=l2_lambda,
        schedule=t.schedule, dropout=t.dropout, X_val=X_va, y_val=y_va, seed=seed,
        early_stopping=t.early_stopping, restore_best=t.early_stopping is not None,
    )  # fmt: skip
    return net, X_va, y_va, len(history)


# ----------------------------------------------------------------------------- train_fold


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_train_fold_is_deterministic(sample, name):
    # Arrange
    cfg = _config(name)

    # Act
    first = train_fold(cfg, sample, {"training.l2_lambda": 1e-3}, 1)
    second = train_fold(cfg, sample, {"training.l2_lambda": 1e-3}, 1)

    # Assert
    for field in SUMMARY:
        a, b = getattr(first, field), getattr(second, field)
        assert a == b, f"{name}: {field} differs between identical calls: {a!r} vs {b!r}"
    for column in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        assert first.history[column] == second.history[column], f"{name}: history {column} differs"


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("fold", [0, 1])
def test_train_fold_equals_a_by_hand_split_and_fit(sample, name, fold):
    # Arrange
    cfg = _config(name)
    lam = 1e-3

    # Act
    result = train_fold(cfg, sample, {"training.l2_lambda": lam}, fold)
    net, X_va, y_va, epochs_run = _by_hand(cfg, sample, lam, fold)

    # Assert
    expected_acc = net.score(X_va, y_va)
    expected_loss = float(net.loss(X_va, y_va).data)
    assert result.val_accuracy == expected_acc, (
        f"{name} fold {fold}: val accuracy {result.val_accuracy} vs by hand {expected_acc}"
    )
    assert result.val_loss == pytest.approx(expected_loss, rel=1e-6), (
        f"{name} fold {fold}: val loss {result.val_loss} vs by hand {expected_loss}"
    )
    assert result.seed == fold_seed(cfg.cv.seed, lam, fold), (
        "seed is not fold_seed(seed, lam, fold)"
    )
    assert (result.l2_lambda, result.fold, result.epochs) == (lam, fold, epochs_run), (
        f"summary fields {result.l2_lambda}, {result.fold}, {result.epochs}"
    )
    assert not result.diverged and result.message == "", "a normal run is not diverged"
    if name == "default":  # two full-batch GD steps (notebook) barely move the network
        assert result.val_accuracy > 0.5, f"2 epochs should learn something: {result.val_accuracy}"


@pytest.mark.parametrize("patience", [None, 2])
def test_a_fold_reports_the_epoch_whose_weights_it_keeps(sample, patience):
    # 25 epochs on 1000 images: the validation loss bottoms out early, then rises.
    overrides = {"training.epochs": 25, "training.lr": 0.1, "training.early_stopping": patience}
    cfg = _config(**overrides)

    result = train_fold(cfg, sample, {"training.l2_lambda": 0.0}, 0)

    losses = result.history["val_loss"]
    best = int(np.argmin(losses))
    assert best < len(losses) - 1, f"the loss never rose, nothing is tested: {losses}"
    # Without early stopping the last weights are kept (as in the final model); with it, the
    # best epoch's weights come back (as in scikit-learn).
    held = best if patience else len(losses) - 1
    assert result.val_loss == losses[held], (patience, result.val_loss, losses)
    assert result.val_accuracy == result.history["val_accuracy"][held]
    assert result.train_loss == result.history["train_loss"][held]


def test_train_fold_history_has_one_row_per_epoch(sample):
    # Arrange
    cfg = _config(**{"training.epochs": 3})
    seen = []

    # Act
    result = train_fold(cfg, sample, {"training.l2_lambda": 1e-4}, 0, callback=seen.append)

    # Assert
    assert result.history["epoch"] == [1.0, 2.0, 3.0], f"epochs {result.history['epoch']}"
    for column in ("lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds"):
        assert len(result.history[column]) == 3, f"history {column} is not one value per epoch"
    assert [r["epoch"] for r in seen] == [1, 2, 3], (
        f"callback saw epochs {[r['epoch'] for r in seen]}"
    )
    assert result.train_loss == result.history["train_loss"][-1], "train_loss is the last epoch's"


def test_train_fold_history_records_when_each_epoch_ended(sample):
    import time

    # Arrange
    cfg = _config(**{"training.epochs": 3})
    started = time.time()

    # Act
    result = train_fold(cfg, sample, {"training.l2_lambda": 1e-4}, 0)
    ended = time.time()

    # Assert: wall-clock times, in order, inside the call, at least an epoch's training apart.
    times = result.history["wall_time"]
    assert len(times) == 3, times
    assert started <= times[0] <= times[1] <= times[2] <= ended, (started, times, ended)
    for earlier, later, seconds in zip(
        times, times[1:], result.history["seconds"][1:], strict=False
    ):
        assert later - earlier >= seconds, f"epochs {times} closer than their training {seconds}"


@pytest.mark.parametrize("method", ["standardize", "standardize-pixel"])
def test_train_fold_fits_the_normalizer_on_the_training_part_only(sample, monkeypatch, method):
    # Arrange: record what Normalizer.fit sees inside train_fold.
    fitted: list[np.ndarray] = []

    class Spy(Normalizer):
        @classmethod
        def fit(cls, X, method="scale", **kwargs):
            fitted.append(np.array(X))
            return Normalizer.fit(X, method, **kwargs)

    monkeypatch.setattr(training, "Normalizer", Spy)
    cfg = _config(**{"data.normalization": method})
    folds = make_folds(sample.y_train, 2, shuffle=True, stratify=True, seed=cfg.cv.seed)

    # Act
    train_fold(cfg, sample, {"training.l2_lambda": 1e-3}, 0)

    # Assert
    assert len(fitted) == 1, f"Normalizer.fit called {len(fitted)} times"
    expected = sample.X_train[train_indices(folds, 0)]
    assert np.array_equal(fitted[0], expected), (
        f"normalizer fitted on {fitted[0].shape[0]} rows, not the {expected.shape[0]} training rows"
    )
    part = Normalizer.fit(fitted[0], method)
    full = Normalizer.fit(sample.X_train, method)
    assert not np.allclose(part.mean_, full.mean_), (
        "training-part statistics should differ from full-data ones (else the check proves nothing)"
    )


def test_train_fold_rejects_a_fold_out_of_range(sample):
    # Act / Assert
    with pytest.raises(ValueError, match="fold 2 out of range"):
        train_fold(_config(), sample, {"training.l2_lambda": 1e-3}, 2)


def test_huge_lr_gives_a_diverged_result_not_an_exception(sample):
    # Arrange: mini-batch Nesterov at lr 1e6 overflows within the first epoch. (Full-batch GD in
    # float64 does not: one step kills every ReLU and the loss stays huge but finite.)
    cfg = _config(**{"training.lr": 1e6})

    # Act
    result = train_fold(cfg, sample, {"training.l2_lambda": 1e-3}, 0)

    # Assert
    assert result.diverged, f"lr 1e6 did not diverge: val accuracy {result.val_accuracy}"
    assert not result.ok, "a diverged result must not be ok"
    for field in ("val_accuracy", "val_loss", "train_accuracy", "train_loss"):
        assert math.isnan(getattr(result, field)), (
            f"{field} should be NaN, got {getattr(result, field)}"
        )
    assert result.message, "a diverged result should carry the divergence message"
    # epochs counts the completed (recorded) epochs, before the one that diverged.
    assert result.epochs < cfg.training.epochs, f"epochs run {result.epochs}"
    assert result.epochs == len(result.history.get("epoch", [])), "epochs should match the history"


def test_huge_lr_final_model_raises_divergence(sample):
    # Arrange
    cfg = _config(**{"training.lr": 1e6})

    # Act / Assert
    with pytest.raises(DivergenceError, match="final model diverged"):
        train_final(cfg, sample, {"training.l2_lambda": 1e-3})


# ----------------------------------------------------------------------------- final model


@pytest.fixture(scope="module")
def final_model(sample):
    """One final model (default config, lambda 1e-4) shared by the tests that only read it."""
    return train_final(_config(), sample, {"training.l2_lambda": 1e-4})


def test_train_final_and_predict_test_agree_with_network_score(sample, final_model):
    # Arrange
    cfg, final = _config(), final_model

    # Act
    evaluation, predicted = predict_test(final, sample)

    # Assert
    X_test = final.normalizer.transform(sample.X_test, dtype=cfg.model.dtype)
    y_test = sample.y_test.astype(np.int64)
    expected = final.network.score(X_test, y_test)
    assert evaluation.accuracy == pytest.approx(expected, abs=1e-12), (
        f"predict_test accuracy {evaluation.accuracy}, network.score {expected}"
    )
    assert np.array_equal(predicted, final.network.predict(X_test)), "predictions differ"
    expected_loss = float(final.network.loss(X_test, y_test).data)
    assert evaluation.loss == pytest.approx(expected_loss, rel=1e-5), (
        f"test loss {evaluation.loss} vs network.loss {expected_loss}"
    )
    assert evaluation.n_samples == sample.y_test.size, f"n_samples {evaluation.n_samples}"
    assert len(final.history["epoch"]) == cfg.training.resolved_final_epochs, "final epochs"
    assert final.l2_lambda == 1e-4, f"final lambda {final.l2_lambda}"


def test_train_final_normalizer_uses_all_training_data(sample, final_model):
    # Arrange
    final = final_model

    # Act
    reference = Normalizer.fit(sample.X_train, "standardize")

    # Assert
    assert final.normalizer.method == "standardize", f"method {final.normalizer.method}"
    assert np.allclose(final.normalizer.mean_, reference.mean_), "final normalizer mean differs"
    assert np.allclose(final.normalizer.std_, reference.std_), "final normalizer std differs"


def test_train_final_equals_a_by_hand_fit_with_the_final_seed(sample):
    # Arrange: final_epochs differs from epochs, and the seed is fold_seed(seed, lambda, -1).
    cfg = _config(**{"training.epochs": 1, "training.final_epochs": 2})
    seen = []
    norm = Normalizer.fit(sample.X_train, "standardize")
    X = norm.transform(sample.X_train, dtype=cfg.model.dtype)
    seed = fold_seed(cfg.cv.seed, 1e-3, -1)
    reference = MLP(784, [32], 10, init=cfg.model.init, dtype=cfg.model.dtype, seed=seed)
    t = cfg.training
    fit(
        reference, X, sample.y_train.astype(np.int64), epochs=2, optimizer=t.optimizer, lr=t.lr,
        momentum=t.momentum, batch_size=t.batch_size, l2=1e-3, schedule=t.schedule, seed=seed,
    )  # fmt: skip

    # Act
    final = train_final(cfg, sample, {"training.l2_lambda": 1e-3}, callback=seen.append)

    # Assert
    assert len(seen) == 2, f"final model trained {len(seen)} epochs, final_epochs is 2"
    for layer, (ours, ref) in enumerate(zip(final.network.weights, reference.weights, strict=True)):
        assert np.array_equal(ours, ref), (
            f"layer {layer}: final weights differ from a by-hand fit (max diff "
            f"{np.abs(ours - ref).max()})"
        )


# ----------------------------------------------------------------------------- evaluation


def test_evaluation_from_matches_sklearn():
    # Arrange: random labels, with class 7 absent from the predictions and class 3 from the truth.
    rng = np.random.default_rng(0)
    y_true = rng.choice([0, 1, 2, 4, 5, 6, 7, 8, 9], size=400)
    y_pred = np.where(rng.random(400) < 0.7, y_true, rng.integers(0, 10, 400))
    y_pred[y_pred == 7] = 3

    # Act
    evaluation = evaluation_from(y_true, y_pred, loss=0.25)

    # Assert
    expected = confusion_matrix(y_true, y_pred, labels=list(range(10)))
    assert np.array_equal(np.array(evaluation.confusion), expected), (
        f"confusion matrix differs from sklearn:\n{np.array(evaluation.confusion)}\n{expected}"
    )
    assert evaluation.accuracy == pytest.approx(accuracy_score(y_true, y_pred)), "accuracy differs"
    assert evaluation.n_samples == 400 and evaluation.loss == 0.25, "n_samples or loss not kept"
    assert all(type(v) is int for row in evaluation.confusion for v in row), (
        "confusion must hold plain ints (JSON / MLflow)"
    )


# ----------------------------------------------------------------------------- datasets


def test_dataset_from_ref_rejects_another_fingerprint():
    # Arrange
    cfg = _config()
    good = training.load_configured_dataset(cfg.data)
    bad = DatasetRef(good.name, None, "0" * 64)

    # Act / Assert
    assert training.dataset_from_ref(cfg.data, good.ref).fingerprint == good.fingerprint, (
        "the matching ref should give the dataset back"
    )
    with pytest.raises(DataError, match="fingerprint"):
        training.dataset_from_ref(cfg.data, bad)


def test_load_configured_dataset_applies_limits():
    # Arrange
    cfg = _config(**{"data.limit_train": 300, "data.limit_test": 100})

    # Act
    dataset = training.load_configured_dataset(cfg.data)

    # Assert
    assert dataset.X_train.shape == (300, 784), f"train shape {dataset.X_train.shape}"
    assert dataset.X_test.shape == (100, 784), f"test shape {dataset.X_test.shape}"


# ------------------------------------------------------------------------------ memory
def test_training_bytes_is_a_lower_bound_of_a_real_trainings_peak(sample):
    """Measured against the real thing: a training's peak of traced NumPy allocations."""
    import tracemalloc

    # Arrange: a network big enough that its parameters dominate.
    cfg = _config(**{"model.hidden_sizes": [2000, 2000], "training.final_epochs": 1})
    bound = training.training_bytes(cfg, sample.n_features, len(sample.y_train))

    # Act
    tracemalloc.start()
    try:
        train_final(cfg, sample, {"training.l2_lambda": 1e-4})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # Assert: a bound, and a useful one.
    assert bound <= peak <= 3 * bound, f"bound {bound / 1e6:.1f} MB, peak {peak / 1e6:.1f} MB"


def test_a_network_that_cannot_fit_in_memory_is_refused_before_training(sample):
    # Arrange
    cfg = _config(**{"model.hidden_sizes": [200_000, 200_000]})

    # Act / Assert
    with pytest.raises(ConfigError, match=r"784-200000-200000-10 needs at least .* GiB") as info:
        training.check_memory(cfg, sample, trainings=2)
    assert "2 trainings at once" in str(info.value), info.value
    training.check_memory(_config(), sample, trainings=2)  # the default fits


def test_a_rung_continued_from_a_checkpoint_ends_as_one_training_straight_through(sample):
    cfg = _config(**{"training.epochs": 5})
    candidate = {"training.l2_lambda": 1e-3}

    first, checkpoint = training.train_rung(cfg, sample, candidate, 1, 2)
    second, none = training.train_rung(cfg, sample, candidate, 1, None, resume=checkpoint)
    straight = train_fold(cfg, sample, candidate, 1)

    assert (first.budget, first.epochs, checkpoint.state.epoch) == (2, 2, 2)
    assert none is None, "the last rung hands back no checkpoint"
    assert second.history["val_loss"] == straight.history["val_loss"]
    assert second.history["epoch"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert (second.val_accuracy, second.budget) == (straight.val_accuracy, 5)


def test_a_rung_that_diverges_at_once_keeps_the_earlier_rungs_history(sample):
    cfg = _config(**{"training.epochs": 4})
    candidate = {"training.l2_lambda": 1e-3}
    _, checkpoint = training.train_rung(cfg, sample, candidate, 0, 2)
    # Weights that overflow: the next epoch's loss is not finite.
    network = dict(checkpoint.network)
    network["weights"] = [w * 1e30 for w in network["weights"]]
    broken = training.Checkpoint(network, checkpoint.state, checkpoint.history,
                                 checkpoint.seconds)  # fmt: skip

    result, none = training.train_rung(cfg, sample, candidate, 0, None, resume=broken)

    assert result.diverged and none is None, result
    assert result.history["epoch"][:2] == [1.0, 2.0], result.history
    assert result.epochs >= 2, result
