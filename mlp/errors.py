"""Exceptions raised by the mlp library.

Every exception raised for a user mistake derives from :class:`MLPError`, itself a
``ValueError``, so callers can catch one type at the edge.
"""

from __future__ import annotations


class MLPError(ValueError):
    """A user-facing problem: bad argument, bad shape, bad model file, divergence."""


class ModelFileError(MLPError):
    """A model file is missing, unreadable, tampered with, or of another architecture."""


class DivergenceError(MLPError):
    """Training produced a non-finite loss.

    Parameters
    ----------
    message : str
        One line naming the epoch and suggesting a smaller learning rate.
    epoch : int
        The 1-based epoch at whose end the non-finite loss was detected.
    """

    def __init__(self, message: str, epoch: int) -> None:
        super().__init__(message)
        self.epoch = epoch

    def __reduce__(self):
        # The default pickling replays ``cls(*self.args)`` and would lose ``epoch``;
        # keep it so the error survives a trip back from a worker process.
        return (type(self), (str(self), self.epoch))
