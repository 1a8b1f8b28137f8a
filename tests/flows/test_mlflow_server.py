"""The pipeline against a real MLflow tracking server over HTTP (remote logging).

One ``mlflow server`` per module on a free port of 127.0.0.1, SQLite backend and proxied
artifacts (``--serve-artifacts --artifacts-destination``: the client never touches the server's
disk, as with a remote server), then one real pipeline execution logged to it over HTTP.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from flows.pipeline_flow import mlp_pipeline
from pipeline.cli import main
from pipeline.config import build_config

pytestmark = [pytest.mark.slow, pytest.mark.server]

EXPERIMENT = "test-remote"
LAMBDAS = [1e-4, 1e-2]
FOLDS = 2
EPOCHS = 2
STARTUP_TIMEOUT = 120.0  # about 17 s on 2 idle cores; much more while other suites run


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group (uvicorn and its worker), SIGKILL if it lingers."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)  # its own session: the group id is its PID
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> str:
    """``http://127.0.0.1:<port>`` of a fresh MLflow server, stopped after the module."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    # No background job runner: 17 s and 570 MB instead of 23 s and 3 GB (STACK-NOTES).
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--serve-artifacts", "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    log = (root / "server.log").open("wb")
    process = subprocess.Popen(
        command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not _healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = (root / "server.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"mlflow server did not become healthy at {url}:\n{tail}")
            time.sleep(0.5)
        yield url
    finally:
        _stop(process)
        log.close()


@pytest.fixture(scope="module")
def remote_run(mlflow_server, shared_data_dir, prefect_api_url, tmp_path_factory):
    """One small real pipeline execution logged to the server over HTTP."""
    tmp_path = tmp_path_factory.mktemp("remote-pipeline")
    config = build_config(
        overrides={
            "data.dataset": "mnist",
            "data.data_dir": str(shared_data_dir),
            "data.download": False,
            "data.limit_train": 2000,
            "data.limit_test": 500,
            "model.hidden_sizes": [32],
            "training.epochs": EPOCHS,
            "training.final_epochs": 3,
            "cv.l2_lambdas": LAMBDAS,
            "cv.folds": FOLDS,
            "execution.runner": "thread",
            "execution.workers": 2,
            "execution.cache_dir": str(tmp_path / "cache"),
            "tracking.tracking_uri": mlflow_server,
            "tracking.experiment": EXPERIMENT,
        }
    )
    summary = mlp_pipeline(config)
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    return config, summary, client


def test_runs_nest_on_the_server(remote_run):
    _, summary, client = remote_run
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, "the experiment was not created on the server"
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    by_stage: dict[str, list] = {}
    for run in runs:
        by_stage.setdefault(run.data.tags.get("stage"), []).append(run)
    assert [r.info.run_id for r in by_stage["pipeline"]] == [summary["mlflow_run_id"]], by_stage
    assert len(by_stage["cv"]) == len(LAMBDAS) * FOLDS, len(by_stage["cv"])
    assert len(by_stage["final"]) == 1, by_stage.keys()
    for run in runs:
        assert run.info.status == "FINISHED", (run.info.run_name, run.info.status)
        if run.data.tags["stage"] != "pipeline":
            parent = run.data.tags.get("mlflow.parentRunId")
            assert parent == summary["mlflow_run_id"], (run.info.run_name, parent)


def test_metrics_and_artifacts_on_the_server(remote_run):
    _, summary, client = remote_run
    parent = client.get_run(summary["mlflow_run_id"])
    metrics = parent.data.metrics
    assert metrics["test_accuracy"] == pytest.approx(summary["test_accuracy"]), metrics
    assert metrics["best_l2_lambda"] == summary["best_l2_lambda"], metrics
    assert "cv_best_mean_val_accuracy" in metrics, sorted(metrics)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    cv_run = client.search_runs([experiment.experiment_id], "tags.stage = 'cv'", max_results=1)[0]
    history = client.get_metric_history(cv_run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == list(range(1, EPOCHS + 1)), history
    # Proxied artifacts: the run only knows an mlflow-artifacts: URI, the server stores them.
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:"), parent.info.artifact_uri
    names = {artifact.path for artifact in client.list_artifacts(summary["mlflow_run_id"])}
    expected = {"config.json", "cv_results.csv", "cv_lambda.png", "training_curves.png"}
    assert expected <= names, f"missing artifacts on the server: {expected - names}"


def test_runs_command_lists_the_remote_run(remote_run, mlflow_server, capsys):
    _, summary, _ = remote_run
    try:
        main(["runs", "--tracking-uri", mlflow_server, "--experiment", EXPERIMENT,
              "--format", "json"])  # fmt: skip
    except SystemExit as exc:  # main() exits only on failure
        pytest.fail(f"mlp-pipeline runs exited {exc.code}: {capsys.readouterr().err}")
    rows = json.loads(capsys.readouterr().out)
    assert [row["run_id"] for row in rows] == [summary["mlflow_run_id"]], rows
    row = rows[0]
    assert row["test_accuracy"] == pytest.approx(summary["test_accuracy"]), row
    assert row["best_lambda"] == summary["best_l2_lambda"], row
    assert (row["status"], row["dataset"], row["folds"]) == ("FINISHED", "mnist", FOLDS), row
    assert row["l2_lambdas"] == LAMBDAS and row["hidden_sizes"] == [32], row
    assert row["prefect_flow_run"], row


def test_champion_loads_through_the_server(remote_run, mlflow_server):
    from pipeline.tracking import load_model_for_eval
    from pipeline.training import load_configured_dataset

    config, summary, client = remote_run
    assert summary["champion"] is True, summary
    alias = client.get_model_version_by_alias(summary["registered_model"], "champion")
    assert alias.version == summary["registered_version"], alias
    model = load_model_for_eval(
        f"models:/{summary['registered_model']}@champion", tracking_uri=mlflow_server
    )
    dataset = load_configured_dataset(config.data)
    predicted = np.asarray(model.predict(dataset.X_test.astype(np.float32)))
    accuracy = float(np.mean(predicted == dataset.y_test))
    assert accuracy == pytest.approx(summary["test_accuracy"]), (accuracy, summary)
