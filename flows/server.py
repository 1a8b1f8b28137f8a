"""One Prefect API for the flow and all its workers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

# Offline machines: without this every run logs a telemetry error.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@contextmanager
def prefect_api(startup_timeout: int = 60) -> Iterator[str | None]:
    """Make sure one Prefect API serves this process and every worker it spawns.

    With ``PREFECT_API_URL`` set (a real ``prefect server start``), that server is used. Without
    it, a temporary local server is started here and its URL exported, so process and Dask
    workers inherit it instead of each starting their own (about 20 s each). Yields the URL of
    a temporary server, or None when an existing API is used.
    """
    if os.environ.get("PREFECT_API_URL"):
        yield None
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(timeout=startup_timeout)
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        yield server.api_url
    finally:
        _drain_prefect_clients()
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def _drain_prefect_clients() -> None:
    """Send buffered logs and events while the temporary server still answers.

    Otherwise they are flushed at interpreter exit, to a server that is gone, and the process
    hangs for a minute retrying.
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)
