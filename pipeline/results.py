"""Plain result records passed from workers back to the flow (small and picklable)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# History column: when each epoch ended (``time.time()`` seconds), for MLflow's wall-time axis.
WALL_TIME = "wall_time"


@dataclass(frozen=True)
class FoldResult:
    """The outcome of training one candidate on one fold of the cross-validation.

    ``history`` maps column names (``epoch``, ``train_loss``, ``train_accuracy``, ``val_loss``,
    ``val_accuracy``, ``lr``, ``seconds``, ``wall_time``...) to one value per epoch. A diverged
    training keeps its partial history; its summary metrics are NaN and it is left out of the
    selection.
    """

    l2_lambda: float
    fold: int
    seed: int
    val_accuracy: float
    val_loss: float
    train_accuracy: float
    train_loss: float
    epochs: int
    seconds: float
    history: dict[str, list[float]] = field(default_factory=dict)
    diverged: bool = False
    message: str = ""
    # The candidate's searched settings besides lambda ({"training.lr": 0.05}; none in a search
    # over lambda alone), and the epochs this training was given (its rung's, in halving).
    settings: dict[str, Any] = field(default_factory=dict)
    budget: int | None = None

    @property
    def candidate(self) -> dict[str, Any]:
        """Every searched value of this training, lambda first (see :mod:`pipeline.search`)."""
        return {"training.l2_lambda": self.l2_lambda, **self.settings}

    @property
    def ok(self) -> bool:
        return not self.diverged and math.isfinite(self.val_accuracy)


@dataclass(frozen=True)
class Evaluation:
    """Test-set metrics of a trained model."""

    accuracy: float
    loss: float
    n_samples: int
    confusion: list[list[int]]  # confusion[true][predicted]
