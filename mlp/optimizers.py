"""Optimizers that own their state and update parameters in place.

An optimizer sees flat, aligned lists ``params`` and ``grads`` (``[W0, b0, W1, b1, ...]``
for an :class:`~mlp.network.MLP`) and applies one step with ``update(params, grads, lr)``.
Its state (velocities, Adam moments, step count) is created on the first update, one
buffer per parameter, so an optimizer object belongs to one network. ``state_arrays()`` and
``load_state_arrays()`` export and import that state as named plain arrays, so a training
can stop and continue later with the very same updates (see :class:`mlp.TrainingState`).

Batching is the training loop's business: full-batch gradient descent is :class:`SGD`
fed the whole training set (``fit(..., optimizer="gd")`` does that).

The gradients already contain the L2 term (``l2 * W``), so Adam here is Adam with a
coupled L2 penalty, not AdamW.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from mlp.errors import MLPError

OPTIMIZER_NAMES = ("gd", "sgd", "momentum", "nesterov", "adam")

# A per-parameter state array's name: the buffer's name and the parameter's index ("m3").
_BUFFER_NAME = re.compile(r"([A-Za-z_]+)([0-9]+)")


class Optimizer:
    """Base class: ``update(params, grads, lr)`` changes every ``params[i]`` in place.

    Parameters
    ----------
    lr : float
        Learning rate used when ``update`` is called without one.

    Notes
    -----
    A subclass with state names its per-parameter buffers in ``_buffer_attributes`` and
    the hyperparameters they depend on in ``_settings``; :meth:`state_arrays` and
    :meth:`load_state_arrays` then export and import them (and the step count ``t``).
    """

    full_batch = False
    # True if ``update`` accepts gradients already multiplied by the learning rate
    # (``lr_folded=True``): the training loop then scales the output-layer gradient once,
    # before backpropagation, and the update saves a full pass over the parameters.
    folds_lr = False

    def __init__(self, lr: float = 0.1) -> None:
        _check_lr(lr)
        self.lr = float(lr)
        self.t = 0  # number of updates applied so far
        self._tmp: list[np.ndarray] | None = None

    def update(
        self,
        params: list[np.ndarray],
        grads: list[np.ndarray],
        lr: float | None = None,
        *,
        lr_folded: bool = False,
    ) -> None:
        """Apply one step to ``params`` in place.

        Parameters
        ----------
        params : list of ndarray
            Parameters, updated in place.
        grads : list of ndarray
            ``grads[i]`` has the shape of ``params[i]``; left unchanged.
        lr : float, optional
            This step's learning rate (for schedules); defaults to ``self.lr``.
        lr_folded : bool
            ``grads`` already hold ``lr * gradient`` (only for optimizers with
            ``folds_lr = True``).
        """
        if len(params) != len(grads):
            raise MLPError(f"got {len(params)} parameters but {len(grads)} gradients")
        if lr_folded and not self.folds_lr:
            raise MLPError(f"{type(self).__name__} cannot take lr-folded gradients")
        if self._tmp is None:
            self._tmp = [np.empty_like(p) for p in params]
            self._init_state(params)
        self.t += 1
        step_lr = self.lr if lr is None else float(lr)
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            self._update_one(i, p, g, step_lr, self._tmp[i], lr_folded)

    def _init_state(self, params: list[np.ndarray]) -> None:
        pass

    def _update_one(
        self, i: int, p: np.ndarray, g: np.ndarray, lr: float, tmp: np.ndarray, folded: bool
    ) -> None:
        raise NotImplementedError

    # ----------------------------------------------------------------- state export
    @property
    def kind(self) -> str:
        """Name of the update rule, recorded in :meth:`state_arrays` (``"adam"``, ...)."""
        return type(self).__name__.lower()

    def _settings(self) -> dict[str, float]:
        """Hyperparameters an exported state is only valid with (besides ``kind``)."""
        return {}

    def _buffer_attributes(self) -> dict[str, str]:
        """Per-parameter state: exported name -> attribute holding one array per parameter."""
        return {}

    def _check_buffers(self, buffers: dict[str, list[np.ndarray]]) -> None:
        """Raise MLPError for buffer values out of range (attribute -> arrays being loaded)."""

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The optimizer's state as named plain arrays (copies), for :meth:`load_state_arrays`.

        Returns
        -------
        dict of str to ndarray
            ``kind`` (the update rule's name as ASCII codes, uint8), ``t`` (updates so far,
            0-d int64), each hyperparameter of :meth:`_settings` (0-d float64: ``momentum``
            for SGD; ``beta1``, ``beta2``, ``eps`` for Adam) and, once an update was made,
            one array per parameter and buffer: ``velocity<i>`` (SGD with momentum),
            ``m<i>`` and ``v<i>`` (Adam), shaped and typed like parameter ``i``. No object
            arrays: ``np.savez`` and ``np.load(allow_pickle=False)`` round-trip them.
        """
        arrays = {"kind": _encode_kind(self.kind), "t": np.array(self.t, dtype=np.int64)}
        for name, value in self._settings().items():
            arrays[name] = np.array(value, dtype=np.float64)
        if self.t:
            for name, attribute in self._buffer_attributes().items():
                for i, buffer in enumerate(getattr(self, attribute)):
                    arrays[f"{name}{i}"] = buffer.copy()
        return arrays

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray], params: list[np.ndarray]) -> None:
        """Replace the optimizer's state by one exported with :meth:`state_arrays`.

        The next :meth:`update` then does exactly what the exporting optimizer's next
        update would have done (given the same parameters and gradients).

        Parameters
        ----------
        arrays : mapping of str to ndarray
            As returned by :meth:`state_arrays`; copied.
        params : list of ndarray
            The parameters the optimizer will update (``MLP.params``): every buffer must
            have the shape and dtype of its parameter.

        Raises
        ------
        MLPError
            Another kind of optimizer or other hyperparameters, missing, unexpected,
            misshapen, mistyped or non-finite arrays (one line naming the problem). The
            optimizer is left unchanged.
        """
        arrays = check_state_arrays(arrays)
        kind = _decode_kind(arrays["kind"])
        if kind != self.kind:
            raise MLPError(f"optimizer state is of kind {kind!r}, this optimizer is {self.kind!r}")
        for name, value in self._settings().items():
            if name not in arrays:
                raise MLPError(f"optimizer state has no {name!r} (a {kind!r} setting)")
            if arrays[name].shape != ():
                raise MLPError(f"optimizer state: {name!r} must be 0-d, got {arrays[name].shape}")
            # Other settings would make other updates: the continued training would not be
            # the one that was stopped.
            if float(arrays[name]) != value:
                raise MLPError(
                    f"optimizer state was made with {name}={float(arrays[name])!r}, this "
                    f"optimizer has {name}={value!r}"
                )
        t = int(arrays["t"])
        # No update yet means no buffers yet: they are created by the first update.
        names = self._buffer_attributes() if t else {}
        _check_buffer_counts(arrays, names, len(params))
        expected = {"kind", "t", *self._settings()}
        expected |= {f"{name}{i}" for name in names for i in range(len(params))}
        unexpected = sorted(set(arrays) - expected)
        if unexpected:
            raise MLPError(f"optimizer state has unexpected arrays {unexpected} for {kind!r}")
        buffers = {}
        for name, attribute in names.items():
            buffers[attribute] = [
                _checked_buffer(f"{name}{i}", arrays[f"{name}{i}"], i, p)
                for i, p in enumerate(params)
            ]
        self._check_buffers(buffers)
        # Everything checked: replace the state (nothing changed on an error above).
        self.t = t
        self._tmp = [np.empty_like(p) for p in params] if t else None
        for attribute in self._buffer_attributes().values():
            setattr(self, attribute, buffers.get(attribute, []))


class SGD(Optimizer):
    """(Stochastic) gradient descent, optionally with (Nesterov) momentum.

    Plain: ``p <- p - lr * g``.
    Momentum: ``v <- mu * v - lr * g``; ``p <- p + v``.
    Nesterov (the form used by scikit-learn): ``v <- mu * v - lr * g``;
    ``p <- p + mu * v - lr * g``.

    Parameters
    ----------
    lr : float
    momentum : float in [0, 1)
    nesterov : bool
    """

    folds_lr = True

    def __init__(self, lr: float = 0.1, momentum: float = 0.0, nesterov: bool = False) -> None:
        super().__init__(lr)
        if not 0.0 <= momentum < 1.0:
            raise MLPError(f"momentum must be in [0, 1), got {momentum}")
        if nesterov and momentum == 0.0:
            raise MLPError("nesterov=True needs momentum > 0")
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.velocities: list[np.ndarray] = []

    @property
    def kind(self) -> str:
        if self.full_batch:
            return "gd"
        if self.nesterov:
            return "nesterov"
        return "momentum" if self.momentum else "sgd"

    def _settings(self):
        return {"momentum": self.momentum}

    def _buffer_attributes(self):
        return {"velocity": "velocities"} if self.momentum else {}

    def _init_state(self, params):
        if self.momentum:
            self.velocities = [np.zeros_like(p) for p in params]

    def _update_one(self, i, p, g, lr, tmp, folded):
        step = g if folded else np.multiply(g, lr, out=tmp)  # folded: g is already lr * g
        if not self.momentum:
            p -= step
            return
        v = self.velocities[i]
        v *= self.momentum
        v -= step
        if self.nesterov:
            p -= step  # before tmp (which may hold step) is reused
            np.multiply(v, self.momentum, out=tmp)
            p += tmp
        else:
            p += v


class GD(SGD):
    """Full-batch gradient descent: :class:`SGD` whose every step sees the whole training set."""

    full_batch = True


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015) with bias correction.

    ``m <- b1 m + (1 - b1) g``; ``v <- b2 v + (1 - b2) g**2``;
    ``p <- p - lr * m_hat / (sqrt(v_hat) + eps)`` with ``m_hat = m / (1 - b1**t)``,
    ``v_hat = v / (1 - b2**t)``.

    Parameters
    ----------
    lr : float
    beta1, beta2 : float in [0, 1)
    eps : float > 0
    """

    def __init__(
        self, lr: float = 0.001, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8
    ) -> None:
        super().__init__(lr)
        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= beta < 1.0:
                raise MLPError(f"{name} must be in [0, 1), got {beta}")
        if not eps > 0:
            raise MLPError(f"eps must be > 0, got {eps}")
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self.m: list[np.ndarray] = []
        self.v: list[np.ndarray] = []

    @property
    def kind(self) -> str:
        return "adam"

    def _settings(self):
        return {"beta1": self.beta1, "beta2": self.beta2, "eps": self.eps}

    def _buffer_attributes(self):
        return {"m": "m", "v": "v"}

    def _check_buffers(self, buffers):
        # A running mean of squares is never negative; a negative one would turn sqrt(v) NaN.
        for i, v in enumerate(buffers.get("v", [])):
            if (v < 0).any():
                raise MLPError(f"optimizer state: 'v{i}' has negative entries")

    def _init_state(self, params):
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]

    def _update_one(self, i, p, g, lr, tmp, folded):
        m, v = self.m[i], self.v[i]
        m *= self.beta1
        np.multiply(g, 1.0 - self.beta1, out=tmp)
        m += tmp
        v *= self.beta2
        np.multiply(g, g, out=tmp)
        tmp *= 1.0 - self.beta2
        v += tmp
        # Fold both bias corrections into the step size and eps (same result, fewer passes):
        # lr * m_hat / (sqrt(v_hat) + eps) = lr_t * m / (sqrt(v) + eps * sqrt(1 - b2**t)).
        c2 = np.sqrt(1.0 - self.beta2**self.t)
        lr_t = lr * c2 / (1.0 - self.beta1**self.t)
        np.sqrt(v, out=tmp)
        tmp += self.eps * c2
        np.divide(m, tmp, out=tmp)
        tmp *= lr_t
        p -= tmp


def make_optimizer(name: str, lr: float = 0.1, **kwargs) -> Optimizer:
    """Build an optimizer by name.

    Parameters
    ----------
    name : {"gd", "sgd", "momentum", "nesterov", "adam"}
        ``gd`` is full-batch gradient descent; ``momentum``/``nesterov`` accept
        ``momentum=`` (default 0.9); ``adam`` accepts ``beta1``, ``beta2``, ``eps``.
    lr : float
        Default learning rate of the optimizer.
    """
    try:
        if name == "gd":
            return GD(lr, **kwargs)
        if name == "sgd":
            return SGD(lr, **kwargs)
        if name in ("momentum", "nesterov"):
            return SGD(
                lr, momentum=kwargs.pop("momentum", 0.9), nesterov=name == "nesterov", **kwargs
            )
        if name == "adam":
            return Adam(lr, **kwargs)
    except TypeError as exc:
        raise MLPError(f"bad options for optimizer {name!r}: {exc}") from None
    raise MLPError(f"unknown optimizer {name!r}; choose one of {list(OPTIMIZER_NAMES)}")


def _check_lr(lr: float) -> None:
    if not (isinstance(lr, int | float | np.floating) and np.isfinite(lr) and lr > 0):
        raise MLPError(f"learning rate must be a finite number > 0, got {lr!r}")


# ============================================================================ state arrays


def check_state_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Checks of an optimizer state that need neither the optimizer nor the network.

    Parameters
    ----------
    arrays : mapping of str to ndarray
        As returned by :meth:`Optimizer.state_arrays`.

    Returns
    -------
    dict of str to ndarray
        The same arrays (a new dict): ``kind`` a 1-d uint8 array of ASCII letters, ``t`` a
        0-d integer >= 0, every other array (settings, per-parameter buffers) finite
        float32 or float64 numbers.

    Raises
    ------
    MLPError
        The first problem found, in one line.
    """
    if not isinstance(arrays, Mapping):
        raise MLPError(f"optimizer state must be a mapping of arrays, got {type(arrays).__name__}")
    checked = {}
    for name, a in arrays.items():
        if not isinstance(name, str) or not isinstance(a, np.ndarray):
            raise MLPError(f"optimizer state: {name!r} is not a named ndarray")
        if name in ("kind", "t"):
            if a.dtype.kind not in "iu":
                raise MLPError(f"optimizer state: {name!r} has dtype {a.dtype}, not integers")
        elif a.dtype.name not in ("float32", "float64"):
            raise MLPError(f"optimizer state: {name!r} has dtype {a.dtype}, not float32/64")
        elif not np.isfinite(a).all():
            raise MLPError(f"optimizer state: {name!r} contains NaN or infinite values")
        checked[name] = a
    for name in ("kind", "t"):
        if name not in checked:
            raise MLPError(f"optimizer state has no {name!r} array")
    _decode_kind(checked["kind"])
    t = checked["t"]
    if t.shape != () or t.dtype.kind not in "iu" or int(t) < 0:
        raise MLPError(f"optimizer state: 't' must be a 0-d integer >= 0, got {t!r}")
    return checked


def _encode_kind(kind: str) -> np.ndarray:
    # The name as ASCII codes: a plain numeric array, so states load with allow_pickle=False.
    return np.frombuffer(kind.encode("ascii"), dtype=np.uint8).copy()


def _decode_kind(codes: np.ndarray) -> str:
    if (
        codes.ndim != 1
        or codes.dtype != np.uint8
        or not 0 < codes.size <= 64
        or not ((codes >= 0x21) & (codes <= 0x7E)).all()
    ):
        raise MLPError("optimizer state: 'kind' is not a short name in uint8 ASCII codes")
    return codes.tobytes().decode("ascii")


def _check_buffer_counts(arrays: dict[str, np.ndarray], names, n_params: int) -> None:
    """One array per parameter for each buffer ``names`` expects, numbered 0 .. n_params - 1."""
    for name in names:
        found = sorted(
            int(m[2]) for k in arrays if (m := _BUFFER_NAME.fullmatch(k)) and m[1] == name
        )
        if found != list(range(n_params)):
            raise MLPError(
                f"optimizer state has {len(found)} {name!r} arrays {found}; the network has "
                f"{n_params} parameters (expected {name}0 .. {name}{n_params - 1})"
            )


def _checked_buffer(name: str, a: np.ndarray, i: int, param: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of buffer ``a`` after checking it matches parameter ``i``."""
    if a.shape != param.shape:
        raise MLPError(
            f"optimizer state: {name!r} has shape {a.shape}, the network's parameter {i} "
            f"has shape {param.shape}"
        )
    if a.dtype != param.dtype:
        raise MLPError(
            f"optimizer state: {name!r} has dtype {a.dtype}, the network's parameters are "
            f"{param.dtype}"
        )
    return np.array(a, dtype=param.dtype, order="C")
