"""Optimizers that own their state and update parameters in place.

An optimizer sees flat, aligned lists ``params`` and ``grads`` (``[W0, b0, W1, b1, ...]``
for an :class:`~mlp.network.MLP`) and applies one step with ``update(params, grads, lr)``.
Its state (velocities, Adam moments, step count) is created on the first update, one
buffer per parameter, so an optimizer object belongs to one network.

Batching is the training loop's business: full-batch gradient descent is :class:`SGD`
fed the whole training set (``fit(..., optimizer="gd")`` does that).

The gradients already contain the L2 term (``l2 * W``), so Adam here is Adam with a
coupled L2 penalty, not AdamW.
"""

from __future__ import annotations

import numpy as np

from mlp.errors import MLPError

OPTIMIZER_NAMES = ("gd", "sgd", "momentum", "nesterov", "adam")


class Optimizer:
    """Base class: ``update(params, grads, lr)`` changes every ``params[i]`` in place.

    Parameters
    ----------
    lr : float
        Learning rate used when ``update`` is called without one.
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
