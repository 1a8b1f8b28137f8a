"""One Prefect API for the flow and all its workers."""

from __future__ import annotations

import importlib.util
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import PipelineError

# Offline machines: without this every run logs a telemetry error.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# uvicorn's exit code when it cannot bind its port (Prefect's own launcher relies on it too).
_PORT_IN_USE = 3


class PrefectServerLost(PipelineError):
    """The temporary Prefect server stopped while a run was using it (exit code 1)."""

    exit_code = 1


class TemporaryServer:
    """Prefect's temporary local API server, launched without blocking this process.

    The same server a flow starts when no API is configured (Prefect's ``SubprocessASGIServer``:
    ``uvicorn prefect.server.api.server:create_app`` in ephemeral mode, no UI, on 127.0.0.1),
    but :meth:`launch` returns at once and nothing of the server package is imported here:
    that import alone takes 1.5 s of this process's CPU, and the boot (4-7 s on 2 cores)
    overlaps with the run's own preparation instead of preceding it.
    """

    def __init__(self) -> None:
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def launch(self) -> None:
        """Start the server process on a free loopback port; do not wait for it."""
        self.port = free_port()
        env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            # Registering block types at start loads every installed Prefect collection first
            # (prefect-dask imports distributed): 0.5 s of the boot, for a server without UI
            # whose runs save no blocks. Block types live in the database, and the next
            # `prefect server start` on it registers them.
            "PREFECT_SERVER_REGISTER_BLOCKS_ON_START": "0",
            "PREFECT_SERVER_MEMOIZE_BLOCK_AUTO_REGISTRATION": "0",
        }
        env.pop("PREFECT_API_URL", None)
        # Its own session: a Ctrl-C in the terminal reaches this process only, which then ends
        # the flow run through the server and stops it; sharing the signal, the server died
        # first and the run lost its API mid-way. On Linux it also gets SIGTERM if this process
        # dies without stopping it (SIGKILL), instead of living on.
        self.process = subprocess.Popen(  # noqa: S603 -- our interpreter, fixed arguments
            [
                sys.executable,
                "-m",
                "uvicorn",
                # Import Prefect from where it is installed, never from the working directory.
                "--app-dir",
                _site_of("prefect"),
                "--factory",
                "prefect.server.api.server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_end_with_parent(),  # noqa: PLW1509 -- only with no other thread
        )

    @property
    def exit_code(self) -> int | None:
        """The server's exit code once it has stopped by itself; None while it runs."""
        return None if self.process is None else self.process.poll()

    def wait_ready(self, timeout: float) -> None:
        """Block until ``/api/health`` answers; relaunch once on a port taken meanwhile."""
        deadline = time.monotonic() + timeout
        relaunched = False
        while True:
            assert self.process is not None, "launch() first"
            code = self.process.poll()
            if code == _PORT_IN_USE and not relaunched:
                self.launch()
                relaunched = True
                continue
            if code is not None:
                raise PipelineError(
                    f"the temporary Prefect server exited during start-up (exit code {code}); "
                    "run `prefect server start` to see why, or set PREFECT_API_URL to a running "
                    "server"
                )
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise PipelineError(
                    f"the temporary Prefect server did not answer within {timeout:.0f} s; "
                    "set PREFECT_API_URL to a running server (`prefect server start`)"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        """Terminate the server and reap it (killed if it lingers past 5 s)."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


def _end_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when this process dies.

    None elsewhere, and while other threads run: Python code between fork and exec may then
    deadlock on a lock another thread held.
    """
    if not sys.platform.startswith("linux") or threading.active_count() > 1:
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    set_parent_death_signal = 1  # PR_SET_PDEATHSIG in <linux/prctl.h>

    def request() -> None:
        prctl(set_parent_death_signal, int(signal.SIGTERM))

    return request


def _site_of(package: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError(f"{package} is not installed")
    return str(Path(next(iter(spec.submodule_search_locations))).parent)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def prefect_api(
    startup_timeout: int = 60, *, while_starting: Callable[[], None] | None = None
) -> Iterator[str | None]:
    """Make sure one Prefect API serves this process and every worker it spawns.

    With ``PREFECT_API_URL`` set (a real ``prefect server start``), that server is used. Without
    it, a temporary local server is launched here and its URL exported, so process and Dask
    workers inherit it instead of each starting their own (about 20 s each). Yields the URL of
    a temporary server, or None when an existing API is used.

    ``while_starting`` runs while the temporary server boots (4-7 s here): slow preparation
    such as imports, creating the MLflow store or starting worker processes overlaps with it
    instead of adding to it. The URL is exported before it runs, so workers started meanwhile
    inherit it.
    """
    configured = configured_api_url()
    if configured:
        os.environ["PREFECT_API_URL"] = configured  # a profile's: for the workers too
        if while_starting is not None:
            while_starting()
        yield None
        return
    server = TemporaryServer()
    server.launch()
    _export_api_url(server.api_url)
    try:
        if while_starting is not None:
            while_starting()
        server.wait_ready(startup_timeout)
        if os.environ.get("PREFECT_API_URL") != server.api_url:  # relaunched on another port
            _export_api_url(server.api_url)
    except BaseException:
        _export_api_url(None)
        server.stop()
        raise
    try:
        yield server.api_url
    except Exception:
        code = server.exit_code
        if code is not None:
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            raise PrefectServerLost(
                f"the temporary Prefect server stopped during the run ({how}); finished folds "
                "are cached: run the command again to resume, or set PREFECT_API_URL to a "
                "running server"
            ) from None
        raise
    finally:
        _drain_prefect_clients(server_alive=server.exit_code is None)
        _export_api_url(None)
        server.stop()


def configured_api_url() -> str | None:
    """The Prefect API URL the user configured: ``PREFECT_API_URL``, or Prefect's settings.

    Prefect reads it from the environment, a ``.env`` or ``prefect.toml`` here, ``pyproject.toml``
    or the active profile (``prefect config set PREFECT_API_URL=...``). Its settings take about
    1 s to import, so they are asked only when one of those files could name an API.
    """
    url = os.environ.get("PREFECT_API_URL", "").strip()
    if url:
        return url
    if not _settings_files_may_name_an_api():
        return None
    from prefect.settings import get_current_settings

    return (get_current_settings().api.url or "").strip() or None


def _settings_files_may_name_an_api() -> bool:
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    profiles = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml")
    candidates = (
        (profiles.expanduser(), "PREFECT_API_URL"),
        (Path(".env"), "PREFECT_API_URL"),
        (Path("prefect.toml"), "url"),
        (Path("pyproject.toml"), "tool.prefect"),
    )
    for path, marker in candidates:
        try:
            if marker in path.read_text(encoding="utf-8", errors="replace"):
                return True
        except OSError:
            continue
    return False


def _export_api_url(url: str | None) -> None:
    """Set (or remove) ``PREFECT_API_URL`` for this process, its children and Prefect itself.

    Prefect reads its settings from the environment once, at import: without the refresh, a
    process that imported it before the server's URL was exported would start a second
    temporary server for its flow run.
    """
    if url is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = url
    _refresh_prefect_settings()


def _refresh_prefect_settings() -> None:
    """Make an already imported Prefect read its settings from the environment again."""
    if "prefect.context" not in sys.modules:
        return
    try:
        from prefect.context import refresh_global_settings_context
    except ImportError:  # a Prefect without it: nothing to refresh
        return
    refresh_global_settings_context()


def _drain_prefect_clients(server_alive: bool = True) -> None:
    """Send buffered logs and events while the temporary server still answers.

    Otherwise Prefect flushes them at interpreter exit, to a server that is gone, with no time
    limit: 7 s per event here, minutes for a run's worth. What is still queued after 10 s,
    or at all once the server has stopped, is dropped.
    """
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    if server_alive:
        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)
    _drop_undelivered_prefect_messages()


def _drop_undelivered_prefect_messages() -> None:
    """Empty the queues of Prefect's log and event workers, keeping their stop signal.

    Uses Prefect's private service registry; without it, nothing is dropped (as before).
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    try:
        from prefect._internal.concurrency.services import _active_services
    except ImportError:
        return
    for service in list(_active_services):
        if not isinstance(service, APILogWorker | EventsWorker):
            continue  # other services may hold work that is not for the server
        pending = getattr(service, "_queue", None)
        if not isinstance(pending, queue.Queue):
            continue
        stopping = False
        while True:
            try:
                item = pending.get_nowait()
            except queue.Empty:
                break
            pending.task_done()  # as the worker does for each item it takes
            stopping = stopping or item is None
        if stopping or getattr(service, "_stopped", False):
            pending.put_nowait(None)  # the worker's loop ends on it
