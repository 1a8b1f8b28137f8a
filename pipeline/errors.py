"""The project's own exception types: every problem a user can fix is one of these."""

from __future__ import annotations


class PipelineError(Exception):
    """A problem the user can fix (bad input, config or data): the CLI prints it and exits 2."""


class DataError(PipelineError):
    """A dataset file is missing, unreadable, corrupt or does not match its checksum."""


class ConfigError(PipelineError):
    """A configuration value, file or option combination is invalid."""


class TrackingError(PipelineError):
    """The MLflow tracking store cannot be reached or used."""
