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
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from pipeline.errors import ConfigError, PipelineError

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_IDLE_SERVICES = ("SCHEDULER", "LATE_RUNS", "FOREMAN", "REPOSSESSOR", "TRIGGERS",
                  "CANCELLATION_CLEANUP", "CLEANUP_RECONCILER", "PAUSE_EXPIRATIONS")  # fmt: skip
HEALTH_TIMEOUT_SECONDS = 5.0
START_SERVER_HINT = (
    "start one with `prefect server start --host 127.0.0.1` and "
    "export PREFECT_API_URL=http://127.0.0.1:4200/api"
)
# A first start migrates a new database: one launch at a time per PREFECT_HOME until the server
# answers (two servers migrating one SQLite file at once: one of them exits 3).
BOOT_LOCK = "mlp-pipeline-server.lock"
BOOT_LOCK_SECONDS = 120.0
CONFIGURED_API_HINT = (
    "start that server, or unset PREFECT_API_URL (environment or `prefect config unset`) and "
    "a temporary server is started for the command"
)
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b.*")


class PrefectServerError(PipelineError):
    """The temporary Prefect server did not start, or stopped during the run (exit code 1)."""

    exit_code = 1


class ServerProcess(subprocess.Popen):
    """A launched ``prefect server start``: the process, and its stderr in a temporary file
    (``log``; a pipe nobody reads would fill and block the server)."""

    log: IO[bytes]


def check_api(
    url: str, timeout: float = HEALTH_TIMEOUT_SECONDS, hint: str = START_SERVER_HINT
) -> None:
    """Fail fast (one line, exit code 2) when no Prefect server answers at ``url``.

    One ``/health`` request, ``timeout`` seconds at most: Prefect's own client retries a
    refused connection for a while, and waits a minute per request on a server that accepts
    connections and never answers. The line names ``url`` without its credentials.
    """
    import httpx

    from pipeline.config import redact_uri

    try:
        response = httpx.get(f"{url}/health", timeout=timeout)
    except httpx.TimeoutException:
        reason = f"no answer within {timeout:g} s"
    except httpx.HTTPError as exc:  # its text never holds the URL
        reason = " ".join(str(exc).split()) or type(exc).__name__
    else:
        if response.is_success:
            return
        reason = f"HTTP {response.status_code} on /health"
    raise ConfigError(f"no Prefect server answers at {redact_uri(url)} ({reason}); {hint}")


def prefect_home() -> Path:
    """Prefect's home folder (``PREFECT_HOME``, default ``~/.prefect``), created if missing;
    a one-line :class:`ConfigError` (exit code 2) when it is not writable."""
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    try:
        home.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=home):
            pass
    except OSError as exc:
        raise ConfigError(
            f"PREFECT_HOME {home} is not writable: {exc.strerror or exc}; point PREFECT_HOME at "
            "a writable folder, or set PREFECT_API_URL to a running server"
        ) from None
    return home


def _wait_for_health(server: subprocess.Popen[bytes], url: str, timeout: float) -> bool:
    """True once ``url`` answers ``/health``; False if the server exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2):
            return True  # any answer but an error status: it serves
        time.sleep(0.1)
    return False


def exit_status(server: subprocess.Popen[bytes], limit: int = 200) -> str:
    """An exited server's code and, when its stderr log has one, the last exception line
    (else the last line) it wrote there: ``3: sqlite3.OperationalError: ...``, or ``3``."""
    log = getattr(server, "log", None)  # a plain Popen has none
    if log is None:
        return str(server.returncode)
    with contextlib.suppress(OSError, ValueError):  # closed, or unreadable
        log.seek(0, os.SEEK_END)
        log.seek(max(0, log.tell() - 20_000))
        lines = [line.strip() for line in log.read().decode(errors="replace").splitlines()]
        lines = [line for line in lines if line]
        if cause := ([line for line in lines if _EXCEPTION_LINE.match(line)] or lines or [""])[-1]:
            cause = cause if len(cause) <= limit else cause[: limit - 3] + "..."
            return f"{server.returncode}: {cause}"
    return str(server.returncode)


def _die_with_parent() -> None:
    """In the server's process, before it runs: a SIGTERM when the command's process dies."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


def launch() -> tuple[ServerProcess, str]:
    """Start ``prefect server start`` on a free loopback port; returns it and its API URL.

    ``PREFECT_HOME`` must be writable (else a one-line :class:`ConfigError`). Launches in one
    home take turns until each server answers (a file lock there), so that two first runs do
    not migrate one new database at once.
    """
    from filelock import FileLock, Timeout

    home = prefect_home()
    lock = FileLock(home / BOOT_LOCK, thread_local=False)  # released when not held: a no-op
    try:
        with contextlib.suppress(Timeout):  # a launch stuck elsewhere: start anyway
            lock.acquire(timeout=BOOT_LOCK_SECONDS)
        server, url = _start(home)
    except BaseException:
        lock.release()
        raise

    def release_when_served() -> None:  # in a thread: once it answers, exits or times out
        try:
            _wait_for_health(server, url, BOOT_LOCK_SECONDS)
        finally:
            lock.release()

    threading.Thread(target=release_when_served, name="prefect-boot-lock", daemon=True).start()
    return server, url


def _start(home: Path) -> tuple[ServerProcess, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
               "--port", str(port), "--no-ui", "--analytics-off"]  # fmt: skip
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    # Of its background services only those that record what runs: task runs and events.
    env.update({f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false" for name in _IDLE_SERVICES})
    log = tempfile.TemporaryFile(dir=home, prefix="mlp-pipeline-server-")  # noqa: SIM115
    try:
        server = ServerProcess(  # noqa: S603 -- this interpreter, fixed arguments
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
        )
    except BaseException:
        log.close()
        raise
    server.log = log
    return server, f"http://127.0.0.1:{port}/api"


def wait_ready(server: subprocess.Popen[bytes], url: str, timeout: float = 90.0) -> None:
    """Block until the server answers ``/health``; a one-line error if it exits or stays mute."""
    if _wait_for_health(server, url, timeout):
        return
    why = "did not answer in time" if server.poll() is None else f"exited ({exit_status(server)})"
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
    log = getattr(server, "log", None)
    if log is not None:
        log.close()


@contextmanager
def prefect_api(prepare: Callable[[], None]) -> Iterator[str | None]:
    """Run ``prepare()``, then the block, with one Prefect API for every process of the run.

    The API ``PREFECT_API_URL`` or a Prefect settings file (a profile, ``prefect.toml``,
    ``.env``) names, once its ``/health`` answers (a one-line :class:`ConfigError` within
    seconds otherwise); else a temporary server, launched first so that it boots while
    ``prepare()`` runs, and stopped at the end. Yields the temporary server's URL, or None.
    """
    if configured := os.environ.get("PREFECT_API_URL"):
        check_api(configured.rstrip("/"), hint=CONFIGURED_API_HINT)
        prepare()
        yield None
        return
    try:
        server, url = launch()
    except ConfigError:  # PREFECT_HOME not writable: no matter if a settings file names an API
        from prefect.settings import get_current_settings

        if not get_current_settings().api.url:
            raise
        server = None
    try:
        from prefect.settings import get_current_settings

        if configured := get_current_settings().api.url:
            if server is not None:
                stop(server)
            check_api(configured.rstrip("/"), hint=CONFIGURED_API_HINT)
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
                    f"{exit_status(server)}); finished folds are cached: run the command again "
                    "to resume, or set PREFECT_API_URL to a running server"
                ) from None
            raise
        finally:
            # Queued logs and events sent while the server answers: Prefect would send them at
            # exit, to a server that is gone by then.
            if server.poll() is None:
                from prefect.events.worker import EventsWorker
                from prefect.logging.handlers import APILogWorker

                APILogWorker.drain_all(timeout=10)
                EventsWorker.drain_all(timeout=10)
    finally:
        if server is not None:
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
