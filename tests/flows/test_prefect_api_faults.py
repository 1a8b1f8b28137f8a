"""A Prefect API that is silent, refusing or not ours to start: every wait bounded, one line.

A configured API (``PREFECT_API_URL`` or a Prefect settings file) is checked before use; a
temporary server needs a writable ``PREFECT_HOME``, and launches in one home take turns until
each server answers, so two first runs do not migrate one new database at once.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows import server
from flows.server import PrefectServerError

QUICK_CV = ["cv", "--preset", "quick", "--no-progress"]
SECRET = "pr3fect-pa55"


@pytest.fixture()
def silent_api() -> Iterator[str]:
    """A loopback port that accepts connections (the kernel's backlog) and never answers:
    a hung server. Yields its base URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


# ------------------------------------------------------------------------------ a configured API


@pytest.mark.parametrize("kind", [pytest.param("silent", marks=pytest.mark.slow), "refusing"])
def test_run_against_a_dead_configured_api_fails_in_seconds(
    cli, monkeypatch, silent_api, dead_endpoint, kind, one_error_line
):
    base = silent_api if kind == "silent" else dead_endpoint("closed").url
    host = base.removeprefix("http://")
    monkeypatch.setenv("PREFECT_API_URL", f"http://alice:{SECRET}@{host}/api")

    started = time.monotonic()
    code, out, err = cli(QUICK_CV)
    seconds = time.monotonic() - started

    assert code == 2, out + err
    line = one_error_line(err, out)
    assert line.startswith(f"error: no Prefect server answers at http://{host}/api ("), line
    assert SECRET not in out + err and "alice" not in out + err, "the credentials were printed"
    assert "unset PREFECT_API_URL" in line, line
    assert seconds < 30, f"{seconds:.1f} s to fail"  # the health check's 5 s, plus the imports


@pytest.mark.slow
def test_an_api_from_prefects_settings_is_checked_too(
    cli, monkeypatch, silent_api, tmp_path, one_error_line
):
    """``prefect config set PREFECT_API_URL=...`` (not the environment): the same bound."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    started = time.monotonic()
    with temporary_settings(updates={PREFECT_API_URL: f"{silent_api}/api"}):
        code, out, err = cli(QUICK_CV)
    seconds = time.monotonic() - started

    assert code == 2, out + err
    line = one_error_line(err, out)
    assert line.startswith(f"error: no Prefect server answers at {silent_api}/api ("), line
    assert seconds < 60, f"{seconds:.1f} s to fail"


# ------------------------------------------------------------------------------ PREFECT_HOME


@contextlib.contextmanager
def _read_only_folder(where: Path) -> Iterator[Path]:
    """An empty read-only tmpfs mounted at ``where`` (root only; skips otherwise)."""
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(where)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def test_a_read_only_prefect_home_is_one_line_exit_2(
    cli, monkeypatch, tmp_path, child_processes, one_error_line
):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    # No API in Prefect's settings either (the session's server may be set there).
    with (
        temporary_settings(restore_defaults={PREFECT_API_URL}),
        _read_only_folder(tmp_path / "ro-home") as home,
    ):
        monkeypatch.setenv("PREFECT_HOME", str(home))
        before = set(child_processes(os.getpid()))

        code, out, err = cli(QUICK_CV)

        started = set(child_processes(os.getpid())) - before
    assert code == 2, out + err
    line = one_error_line(err, out)
    assert line.startswith(f"error: PREFECT_HOME {home} is not writable: "), line
    assert "Read-only file system" in line, line
    servers = {child for child in started if "server" in child[1] and "prefect" in child[1]}
    assert not servers, f"a server was launched anyway: {servers}"


# ------------------------------------------------------------------------------ launches


def test_a_launch_waits_for_another_launch_in_the_same_home(monkeypatch, tmp_path, reaped):
    """The boot lock: while another launch in this home boots, no second server starts."""
    from filelock import FileLock

    home = tmp_path / "prefect-home"
    home.mkdir()
    monkeypatch.setenv("PREFECT_HOME", str(home))
    holder = FileLock(home / server.BOOT_LOCK)
    holder.acquire()
    launched: list[subprocess.Popen] = []
    thread = threading.Thread(target=lambda: launched.append(server.launch()[0]))
    try:
        thread.start()
        time.sleep(2)
        assert not launched, "a server was launched while another launch held the home"
    finally:
        holder.release()
    thread.join(timeout=60)
    assert launched, "the launch did not go ahead once the lock was free"
    reaped(launched[0])
    server.stop(launched[0])


def test_a_server_that_exits_early_names_its_cause(reaped, dead_endpoint):
    cause = "sqlite3.OperationalError: table flow_run already exists"
    log = tempfile.TemporaryFile()  # noqa: SIM115 -- the server's, closed by stop()
    script = f"import sys; print('Traceback', file=sys.stderr); print({cause!r}, file=sys.stderr)"
    script += "; print('ERROR:    Application startup failed. Exiting.', file=sys.stderr)"
    script += "; raise SystemExit(3)"
    broken = reaped(server.ServerProcess([sys.executable, "-c", script], stderr=log))
    broken.log = log

    with pytest.raises(PrefectServerError) as failure:
        server.wait_ready(broken, f"{dead_endpoint('closed').url}/api", timeout=120)

    message = str(failure.value)
    assert "\n" not in message, message
    assert message.startswith(f"the temporary Prefect server exited (3: {cause});"), message
    server.stop(broken)


_TWO_RUNS_TIMEOUT = 400


@pytest.mark.slow
@pytest.mark.server
def test_two_first_runs_at_once_on_a_fresh_prefect_home_both_succeed(tmp_path, start_command):
    """Two temporary servers would migrate one new database at once: one exited 3."""
    home = tmp_path / "prefect-home"
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    runs = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        runs.append(start_command(["run", "--preset", "quick", "--no-progress"], folder, env))

    results = [run.communicate(timeout=_TWO_RUNS_TIMEOUT) for run in runs]

    for run, (out, err) in zip(runs, results, strict=True):
        assert run.returncode == 0, f"exit {run.returncode}: {err[-3000:]}"
        assert "test accuracy" in out, out
        assert "Traceback" not in err, err[-3000:]
