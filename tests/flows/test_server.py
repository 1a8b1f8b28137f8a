"""The temporary Prefect server: launched early, shared by the flow and its workers, stopped."""

from __future__ import annotations

import gc
import json
import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from flows.server import TemporaryServer, _export_api_url, prefect_api
from pipeline.errors import PipelineError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): read its state.
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        return handle.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture()
def no_api():
    """No configured API: ``prefect_api`` must start its own temporary server.

    Afterwards the session's API is restored in the environment *and* in Prefect's settings,
    so later flows in this process do not start a temporary server of their own.
    """
    saved = os.environ.pop("PREFECT_API_URL", None)
    yield
    _export_api_url(saved)


def test_a_failing_preparation_stops_the_booting_server(no_api, monkeypatch):
    servers: list[int] = []
    launch = TemporaryServer.launch

    def remember(self: TemporaryServer) -> None:
        launch(self)
        servers.append(self.process.pid)

    monkeypatch.setattr(TemporaryServer, "launch", remember)

    def prepare() -> None:
        assert os.environ["PREFECT_API_URL"].startswith("http://127.0.0.1:")
        raise PipelineError("bad data")

    with pytest.raises(PipelineError, match="bad data"), prefect_api(while_starting=prepare):
        pass
    assert len(servers) == 1
    assert not _alive(servers[0])
    assert "PREFECT_API_URL" not in os.environ


def test_flow_runs_reach_the_launched_server_even_if_prefect_was_imported_first(no_api):
    # Prefect reads PREFECT_API_URL at import; this test process imported it long ago. Without
    # a settings refresh the flow would start a second temporary server of its own.
    from prefect import flow
    from prefect.client.orchestration import get_client

    assert "prefect" in sys.modules

    @flow(name="server-identity-check")
    def identify() -> str:
        from prefect.runtime import flow_run

        return str(flow_run.get_id())

    with prefect_api(startup_timeout=90) as url:
        run_id = identify()
        with get_client(sync_client=True) as client:
            assert str(client.api_url).rstrip("/") == url.rstrip("/")
            assert str(client.read_flow_run(run_id).id) == run_id


def test_a_server_that_dies_while_booting_is_one_clear_error():
    server = TemporaryServer()
    server.port = 1
    # A real process that exits at once, as a broken server install would.
    server.process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
    with pytest.raises(PipelineError, match="exited during start-up .exit code 1"):
        server.wait_ready(timeout=30)


def test_launch_binds_loopback_and_stop_reaps(no_api, listening_hosts):
    server = TemporaryServer()
    server.launch()
    try:
        server.wait_ready(timeout=90)
        assert listening_hosts(server.port) == {"127.0.0.1"}, listening_hosts(server.port)
        pid = server.process.pid
    finally:
        server.stop()
    assert server.process is None
    assert not _alive(pid)


def test_the_cli_launches_the_server_before_importing_heavy_libraries(tmp_path):
    # The server's boot is the longest step of a run's start: nothing may delay its launch.
    script = tmp_path / "launch_probe.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, sys
            import flows.server

            def launch(self):
                heavy = ("prefect", "mlflow", "pandas", "matplotlib")
                print(json.dumps(sorted(name for name in heavy if name in sys.modules)))
                raise SystemExit(0)

            flows.server.TemporaryServer.launch = launch
            from flows.cli import main

            main(["run", "--preset", "quick", "--no-progress"])
            """
        )
    )
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


@pytest.mark.slow
def test_a_run_on_a_fresh_prefect_home_is_recorded_and_resumes(tmp_path, shared_data_dir):
    # The temporary server as a first-time user gets it: a new Prefect database in which it
    # registers no block types, process workers reporting to it, fold results persisted and
    # reused from a result storage that is no saved block.
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    args = [
        sys.executable, "-m", "flows.cli", "run", "--dataset", "mnist",
        "--data-dir", str(shared_data_dir), "--limit-train", "3000", "--limit-test", "500",
        "--hidden", "32", "--epochs", "2", "--final-epochs", "2", "--l2-grid", "1e-4,1e-2",
        "--folds", "2", "--runner", "process", "--workers", "2",
        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--set", f"execution.cache_dir={tmp_path / 'cache'}", "--no-progress",
    ]  # fmt: skip
    outputs = []
    for _ in range(2):
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path, check=False
        )
        assert done.returncode == 0, done.stderr[-3000:]
        outputs.append(done.stdout)
    assert "trainings: 4 run, 0 reused from cache" in outputs[0]
    assert "trainings: 0 run, 4 reused from cache" in outputs[1]
    with sqlite3.connect(tmp_path / "prefect-home" / "prefect.db") as db:
        flow_runs = db.execute("SELECT state_type FROM flow_run").fetchall()
        fold_runs = db.execute(
            "SELECT state_name FROM task_run WHERE task_key LIKE 'train_fold%'"
        ).fetchall()
        block_types = db.execute("SELECT count(*) FROM block_type").fetchone()
    assert flow_runs == [("COMPLETED",), ("COMPLETED",)]
    assert sorted(fold_runs) == [("Cached",)] * 4 + [("Completed",)] * 4
    assert block_types == (0,)  # so none of the above needed them


def test_the_garbage_collector_is_back_on_after_a_failed_start(cli, tmp_path, monkeypatch):
    # Start-up runs with the collector off; a run that fails there must not leave it off.
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(
        ["run", "--dataset", "mnist", "--data-dir", str(tmp_path), "--set", "data.download=false"]
    )
    assert code == 2, err
    assert "mnist" in err
    assert gc.isenabled()


@pytest.mark.parametrize("temporary", [True, False])
def test_flow_heartbeats_are_off_only_on_a_temporary_server(
    temporary, cli, tmp_path, monkeypatch, prefect_api_url
):
    # A temporary server dies with the run, so heartbeats (which let a lasting server mark a
    # vanished run Crashed) only delay the flow's teardown there.
    from prefect.settings import get_current_settings

    import flows.cli
    import flows.pipeline_flow

    seen = {}

    def probe(config):
        seen["api"] = os.environ.get("PREFECT_API_URL")
        seen["heartbeat"] = get_current_settings().flows.heartbeat_frequency
        return {}

    monkeypatch.setattr(flows.pipeline_flow, "cv_flow", probe)
    monkeypatch.setattr(flows.cli, "_print_summary", lambda result, cfg: None)
    if temporary:
        monkeypatch.delenv("PREFECT_API_URL")
    try:
        code, _, err = cli(["cv", "--preset", "quick", "--set", f"execution.cache_dir={tmp_path}"])
    finally:
        _export_api_url(prefect_api_url)  # Prefect's settings too, for the tests after this one
    assert code == 0, err
    assert (seen["api"] != prefect_api_url) is temporary, seen
    assert seen["heartbeat"] == (None if temporary else 180), seen
    assert get_current_settings().flows.heartbeat_frequency == 180, "restored after the run"


@pytest.mark.parametrize(
    ("where", "text", "expected"),
    [
        (
            "profiles.toml",
            'active = "p"\n[profiles.p]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n',
            "http://127.0.0.1:9/api",
        ),
        ("prefect.toml", '[api]\nurl = "http://127.0.0.1:8/api"\n', "http://127.0.0.1:8/api"),
        ("profiles.toml", 'active = "p"\n[profiles.p]\n', "None"),
    ],
    ids=["profile", "prefect.toml", "nothing-set"],
)
def test_an_api_url_from_prefect_settings_files_is_used(tmp_path, where, text, expected):
    """`prefect config set PREFECT_API_URL=...` (a profile) counts as a configured server."""
    # Arrange: a Prefect home and a working folder of their own, nothing in the environment.
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / "profiles.toml" if where == "profiles.toml" else work / where).write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(home), PREFECT_PROFILES_PATH=str(home / "profiles.toml"))
    code = "from flows.server import configured_api_url; print(configured_api_url())"

    # Act
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=work, env=env,
        timeout=120, check=False,
    )  # fmt: skip

    # Assert
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == expected, f"{where}: {done.stdout!r}"


def test_a_flow_called_from_python_shares_its_server_with_process_workers(tmp_path):
    """Without PREFECT_API_URL, Prefect starts a temporary server for the flow; the workers must
    report to it, not each start a server of their own."""
    script = textwrap.dedent(
        """
        import os, threading, time
        from pathlib import Path

        def servers_below(root):
            found = set()
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    cmdline = (entry / "cmdline").read_bytes().replace(b"\\0", b" ").decode()
                    pid, parent = int(entry.name), None
                    while pid > 1:
                        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                        pid = int(stat[1])
                        if pid == os.getpid():
                            parent = pid
                            break
                except (OSError, ValueError):
                    continue
                if parent and "uvicorn" in cmdline:
                    found.add(int(entry.name))
            return found

        if __name__ == "__main__":
            seen, done = set(), threading.Event()
            def watch():
                while not done.is_set():
                    seen.update(servers_below(os.getpid()))
                    time.sleep(0.2)
            threading.Thread(target=watch, daemon=True).start()
            from flows.pipeline_flow import cv_flow
            from pipeline.config import preset
            config = preset("quick").replace(
                {"execution.runner": "process", "execution.workers": 2}
            )
            result = cv_flow(config)
            done.set()
            print("SERVERS", len(seen), "TRAINED", result["trained_folds"])
        """
    )
    (tmp_path / "go.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "home")

    done = subprocess.run(
        [sys.executable, "go.py"], capture_output=True, text=True, cwd=tmp_path, env=env,
        timeout=600, check=False,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last == "SERVERS 1 TRAINED 4", f"one temporary server for flow and workers: {last}"
