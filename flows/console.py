"""What Prefect prints on the console: no tracebacks for failures the CLI reports in one line."""

from __future__ import annotations

import logging
import os

from flows.tasks import TrainingStopped
from mlp import MLPError
from pipeline.errors import PipelineError


class KnownFailureFilter(logging.Filter):
    """Drop console records of failures the CLI reports itself, in one line.

    The records still reach the Prefect API (its UI shows them); ``MLP_PIPELINE_DEBUG=1``
    keeps them on the console too.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, PipelineError | MLPError | TrainingStopped):
            return False
        if isinstance(error, Exception) and "KeyboardInterrupt" in str(error):
            return False  # a Ctrl-C a library wrapped (pydantic's serializer): "interrupted"
        message = record.getMessage()
        return not (record.levelno >= logging.ERROR and message.startswith("Finished in state"))


def hide_known_failures_on_console() -> None:
    """Add :class:`KnownFailureFilter` to Prefect's console handlers (once; not in debug mode)."""
    if os.environ.get("MLP_PIPELINE_DEBUG", "") not in {"", "0"}:
        return
    from prefect.logging.handlers import PrefectConsoleHandler

    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, PrefectConsoleHandler) and not any(
                isinstance(f, KnownFailureFilter) for f in handler.filters
            ):
                handler.addFilter(KnownFailureFilter())
