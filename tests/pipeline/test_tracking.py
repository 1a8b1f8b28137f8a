"""The MLflow record, checked through MlflowClient against a real SQLite store in a temp folder.

Creating a SQLite store costs a few seconds (schema migrations), so one store serves the whole
module; every test uses its own experiment (and registered model) name.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import pipeline.tracking
from mlp import MLP, fit
from pipeline.config import preset
from pipeline.data import load_dataset
from pipeline.errors import PipelineError, TrackingError
from pipeline.normalize import Normalizer
from pipeline.recording import ResilientRecorder
from pipeline.results import Evaluation, FoldResult
from pipeline.selection import cv_table, select_lambda
from pipeline.tracking import PipelineRecorder, load_model_for_eval, mark_stale_runs_failed
from pipeline.tracking_uri import default_artifact_location
from pipeline.training import FinalModel

EPOCHS = 3


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{folder}/mlflow.db"  # folder is absolute: four slashes


@pytest.fixture(scope="module")
def client(store_uri) -> MlflowClient:
    return MlflowClient(tracking_uri=store_uri, registry_uri=store_uri)


def _config(store_uri: str, experiment: str, registered_model: str | None = None):
    return preset("quick").replace(
        {
            "tracking.tracking_uri": store_uri,
            "tracking.experiment": experiment,
            "tracking.registered_model": registered_model,
        }
    )


@pytest.fixture(scope="module")
def trained(shared_data_dir):
    """A tiny real model: 1000 MNIST training images, a few epochs, 500 test images."""
    ds = load_dataset("mnist", data_dir=shared_data_dir, download=False).limit(1000, 500)
    normalizer = Normalizer.fit(ds.X_train, "standardize")
    X, X_test = normalizer.transform(ds.X_train), normalizer.transform(ds.X_test)
    net = MLP(784, [32], 10, seed=0)
    history = fit(
        net,
        X,
        ds.y_train,
        epochs=EPOCHS,
        optimizer="sgd",
        lr=0.1,
        X_val=X_test,
        y_val=ds.y_test,
        seed=0,
    )
    predictions = net.predict(X_test)
    confusion = np.zeros((10, 10), dtype=np.int64)
    np.add.at(confusion, (ds.y_test.astype(int), predictions), 1)
    evaluation = Evaluation(
        accuracy=float(np.mean(predictions == ds.y_test)),
        loss=float(net.loss(X_test, ds.y_test).data),
        n_samples=len(predictions),
        confusion=confusion.tolist(),
    )
    return SimpleNamespace(
        ds=ds,
        normalizer=normalizer,
        net=net,
        history=history.as_columns(),
        predictions=predictions,
        evaluation=evaluation,
    )


def _fold_results(history: dict) -> list[FoldResult]:
    results = []
    for lam in (0.0, 1e-3):
        for fold in range(2):
            shifted = {k: [v + 0.01 * fold for v in vals] for k, vals in history.items()}
            results.append(
                FoldResult(
                    l2_lambda=lam,
                    fold=fold,
                    seed=fold,
                    val_accuracy=0.9 + 0.01 * fold,
                    val_loss=0.3,
                    train_accuracy=0.95,
                    train_loss=0.2,
                    epochs=EPOCHS,
                    seconds=1.5,
                    history=shifted,
                )
            )
    return results


@pytest.fixture(scope="module")
def recorded(store_uri, client, trained):
    """One whole pipeline record: parent, CV folds (one diverged), summary, final model."""
    config = _config(store_uri, "whole-pipeline", "mlp-test")
    folds = _fold_results(trained.history)
    diverged = FoldResult(
        l2_lambda=1.0,
        fold=0,
        seed=0,
        val_accuracy=math.nan,
        val_loss=math.nan,
        train_accuracy=math.nan,
        train_loss=math.nan,
        epochs=2,
        seconds=0.1,
        diverged=True,
        message="loss is inf at epoch 2",
        history={"epoch": [1, 2], "train_loss": [2.0, math.nan]},
    )
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    with PipelineRecorder(config.tracking) as recorder:
        parent = recorder.start(
            config,
            trained.ds.name,
            trained.ds.fingerprint,
            run_name="test-run",
            tags={"prefect.flow_run_id": "abc"},
        )
        recorder.warm_up(final_model=True)  # as the flow does: the record must not change
        fold_runs = {(r.l2_lambda, r.fold): recorder.log_fold(r) for r in folds}
        diverged_run = recorder.log_fold(diverged)
        table = cv_table([*folds, diverged])
        best = select_lambda(table)
        recorder.log_cv_summary(table, best)
        started = time.perf_counter()
        final = recorder.log_final(
            trained.net,
            trained.normalizer,
            trained.history,
            trained.evaluation,
            trained.ds.X_test,
            trained.ds.y_test,
            trained.predictions,
            l2_lambda=best,
        )
        final_seconds = time.perf_counter() - started
        recorder.log_metrics_summary(12.5)
    return SimpleNamespace(
        parent=parent,
        fold_runs=fold_runs,
        folds=folds,
        table=table,
        best=best,
        final=final,
        diverged_run=diverged_run,
        config=config,
        final_seconds=final_seconds,
        env_before=env_before,
    )


# ------------------------------------------------------------------------- unusable stores
def test_unreachable_server_raises_tracking_error_fast(monkeypatch, refused_server):
    # "Fast" as behaviour: one short /health request, and MLflow's client (whose HTTP retries
    # back off for minutes) never used.
    base_url = refused_server.url
    opened = []

    def refusing_open_store(*args, **kwargs):
        # Raises rather than reaching MLflow: a regression fails here instead of retrying.
        opened.append(args)
        raise AssertionError("MLflow's client used after a failed health check")

    monkeypatch.setattr(pipeline.tracking, "_open_store", refusing_open_store)
    config = _config(base_url.replace("http://", "http://user:hunter2@"), "never")
    recorder = PipelineRecorder(config.tracking)
    with pytest.raises(TrackingError) as info:
        recorder.start(config, "mnist", "0" * 16)
    message = str(info.value)
    refused_server.assert_one_short_health_request()
    assert opened == [], f"the MLflow client was used after a failed health check: {opened}"
    assert recorder.client is None, "no MLflow client may be created for an unreachable server"
    assert "not reachable" in message and "\n" not in message, message
    assert "hunter2" not in message, f"credentials leaked: {message}"
    assert recorder.parent_run_id is None, "no parent run without a store"


# ------------------------------------------------------------------------------------ runs
def test_parent_run_params_and_tags(recorded, client):
    parent = client.get_run(recorded.parent)
    params, tags = parent.data.params, parent.data.tags
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == "test-run"
    assert tags["stage"] == "pipeline" and tags["prefect.flow_run_id"] == "abc"
    assert tags["pid"] == str(os.getpid()) and tags["host"] == socket.gethostname()
    for key, value in recorded.config.flat().items():
        expected = json.dumps(value) if isinstance(value, list) else str(value)
        assert params[key] == expected, f"param {key}: {params.get(key)!r} != {expected!r}"
    assert params["model.hidden_sizes"] == "[64]"
    assert params["dataset.name"] == "mnist" and len(params["dataset.fingerprint"]) > 8
    assert "package.version" in params
    code_dir = Path(pipeline.tracking.__file__).resolve().parent
    in_git = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, check=False, cwd=code_dir
    )
    assert ("git.commit" in params) == (in_git.returncode == 0), "git.commit iff in a checkout"
    assert os.environ.get("MLFLOW_TRACKING_URI") == recorded.env_before, "env var restored"
    assert mlflow.active_run() is None, "no fluent run left active"


def test_parent_summary_metrics(recorded, client, trained):
    metrics = client.get_run(recorded.parent).data.metrics
    assert metrics["best_l2_lambda"] == recorded.best
    best_row = recorded.table.loc[recorded.table["l2_lambda"] == recorded.best]
    assert metrics["cv_best_mean_val_accuracy"] == pytest.approx(
        best_row["mean_val_accuracy"].iloc[0]
    )
    assert metrics["test_accuracy"] == pytest.approx(trained.evaluation.accuracy)
    assert metrics["test_loss"] == pytest.approx(trained.evaluation.loss)
    assert metrics["wall_seconds"] == 12.5


def test_fold_runs_are_nested_with_epoch_histories(recorded, client):
    for result in recorded.folds:
        run = client.get_run(recorded.fold_runs[(result.l2_lambda, result.fold)])
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == recorded.parent
        assert run.data.tags["stage"] == "cv"
        assert run.data.params == {
            "l2_lambda": str(result.l2_lambda),
            "fold": str(result.fold),
            "seed": str(result.seed),
        }
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"):
            history = client.get_metric_history(run.info.run_id, key)
            steps = [m.step for m in sorted(history, key=lambda m: m.step)]
            values = [m.value for m in sorted(history, key=lambda m: m.step)]
            assert steps == list(range(1, EPOCHS + 1)), f"{key} steps {steps}"
            assert values == pytest.approx(result.history[key]), f"{key} history"
        assert run.data.metrics["fold_val_accuracy"] == pytest.approx(result.val_accuracy)
        assert run.data.metrics["epochs_run"] == EPOCHS


def test_epoch_points_carry_the_time_each_epoch_ended():
    # Arrange: two epochs that ended 1.5 s apart, and a history from before the column existed.
    timed = {"epoch": [1, 2], "train_loss": [0.5, 0.4], "wall_time": [1000.0, 1001.5]}
    untimed = {"epoch": [1, 2], "train_loss": [0.5, 0.4]}

    # Act
    points = pipeline.tracking._epoch_metrics(timed, 7)
    fallback = pipeline.tracking._epoch_metrics(untimed, 7)

    # Assert: milliseconds, as MLflow stores them.
    assert [(m.key, m.step, m.timestamp) for m in points] == [
        ("train_loss", 1, 1_000_000),
        ("train_loss", 2, 1_001_500),
    ], points
    assert {m.timestamp for m in fallback} == {7}, fallback


def test_diverged_fold_is_tagged_with_nan_metrics(recorded, client):
    run = client.get_run(recorded.diverged_run)
    assert run.info.status == "FINISHED"
    assert run.data.tags["diverged"] == "true"
    assert run.data.tags["diverged_message"] == "loss is inf at epoch 2"
    assert math.isnan(run.data.metrics["fold_val_accuracy"])


def test_artifacts_and_cv_table(recorded, client, tmp_path):
    names = {f.path for f in client.list_artifacts(recorded.parent)}
    expected = {
        "config.json",
        "cv_results.csv",
        "cv_lambda.png",
        "training_curves.png",
        "confusion_matrix.png",
        "misclassified.png",
    }
    assert expected <= names, f"missing {expected - names}"
    folder = client.download_artifacts(recorded.parent, "", str(tmp_path))
    for png in sorted(n for n in expected if n.endswith(".png")):
        image = matplotlib.image.imread(f"{folder}/{png}")
        assert image.size > 0 and image.std() > 0, f"{png} unreadable or blank"
    table = pd.read_csv(f"{folder}/cv_results.csv")
    pd.testing.assert_frame_equal(table, recorded.table, check_dtype=False)
    config = json.loads(Path(folder, "config.json").read_text(encoding="utf-8"))
    assert config["training"]["epochs"] == recorded.config.training.epochs
    location = client.get_experiment_by_name("whole-pipeline").artifact_location
    assert location == default_artifact_location(recorded.config.tracking.tracking_uri)


def test_final_run_and_model(recorded, client, trained):
    final = recorded.final
    run = client.get_run(final.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == recorded.parent
    assert run.data.tags["stage"] == "final"
    history = sorted(client.get_metric_history(final.run_id, "train_loss"), key=lambda m: m.step)
    assert [m.value for m in history] == pytest.approx(trained.history["train_loss"])
    assert final.registered_version == "1" and final.champion
    print(f"log_final took {recorded.final_seconds:.2f} s")  # shown with pytest -s

    images = trained.ds.X_test.astype(np.float32)
    expected = trained.net.predict(trained.normalizer.transform(trained.ds.X_test))
    tracking_uri = recorded.config.tracking.tracking_uri
    for uri in (
        final.model_uri,
        f"runs:/{final.run_id}/model",
        "models:/mlp-test@champion",
        "models:/mlp-test/1",
    ):
        model = load_model_for_eval(uri, tracking_uri)
        labels = model.predict(images)
        assert labels.dtype == np.int64 and labels.shape == (len(images),), uri
        np.testing.assert_array_equal(labels, expected, err_msg=uri)


def test_the_logged_model_carries_its_code_and_needs_no_project_install(
    recorded, client, trained, tmp_path
):
    """The package is on no index: the model must load with numpy and mlflow alone."""
    model_id = recorded.final.model_uri.removeprefix("models:/")
    model_dir = Path(client.get_logged_model(model_id).artifact_location.removeprefix("file://"))
    requirements = (model_dir / "requirements.txt").read_text(encoding="utf-8").split()
    np.save(tmp_path / "images.npy", trained.ds.X_test.astype(np.float32))
    # A fresh interpreter where `mlp` and `pipeline` may come only from an MLflow model's code/
    # folder: the installed project (editable or not) is out of reach.
    script = textwrap.dedent(
        f"""
        import importlib.machinery, json, sys
        from pathlib import Path

        class OnlyModelCode:
            def find_spec(self, name, path, target=None):
                if name.partition(".")[0] not in ("mlp", "pipeline"):
                    return None
                spec = importlib.machinery.PathFinder.find_spec(name, path)
                origin = Path(spec.origin) if spec and spec.origin else None
                if origin is None or not (origin.parents[2] / "MLmodel").is_file():
                    raise ModuleNotFoundError(f"{{name}} outside the model: {{origin}}")
                return spec

        sys.meta_path.insert(0, OnlyModelCode())
        import mlflow, numpy as np

        model = mlflow.pyfunc.load_model({str(model_dir)!r})
        labels = model.predict(np.load({str(tmp_path / "images.npy")!r}))
        print(json.dumps({{"labels": labels.tolist(), "mlp": sys.modules["mlp"].__file__}}))
        """
    )

    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
        cwd=tmp_path, check=False,
    )  # fmt: skip

    assert done.returncode == 0, f"the model did not load on its own:\n{done.stderr[-3000:]}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    expected = trained.net.predict(trained.normalizer.transform(trained.ds.X_test))
    assert result["labels"] == expected.tolist(), "the model's own code predicts differently"
    assert Path(result["mlp"]).is_relative_to(model_dir), result["mlp"]
    assert sorted(r.split("==")[0] for r in requirements) == ["mlflow", "numpy"], requirements


def test_load_model_for_eval_unknown_uri(recorded):
    tracking_uri = recorded.config.tracking.tracking_uri
    for uri in ("models:/no-such-model@champion", "runs:/0123456789abcdef/model"):
        with pytest.raises(PipelineError, match="cannot load model"):
            load_model_for_eval(uri, tracking_uri)


def _log_final(config, trained, accuracy: float, ds):
    """One execution's final model, claimed to score ``accuracy`` on ``ds``'s test set."""
    evaluation = Evaluation(accuracy, 0.3, len(ds.y_test), trained.evaluation.confusion)
    with PipelineRecorder(config.tracking) as recorder:
        recorder.start(config, "mnist", "f" * 16)
        return recorder.log_final(
            trained.net, trained.normalizer, trained.history, evaluation,
            ds.X_test, ds.y_test, trained.predictions[: len(ds.y_test)], l2_lambda=1e-3,
        )  # fmt: skip


def _fail_once(recorder: ResilientRecorder, method: str, *, after_the_call: bool = False) -> list:
    """Make the store fail the next ``method`` call once, then answer again; returns the calls.

    ``after_the_call``: the store does the call, then its reply is lost.
    """
    client = recorder.recorder.client
    real = getattr(client, method)
    calls = []

    def fail_once(*args, **kwargs):
        calls.append(args)
        result = real(*args, **kwargs) if after_the_call else None
        if len(calls) == 1:
            raise MlflowException(f"transient failure in {method} (timeout waiting for the reply)")
        return result if after_the_call else real(*args, **kwargs)

    setattr(client, method, fail_once)
    return calls


@pytest.mark.parametrize(
    "failing",
    [
        "log_batch",
        "log_artifact",
        "set_terminated",
        "create_model_version",
        "set_model_version_tag",
    ],  # fmt: skip
)
def test_a_retried_final_record_resumes_where_it_failed(
    store_uri, client, trained, failing, reliability_log
):
    """The store fails once in the middle of ``log_final``; the retry makes no second run."""
    config = _config(store_uri, f"resume-{failing}", f"mlp-resume-{failing}")
    evaluation = trained.evaluation
    with ResilientRecorder(PipelineRecorder(config.tracking), sleep=lambda _: None) as recorder:
        recorder.start(config, "mnist", "f" * 16)
        calls = _fail_once(recorder, failing)
        final = recorder.log_final(
            trained.net, trained.normalizer, trained.history, evaluation,
            trained.ds.X_test, trained.ds.y_test, trained.predictions, l2_lambda=1e-3,
        )  # fmt: skip
        assert len(calls) >= 2, "the step failed once and was done again"
    assert not recorder.offline

    experiment = client.get_experiment_by_name(f"resume-{failing}")
    finals = client.search_runs([experiment.experiment_id], "tags.stage = 'final'")
    assert [run.info.run_id for run in finals] == [final.run_id], "one final run"
    assert finals[0].info.status == "FINISHED"
    history = client.get_metric_history(final.run_id, "train_loss")
    assert len(history) == EPOCHS, "each epoch's metric recorded once"
    versions = client.search_model_versions(f"name = 'mlp-resume-{failing}'")
    assert [str(v.version) for v in versions] == ["1"], "registered once"
    champion = client.get_model_version_by_alias(f"mlp-resume-{failing}", "champion")
    assert str(champion.version) == "1" and final.champion
    assert champion.tags["test_accuracy"] == repr(evaluation.accuracy)
    reliability_log(
        f"MLflow failing once in the final record ({failing})", survived=True, results_lost=0
    )


@pytest.mark.parametrize(
    ("call", "failing"),
    [("log_fold", "log_batch"), ("log_fold", "set_terminated"), ("log_cv_summary", "log_artifact")],
)
def test_a_retried_cv_record_resumes_where_it_failed(
    store_uri, client, trained, call, failing, reliability_log
):
    """The same for a fold's run and for the CV summary: nothing recorded twice."""
    experiment_name = f"resume-{call}-{failing}"
    config = _config(store_uri, experiment_name)
    folds = _fold_results(trained.history)
    with ResilientRecorder(PipelineRecorder(config.tracking), sleep=lambda _: None) as recorder:
        parent = recorder.start(config, "mnist", "f" * 16)
        calls = _fail_once(recorder, failing) if call == "log_fold" else []
        for fold in folds:
            recorder.log_fold(fold)
        table = cv_table(folds)
        if call == "log_cv_summary":
            calls = _fail_once(recorder, failing)
        recorder.log_cv_summary(table, select_lambda(table))
        assert len(calls) >= 2, "the step failed once and was done again"
    assert not recorder.offline

    experiment = client.get_experiment_by_name(experiment_name)
    children = client.search_runs([experiment.experiment_id], "tags.stage = 'cv'")
    assert len(children) == len(folds), "one run per fold"
    assert {run.info.status for run in children} == {"FINISHED"}
    for run in children:
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) == EPOCHS
    assert len(client.get_metric_history(parent, "best_l2_lambda")) == 1, "logged once"
    artifacts = {a.path for a in client.list_artifacts(parent)}
    assert {"cv_results.csv", "cv_lambda.png"} <= artifacts, artifacts
    reliability_log(
        f"MLflow failing once in the CV record ({call}: {failing})", survived=True, results_lost=0
    )


# Every client method the recorder writes with: an unreachable store fails them all.
EVERY_WRITE = ("create_run", "log_batch", "log_artifact", "set_tag", "set_terminated")


class _Outage:
    """While ``down``, the recorder's MLflow client fails ``methods`` (the store is away)."""

    def __init__(self, recorder: ResilientRecorder, methods: tuple[str, ...]) -> None:
        self.down = False
        self.failures = 0
        client = recorder.recorder.client
        for name in methods:
            setattr(client, name, self._guarded(name, getattr(client, name)))

    def _guarded(self, name, real):
        def guarded(*args, **kwargs):
            if self.down:
                self.failures += 1
                raise MlflowException(f"store unreachable ({name})")
            return real(*args, **kwargs)

        return guarded


@pytest.mark.parametrize("back", ["next-call", "exit"])
@pytest.mark.parametrize("failing", ["every-write", "log_batch"])
def test_queued_calls_are_replayed_once_the_store_is_back(
    store_uri, client, trained, caplog, failing, back
):
    """Calls queued while the store is away are replayed when it answers again: at the next
    recorded call, or when the recorder ends; each one recorded exactly once (with only
    log_batch failing, a fold's run exists before its call is queued)."""
    experiment_name = f"replay-{failing}-{back}"
    config = _config(store_uri, experiment_name)
    folds = _fold_results(trained.history)
    table = cv_table(folds)
    sleeps = []
    caplog.set_level("WARNING", logger="pipeline.recording")
    with ResilientRecorder(
        PipelineRecorder(config.tracking), attempts=2, sleep=sleeps.append
    ) as recorder:
        parent = recorder.start(config, "mnist", "f" * 16)
        outage = _Outage(recorder, EVERY_WRITE if failing == "every-write" else (failing,))
        outage.down = True
        returned = [recorder.log_fold(fold) for fold in folds[:2]]
        assert returned == [None, None], f"calls while the store is away: {returned}"
        assert [name for name, _, _ in recorder.queued] == ["log_fold", "log_fold"]
        if back == "next-call":
            outage.down = False
            returned = [recorder.log_fold(fold) for fold in folds[2:]]
            assert None not in returned, f"calls once the store is back: {returned}"
            assert not recorder.offline, f"still queued: {recorder.queued}"
            recorder.log_cv_summary(table, select_lambda(table))
        else:
            for fold in folds[2:]:
                recorder.log_fold(fold)
            recorder.log_cv_summary(table, select_lambda(table))
            assert len(recorder.queued) == 5, f"queued: {recorder.queued}"
            outage.down = False  # back before the end: ending the recorder replays
    replayed = 2 if back == "next-call" else 5

    assert outage.failures > 0, "the outage was never hit"
    assert sleeps == [1.0], f"only the first failed call is retried (backoff {sleeps})"
    assert not recorder.offline, f"still queued after the store came back: {recorder.queued}"
    assert f"{replayed} queued calls replayed" in caplog.text, caplog.text
    experiment = client.get_experiment_by_name(experiment_name)
    children = client.search_runs([experiment.experiment_id], "tags.stage = 'cv'")
    names = sorted(run.info.run_name for run in children)
    assert len(children) == len(folds), f"{len(children)} cv runs for {len(folds)} folds: {names}"
    pairs = sorted(
        (float(r.data.params["l2_lambda"]), int(r.data.params["fold"])) for r in children
    )
    assert pairs == sorted((f.l2_lambda, f.fold) for f in folds), f"one run per fold: {pairs}"
    for run in children:
        assert run.info.status == "FINISHED", (run.info.run_name, run.info.status)
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert len(history) == EPOCHS, f"{run.info.run_name}: {len(history)} train_loss points"
    parent_run = client.get_run(parent)
    assert parent_run.info.status == "FINISHED", parent_run.info.status
    assert len(client.get_metric_history(parent, "best_l2_lambda")) == 1, "summary logged once"
    assert "cv_results.csv" in {a.path for a in client.list_artifacts(parent)}


def test_an_unrecorded_execution_reports_its_final_model(store_uri, client, trained, tmp_path):
    """The store stays away to the end: the report folder holds the summary, the folds, the
    CV table and the final model (weights and normalizer), all readable again."""
    config = _config(store_uri, "report-final")
    folds = _fold_results(trained.history)
    table = cv_table(folds)
    best = select_lambda(table)
    final = FinalModel(trained.net, trained.normalizer, trained.history, best, 2.5)
    with ResilientRecorder(
        PipelineRecorder(config.tracking), attempts=1, sleep=lambda _: None
    ) as recorder:
        parent = recorder.start(config, "mnist", "f" * 16)
        _Outage(recorder, EVERY_WRITE).down = True
        for fold in folds:
            recorder.log_fold(fold)
        recorder.log_cv_summary(table, best)
        recorder.log_final(
            trained.net, trained.normalizer, trained.history, trained.evaluation,
            trained.ds.X_test, trained.ds.y_test, trained.predictions, l2_lambda=best,
        )  # fmt: skip
    assert recorder.offline, "the store never came back: the calls stay queued"
    summary = {
        "mlflow_run_id": parent,
        "best_l2_lambda": np.float64(best),
        "cv_table": table.to_dict(orient="records"),
        "test_accuracy": np.float64(trained.evaluation.accuracy),
        "test_loss": math.nan,
        "wall_seconds": 12.5,
    }

    folder = recorder.write_report(tmp_path / "report", summary, final)

    assert folder == tmp_path / "report", folder
    written = sorted(path.name for path in folder.iterdir())
    expected_files = ["cv_results.csv", "folds.json", "normalizer.json", "summary.json"]
    assert written == sorted([*expected_files, "weights.npz"]), written
    loaded = MLP.load(folder / "weights.npz")
    assert loaded.architecture == trained.net.architecture, loaded.architecture
    for i, (got, want) in enumerate(zip(loaded.params, trained.net.params, strict=True)):
        np.testing.assert_array_equal(got, want, err_msg=f"parameter {i} of the saved model")
    normalizer = json.loads((folder / "normalizer.json").read_text(encoding="utf-8"))
    np.testing.assert_array_equal(normalizer["mean"], trained.normalizer.mean_)
    np.testing.assert_array_equal(normalizer["std"], trained.normalizer.std_)
    X = Normalizer.from_dict(normalizer).transform(trained.ds.X_test)
    np.testing.assert_array_equal(
        loaded.predict(X), trained.predictions, err_msg="the reported model predicts otherwise"
    )
    saved = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    assert saved["best_l2_lambda"] == best and saved["test_loss"] is None, saved
    assert saved["test_accuracy"] == trained.evaluation.accuracy, saved
    assert len(saved["cv_table"]) == len(table), saved["cv_table"]
    reported_folds = json.loads((folder / "folds.json").read_text(encoding="utf-8"))
    assert [(f["l2_lambda"], f["fold"]) for f in reported_folds] == [
        (f.l2_lambda, f.fold) for f in folds
    ], reported_folds
    assert reported_folds[0]["history"]["train_loss"] == folds[0].history["train_loss"]
    csv = pd.read_csv(folder / "cv_results.csv")
    np.testing.assert_allclose(csv["l2_lambda"], table["l2_lambda"], err_msg="cv_results.csv")
    np.testing.assert_allclose(csv["mean_val_accuracy"], table["mean_val_accuracy"])
    message = str(recorder.not_recorded(folder))
    assert str(folder) in message and "store unreachable" in message, message
    assert client.get_run(parent).info.status == "RUNNING", "the parent is left for the next run"


def test_champion_moves_only_on_improvement(store_uri, client, trained):
    config = _config(store_uri, "champion", "mlp-champion")
    outcomes = []
    for accuracy in (0.9, 0.8, 0.95):
        outcomes.append(_log_final(config, trained, accuracy, trained.ds))
        champion = client.get_model_version_by_alias("mlp-champion", "champion").version
        outcomes[-1] = (outcomes[-1].registered_version, outcomes[-1].champion, str(champion))
    assert outcomes == [("1", True, "1"), ("2", False, "1"), ("3", True, "3")], outcomes
    tags = client.get_model_version("mlp-champion", "2").tags
    assert tags["test_accuracy"] == "0.8" and tags["dataset.name"] == "mnist", tags


def test_champion_from_another_test_set_is_rescored_on_this_one(
    store_uri, client, trained, shared_data_dir
):
    """Accuracies on different test sets are not comparable: the champion is scored again."""
    config = _config(store_uri, "rescored", "mlp-rescored")
    # Another test set: 300 other test images (a stratified draw of another size).
    other = load_dataset("mnist", data_dir=shared_data_dir, download=False).limit(1000, 300)
    network_on_other = float(
        np.mean(trained.net.predict(trained.normalizer.transform(other.X_test)) == other.y_test)
    )

    # Version 1 claims 0.99 on the first test set: champion.
    first = _log_final(config, trained, 0.99, trained.ds)
    # Version 2 scores a little above what version 1's network really scores on the other
    # test set: it beats the re-scored champion, though 0.99 is the larger number.
    second = _log_final(config, trained, network_on_other + 0.001, other)
    # Version 3, on the same test set as version 2, below it: compared with version 2's tag.
    third = _log_final(config, trained, network_on_other, other)

    assert (first.champion, first.champion_note) == (True, ""), first
    assert second.champion, second
    assert second.champion_note == f"beats version 1, {network_on_other:.4f} on this test set"
    assert not third.champion, third
    assert third.champion_note == f"champion stays version 2, {network_on_other + 0.001:.4f}"
    assert str(client.get_model_version_by_alias("mlp-rescored", "champion").version) == "2"
    tags = client.get_model_version("mlp-rescored", "3").tags
    assert tags["test_set"] == client.get_model_version("mlp-rescored", "2").tags["test_set"]
    assert tags["test_set"] != client.get_model_version("mlp-rescored", "1").tags["test_set"]
    assert (tags["test_images"], tags["champion_comparison"]) == ("300", third.champion_note)


def test_a_champion_that_cannot_be_scored_again_stays_and_says_why(
    store_uri, client, trained, shared_data_dir
):
    config = _config(store_uri, "unscorable", "mlp-unscorable")
    other = load_dataset("mnist", data_dir=shared_data_dir, download=False).limit(1000, 300)

    first = _log_final(config, trained, 0.5, trained.ds)
    # The champion's model files are gone (a store cleaned by hand): it cannot be scored on
    # another test set, so it is not replaced on a guess, and the reason is given.
    location = client.get_logged_model(first.model_uri.removeprefix("models:/")).artifact_location
    shutil.rmtree(location.removeprefix("file://"))
    second = _log_final(config, trained, 0.99, other)

    assert not second.champion, second
    assert second.champion_note.startswith(
        "champion stays version 1: it could not be scored on this test set ("
    ), second.champion_note
    assert str(client.get_model_version_by_alias("mlp-unscorable", "champion").version) == "1"


def _lose_reply_once(recorder: ResilientRecorder, method: str) -> list:
    """The store does ``method`` but its reply is lost once (a timeout after the commit)."""
    return _fail_once(recorder, method, after_the_call=True)


@pytest.mark.parametrize("method", ["create_run", "create_model_version"])
def test_a_lost_reply_creates_nothing_twice(store_uri, client, trained, method):
    """Creating a run or a version is not idempotent: a retry looks for the first one."""
    name = f"lost-reply-{method}"
    config = _config(store_uri, name, f"mlp-{name}")
    folds = _fold_results(trained.history)
    with ResilientRecorder(PipelineRecorder(config.tracking), sleep=lambda _: None) as recorder:
        recorder.start(config, "mnist", "f" * 16, tags={"prefect.flow_run_id": "flow-1"})
        calls = _lose_reply_once(recorder, method)
        for fold in folds:
            recorder.log_fold(fold)
        final = recorder.log_final(
            trained.net, trained.normalizer, trained.history, trained.evaluation,
            trained.ds.X_test, trained.ds.y_test, trained.predictions, l2_lambda=1e-3,
        )  # fmt: skip
        assert calls, f"{method} was never called"
        assert "timeout waiting for the reply" in (recorder.last_error or ""), "no reply lost"

    experiment = client.get_experiment_by_name(name)
    children = client.search_runs([experiment.experiment_id], "tags.stage != 'pipeline'")
    stages = sorted(run.data.tags["stage"] for run in children)
    assert stages == ["cv"] * len(folds) + ["final"], f"duplicated runs: {stages}"
    assert {run.info.status for run in children} == {"FINISHED"}, "a run was left open"
    versions = client.search_model_versions(f"name = 'mlp-{name}'")
    assert [str(v.version) for v in versions] == ["1"], "registered once"
    assert final.registered_version == "1" and final.champion, final
    assert {run.data.tags.get("prefect.flow_run_id") for run in children} == {"flow-1"}, (
        "every child run carries the flow run's tags"
    )


def _log_final_with_fault(config, trained, accuracy: float, fault, method: str):
    """A final record claiming ``accuracy``, with ``fault`` (e.g. ``_fail_once``) on ``method``
    of the store, retried by ``ResilientRecorder``; returns the record and the method's calls."""
    evaluation = Evaluation(accuracy, 0.3, len(trained.ds.y_test), trained.evaluation.confusion)
    with ResilientRecorder(PipelineRecorder(config.tracking), sleep=lambda _: None) as recorder:
        recorder.start(config, "mnist", "f" * 16)
        calls = fault(recorder, method)
        record = recorder.log_final(
            trained.net, trained.normalizer, trained.history, evaluation,
            trained.ds.X_test, trained.ds.y_test, trained.predictions, l2_lambda=1e-3,
        )  # fmt: skip
    return record, calls


def test_a_failed_alias_read_does_not_crown_a_worse_model(store_uri, client, trained):
    """Only a missing alias means "no champion": a timeout must not move it to a worse model."""
    config = _config(store_uri, "alias-read", "mlp-alias-read")
    _log_final(config, trained, 0.95, trained.ds)
    worse, calls = _log_final_with_fault(
        config, trained, 0.10, _fail_once, "get_model_version_by_alias"
    )

    assert len(calls) >= 2, "the failed read was retried"
    assert not worse.champion, worse
    assert worse.champion_note == "champion stays version 1, 0.9500", worse.champion_note
    assert str(client.get_model_version_by_alias("mlp-alias-read", "champion").version) == "1"


def test_a_retry_after_the_alias_moved_reports_the_new_champion(store_uri, client, trained):
    """The alias moved, then the store failed: the retry must not compare the version with
    itself and call it "not the champion"."""
    config = _config(store_uri, "alias-moved", "mlp-alias-moved")
    _log_final(config, trained, 0.5, trained.ds)
    better, calls = _log_final_with_fault(
        config, trained, 0.9, _lose_reply_once, "set_registered_model_alias"
    )

    assert len(calls) >= 1, "the alias was moved"
    assert better.champion, better
    assert better.champion_note == "beats version 1, 0.5000", better.champion_note
    assert str(client.get_model_version_by_alias("mlp-alias-moved", "champion").version) == "2"
    parent = client.get_run(better.run_id).data.tags["mlflow.parentRunId"]
    assert client.get_run(parent).data.tags["champion"] == "true"


def test_git_commit_only_from_a_checkout_that_tracks_the_code(tmp_path):
    """A copy installed inside someone's repository must not log that repository's commit."""
    # Arrange: a repository with one commit, and the package copied inside it, untracked.
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q", str(tmp_path)], check=True)
    subprocess.run(
        [*git, "-C", str(tmp_path), "commit", "-q", "--allow-empty", "-m", "x"], check=True
    )
    site = tmp_path / ".venv" / "site"
    shutil.copytree(Path(pipeline.tracking.__file__).parent, site / "pipeline")
    shutil.copytree(Path(pipeline.tracking.__file__).parents[1] / "mlp", site / "mlp")
    code = "import pipeline.tracking as t; print(t.__file__); print(t._git_commit())"

    # Act
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(site)}, cwd=tmp_path,
    )  # fmt: skip

    # Assert
    where, commit = result.stdout.split()
    assert where.startswith(str(site)), f"imported the wrong copy: {where}"
    assert commit == "None", f"logged the surrounding repository's commit {commit}"


def test_no_registration_without_a_registered_model(store_uri, client, trained):
    config = _config(store_uri, "unregistered", None)
    with PipelineRecorder(config.tracking) as recorder:
        recorder.start(config, "mnist", "f" * 16)
        record = recorder.log_final(
            trained.net,
            trained.normalizer,
            trained.history,
            trained.evaluation,
            trained.ds.X_test,
            trained.ds.y_test,
            trained.predictions,
            l2_lambda=0.0,
        )
    assert record.registered_version is None and not record.champion
    assert record.model_uri.startswith("models:/m-")


# ------------------------------------------------------------------------------------ endings
@pytest.mark.parametrize(
    ("exception", "status"),
    [
        (RuntimeError("boom\nsecond line"), "FAILED"),
        (KeyboardInterrupt(), "KILLED"),
        (SystemExit(143), "KILLED"),
    ],
)
def test_context_manager_ends_runs(store_uri, client, exception, status):
    config = _config(store_uri, "endings")
    with pytest.raises(type(exception)), PipelineRecorder(config.tracking) as recorder:
        recorder.start(config, "mnist", "f" * 16)
        child = recorder._child("open child", {"stage": "cv"})
        raise exception
    parent = client.get_run(recorder.parent_run_id)
    assert parent.info.status == status
    assert client.get_run(child).info.status == status, "open children end with the parent"
    if status == "FAILED":
        assert parent.data.tags["error"] == "RuntimeError: boom second line"


def test_stale_runs_of_dead_processes_are_marked_failed(store_uri, client, tmp_path_factory):
    config = _config(store_uri, "stale")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # An explicit location: the default is relative to where the store was first opened.
    location = (tmp_path_factory.mktemp("stale") / "artifacts").as_uri()
    experiment_id = client.create_experiment("stale", artifact_location=location)
    tags = {"host": socket.gethostname()}
    stale = client.create_run(experiment_id, tags={**tags, "pid": str(dead.pid)}).info.run_id
    alive = client.create_run(experiment_id, tags={**tags, "pid": str(os.getpid())}).info.run_id
    foreign = client.create_run(experiment_id, tags={"host": "elsewhere", "pid": "1"}).info.run_id

    with PipelineRecorder(config.tracking) as recorder:
        recorder.start(config, "mnist", "f" * 16)
    assert recorder.stale_run_ids == [stale]
    assert client.get_run(stale).info.status == "FAILED"
    assert client.get_run(alive).info.status == "RUNNING"
    assert client.get_run(foreign).info.status == "RUNNING"
    for run_id in (alive, foreign):
        client.set_terminated(run_id, "FINISHED")
    assert mark_stale_runs_failed("stale", store_uri) == []


def test_credentials_in_config_are_not_logged(store_uri, client, tmp_path):
    config = _config(store_uri, "secrets").replace(
        {"execution.runner": "dask", "execution.dask_address": "tcp://bob:pw123@sched:8786"}
    )
    with PipelineRecorder(config.tracking) as recorder:
        run_id = recorder.start(config, "mnist", "f" * 16)
    params = client.get_run(run_id).data.params
    assert params["execution.dask_address"] == "tcp://sched:8786"
    folder = client.download_artifacts(run_id, "config.json", str(tmp_path))
    assert "pw123" not in Path(folder).read_text(encoding="utf-8")


def test_corrupt_store_raises_tracking_error(tmp_path):
    (tmp_path / "mlflow.db").write_text("not a database", encoding="utf-8")
    config = _config(f"sqlite:///{tmp_path}/mlflow.db", "never")
    with pytest.raises(TrackingError, match="cannot use MLflow store .*not a database"):
        PipelineRecorder(config.tracking).start(config, "mnist", "f" * 16)


@pytest.mark.parametrize("final_model", [True, False])
def test_warm_up_loads_what_the_final_logging_needs(tmp_path, final_model):
    # A fresh process: the package map and mlflow.pyfunc are per-process, first-use state.
    script = tmp_path / "warm.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, sys
            from mlflow.utils import requirements_utils
            from pipeline.config import TrackingConfig
            from pipeline.tracking import PipelineRecorder

            def state():
                # Fonts: the module is imported with pipeline.tracking; the first draw loads one.
                from matplotlib import font_manager

                return [requirements_utils._MODULES_TO_PACKAGES is not None,
                        "mlflow.pyfunc" in sys.modules,
                        font_manager._get_font.cache_info().currsize > 0]

            before = state()
            recorder = PipelineRecorder(TrackingConfig(tracking_uri="sqlite:///{tmp_path}/m.db"))
            recorder.warm_up(final_model={final_model})
            recorder._warmed_up()
            print(json.dumps([before, state()]))
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    before, after = json.loads(done.stdout.strip().splitlines()[-1])
    assert before == [False, False, False]
    assert after == [final_model, final_model, True]


def test_ending_the_recorder_waits_for_its_warm_up(store_uri, client, monkeypatch):
    # A run that fails at once must not leave the warm-up importing at interpreter exit. The
    # fake warm-up blocks until the test releases it, so nothing depends on how long the
    # recorder's writes take: ending the recorder must be seen waiting for that thread.
    warm_up_threads, finished = [], []
    warm_up_running, release = threading.Event(), threading.Event()

    def blocked_warm_up(final_model: bool) -> None:
        warm_up_threads.append(threading.current_thread())
        warm_up_running.set()
        release.wait(timeout=600)  # hang guard only: the test releases it
        finished.append(final_model)

    joiners = []
    waiting_for_warm_up = threading.Event()
    real_join = threading.Thread.join

    def observed_join(self, timeout=None):
        if warm_up_threads and self is warm_up_threads[0]:
            joiners.append(threading.current_thread())
            waiting_for_warm_up.set()
        return real_join(self, timeout)

    monkeypatch.setattr(pipeline.tracking, "_warm_up_logging", blocked_warm_up)
    monkeypatch.setattr(threading.Thread, "join", observed_join)
    config = _config(store_uri, "warm-up-exit")
    recorder = PipelineRecorder(config.tracking)
    raised = []

    def failing_execution() -> None:
        try:
            with recorder:
                recorder.start(config, "mnist", "f" * 16)
                recorder.warm_up(final_model=True)
                warm_up_running.wait(timeout=600)
                raise RuntimeError("the sweep failed at once")
        except BaseException as exc:  # noqa: BLE001 -- checked below, in the test's thread
            raised.append(exc)

    execution = threading.Thread(target=failing_execution, name="failing-execution")
    execution.start()
    try:
        # Until the execution waits for the warm-up, or ends without doing so.
        while execution.is_alive() and not waiting_for_warm_up.wait(timeout=0.05):
            pass
        assert waiting_for_warm_up.is_set(), f"the recorder ended without waiting: {raised}"
        assert joiners == [execution], f"waited for by {joiners}, not by the ending execution"
        assert execution.is_alive(), "the execution ended while its warm-up was still running"
        assert warm_up_threads[0].is_alive() and finished == [], "the warm-up was not held"
    finally:
        release.set()
        execution.join(timeout=600)

    assert not execution.is_alive(), "the execution did not end once the warm-up finished"
    assert not warm_up_threads[0].is_alive(), "the warm-up thread outlived the recorder"
    assert finished == [True], f"the warm-up did not finish: {finished}"
    assert len(raised) == 1 and isinstance(raised[0], RuntimeError), f"raised: {raised!r}"
    parent = client.get_run(recorder.parent_run_id)
    assert parent.info.status == "FAILED", f"parent run {parent.info.status}"
    assert parent.data.tags.get("error") == "RuntimeError: the sweep failed at once", (
        parent.data.tags
    )
