"""The pipeline against a real MLflow tracking server over HTTP, artifacts proxied.

One ``mlflow server --serve-artifacts`` per module on 127.0.0.1 (the client never touches the
server's disk, as with a remote server), one real ``mlp-pipeline run`` logged to it through a URI
carrying credentials. The runs, nesting, metrics, artifacts, model and registry must be those
of a local store, and the credentials must show nowhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from mlflow import MlflowClient

from pipeline.data import load_dataset
from pipeline.record import RunRecord

pytestmark = [pytest.mark.slow, pytest.mark.server]

EXPERIMENT = "remote"
SECRET = "s3cr3t-pa55"
USER = "alice"
TRAININGS = 4  # the quick preset: 2 L2 strengths x 2 folds
EPOCHS = 2
REGISTERED = "mlp-mnist-sample"
PARENT_ARTIFACTS = {
    "config.json", "cv_results.csv", "cv_lambda.png", "training_curves.png",
    "confusion_matrix.png", "misclassified.png",
}  # fmt: skip


def _args(uri: str, cache: Path) -> list[str]:
    return [
        "run", "--preset", "quick", "--epochs", str(EPOCHS), "--final-epochs", "3",
        "--tracking-uri", uri, "--experiment", EXPERIMENT, "--no-progress",
        "--set", f"execution.cache_dir={cache}",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def server(mlflow_servers, _empty_store, tmp_path_factory):
    """A fresh ``mlflow server`` with proxied artifacts, stopped by pid after the module."""
    root = tmp_path_factory.mktemp("mlflow-server")
    shutil.copyfile(_empty_store, root / "mlflow.db")  # migrated already: no wait
    started = mlflow_servers(f"sqlite:///{root / 'mlflow.db'}", root, serve_artifacts=True)
    yield started
    started.stop()


@pytest.fixture(scope="module")
def remote(server, prefect_api_url, tmp_path_factory):
    """One real ``mlp-pipeline run`` logged to the server through a URI with credentials."""
    folder = tmp_path_factory.mktemp("remote-run")
    uri = server.url.replace("http://", f"http://{USER}:{SECRET}@")
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env["PREFECT_API_URL"] = prefect_api_url
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", *_args(uri, folder / "cache")],
        cwd=folder,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard
    )
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-3000:]}"
    (record_folder,) = (folder / "cache" / "runs").iterdir()
    record = RunRecord(record_folder)
    client = MlflowClient(tracking_uri=server.url, registry_uri=server.url)
    found = re.search(r"^MLflow run (\w+)$", result.stdout, re.MULTILINE)
    assert found, result.stdout
    return SimpleNamespace(
        result=result, record=record, client=client, parent_id=found.group(1), folder=folder
    )


def _runs(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, f"no experiment {EXPERIMENT!r} on the server"
    return client.search_runs([experiment.experiment_id], max_results=1000)


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    """Every artifact path of a run, recursively."""
    found = set()
    for entry in client.list_artifacts(run_id, path):
        found.add(entry.path)
        if entry.is_dir:
            found |= _artifacts(client, run_id, entry.path)
    return found


def _shape(client: MlflowClient, parent_id: str) -> dict:
    """What a pipeline execution looks like in a store, store-independent: stages, parts,
    params, metric keys and values (wall-clock ones left out), artifacts, the registry.
    """
    parent = client.get_run(parent_id)
    runs = _runs(client)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    varying = {"wall_seconds", "train_seconds"}

    def metrics(run) -> dict[str, float]:
        return {k: v for k, v in run.data.metrics.items() if k not in varying}

    params = dict(parent.data.params)
    params.pop("tracking.tracking_uri")
    params.pop("execution.cache_dir")
    versions = client.search_model_versions(f"run_id = '{parent_id}'")
    return {
        "status": parent.info.status,
        "params": params,
        "metrics": metrics(parent),
        "artifacts": _artifacts(client, parent_id),
        "models": [
            (m.name, str(m.status), m.params)
            for m in client.search_logged_models(experiment_ids=[parent.info.experiment_id])
            if m.source_run_id == parent_id
        ],  # fmt: skip
        "children": {
            r.data.tags["mlp_pipeline.part"]: (
                r.data.tags["stage"],
                r.info.status,
                r.data.params,
                metrics(r),
                {k: len(client.get_metric_history(r.info.run_id, k)) for k in r.data.metrics},
            )
            for r in children
        },  # fmt: skip
        # A SQLite store gives versions as numbers, the REST API as strings.
        "registry": [(v.name, str(v.version), v.tags.get("test_accuracy")) for v in versions],
    }


# ------------------------------------------------------------------------------ the run
def test_the_run_succeeds_and_shows_the_server_without_credentials(remote, server):
    output = remote.result.stdout + remote.result.stderr
    assert SECRET not in output and f"{USER}:" not in output, "a credential was printed"
    assert f"open the MLflow UI: {server.url}" in remote.result.stdout, remote.result.stdout
    assert f"model {REGISTERED} version 1 (new champion)" in remote.result.stdout


def test_runs_nest_on_the_server(remote):
    runs = _runs(remote.client)
    stages = sorted(run.data.tags.get("stage") for run in runs)
    assert stages == ["cv"] * TRAININGS + ["final", "pipeline"], stages
    for run in runs:
        assert run.info.status == "FINISHED", (run.info.run_name, run.info.status)
        if run.data.tags["stage"] == "pipeline":
            assert run.info.run_id == remote.parent_id, run.info.run_id
            assert run.data.tags["mlp_pipeline.record_id"] == remote.record.run()["id"]
        else:
            assert run.data.tags.get("mlflow.parentRunId") == remote.parent_id, run.data.tags


def test_metrics_params_and_artifacts_on_the_server(remote):
    client, parent_id = remote.client, remote.parent_id
    parent = client.get_run(parent_id)
    final, cv = remote.record.final(), remote.record.cv()
    metrics = parent.data.metrics
    assert metrics["test_accuracy"] == final["evaluation"]["accuracy"], metrics
    assert metrics["test_loss"] == pytest.approx(final["evaluation"]["loss"]), metrics
    assert metrics["best_l2_lambda"] == cv["best_l2_lambda"], metrics
    assert {"cv_best_mean_val_accuracy", "wall_seconds"} <= set(metrics), sorted(metrics)
    assert parent.data.params["dataset.name"] == "mnist-sample", parent.data.params
    assert json.loads(parent.data.params["cv.l2_lambdas"]) == [1e-4, 1e-3], parent.data.params
    for run in _runs(client):
        if run.data.tags["stage"] == "cv":
            history = client.get_metric_history(run.info.run_id, "val_accuracy")
            assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), history
        if run.data.tags["stage"] == "final":
            history = client.get_metric_history(run.info.run_id, "train_loss")
            assert sorted(m.step for m in history) == [1, 2, 3], history
            assert run.data.metrics["test_accuracy"] == metrics["test_accuracy"]
    # Proxied artifacts: the run knows an mlflow-artifacts: URI only; the server stores them.
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:"), parent.info.artifact_uri
    names = {path for path in _artifacts(client, parent_id) if "/" not in path}
    assert names >= PARENT_ARTIFACTS, f"missing on the server: {PARENT_ARTIFACTS - names}"
    # The model: a logged model of the parent, its files on the server too.
    (model,) = client.search_logged_models(experiment_ids=[parent.info.experiment_id])
    assert (model.source_run_id, str(model.status)) == (parent_id, "READY"), model
    assert model.artifact_location.startswith("mlflow-artifacts:"), model.artifact_location
    files = {item.path for item in client.list_logged_model_artifacts(model.model_id)}
    assert {"MLmodel", "artifacts"} <= files, files


def test_the_model_loads_with_plain_mlflow_from_the_server(remote, server, monkeypatch):
    import mlflow
    from mlflow.tracking._tracking_service import utils

    # The server from MLflow's environment variable, as a user would set it; both restored.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setattr(utils, "_tracking_uri", None)  # no URI set by an earlier test
    sample = load_dataset("mnist-sample")

    model = mlflow.pyfunc.load_model(f"runs:/{remote.parent_id}/model")
    predicted = np.asarray(model.predict(sample.X_test.astype(np.float32)))

    accuracy = float(np.mean(predicted == sample.y_test))
    assert accuracy == remote.record.final()["evaluation"]["accuracy"], accuracy


def test_the_registry_on_the_server_crowns_the_model_and_evaluate_reads_it(remote, server, cli):
    alias = remote.client.get_model_version_by_alias(REGISTERED, "champion")
    assert (alias.version, alias.run_id) == ("1", remote.parent_id), alias
    evaluation = remote.record.final()["evaluation"]
    assert float(alias.tags["test_accuracy"]) == evaluation["accuracy"], alias.tags
    assert alias.tags["test_set"] == remote.record.final()["test_set"], alias.tags

    code, out, err = cli([
        "evaluate", "--model", f"models:/{REGISTERED}@champion", "--tracking-uri", server.url,
    ])  # fmt: skip

    assert code == 0, f"exit {code}: {err}"
    assert f"test accuracy {evaluation['accuracy']:.4f} (mnist-sample, 1000 test images" in out


def test_the_runs_command_lists_the_remote_run(remote, server, cli):
    code, out, err = cli([
        "runs", "--tracking-uri", server.url, "--experiment", EXPERIMENT, "--format", "json",
    ])  # fmt: skip

    assert code == 0, f"exit {code}: {err}"
    (row,) = json.loads(out)
    assert row["run_id"] == remote.parent_id, row
    assert row["test_accuracy"] == remote.record.final()["evaluation"]["accuracy"], row
    assert (row["status"], row["dataset"], row["folds"]) == ("FINISHED", "mnist-sample", 2), row
    assert row["prefect_flow_run"], row


def test_credentials_in_the_uri_are_redacted_everywhere(remote, server, prefect_api_url):
    def clean(text: str, where: str) -> None:
        assert SECRET not in text and f"{USER}:" not in text, f"a credential in {where}"

    # MLflow: every run's params and tags, the parent's config.json.
    for run in _runs(remote.client):
        clean(json.dumps([run.data.params, run.data.tags]), f"run {run.info.run_name}")
    parent = remote.client.get_run(remote.parent_id)
    assert parent.data.params["tracking.tracking_uri"] == server.url, parent.data.params
    config = remote.client.download_artifacts(remote.parent_id, "config.json", str(remote.folder))
    clean(Path(config).read_text(), "config.json")
    # The run record and the fold cache: every file.
    for path in (remote.folder / "cache").rglob("*"):
        if path.is_file() and path.suffix == ".json":
            clean(path.read_text(), str(path))
    run = remote.record.run()
    assert run["config"]["tracking"]["tracking_uri"] == server.url, run["config"]["tracking"]
    # Prefect: the flow run's parameters.
    flow_run_id = run["prefect_flow_run"]["id"]
    flow_run = httpx.get(f"{prefect_api_url}/flow_runs/{flow_run_id}", timeout=10).json()
    clean(json.dumps(flow_run["parameters"]), "the Prefect flow run's parameters")
    assert flow_run["parameters"]["config"]["tracking"]["tracking_uri"] == server.url


def test_the_server_holds_what_a_local_store_holds(
    remote, tmp_path, tracking_uri, prefect_api_url, cli
):
    # The same run against a local SQLite store: the fold cache reused (the same folds), the
    # final model trained again (the same seed, the same weights).
    cache = tmp_path / "cache"
    shutil.copytree(remote.folder / "cache" / "folds", cache / "folds")

    code, out, err = cli(_args(tracking_uri, cache))

    assert code == 0, f"exit {code}: {err}"
    assert "trainings: 0 run, 4 reused from cache" in out, out
    local = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    found = re.search(r"^MLflow run (\w+)$", out, re.MULTILINE)
    assert found, out
    here, there = _shape(local, found.group(1)), _shape(remote.client, remote.parent_id)
    for key in there:
        assert here[key] == there[key], f"{key} differs:\nlocal  {here[key]}\nserver {there[key]}"
