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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from mlp.errors import DivergenceError, MLPError
from mlp.losses import log_softmax
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
    _check_arguments(
        net,
        X_val,
        y_val,
        callback,
        epochs=epochs,
        lr=lr,
        l2=l2,
        dropout=dropout,
        batch_size=batch_size,
        early_stopping=early_stopping,
    )
    X = check_X(X, net.n_features, net.dtype, finite=True)
    y = check_y(y, X.shape[0], net.n_classes)
    if X_val is not None:
        X_val = check_X(X_val, net.n_features, net.dtype, name="X_val", finite=True)
        y_val = check_y(y_val, X_val.shape[0], net.n_classes, name="y_val")
    opt = _make_optimizer(optimizer, lr, momentum)
    lr_at = _make_lr_schedule(schedule, lr, epochs, schedule_kwargs)
    loop = _TrainingLoop(net, opt, X, y, batch_size, l2, dropout, shuffle, seed)

    history = History()
    best = _BestEpoch(keep_params=restore_best)
    for epoch in range(1, epochs + 1):
        record = _train_epoch(loop, epoch, lr_at(epoch))
        if X_val is not None:
            record["val_loss"], record["val_accuracy"] = _validate_epoch(net, X_val, y_val)
            if best.update(epoch, record["val_loss"], net.params):
                history.best_epoch = epoch
        history.records.append(record)
        if callback is not None:
            callback(dict(record))
        if early_stopping is not None and best.bad_epochs >= early_stopping:
            history.stopped_epoch = epoch
            break
    best.restore(net.params)
    return history


# ============================================================================ arguments

# Bounds of fit's numeric arguments, checked once, in this order, by ``check_number`` (whose
# keyword arguments they are); ``None`` is accepted where ``none_ok`` is set.
_PARAMETER_CONSTRAINTS: dict[str, dict] = {
    "epochs": {"low": 1, "integer": True},
    "lr": {"low": 0, "low_open": True},
    "l2": {"low": 0},
    "dropout": {"low": 0, "high": 1, "high_open": True},
    "batch_size": {"low": 1, "integer": True, "none_ok": True},
    "early_stopping": {"low": 1, "integer": True, "none_ok": True},
}


def _check_arguments(net, X_val, y_val, callback, **values) -> None:
    """Raise MLPError for the first invalid argument of :func:`fit` (data arrays aside)."""
    if not isinstance(net, MLP):
        raise MLPError(f"net must be an mlp.MLP, got {type(net).__name__}")
    for name, constraint in _PARAMETER_CONSTRAINTS.items():
        bounds = dict(constraint)
        if not (bounds.pop("none_ok", False) and values[name] is None):
            check_number(name, values[name], **bounds)
    if values["early_stopping"] is not None and X_val is None:
        raise MLPError("early_stopping needs validation data (X_val, y_val)")
    if (X_val is None) != (y_val is None):
        raise MLPError("pass both X_val and y_val, or neither")
    if callback is not None and not callable(callback):
        raise MLPError(f"callback must be callable, got {callback!r}")


def _make_optimizer(optimizer: str | Optimizer, lr: float, momentum: float) -> Optimizer:
    if isinstance(optimizer, Optimizer):
        return optimizer
    if isinstance(optimizer, str):
        kwargs = {"momentum": momentum} if optimizer in ("momentum", "nesterov") else {}
        return make_optimizer(optimizer, lr=lr, **kwargs)
    raise MLPError(f"optimizer must be a name or an Optimizer, got {optimizer!r}")


def _make_lr_schedule(
    schedule: str | Callable[[int], float], lr: float, epochs: int, schedule_kwargs: dict | None
) -> Callable[[int], float]:
    if callable(schedule) and not isinstance(schedule, str):
        return schedule
    return make_schedule(schedule, lr, epochs, **(schedule_kwargs or {}))


# ============================================================================ one epoch


class _TrainingLoop:
    """The training steps of one :func:`fit` call: batches, buffers, random streams.

    ``X`` and ``y`` are already checked (``X`` in the network's dtype). Full-batch training
    (``batch_size`` None or >= n, or an optimizer with ``full_batch``) steps on ``X`` itself;
    mini-batches are gathered into per-batch-size buffers from a per-epoch permutation.
    """

    def __init__(
        self,
        net: MLP,
        opt: Optimizer,
        X: np.ndarray,
        y: np.ndarray,
        batch_size: int | None,
        l2: float,
        dropout: float,
        shuffle: bool,
        seed: int,
    ) -> None:
        self.net, self.opt, self.X, self.y = net, opt, X, y
        self.n = n = X.shape[0]
        if opt.full_batch or batch_size is None or batch_size >= n:
            batch_size = n
        self.batch_size = batch_size
        self.l2 = float(l2)
        self.dropout = dropout
        self.shuffle = shuffle
        self.shuffle_rng, self.dropout_rng = np.random.default_rng(seed).spawn(2)
        self.params = net.params
        self._workspaces: dict[int, Workspace] = {}

    def _workspace(self, rows: int) -> Workspace:
        if rows not in self._workspaces:
            self._workspaces[rows] = Workspace(self.net, rows, self.dropout, gather=rows < self.n)
        return self._workspaces[rows]

    def _batches(self) -> Iterator[np.ndarray | None]:
        """Row indices of each batch of the epoch; a single None for full-batch training."""
        if self.batch_size == self.n:
            yield None
            return
        order = self.shuffle_rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        for lo in range(0, self.n, self.batch_size):
            yield order[lo : lo + self.batch_size]

    def _batch(self, idx: np.ndarray | None) -> tuple[Workspace, np.ndarray, np.ndarray]:
        """The workspace for a batch, and the batch's inputs and labels (gathered into it)."""
        if idx is None:
            return self._workspace(self.n), self.X, self.y
        ws = self._workspace(idx.shape[0])
        # mode="clip" skips numpy's bounds-check buffering (idx is valid).
        np.take(self.X, idx, axis=0, out=ws.X, mode="clip")
        np.take(self.y, idx, out=ws.y, mode="clip")
        return ws, ws.X, ws.y

    def run_epoch(self, step_lr: float) -> tuple[float, float, int]:
        """One pass over the data, one optimizer update per batch.

        Returns
        -------
        loss_sum : float
            Sum of the per-sample cross-entropies of the epoch's forward passes.
        objective_sum : float
            The same plus each batch's ``rows * penalty`` (0.0 without L2).
        n_correct : int
            Correct predictions of those forward passes.
        """
        net, opt, l2 = self.net, self.opt, self.l2
        fold = opt.folds_lr  # gradients come out already multiplied by the learning rate
        loss_sum, objective_sum, n_correct = 0.0, 0.0, 0
        # NaN/inf only matter at the epoch's end, where they raise DivergenceError.
        with np.errstate(over="ignore", invalid="ignore"):
            for idx in self._batches():
                ws, Xb, yb = self._batch(idx)
                batch_loss, batch_correct = train_step(
                    net, ws, Xb, yb, l2, self.dropout_rng, step_lr if fold else 1.0
                )
                loss_sum += batch_loss
                n_correct += batch_correct
                if l2:
                    objective_sum += batch_loss + ws.n * net.penalty(l2)
                opt.update(self.params, ws.grads, step_lr, lr_folded=fold)
        return loss_sum, objective_sum, n_correct


def _train_epoch(loop: _TrainingLoop, epoch: int, step_lr: float) -> dict:
    """Run one epoch at the schedule's ``step_lr``; its record, validation fields NaN."""
    if not (isinstance(step_lr, numbers.Real) and math.isfinite(step_lr) and step_lr > 0):
        raise MLPError(f"schedule gave learning rate {step_lr!r} at epoch {epoch}; need > 0")
    step_lr = float(step_lr)
    start = time.perf_counter()
    loss_sum, objective_sum, n_correct = loop.run_epoch(step_lr)
    seconds = time.perf_counter() - start
    train_loss = loss_sum / loop.n
    train_objective = objective_sum / loop.n if loop.l2 else train_loss
    _check_divergence(epoch, step_lr, train_loss, train_objective, loop.params)
    return {
        "epoch": epoch,
        "lr": step_lr,
        "train_loss": train_loss,
        "train_objective": train_objective,
        "train_accuracy": n_correct / loop.n,
        "val_loss": math.nan,
        "val_accuracy": math.nan,
        "seconds": seconds,
    }


def _check_divergence(
    epoch: int, step_lr: float, train_loss: float, train_objective: float, params: list
) -> None:
    finite_params = all(np.isfinite(p).all() for p in params)
    if math.isfinite(train_loss) and math.isfinite(train_objective) and finite_params:
        return
    what = f"train loss is {train_loss}" if finite_params else "weights are not finite"
    raise DivergenceError(
        f"training diverged at epoch {epoch}: {what}; "
        f"try a smaller learning rate (lr was {step_lr:g})",
        epoch=epoch,
    )


# ============================================================================ validation


def _validate_epoch(net: MLP, X_val: np.ndarray, y_val: np.ndarray) -> tuple[float, float]:
    """``(val_loss, val_accuracy)``: mean cross-entropy and accuracy, no dropout."""
    # Huge (still finite) weights can overflow here; the next epoch's check catches it.
    with np.errstate(over="ignore", invalid="ignore"):
        logits = net.forward(X_val)
        picked = log_softmax(logits)[np.arange(y_val.shape[0]), y_val]
    return float(-picked.mean(dtype=np.float64)), float(np.mean(logits.argmax(axis=1) == y_val))


class _BestEpoch:
    """The epoch with the lowest ``val_loss`` so far, and a copy of its weights if kept."""

    def __init__(self, keep_params: bool) -> None:
        self.keep_params = keep_params
        self.loss = math.inf
        self.params: list[np.ndarray] | None = None
        self.bad_epochs = 0  # epochs since the best one

    def update(self, epoch: int, val_loss: float, params: list[np.ndarray]) -> bool:
        """Record an epoch's ``val_loss``; True if it is a new best."""
        if not val_loss < self.loss:  # NaN is never an improvement
            self.bad_epochs += 1
            return False
        self.loss, self.bad_epochs = val_loss, 0
        if self.keep_params:
            self.params = [p.copy() for p in params]
        return True

    def restore(self, params: list[np.ndarray]) -> None:
        """Put the kept weights back, in place (the optimizer and caller keep valid references)."""
        if self.params is not None:
            for p, best in zip(params, self.params, strict=True):
                p[...] = best
