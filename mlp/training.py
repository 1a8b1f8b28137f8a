"""The training loop: :func:`fit` and its per-epoch :class:`History`.

The mini-batch loop is written for speed: ``X`` is cast once to the network's dtype, each
batch is gathered with ``np.take(..., out=buffer)`` from a per-epoch permutation (the data
is never reshuffled in memory), and all activations/gradients live in buffers allocated
once per batch size (:class:`~mlp.workspace.Workspace`). Training loss and accuracy come
from the forward passes already done: for mini-batches they are the sample-weighted mean
over the epoch's batches (weights change during the epoch, and dropout, if any, is
active); for full-batch GD they are the values at that epoch's single forward pass,
before its update.

A training can stop and continue later, bit for bit (successive halving: a first rung of
epochs, then the survivors carry on): ``fit(..., stop_epoch=k)`` runs epochs 1..k of the
``epochs`` budget and returns, in ``History.state``, a :class:`TrainingState` (optimizer
state and random streams); ``fit(..., state=that_state)`` on the same network carries on at
epoch k + 1, the schedule still spanning the whole budget.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from mlp.errors import DivergenceError, MLPError
from mlp.losses import log_softmax
from mlp.network import MLP
from mlp.optimizers import Optimizer, check_state_arrays, make_optimizer
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


# The random streams of _TrainingLoop, by name, in the order they are spawned from the seed.
RNG_STREAMS = ("shuffle", "dropout", "augment")

# Version of the flat layout of TrainingState.to_arrays (checked by from_arrays). 2: the
# augmentation stream joined the random streams.
STATE_FORMAT_VERSION = 2

_WORD = (1 << 64) - 1  # a PCG64 128-bit state or increment is stored as two 64-bit words


@dataclass(eq=False)  # compared by identity: == on dicts of arrays has no single truth value
class TrainingState:
    """Where a training stopped: enough for :func:`fit` to continue it bit for bit.

    The network's weights are not part of it: the caller keeps the network (or its
    ``get_state()``) and hands it back to ``fit`` together with this state.

    Attributes
    ----------
    epoch : int
        Epochs done so far (0 = none); ``fit(..., state=state)`` starts at ``epoch + 1``.
    optimizer : dict of str to ndarray
        The optimizer's state, from :meth:`mlp.Optimizer.state_arrays` (step count ``t``
        included).
    rng : dict of str to ndarray
        ``"shuffle"``, ``"dropout"`` and ``"augment"``: each random stream's PCG64
        bit-generator state as a uint64 array of 6 words ``[state_hi, state_lo, inc_hi, inc_lo,
        has_uint32, uinteger]``.

    Notes
    -----
    Constructing one checks the fields (MLPError on anything malformed). Whether the
    optimizer state fits a given network and optimizer is checked by ``fit``.
    """

    epoch: int
    optimizer: dict[str, np.ndarray]
    rng: dict[str, np.ndarray]

    def __post_init__(self) -> None:
        epoch = self.epoch
        if isinstance(epoch, np.ndarray) and epoch.shape == () and epoch.dtype.kind in "iu":
            epoch = int(epoch)
        if isinstance(epoch, bool | np.bool_) or not isinstance(epoch, int | np.integer):
            raise MLPError(f"training state: epoch must be an integer, got {self.epoch!r}")
        if epoch < 0:
            raise MLPError(f"training state: epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)
        self.optimizer = check_state_arrays(self.optimizer)
        if not isinstance(self.rng, Mapping) or set(self.rng) != set(RNG_STREAMS):
            got = sorted(self.rng) if isinstance(self.rng, Mapping) else type(self.rng).__name__
            raise MLPError(f"training state: rng must hold {list(RNG_STREAMS)}, got {got}")
        self.rng = {name: _check_rng_words(name, self.rng[name]) for name in RNG_STREAMS}

    def to_arrays(self) -> dict[str, np.ndarray]:
        """One flat dict of plain numeric arrays (the state's own arrays, not copies).

        Keys: ``version`` and ``epoch`` (0-d int64), ``optimizer.<name>`` for each optimizer
        array, ``rng.shuffle``, ``rng.dropout`` and ``rng.augment``.
        ``np.savez(file, **state.to_arrays())`` then
        ``TrainingState.from_arrays(np.load(file, allow_pickle=False))`` round-trips it.
        """
        arrays = {
            "version": np.array(STATE_FORMAT_VERSION, dtype=np.int64),
            "epoch": np.array(self.epoch, dtype=np.int64),
        }
        arrays.update({f"optimizer.{name}": a for name, a in self.optimizer.items()})
        arrays.update({f"rng.{name}": a for name, a in self.rng.items()})
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> TrainingState:
        """Inverse of :meth:`to_arrays`: check the arrays and build the state (copies).

        Parameters
        ----------
        arrays : mapping of str to ndarray
            A dict or an open ``np.load(..., allow_pickle=False)`` archive.

        Raises
        ------
        MLPError
            Missing or unexpected names, object (pickled) arrays, wrong dtypes, shapes or
            values, in one line naming the array. The optimizer arrays' fit to a network
            (count, shapes, dtype) and optimizer (kind, settings) is checked by :func:`fit`.
        """
        if not isinstance(arrays, Mapping):
            raise MLPError(f"training state must be a mapping of arrays, got {type(arrays)}")
        loaded = {name: _read_state_array(arrays, name) for name in arrays}
        version = loaded.get("version")
        if version is not None and (
            version.shape != () or version.dtype.kind not in "iu" or version != STATE_FORMAT_VERSION
        ):
            raise MLPError(
                f"training state: format version {version.tolist()!r}, expected "
                f"{STATE_FORMAT_VERSION} "
                "(a state saved by an older mlp cannot be continued: train again)"
            )
        required = ["version", "epoch", *(f"rng.{name}" for name in RNG_STREAMS)]
        missing = [name for name in required if name not in loaded]
        if missing:
            raise MLPError(f"training state: missing arrays {missing}")
        unexpected = sorted(
            name for name in loaded if name not in required and not name.startswith("optimizer.")
        )
        if unexpected:
            raise MLPError(f"training state: unexpected arrays {unexpected}")
        epoch = loaded["epoch"]
        if epoch.shape != () or epoch.dtype.kind not in "iu":
            raise MLPError(f"training state: epoch must be a 0-d integer array, got {epoch!r}")
        optimizer = {
            name.removeprefix("optimizer."): a
            for name, a in loaded.items()
            if name.startswith("optimizer.")
        }
        rng = {name: loaded[f"rng.{name}"] for name in RNG_STREAMS}
        return cls(epoch=int(epoch), optimizer=optimizer, rng=rng)


def _read_state_array(arrays: Mapping[str, np.ndarray], name) -> np.ndarray:
    """A copy of ``arrays[name]``, refusing object arrays (and, from np.load, pickles)."""
    if not isinstance(name, str):
        raise MLPError(f"training state: array names must be strings, got {name!r}")
    try:
        a = arrays[name]
    except ValueError as exc:  # np.load(allow_pickle=False) refusing an object array
        raise MLPError(f"training state: array {name!r} cannot be read ({exc})") from None
    if not isinstance(a, np.ndarray):
        raise MLPError(f"training state: {name!r} is a {type(a).__name__}, not an ndarray")
    if a.dtype.kind not in "biuf":
        raise MLPError(f"training state: array {name!r} has dtype {a.dtype}, not real numbers")
    return np.array(a, order="C")


def _check_rng_words(name: str, words) -> np.ndarray:
    """The stream's 6 uint64 words (see :class:`TrainingState`), checked; a copy."""
    if not (isinstance(words, np.ndarray) and words.dtype == np.uint64 and words.shape == (6,)):
        raise MLPError(
            f"training state: rng {name!r} must be a uint64 array of shape (6,), got "
            f"{getattr(words, 'dtype', type(words).__name__)} {np.shape(words)}"
        )
    inc_lo, has_uint32, uinteger = int(words[3]), int(words[4]), int(words[5])
    # PCG64 streams always have an odd increment; the buffered half-word is 32 bits.
    if inc_lo % 2 == 0 or has_uint32 not in (0, 1) or uinteger >= 1 << 32:
        raise MLPError(f"training state: rng {name!r} is not a valid PCG64 state")
    return words.copy()


def _rng_words(rng: np.random.Generator) -> np.ndarray:
    """A generator's PCG64 state as 6 uint64 words (128-bit integers split in two)."""
    state = rng.bit_generator.state
    if state["bit_generator"] != "PCG64":  # default_rng's bit generator; nothing else is saved
        raise MLPError(f"cannot save a {state['bit_generator']} random stream")
    s, inc = state["state"]["state"], state["state"]["inc"]
    words = [s >> 64, s & _WORD, inc >> 64, inc & _WORD, state["has_uint32"], state["uinteger"]]
    return np.array(words, dtype=np.uint64)


def _set_rng_words(rng: np.random.Generator, words: np.ndarray) -> None:
    """Put a state saved by :func:`_rng_words` into ``rng``'s PCG64 bit generator."""
    w = [int(x) for x in words]
    rng.bit_generator.state = {
        "bit_generator": "PCG64",
        "state": {"state": w[0] << 64 | w[1], "inc": w[2] << 64 | w[3]},
        "has_uint32": w[4],
        "uinteger": w[5],
    }


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
        Epoch with the lowest ``val_loss`` among the epochs of this call (None without
        validation data); with ``restore_best`` the returned network holds its weights.
    state : TrainingState or None
        The optimizer state and random streams after the last epoch run (set whenever
        :func:`fit` returns): pass it back as ``fit(..., state=...)`` with the network to
        continue. After early stopping with ``restore_best`` it belongs to the last epoch,
        not to the restored weights.
    """

    records: list[dict] = field(default_factory=list)
    stopped_epoch: int | None = None
    best_epoch: int | None = None
    state: TrainingState | None = None

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
    augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
    X_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    early_stopping: int | None = None,
    restore_best: bool = True,
    shuffle: bool = True,
    seed: int = 0,
    callback: Callable[[dict], None] | None = None,
    stop_epoch: int | None = None,
    state: TrainingState | None = None,
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
    augment : callable, optional
        A batch transform, ``augment(X_batch, rng) -> X_batch'``, applied to every training
        batch (never to ``X_val``) before its forward pass: data augmentation. It gets the
        batch's rows (shape ``(rows, n_features)``, the network's dtype), must leave them
        unchanged and return an array of the same shape; ``rng`` is the training's own
        augmentation stream, so a fixed ``seed`` gives the same distortions. The records'
        ``train_*`` figures are then those of the transformed batches.
    X_val, y_val : ndarray, optional
        Validation data, evaluated after every epoch (no dropout).
    early_stopping : int, optional
        Patience: stop after this many epochs without a lower ``val_loss``. Not with a
        partial run (``stop_epoch < epochs`` or ``state``).
    restore_best : bool
        With validation data, put back the weights of the best epoch at the end. Must be
        False for a partial run with validation data (the weights handed back must be the
        last epoch's for the training to continue).
    shuffle : bool
        Visit the samples in a new random order every epoch.
    seed : int
        Seeds the shuffling, dropout and augmentation streams (the initial weights come from
        ``net``);
        not used with ``state``, whose streams carry on.
    callback : callable, optional
        ``callback(record)`` after every epoch (progress bars, tracking).
    stop_epoch : int, optional
        Return after this (1-based) epoch of the ``epochs`` budget; default ``epochs``.
        Must be greater than ``state.epoch`` (0 without ``state``) and at most ``epochs``.
    state : TrainingState, optional
        Continue a training stopped with ``stop_epoch``: pass its ``History.state`` and
        the network as it was returned (or a copy). Training resumes at ``state.epoch + 1``
        with the saved optimizer state (loaded into an ``Optimizer`` instance if one is
        given) and random streams; every other argument must be those of the first call,
        ``epochs`` included (the schedule spans the whole budget). Epochs 1-3, then 4-7,
        then 8-10 give the weights and records (``seconds`` aside) of one 10-epoch run.

    Returns
    -------
    History
        The records of the epochs run by this call, and ``state`` after the last one.

    Raises
    ------
    MLPError
        Invalid argument (message names it and the value received), or a ``state`` that
        does not fit the network or optimizer.
    DivergenceError
        The training loss of an epoch is not finite (raised at the end of that epoch).
    """
    _check_arguments(
        net,
        X_val,
        y_val,
        callback,
        augment,
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
    first, last = _check_continuation(
        epochs, stop_epoch, state, early_stopping, restore_best and X_val is not None
    )
    opt = _make_optimizer(optimizer, lr, momentum)
    lr_at = _make_lr_schedule(schedule, lr, epochs, schedule_kwargs)
    loop = _TrainingLoop(net, opt, X, y, batch_size, l2, dropout, shuffle, seed, augment)
    if state is not None:
        loop.load_state(state)

    history = History()
    best = _BestEpoch(keep_params=restore_best)
    for epoch in range(first, last + 1):
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
    history.state = loop.state(epoch)
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


def _check_arguments(net, X_val, y_val, callback, augment, **values) -> None:
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
    if augment is not None and not callable(augment):
        raise MLPError(f"augment must be callable, got {augment!r}")


def _check_continuation(
    epochs: int,
    stop_epoch: int | None,
    state: TrainingState | None,
    early_stopping: int | None,
    restores_best: bool,
) -> tuple[int, int]:
    """The first and last epoch :func:`fit` runs; MLPError if they or the options clash."""
    if state is not None and not isinstance(state, TrainingState):
        raise MLPError(f"state must be an mlp.TrainingState, got {type(state).__name__}")
    if stop_epoch is not None:
        check_number("stop_epoch", stop_epoch, low=1, high=epochs, integer=True)
    stop = epochs if stop_epoch is None else int(stop_epoch)
    done = 0 if state is None else state.epoch
    if done >= stop:
        raise MLPError(
            f"the state is after epoch {done}, so stop_epoch must be > {done}, got {stop}"
            + (f" (epochs={epochs})" if stop_epoch is None else "")
        )
    if stop < epochs or state is not None:
        # Early stopping may end a rung before stop_epoch, and restore_best hands back other
        # weights than the last epoch's: the next rung would not continue what ran.
        if early_stopping is not None:
            raise MLPError(
                "early_stopping cannot be combined with stop_epoch < epochs or a state "
                "(a training to be continued must run its epochs to the end)"
            )
        if restores_best:
            raise MLPError(
                "restore_best=True with validation data cannot be combined with stop_epoch < "
                "epochs or a state (the weights handed back must be the last epoch's); pass "
                "restore_best=False"
            )
    return done + 1, stop


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
        augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
    ) -> None:
        self.net, self.opt, self.X, self.y = net, opt, X, y
        self.n = n = X.shape[0]
        if opt.full_batch or batch_size is None or batch_size >= n:
            batch_size = n
        self.batch_size = batch_size
        self.l2 = float(l2)
        self.dropout = dropout
        self.shuffle = shuffle
        # Spawned children keep their order: the augmentation stream, added last, leaves the
        # shuffling and dropout of a given seed as they were.
        self.shuffle_rng, self.dropout_rng, self.augment_rng = np.random.default_rng(seed).spawn(3)
        self.augment = augment
        self.params = net.params
        self._workspaces: dict[int, Workspace] = {}

    def load_state(self, state: TrainingState) -> None:
        """Continue from ``state``: its optimizer state and random streams replace ours."""
        # Checked again (the dataclass's fields may have been replaced since it was made), and
        # before the optimizer takes its state: a refused state leaves an Optimizer unchanged.
        rng = {name: _check_rng_words(name, state.rng[name]) for name in RNG_STREAMS}
        try:
            self.opt.load_state_arrays(state.optimizer, self.params)
        except MLPError as exc:
            raise MLPError(f"state does not fit: {exc}") from None
        _set_rng_words(self.shuffle_rng, rng["shuffle"])
        _set_rng_words(self.dropout_rng, rng["dropout"])
        _set_rng_words(self.augment_rng, rng["augment"])

    def state(self, epoch: int) -> TrainingState:
        """The state after ``epoch`` epochs: copies of the optimizer state and the streams."""
        rng = {name: _rng_words(getattr(self, f"{name}_rng")) for name in RNG_STREAMS}
        return TrainingState(epoch=epoch, optimizer=self.opt.state_arrays(), rng=rng)

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
            ws, Xb, yb = self._workspace(self.n), self.X, self.y
        else:
            ws = self._workspace(idx.shape[0])
            # mode="clip" skips numpy's bounds-check buffering (idx is valid).
            np.take(self.X, idx, axis=0, out=ws.X, mode="clip")
            np.take(self.y, idx, out=ws.y, mode="clip")
            Xb, yb = ws.X, ws.y
        if self.augment is not None:
            Xb = self._augmented(Xb)
        return ws, Xb, yb

    def _augmented(self, Xb: np.ndarray) -> np.ndarray:
        out = self.augment(Xb, self.augment_rng)
        if not isinstance(out, np.ndarray) or out.shape != Xb.shape:
            shape = getattr(out, "shape", type(out).__name__)
            raise MLPError(f"augment must return an array of shape {Xb.shape}, got {shape}")
        if out.dtype.kind not in "iuf":
            raise MLPError(f"augment must return real numbers, got dtype {out.dtype}")
        return out if out.dtype == Xb.dtype else out.astype(Xb.dtype)

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
