"""The project's own exception types: every problem a user can fix is one of these."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path


class PipelineError(Exception):
    """A problem the user can fix (bad input, config or data): the CLI prints it and exits 2."""


class DataError(PipelineError):
    """A dataset file is missing, unreadable, corrupt or does not match its checksum."""


class ConfigError(PipelineError):
    """A configuration value, file or option combination is invalid."""


class TrackingError(PipelineError):
    """The MLflow tracking store cannot be reached or used."""


class NotPublishedError(PipelineError):
    """The pipeline finished, but its record could not reach MLflow (exit code 3).

    ``record``: the run record's folder, which holds every result.
    """

    exit_code = 3

    def __init__(self, message: str, record: Path | None = None) -> None:
        super().__init__(message)
        self.record = record
