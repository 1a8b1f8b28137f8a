"""The Prefect flows end to end: real Prefect API, real MLflow SQLite store, real MNIST."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from flows.pipeline_flow import cv_flow, mlp_pipeline

pytestmark = pytest.mark.slow

LAMBDAS = [1e-4, 1e-2]
FOLDS = 2
EPOCHS = 2


@pytest.fixture(scope="module")
def pipeline_run(shared_data_dir, prefect_api_url, tmp_path_factory, small_config):
    """One whole pipeline execution shared by the record checks below."""
    tmp_path = tmp_path_factory.mktemp("pipeline")
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    config = small_config(shared_data_dir, tmp_path, uri)
    summary = mlp_pipeline(config)
    return config, summary, MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def _runs(client: MlflowClient, experiment: str) -> pd.DataFrame:
    exp = client.get_experiment_by_name(experiment)
    return mlflow.search_runs(
        [exp.experiment_id], output_format="pandas", search_all_experiments=False
    )


def test_pipeline_returns_summary(pipeline_run):
    config, summary, _, _ = pipeline_run
    assert summary["best_l2_lambda"] in LAMBDAS, summary
    assert summary["trained_folds"] == len(LAMBDAS) * FOLDS, summary
    assert summary["cached_folds"] == 0, summary
    assert 0.7 < summary["test_accuracy"] <= 1.0, f"test accuracy {summary['test_accuracy']}"
    table = pd.DataFrame(summary["cv_table"])
    best_row = table.loc[table["mean_val_accuracy"].idxmax()]
    assert best_row["l2_lambda"] == summary["best_l2_lambda"], table


def test_mlflow_runs_nest_parent_and_children(pipeline_run):
    config, summary, client, _ = pipeline_run
    exp = client.get_experiment_by_name(config.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    cv_runs = [r for r in runs if r.data.tags.get("stage") == "cv"]
    finals = [r for r in runs if r.data.tags.get("stage") == "final"]
    assert len(parents) == 1, [r.data.tags for r in runs]
    parent = parents[0]
    assert parent.info.run_id == summary["mlflow_run_id"]
    assert len(cv_runs) == len(LAMBDAS) * FOLDS, len(cv_runs)
    assert len(finals) == 1
    for run in [*cv_runs, *finals]:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED", run.info
    assert parent.info.status == "FINISHED"
    assert parent.data.tags.get("prefect.flow_run_id"), parent.data.tags
    pairs = sorted((float(r.data.params["l2_lambda"]), int(r.data.params["fold"])) for r in cv_runs)
    assert pairs == sorted((lam, f) for lam in LAMBDAS for f in range(FOLDS)), pairs


def test_mlflow_params_and_metrics(pipeline_run):
    config, summary, client, _ = pipeline_run
    parent = client.get_run(summary["mlflow_run_id"])
    params = parent.data.params
    missing = set(config.flat()) - set(params)
    assert not missing, f"config params missing from the parent run: {missing}"
    assert params["training.epochs"] == str(EPOCHS)
    assert params["dataset.name"] == "mnist"
    assert len(params["dataset.fingerprint"]) >= 32
    metrics = parent.data.metrics
    assert metrics["best_l2_lambda"] == summary["best_l2_lambda"]
    assert metrics["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    for name in ("cv_best_mean_val_accuracy", "test_loss", "wall_seconds"):
        assert name in metrics, f"parent metric {name} missing: {sorted(metrics)}"
    exp = client.get_experiment_by_name(config.tracking.experiment)
    cv_run = client.search_runs([exp.experiment_id], "tags.stage = 'cv'", max_results=1)[0]
    for name in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        history = client.get_metric_history(cv_run.info.run_id, name)
        assert [m.step for m in history] == list(range(1, EPOCHS + 1)), (name, history)
        assert all(np.isfinite(m.value) for m in history), (name, history)


def test_mlflow_artifacts(pipeline_run, tmp_path):
    _, summary, client, _ = pipeline_run
    run_id = summary["mlflow_run_id"]
    names = {a.path for a in client.list_artifacts(run_id)}
    expected = {
        "cv_results.csv",
        "cv_lambda.png",
        "training_curves.png",
        "confusion_matrix.png",
        "misclassified.png",
        "config.json",
    }
    assert expected <= names, f"missing artifacts: {expected - names}"
    local = Path(client.download_artifacts(run_id, "", str(tmp_path)))
    for png in sorted(local.glob("*.png")):
        image = matplotlib.image.imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, png
    table = pd.read_csv(local / "cv_results.csv")
    assert sorted(table["l2_lambda"]) == LAMBDAS
    assert {"mean_val_accuracy", "std_val_accuracy", "val_accuracy_fold0"} <= set(table.columns)


def test_logged_model_predicts_labels(pipeline_run, shared_data_dir):
    config, summary, _, uri = pipeline_run
    from pipeline.tracking import load_model_for_eval
    from pipeline.training import load_configured_dataset

    dataset = load_configured_dataset(config.data)
    for model_uri in (summary["model_uri"], f"models:/{summary['registered_model']}@champion"):
        model = load_model_for_eval(model_uri, tracking_uri=uri)
        predicted = np.asarray(model.predict(dataset.X_test.astype(np.float32)))
        assert predicted.shape == (dataset.X_test.shape[0],)
        accuracy = float(np.mean(predicted == dataset.y_test))
        assert accuracy == pytest.approx(summary["test_accuracy"]), (model_uri, accuracy)


def test_process_runner_matches_thread_runner(
    shared_data_dir, prefect_api_url, tmp_path, small_config
):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tables = {}
    for runner in ("thread", "process"):
        config = small_config(
            shared_data_dir,
            tmp_path / runner,  # separate caches: both really train
            uri,
            **{"execution.runner": runner, "training.epochs": 1},
        )
        summary = cv_flow(config)
        assert summary["trained_folds"] == len(LAMBDAS) * FOLDS, (runner, summary)
        tables[runner] = pd.DataFrame(summary["cv_table"])
    pd.testing.assert_frame_equal(tables["thread"], tables["process"])


def test_rerun_skips_completed_folds(
    shared_data_dir, prefect_api_url, tmp_path, tracking_uri, small_config
):
    # A first execution that only got through lambda 1e-4 (as if it had been interrupted).
    partial = small_config(
        shared_data_dir, tmp_path, tracking_uri, **{"cv.l2_lambdas": [1e-4], "training.epochs": 1}
    )
    first = cv_flow(partial)
    assert (first["trained_folds"], first["cached_folds"]) == (FOLDS, 0), first

    full = small_config(shared_data_dir, tmp_path, tracking_uri, **{"training.epochs": 1})
    second = cv_flow(full)
    assert (second["trained_folds"], second["cached_folds"]) == (FOLDS, FOLDS), second
    first_rows = pd.DataFrame(first["cv_table"])
    second_rows = pd.DataFrame(second["cv_table"]).query("l2_lambda == 0.0001")
    assert first_rows["mean_val_accuracy"].tolist() == second_rows["mean_val_accuracy"].tolist()

    no_resume = small_config(
        shared_data_dir,
        tmp_path,
        tracking_uri,
        **{"training.epochs": 1, "execution.resume": False},
    )
    third = cv_flow(no_resume)
    assert third["trained_folds"] == len(LAMBDAS) * FOLDS, third
