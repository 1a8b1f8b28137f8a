"""Fixtures of the flow tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import PipelineConfig, build_config


@pytest.fixture(scope="session")
def small_config():
    """A factory of tiny real-MNIST configs: about a second per training.

    ``make(data_dir, tmp_path, tracking_uri, **overrides)``: 3,000 training and 500 test
    images, 784-32-10, 2 epochs (final 3), lambdas 1e-4 and 1e-2, 2 folds, 2 threads, fold
    cache in ``tmp_path / "cache"``.
    """

    def make(data_dir: Path, tmp_path: Path, tracking_uri: str, **extra: Any) -> PipelineConfig:
        overrides = {
            "data.dataset": "mnist",
            "data.data_dir": str(data_dir),
            "data.download": False,
            "data.limit_train": 3000,
            "data.limit_test": 500,
            "model.hidden_sizes": [32],
            "training.epochs": 2,
            "training.final_epochs": 3,
            "cv.l2_lambdas": [1e-4, 1e-2],
            "cv.folds": 2,
            "execution.runner": "thread",
            "execution.workers": 2,
            "execution.cache_dir": str(tmp_path / "cache"),
            "tracking.tracking_uri": tracking_uri,
            "tracking.experiment": "test-pipeline",
            **extra,
        }
        return build_config(overrides=overrides)

    return make


# ------------------------------------------------------------------------------ subprocesses


def _descendants(pid: int, children: Callable[[int], list[tuple[int, str]]]) -> list[int]:
    """Every live descendant of ``pid``, parents before their children."""
    found: list[int] = []
    parents = [pid]
    while parents:
        for child, _ in children(parents.pop(0)):
            found.append(child)
            parents.append(child)
    return found


def _kill_tree(process: subprocess.Popen, leads_group: bool, children) -> None:
    """SIGKILL ``process``, its descendants and its process group; reap it and close its pipes.

    The process is stopped first, so it neither starts new children nor reaps dead ones (their
    pids cannot be reused) while its tree is read. Descendants may sit in other sessions (the
    temporary Prefect server has its own): they are found through ``/proc``, not the group.
    """
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGSTOP)
        for pid in _descendants(process.pid, children):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    if leads_group:  # members whose parent already died: pool workers, the resource tracker
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    process.wait(timeout=30)
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            stream.close()


@pytest.fixture()
def reaped(child_processes) -> Iterator[Callable[[subprocess.Popen], subprocess.Popen]]:
    """``reaped(process) -> process``: killed with its whole tree when the test ends, however.

    For every subprocess a test starts: a failed assertion or a ``communicate(timeout=)`` that
    expired (it does not kill) leaves no pipeline, pool worker or temporary Prefect server
    running on the shared cores. A process started with ``start_new_session=True`` also has its
    process group killed, which reaches the members left behind by a parent that already died.
    """
    started: list[tuple[subprocess.Popen, bool]] = []

    def register(process: subprocess.Popen) -> subprocess.Popen:
        try:
            leads_group = os.getpgid(process.pid) == process.pid
        except ProcessLookupError:  # already gone and reaped: its group may still have members
            leads_group = False
        started.append((process, leads_group))
        return process

    yield register
    for process, leads_group in reversed(started):
        _kill_tree(process, leads_group, child_processes)


def _cpu_seconds(pid: int, thread: int | None = None) -> float:
    path = Path(f"/proc/{pid}") / (f"task/{thread}/stat" if thread is not None else "stat")
    fields = path.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


@pytest.fixture()
def cpu_seconds() -> Callable[..., float]:
    """``cpu_seconds(pid, thread=None)``: CPU time (user + system) used so far by a process
    (all its threads) or by one of its threads, from ``/proc``; OSError once it is gone.

    Work done, unlike the clock, does not stretch on busy cores: wait on it, not on sleeps.
    """
    return _cpu_seconds


# ------------------------------------------------------------------------------ endpoints


@dataclass
class Endpoint:
    """A loopback TCP port held by the test, with no server behind it (see ``dead_endpoint``)."""

    port: int
    connections: int = 0
    _socket: socket.socket | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture()
def dead_endpoint() -> Iterator[Callable[[str], Endpoint]]:
    """``dead_endpoint(kind)``: a port held for the whole test, so nothing else can take it.

    ``"closed"``: bound, never listening; a connection is refused at once.
    ``"hangs up"``: accepts every connection, reads the request and closes the connection
    without a byte of answer, counting them in ``connections``: how many attempts a client made.
    """
    endpoints: list[Endpoint] = []
    threads: list[threading.Thread] = []
    stop = threading.Event()

    def make(kind: str) -> Endpoint:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        endpoint = Endpoint(port=sock.getsockname()[1], _socket=sock)
        endpoints.append(endpoint)
        if kind == "hangs up":
            sock.listen(16)
            sock.settimeout(0.2)

            def hang_up() -> None:
                while not stop.is_set():
                    try:
                        connection, _ = sock.accept()
                    except TimeoutError:
                        continue
                    except OSError:  # closed at teardown
                        return
                    endpoint.connections += 1
                    with connection:
                        # Read the request first: closing with unread bytes sends a reset, and
                        # the client's error would depend on timing.
                        connection.settimeout(10)
                        request = b""
                        with contextlib.suppress(OSError):
                            while b"\r\n\r\n" not in request and (chunk := connection.recv(4096)):
                                request += chunk

            thread = threading.Thread(target=hang_up, name=f"hang-up-{endpoint.port}")
            thread.start()
            threads.append(thread)
        elif kind != "closed":
            raise ValueError(f"unknown endpoint kind {kind!r}")
        return endpoint

    yield make
    stop.set()
    for thread in threads:
        thread.join(timeout=10)
    for endpoint in endpoints:
        endpoint._socket.close()


# ------------------------------------------------------------------------------ commands


@pytest.fixture()
def start_command(reaped) -> Callable[..., subprocess.Popen]:
    """``start_command(args, cwd, env) -> Popen``: ``python -m flows.cli ARGS`` as a terminal job.

    In its own session and process group (a Ctrl-C is ``os.killpg(process.pid, SIGINT)``), text
    pipes for stdout and stderr, killed with its whole tree when the test ends (``reaped``).
    """
    import sys

    def start(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
        return reaped(
            subprocess.Popen(
                [sys.executable, "-m", "flows.cli", *args],
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        )

    return start


# ------------------------------------------------------------------------------ MLflow server


@dataclass
class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 (see ``mlflow_servers``)."""

    process: subprocess.Popen
    url: str
    port: int
    log: Path

    def kill(self) -> None:
        """SIGKILL the server and its uvicorn worker (its own process group), and reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM its process group, SIGKILL if it lingers; reaped either way."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=15)
        self.kill()  # the worker too, should the server have died without it


@pytest.fixture(scope="session")
def mlflow_servers() -> Iterator[Callable[..., MlflowServer]]:
    """``start(backend_uri, root, port=None, serve_artifacts=True) -> MlflowServer``, healthy.

    A real ``mlflow server`` on 127.0.0.1 (a free port, or ``port``: a restart), one uvicorn
    worker, no job runner, its log in ``root / "server.log"``. With ``serve_artifacts`` the
    artifacts are proxied (``--serve-artifacts``, stored under ``root / "artifacts"``): the
    client never touches the server's disk, as with a remote server. Pass a copy of the
    session's migrated empty store (``tracking_uri``) as ``backend_uri``: a new database would
    spend seconds in migrations. Tests stop their servers themselves (``stop``/``kill``, by
    pid); whatever is still running at the end of the session is stopped then.
    """
    import sys
    import time
    import urllib.request

    started: list[MlflowServer] = []

    def start(
        backend_uri: str, root: Path, port: int | None = None, serve_artifacts: bool = True
    ) -> MlflowServer:
        if port is None:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
        root.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1", "--backend-store-uri", backend_uri,
        ]  # fmt: skip
        if serve_artifacts:
            command += ["--serve-artifacts", "--artifacts-destination", str(root / "artifacts")]
        else:
            command += ["--default-artifact-root", str(root / "artifacts")]
        env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner: faster, smaller
        log = root / "server.log"
        with log.open("ab") as handle:
            process = subprocess.Popen(
                command, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=handle,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        server = MlflowServer(process, f"http://127.0.0.1:{port}", port, log)
        started.append(server)
        deadline = time.monotonic() + 120  # a hang guard: seconds on idle cores
        while True:
            try:
                with urllib.request.urlopen(f"{server.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return server
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                server.kill()
                tail = log.read_text(errors="replace")[-2000:]
                pytest.fail(f"mlflow server did not become healthy at {server.url}:\n{tail}")
            time.sleep(0.2)

    yield start
    for server in started:
        server.stop()


# ------------------------------------------------------------------------------ sample flows


@pytest.fixture(scope="session")
def sample_flow_config() -> Callable[..., PipelineConfig]:
    """A factory of tiny configs on the bundled ``mnist-sample``: no data files, and a fraction
    of a second per training.

    ``make(cache_dir, tracking_uri, **overrides)``: 5,000 training and 1,000 test images,
    784-32-10, 2 epochs (final 2), lambdas 1e-4 and 1e-2, 2 folds, 2 threads, experiment
    ``test-flows``; ``execution.cache_dir`` is ``cache_dir``.
    """

    def make(cache_dir: Path, tracking_uri: str, **extra: Any) -> PipelineConfig:
        overrides = {
            "data.dataset": "mnist-sample",
            "model.hidden_sizes": [32],
            "training.epochs": 2,
            "training.final_epochs": 2,
            "cv.l2_lambdas": [1e-4, 1e-2],
            "cv.folds": 2,
            "execution.runner": "thread",
            "execution.workers": 2,
            "execution.cache_dir": str(cache_dir),
            "tracking.tracking_uri": tracking_uri,
            "tracking.experiment": "test-flows",
            **extra,
        }
        return build_config(overrides=overrides)

    return make


_SERVER_COMMANDS = ("prefect server start", "uvicorn", "prefect.server")


@pytest.fixture(scope="session")
def new_prefect_servers(child_processes):
    """``with new_prefect_servers(pid) as seen:``: the Prefect servers started meanwhile.

    A thread samples the descendants of ``pid`` every 0.1 s while the block runs; ``seen``
    gets the (pid, command line) of each ``prefect server start`` or uvicorn process (Prefect's
    own temporary server) that was not there when the block began. Servers live for seconds:
    sampling does not miss one.
    """

    def servers(root: int) -> dict[int, str]:
        commands = {pid: _command_line(pid) for pid in _descendants(root, child_processes)}
        return {
            pid: command
            for pid, command in commands.items()
            if any(name in command for name in _SERVER_COMMANDS)
        }

    @contextlib.contextmanager
    def watch(root: int) -> Iterator[dict[int, str]]:
        before = servers(root)
        seen: dict[int, str] = {}
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                now = servers(root)
                seen.update({pid: now[pid] for pid in now.keys() - before.keys()})
                done.wait(0.1)

        sampler = threading.Thread(target=sample, name="server-watch", daemon=True)
        sampler.start()
        try:
            yield seen
        finally:
            done.set()
            sampler.join(timeout=10)

    return watch


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.fixture()
def prefect_api_in_every_thread(prefect_api_url: str) -> Iterator[str]:
    """The session's Prefect API in Prefect's global settings too, for the test; yields its URL.

    The session fixture sets ``PREFECT_API_URL`` after Prefect was imported, so only code under
    its settings context sees it. Prefect's own threads (the process pool's message forwarder)
    read the global settings instead, and without an API they start temporary servers of their
    own. A command's process has the API there (``flows.server``); this gives tests the same.
    """
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()
    try:
        yield prefect_api_url
    finally:
        refresh_global_settings_context()


@pytest.fixture()
def one_error_line():
    """``one_error_line(err, out="") -> line``: stderr is one ``error:`` line, no traceback."""

    def check(err: str, out: str = "") -> str:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, f"expected one error line, got: {err!r}"
        assert lines[0].startswith("error: "), lines
        assert "Traceback" not in err + out, err
        return lines[0]

    return check
