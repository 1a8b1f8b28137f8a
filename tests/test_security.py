"""Security properties: nothing read back is unpickled, servers bind loopback, no credentials in
what is stored or shown, and paths inside URIs stay paths.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import build_config
from pipeline.record import FoldCache, RecordError, RunRecord, fold_key

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).with_name("mlp-pipeline")
SECRET = "s3cret-Pa55"
CREDENTIALS = f"bob:{SECRET}@"


# ------------------------------------------------------------------------------ helpers
class Armed:
    """Unpickling this creates the folder ``path``: proof that code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (str(self.path),))


def armed_pickle(marker: Path) -> bytes:
    return pickle.dumps(Armed(marker))


def armed_npz(path: Path, marker: Path) -> Path:
    """An ``.npz`` whose weight array holds a pickled object that creates ``marker``."""
    np.savez(path, W0=np.array([Armed(marker)], dtype=object))
    return path


def _one_error_line(code: int, err: str, fragment: str, expected_code: int = 2) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, f"a traceback leaked:\n{err}"
    assert code == expected_code, f"exit code {code}, expected {expected_code}; stderr {err!r}"
    assert len(lines) == 1 and lines[0].startswith("error:"), f"not one error line: {err!r}"
    assert fragment.lower() in lines[0].lower(), f"expected {fragment!r} in {lines[0]!r}"
    return lines[0]


@pytest.fixture(autouse=True)
def _no_inherited_settings(monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "MLP_PIPELINE_DEBUG"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)


def test_the_armed_pickles_do_run_code_when_unpickled(tmp_path):
    """The payloads below are live: unpickled, they create their marker (so the tests can fail)."""
    # Arrange
    first, second = tmp_path / "by-pickle", tmp_path / "by-np-load"

    # Act
    pickle.loads(armed_pickle(first))
    with np.load(armed_npz(tmp_path / "w.npz", second), allow_pickle=True) as npz:
        npz["W0"]

    # Assert
    assert first.is_dir() and second.is_dir(), "the armed payloads did not run their code"


# ------------------------------------------------------------------------------ no unpickling
def _fold_config(tmp_path: Path):
    return build_config(
        overrides={"data.dataset": "mnist-sample", "execution.cache_dir": str(tmp_path / "c")}
    )


def test_a_pickle_in_the_fold_cache_is_refused_without_running_code(tmp_path, caplog):
    # Arrange: a pickle planted where a fold result would be.
    cache = FoldCache(tmp_path / "c")
    key = fold_key(_fold_config(tmp_path), "f" * 64, {"training.l2_lambda": 1e-3}, 0)
    marker = tmp_path / "ran"
    cache.folder.mkdir(parents=True)
    (cache.folder / f"{key}.json").write_bytes(armed_pickle(marker))

    # Act
    with caplog.at_level(logging.WARNING, logger="pipeline.record"):
        found = cache.get(key)

    # Assert
    assert found is None, f"a planted pickle was read as a fold result: {found}"
    assert not marker.exists(), "reading the fold cache ran the pickle's code"
    assert f"{key}.json" in caplog.text, f"the refused entry was not logged: {caplog.text!r}"


def test_cache_and_records_stay_inside_the_cache_folder(tmp_path):
    # Arrange
    config = _fold_config(tmp_path)
    cache_dir = (tmp_path / "c").resolve()

    # Act
    record = RunRecord.create(config, flow="train", dataset={"name": "s", "fingerprint": "f"})
    key = fold_key(config, "../../etc", {"training.l2_lambda": 1.0}, 0)

    # Assert: names the pipeline makes, never from the data.
    assert record.folder.parent == cache_dir / "runs", record.folder
    assert key.startswith("fold-") and key[5:].isalnum(), f"a fold key is a hash: {key}"
    assert (FoldCache(cache_dir).folder / f"{key}.json").parent == cache_dir / "folds"


@pytest.fixture()
def record(tmp_path) -> RunRecord:
    """A finished record without results: enough for ``mlp-pipeline publish``."""
    made = RunRecord.create(
        _fold_config(tmp_path), flow="train", dataset={"name": "mnist-sample", "fingerprint": "f"}
    )
    made.finish("FINISHED")
    return made


@pytest.mark.parametrize("planted", ["run.json", "cv.json", "final.json", "folds/f.json"])
def test_a_pickle_in_a_run_record_is_refused_without_running_code(
    cli, record, tmp_path, tracking_uri, planted
):
    # Arrange
    marker = tmp_path / "ran"
    path = record.folder / planted
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(armed_pickle(marker))

    # Act
    with pytest.raises(RecordError) as info:
        {"run.json": record.run, "cv.json": record.cv, "final.json": record.final,
         "folds/f.json": record.folds}[planted]()  # fmt: skip
    code, out, err = cli(["publish", str(record.folder), "--tracking-uri", tracking_uri])

    # Assert
    assert "unreadable record file" in str(info.value), info.value
    assert not marker.exists(), f"reading {planted} ran the pickle's code"
    assert code != 0 and "Traceback" not in err, f"publish exit {code}: {err!r}"
    assert planted.split("/")[-1] in err, f"the refused file is not named: {err!r}"


def _log_model_files(uri: str, weights: Path, normalizer: Path) -> str:
    """A run holding ``model/artifacts/{weights.npz,normalizer.json}``, as a logged model does."""
    from mlflow import MlflowClient

    from pipeline.tracking.store import artifact_location

    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("security", artifact_location=artifact_location(uri))
    run_id = client.create_run(experiment).info.run_id
    client.log_artifact(run_id, str(weights), "model/artifacts")
    client.log_artifact(run_id, str(normalizer), "model/artifacts")
    return run_id


@pytest.mark.parametrize("planted", ["weights.npz", "normalizer.json"])
def test_a_pickle_in_a_logged_model_is_refused_by_evaluate(cli, tmp_path, tracking_uri, planted):
    # Arrange: a model at runs:/<id>/model whose weights or normalizer file is a live pickle.
    from mlp import MLP

    marker = tmp_path / "ran"
    files = tmp_path / "files"
    files.mkdir()
    weights = MLP(n_features=784, hidden_sizes=[4], n_classes=10, seed=0).save(
        files / "weights.npz"
    )
    normalizer = files / "normalizer.json"
    normalizer.write_text(json.dumps({"method": "scale", "min_std": 1e-3}))
    if planted == "weights.npz":
        armed_npz(weights, marker)
    else:
        normalizer.write_bytes(armed_pickle(marker))
    run_id = _log_model_files(tracking_uri, weights, normalizer)

    # Act
    code, out, err = cli(["evaluate", "--model", f"runs:/{run_id}/model", "--tracking-uri",
                          tracking_uri, "--dataset", "mnist-sample"])  # fmt: skip

    # Assert
    _one_error_line(code, err, f"runs:/{run_id}/model")
    assert not marker.exists(), f"evaluate ran the code pickled in {planted}"


def test_the_package_never_unpickles():
    """No pickle-family module in the package; every ``np.load`` refuses pickles."""
    # Arrange
    forbidden = {"pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal", "torch"}
    found = []

    # Act
    for path in sorted(p for package in ("mlp", "pipeline", "flows")
                       for p in (REPO / package).rglob("*.py")):  # fmt: skip
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            found += [f"{path.name}: import {n}" for n in names if n.split(".")[0] in forbidden]
            if (
                isinstance(node, ast.keyword)
                and node.arg == "allow_pickle"
                and not (isinstance(node.value, ast.Constant) and node.value.value is False)
            ):
                found.append(f"{path.name}:{node.value.lineno}: allow_pickle not False")

    # Assert
    assert not found, f"ways to unpickle in the package: {found}"


def test_prefect_persists_no_task_results():
    """Prefect's result files are pickles: every task of the package disables them."""
    # Arrange
    from prefect.cache_policies import NO_CACHE

    from flows import pipeline_flow, tasks

    steps = [tasks.train_fold_task, pipeline_flow.load_data, pipeline_flow.cv_table_task,
             pipeline_flow.select_candidate_task, pipeline_flow.train_final_task,
             pipeline_flow.evaluate_task]  # fmt: skip

    # Act / Assert
    for task in steps:
        assert task.persist_result is False, f"task {task.name} persists its result"
        assert task.cache_policy is NO_CACHE, f"task {task.name} caches: {task.cache_policy}"
    for flow in (pipeline_flow.mlp_pipeline, pipeline_flow.cv_flow):
        assert flow.persist_result is not True, f"flow {flow.name} persists its result"


# ------------------------------------------------------------------------------ loopback
@pytest.mark.slow
@pytest.mark.server
def test_the_temporary_prefect_server_binds_loopback_only(listening_hosts):
    # Arrange
    from flows import server

    process, url = server.launch()
    try:
        server.wait_ready(process, url, timeout=180)

        # Act: what the kernel says, not the URL.
        hosts = listening_hosts(urllib.parse.urlsplit(url).port)
    finally:
        server.stop(process)

    # Assert
    assert hosts == {"127.0.0.1"}, f"the temporary Prefect server listens on {hosts}"


def test_the_local_dask_cluster_is_configured_for_loopback():
    from flows.runners import _dask_runner
    from pipeline.config import ExecutionConfig

    kwargs = _dask_runner(ExecutionConfig(runner="dask", workers=2), 2).cluster_kwargs

    assert kwargs["host"] == "127.0.0.1", kwargs
    assert kwargs["dashboard_address"].startswith("127.0.0.1:"), kwargs


@pytest.mark.slow
@pytest.mark.server
def test_a_local_dask_cluster_binds_loopback_only(listening_hosts):
    # Arrange
    pytest.importorskip("prefect_dask")
    from flows.runners import task_runner
    from pipeline.config import DataConfig, ExecutionConfig

    execution = ExecutionConfig(runner="dask", workers=1)

    # Act: every server of the cluster: scheduler, dashboard, worker and nanny.
    with task_runner(execution, DataConfig(dataset="mnist-sample")) as runner:
        info = runner.client.scheduler_info()
        addresses = [info["address"]]
        for worker, details in info["workers"].items():
            addresses += [worker, details["nanny"]]
        ports = [urllib.parse.urlsplit(address).port for address in addresses]
        ports.append(info["services"]["dashboard"])
        hosts = {port: listening_hosts(port) for port in ports}

    # Assert
    assert len(ports) == 4, f"expected scheduler, worker, nanny and dashboard: {addresses}"
    assert all(found == {"127.0.0.1"} for found in hosts.values()), f"listening on {hosts}"


# ------------------------------------------------------------------------------ credentials
def test_credentials_in_the_environment_never_reach_deployment_parameters(monkeypatch, tmp_path):
    # Arrange: the store and its credentials in MLFLOW_TRACKING_URI, as `serve` would run.
    from flows.cli import config_from_options
    from flows.deployments import absolute_paths, config_parameters

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://{CREDENTIALS}127.0.0.1:5000")

    # Act
    parameters = config_parameters(absolute_paths(config_from_options(None, None, None)))

    # Assert
    text = json.dumps(parameters)
    assert SECRET not in text and "bob" not in text, f"credentials in parameters: {text}"
    uri = parameters["config"]["tracking"]["tracking_uri"]
    assert uri == "http://127.0.0.1:5000", f"the store itself must stay: {uri}"
    assert os.environ.get("MLFLOW_TRACKING_PASSWORD") == SECRET, "the password was lost"
    assert os.environ.get("MLFLOW_TRACKING_USERNAME") == "bob", "the user name was lost"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 (SQLite, proxied artifacts): (url, its folder)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
               str(port), "--workers", "1", "--backend-store-uri",
               f"sqlite:///{root / 'mlflow.db'}", "--serve-artifacts",
               "--artifacts-destination", str(root / "artifacts")]  # fmt: skip
    with (root / "server.log").open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, (root / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "mlflow server did not start in 240 s"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield url, root
    finally:
        for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(process.pid, sig)  # its own session: the group id is its pid
                process.wait(timeout=grace)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


def _texts(value) -> str:
    return json.dumps(value, default=str)


@pytest.mark.slow
@pytest.mark.server
def test_credentials_in_the_environment_never_reach_the_record_or_mlflow(
    cli, mlflow_server, monkeypatch, tmp_path
):
    # Arrange: a store with credentials, given the way CI gives them: in the environment.
    import mlflow
    from mlflow import MlflowClient

    url, server_root = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url.replace("http://", f"http://{CREDENTIALS}"))

    # Act
    code, out, err = cli(["train", "--preset", "quick", "--final-epochs", "1", "--no-progress"])

    # Assert: it ran, and printed no secret.
    assert code == 0, f"train exit {code}: {err}"
    assert SECRET not in out + err, f"the password was printed:\n{out}{err}"
    # The run record: every file of it.
    (folder,) = (tmp_path / ".mlp-pipeline" / "runs").iterdir()
    leaks = [p.name for p in folder.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaks, f"the password is in record files {leaks}"
    run = json.loads((folder / "run.json").read_text())["data"]
    assert "bob" not in _texts(run["config"]), f"credentials in run.json: {run['config']}"
    # MLflow: params, tags, metrics keys of every run, config.json, the registered version.
    client = MlflowClient(tracking_uri=url, registry_uri=url)
    experiment = client.get_experiment_by_name("mlp-pipeline")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) >= 2, f"expected the parent and the final run, got {len(runs)}"
    for found in runs:
        stored = _texts([found.data.params, found.data.tags, found.info.run_name])
        assert SECRET not in stored and "bob:" not in stored, f"credentials in run {found.info}"
    parent = next(r for r in runs if r.data.tags.get("stage") == "pipeline")
    config_json = Path(
        mlflow.artifacts.download_artifacts(
            run_id=parent.info.run_id, artifact_path="config.json", dst_path=str(tmp_path),
            tracking_uri=url,
        )
    )  # fmt: skip
    assert "bob" not in config_json.read_text(), config_json.read_text()
    versions = client.search_model_versions("name = 'mlp-mnist-sample'")
    assert versions and all(
        SECRET not in _texts([v.tags, v.source, v.description]) for v in versions
    ), versions
    # And nowhere in the server's own store: its database and its artifacts.
    files = [p for p in server_root.rglob("*") if p.is_file() and p.name != "server.log"]
    stored = [p.name for p in files if SECRET.encode() in p.read_bytes()]
    assert not stored, f"the password reached the MLflow server's files: {stored}"


# ------------------------------------------------------------------------------ paths in URIs
@pytest.mark.slow
@pytest.mark.parametrize("name", ["exp?v2", "a#b", "a%20b"])
def test_a_project_folder_with_uri_characters_keeps_its_store_inside(tmp_path, name):
    # Arrange: a project folder whose name means something in a URI.
    project = tmp_path / name
    project.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}

    # Act
    done = subprocess.run(
        [str(CLI), "train", "--preset", "quick", "--final-epochs", "1", "--no-progress"],
        cwd=project, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip

    # Assert
    assert done.returncode == 0, f"train exit {done.returncode}: {done.stderr}"
    # MLflow 3.17 makes the parent folders of a sqlite path as written in the URI, before it
    # decodes it (mlflow/store/db/utils.py): an empty, encoded twin of the folder. No file.
    outside = sorted(
        str(path.relative_to(tmp_path))
        for path in tmp_path.rglob("*")
        if not path.is_relative_to(project) and not path.is_dir()
    )
    assert not outside, f"train wrote {outside} outside the project folder {name!r}"
    assert (project / "mlruns" / "mlflow.db").is_file(), "no store in the project folder"
