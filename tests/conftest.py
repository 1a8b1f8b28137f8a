"""Shared fixtures: where the real datasets live, a Prefect API, a throwaway MLflow store."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

# Before anything imports Prefect: a private Prefect home, no telemetry (offline machines).
SESSION_HOME = tempfile.mkdtemp(prefix="mlp-pipeline-tests-")
os.environ.setdefault("PREFECT_HOME", os.path.join(SESSION_HOME, "prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
# Test workers share the cores, and a training often runs two BLAS threads (a final model, a
# one-worker pool). OpenBLAS's idle threads busy-wait 2^28 cycles after each call before they
# sleep: CPU taken from the other workers' tests (benchmarks/README.md, "The suite's BLAS threads").
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SESSION_SYS_PATH = list(sys.path)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(SESSION_HOME, ignore_errors=True)


class RefusedServer:
    """An http URL where connections are refused, and the urllib requests made meanwhile."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.requests: list[tuple[str, float | None]] = []  # (url, timeout), still sent

    def assert_one_short_health_request(self) -> None:
        """Exactly one request, to ``/health``, with a timeout of at most 5 s."""
        assert len(self.requests) == 1, f"expected one health request, got {self.requests}"
        url, timeout = self.requests[0]
        assert url == f"{self.url}/health", f"health check went to {url}"
        assert timeout is not None and 0 < timeout <= 5, f"health check timeout {timeout!r} s"


@pytest.fixture
def refused_server(monkeypatch):
    """A :class:`RefusedServer`: for "fails fast" as behaviour, not as a clock.

    Its port stays bound (not listening) during the test, so no other process can take it.
    """
    import urllib.request

    real_urlopen = urllib.request.urlopen
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        server = RefusedServer(f"http://127.0.0.1:{closed.getsockname()[1]}")

        def counting_urlopen(url, data=None, timeout=None, **kwargs):
            full_url = url.full_url if isinstance(url, urllib.request.Request) else url
            server.requests.append((full_url, timeout))
            return real_urlopen(url, data, timeout, **kwargs)

        monkeypatch.setattr(urllib.request, "urlopen", counting_urlopen)
        yield server


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The read-only folder holding real MNIST and Fashion-MNIST (``../shared/data``).

    Tests that need it skip without it: set ``MLP_PIPELINE_TEST_DATA`` to a folder holding
    ``mnist/train-images-idx3-ubyte.gz`` and the rest, or put the data at ``../shared/data``.
    """
    path = Path(os.environ.get("MLP_PIPELINE_TEST_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not (path / "mnist" / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(
            f"real MNIST not found under {path}: set MLP_PIPELINE_TEST_DATA to the folder "
            "holding mnist/ and fashion-mnist/ (default ../shared/data)"
        )
    return path


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own folder: defaults like ./mlruns never land in the repo.

    ``sys.path`` starts as the session's: loading a pyfunc model (in a test or a fixture) puts
    the model's ``code/`` folder first on it for good (MLflow's design), and the workers a
    later test spawns would import ``pipeline`` from there.
    """
    monkeypatch.chdir(tmp_path)
    sys.path[:] = SESSION_SYS_PATH


@pytest.fixture(scope="session")
def prefect_api_url():
    """One real Prefect server for the session (``prefect server start`` on 127.0.0.1), in
    ``PREFECT_API_URL``: flows run against it, and so do the commands tests start. Stopped by
    its pid at the end. A ``PREFECT_API_URL`` already set is used as is.
    """
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    from flows import server
    from flows.server import prefect_settings

    process, url = server.launch()
    try:
        server.wait_ready(process, url, timeout=120)
        with prefect_settings(PREFECT_API_URL=url):
            yield url
    finally:
        server.stop(process)


@pytest.fixture(scope="session")
def _empty_store() -> Path:
    """An MLflow SQLite store with its tables, made once: MLflow's migrations take seconds."""
    from mlflow import MlflowClient

    database = Path(SESSION_HOME) / "empty-store" / "mlflow.db"
    database.parent.mkdir()
    MlflowClient(tracking_uri=f"sqlite:///{database}").search_experiments()
    return database


@pytest.fixture()
def tracking_uri(tmp_path: Path, _empty_store: Path) -> str:
    """A fresh MLflow SQLite store in a temporary folder (absolute: four slashes).

    A copy of the session's empty store: the same tables MLflow would make, without the wait.
    """
    database = tmp_path / "mlruns" / "mlflow.db"
    database.parent.mkdir()
    shutil.copyfile(_empty_store, database)
    return f"sqlite:///{database}"


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every live child process of ``pid``, from ``/proc``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        # Field 4 is the parent pid; the command name (field 2) may contain spaces.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append((int(entry.name), cmdline))
    return found


@pytest.fixture(scope="session")
def child_processes():
    """A function listing (pid, command line) of the child processes of a process."""
    return _children


@pytest.fixture()
def pool_workers():
    """A function listing the process-pool workers of a process: spawned or forked children."""

    def find(pid: int) -> list[int]:
        # A forked worker runs its parent's command line; the parent's other children (a
        # server, the resource tracker) do not.
        parent_cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        return [
            child
            for child, cmdline in _children(pid)
            if "resource_tracker" not in cmdline
            and ("spawn_main" in cmdline or cmdline == parent_cmdline)
        ]

    return find


@pytest.fixture()
def listening_hosts():
    """A function giving the IPv4/IPv6 addresses a TCP ``port`` listens on, from ``/proc/net``.

    What the kernel says, not the URL a program printed: a server asked for 127.0.0.1 that
    bound 0.0.0.0 shows up here.
    """

    def find(port: int) -> set[str]:
        hosts = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                lines = Path(table).read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                local, state = line.split()[1], line.split()[3]
                address, port_hex = local.rsplit(":", 1)
                if state != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                    continue
                raw = bytes.fromhex(address)
                # /proc prints each 32-bit word in host (little-endian) order.
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
                hosts.add(socket.inet_ntop(family, words))
        return hosts

    return find


@pytest.fixture()
def reliability_log():
    """Record a fault-injection figure for ``benchmarks/reliability.py`` (no-op otherwise).

    Appends one JSON line to ``$MLP_PIPELINE_RELIABILITY_LOG`` when that variable is set.
    """
    import json

    def log(fault: str, **figures) -> None:
        path = os.environ.get("MLP_PIPELINE_RELIABILITY_LOG")
        if path:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"fault": fault, **figures}) + "\n")

    return log


@pytest.fixture()
def cli(capsys, monkeypatch):
    """Run the ``mlp-pipeline`` entry point in this process: ``cli(argv) -> (code, out, err)``.

    ``main()`` quiets libraries through ``os.environ`` and the mlflow logger; both are restored
    after the test. Each call gets new consoles, which read the terminal's width (``COLUMNS``)
    as a new process would.
    """
    import logging

    from rich.console import Console

    import flows.cli
    from flows.cli import main  # the console script: every command registered

    saved_env = dict(os.environ)
    mlflow_logger = logging.getLogger("mlflow")
    saved_level = mlflow_logger.level
    saved_raise = logging.raiseExceptions

    def invoke(argv: list[str]) -> tuple[int, str, str]:
        capsys.readouterr()
        monkeypatch.setattr(flows.cli, "out", Console(soft_wrap=True))
        monkeypatch.setattr(flows.cli, "err", Console(stderr=True, highlight=False, soft_wrap=True))
        try:
            main(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    yield invoke
    os.environ.clear()
    os.environ.update(saved_env)
    mlflow_logger.setLevel(saved_level)
    logging.raiseExceptions = saved_raise
