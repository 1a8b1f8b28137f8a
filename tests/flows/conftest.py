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
