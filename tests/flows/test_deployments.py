"""Deployments: the helpers of ``flows.deployments``, ``prefect.yaml``, then end to end.

The end-to-end tests share one ``mlp-pipeline serve`` subprocess against the session's Prefect
server, started in the module's folder with relative paths. ``trigger`` runs in this process
(``flows.cli.main``): its runs execute in the serving process's subprocesses. No test stops
the shared ``serve``: the SIGTERM test stops a ``serve`` of its own, and ``prefect deploy`` of
prefect.yaml (which takes the deployment names over) gets a Prefect server of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from mlflow import MlflowClient

from flows import deployments as dep
from pipeline.config import preset
from pipeline.errors import ConfigError, PipelineError

REPO_ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = "deployments-test"
PREFECT = str(Path(sys.executable).with_name("prefect"))
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
SECRET = "s3cret-pa55"


# ------------------------------------------------------------------------------ helpers


def _stored(config) -> SimpleNamespace:
    """A deployment as the API returns it: the two attributes ``deployment_config`` reads."""
    return SimpleNamespace(name="on-demand", parameters=dep.config_parameters(config))


# ------------------------------------------------------------------------------ the API URL


def test_require_api_url_reads_prefects_settings(no_api_anywhere):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with pytest.raises(PipelineError) as failure:
        dep.require_api_url()
    assert "PREFECT_API_URL is not set" in str(failure.value), failure.value
    assert "prefect server start --host 127.0.0.1" in str(failure.value), failure.value

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api/"}):
        assert dep.require_api_url() == "http://127.0.0.1:4200/api", "trailing slash kept"


@pytest.fixture()
def no_api_anywhere(monkeypatch) -> Iterator[None]:
    """No Prefect API in the environment nor in Prefect's settings for the test."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        yield


_REQUIRE_API_URL = "from flows.deployments import require_api_url; print(require_api_url())"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("where", "text", "expected"),
    [
        ("environment", "http://127.0.0.1:7/api/", "http://127.0.0.1:7/api"),
        (
            "profiles.toml",
            'active = "p"\n[profiles.p]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n',
            "http://127.0.0.1:9/api",
        ),
        ("prefect.toml", '[api]\nurl = "http://127.0.0.1:8/api"\n', "http://127.0.0.1:8/api"),
    ],
    ids=["environment", "profile", "prefect.toml"],
)
def test_require_api_url_in_a_fresh_process(tmp_path, where, text, expected):
    """``prefect config set PREFECT_API_URL=...`` (a profile) counts as much as the variable."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(home), PREFECT_PROFILES_PATH=str(home / "profiles.toml"))
    if where == "environment":
        env["PREFECT_API_URL"] = text
    else:
        (home / where if where == "profiles.toml" else work / where).write_text(text)

    done = subprocess.run(
        [sys.executable, "-c", _REQUIRE_API_URL], capture_output=True, text=True, cwd=work,
        env=env, timeout=300, check=False,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == expected, f"{where}: {done.stdout!r}"


def test_full_names():
    assert dep.full_name("on-demand") == "mlp-pipeline/on-demand", "the flow's name added"
    assert dep.full_name("other-flow/x") == "other-flow/x", "a flow/deployment name is kept"


# ------------------------------------------------------------------------------ config, paths


def test_absolute_paths_resolves_relative_stores(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLP_PIPELINE_DATA_DIR", raising=False)
    cfg = preset("quick").replace({"execution.cache_dir": "cache"})

    resolved = dep.absolute_paths(cfg)

    assert resolved.tracking.tracking_uri == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}", (
        resolved.tracking
    )
    assert resolved.execution.cache_dir == str(tmp_path / "cache"), resolved.execution
    assert resolved.data.data_dir == str(tmp_path / "data"), resolved.data
    relative = cfg.replace({"tracking.tracking_uri": "sqlite:///store/m.db"})
    absolute = dep.absolute_paths(relative).tracking.tracking_uri
    assert absolute == f"sqlite:///{tmp_path / 'store' / 'm.db'}", absolute
    for kept in ("sqlite:////abs/m.db", "http://127.0.0.1:5000"):
        same = cfg.replace({"tracking.tracking_uri": kept})
        assert dep.absolute_paths(same).tracking.tracking_uri == kept, kept


def test_deployment_config_applies_overrides_to_the_stored_config(tmp_path):
    stored = _stored(preset("quick").replace({"execution.cache_dir": "/srv/cache"}))

    cfg = dep.deployment_config(stored, {"training.epochs": 2, "data.data_dir": "d"})

    assert cfg.training.epochs == 2 and cfg.data.dataset == "mnist-sample", cfg
    assert cfg.data.data_dir == str(tmp_path / "d"), "a path given now: this folder's"
    assert cfg.execution.cache_dir == "/srv/cache", "a stored path is kept"
    unchanged = preset("quick").replace({"execution.cache_dir": "/srv/cache"})
    assert dep.deployment_config(stored, {}) == unchanged, "no overrides: the stored config"
    with pytest.raises(ConfigError, match="training.epochs"):
        dep.deployment_config(stored, {"training.epochs": 0})
    broken = SimpleNamespace(name="on-demand", parameters={"config": {"training": {"lr": -1}}})
    with pytest.raises(ConfigError, match="deployment 'on-demand' carries an invalid config"):
        dep.deployment_config(broken, {})


@pytest.mark.parametrize(
    "uri",
    [
        f"http://alice:{SECRET}@h:5000",
        f"http://127.0.0.1:5000/?token={SECRET}",
        f"postgresql://alice:{SECRET}@127.0.0.1/db",
    ],
    ids=["userinfo", "token-query", "database-password"],
)
def test_a_triggered_run_takes_no_credentials_in_its_tracking_uri(uri):
    """Prefect stores and shows flow-run parameters: a password there would be in its UI."""
    stored = _stored(preset("quick"))

    with pytest.raises(ConfigError, match="cannot carry credentials") as failure:
        dep.deployment_config(stored, {"tracking.tracking_uri": uri})

    assert SECRET not in str(failure.value) and "alice" not in str(failure.value), failure.value
    assert "MLFLOW_TRACKING_PASSWORD" in str(failure.value), failure.value
    assert "PGPASSWORD" in str(failure.value), failure.value
    taken = dep.deployment_config(stored, {"tracking.tracking_uri": "http://h:5000"})
    assert taken.tracking.tracking_uri == "http://h:5000", taken.tracking


# ------------------------------------------------------------------------------ deployments


def test_build_deployments_carry_the_config():
    cfg = preset("quick")

    served = dep.build_deployments(cfg, name="nightly", cron="0 2 * * *")

    assert [d.name for d in served] == ["nightly", "on-demand"], served
    assert served[0].schedules[0].schedule.cron == "0 2 * * *", served[0].schedules
    assert not served[1].schedules, served[1].schedules
    for deployment in served:
        assert deployment.parameters == {"config": cfg.model_dump(mode="json")}, deployment
        assert deployment.entrypoint == dep.SERVED_ENTRYPOINT, deployment
    assert [d.name for d in dep.build_deployments(cfg)] == ["on-demand"], "no schedule"


def test_the_served_flow_reports_failures_and_crashes():
    """Runs load the deployments' entrypoint: the flow with the hooks, not the bare one."""
    from prefect.flows import load_flow_from_entrypoint

    from flows.pipeline_flow import mlp_pipeline

    served = load_flow_from_entrypoint(dep.SERVED_ENTRYPOINT)

    assert served.name == mlp_pipeline.name, served.name
    assert served.fn is mlp_pipeline.fn, "not the pipeline's flow function"
    assert dep.report_failure in served.on_failure_hooks, served.on_failure_hooks
    assert dep.report_failure in served.on_crashed_hooks, served.on_crashed_hooks


@pytest.mark.parametrize(
    ("how", "value"),
    [
        ("environment", f"postgresql://alice:{SECRET}@127.0.0.1/db"),
        ("toml", f"postgresql://alice:{SECRET}@127.0.0.1/db"),
        ("set", f"http://127.0.0.1:5000/?token={SECRET}"),
    ],
)
def test_serve_refuses_a_tracking_uri_with_credentials(
    cli, dead_endpoint, monkeypatch, tmp_path, how, value, one_error_line
):
    """Whatever its source, a credential would be stored in both deployments' parameters."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api = f"{dead_endpoint('closed').url}/api"
    monkeypatch.setenv("PREFECT_API_URL", api)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = ["serve", "--interval", "60", "--preset", "quick"]
    if how == "environment":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", value)
    elif how == "toml":
        config = tmp_path / "serve.toml"
        config.write_text(f'[tracking]\ntracking_uri = "{value}"\n')
        args += ["--config", str(config)]
    else:
        args += ["--set", f"tracking.tracking_uri={value}"]

    # Prefect's settings context may predate this test's environment: set the API there too.
    with temporary_settings(updates={PREFECT_API_URL: api}):
        code, out, err = cli(args)

    assert code == 2, out + err
    line = one_error_line(err, out)
    assert "cannot carry credentials" in line, line
    assert SECRET not in out + err and "alice" not in out + err, "the credential was printed"


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


def test_describe_schedule():
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule

    cron, on_demand = dep.build_deployments(preset("quick"), cron="0 2 * * *")
    (interval, _) = dep.build_deployments(preset("quick"), interval=3600)

    described = [dep.describe_schedule(d.schedules[0]) for d in (cron, interval)]
    assert described == ["cron 0 2 * * * UTC", "every 3600 s"], described
    paris = CronSchedule(cron="30 6 * * 1", timezone="Europe/Paris")
    described = [dep.describe_schedule(paris), dep.describe_schedule(IntervalSchedule(interval=90))]
    assert described == ["cron 30 6 * * 1 Europe/Paris", "every 90 s"], described


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
        assert getattr(module, function).name == "mlp-pipeline", function
        assert deployment["work_pool"]["name"] == "mlp-pipeline-pool", deployment
        # The stored parameter must validate as the flow's config.
        dep.deployment_config(SimpleNamespace(**deployment), {})
    schedules = deployments["scheduled"]["schedules"]
    assert schedules[0]["cron"] == "0 2 * * *", schedules


# ------------------------------------------------------------------------------ MLflow read-back


def _store_with_experiment(tracking_uri: str) -> MlflowClient:
    client = MlflowClient(tracking_uri=tracking_uri)
    client.create_experiment(EXPERIMENT)
    return client


def test_find_mlflow_run_without_a_run_is_flow_run_failed(tracking_uri):
    config = preset("quick").replace(
        {"tracking.tracking_uri": tracking_uri, "tracking.experiment": EXPERIMENT}
    )
    flow_run_id = "0f77509b-9b29-486e-a1a4-24692f301213"

    with pytest.raises(dep.FlowRunFailed) as no_experiment:
        dep.find_mlflow_run(config, flow_run_id)
    client = _store_with_experiment(tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    client.create_run(experiment, tags={"prefect.flow_run_id": flow_run_id, "stage": "cv"})
    with pytest.raises(dep.FlowRunFailed) as no_parent:
        dep.find_mlflow_run(config, flow_run_id)

    for failure in (no_experiment, no_parent):
        message = str(failure.value)
        assert message == f"no MLflow run of flow run {flow_run_id} in {tracking_uri}", message
        assert failure.value.exit_code == 1, "a run that left no record is a failure"


def test_find_mlflow_run_and_published_from_read_the_parent_back(tracking_uri):
    from pipeline.tracking.publish import Published
    from pipeline.tracking.registry import Registration

    config = preset("quick").replace(
        {"tracking.tracking_uri": tracking_uri, "tracking.experiment": EXPERIMENT}
    )
    client = _store_with_experiment(tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    flow_run_id = "0f77509b-9b29-486e-a1a4-24692f301213"
    tags = {
        "prefect.flow_run_id": flow_run_id, "stage": "pipeline", "registered_model": "mlp-x",
        "registered_model_version": "3", "champion": "true",
        "champion_comparison": "0.9100 beats version 2",
    }  # fmt: skip
    registered = client.create_run(experiment, tags=tags).info.run_id
    plain = client.create_run(experiment, tags={"stage": "pipeline"}).info.run_id

    found = dep.find_mlflow_run(config, flow_run_id)

    assert found.info.run_id == registered, "another run than the flow run's parent"
    published = dep.published_from(found, config)
    registration = Registration("mlp-x", "3", True, "0.9100 beats version 2")
    assert published == Published(registered, tracking_uri, registration), published
    assert dep.published_from(client.get_run(plain), config) == Published(
        plain, tracking_uri, None
    ), "a run without a registration"


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, _empty_store) -> Path:
    """The serving folder: the store at the relative ``sqlite:///mlruns/mlflow.db``."""
    folder = tmp_path_factory.mktemp("deployments")
    (folder / "mlruns").mkdir()
    shutil.copyfile(_empty_store, folder / "mlruns" / "mlflow.db")
    return folder


@pytest.fixture(scope="module")
def tracking_store(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"


def _client_env(api: str) -> dict[str, str]:
    """The environment of a Prefect client process: the API, quiet, fast runner polling."""
    return {
        **os.environ,
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",  # default 10 s: runs would wait for the poll
    }


def _deployment(api: str, name: str) -> dict:
    response = httpx.get(f"{api}/deployments/name/mlp-pipeline/{name}", timeout=10)
    response.raise_for_status()
    return response.json()


def _stop_group(process: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM the process and its children (its own session), SIGKILL what is left; reaped."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # children that outlived their parent
    process.wait(timeout=30)


@contextlib.contextmanager
def _serving(api: str, workdir: Path, name: str, interval: float) -> Iterator[subprocess.Popen]:
    """``mlp-pipeline serve`` of a tiny config in ``workdir``: deployment ``name`` every
    ``interval`` s and ``on-demand``; relative cache and store paths on purpose; its output in
    ``workdir / f"{name}.out"`` and ``.err``. Stopped (its process group) on exit."""
    args = [
        sys.executable, "-m", "flows.cli", "serve", "--name", name, "--interval", f"{interval:g}",
        "--preset", "quick", "--set", "training.epochs=1", "--set", "execution.runner=thread",
        "--set", "execution.workers=1", "--set", "execution.cache_dir=cache",
        "--set", "tracking.tracking_uri=sqlite:///mlruns/mlflow.db",
        "--set", f"tracking.experiment={EXPERIMENT}", "--set", "tracking.registered_model=null",
    ]  # fmt: skip
    with (workdir / f"{name}.out").open("w") as out, (workdir / f"{name}.err").open("w") as err:
        process = subprocess.Popen(
            args, env=_client_env(api), cwd=workdir, stdout=out, stderr=err,
            start_new_session=True,
        )  # fmt: skip
    try:
        # Serving once the runner polls for the runs of its deployments: the server then marks
        # them READY. The scheduled one is this serve's own (on-demand may be another's too).
        deadline = time.monotonic() + 180
        url = f"{api}/deployments/name/mlp-pipeline/{name}"
        while not (
            (response := httpx.get(url, timeout=10)).is_success
            and response.json()["status"] == "READY"
            and httpx.get(f"{api}/deployments/name/mlp-pipeline/on-demand", timeout=10).is_success
        ):
            assert process.poll() is None, (workdir / f"{name}.err").read_text()[-3000:]
            assert time.monotonic() < deadline, f"serve was not serving {name} within 180 s"
            time.sleep(0.5)
        yield process
    finally:
        _stop_group(process)


@pytest.fixture(scope="module")
def serve(prefect_api_url: str, workdir: Path, tracking_store: str) -> Iterator[subprocess.Popen]:
    """The module's ``serve``: ``scheduled`` every hour (no run starts meanwhile), and
    ``on-demand``. No test stops it."""
    with _serving(prefect_api_url, workdir, "scheduled", 3600) as process:
        yield process


def _flow_runs_of(api: str, deployment_id: str) -> set[str]:
    body = {"deployments": {"id": {"any_": [deployment_id]}}, "limit": 200}
    response = httpx.post(f"{api}/flow_runs/filter", json=body, timeout=10)
    response.raise_for_status()
    return {run["id"] for run in response.json()}


@pytest.mark.slow
@pytest.mark.server
def test_serve_registers_both_deployments_with_absolute_paths(serve, prefect_api_url, workdir):
    scheduled = _deployment(prefect_api_url, "scheduled")
    on_demand = _deployment(prefect_api_url, "on-demand")

    interval = scheduled["schedules"][0]["schedule"]["interval"]
    assert interval == 3600, scheduled["schedules"]
    assert on_demand["schedules"] == [], on_demand["schedules"]
    for deployment in (scheduled, on_demand):
        assert deployment["entrypoint"] == dep.SERVED_ENTRYPOINT, deployment
        config = deployment["parameters"]["config"]
        assert config["execution"]["cache_dir"] == str(workdir / "cache"), config["execution"]
        assert config["tracking"]["tracking_uri"] == (
            f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"
        ), config["tracking"]
        assert Path(config["data"]["data_dir"]).is_absolute(), config["data"]
        assert config["training"]["epochs"] == 1, config["training"]


@pytest.mark.slow
@pytest.mark.server
def test_trigger_wait_prints_the_accuracy_the_model_and_the_run(
    serve, cli, prefect_api_url, workdir, tracking_store
):
    code, out, err = cli(
        ["trigger", "--deployment", "on-demand", "--set", "training.epochs=2",
         "--set", "tracking.registered_model=mlp-triggered", "--wait", "--timeout", "600"]
    )  # fmt: skip

    assert code == 0, out + err
    started = re.search(rf"flow run (\S+) \(({UUID.pattern})\) of mlp-pipeline/on-demand", out)
    assert started, out
    assert re.fullmatch(r"mnist-sample-on-demand-[a-z]+-[a-z]+", started.group(1)), started.group(1)
    ui = prefect_api_url.rstrip("/").removesuffix("/api")
    assert f"Prefect UI: {ui}/runs/flow-run/{started.group(2)}" in out, out
    assert "state: Completed" in out, out
    run_id = re.search(r"MLflow run ([0-9a-f]{32})", out)
    accuracy = re.search(r"test accuracy (\d\.\d{4})", out)
    assert run_id and accuracy, out
    run = MlflowClient(tracking_uri=tracking_store).get_run(run_id.group(1))
    assert run.data.tags["prefect.flow_run_id"] == started.group(2), run.data.tags
    assert run.data.params["training.epochs"] == "2", run.data.params
    assert run.data.params["execution.cache_dir"] == str(workdir / "cache"), run.data.params
    printed = float(accuracy.group(1))
    assert run.data.metrics["test_accuracy"] == pytest.approx(printed, abs=1e-4), run.data.metrics
    # The registration, as `run` prints it (the served config registers nothing; the trigger
    # overrides that).
    assert "model mlp-triggered version 1 (new champion)" in out, out
    assert serve.poll() is None, "serve ended"


@pytest.mark.slow
@pytest.mark.server
def test_trigger_wait_on_a_failing_run_exits_1_in_one_line(
    serve, cli, prefect_api_url, tmp_path, workdir, one_error_line
):
    # A run that fails at once: its data folder has no MNIST (and no download).
    empty = tmp_path / "no-data"
    empty.mkdir()

    code, out, err = cli(
        ["trigger", "--set", "data.dataset=mnist", "--set", f"data.data_dir={empty}",
         "--set", "data.download=false", "--wait", "--timeout", "600"]
    )  # fmt: skip

    assert code == 1, out + err
    started = re.search(rf"flow run (\S+) \(({UUID.pattern})\) of mlp-pipeline/on-demand", out)
    assert started, out
    assert re.fullmatch(r"mnist-on-demand-[a-z]+-[a-z]+", started.group(1)), started.group(1)
    name, flow_run_id = started.groups()
    assert "state: Failed" in out, out
    line = one_error_line(err, out)
    assert line.startswith(f"error: flow run {name} ended Failed: "), line
    assert f"not found under {empty}" in line, line
    flow_run = httpx.get(f"{prefect_api_url}/flow_runs/{flow_run_id}", timeout=10).json()
    assert flow_run["state_type"] == "FAILED", flow_run["state_type"]
    assert serve.poll() is None, "serve ended with the failed run"
    # The serve console: one line for the failed run (its hook prints once the state is set).
    console = workdir / "scheduled.err"
    expected = f"error: flow run {name} ended Failed: "
    deadline = time.monotonic() + 60
    while expected not in console.read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    printed = [line for line in console.read_text().splitlines() if name in line]
    assert len(printed) == 1 and printed[0].startswith(expected), console.read_text()[-3000:]
    assert f"not found under {empty}" in printed[0], printed
    assert "Traceback" not in console.read_text(), console.read_text()[-3000:]


@pytest.mark.slow
@pytest.mark.server
def test_prefect_deployment_run_with_a_whole_config(
    serve, prefect_api_url, workdir, tracking_store
):
    config = _deployment(prefect_api_url, "on-demand")["parameters"]["config"]
    config["training"]["epochs"] = 3

    done = subprocess.run(
        [PREFECT, "deployment", "run", "mlp-pipeline/on-demand",
         "--param", f"config={json.dumps(config)}", "--watch", "--watch-interval", "2",
         "--watch-timeout", "500"],
        env=_client_env(prefect_api_url), cwd=workdir, capture_output=True, text=True,
        timeout=600, check=False,
    )  # fmt: skip

    assert done.returncode == 0, done.stdout + done.stderr
    flow_run_id = UUID.search(done.stdout)
    assert flow_run_id, done.stdout
    config = preset("quick").replace(
        {"tracking.tracking_uri": tracking_store, "tracking.experiment": EXPERIMENT}
    )
    run = dep.find_mlflow_run(config, flow_run_id.group(0))
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
def test_trigger_errors_are_one_line(serve, cli, prefect_api_url, args, expected, one_error_line):
    code, out, err = cli(["trigger", *args])

    assert code == 2, out + err
    line = one_error_line(err, out)
    assert expected in line, line


@pytest.mark.slow
@pytest.mark.server
def test_trigger_refuses_credentials_and_starts_no_run(serve, cli, prefect_api_url, one_error_line):
    on_demand = _deployment(prefect_api_url, "on-demand")["id"]
    before = _flow_runs_of(prefect_api_url, on_demand)

    code, out, err = cli(
        ["trigger", "--set", f"tracking.tracking_uri=http://alice:{SECRET}@127.0.0.1:5000"]
    )

    assert code == 2, out + err
    assert "cannot carry credentials" in one_error_line(err, out), err
    assert SECRET not in out + err, "the password was printed"
    assert _flow_runs_of(prefect_api_url, on_demand) == before, "a run was created anyway"


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("closed", "Connection refused"), ("hangs up", "Server disconnected without sending")],
    ids=["closed", "hangs-up"],
)
def test_trigger_without_a_server_fails_fast_in_one_line(
    cli, dead_endpoint, kind, reason, one_error_line
):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    dead = dead_endpoint(kind)
    with temporary_settings(updates={PREFECT_API_URL: f"{dead.url}/api"}):
        code, out, err = cli(["trigger"])

    assert code == 2, out + err
    line = one_error_line(err, out)
    assert line.startswith(f"error: no Prefect server answers at {dead.url}/api ("), line
    assert reason in line, line
    assert "prefect server start --host 127.0.0.1" in line, line
    if kind == "hangs up":  # one health request, not the Prefect client's retries
        assert dead.connections == 1, f"{dead.connections} connections to the Prefect API"


def test_serve_without_an_api_url_exits_2(cli, no_api_anywhere, one_error_line):
    code, out, err = cli(["serve", "--interval", "60", "--preset", "quick"])

    assert code == 2, out + err
    line = one_error_line(err, out)
    assert "PREFECT_API_URL is not set" in line, line
    assert "prefect server start --host 127.0.0.1" in line, line


@pytest.mark.slow
@pytest.mark.server
def test_serve_stops_cleanly_on_sigterm(prefect_api_url, workdir, tracking_store):
    # A serve of its own, the module's keeps serving: its scheduled deployment has its own name
    # (the shutdown pauses it) and is an hour apart (no run starts meanwhile).
    with _serving(prefect_api_url, workdir, "sigterm-test", 3600) as process:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)

    out = (workdir / "sigterm-test.out").read_text()
    err = (workdir / "sigterm-test.err").read_text()
    assert process.returncode in (0, 130), f"exit {process.returncode}: {err[-2000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert "serving mlp-pipeline/sigterm-test (every 3600 s)" in out, out
    assert "serving mlp-pipeline/on-demand (on request)" in out, out
    # Stopped through Prefect's shutdown, which pauses the schedules it served.
    assert _deployment(prefect_api_url, "sigterm-test")["paused"] is True, "schedule not paused"


# ------------------------------------------------------------------------------ prefect.yaml


@pytest.fixture()
def own_prefect_server(tmp_path: Path, monkeypatch) -> Iterator[str]:
    """A Prefect server of the test's own (``flows.server``) with a database of its own, apart
    from the session's server and the module's serve."""
    from flows import server

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "server-home"))
    process, url = server.launch()
    try:
        server.wait_ready(process, url, timeout=180)
        yield url
    finally:
        server.stop(process)


@pytest.mark.slow
@pytest.mark.server
def test_prefect_yaml_deploys_to_a_process_pool(own_prefect_server, tmp_path, tracking_uri):
    """``prefect deploy --all`` of prefect.yaml, then a process worker runs the flow."""
    api = own_prefect_server
    env = {**_client_env(api), "PREFECT_HOME": str(tmp_path / "prefect-home")}
    existing = httpx.post(f"{api}/deployments/filter", json={}, timeout=10).json()
    assert existing == [], f"the deployment names are taken: {[d['name'] for d in existing]}"
    created = subprocess.run(
        [PREFECT, "work-pool", "create", "mlp-pipeline-pool", "--type", "process"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert created.returncode == 0, created.stdout + created.stderr
    # `{{ $PWD }}` in the pull step is the shell's folder: a subprocess has to set it.
    deployed = subprocess.run(
        [PREFECT, "--no-prompt", "deploy", "--all"],
        env={**env, "PWD": str(REPO_ROOT)}, cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    on_demand = _deployment(api, "on-demand")
    assert on_demand["work_pool_name"] == "mlp-pipeline-pool", on_demand
    assert on_demand["entrypoint"] == "flows/deployments.py:served_pipeline", on_demand
    pull = on_demand["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]
    assert pull["directory"] == str(REPO_ROOT), pull
    scheduled = _deployment(api, "scheduled")
    assert scheduled["schedules"][0]["schedule"]["cron"] == "0 2 * * *", scheduled["schedules"]

    # Every path absolute: the run's working folder is the repository.
    config = preset("quick").replace({
        "training.epochs": 1, "execution.workers": 1, "tracking.tracking_uri": tracking_uri,
        "tracking.experiment": EXPERIMENT, "tracking.registered_model": None,
        "execution.cache_dir": str(tmp_path / "worker-cache"),
        "data.data_dir": str(tmp_path / "data"),
    })  # fmt: skip
    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", "mlp-pipeline-pool"],
        env={**env, "PREFECT_WORKER_QUERY_SECONDS": "2"}, cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        done = subprocess.run(
            [PREFECT, "deployment", "run", "mlp-pipeline/on-demand", "--param",
             f"config={config.model_dump_json()}", "--watch", "--watch-interval", "2",
             "--watch-timeout", "500"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
    finally:
        _stop_group(worker)

    assert done.returncode == 0, done.stdout + done.stderr
    flow_run_id = UUID.search(done.stdout)
    assert flow_run_id, done.stdout
    run = dep.find_mlflow_run(config, flow_run_id.group(0))
    assert run.info.status == "FINISHED", run.info
    assert run.data.params["execution.cache_dir"] == str(tmp_path / "worker-cache"), run.data
