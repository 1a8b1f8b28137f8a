"""One Prefect API for the flow and all its workers."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# Offline machines: without this every run logs a telemetry error.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@contextmanager
def prefect_api(
    startup_timeout: int = 60, *, while_starting: Callable[[], None] | None = None
) -> Iterator[str | None]:
    """Make sure one Prefect API serves this process and every worker it spawns.

    With ``PREFECT_API_URL`` set (a real ``prefect server start``), that server is used. Without
    it, a temporary local server is started here and its URL exported, so process and Dask
    workers inherit it instead of each starting their own (about 20 s each). Yields the URL of
    a temporary server, or None when an existing API is used.

    ``while_starting`` runs while the temporary server boots (5-12 s here): slow preparation
    such as creating the MLflow store overlaps with it instead of adding to it.
    """
    if os.environ.get("PREFECT_API_URL"):
        if while_starting is not None:
            while_starting()
        yield None
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    failure: list[BaseException] = []

    def start() -> None:
        try:
            server.start(timeout=startup_timeout)
        except BaseException as exc:  # noqa: BLE001 -- re-raised in the calling thread
            failure.append(exc)

    booting = threading.Thread(target=start, name="prefect-server-start", daemon=True)
    booting.start()
    try:
        if while_starting is not None:
            while_starting()
    finally:
        booting.join()
        if failure or sys.exc_info()[0] is not None:
            server.stop()
    if failure:
        raise failure[0]
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
