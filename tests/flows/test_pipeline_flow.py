"""The flows ``mlp-pipeline`` and ``cv`` end to end: the session Prefect server, a real MLflow
SQLite store, the bundled ``mnist-sample`` (and once real MNIST).

One ``mlp-pipeline`` run is shared by the checks of what a run leaves behind (the summary, the
run record, MLflow, the model, Prefect's task runs). The cache tests start from a copy of its
fold cache, so each reads the same trainings and none depends on another's order.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from flows.pipeline_flow import cv_flow, mlp_pipeline
from pipeline.config import PipelineConfig
from pipeline.record import RunRecord, read_json
from pipeline.results import FoldResult
from pipeline.tracking.model import logged_model

pytestmark = pytest.mark.slow

LAMBDAS = [1e-4, 1e-2]
FOLDS = 2
EPOCHS = 2
FOLD_FILES = {f"lambda={l2!r}-fold={fold}.json" for l2 in LAMBDAS for fold in range(FOLDS)}
TASK_RUN_NAMES = {
    f"train_fold lambda={l2:g} fold={fold}" for l2 in LAMBDAS for fold in range(FOLDS)
}
FIGURES = {"cv_lambda.png", "training_curves.png", "confusion_matrix.png", "misclassified.png"}


# ------------------------------------------------------------------------------ helpers


class _TaskRunNames(logging.Handler):
    """The names of the task runs whose engine logged in this process (Prefect's own name)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.names: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        name = getattr(record, "task_run_name", None)
        if name:
            self.names.add(name)


def _files(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*") if path.is_file()} if folder.exists() else set()


@dataclass
class Run:
    """The module's ``mlp-pipeline`` run and what it left behind."""

    config: PipelineConfig
    summary: dict[str, Any]
    record: RunRecord
    tracking_uri: str
    client: MlflowClient
    folder: Path
    task_run_names: set[str]
    prefect_storage_written: set[Path]

    @property
    def cache(self) -> Path:
        return Path(self.config.execution.cache_dir)

    @property
    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.summary["cv_table"])

    def parent_id(self) -> str:
        return self.summary["published"].run_id


def _store(folder: Path, empty_store: Path) -> str:
    """A fresh MLflow store in ``folder``: a copy of the session's empty one."""
    database = folder / "mlruns" / "mlflow.db"
    database.parent.mkdir(parents=True)
    shutil.copyfile(empty_store, database)
    return f"sqlite:///{database}"


@pytest.fixture(scope="module")
def pipeline_run(prefect_api_url, tmp_path_factory, _empty_store, sample_flow_config) -> Run:
    """One ``mlp-pipeline`` run on the thread runner, shared by the record checks below."""
    from prefect.settings import get_current_settings

    folder = tmp_path_factory.mktemp("pipeline")
    uri = _store(folder, _empty_store)
    config = sample_flow_config(folder / "cache", uri)
    storage = Path(get_current_settings().results.local_storage_path)
    storage_before = {(path, path.stat().st_mtime_ns) for path in _files(storage)}
    names = _TaskRunNames()
    task_logger = logging.getLogger("prefect.task_runs")
    task_logger.addHandler(names)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(folder)  # a default that would land in the working folder lands here
            summary = mlp_pipeline(config)
    finally:
        task_logger.removeHandler(names)
    storage_after = {(path, path.stat().st_mtime_ns) for path in _files(storage)}
    written = {path for path, _ in storage_after - storage_before}
    return Run(
        config=config,
        summary=summary,
        record=RunRecord(summary["record"]),
        tracking_uri=uri,
        client=MlflowClient(tracking_uri=uri, registry_uri=uri),
        folder=folder,
        task_run_names=names.names,
        prefect_storage_written=written,
    )


def _copy_fold_cache(run: Run, tmp_path: Path) -> Path:
    """A cache folder holding a copy of the module run's fold cache (no run records)."""
    cache = tmp_path / "cache"
    shutil.copytree(run.cache / "folds", cache / "folds")
    return cache


def _cache_entries(cache: Path) -> list[Path]:
    return sorted((cache / "folds").glob("*.json"))


# ------------------------------------------------------------------------------ the summary


def test_the_summary_holds_the_cv_table_the_choice_and_the_test_accuracy(pipeline_run):
    summary, table = pipeline_run.summary, pipeline_run.table

    assert sorted(table["l2_lambda"]) == LAMBDAS, table
    assert (table["n_folds"] == FOLDS).all(), table
    assert (table["diverged_folds"] == 0).all(), table
    best_row = table.loc[table["mean_val_accuracy"].idxmax()]
    assert summary["best_l2_lambda"] == best_row["l2_lambda"], (summary["best_l2_lambda"], table)
    assert (summary["trained_folds"], summary["cached_folds"]) == (len(FOLD_FILES), 0), summary
    assert summary["worker_restarts"] == 0, summary
    assert 0.7 < summary["test_accuracy"] <= 1.0, f"test accuracy {summary['test_accuracy']}"
    assert math.isfinite(summary["test_loss"]) and summary["test_loss"] > 0, summary
    assert summary["wall_seconds"] > 0, summary
    assert Path(summary["record"]).parent == pipeline_run.cache.resolve() / "runs", summary
    assert summary["published"] is not None, "the summary names no MLflow run"


# ------------------------------------------------------------------------------ the run record


def test_the_run_record_holds_every_result(pipeline_run):
    record, summary, config = pipeline_run.record, pipeline_run.summary, pipeline_run.config

    run = record.run()
    assert run["status"] == "FINISHED", run
    assert run["flow"] == "mlp-pipeline", run
    assert run["config"] == config.model_dump(mode="json"), "run.json does not hold the config"
    assert run["dataset"]["name"] == "mnist-sample", run["dataset"]
    assert run["prefect_flow_run"]["id"], run["prefect_flow_run"]
    assert run["end_time"] >= run["start_time"], run
    assert run["summary"]["best_l2_lambda"] == summary["best_l2_lambda"], run["summary"]
    assert run["summary"]["test_accuracy"] == summary["test_accuracy"], run["summary"]

    names = {path.name for path in (record.folder / "folds").iterdir()}
    assert names == FOLD_FILES, f"one fold file per (lambda, fold): {sorted(names)}"
    folds = record.folds()
    assert all(isinstance(fold, FoldResult) for fold in folds), folds
    for row in summary["cv_table"]:
        accuracies = [f.val_accuracy for f in folds if f.l2_lambda == row["l2_lambda"]]
        assert np.mean(accuracies) == pytest.approx(row["mean_val_accuracy"]), (row, accuracies)
    assert all(len(f.history["epoch"]) == EPOCHS for f in folds), "a fold lost epochs"

    cv = record.cv()
    assert cv is not None, "no cv.json"
    assert cv["best_l2_lambda"] == summary["best_l2_lambda"], cv
    pd.testing.assert_frame_equal(cv["table"], pipeline_run.table)

    final = record.final()  # its files are checked against their checksums
    assert final is not None, "no final.json"
    assert final["l2_lambda"] == summary["best_l2_lambda"], final["l2_lambda"]
    assert final["evaluation"]["accuracy"] == summary["test_accuracy"], final["evaluation"]
    assert final["evaluation"]["n_samples"] == 1000, final["evaluation"]
    assert len(final["history"]["epoch"]) == config.training.resolved_final_epochs, final
    assert {"final/weights.npz", "final/normalizer.json"} <= set(final["files"]), final["files"]
    with np.load(record.folder / "final" / "weights.npz", allow_pickle=False) as weights:
        assert weights.files, "an empty weights file"
    json.loads((record.folder / "final" / "normalizer.json").read_text(encoding="utf-8"))
    for figure in FIGURES:
        image = matplotlib.image.imread(record.folder / figure)
        assert image.ndim == 3 and min(image.shape[:2]) > 100, (figure, image.shape)


# ------------------------------------------------------------------------------ MLflow


def _runs_by_stage(run: Run) -> dict[str, list]:
    experiment = run.client.get_experiment_by_name(run.config.tracking.experiment)
    found = run.client.search_runs([experiment.experiment_id], max_results=1000)
    stages: dict[str, list] = {}
    for mlflow_run in found:
        stages.setdefault(mlflow_run.data.tags.get("stage", ""), []).append(mlflow_run)
    return stages


def test_mlflow_holds_the_parent_and_one_child_per_training(pipeline_run):
    stages = _runs_by_stage(pipeline_run)
    record = pipeline_run.record.run()

    assert len(stages.get("pipeline", [])) == 1, {k: len(v) for k, v in stages.items()}
    parent = stages["pipeline"][0]
    assert parent.info.run_id == pipeline_run.parent_id(), "the summary names another run"
    assert parent.info.status == "FINISHED", parent.info
    assert parent.data.tags["mlp_pipeline.record_id"] == record["id"], parent.data.tags
    assert parent.data.tags["prefect.flow_run_id"] == record["prefect_flow_run"]["id"], (
        "the parent names another Prefect flow run than the record"
    )
    assert parent.data.tags["model_uri"] == f"runs:/{parent.info.run_id}/model", parent.data.tags
    cv_runs, finals = stages.get("cv", []), stages.get("final", [])
    assert len(cv_runs) == len(FOLD_FILES), f"{len(cv_runs)} cv children"
    assert len(finals) == 1, f"{len(finals)} final children"
    for child in [*cv_runs, *finals]:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id, child.data.tags
        assert child.info.status == "FINISHED", child.info
    pairs = sorted((float(r.data.params["l2_lambda"]), int(r.data.params["fold"])) for r in cv_runs)
    assert pairs == [(l2, fold) for l2 in LAMBDAS for fold in range(FOLDS)], pairs
    final = finals[0]
    assert final.data.metrics["test_accuracy"] == pytest.approx(
        pipeline_run.summary["test_accuracy"]
    ), final.data.metrics
    assert float(final.data.params["l2_lambda"]) == pipeline_run.summary["best_l2_lambda"], (
        final.data.params
    )
    final_epochs = pipeline_run.config.training.resolved_final_epochs
    for child, epochs in [(cv_runs[0], EPOCHS), (final, final_epochs)]:
        for name in ("train_loss", "train_accuracy"):
            history = pipeline_run.client.get_metric_history(child.info.run_id, name)
            assert [m.step for m in history] == list(range(1, epochs + 1)), (name, history)
            assert all(np.isfinite(m.value) for m in history), (name, history)
    history = pipeline_run.client.get_metric_history(cv_runs[0].info.run_id, "val_accuracy")
    assert [m.step for m in history] == list(range(1, EPOCHS + 1)), history


def test_the_parent_run_holds_the_config_the_summary_and_the_artifacts(pipeline_run, tmp_path):
    client, summary, config = pipeline_run.client, pipeline_run.summary, pipeline_run.config
    parent = client.get_run(pipeline_run.parent_id())

    params = parent.data.params
    missing = set(config.flat()) - set(params)
    assert not missing, f"config params missing from the parent run: {missing}"
    assert params["training.epochs"] == str(EPOCHS), params
    assert params["dataset.name"] == "mnist-sample", params
    assert len(params["dataset.fingerprint"]) >= 32, params
    metrics = parent.data.metrics
    assert metrics["best_l2_lambda"] == summary["best_l2_lambda"], metrics
    assert metrics["test_accuracy"] == pytest.approx(summary["test_accuracy"]), metrics
    best = pipeline_run.table.set_index("l2_lambda").loc[summary["best_l2_lambda"]]
    assert metrics["cv_best_mean_val_accuracy"] == pytest.approx(best["mean_val_accuracy"]), metrics
    for name in ("test_loss", "wall_seconds"):
        assert name in metrics, f"parent metric {name} missing: {sorted(metrics)}"

    names = {artifact.path for artifact in client.list_artifacts(parent.info.run_id)}
    expected = {"cv_results.csv", "config.json", *FIGURES}
    assert expected <= names, f"missing artifacts: {expected - names}"
    assert [o.model_id for o in parent.outputs.model_outputs] == [
        logged_model(client, parent).model_id
    ], "the model is not the parent's logged model"
    local = Path(client.download_artifacts(parent.info.run_id, "cv_results.csv", str(tmp_path)))
    table = pd.read_csv(local)
    assert sorted(table["l2_lambda"]) == LAMBDAS, table
    columns = {"mean_val_accuracy", "std_val_accuracy", "val_accuracy_fold0"}
    assert columns <= set(table.columns), f"cv_results.csv columns: {list(table.columns)}"


_LOAD_WITH_PLAIN_MLFLOW = textwrap.dedent(
    """
    import json, sys
    import mlflow, numpy as np

    tracking_uri, model_uri, test_set = sys.argv[1:]
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(model_uri)
    with np.load(test_set) as data:
        predicted = np.asarray(model.predict(data["X"].astype(np.float32)))
        print(json.dumps({"shape": list(predicted.shape),
                          "accuracy": float(np.mean(predicted == data["y"]))}))
    """
)


def test_the_model_on_the_parent_run_loads_with_plain_mlflow(pipeline_run, tmp_path):
    """``runs:/<parent>/model`` and the champion alias are an MLflow pyfunc model that predicts
    the test labels; loaded in a fresh interpreter (a pyfunc model runs its own code)."""
    from pipeline.training import load_configured_dataset

    dataset = load_configured_dataset(pipeline_run.config.data)
    np.savez(tmp_path / "test.npz", X=dataset.X_test, y=dataset.y_test)
    script = tmp_path / "load.py"
    script.write_text(_LOAD_WITH_PLAIN_MLFLOW)
    registration = pipeline_run.summary["published"].registration
    assert registration is not None, "the model was not registered"
    assert (registration.name, registration.champion) == ("mlp-mnist-sample", True), registration

    for model_uri in (
        f"runs:/{pipeline_run.parent_id()}/model",
        f"models:/{registration.name}@champion",
    ):
        done = subprocess.run(
            [sys.executable, str(script), pipeline_run.tracking_uri, model_uri,
             str(tmp_path / "test.npz")],
            capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False,
        )  # fmt: skip

        assert done.returncode == 0, f"{model_uri}: {done.stderr[-3000:]}"
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["shape"] == [len(dataset.y_test)], (model_uri, result)
        assert result["accuracy"] == pytest.approx(pipeline_run.summary["test_accuracy"]), (
            model_uri,
            result,
        )


def test_the_model_weights_are_read_without_running_model_code(pipeline_run):
    from pipeline.tracking.model import accuracy, load_network
    from pipeline.training import load_configured_dataset

    dataset = load_configured_dataset(pipeline_run.config.data)
    network, normalizer, trained_on = load_network(
        f"runs:/{pipeline_run.parent_id()}/model", pipeline_run.tracking_uri
    )

    assert trained_on == ("mnist-sample", None), trained_on
    score = accuracy(network, normalizer, dataset.X_test, dataset.y_test)
    assert score == pytest.approx(pipeline_run.summary["test_accuracy"]), score


# ------------------------------------------------------------------------------ Prefect


def test_the_flow_run_shows_its_progress_cv_table_and_summary_as_artifacts(pipeline_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    flow_run_id = pipeline_run.record.run()["prefect_flow_run"]["id"]
    wanted = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    with get_client(sync_client=True) as client:
        artifacts = {a.key: a for a in client.read_artifacts(artifact_filter=wanted)}

    assert set(artifacts) == {"cv-progress", "cv-table", "run-summary"}, sorted(artifacts)
    assert artifacts["cv-progress"].data == 100.0, artifacts["cv-progress"].data
    table = artifacts["cv-table"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert [row["l2_lambda"] for row in rows] == pipeline_run.config.cv.l2_lambdas, rows
    assert all("val_accuracy_fold0" not in row for row in rows), rows[0]
    summary = artifacts["run-summary"].data
    summary_ = pipeline_run.summary
    assert f"| test accuracy | {summary_['test_accuracy']:.4f} |" in summary, summary
    assert summary_["published"].run_id in summary and "mlflow ui" in summary, summary
    assert "version" in summary and "lambda=" in summary, summary


def test_task_runs_are_named_in_ascii(pipeline_run):
    trainings = {name for name in pipeline_run.task_run_names if name.startswith("train_fold")}

    assert trainings == TASK_RUN_NAMES, f"task run names: {sorted(trainings)}"
    assert all(name.isascii() for name in pipeline_run.task_run_names), pipeline_run.task_run_names


# ------------------------------------------------------------------------------ no pickle


def _pickle_like(path: Path) -> str | None:
    """Why ``path`` looks like a pickle or a Prefect result file, or None."""
    content = path.read_bytes()
    if len(content) >= 2 and content[0] == 0x80 and 2 <= content[1] <= 5:
        return "starts with a pickle protocol header"
    if path.suffix == ".json":
        data = json.loads(content)
        if isinstance(data, dict) and "serializer" in data:
            return "a Prefect result file (serializer)"
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as arrays:
            for name in arrays.files:
                arrays[name]  # an object array (pickled) raises here
    return None


def test_nothing_pickled_is_written(pipeline_run):
    written = _files(pipeline_run.cache)

    assert written, "the run wrote nothing under its cache folder"
    suffixes = {path.suffix for path in written}
    assert suffixes <= {".json", ".npz", ".png"}, f"unexpected files: {sorted(suffixes)}"
    pickled = {str(path): why for path in written if (why := _pickle_like(path))}
    assert not pickled, f"pickled files under the cache folder: {pickled}"
    assert {p.name for p in pipeline_run.cache.iterdir()} == {"runs", "folds"}, "other folders"
    assert not pipeline_run.prefect_storage_written, (
        f"Prefect persisted results: {sorted(map(str, pipeline_run.prefect_storage_written))}"
    )


# ------------------------------------------------------------------------------ the fold cache


def test_a_second_run_reuses_every_fold_and_gives_the_same_results(
    pipeline_run, prefect_api_url, tmp_path, tracking_uri, sample_flow_config
):
    cache = _copy_fold_cache(pipeline_run, tmp_path)
    config = sample_flow_config(cache, tracking_uri)

    summary = mlp_pipeline(config)

    assert (summary["trained_folds"], summary["cached_folds"]) == (0, len(FOLD_FILES)), summary
    pd.testing.assert_frame_equal(pd.DataFrame(summary["cv_table"]), pipeline_run.table)
    assert summary["best_l2_lambda"] == pipeline_run.summary["best_l2_lambda"], summary
    assert summary["test_accuracy"] == pipeline_run.summary["test_accuracy"], summary
    record = RunRecord(summary["record"])
    assert {p.name for p in (record.folder / "folds").iterdir()} == FOLD_FILES, "cached folds"
    children = MlflowClient(tracking_uri=tracking_uri).search_runs(
        [_experiment_id(tracking_uri, config)], "tags.stage = 'cv'"
    )
    assert len(children) == len(FOLD_FILES), "a reused fold is published like a trained one"


def _experiment_id(tracking_uri: str, config: PipelineConfig) -> str:
    client = MlflowClient(tracking_uri=tracking_uri)
    return client.get_experiment_by_name(config.tracking.experiment).experiment_id


def test_the_cv_flow_without_resume_retrains_and_records_no_final_model(
    pipeline_run, prefect_api_url, tmp_path, tracking_uri, sample_flow_config
):
    cache = _copy_fold_cache(pipeline_run, tmp_path)
    config = sample_flow_config(cache, tracking_uri, **{"execution.resume": False})

    summary = cv_flow(config)

    assert (summary["trained_folds"], summary["cached_folds"]) == (len(FOLD_FILES), 0), summary
    pd.testing.assert_frame_equal(pd.DataFrame(summary["cv_table"]), pipeline_run.table)
    assert "test_accuracy" not in summary, summary
    record = RunRecord(summary["record"])
    assert (record.run()["flow"], record.run()["status"]) == ("cv", "FINISHED"), record.run()
    assert record.cv() is not None and record.final() is None, "cv flow: a table, no model"
    client = MlflowClient(tracking_uri=tracking_uri)
    parent = client.get_run(summary["published"].run_id)
    assert parent.info.status == "FINISHED", parent.info
    assert "test_accuracy" not in parent.data.metrics, parent.data.metrics
    assert "best_l2_lambda" in parent.data.metrics, parent.data.metrics
    finals = client.search_runs([parent.info.experiment_id], "tags.stage = 'final'")
    assert not finals, "the cv flow logged a final model"


def _damage(path: Path, how: str) -> None:
    if how == "edited":  # valid JSON whose content no longer matches its checksum
        envelope = json.loads(path.read_text(encoding="utf-8"))
        envelope["data"]["val_accuracy"] = 1.0
        path.write_text(json.dumps(envelope), encoding="utf-8")
    else:  # a write cut short
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("how", ["edited", "truncated"])
def test_a_damaged_cache_entry_is_logged_and_trained_again(
    pipeline_run, prefect_api_url, tmp_path, tracking_uri, sample_flow_config, caplog, how
):
    cache = _copy_fold_cache(pipeline_run, tmp_path)
    damaged = _cache_entries(cache)[0]
    _damage(damaged, how)
    config = sample_flow_config(cache, tracking_uri)

    with caplog.at_level(logging.WARNING, logger="pipeline.record"):
        summary = cv_flow(config)

    assert (summary["trained_folds"], summary["cached_folds"]) == (1, len(FOLD_FILES) - 1), summary
    pd.testing.assert_frame_equal(pd.DataFrame(summary["cv_table"]), pipeline_run.table)
    warnings = [r.getMessage() for r in caplog.records if r.name == "pipeline.record"]
    assert any(str(damaged) in w and "trained again" in w for w in warnings), warnings
    assert read_json(damaged, "fold")["l2_lambda"] in LAMBDAS, "the entry was not rewritten"


def test_a_sealed_entry_copied_under_another_key_is_trained_again(
    pipeline_run, prefect_api_url, tmp_path, tracking_uri, sample_flow_config
):
    # Arrange: someone with write access copies one valid entry over another (the checksum
    # holds: it is a real result, of another training).
    cache = _copy_fold_cache(pipeline_run, tmp_path)
    first, second = _cache_entries(cache)[:2]
    assert read_json(first, "fold") != read_json(second, "fold"), "two different trainings"
    shutil.copyfile(first, second)
    config = sample_flow_config(cache, tracking_uri)

    # Act
    summary = cv_flow(config)

    # Assert: the copy is not taken for the result it replaced; the table is the true one.
    assert (summary["trained_folds"], summary["cached_folds"]) == (1, len(FOLD_FILES) - 1), summary
    pd.testing.assert_frame_equal(pd.DataFrame(summary["cv_table"]), pipeline_run.table)


def test_adding_a_lambda_reuses_the_other_lambdas_folds(
    pipeline_run, prefect_api_url, tmp_path, tracking_uri, sample_flow_config
):
    cache = _copy_fold_cache(pipeline_run, tmp_path)
    config = sample_flow_config(cache, tracking_uri, **{"cv.l2_lambdas": [*LAMBDAS, 1e-3]})

    summary = cv_flow(config)

    assert (summary["trained_folds"], summary["cached_folds"]) == (FOLDS, len(FOLD_FILES)), summary
    table = pd.DataFrame(summary["cv_table"])
    assert sorted(table["l2_lambda"]) == sorted([*LAMBDAS, 1e-3]), table
    kept = table[table["l2_lambda"].isin(LAMBDAS)].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept, pipeline_run.table)
    assert len(_cache_entries(cache)) == len(FOLD_FILES) + FOLDS, "new folds not cached"


# ------------------------------------------------------------------------------ runners


def test_the_sequential_runner_gives_the_same_cv_table(
    pipeline_run, prefect_api_url, tmp_path, tracking_uri, sample_flow_config
):
    config = sample_flow_config(
        tmp_path / "cache", tracking_uri, **{"execution.runner": "sequential"}
    )

    summary = cv_flow(config)

    assert summary["trained_folds"] == len(FOLD_FILES), summary
    pd.testing.assert_frame_equal(pd.DataFrame(summary["cv_table"]), pipeline_run.table)


def _finished_task_runs(flow_run_id: str) -> set[str]:
    """The task runs that logged "Finished in state Completed()" to the session's API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
    return {
        str(log.task_run_id)
        for log in logs
        if log.task_run_id and log.message.startswith("Finished in state Completed")
    }


# The cv flow's tasks in the flow process: load_data, cv_table, select_lambda.
FLOW_PROCESS_TASKS = 3


def test_the_process_runner_gives_the_same_cv_table_and_reports_to_the_flows_api(
    pipeline_run,
    prefect_api_in_every_thread,
    tmp_path,
    tracking_uri,
    sample_flow_config,
    new_prefect_servers,
):
    config = sample_flow_config(tmp_path / "cache", tracking_uri, **{"execution.runner": "process"})

    with new_prefect_servers(os.getpid()) as servers:
        summary = cv_flow(config)

    assert summary["trained_folds"] == len(FOLD_FILES), summary
    pd.testing.assert_frame_equal(pd.DataFrame(summary["cv_table"]), pipeline_run.table)
    assert not servers, f"Prefect servers started for the run or its workers: {servers}"
    flow_run_id = RunRecord(summary["record"]).run()["prefect_flow_run"]["id"]
    finished = _finished_task_runs(flow_run_id)
    assert len(finished) == FLOW_PROCESS_TASKS + len(FOLD_FILES), (
        f"task runs of the flow run that reported to its API: {len(finished)}"
    )


def test_the_process_runner_starts_no_server_with_the_api_in_a_settings_context_only(
    prefect_api_url, monkeypatch, tmp_path, tracking_uri, sample_flow_config, new_prefect_servers
):
    from prefect.context import refresh_global_settings_context

    # The API in this thread's settings context only, not in Prefect's global settings.
    monkeypatch.delenv("PREFECT_API_URL")
    refresh_global_settings_context()
    config = sample_flow_config(tmp_path / "cache", tracking_uri, **{"execution.runner": "process"})
    try:
        with new_prefect_servers(os.getpid()) as servers:
            summary = cv_flow(config)
    finally:
        for pid in servers:  # Prefect started them in this process: stopped here, by pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    assert summary["trained_folds"] == len(FOLD_FILES), summary
    assert not servers, f"Prefect servers started for the run: {servers}"


# ------------------------------------------------------------------------------ one Prefect API


def _prefect_db(home: Path, query: str) -> list[tuple]:
    import sqlite3

    with sqlite3.connect(home / "prefect.db") as db:
        return db.execute(query).fetchall()


@dataclass
class CommandRun:
    """``mlp-pipeline cv --runner process`` without a Prefect API, and what it left behind."""

    returncode: int
    out: str
    err: str
    servers: dict[int, str]
    prefect_home: Path


@pytest.fixture(scope="module")
def command_run(tmp_path_factory, _empty_store, new_prefect_servers) -> CommandRun:
    """The command in a subprocess, with a Prefect home of its own; its servers are watched."""
    folder = tmp_path_factory.mktemp("command")
    uri = _store(folder, _empty_store)
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(folder / "prefect-home")
    args = [
        sys.executable, "-m", "flows.cli", "cv", "--dataset", "mnist-sample", "--hidden", "32",
        "--epochs", "2", "--l2-grid", "1e-4,1e-2", "--folds", "2", "--runner", "process",
        "--workers", "2", "--tracking-uri", uri, "--experiment", "test-flows",
        "--no-progress", "--set", f"execution.cache_dir={folder / 'cache'}",
    ]  # fmt: skip
    process = subprocess.Popen(
        args, env=env, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        with new_prefect_servers(process.pid) as servers:
            out, err = process.communicate(timeout=600)
    finally:  # should it hang: the command and its pool workers (the server dies with it)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    return CommandRun(process.returncode, out, err, dict(servers), folder / "prefect-home")


def test_a_command_run_reports_every_process_to_one_temporary_server(command_run):
    """``mlp-pipeline cv --runner process`` without a Prefect API: one temporary server, which
    the flow and its pool workers all report to."""
    assert command_run.returncode == 0, command_run.err[-3000:]
    assert "trainings: 4 run, 0 reused from cache" in command_run.out, command_run.out
    servers = list(command_run.servers.values())
    assert len(servers) == 1, f"Prefect servers started by the command: {servers}"
    assert "prefect server start" in servers[0], servers
    flow_runs = _prefect_db(command_run.prefect_home, "SELECT id, state_type FROM flow_run")
    assert [state for _, state in flow_runs] == ["COMPLETED"], flow_runs
    ((name,),) = _prefect_db(command_run.prefect_home, "SELECT name FROM flow_run")
    assert name.startswith("mnist-sample-default-"), name
    assert "Prefect flow run" not in command_run.out, "a temporary server's pages end with it"
    # Task runs' states, not their log lines: the command logs only their warnings and errors.
    finished = _prefect_db(
        command_run.prefect_home,
        "SELECT id FROM task_run WHERE state_type = 'COMPLETED' AND "
        f"flow_run_id = '{flow_runs[0][0]}'",
    )
    assert len(finished) == FLOW_PROCESS_TASKS + len(FOLD_FILES), (
        f"task runs of the flow run that reported to the temporary server: {len(finished)}"
    )


def test_the_temporary_server_records_the_trainings_task_runs(command_run):
    assert command_run.returncode == 0, command_run.err[-3000:]
    trainings = _prefect_db(
        command_run.prefect_home,
        "SELECT name, state_name FROM task_run WHERE name LIKE 'train_fold%'",
    )
    assert dict(trainings) == dict.fromkeys(TASK_RUN_NAMES, "Completed"), trainings


_FLOW_FROM_PYTHON = textwrap.dedent(
    """
    import json, sys
    from flows.pipeline_flow import cv_flow
    from pipeline.config import build_config

    if __name__ == "__main__":
        cache, tracking_uri = sys.argv[1:]
        config = build_config(overrides={
            "data.dataset": "mnist-sample", "model.hidden_sizes": [32], "training.epochs": 2,
            "cv.l2_lambdas": [1e-4, 1e-2], "cv.folds": 2, "execution.runner": "process",
            "execution.workers": 2, "execution.cache_dir": cache,
            "tracking.tracking_uri": tracking_uri, "tracking.experiment": "test-flows",
        })
        print(json.dumps({"trained": cv_flow(config)["trained_folds"]}))
    """
)


def test_a_flow_called_from_python_shares_prefects_server_with_its_process_workers(
    tmp_path, tracking_uri, reaped, new_prefect_servers
):
    """Without a Prefect API Prefect starts a temporary server for the flow; the pool workers
    must report to it, not each start one of their own."""
    (tmp_path / "go.py").write_text(_FLOW_FROM_PYTHON)
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    process = reaped(
        subprocess.Popen(
            [sys.executable, "go.py", str(tmp_path / "cache"), tracking_uri],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
    )

    with new_prefect_servers(process.pid) as servers:
        out, err = process.communicate(timeout=600)

    assert process.returncode == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1]) == {"trained": 4}, out
    assert len(servers) == 1, f"one temporary server for the flow and its workers: {servers}"


# ------------------------------------------------------------------------------ real MNIST


def test_the_pipeline_on_real_mnist(
    shared_data_dir, prefect_api_url, tmp_path, tracking_uri, small_config
):
    config = small_config(shared_data_dir, tmp_path, tracking_uri)

    summary = mlp_pipeline(config)

    assert (summary["trained_folds"], summary["cached_folds"]) == (len(FOLD_FILES), 0), summary
    assert summary["best_l2_lambda"] in LAMBDAS, summary
    assert 0.8 < summary["test_accuracy"] <= 1.0, f"test accuracy {summary['test_accuracy']}"
    record = RunRecord(summary["record"])
    assert record.run()["status"] == "FINISHED", record.run()
    assert record.run()["dataset"]["name"] == "mnist", record.run()["dataset"]
    assert record.final()["evaluation"]["n_samples"] == 500, record.final()["evaluation"]
    parent = MlflowClient(tracking_uri=tracking_uri).get_run(summary["published"].run_id)
    assert parent.data.params["data.limit_train"] == "3000", parent.data.params
