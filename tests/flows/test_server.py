"""``flows.server``: the temporary ``prefect server start`` of a command without a Prefect API.

It binds loopback, runs in its own session, boots while the command prepares, and is stopped
(its pid gone) however the command's block ends, even when the command is killed outright.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from flows import server
from flows.server import PrefectServerError, prefect_api
from pipeline.errors import PipelineError

T = TypeVar("T")
BOOT_SECONDS = 180  # a hang guard for a server booting on 2 busy cores, not a requirement


def _gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (absent, or a zombie nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _reapable(pid: int) -> bool:
    """True once our child ``pid`` has exited, every thread of it (left unreaped), or is reaped
    already (the server's boot-lock thread polls it while it waits for an answer)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(0.1)


def _prefect_servers(child_processes) -> dict[int, str]:
    """This process's children running ``prefect server start``."""
    return {
        pid: command
        for pid, command in child_processes(os.getpid())
        if "prefect server start" in command
    }


def _health(url: str) -> object:
    with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
        return json.loads(response.read())


def _one_line(error: BaseException) -> str:
    message = str(error)
    assert message and "\n" not in message, f"not one line: {message!r}"
    return message


@pytest.fixture()
def no_api(monkeypatch) -> Iterator[None]:
    """No Prefect API configured, as in a command's fresh process: not in the environment, not
    in Prefect's global settings.

    This thread holds the session's settings context (its API): the code under test runs in a
    thread of its own (:func:`_in_a_fresh_thread`), which has none, as a command's process.
    """
    from prefect.context import refresh_global_settings_context

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    refresh_global_settings_context()
    yield
    refresh_global_settings_context()


def _in_a_fresh_thread(fn: Callable[[], T]) -> T:
    """``fn()`` in a new thread (no Prefect settings context): its result, or its exception."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 -- handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="fresh-thread")
    thread.start()
    thread.join(timeout=600)
    assert not thread.is_alive(), "the block hangs"
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome.get("value")  # type: ignore[return-value]


class Launched:
    """The temporary server ``prefect_api`` launched: found among our children in ``prepare``."""

    def __init__(self, child_processes) -> None:
        self._children = child_processes
        self._before = set(_prefect_servers(child_processes))  # the session's server
        self.pid: int | None = None
        self.alive_in_prepare = False

    def prepare(self) -> None:
        new = set(_prefect_servers(self._children)) - self._before
        assert len(new) == 1, f"prepare runs after the server is launched: {new}"
        self.pid = new.pop()
        self.alive_in_prepare = not _gone(self.pid)


# ------------------------------------------------------------------------------ launch, stop


@pytest.mark.slow
@pytest.mark.server
def test_launch_binds_loopback_in_a_session_of_its_own_and_stop_reaps_it(
    no_api, reaped, listening_hosts, child_processes
):
    process, url = server.launch()
    reaped(process)

    server.wait_ready(process, url, timeout=BOOT_SECONDS)

    found = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/api", url)
    assert found, url
    assert listening_hosts(int(found.group(1))) == {"127.0.0.1"}, "not on loopback only"
    assert _health(url) is True, "no healthy answer at /api/health"
    assert os.getsid(process.pid) == process.pid, "not the leader of a session of its own"
    assert os.getpgid(process.pid) != os.getpgid(0), "in our process group: Ctrl-C reaches it"
    descendants = [pid for pid, _ in child_processes(process.pid)]

    server.stop(process)

    assert process.returncode is not None, "stop returned before the server ended"
    assert _gone(process.pid), "the server still runs"
    assert all(_gone(pid) for pid in descendants), f"its children outlived it: {descendants}"


def test_a_server_that_exits_at_once_is_one_line(reaped, dead_endpoint):
    endpoint = dead_endpoint("closed")
    broken = reaped(subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"]))

    with pytest.raises(PrefectServerError) as failure:
        server.wait_ready(broken, f"{endpoint.url}/api", timeout=BOOT_SECONDS)

    message = _one_line(failure.value)
    assert message.startswith("the temporary Prefect server exited (3);"), message
    assert "PREFECT_API_URL" in message and "prefect server start" in message, message


def test_a_server_that_never_answers_is_one_line(reaped, dead_endpoint):
    endpoint = dead_endpoint("hangs up")
    mute = reaped(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]))

    with pytest.raises(PrefectServerError) as failure:
        server.wait_ready(mute, f"{endpoint.url}/api", timeout=1)

    message = _one_line(failure.value)
    assert message.startswith("the temporary Prefect server did not answer in time;"), message
    assert endpoint.connections >= 1, "wait_ready never asked the server"


# ------------------------------------------------------------------------------ prefect_api


def _flow_run_id() -> str:
    from prefect import flow
    from prefect.runtime import flow_run

    @flow(name="server-identity-check")
    def identify() -> str:
        return str(flow_run.get_id())

    return identify()


@pytest.mark.slow
@pytest.mark.server
def test_prefect_api_boots_the_server_while_preparing_and_stops_it_after(no_api, child_processes):
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    launched = Launched(child_processes)
    seen: dict[str, object] = {}

    def command() -> None:
        with prefect_api(launched.prepare) as url:
            seen["url"] = url
            seen["health"] = _health(url)
            seen["environment"] = os.environ.get("PREFECT_API_URL")
            seen["settings"] = get_current_settings().api.url
            run_id = _flow_run_id()
            with get_client(sync_client=True) as client:
                seen["client"] = str(client.api_url).rstrip("/")
                seen["recorded"] = str(client.read_flow_run(run_id).id) == run_id

    _in_a_fresh_thread(command)

    url = seen["url"]
    assert launched.alive_in_prepare, "the server was not running while prepare ran"
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/api", str(url)), url
    assert seen["health"] is True, "the block ran before the server answered"
    assert seen["environment"] == url, "not in the environment, for the workers"
    assert seen["settings"] == url, "not in Prefect's settings"
    assert seen["client"] == url, "the flow's Prefect client talks to another API"
    assert seen["recorded"] is True, "the flow run is not on the temporary server"
    assert _gone(launched.pid), "the temporary server outlived its block"
    assert "PREFECT_API_URL" not in os.environ, "the block's API stayed in the environment"


@pytest.mark.slow
@pytest.mark.server
def test_prefect_api_reaches_a_block_inside_a_prefect_settings_context(no_api):
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    with (
        temporary_settings(restore_defaults={PREFECT_API_URL}),
        prefect_api(lambda: None) as url,
    ):
        settings_url = get_current_settings().api.url

    assert settings_url == url, f"the block's Prefect settings name {settings_url}, not {url}"


@pytest.mark.slow
@pytest.mark.server
def test_a_block_that_raises_still_stops_the_server(no_api, child_processes):
    launched = Launched(child_processes)

    def command() -> None:
        with prefect_api(launched.prepare):
            raise ValueError("the block failed")  # the server is alive: the error is kept

    with pytest.raises(ValueError, match="the block failed"):
        _in_a_fresh_thread(command)

    assert launched.pid is not None and _gone(launched.pid), "the server outlived its block"


@pytest.mark.server
def test_a_failing_prepare_stops_the_booting_server(no_api, child_processes):
    launched = Launched(child_processes)

    def prepare() -> None:
        launched.prepare()
        raise PipelineError("bad data")

    def command() -> None:
        with prefect_api(prepare):
            pytest.fail("the block ran after a failed preparation")

    with pytest.raises(PipelineError, match="bad data"):
        _in_a_fresh_thread(command)

    assert launched.pid is not None and _gone(launched.pid), "the booting server was left"


@pytest.mark.slow
@pytest.mark.server
def test_a_server_killed_mid_block_turns_the_failure_into_one_line(no_api, child_processes):
    launched = Launched(child_processes)

    def command() -> None:
        with prefect_api(launched.prepare):
            os.kill(launched.pid, signal.SIGKILL)
            # Reapable, not just a zombie leader: its other threads may still be exiting, and
            # until they have, the server reads as running (``poll()`` is None).
            _wait_for(lambda: _reapable(launched.pid), "the killed server")
            raise ConnectionError("the flow lost its API")

    with pytest.raises(PrefectServerError) as failure:
        _in_a_fresh_thread(command)

    message = _one_line(failure.value)
    assert message.startswith(
        f"the temporary Prefect server stopped during the run (exit code {-signal.SIGKILL})"
    ), message
    assert "run the command again to resume" in message, message
    assert failure.value.__suppress_context__, "the ConnectionError's traceback is noise"


@pytest.mark.server
def test_with_an_api_url_in_the_environment_nothing_is_launched(
    monkeypatch, prefect_api_url, child_processes
):
    monkeypatch.setenv("PREFECT_API_URL", prefect_api_url)
    before = set(child_processes(os.getpid()))
    prepared = []

    with prefect_api(lambda: prepared.append(True)) as url:
        started = set(child_processes(os.getpid())) - before

    assert url is None, url
    assert prepared == [True], "prepare did not run"
    assert not started, f"processes started: {started}"


@pytest.mark.server
def test_with_an_api_url_in_prefects_settings_no_server_is_left(
    no_api, child_processes, prefect_api_url
):
    """A URL from ``prefect config set`` or ``prefect.toml`` counts as a configured API."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    before = set(_prefect_servers(child_processes))
    prepared = []

    def command() -> tuple[str | None, set[int]]:
        with (
            temporary_settings(updates={PREFECT_API_URL: prefect_api_url}),
            prefect_api(lambda: prepared.append(True)) as url,
        ):
            return url, set(_prefect_servers(child_processes)) - before

    url, left = _in_a_fresh_thread(command)

    assert url is None, url
    assert prepared == [True], "prepare did not run"
    assert not left, f"a temporary server runs beside the configured API: {left}"


_SETTINGS_PROBE = textwrap.dedent(
    """
    from flows.server import prefect_api
    from pipeline.errors import ConfigError

    class Launched(Exception):
        pass

    def prepare():
        import os
        if "PREFECT_API_URL" not in os.environ:
            from prefect.settings import get_current_settings
            if not get_current_settings().api.url:
                raise Launched  # a temporary server boots: no need to wait for it

    try:
        with prefect_api(prepare) as url:
            print("configured", url)
    except Launched:
        print("launched")
    except ConfigError as exc:  # the configured API is checked: nothing listens there
        print("checked", str(exc).split(" (")[0])
    """
)


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.parametrize(
    ("where", "text", "expected"),
    [
        (
            "profiles.toml",
            'active = "p"\n[profiles.p]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n',
            "checked no Prefect server answers at http://127.0.0.1:9/api",
        ),
        (
            "prefect.toml",
            '[api]\nurl = "http://127.0.0.1:8/api"\n',
            "checked no Prefect server answers at http://127.0.0.1:8/api",
        ),
        ("profiles.toml", 'active = "p"\n[profiles.p]\n', "launched"),
    ],
    ids=["profile", "prefect.toml", "nothing-set"],
)
def test_an_api_url_from_prefect_settings_files_is_used(tmp_path, reaped, where, text, expected):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / "profiles.toml" if where == "profiles.toml" else work / where).write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(home), PREFECT_PROFILES_PATH=str(home / "profiles.toml"))
    last = _probe(reaped, _SETTINGS_PROBE, work, env)

    assert last == expected, f"{where}: {last!r}"


def _probe(reaped, code: str, cwd, env: dict[str, str]) -> str:
    """Run ``code`` in a new interpreter; returns the last line it printed (it must succeed)."""
    probe = reaped(
        subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=cwd,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
    )
    out, err = probe.communicate(timeout=300)
    assert probe.returncode == 0, err[-3000:]
    return out.strip().splitlines()[-1]


# ------------------------------------------------------------------------------ processes


_LAUNCHER = textwrap.dedent(
    """
    import sys, time
    from flows import server

    process, url = server.launch()
    server.wait_ready(process, url, timeout=float(sys.argv[1]))
    print(process.pid, url, flush=True)
    time.sleep(600)
    """
)


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux")
def test_the_server_dies_with_the_process_that_launched_it(no_api, tmp_path, reaped):
    launcher = reaped(
        subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, str(BOOT_SECONDS)],
            cwd=tmp_path,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(os.environ),
        )  # fmt: skip
    )
    line = launcher.stdout.readline()
    assert line, f"the launcher printed nothing: {launcher.communicate(timeout=30)}"
    pid, url = int(line.split()[0]), line.split()[1]
    try:
        assert _health(url) is True, "the launched server does not answer"

        os.kill(launcher.pid, signal.SIGKILL)  # kill -9: no cleanup code runs
        launcher.wait(timeout=30)

        _wait_for(lambda: _gone(pid), "the server of a killed command", timeout=30)
    finally:
        if not _gone(pid):  # the test failed: stop the orphan ourselves
            os.kill(pid, signal.SIGKILL)


_HEAVY_IMPORTS_PROBE = textwrap.dedent(
    """
    import json, sys
    import flows.server

    def launch():
        heavy = ("prefect", "mlflow", "pandas", "matplotlib")
        print(json.dumps(sorted(name for name in heavy if name in sys.modules)))
        raise SystemExit(0)

    flows.server.launch = launch
    from flows.cli import main

    main(["cv", "--preset", "quick", "--no-progress"])
    """
)


@pytest.mark.slow
def test_the_command_launches_the_server_before_importing_heavy_libraries(tmp_path, reaped):
    """The server's boot is the longest step of a run's start: nothing may delay its launch."""
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    last = _probe(reaped, _HEAVY_IMPORTS_PROBE, tmp_path, env)

    assert json.loads(last) == [], f"imported before the launch: {last}"
