"""The training loop: :func:`fit` and its per-epoch :class:`History`.

The mini-batch loop is written for speed: ``X`` is cast once to the network's dtype, each
batch is gathered with ``np.take(..., out=buffer)`` from a per-epoch permutation (the data
is never reshuffled in memory), and all activations/gradients live in buffers allocated
once per batch size (:class:`~mlp.workspace.Workspace`). Training loss and accuracy come
from the forward passes already done: for mini-batches they are the sample-weighted mean
over the epoch's batches (weights change during the epoch, and dropout, if any, is
active); for full-batch GD they are the values at that epoch's single forward pass,
before its update.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mlp.errors import DivergenceError, MLPError
from mlp.network import MLP
from mlp.optimizers import Optimizer, make_optimizer
from mlp.schedules import make_schedule
from mlp.validation import check_number, check_X, check_y
from mlp.workspace import Workspace, train_step

RECORD_KEYS = (
    "epoch",
    "lr",
    "train_loss",
    "train_objective",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "seconds",
)


@dataclass
class History:
    """What :func:`fit` saw, one record per epoch run.

    Attributes
    ----------
    records : list of dict
        Keys: ``epoch`` (1-based), ``lr``, ``train_loss`` (mean CE, no penalty),
        ``train_objective`` (CE + l2/2 sum ||W||^2), ``train_accuracy``, ``val_loss``,
        ``val_accuracy`` (NaN without validation data), ``seconds`` (wall time of the
        epoch's training steps, validation excluded).
    stopped_epoch : int or None
        Epoch after which early stopping ended training; None if all epochs ran.
    best_epoch : int or None
        Epoch with the lowest ``val_loss`` (None without validation data); with
        ``restore_best`` the returned network holds that epoch's weights.
    """

    records: list[dict] = field(default_factory=list)
    stopped_epoch: int | None = None
    best_epoch: int | None = None

    def as_columns(self) -> dict[str, list]:
        """Column-oriented view: ``pd.DataFrame(history.as_columns())`` works."""
        return {key: [r[key] for r in self.records] for key in RECORD_KEYS}

    def __len__(self) -> int:
        return len(self.records)


def fit(
    net: MLP,
    X: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    optimizer: str | Optimizer = "sgd",
    lr: float = 0.1,
    batch_size: int | None = 128,
    l2: float = 0.0,
    schedule: str | Callable[[int], float] = "constant",
    schedule_kwargs: dict | None = None,
    momentum: float = 0.9,
    dropout: float = 0.0,
    X_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    early_stopping: int | None = None,
    restore_best: bool = True,
    shuffle: bool = True,
    seed: int = 0,
    callback: Callable[[dict], None] | None = None,
) -> History:
    """Train ``net`` in place on ``(X, y)``.

    Parameters
    ----------
    net : MLP
    X : ndarray, shape (n, n_features)
        Already normalised; cast once to ``net.dtype``.
    y : ndarray of int, shape (n,)
        Labels in ``[0, n_classes)``.
    epochs : int >= 1
    optimizer : {"gd", "sgd", "momentum", "nesterov", "adam"} or Optimizer
        ``"gd"`` (or an optimizer with ``full_batch = True``) uses the whole training set
        for every step and ignores ``batch_size``.
    lr : float > 0
        Base learning rate, fed through the schedule each epoch.
    batch_size : int >= 1 or None
        None means full-batch gradient descent.
    l2 : float >= 0
        Objective = mean CE + l2/2 sum_l ||W_l||^2, biases not decayed (see
        :mod:`mlp.network` for the comparison with scikit-learn's ``alpha``).
    schedule : {"constant", "step", "cosine"} or callable
        ``callable(epoch) -> lr`` with 1-based epochs; names go through
        :func:`mlp.schedules.make_schedule` with ``schedule_kwargs``.
    momentum : float
        Used by the "momentum" and "nesterov" optimizers.
    dropout : float in [0, 1)
        Probability of zeroing a hidden unit during training (inverted dropout).
    X_val, y_val : ndarray, optional
        Validation data, evaluated after every epoch (no dropout).
    early_stopping : int, optional
        Patience: stop after this many epochs without a lower ``val_loss``.
    restore_best : bool
        With validation data, put back the weights of the best epoch at the end.
    shuffle : bool
        Visit the samples in a new random order every epoch.
    seed : int
        Seeds the shuffling and dropout streams (the initial weights come from ``net``).
    callback : callable, optional
        ``callback(record)`` after every epoch (progress bars, tracking).

    Returns
    -------
    History

    Raises
    ------
    MLPError
        Invalid argument (message names it and the value received).
    DivergenceError
        The training loss of an epoch is not finite (raised at the end of that epoch).
    """
    if not isinstance(net, MLP):
        raise MLPError(f"net must be an mlp.MLP, got {type(net).__name__}")
    check_number("epochs", epochs, low=1, integer=True)
    check_number("lr", lr, low=0, low_open=True)
    check_number("l2", l2, low=0)
    check_number("dropout", dropout, low=0, high=1, high_open=True)
    if batch_size is not None:
        check_number("batch_size", batch_size, low=1, integer=True)
    if early_stopping is not None:
        check_number("early_stopping", early_stopping, low=1, integer=True)
        if X_val is None:
            raise MLPError("early_stopping needs validation data (X_val, y_val)")
    if (X_val is None) != (y_val is None):
        raise MLPError("pass both X_val and y_val, or neither")
    if callback is not None and not callable(callback):
        raise MLPError(f"callback must be callable, got {callback!r}")

    X = check_X(X, net.n_features, net.dtype, finite=True)
    y = check_y(y, X.shape[0], net.n_classes)
    n = X.shape[0]
    has_val = X_val is not None
    if has_val:
        X_val = check_X(X_val, net.n_features, net.dtype, name="X_val", finite=True)
        y_val = check_y(y_val, X_val.shape[0], net.n_classes, name="y_val")

    if isinstance(optimizer, Optimizer):
        opt = optimizer
    elif isinstance(optimizer, str):
        kwargs = {"momentum": momentum} if optimizer in ("momentum", "nesterov") else {}
        opt = make_optimizer(optimizer, lr=lr, **kwargs)
    else:
        raise MLPError(f"optimizer must be a name or an Optimizer, got {optimizer!r}")
    if callable(schedule) and not isinstance(schedule, str):
        lr_at = schedule
    else:
        lr_at = make_schedule(schedule, lr, epochs, **(schedule_kwargs or {}))
    if opt.full_batch or batch_size is None or batch_size >= n:
        batch_size = n

    shuffle_rng, dropout_rng = np.random.default_rng(seed).spawn(2)
    workspaces: dict[int, Workspace] = {}

    def workspace(rows: int) -> Workspace:
        if rows not in workspaces:
            workspaces[rows] = Workspace(net, rows, dropout, gather=rows < n)
        return workspaces[rows]

    params = net.params
    l2 = float(l2)
    fold = opt.folds_lr  # gradients come out already multiplied by the learning rate
    history = History()
    best_loss, best_params, bad_epochs = math.inf, None, 0

    for epoch in range(1, epochs + 1):
        step_lr = lr_at(epoch)
        if not (isinstance(step_lr, numbers.Real) and math.isfinite(step_lr) and step_lr > 0):
            raise MLPError(f"schedule gave learning rate {step_lr!r} at epoch {epoch}; need > 0")
        step_lr = float(step_lr)
        start = time.perf_counter()
        loss_sum, objective_sum, n_correct = 0.0, 0.0, 0
        # NaN/inf only matter at the epoch's end, where they raise DivergenceError.
        with np.errstate(over="ignore", invalid="ignore"):
            if batch_size == n:
                ws = workspace(n)
                batch_loss, n_correct = train_step(
                    net, ws, X, y, l2, dropout_rng, step_lr if fold else 1.0
                )
                loss_sum = batch_loss
                objective_sum = batch_loss + n * net.penalty(l2)
                opt.update(params, ws.grads, step_lr, lr_folded=fold)
            else:
                order = shuffle_rng.permutation(n) if shuffle else np.arange(n)
                for lo in range(0, n, batch_size):
                    idx = order[lo : lo + batch_size]
                    ws = workspace(idx.shape[0])
                    # mode="clip" skips numpy's bounds-check buffering (idx is valid).
                    np.take(X, idx, axis=0, out=ws.X, mode="clip")
                    np.take(y, idx, out=ws.y, mode="clip")
                    batch_loss, batch_correct = train_step(
                        net, ws, ws.X, ws.y, l2, dropout_rng, step_lr if fold else 1.0
                    )
                    loss_sum += batch_loss
                    n_correct += batch_correct
                    if l2:
                        objective_sum += batch_loss + ws.n * net.penalty(l2)
                    opt.update(params, ws.grads, step_lr, lr_folded=fold)
        seconds = time.perf_counter() - start
        train_loss = loss_sum / n
        train_objective = objective_sum / n if l2 else train_loss
        finite_params = all(np.isfinite(p).all() for p in params)
        if not (math.isfinite(train_loss) and math.isfinite(train_objective) and finite_params):
            what = f"train loss is {train_loss}" if finite_params else "weights are not finite"
            raise DivergenceError(
                f"training diverged at epoch {epoch}: {what}; "
                f"try a smaller learning rate (lr was {step_lr:g})",
                epoch=epoch,
            )
        record = {
            "epoch": epoch,
            "lr": step_lr,
            "train_loss": train_loss,
            "train_objective": train_objective,
            "train_accuracy": n_correct / n,
            "val_loss": math.nan,
            "val_accuracy": math.nan,
            "seconds": seconds,
        }
        if has_val:
            # Huge (still finite) weights can overflow here; the next epoch's check catches it.
            with np.errstate(over="ignore", invalid="ignore"):
                logits = net.forward(X_val)
                picked = _log_softmax_picked(logits, y_val)
            record["val_loss"] = float(-picked.mean(dtype=np.float64))
            record["val_accuracy"] = float(np.mean(logits.argmax(axis=1) == y_val))
            if record["val_loss"] < best_loss:
                best_loss, bad_epochs = record["val_loss"], 0
                history.best_epoch = epoch
                if restore_best:
                    best_params = [p.copy() for p in params]
            else:
                bad_epochs += 1
        history.records.append(record)
        if callback is not None:
            callback(dict(record))
        if early_stopping is not None and bad_epochs >= early_stopping:
            history.stopped_epoch = epoch
            break

    if restore_best and best_params is not None:
        for p, best in zip(params, best_params, strict=True):
            p[...] = best  # in place: the optimizer and caller keep valid references
    return history


def _log_softmax_picked(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    from mlp.losses import log_softmax

    return log_softmax(logits)[np.arange(y.shape[0]), y]
