"""Training and evaluation glue: from a config, a dataset and a (candidate, fold) to results.

These are the plain functions the Prefect tasks wrap. They hold no orchestration and no
tracking: workers call them and return small results; the flow process records them.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from mlp import MLP, DivergenceError, TrainingState, fit
from mlp.losses import cross_entropy
from pipeline.augment import Augmenter, image_side
from pipeline.config import DataConfig, PipelineConfig
from pipeline.data import N_CLASSES, Dataset, DatasetRef, Normalizer, load_dataset
from pipeline.errors import ConfigError, DataError
from pipeline.folds import fold_seed, make_folds, train_indices
from pipeline.results import WALL_TIME, Evaluation, FoldResult
from pipeline.search import L2_KEY, candidate_config, candidates, other_settings

EpochCallback = Callable[[dict[str, Any]], None]


def load_configured_dataset(data: DataConfig) -> Dataset:
    """Load the configured dataset with its train/test limits applied (memoized per process)."""
    return _load_configured(
        data.dataset, data.data_dir, data.download, data.limit_train, data.limit_test
    )


@lru_cache(maxsize=4)
def _load_configured(
    name: str, data_dir: str | None, download: bool, limit_train: int | None, limit_test: int | None
) -> Dataset:
    dataset = load_dataset(name, data_dir, download=download)
    if limit_train is not None or limit_test is not None:
        dataset = dataset.limit(limit_train, limit_test)
    return dataset


def dataset_from_ref(data: DataConfig, ref: DatasetRef) -> Dataset:
    """The dataset a worker trains on, checked against the fingerprint the flow saw.

    Workers receive this small reference instead of the arrays, and load the files once per
    process; a fingerprint mismatch means a worker reads different files than the flow did.
    """
    dataset = load_configured_dataset(data)
    if dataset.fingerprint != ref.fingerprint:
        raise DataError(
            f"dataset {ref.name!r} seen by this worker (fingerprint {dataset.fingerprint[:12]}) "
            f"differs from the flow's ({ref.fingerprint[:12]}): every worker must read the same "
            "data directory"
        )
    return dataset


def load_data_checked(config: PipelineConfig) -> Dataset:
    """Load, verify and subset the dataset; check the search, the folds and that every
    candidate's trainings fit in memory."""
    searched = candidates(config)  # every candidate a valid config, before any data is read
    dataset = load_configured_dataset(config.data)
    cv = config.cv
    make_folds(dataset.y_train, cv.folds, shuffle=cv.shuffle, stratify=cv.stratify, seed=cv.seed)
    resolved = [candidate_config(config, candidate) for candidate in searched]
    largest = max(resolved, key=lambda one: training_bytes(one, *_shape(dataset)))
    check_memory(largest, dataset, trainings=config.execution.resolved_workers())
    if any(one.augment.enabled for one in resolved):
        _square_side(dataset.n_features)
    return dataset


def _square_side(n_features: int) -> int:
    """The side of the square images augmentation needs; ConfigError if they are not square."""
    side = image_side(n_features)
    if side is None:
        raise ConfigError(f"augment needs square images; {n_features} pixels are not a square")
    return side


def parameter_count(config: PipelineConfig, n_features: int, n_classes: int = N_CLASSES) -> int:
    """Weights and biases of the configured network on ``n_features`` inputs."""
    sizes = [n_features, *config.model.hidden_sizes, n_classes]
    return sum((fan_in + 1) * fan_out for fan_in, fan_out in itertools.pairwise(sizes))


def training_bytes(
    config: PipelineConfig, n_features: int, n_samples: int, n_classes: int = N_CLASSES
) -> int:
    """A lower bound on the memory one training needs: parameters and activations.

    Weights, their gradients and the optimizer's state (one buffer per parameter; Adam two),
    and per layer the batch's pre-activations, activations and their gradients (a full batch
    without ``training.batch_size``).
    """
    sizes = [n_features, *config.model.hidden_sizes, n_classes]
    parameters = parameter_count(config, n_features, n_classes)
    copies = 4 if config.training.optimizer == "adam" else 3
    batch = min(config.training.batch_size or n_samples, n_samples)
    itemsize = np.dtype(config.model.dtype).itemsize
    return itemsize * (copies * parameters + 3 * batch * sum(sizes[1:]))


def _shape(dataset: Dataset) -> tuple[int, int, int]:
    return dataset.n_features, len(dataset.y_train), dataset.n_classes


def check_memory(config: PipelineConfig, dataset: Dataset, trainings: int = 1) -> None:
    """Refuse, before any run exists, a network that cannot fit in this machine's memory.

    ``trainings``: how many train at once (the sweep's workers).
    """
    with contextlib.suppress(ValueError, OSError, AttributeError):  # unknown: don't guess
        machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        need = trainings * training_bytes(config, *_shape(dataset))
        if need > machine:
            sizes = [dataset.n_features, *config.model.hidden_sizes, dataset.n_classes]
            shape = "-".join(map(str, sizes))
            at_once = f" ({trainings} trainings at once)" if trainings > 1 else ""
            raise ConfigError(
                f"the network {shape} needs at least {need / 2**30:.1f} GiB{at_once}, more "
                f"than this machine's {machine / 2**30:.1f} GiB: choose smaller "
                "model.hidden_sizes, a training.batch_size or fewer execution.workers"
            )


def _fit_network(
    config: PipelineConfig,
    X: np.ndarray,
    y: np.ndarray,
    *,
    n_classes: int,
    epochs: int,
    seed: int,
    X_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    early_stopping: int | None = None,
    callback: EpochCallback | None = None,
    stop_epoch: int | None = None,
    resume: Checkpoint | None = None,
    augment: Augmenter | None = None,
) -> tuple[MLP, dict[str, list[float]], str, int, TrainingState | None]:
    """Build (or, from ``resume``, continue) and train one network with ``config``'s settings.

    Returns the model, its history columns (from epoch 1, a resumed training's earlier epochs
    included), the divergence message (or ""), the index in the history of the epoch whose
    weights the model holds, and the state to continue from (None after a divergence). The held
    epoch is the last one, or with early stopping the one with the lowest validation loss (its
    weights are put back, as scikit-learn's ``early_stopping`` does). Without early stopping the
    last weights are kept, as the final model keeps them, so a fold measures the procedure the
    final model goes through. ``stop_epoch``: stop there, within a schedule of ``epochs``.
    """
    model_cfg, train_cfg = config.model, config.training
    if resume is None:
        network = MLP(
            n_features=X.shape[1],
            hidden_sizes=list(model_cfg.hidden_sizes),
            n_classes=n_classes,
            activation=model_cfg.activation,
            init=model_cfg.init,
            dtype=model_cfg.dtype,
            seed=seed,
        )
    else:
        network = MLP.from_state(resume.network)
    records: list[dict[str, Any]] = []

    def on_epoch(record: dict[str, Any]) -> None:
        # When the epoch ended, for MLflow's wall-time axis.
        stamped = {**record, WALL_TIME: time.time()}
        records.append(stamped)
        if callback is not None:
            callback(stamped)

    schedule_kwargs = (
        {"step_size": train_cfg.step_size, "gamma": train_cfg.gamma}
        if train_cfg.schedule == "step"
        else {}
    )
    restore_best = early_stopping is not None
    state = None
    try:
        history = fit(
            network,
            X,
            y,
            epochs=epochs,
            optimizer=train_cfg.optimizer,
            lr=train_cfg.lr,
            momentum=train_cfg.momentum,
            # "gd" is the homework's full-batch gradient descent: one step per epoch.
            batch_size=None if train_cfg.optimizer == "gd" else train_cfg.batch_size,
            l2=train_cfg.l2_lambda,
            schedule=train_cfg.schedule,
            schedule_kwargs=schedule_kwargs,
            dropout=train_cfg.dropout,
            augment=augment,
            X_val=X_val,
            y_val=y_val,
            early_stopping=early_stopping,
            restore_best=restore_best,
            seed=seed,
            callback=on_epoch,
            stop_epoch=stop_epoch,
            state=None if resume is None else resume.state,
        )
        message, state = "", history.state
        held = len(records) - 1
        if restore_best and history.best_epoch is not None:
            held = history.best_epoch - 1  # epochs count from 1, one record each
    except DivergenceError as exc:
        message, held = str(exc), len(records) - 1
    columns = _columns(records)
    if resume is not None:
        # Over both sets of keys: a rung that diverges in its first epoch records no epoch.
        columns = {key: resume.history.get(key, []) + columns.get(key, [])
                   for key in {**resume.history, **columns}}  # fmt: skip
        held += len(resume.history.get("epoch", []))
    return network, columns, message, held, state


def _columns(records: list[dict[str, Any]]) -> dict[str, list[float]]:
    keys = list(dict.fromkeys(key for record in records for key in record))
    return {key: [float(record.get(key, np.nan)) for record in records] for key in keys}


@dataclass(frozen=True)
class Checkpoint:
    """Where one (candidate, fold) training stopped, for successive halving to continue it.

    Passed from a worker to the flow and back in memory only (never written or unpickled
    from disk): the network's state, the optimizer's and random streams' state, the history and
    training seconds so far.
    """

    network: dict[str, Any]
    state: TrainingState
    history: dict[str, list[float]]
    seconds: float


def augmenter_for(
    config: PipelineConfig, normalizer: Normalizer, n_features: int
) -> Augmenter | None:
    """The batch transform of ``config.augment`` for data normalized by ``normalizer``, or None.

    Raises ConfigError when the images are not square.
    """
    if not config.augment.enabled:
        return None
    side = _square_side(n_features)
    # What enters from outside the image: a raw 0 pixel, normalized like the rest.
    background = normalizer.transform(np.zeros((1, n_features), np.uint8), dtype="float64")
    return Augmenter(config.augment, side, float(background[0, 0]), config.model.dtype)


def fold_data(
    dataset: Dataset, config: PipelineConfig, fold: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Normalizer]:
    """``(X_train, y_train, X_val, y_val, normalizer)`` of ``fold``, normalized with the
    training part only."""
    cv = config.cv
    folds = make_folds(
        dataset.y_train, cv.folds, shuffle=cv.shuffle, stratify=cv.stratify, seed=cv.seed
    )
    if not 0 <= fold < len(folds):
        raise ValueError(f"fold {fold} out of range 0..{len(folds) - 1}")
    val_idx, train_idx = folds[fold], train_indices(folds, fold)
    train_raw = dataset.X_train[train_idx]
    normalizer = Normalizer.fit(train_raw, method=config.data.normalization)
    return (
        normalizer.transform(train_raw, dtype=config.model.dtype),
        dataset.y_train[train_idx].astype(np.int64),
        normalizer.transform(dataset.X_train[val_idx], dtype=config.model.dtype),
        dataset.y_train[val_idx].astype(np.int64),
        normalizer,
    )


def train_fold(
    config: PipelineConfig,
    dataset: Dataset,
    candidate: Mapping[str, Any],
    fold: int,
    *,
    callback: EpochCallback | None = None,
) -> FoldResult:
    """Train ``candidate`` on every fold but ``fold``; validate on ``fold``.

    ``candidate`` maps dotted settings to values (:mod:`pipeline.search`), ``training.l2_lambda``
    among them. The normalizer is fitted on the training part only, so nothing of the validation
    fold leaks into training. The seed comes from (cv.seed, the candidate's values, fold), never
    from execution order.
    """
    return train_rung(config, dataset, candidate, fold, None, callback=callback)[0]


def train_rung(
    config: PipelineConfig,
    dataset: Dataset,
    candidate: Mapping[str, Any],
    fold: int,
    stop_epoch: int | None,
    *,
    resume: Checkpoint | None = None,
    callback: EpochCallback | None = None,
) -> tuple[FoldResult, Checkpoint | None]:
    """:func:`train_fold` up to ``stop_epoch`` of the ``training.epochs`` schedule (a rung of
    successive halving), from ``resume`` if given.

    Returns the result and the :class:`Checkpoint` to continue from (None without
    ``stop_epoch``, or after a divergence). Continued rung by rung, a training ends with the
    same weights and history as :func:`train_fold` run straight through.
    """
    cv = config.cv
    settings = other_settings(dict(candidate))
    l2_lambda = float(candidate[L2_KEY])
    config = candidate_config(config, dict(candidate))
    X_tr, y_tr, X_val, y_val, normalizer = fold_data(dataset, config, fold)

    seed = fold_seed(cv.seed, l2_lambda, fold, settings)
    budget = stop_epoch or config.training.epochs
    started = time.perf_counter()
    network, history, message, held, state = _fit_network(
        config,
        X_tr,
        y_tr,
        n_classes=dataset.n_classes,
        epochs=config.training.epochs,
        seed=seed,
        X_val=X_val,
        y_val=y_val,
        early_stopping=config.training.early_stopping,
        callback=callback,
        stop_epoch=stop_epoch,
        resume=resume,
        augment=augmenter_for(config, normalizer, X_tr.shape[1]),
    )
    seconds = time.perf_counter() - started + (resume.seconds if resume else 0.0)
    checkpoint = None
    if stop_epoch is not None and state is not None:
        checkpoint = Checkpoint(network.get_state(), state, history, seconds)
    if message:
        nan = float("nan")
        return FoldResult(
            l2_lambda, fold, seed, nan, nan, nan, nan, len(history.get("epoch", [])), seconds,
            history, diverged=True, message=message, settings=settings, budget=budget,
        ), None  # fmt: skip
    # The metrics of the epoch whose weights the network holds, computed by ``fit`` on the
    # same validation fold (no second pass over it).
    result = FoldResult(
        l2_lambda=l2_lambda,
        fold=fold,
        seed=seed,
        val_accuracy=history["val_accuracy"][held],
        val_loss=history["val_loss"][held],
        train_accuracy=history["train_accuracy"][held],
        train_loss=history["train_loss"][held],
        epochs=len(history["epoch"]),
        seconds=seconds,
        history=history,
        settings=settings,
        budget=budget,
    )
    return result, checkpoint


@dataclass(frozen=True)
class FinalModel:
    """The model trained on all training data with the chosen candidate."""

    network: MLP
    normalizer: Normalizer
    history: dict[str, list[float]]
    l2_lambda: float
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)


def train_final(
    config: PipelineConfig,
    dataset: Dataset,
    candidate: Mapping[str, Any],
    *,
    callback: EpochCallback | None = None,
) -> FinalModel:
    """Train the final network on the whole training set with the chosen candidate."""
    settings = other_settings(dict(candidate))
    l2_lambda = float(candidate[L2_KEY])
    config = candidate_config(config, dict(candidate))
    normalizer = Normalizer.fit(dataset.X_train, method=config.data.normalization)
    X = normalizer.transform(dataset.X_train, dtype=config.model.dtype)
    y = dataset.y_train.astype(np.int64)
    seed = fold_seed(config.cv.seed, l2_lambda, -1, settings)
    started = time.perf_counter()
    network, history, message, _, _ = _fit_network(
        config,
        X,
        y,
        n_classes=dataset.n_classes,
        epochs=config.training.resolved_final_epochs,
        seed=seed,
        callback=callback,
        augment=augmenter_for(config, normalizer, X.shape[1]),
    )
    if message:
        raise DivergenceError(
            f"the final model diverged: {message}", epoch=len(history.get("epoch", []))
        )
    seconds = time.perf_counter() - started
    return FinalModel(network, normalizer, history, l2_lambda, seconds, settings)


def predict_test(final: FinalModel, dataset: Dataset) -> tuple[Evaluation, np.ndarray]:
    """Test-set accuracy, loss and confusion matrix; also returns the predicted labels."""
    X_test = final.normalizer.transform(dataset.X_test, dtype=final.network.dtype)
    y_test = dataset.y_test.astype(np.int64)
    logits = final.network.forward(X_test)
    predicted = logits.argmax(axis=1)
    loss = cross_entropy(logits, y_test)
    return evaluation_from(y_test, predicted, loss, final.network.n_classes), predicted


def evaluation_from(
    y_true: np.ndarray, y_pred: np.ndarray, loss: float, n_classes: int = N_CLASSES
) -> Evaluation:
    """Build an :class:`Evaluation` from true and predicted labels."""
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    return Evaluation(
        accuracy=float(np.mean(y_true == y_pred)),
        loss=float(loss),
        n_samples=int(y_true.size),
        confusion=confusion.tolist(),
    )
