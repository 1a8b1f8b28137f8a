"""Deployments: the plain helpers, ``prefect.yaml``, then end to end against a real server.

The end-to-end tests share one ``prefect server start`` and one ``mlp-pipeline serve`` for the
module (they are the slow part): a scheduled run, triggered runs, ``prefect deployment run``
and the one-line errors. No test stops the shared ``serve``, so they pass in any order: the
SIGTERM test stops a ``serve`` of its own, and ``prefect deploy`` of prefect.yaml (which takes
the deployment names over) gets a Prefect server of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient

from flows import deployments as dep
from pipeline.config import preset
from pipeline.errors import ConfigError, PipelineError

REPO_ROOT = Path(__file__).resolve().parents[2]

EXPERIMENT = "deployments-test"
SCHEDULE_SECONDS = 20
PREFECT = str(Path(sys.executable).with_name("prefect"))
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


# ------------------------------------------------------------------------------ helpers


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_group(process: subprocess.Popen, timeout: float = 30) -> int | None:
    """SIGTERM the process and its children (its own session), SIGKILL what is left."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # children that outlived their parent
    return process.wait(timeout=10)


def _cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 180):
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got: {result.stderr!r}"
    assert lines[0].startswith("error: "), lines
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


def _parent_runs(tracking_uri: str) -> list:
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], "tags.stage = 'pipeline'")


def _flow_run_of(run) -> str | None:
    """The Prefect flow run behind an MLflow parent run."""
    return run.data.tags.get("prefect.flow_run_id")


def _run_of_flow_run(tracking_uri: str, flow_run_id: str):
    runs = [r for r in _parent_runs(tracking_uri) if _flow_run_of(r) == flow_run_id]
    assert len(runs) == 1, f"MLflow parent runs of flow run {flow_run_id}: {runs}"
    return runs[0]


# ------------------------------------------------------------------------------ plain helpers


def test_absolute_paths_resolves_relative_stores(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLP_PIPELINE_DATA_DIR", raising=False)
    cfg = preset("quick").replace({"execution.cache_dir": "cache"})

    resolved = dep.absolute_paths(cfg)

    assert resolved.tracking.tracking_uri == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert resolved.execution.cache_dir == str(tmp_path / "cache")
    assert resolved.data.data_dir == str(tmp_path / "data")
    relative = cfg.replace({"tracking.tracking_uri": "sqlite:///store/m.db"})
    assert dep.absolute_paths(relative).tracking.tracking_uri == (
        f"sqlite:///{tmp_path / 'store' / 'm.db'}"
    )
    for kept in ("sqlite:////abs/m.db", "http://127.0.0.1:5000"):
        same = cfg.replace({"tracking.tracking_uri": kept})
        assert dep.absolute_paths(same).tracking.tracking_uri == kept


def test_build_deployments_carry_the_config():
    cfg = preset("quick")

    served = dep.build_deployments(cfg, name="nightly", cron="0 2 * * *")

    assert [d.name for d in served] == ["nightly", "on-demand"]
    assert served[0].schedules[0].schedule.cron == "0 2 * * *"
    assert not served[1].schedules
    for deployment in served:
        assert deployment.parameters == {"config": cfg.model_dump(mode="json")}
        assert deployment.entrypoint == "flows.pipeline_flow.mlp_pipeline"
    assert [d.name for d in dep.build_deployments(cfg)] == ["on-demand"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cron": "0 2 * * *", "interval": 60}, "not both"),
        ({"interval": 0}, "positive"),
        ({"cron": "every night"}, "not a valid cron expression"),
        ({"name": "on-demand", "interval": 60}, "taken"),
    ],
)
def test_build_deployments_rejects_bad_schedules(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        dep.build_deployments(preset("quick"), **kwargs)


def test_deployment_config_applies_overrides_to_the_stored_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    class Stored:  # the two attributes read from a prefect DeploymentResponse
        name = "on-demand"
        parameters = {"config": preset("quick").model_dump(mode="json")}

    cfg = dep.deployment_config(Stored, {"training.epochs": 2, "execution.cache_dir": "c"})

    assert cfg.training.epochs == 2 and cfg.data.dataset == "mnist-sample"
    assert cfg.execution.cache_dir == str(tmp_path / "c")
    assert dep.deployment_config(Stored, {}) == preset("quick")
    with pytest.raises(ConfigError, match="training.epochs"):
        dep.deployment_config(Stored, {"training.epochs": 0})


def test_require_api_url(monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(PipelineError, match="prefect server start --host 127.0.0.1"):
        dep.require_api_url()
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api/")
    assert dep.require_api_url() == "http://127.0.0.1:4200/api"
    assert dep.full_name("on-demand") == "mlp-pipeline/on-demand"
    assert dep.full_name("other-flow/x") == "other-flow/x"


def test_prefect_yaml_is_loadable_and_points_at_the_flow():
    import importlib

    import yaml

    spec = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text(encoding="utf-8"))
    deployments = {d["name"]: d for d in spec["deployments"]}

    assert set(deployments) == {"scheduled", "on-demand"}, deployments
    for deployment in deployments.values():
        path, _, function = deployment["entrypoint"].partition(":")
        assert (REPO_ROOT / path).is_file(), path
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert getattr(module, function).name == "mlp-pipeline"
        assert deployment["work_pool"]["name"] == "mlp-pipeline-pool"
        # The stored parameter must validate as the flow's config.
        dep.deployment_config(type("D", (), deployment), {})
    assert deployments["scheduled"]["schedules"][0]["cron"] == "0 2 * * *"


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("deployments")


@contextlib.contextmanager
def _prefect_server(folder: Path) -> Iterator[str]:
    """A real ``prefect server start`` on a free port, PREFECT_HOME and log in ``folder``."""
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(folder / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    log = (folder / "server.log").open("w")
    server = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--analytics-off"],
        env=env, cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (folder / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).json() is True:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prefect server not healthy within 120 s"
            time.sleep(0.5)
        yield url
    finally:
        _stop_group(server)
        log.close()


def _client_env(api: str, folder: Path) -> dict[str, str]:
    """The environment of every client: the server's API, quiet, fast runner polling."""
    return {
        **os.environ,
        "PREFECT_API_URL": api,
        "PREFECT_HOME": str(folder / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",  # default 10 s: runs would wait for the poll
    }


@pytest.fixture(scope="module")
def prefect_server(workdir: Path) -> Iterator[str]:
    """The module's server, shared by the end-to-end tests."""
    with _prefect_server(workdir) as url:
        yield url


@pytest.fixture(scope="module")
def env(prefect_server: str, workdir: Path) -> dict[str, str]:
    return _client_env(prefect_server, workdir)


@pytest.fixture(scope="module")
def tracking_store(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"


@contextlib.contextmanager
def _serving(
    env: dict[str, str], workdir: Path, tracking_store: str, name: str, interval: float
) -> Iterator[subprocess.Popen]:
    """``mlp-pipeline serve`` of a tiny config: deployment ``name`` every ``interval`` s and
    ``on-demand``; relative cache path on purpose. Stopped (its process group) on exit."""
    args = [
        "serve", "--name", name, "--interval", f"{interval:g}", "--preset", "quick",
        "--set", "training.epochs=1", "--set", "execution.runner=thread",
        "--set", "execution.workers=1", "--set", "execution.cache_dir=cache",
        "--set", f"tracking.tracking_uri={tracking_store}",
        "--set", f"tracking.experiment={EXPERIMENT}", "--set", "tracking.registered_model=null",
    ]  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        env=env, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        # Serving has started once the runner polls for the runs of its deployments, which the
        # server notes as READY. The scheduled one is registered first, and is this serve's own
        # (``on-demand`` may be another serve's too).
        deadline = time.monotonic() + 90
        api = env["PREFECT_API_URL"]
        url = f"{api}/deployments/name/mlp-pipeline/{name}"
        while not (
            (response := httpx.get(url, timeout=10)).is_success
            and response.json()["status"] == "READY"
            and httpx.get(f"{api}/deployments/name/mlp-pipeline/on-demand", timeout=10).is_success
        ):
            assert process.poll() is None, f"serve ended: {process.communicate()}"
            assert time.monotonic() < deadline, f"serve was not serving {name} within 90 s"
            time.sleep(0.5)
        yield process
    finally:
        _stop_group(process, timeout=60)


@pytest.fixture(scope="module")
def serve(env: dict[str, str], workdir: Path, tracking_store: str) -> Iterator[subprocess.Popen]:
    """The module's ``serve``: ``scheduled`` every 20 s, and ``on-demand``. No test stops it."""
    with _serving(env, workdir, tracking_store, "scheduled", SCHEDULE_SECONDS) as process:
        yield process


def _deployment(api: str, name: str) -> dict:
    response = httpx.get(f"{api}/deployments/name/mlp-pipeline/{name}", timeout=10)
    response.raise_for_status()
    return response.json()


# ------------------------------------------------------------------------------ tests


def _flow_run_ids(api: str, deployment_id: str) -> set[str]:
    """The ids of every flow run of a deployment."""
    body = {"deployments": {"id": {"any_": [deployment_id]}}, "limit": 200}
    response = httpx.post(f"{api}/flow_runs/filter", json=body, timeout=10)
    response.raise_for_status()
    return {run["id"] for run in response.json()}


@pytest.mark.slow
@pytest.mark.server
def test_scheduled_run_reaches_mlflow(serve, prefect_server, tracking_store, workdir):
    scheduled = _deployment(prefect_server, "scheduled")
    deadline = time.monotonic() + 150
    runs = []
    while not runs:  # the MLflow parent runs of the scheduled deployment's flow runs only
        assert serve.poll() is None, f"serve ended: {serve.communicate()}"
        assert time.monotonic() < deadline, "no scheduled run started within 150 s"
        time.sleep(1)
        ids = _flow_run_ids(prefect_server, scheduled["id"])
        runs = [r for r in _parent_runs(tracking_store) if _flow_run_of(r) in ids]
    # The first run is under way: pause the schedule (which deletes the runs scheduled ahead) so
    # the other tests have the 2 cores to themselves.
    pause = f"{prefect_server}/deployments/{scheduled['id']}/pause_deployment"
    httpx.post(pause, timeout=10).raise_for_status()
    client = MlflowClient(tracking_uri=tracking_store)
    run = runs[0]
    while run.info.status == "RUNNING":
        assert time.monotonic() < deadline, "the scheduled run did not finish within 150 s"
        time.sleep(1)
        run = client.get_run(run.info.run_id)
    flow_run_id = _flow_run_of(run)
    # The MLflow run ends inside the flow, a moment before Prefect marks the flow run final.
    flow_run = httpx.get(f"{prefect_server}/flow_runs/{flow_run_id}", timeout=10).json()
    while flow_run["state_type"] in ("PENDING", "RUNNING") and time.monotonic() < deadline:
        time.sleep(1)
        flow_run = httpx.get(f"{prefect_server}/flow_runs/{flow_run_id}", timeout=10).json()

    assert run.info.status == "FINISHED", run.info
    assert flow_run["deployment_id"] == scheduled["id"], flow_run
    assert flow_run["state_type"] == "COMPLETED", flow_run["state_type"]
    assert 0 < run.data.metrics["test_accuracy"] <= 1, run.data.metrics
    assert run.data.params["training.epochs"] == "1", run.data.params
    # The relative cache dir was made absolute when serving (serve's cwd is workdir).
    assert run.data.params["execution.cache_dir"] == str(workdir / "cache"), run.data.params


@pytest.mark.slow
@pytest.mark.server
def test_trigger_wait_prints_run_and_accuracy(serve, env, workdir, tracking_store):
    result = _cli(
        ["trigger", "--deployment", "on-demand", "--set", "training.epochs=2",
         "--set", "tracking.registered_model=mlp-triggered", "--wait"],
        env, workdir,
    )  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    assert "state: Completed" in result.stdout, result.stdout
    run_id = re.search(r"MLflow run ([0-9a-f]{32})", result.stdout)
    accuracy = re.search(r"test accuracy (\d\.\d{4})", result.stdout)
    assert run_id and accuracy, result.stdout
    run = MlflowClient(tracking_uri=tracking_store).get_run(run_id.group(1))
    assert run.data.params["training.epochs"] == "2", run.data.params
    assert run.data.metrics["test_accuracy"] == pytest.approx(float(accuracy.group(1)), abs=1e-4)
    # The registration, as `run` prints it (the served config registers nothing; the trigger
    # overrides that).
    assert "model mlp-triggered version 1 (new champion)" in result.stdout, result.stdout


@pytest.mark.slow
@pytest.mark.server
def test_trigger_wait_on_a_failing_run_exits_1_in_one_line(
    serve, env, workdir, tmp_path, prefect_server
):
    # A run that fails at once: its data folder has no MNIST (and no download).
    empty = tmp_path / "no-data"
    empty.mkdir()
    result = _cli(
        ["trigger", "--set", "data.dataset=mnist", "--set", f"data.data_dir={empty}",
         "--set", "data.download=false", "--wait"],
        env, workdir,
    )  # fmt: skip

    assert result.returncode == 1, result.stdout + result.stderr
    started = re.search(
        rf"flow run (\S+) \(({UUID.pattern})\) of mlp-pipeline/on-demand", result.stdout
    )
    assert started, result.stdout
    name, flow_run_id = started.groups()
    assert "state: Failed" in result.stdout, result.stdout
    line = _one_error_line(result)
    assert line.startswith(f"error: flow run {name} ended Failed: "), line
    assert f"not found under {empty}" in line, line
    flow_run = httpx.get(f"{prefect_server}/flow_runs/{flow_run_id}", timeout=10).json()
    assert flow_run["state_type"] == "FAILED", flow_run["state_type"]
    assert serve.poll() is None, f"serve ended with the failed run: {serve.communicate()}"


@pytest.mark.slow
@pytest.mark.server
def test_prefect_deployment_run_with_whole_config(
    serve, env, workdir, prefect_server, tracking_store
):
    config = _deployment(prefect_server, "on-demand")["parameters"]["config"]
    config["training"]["epochs"] = 3
    result = subprocess.run(
        [PREFECT, "deployment", "run", "mlp-pipeline/on-demand",
         "--param", f"config={json.dumps(config)}", "--watch", "--watch-interval", "2",
         "--watch-timeout", "170"],
        env=env, cwd=workdir, capture_output=True, text=True, timeout=180,
    )  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    flow_run_id = UUID.search(result.stdout)
    assert flow_run_id, result.stdout
    run = _run_of_flow_run(tracking_store, flow_run_id.group(0))
    assert run.data.params["training.epochs"] == "3", run.data.params
    assert "test_accuracy" in run.data.metrics, run.data.metrics


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--deployment", "nightly"], "unknown deployment 'mlp-pipeline/nightly'"),
        (["--set", "training.epochs=0"], "training.epochs"),
        (["--set", "training.epochz=3"], "unknown setting 'training.epochz'"),
    ],
)
@pytest.mark.slow
@pytest.mark.server
def test_trigger_errors_are_one_line(serve, env, workdir, args, expected):
    result = _cli(["trigger", *args], env, workdir, timeout=60)

    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in _one_error_line(result)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("closed", "Connection refused"), ("hangs up", "Server disconnected without sending")],
    ids=["closed", "hangs-up"],
)
@pytest.mark.slow
@pytest.mark.server
def test_trigger_without_server_fails_fast(workdir, dead_endpoint, kind, reason):
    # Fast: one health request, not the Prefect client's retries of a refused connection.
    dead = dead_endpoint(kind)
    env = {**os.environ, "PREFECT_API_URL": f"{dead.url}/api"}
    result = _cli(["trigger"], env, workdir, timeout=60)  # the timeout is a hang guard

    assert result.returncode == 2, result.stdout + result.stderr
    line = _one_error_line(result)
    assert line.startswith(f"error: no Prefect server answers at {dead.url}/api ("), line
    assert reason in line, line
    assert "prefect server start --host 127.0.0.1" in line, line
    if kind == "hangs up":
        assert dead.connections == 1, f"{dead.connections} connections to the Prefect API"


@pytest.mark.slow
@pytest.mark.server
def test_serve_without_api_url_exits_2(workdir):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    result = _cli(["serve", "--interval", "60", "--preset", "quick"], env, workdir, timeout=60)

    assert result.returncode == 2, result.stdout + result.stderr
    line = _one_error_line(result)
    assert "PREFECT_API_URL" in line and "prefect server start --host 127.0.0.1" in line, line


@pytest.mark.slow
@pytest.mark.server
def test_serve_stops_cleanly_on_sigterm(env, workdir, tracking_store, prefect_server):
    # A serve of its own, the module's keeps serving: its scheduled deployment has its own name
    # (the shutdown pauses it) and is an hour apart (no run starts meanwhile).
    with _serving(env, workdir, tracking_store, "sigterm-test", 3600) as process:
        assert process.poll() is None, "serve ended before SIGTERM"
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=90)

    assert process.returncode in (0, 130), f"exit {process.returncode}: {stderr[-2000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "serving mlp-pipeline/sigterm-test (every 3600 s)" in stdout, stdout
    assert "serving mlp-pipeline/on-demand (on request)" in stdout, stdout
    # Stopped through Prefect's shutdown, which pauses the schedules it served.
    assert _deployment(prefect_server, "sigterm-test")["paused"] is True, "schedule not paused"


@pytest.fixture()
def own_prefect_server(tmp_path: Path) -> Iterator[str]:
    """A Prefect server of the test's own, apart from the module's ``serve``."""
    with _prefect_server(tmp_path) as url:
        yield url


@pytest.mark.slow
@pytest.mark.server
def test_prefect_yaml_deploys_to_a_process_pool(
    own_prefect_server, tmp_path, workdir, tracking_store
):
    """``prefect deploy --all`` of prefect.yaml, then a process worker runs the flow."""
    api = own_prefect_server
    env = _client_env(api, tmp_path)
    existing = httpx.post(f"{api}/deployments/filter", json={}, timeout=10).json()
    assert existing == [], f"the deployment names are taken: {[d['name'] for d in existing]}"
    # `{{ $PWD }}` in the pull step is the shell's folder: a subprocess has to set it.
    deploy_env = {**env, "PWD": str(REPO_ROOT)}
    created = subprocess.run(
        [PREFECT, "work-pool", "create", "mlp-pipeline-pool", "--type", "process"],
        env=env, cwd=workdir, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert created.returncode == 0, created.stdout + created.stderr
    deployed = subprocess.run(
        [PREFECT, "--no-prompt", "deploy", "--all"],
        env=deploy_env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    on_demand = _deployment(api, "on-demand")
    assert on_demand["work_pool_name"] == "mlp-pipeline-pool", on_demand
    assert on_demand["entrypoint"] == "flows/pipeline_flow.py:mlp_pipeline", on_demand
    pull = on_demand["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]
    assert pull["directory"] == str(REPO_ROOT), pull
    scheduled = _deployment(api, "scheduled")
    assert scheduled["schedules"][0]["schedule"]["cron"] == "0 2 * * *", scheduled["schedules"]

    config = (
        preset("quick")
        .replace({
            "training.epochs": 1, "execution.workers": 1, "tracking.tracking_uri": tracking_store,
            "tracking.experiment": EXPERIMENT, "tracking.registered_model": None,
            "execution.cache_dir": str(workdir / "worker-cache"),
        })
        .model_dump_json()
    )  # fmt: skip
    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", "mlp-pipeline-pool"],
        env={**env, "PREFECT_WORKER_QUERY_SECONDS": "2"}, cwd=workdir,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        result = subprocess.run(
            [PREFECT, "deployment", "run", "mlp-pipeline/on-demand", "--param",
             f"config={config}", "--watch", "--watch-interval", "2", "--watch-timeout", "150"],
            env=env, cwd=workdir, capture_output=True, text=True, timeout=170,
        )  # fmt: skip
    finally:
        _stop_group(worker)

    assert result.returncode == 0, result.stdout + result.stderr
    flow_run_id = UUID.search(result.stdout)
    assert flow_run_id, result.stdout
    run = _run_of_flow_run(tracking_store, flow_run_id.group(0))
    assert run.info.status == "FINISHED", run.info
    assert run.data.params["execution.cache_dir"] == str(workdir / "worker-cache"), run.data.params


def test_a_triggered_run_takes_no_credentials_in_its_tracking_uri():
    """Prefect stores and shows flow-run parameters: a password there would be in its UI."""
    from types import SimpleNamespace

    from flows.deployments import deployment_config
    from pipeline.errors import ConfigError

    deployment = SimpleNamespace(name="on-demand", parameters={})
    with pytest.raises(ConfigError, match="cannot carry credentials") as info:
        deployment_config(deployment, {"tracking.tracking_uri": "http://alice:s3cret@h:5000"})
    assert "s3cret" not in str(info.value) and "alice" not in str(info.value), info.value
    # Without credentials the same override is taken.
    config = deployment_config(deployment, {"tracking.tracking_uri": "http://h:5000"})
    assert config.tracking.tracking_uri == "http://h:5000", config.tracking
