"""Per-epoch learning-rate schedules: ``make_schedule(...)`` returns ``lr(epoch)``, epoch 1-based.

* ``constant``: ``base_lr``.
* ``step``: ``base_lr * gamma ** ((epoch - 1) // step_size)``.
* ``cosine``: ``min_lr + (base_lr - min_lr) * (1 + cos(pi * (epoch - 1) / epochs)) / 2``,
  from ``base_lr`` at epoch 1 down towards ``min_lr`` (never reaching it, so no epoch is
  wasted at lr = 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from mlp.errors import MLPError

SCHEDULE_NAMES = ("constant", "step", "cosine")

Schedule = Callable[[int], float]


def make_schedule(name: str, base_lr: float, epochs: int, **kwargs) -> Schedule:
    """Build a schedule by name.

    Parameters
    ----------
    name : {"constant", "step", "cosine"}
    base_lr : float
        Learning rate at epoch 1.
    epochs : int
        Total number of epochs (used by ``cosine`` and the default ``step_size``).
    **kwargs
        ``step``: ``step_size`` (default ``max(1, epochs // 3)``), ``gamma`` (default 0.1).
        ``cosine``: ``min_lr`` (default 0.0).

    Returns
    -------
    callable
        ``lr(epoch: int) -> float``.
    """
    if not (isinstance(base_lr, int | float) and math.isfinite(base_lr) and base_lr > 0):
        raise MLPError(f"learning rate must be a finite number > 0, got {base_lr!r}")
    if not (isinstance(epochs, int) and epochs >= 1):
        raise MLPError(f"epochs must be an integer >= 1, got {epochs!r}")
    allowed = {"constant": set(), "step": {"step_size", "gamma"}, "cosine": {"min_lr"}}
    if name not in allowed:
        raise MLPError(f"unknown schedule {name!r}; choose one of {list(SCHEDULE_NAMES)}")
    unknown = set(kwargs) - allowed[name]
    if unknown:
        raise MLPError(f"schedule {name!r} does not accept {sorted(unknown)}")
    base_lr = float(base_lr)

    if name == "constant":
        return lambda epoch: base_lr
    if name == "step":
        return _step_schedule(base_lr, epochs, **kwargs)
    return _cosine_schedule(base_lr, epochs, **kwargs)


def _step_schedule(base_lr: float, epochs: int, **kwargs) -> Schedule:
    step_size = kwargs.get("step_size", max(1, epochs // 3))
    gamma = float(kwargs.get("gamma", 0.1))
    if not (isinstance(step_size, int) and step_size >= 1):
        raise MLPError(f"step_size must be an integer >= 1, got {step_size!r}")
    if not 0 < gamma <= 1:
        raise MLPError(f"gamma must be in (0, 1], got {gamma}")
    return lambda epoch: base_lr * gamma ** ((epoch - 1) // step_size)


def _cosine_schedule(base_lr: float, epochs: int, **kwargs) -> Schedule:
    min_lr = float(kwargs.get("min_lr", 0.0))
    if not 0 <= min_lr <= base_lr:
        raise MLPError(f"min_lr must be in [0, base_lr={base_lr}], got {min_lr}")
    return lambda epoch: (
        min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / epochs))
    )
