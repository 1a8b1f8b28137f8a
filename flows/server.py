"""A temporary Prefect server for one command, when no Prefect API is configured.

Prefect would start one itself, but only once the flow is called, and the flow would wait for
its boot. Here ``prefect server start`` (Prefect's own command: no UI, no scheduling services, on
127.0.0.1) boots in another process while the command prepares the run, and every
process of the run reports to it through ``PREFECT_API_URL``. It runs in its own session: a
terminal's Ctrl-C reaches the command, which ends its runs through the server, then stops it.
On Linux it also stops if the command is killed outright. What this saves: benchmarks/README.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pipeline.errors import PipelineError

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_IDLE_SERVICES = ("SCHEDULER", "LATE_RUNS", "FOREMAN", "REPOSSESSOR", "TRIGGERS",
                  "CANCELLATION_CLEANUP", "CLEANUP_RECONCILER", "PAUSE_EXPIRATIONS")  # fmt: skip


class PrefectServerError(PipelineError):
    """The temporary Prefect server did not start, or stopped during the run (exit code 1)."""

    exit_code = 1


def _die_with_parent() -> None:
    """In the server's process, before it runs: a SIGTERM when the command's process dies."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


def launch() -> tuple[subprocess.Popen[bytes], str]:
    """Start ``prefect server start`` on a free loopback port; returns it and its API URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
               "--port", str(port), "--no-ui", "--analytics-off"]  # fmt: skip
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    # Of its background services only those that record what runs: task runs and events.
    env.update({f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false" for name in _IDLE_SERVICES})
    server = subprocess.Popen(  # noqa: S603 -- this interpreter, fixed arguments
        command,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
    )
    return server, f"http://127.0.0.1:{port}/api"


def wait_ready(server: subprocess.Popen[bytes], url: str, timeout: float = 90.0) -> None:
    """Block until the server answers ``/health``; a one-line error if it exits or stays mute."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2):
            return  # any answer but an error status: it serves
        time.sleep(0.1)
    why = "did not answer in time" if server.poll() is None else f"exited ({server.returncode})"
    raise PrefectServerError(
        f"the temporary Prefect server {why}; run `prefect server start` to see why, or set "
        "PREFECT_API_URL to a running server"
    )


def stop(server: subprocess.Popen[bytes]) -> None:
    """Terminate the server and reap it (killed if it lingers)."""
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@contextmanager
def prefect_api(prepare: Callable[[], None]) -> Iterator[str | None]:
    """Run ``prepare()``, then the block, with one Prefect API for every process of the run.

    The API ``PREFECT_API_URL`` or a Prefect settings file (a profile, ``prefect.toml``,
    ``.env``) names; else a temporary server, launched first so that it boots while
    ``prepare()`` runs, and stopped at the end. Yields the temporary server's URL, or None.
    """
    if os.environ.get("PREFECT_API_URL"):
        prepare()
        yield None
        return
    server, url = launch()
    try:
        from prefect.settings import get_current_settings

        if get_current_settings().api.url:
            stop(server)
            prepare()
            yield None
            return
        prepare()
        wait_ready(server, url)
        try:
            # For every thread and process of the run, Prefect's own included. A local server
            # answers at once or is gone: one retry, not minutes of them.
            with prefect_settings(PREFECT_API_URL=url, PREFECT_CLIENT_MAX_RETRIES="1"):
                yield url
        except Exception:
            if server.poll() is not None:
                raise PrefectServerError(
                    f"the temporary Prefect server stopped during the run (exit code "
                    f"{server.returncode}); finished folds are cached: run the command again "
                    "to resume, or set PREFECT_API_URL to a running server"
                ) from None
            raise
        finally:
            _send_pending_logs(alive=server.poll() is None)
    finally:
        stop(server)


@contextmanager
def prefect_settings(**values: str) -> Iterator[None]:
    """Prefect settings for the block, seen by every thread and child process.

    ``temporary_settings`` alone reaches this thread's context only: Prefect's threads (the
    pool's message forwarder) read its global settings, which follow the environment.
    """
    import prefect.settings
    from prefect.context import refresh_global_settings_context

    os.environ.update(values)
    refresh_global_settings_context()
    updates = {getattr(prefect.settings, name): value for name, value in values.items()}
    try:
        with prefect.settings.temporary_settings(updates=updates):
            yield
    finally:
        for name in values:
            os.environ.pop(name, None)
        refresh_global_settings_context()


def _send_pending_logs(alive: bool) -> None:
    """Send Prefect's queued logs and events while the server answers (left queued, Prefect
    would send them at exit to a server that is gone)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    if alive:
        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)
