"""Publishing a run record to MLflow (``pipeline.tracking.publish``), the registry and the model.

Real components only: a real record (the bundled ``mnist-sample``, a 784-8-10 network, 2 lambdas
x 2 folds, 2 epochs, final model 3 epochs) built once per module, published to real SQLite stores
(copies of the session's empty store), read back through ``MlflowClient``. Faults are injected by
making one ``MlflowClient`` method fail once.

``publish`` only reads a record: tests that need another one (another id, another claimed
accuracy, a part missing) copy the module's record and edit the copy's JSON through
``pipeline.record.write_json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import inspect
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import matplotlib.image
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import pipeline.tracking.publish as publish_module
from mlp import MLP
from pipeline.config import PipelineConfig, build_config
from pipeline.data import fingerprint_test_set
from pipeline.errors import PipelineError, TrackingError
from pipeline.record import RecordError, RunRecord, fold_file, read_json, write_json
from pipeline.selection import cv_table, select_candidate
from pipeline.tracking.model import load_network, logged_model
from pipeline.tracking.publish import (
    MODEL_TAG,
    PART_TAG,
    RECORD_TAG,
    NotPublishedError,
    publish,
    recorded,
)
from pipeline.tracking.store import artifact_location, default_tracking_uri, open_store
from pipeline.training import load_configured_dataset, predict_test, train_final, train_fold

REPO = Path(__file__).resolve().parents[2]
EPOCHS = 2
FINAL_EPOCHS = 3
L2_GRID = [1e-4, 1e-2]
FOLDS = 2
EXPERIMENT = "publish-tests"
MODEL_NAME = "mlp-mnist-sample"  # tracking.registered_model "mlp-{dataset}"
PREFECT_RUN = {"id": "0b1c2d3e-flow-run", "name": "brave-fox"}
FIGURES = ("cv_lambda.png", "training_curves.png", "confusion_matrix.png", "misclassified.png")
PARENT_ARTIFACTS = {"config.json", "cv_results.csv", *FIGURES}  # the model: a logged model


# ------------------------------------------------------------------------------------ helpers
def _store(folder: Path, empty_store: Path) -> str:
    """A fresh SQLite store in ``folder``: a copy of the session's empty one."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(empty_store, folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


def _fill(record: RunRecord, trained: SimpleNamespace, parts=("folds", "cv", "final")) -> None:
    """Write the module's results into ``record``, as the flow does."""
    if "folds" in parts:
        for result in trained.folds:
            record.add_fold(result)
    if "cv" in parts:
        record.add_cv(trained.table, trained.best)
    if "final" in parts:
        dataset = trained.dataset
        record.add_final(
            trained.final, trained.evaluation, dataset.X_test, dataset.y_test,
            trained.predicted, trained.test_set,
        )  # fmt: skip


def _edit(record: RunRecord, name: str, kind: str, edit: Callable[[dict], None]) -> None:
    """Change a record file's data and write it back with its new checksum."""
    data = read_json(record.folder / name, kind)
    edit(data)
    write_json(record.folder / name, kind, data)


def _clone(record: RunRecord, root: Path, **run_changes: Any) -> RunRecord:
    """A copy of ``record`` under ``root``; ``run_changes`` go into its run.json (``id``
    also names the folder). The copy is another record when its id differs."""
    folder = root / run_changes.get("id", record.folder.name)
    shutil.copytree(record.folder, folder)
    copy = RunRecord(folder)
    if run_changes:
        _edit(copy, "run.json", "run", lambda run: run.update(run_changes))
    return copy


def _claiming(record: RunRecord, root: Path, name: str, accuracy: float, **final: Any):
    """Another record (id ``name``) whose final model claims ``accuracy`` (and ``final``
    fields such as ``test_set``) with the same weights."""
    copy = _clone(record, root, id=name)

    def edit(data: dict) -> None:
        data["evaluation"]["accuracy"] = accuracy
        data.update(final)

    _edit(copy, "final.json", "final", edit)
    return copy


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    """Every artifact path of a run, folders with a trailing slash."""
    found = []
    for item in client.list_artifacts(run_id, path):
        found.append(item.path + ("/" if item.is_dir else ""))
        if item.is_dir:
            found += _artifacts(client, run_id, item.path)
    return sorted(found)


def _runs(client: MlflowClient, experiment_id: str, stage: str | None = None) -> list[Any]:
    where = f"tags.stage = '{stage}'" if stage else ""
    return client.search_runs(
        [experiment_id], where, run_view_type=ViewType.ALL, max_results=1000
    )  # fmt: skip


def mlflow_state(client: MlflowClient, experiment_id: str) -> dict[str, Any]:
    """What an experiment and the registry hold, without run ids: comparable across stores.

    Runs are grouped by part (``parent <record id>``, ``fold ...``, ``final``): a part with two
    runs shows up as a list of two. Metric histories are every point (step, time, value).
    """
    runs = _runs(client, experiment_id)
    models = client.search_logged_models(experiment_ids=[experiment_id])
    ids = [run.info.run_id for run in runs] + [model.model_id for model in models]

    def scrub(text: str) -> str:
        for some_id in ids:
            text = text.replace(some_id, "<id>")
        return text

    state: dict[str, Any] = {"runs": {}, "versions": [], "aliases": {}}
    for run in runs:
        tags = run.data.tags
        part = tags.get(PART_TAG) or f"parent {tags.get(RECORD_TAG)}"
        state["runs"].setdefault(part, []).append(
            {
                "status": run.info.status,
                "start_time": run.info.start_time,
                "end_time": run.info.end_time,
                "name": run.info.run_name,
                "params": dict(run.data.params),
                "tags": {key: scrub(value) for key, value in tags.items()},
                "metrics": {
                    key: sorted(
                        (m.step, m.timestamp, repr(m.value))
                        for m in client.get_metric_history(run.info.run_id, key)
                    )
                    for key in run.data.metrics
                },
                "artifacts": _artifacts(client, run.info.run_id),
                "outputs": [o.step for o in run.outputs.model_outputs] if run.outputs else [],
            }
        )
    parts = {run.info.run_id: run.data.tags.get(PART_TAG, "parent") for run in runs}
    state["models"] = sorted(
        (
            parts.get(model.source_run_id, "?"), model.name, str(model.status),
            sorted(model.params.items()),
            sorted((k, scrub(v)) for k, v in model.tags.items()),
            sorted((m.key, repr(m.value)) for m in model.metrics or []),
            sorted(item.path for item in client.list_logged_model_artifacts(model.model_id)),
        )
        for model in models
    )  # fmt: skip
    for model in client.search_registered_models():
        state["aliases"][model.name] = {k: str(v) for k, v in model.aliases.items()}
        for version in client.search_model_versions(f"name = '{model.name}'"):
            state["versions"].append(
                (
                    version.name,
                    str(version.version),
                    scrub(version.run_id or ""),
                    dict(version.tags),
                )
            )
    state["versions"].sort()
    return state


def _differences(before: Any, after: Any, path: str = "") -> list[str]:
    """Where two ``mlflow_state`` values differ: ``path: before -> after`` for each leaf."""
    if isinstance(before, dict) and isinstance(after, dict):
        pairs = [(before.get(k), after.get(k), f"{path}/{k}") for k in {*before, *after}]
        return [line for pair in sorted(pairs, key=lambda p: p[2]) for line in _differences(*pair)]
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [line for i, (b, a) in enumerate(zip(before, after, strict=True))
                for line in _differences(b, a, f"{path}[{i}]")]  # fmt: skip
    if isinstance(before, list) and isinstance(after, list):
        added = [x for x in after if x not in before]
        return [
            f"{path}: added {added!r:.300}, removed {[x for x in before if x not in after]!r:.300}"
        ]
    return [] if before == after else [f"{path}: {before!r:.200} -> {after!r:.200}"]


def _counts(state: dict[str, Any]) -> dict[str, int]:
    """How many runs each part has, e.g. {"final": 1, "fold 0.0001 0": 1, ...}."""
    return {part: len(runs) for part, runs in state["runs"].items()}


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> SimpleNamespace:
    """Real trainings on the bundled sample: the results a record is made of."""
    root = tmp_path_factory.mktemp("trained")
    config = build_config(
        overrides={
            "data.dataset": "mnist-sample",
            "data.limit_train": 600,
            "data.limit_test": 300,
            "model.hidden_sizes": [8],
            "training.epochs": EPOCHS,
            "training.final_epochs": FINAL_EPOCHS,
            "cv.l2_lambdas": L2_GRID,
            "cv.folds": FOLDS,
            "execution.runner": "thread",
            "execution.cache_dir": str(root / "cache"),
            "tracking.experiment": EXPERIMENT,
        }
    )
    dataset = load_configured_dataset(config.data)
    folds = [
        train_fold(config, dataset, {"training.l2_lambda": l2}, fold)
        for l2 in L2_GRID
        for fold in range(FOLDS)
    ]
    table = cv_table(folds)
    best = select_candidate(table)
    final = train_final(config, dataset, best)
    evaluation, predicted = predict_test(final, dataset)
    return SimpleNamespace(
        root=root, config=config, dataset=dataset, folds=folds, table=table, best=best,
        final=final, evaluation=evaluation, predicted=predicted,
        test_set=fingerprint_test_set(dataset.X_test, dataset.y_test),
    )  # fmt: skip


@pytest.fixture(scope="module")
def reference(trained, tmp_path_factory, _empty_store) -> SimpleNamespace:
    """The module's complete record, published once to its own store."""
    record = RunRecord.create(
        trained.config,
        flow="mlp-pipeline",
        dataset=trained.dataset.summary(),
        prefect_flow_run=PREFECT_RUN,
    )
    _fill(record, trained)
    record.finish("FINISHED", summary={"wall_seconds": 12.5})
    uri = _store(tmp_path_factory.mktemp("reference-store"), _empty_store)
    published = publish(record, uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    return SimpleNamespace(
        record=record, run=record.run(), uri=uri, published=published, client=client,
        experiment_id=experiment_id, parent=client.get_run(published.run_id),
        state=mlflow_state(client, experiment_id),
    )  # fmt: skip


@pytest.fixture()
def fresh(tmp_path, _empty_store) -> SimpleNamespace:
    """A fresh store for one test: its URI, and a client on it."""
    uri = _store(tmp_path / "store", _empty_store)
    return SimpleNamespace(uri=uri, client=MlflowClient(tracking_uri=uri, registry_uri=uri))


def _experiment_id(client: MlflowClient) -> str:
    return client.get_experiment_by_name(EXPERIMENT).experiment_id


@pytest.fixture()
def mlflow_uri():
    """Set MLflow's global tracking URI for a test (plain ``mlflow.*`` calls), then restore it;
    the ``sys.path`` entries a loaded pyfunc model adds are removed too."""
    before, path = mlflow.get_tracking_uri(), list(sys.path)

    def use(uri: str) -> None:
        mlflow.set_tracking_uri(uri)

    yield use
    mlflow.set_tracking_uri(before)
    sys.path[:] = path


# ------------------------------------------------------------------------------------ the parent
def test_the_parent_run_says_what_ran(reference):
    # Arrange
    parent, run = reference.parent, reference.run
    tracked = subprocess.run(
        ["git", "ls-files", "--error-unmatch", "pipeline/tracking/publish.py"],
        cwd=REPO, capture_output=True, check=False,
    ).returncode == 0  # fmt: skip
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
    ).stdout.strip()

    # Assert
    parents = _runs(reference.client, reference.experiment_id, "pipeline")
    assert [p.info.run_id for p in parents] == [parent.info.run_id], "one parent run"
    tags = parent.data.tags
    expected = {
        "stage": "pipeline", "flow": "mlp-pipeline", "host": socket.gethostname(),
        "pid": str(os.getpid()), RECORD_TAG: run["id"],
        "prefect.flow_run_id": PREFECT_RUN["id"], "prefect.flow_run_name": PREFECT_RUN["name"],
        "model_uri": f"runs:/{parent.info.run_id}/model", MODEL_TAG: "true",
        "registered_model": MODEL_NAME, "registered_model_version": "1", "champion": "true",
        "mlflow.source.name": "mlp-pipeline run", "mlflow.user": getpass.getuser(),
    }  # fmt: skip
    assert {key: tags.get(key) for key in expected} == expected, tags
    assert tags.get("mlflow.source.git.commit") == (head if tracked else None), "git commit"
    assert "error" not in tags, tags["error"]
    assert parent.info.run_name == "mlp-pipeline mnist-sample brave-fox", parent.info.run_name
    assert parent.info.status == "FINISHED", parent.info.status
    assert (parent.info.start_time, parent.info.end_time) == (run["start_time"], run["end_time"])
    assert mlflow.active_run() is None, "publish left a fluent run active"


def test_the_parent_run_description_says_what_came_out(reference, trained):
    note = reference.parent.data.tags["mlflow.note.content"]
    lam, cv_accuracy = trained.final.l2_lambda, trained.table["mean_val_accuracy"].max()
    assert note == (
        "**mlp-pipeline** on mnist-sample (Prefect flow run brave-fox): finished.\n\n"
        f"Cross-validation: {len(L2_GRID)} candidates x {FOLDS} folds (grid); chosen "
        f"lambda={lam:g}, mean validation accuracy {cv_accuracy:.4f}.\n\n"
        f"Final model: test accuracy {trained.evaluation.accuracy:.4f} on 300 images.\n\n"
        f"Registered as {MODEL_NAME} version 1 (champion)."
    ), note


def _inputs(run: Any) -> list[tuple[str, str, str | None]]:
    return sorted(
        (i.dataset.name, {t.key: t.value for t in i.tags}["mlflow.data.context"], i.dataset.profile)
        for i in run.inputs.dataset_inputs
    )


def test_every_run_names_its_datasets(reference, trained):
    # The runs list's Datasets column: the parent's splits, each child's part of the training set.
    source = trained.dataset.summary()["source"]
    assert _inputs(reference.parent) == [
        ("mnist-sample-test", "testing", '{"num_rows": 300}'),
        ("mnist-sample-train", "training", '{"num_rows": 600}'),
    ]
    assert {i.dataset.source for i in reference.parent.inputs.dataset_inputs} == {source}
    folds = _runs(reference.client, reference.experiment_id, "cv")
    assert len(folds) == len(L2_GRID) * FOLDS
    for run in folds:
        part = f"fold {int(run.data.params['fold']) + 1} of {FOLDS}, seed 0"
        assert _inputs(run) == [
            (f"mnist-sample-train (all but {part})", "training", None),
            (f"mnist-sample-train ({part})", "validation", None),
        ], run.info.run_name
    (final,) = _runs(reference.client, reference.experiment_id, "final")
    assert _inputs(final) == [("mnist-sample-train", "training", '{"num_rows": 600}')]
    digests = {i.dataset.digest for run in [reference.parent, *folds, final]
               for i in run.inputs.dataset_inputs}  # fmt: skip
    assert len(digests) == 2 + 2 * FOLDS, "one digest per distinct split"


def test_the_parent_params_are_the_config_dataset_and_version(reference, trained):
    # Arrange
    expected = {
        key: json.dumps(value) if isinstance(value, list) else str(value)
        for key, value in trained.config.flat().items()
    }
    expected.update(
        {
            "dataset.name": "mnist-sample",
            "dataset.fingerprint": trained.dataset.fingerprint,
            "package.version": reference.run["package_version"],
            # The chosen values as params (MLflow's charts plot params as values).
            "best.training.l2_lambda": str(trained.best["training.l2_lambda"]),
        }
    )

    # Assert
    params = reference.parent.data.params
    assert params == expected, {k: (params.get(k), v) for k, v in expected.items()}
    assert params["cv.l2_lambdas"] == "[0.0001, 0.01]", params["cv.l2_lambdas"]
    assert params["model.hidden_sizes"] == "[8]", params["model.hidden_sizes"]


def test_the_parent_metrics_summarize_the_record(reference, trained):
    # Arrange
    client, parent_id = reference.client, reference.parent.info.run_id
    record = reference.record
    best = trained.best["training.l2_lambda"]
    chosen = trained.table.loc[trained.table["l2_lambda"] == best, "mean_val_accuracy"]
    expected = {
        "best_l2_lambda": (best, record.cv()["time"]),
        "cv_best_mean_val_accuracy": (float(chosen.iloc[0]), record.cv()["time"]),
        "test_accuracy": (trained.evaluation.accuracy, record.final()["time"]),
        "test_loss": (trained.evaluation.loss, record.final()["time"]),
        "wall_seconds": (12.5, reference.run["end_time"]),
    }

    # Act
    found = {
        key: [(m.value, m.timestamp, m.step) for m in client.get_metric_history(parent_id, key)]
        for key in reference.parent.data.metrics
        if not key.startswith("cv_mean_")
    }

    # Assert: one point each, at the time the record wrote it.
    assert found == {key: [(v, t, 0)] for key, (v, t) in expected.items()}, found


def test_the_parent_has_each_candidates_mean_validation_curve(reference, trained):
    # Two executions compare by curve on their parents: one curve per candidate, step = epoch.
    client, parent_id = reference.client, reference.parent.info.run_id
    for l2 in L2_GRID:
        folds = [f for f in trained.folds if f.l2_lambda == l2]
        for key in ("val_accuracy", "val_loss"):
            history = client.get_metric_history(parent_id, f"cv_mean_{key}/lambda {l2:g}")
            by_hand = np.mean([f.history[key] for f in folds], axis=0)
            assert [m.step for m in history] == list(range(1, EPOCHS + 1)), (l2, key)
            np.testing.assert_allclose([m.value for m in history], by_hand, rtol=1e-12)
            assert {m.timestamp for m in history} == {reference.record.cv()["time"]}


def test_the_parent_artifacts_are_the_records_files(reference, trained, tmp_path):
    # Arrange
    client, parent_id = reference.client, reference.parent.info.run_id

    # Act
    names = {item.path for item in client.list_artifacts(parent_id)}
    folder = Path(client.download_artifacts(parent_id, "", str(tmp_path)))

    # Assert
    assert names == PARENT_ARTIFACTS, (
        f"missing {PARENT_ARTIFACTS - names}, extra {names - PARENT_ARTIFACTS}"
    )
    for png in FIGURES:
        image = matplotlib.image.imread(folder / png)
        assert image.size > 0 and image.std() > 0, f"{png} unreadable or blank"
        assert (folder / png).read_bytes() == (reference.record.folder / png).read_bytes(), png
    table = pd.read_csv(folder / "cv_results.csv")
    pd.testing.assert_frame_equal(table, trained.table, check_dtype=False)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert config == trained.config.model_dump(mode="json"), "config.json is not the config"
    location = client.get_experiment(reference.experiment_id).artifact_location
    assert location == artifact_location(reference.uri), "artifacts not beside the store"
    assert Path(reference.parent.info.artifact_uri.removeprefix("file://")).is_relative_to(
        Path(reference.uri.removeprefix("sqlite:///")).parent
    ), reference.parent.info.artifact_uri


# ------------------------------------------------------------------------------------ children
def _check_times(run: Any, history: dict[str, list[float]], seconds: float) -> tuple[int, int]:
    """A child's start and end are its training's; returns them."""
    end = int(history["wall_time"][-1] * 1000)
    start = end - int(seconds * 1000)
    assert (run.info.start_time, run.info.end_time) == (start, end), (
        f"{run.info.run_name}: ran {run.info.start_time}..{run.info.end_time}, "
        f"trained {start}..{end}"
    )
    return start, end


def test_one_child_per_fold_with_its_epochs(reference, trained):
    # Arrange
    client, parent_id = reference.client, reference.parent.info.run_id
    children = _runs(reference.client, reference.experiment_id, "cv")
    by_fold = {(float(r.data.params["l2_lambda"]), int(r.data.params["fold"])): r for r in children}

    # Assert
    assert len(children) == len(trained.folds) == len(by_fold), "one run per (lambda, fold)"
    for result in trained.folds:
        run = by_fold[(result.l2_lambda, result.fold)]
        name = f"cv lambda={result.l2_lambda:g} fold={result.fold}"
        assert (run.info.run_name, run.info.status) == (name, "FINISHED"), run.info
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parent_id, name
        assert tags["prefect.flow_run_id"] == PREFECT_RUN["id"], "the flow run's tags"
        assert (tags["host"], tags["pid"]) == (socket.gethostname(), str(os.getpid())), tags
        assert run.data.params == {
            "l2_lambda": str(result.l2_lambda), "fold": str(result.fold),
            "seed": str(result.seed),
        }, run.data.params  # fmt: skip
        start, end = _check_times(run, result.history, result.seconds)
        for key in ("train_loss", "train_objective", "train_accuracy", "val_loss",
                    "val_accuracy", "lr"):  # fmt: skip
            points = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
            assert [m.step for m in points] == list(range(1, EPOCHS + 1)), f"{name} {key} steps"
            assert [m.value for m in points] == pytest.approx(result.history[key]), key
            stamps = [m.timestamp for m in points]
            assert all(start <= t <= end for t in stamps), f"{name} {key} at {stamps}"
            assert stamps == [int(t * 1000) for t in result.history["wall_time"]], stamps
        metrics = run.data.metrics
        assert metrics["fold_val_accuracy"] == pytest.approx(result.val_accuracy), name
        assert metrics["fold_val_loss"] == pytest.approx(result.val_loss), name
        assert metrics["fold_train_accuracy"] == pytest.approx(result.train_accuracy), name
        assert metrics["fold_train_loss"] == pytest.approx(result.train_loss), name
        assert (metrics["epochs_run"], metrics["train_seconds"]) == (
            EPOCHS, pytest.approx(result.seconds)
        ), metrics  # fmt: skip
        assert "seconds" not in metrics and "epoch" not in metrics, "bookkeeping logged"


def test_the_final_child_holds_the_final_training(reference, trained):
    # Arrange
    client = reference.client
    finals = _runs(client, reference.experiment_id, "final")

    # Assert
    assert len(finals) == 1, f"{len(finals)} final runs"
    run = finals[0]
    best = trained.best["training.l2_lambda"]
    assert run.info.run_name == f"final lambda={best:g}", run.info.run_name
    assert run.info.status == "FINISHED", run.info.status
    assert run.data.tags["mlflow.parentRunId"] == reference.parent.info.run_id
    assert run.data.params == {"l2_lambda": str(best), "epochs": str(FINAL_EPOCHS)}
    start, end = _check_times(run, trained.final.history, trained.final.seconds)
    points = sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)
    assert [m.step for m in points] == list(range(1, FINAL_EPOCHS + 1)), points
    assert [m.value for m in points] == pytest.approx(trained.final.history["train_loss"])
    assert all(start <= m.timestamp <= end for m in points), points
    metrics = run.data.metrics
    assert metrics["test_accuracy"] == pytest.approx(trained.evaluation.accuracy), metrics
    assert metrics["test_loss"] == pytest.approx(trained.evaluation.loss), metrics
    assert "val_loss" not in metrics, "no validation data: no val_* metrics (all NaN)"
    assert _artifacts(client, run.info.run_id) == [], "the model lives on the parent"


def test_a_diverged_fold_is_tagged_and_its_partial_history_kept(trained, fresh, tmp_path):
    # Arrange: a real divergence (a huge learning rate).
    config = trained.config.replace(
        {"training.lr": 1e6, "training.optimizer": "sgd", "execution.cache_dir": str(tmp_path)}
    )
    result = train_fold(config, trained.dataset, {"training.l2_lambda": 1.0}, 0)
    assert result.diverged, "the training did not diverge"
    record = RunRecord.create(
        config, flow="cv", dataset={"name": "mnist-sample", "fingerprint": "f"}
    )
    record.add_fold(result)
    record.finish("FINISHED")

    # Act
    publish(record, fresh.uri)

    # Assert
    [run] = _runs(fresh.client, _experiment_id(fresh.client), "cv")
    assert run.info.status == "FINISHED", run.info.status
    assert run.data.tags["diverged"] == "true", run.data.tags
    assert run.data.tags["diverged_message"] == result.message, run.data.tags
    assert math.isnan(run.data.metrics["fold_val_accuracy"]), run.data.metrics
    history = fresh.client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.value for m in history] == pytest.approx(result.history["train_loss"]), history
    assert "val_loss" not in run.data.metrics, "an all-NaN column is not logged"


# ------------------------------------------------------------------------------------ the model
def test_the_model_loads_with_plain_mlflow_and_predicts_the_records_labels(
    reference, trained, mlflow_uri
):
    # Arrange
    mlflow_uri(reference.uri)
    images = trained.dataset.X_test.astype(np.float32)

    # Act
    model = mlflow.pyfunc.load_model(f"runs:/{reference.parent.info.run_id}/model")
    labels = model.predict(images)

    # Assert
    assert labels.dtype == np.int64 and labels.shape == (len(images),), (labels.dtype, labels.shape)
    np.testing.assert_array_equal(labels, trained.predicted, err_msg="the logged model differs")


def test_load_network_reads_the_weights_and_the_dataset(reference, trained):
    # Arrange
    weights = MLP.load(reference.record.folder / "final" / "weights.npz")
    run_id = reference.parent.info.run_id

    for uri in (
        f"runs:/{run_id}/model",
        f"models:/{MODEL_NAME}/1",
        f"models:/{MODEL_NAME}@champion",
    ):
        # Act
        network, normalizer, (dataset, _) = load_network(uri, reference.uri)

        # Assert
        assert dataset == "mnist-sample", f"{uri}: dataset {dataset!r}"
        assert network.architecture == weights.architecture, uri
        for mine, theirs in zip(network.params, weights.params, strict=True):
            np.testing.assert_array_equal(mine, theirs, err_msg=uri)
        assert normalizer.to_dict() == trained.final.normalizer.to_dict(), uri


def test_a_models_uri_without_version_or_alias_says_what_it_needs(reference):
    with pytest.raises(PipelineError, match=r"name a version \(models:/NAME/VERSION\)"):
        load_network(f"models:/{MODEL_NAME}", reference.uri)


def test_a_half_uploaded_model_is_refused_in_one_line(reference, fresh, monkeypatch):
    # Arrange: the upload of the model's files failed; its logged model stays PENDING.
    fault = _publish_with_fault(reference.record, fresh.uri, monkeypatch, "log_model_artifacts")
    monkeypatch.undo()
    (parent,) = _runs(fresh.client, _experiment_id(fresh.client), "pipeline")

    # Act / Assert
    with pytest.raises(PipelineError, match="is PENDING: its upload did not finish") as info:
        load_network(f"runs:/{parent.info.run_id}/model", fresh.uri)
    assert "\n" not in str(info.value) and fault.fired, str(info.value)


@pytest.mark.parametrize(
    "uri",
    ["models:/no-such-model@champion", "runs:/0123456789abcdef/model", f"models:/{MODEL_NAME}/9"],
)
def test_load_network_of_an_unknown_model_is_one_line(reference, uri):
    with pytest.raises(PipelineError, match="cannot load model") as info:
        load_network(uri, reference.uri)
    assert "\n" not in str(info.value), str(info.value)


@pytest.mark.slow
def test_the_logged_model_carries_its_code_and_needs_no_project_install(
    reference, trained, tmp_path
):
    """The package is on no index: the model must load with numpy and mlflow alone."""
    model_dir = _model_dir(reference.client, reference.parent.info.run_id)
    requirements = (model_dir / "requirements.txt").read_text(encoding="utf-8").split()
    np.save(tmp_path / "images.npy", trained.dataset.X_test.astype(np.float32))
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
    assert result["labels"] == trained.predicted.tolist(), "the model's own code predicts otherwise"
    assert Path(result["mlp"]).is_relative_to(model_dir), result["mlp"]
    assert sorted(r.split("==")[0] for r in requirements) == ["mlflow", "numpy"], requirements


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_registered_models_labels(
    reference, trained, fresh, tmp_path
):
    # Arrange: the registered version served by MLflow's own scoring server, on loopback, from
    # a store of its own (serving a registered model writes registered_model_meta beside it).
    publish(reference.record, fresh.uri)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # The scoring server is started as `uvicorn ...`: the environment's scripts on the PATH, as
    # in an activated virtual environment.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": fresh.uri, "PATH": path}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL_NAME}/1",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    images = trained.dataset.X_test[:20].reshape(-1, 28, 28)  # uint8 28x28, as the files hold

    def invoke(body: dict) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())["predictions"]

    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping"
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2),
            ):
                break
            time.sleep(0.5)

        # Act
        labels = invoke({"inputs": images.tolist()})
        probabilities = invoke({"inputs": images.tolist(), "params": {"probabilities": True}})
        with pytest.raises(urllib.error.HTTPError) as refused:
            invoke({"inputs": (images[:, :27, :27]).tolist()})
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)

    # Assert
    assert labels == trained.predicted[:20].tolist(), labels
    probabilities = np.asarray(probabilities)
    assert probabilities.shape == (20, 10), probabilities.shape
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(probabilities.argmax(axis=1), trained.predicted[:20])
    # MLflow's scoring server answers 400 with its own message; the model's one-line reason is
    # the last line of the stack trace it sends along.
    error = json.loads(refused.value.read())
    assert refused.value.code == 400, error
    assert "or (n_samples, 28, 28) images, got (20, 27, 27)" in error["stack_trace"], error


@pytest.mark.slow
def test_git_commit_only_from_a_checkout_that_tracks_the_code(tmp_path):
    """A copy installed inside someone's repository must not log that repository's commit."""
    # Arrange: a repository with one commit, and the package copied inside it, untracked.
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q", str(tmp_path)], check=True)
    subprocess.run(
        [*git, "-C", str(tmp_path), "commit", "-q", "--allow-empty", "-m", "x"], check=True
    )
    site = tmp_path / ".venv" / "site"
    shutil.copytree(REPO / "pipeline", site / "pipeline")
    shutil.copytree(REPO / "mlp", site / "mlp")
    code = "import pipeline.record as r; print(r.__file__); print(r.git_commit())"

    # Act
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(site)}, cwd=tmp_path,
    )  # fmt: skip

    # Assert
    where, commit = result.stdout.split()
    assert where.startswith(str(site)), f"imported the wrong copy: {where}"
    assert commit == "None", f"logged the surrounding repository's commit {commit}"


# ------------------------------------------------------------------------------------ idempotence
def test_publishing_again_changes_nothing(reference):
    # Act
    again = publish(reference.record, reference.uri)

    # Assert
    assert again == reference.published, (again, reference.published)
    state = mlflow_state(reference.client, reference.experiment_id)
    assert _counts(state) == _counts(reference.state), _counts(state)
    assert state == reference.state, "a second publish changed the MLflow record: " + "; ".join(
        _differences(reference.state, state)
    )


def test_a_partial_record_then_the_complete_one(reference, fresh, tmp_path):
    # Arrange: the record as it stood after the sweep, before the CV summary.
    partial = _clone(
        reference.record, tmp_path / "records", status="RUNNING", end_time=None, summary={}
    )
    for name in ("cv.json", "final.json", "final", *FIGURES):
        path = partial.folder / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()

    # Act 1
    first = publish(partial, fresh.uri)
    midway = mlflow_state(fresh.client, _experiment_id(fresh.client))

    # Assert 1
    assert first.registration is None, "nothing to register yet"
    parent = fresh.client.get_run(first.run_id)
    assert parent.info.status == "RUNNING", "the record is still running"
    assert parent.data.metrics == {}, parent.data.metrics
    assert _artifacts(fresh.client, first.run_id) == ["config.json"], "only the config yet"
    assert sorted(_counts(midway)) == sorted(
        [f"parent {reference.run['id']}"]
        + [f"fold {r.l2_lambda!r} {r.fold}" for r in reference.record.folds()]
    ), _counts(midway)

    # Act 2: the rest of the record arrives.
    shutil.copytree(reference.record.folder, partial.folder, dirs_exist_ok=True)
    second = publish(partial, fresh.uri)

    # Assert 2
    assert second.run_id == first.run_id, "a second parent run"
    state = mlflow_state(fresh.client, _experiment_id(fresh.client))
    assert _counts(state) == _counts(reference.state), _counts(state)
    assert state == reference.state, "completed in two steps, the record differs"


# ------------------------------------------------------------------------------------ faults
def _label(client: MlflowClient, method: str, bound: dict[str, Any]) -> str:
    """Which step of ``publish`` a client call is, e.g. ``log_batch cv`` or
    ``log_artifact config.json``."""

    def stage(run_id: str) -> str:
        return client.get_run(run_id).data.tags.get("stage", "?")

    if method == "create_run":
        return f"create_run {(bound.get('tags') or {}).get('stage', '?')}"
    if method == "log_batch":
        where = stage(bound["run_id"])
        if where == "pipeline":
            return f"log_batch pipeline {'metrics' if bound.get('metrics') else 'params'}"
        return f"log_batch {where}"
    if method == "set_terminated":
        return f"set_terminated {stage(bound['run_id'])}"
    if method == "log_artifact":
        return f"log_artifact {Path(bound['local_path']).name}"
    if method == "log_artifacts":
        return f"log_artifacts {bound.get('artifact_path')}"
    if method in ("create_logged_model", "finalize_logged_model"):
        return f"{method} {bound.get('name') or bound.get('status')}"
    if method in ("set_tag", "set_model_version_tag"):
        return f"{method} {bound['key']}"
    return method


class Fault:
    """Make the client's call at step ``target`` fail once (the first time it is made).

    ``lost_reply``: the store does the call, then its reply is lost (a timeout after the
    commit). Every call of the method is listed in ``calls`` by its step.
    """

    def __init__(
        self, monkeypatch, client: MlflowClient, target: str, lost_reply=False, calls=None
    ):
        self.method = target.split()[0]
        self.target = target
        self.calls: list[str] = [] if calls is None else calls
        self.fired = False
        real = getattr(client, self.method)
        signature = inspect.signature(real)

        def call(*args, **kwargs):
            bound = signature.bind(*args, **kwargs).arguments
            label = _label(client, self.method, bound)
            self.calls.append(label)
            if self.fired or label != target:
                return real(*args, **kwargs)
            self.fired = True
            if lost_reply:
                real(*args, **kwargs)
            raise MlflowException(f"injected: {label} failed (timeout waiting for the reply)")

        monkeypatch.setattr(client, self.method, call)


def _publish_with_fault(record, uri, monkeypatch, target, lost_reply=False) -> Fault:
    """Publish ``record`` while the step ``target`` fails once; the publish must fail."""
    client, experiment_id = open_store(uri, EXPERIMENT)
    fault = Fault(monkeypatch, client, target, lost_reply)
    with pytest.raises(MlflowException, match="injected"):
        publish(record, uri, store=(client, experiment_id))
    assert fault.fired, f"publish never reached {target}; it called {fault.calls}"
    return fault


def _assert_complete(fresh, reference) -> dict[str, Any]:
    """The store holds the whole record once, as a single clean publish leaves it."""
    state = mlflow_state(fresh.client, _experiment_id(fresh.client))
    assert _counts(state) == _counts(reference.state), f"runs per part: {_counts(state)}"
    versions = [(name, version) for name, version, _, _ in state["versions"]]
    assert versions == [(MODEL_NAME, "1")], f"registered versions {versions}"
    for part, runs in state["runs"].items():
        for key, points in runs[0]["metrics"].items():
            expected = reference.state["runs"][part][0]["metrics"][key]
            assert len(points) == len(expected), f"{part} {key}: {len(points)} points"
    assert state == reference.state, "after the retry, the MLflow record differs"
    return state


def _slow(step: str) -> Any:
    return pytest.param(step, marks=pytest.mark.slow)


# Each step fails once in turn; the unmarked ones keep `pytest -m "not slow"` short.
FINAL_STEPS = [
    _slow("create_run final"),
    _slow("log_batch final"),
    _slow("set_terminated final"),
    _slow("log_artifact training_curves.png"),
    _slow("log_artifact misclassified.png"),
    _slow("create_logged_model model"),
    "log_model_artifacts",
    _slow("finalize_logged_model READY"),
    _slow("log_outputs"),
    _slow("set_tag model_uri"),
    _slow("set_tag mlp_pipeline.model_logged"),
    _slow("create_model_version"),
    _slow("set_model_version_tag test_accuracy"),
    _slow("set_registered_model_alias"),
    _slow("set_tag champion"),
    _slow("log_batch pipeline metrics"),
    _slow("set_terminated pipeline"),
]
CV_STEPS = [
    _slow("create_run pipeline"),
    _slow("log_batch pipeline params"),
    "log_artifact config.json",
    _slow("create_run cv"),
    "log_batch cv",
    _slow("set_terminated cv"),
    _slow("log_artifact cv_results.csv"),
    _slow("log_artifact cv_lambda.png"),
]
LOST_REPLY_STEPS = [
    _slow("create_run pipeline"), "create_run cv", _slow("create_run final"),
    _slow("create_model_version"), _slow("create_logged_model model"),
    _slow("log_model_artifacts"), _slow("log_outputs"),
]  # fmt: skip


def _named_cases() -> set[tuple[str, bool]]:
    """The (step, lost reply) cases the tests above name, each with its own test id."""

    def step(param: Any) -> str:
        return param.values[0] if hasattr(param, "values") else param

    return {(step(p), False) for p in FINAL_STEPS + CV_STEPS} | {
        (step(p), True) for p in LOST_REPLY_STEPS
    }


@pytest.mark.parametrize("step", FINAL_STEPS)
def test_a_retried_final_record_resumes_where_it_failed(
    reference, fresh, monkeypatch, step, reliability_log
):
    """MLflow fails once in the middle of publishing the final model; publishing again
    (``mlp-pipeline publish``) completes it: one run per part, one version, no doubled point."""
    # Act
    _publish_with_fault(reference.record, fresh.uri, monkeypatch, step)
    monkeypatch.undo()
    again = publish(reference.record, fresh.uri)

    # Assert
    _assert_complete(fresh, reference)
    assert again.registration.version == "1" and again.registration.champion, again
    reliability_log(
        f"MLflow failing once in the final record ({step})", survived=True, results_lost=0
    )


@pytest.mark.parametrize("step", CV_STEPS)
def test_a_retried_cv_record_resumes_where_it_failed(
    reference, fresh, monkeypatch, step, reliability_log
):
    """The same for the parent run, a fold's run and the CV summary."""
    # Act
    _publish_with_fault(reference.record, fresh.uri, monkeypatch, step)
    monkeypatch.undo()
    publish(reference.record, fresh.uri)

    # Assert
    _assert_complete(fresh, reference)
    reliability_log(f"MLflow failing once in the CV record ({step})", survived=True, results_lost=0)


@pytest.mark.parametrize("step", LOST_REPLY_STEPS)
def test_a_lost_reply_creates_nothing_twice(reference, fresh, monkeypatch, step, reliability_log):
    """The store did the call but its reply was lost: the retry finds what was made."""
    # Act
    _publish_with_fault(reference.record, fresh.uri, monkeypatch, step, lost_reply=True)
    monkeypatch.undo()
    publish(reference.record, fresh.uri)

    # Assert
    _assert_complete(fresh, reference)
    reliability_log(f"MLflow reply lost once ({step})", survived=True, results_lost=0)


@pytest.mark.slow
def test_every_step_of_publish_survives_a_failure_there(reference, tmp_path, _empty_store):
    """Every distinct client call of a publish, failed once (and its reply lost once): the
    cases the tests above do not name, so that a step added to ``publish`` is covered too."""
    # Arrange: the steps of a clean publish, in order.
    uri = _store(tmp_path / "probe", _empty_store)
    client, experiment_id = open_store(uri, EXPERIMENT)
    steps: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        for method in (
            "create_run", "log_batch", "set_terminated", "log_artifact", "log_artifacts",
            "set_tag", "set_model_version_tag", "create_model_version", "create_registered_model",
            "set_registered_model_alias", "get_model_version_by_alias", "search_model_versions",
            "search_runs", "list_artifacts", "create_logged_model", "log_model_artifacts",
            "finalize_logged_model", "log_outputs", "set_logged_model_tags",
            "search_logged_models", "get_registered_model",
        ):  # fmt: skip
            Fault(patch, client, f"{method} (never)", calls=steps)
        publish(reference.record, uri, store=(client, experiment_id))
    reads = ("get_model_version_by_alias", "search_model_versions", "search_runs", "list_artifacts",
             "search_logged_models", "get_registered_model")  # fmt: skip
    every_case = [
        (step, lost_reply)
        for step in dict.fromkeys(steps)
        for lost_reply in (False, True)
        if not (lost_reply and step.split()[0] in reads)  # a lost read reply is a failed read
    ]
    named = _named_cases()
    assert named <= set(every_case), f"named steps a publish never takes: {named - set(every_case)}"
    cases = [case for case in every_case if case not in named]
    failures = []

    # Act
    for index, (step, lost_reply) in enumerate(cases):
        fresh = SimpleNamespace(uri=_store(tmp_path / f"store-{index}", _empty_store))
        fresh.client = MlflowClient(tracking_uri=fresh.uri, registry_uri=fresh.uri)
        try:
            with pytest.MonkeyPatch.context() as patch:
                _publish_with_fault(reference.record, fresh.uri, patch, step, lost_reply)
            publish(reference.record, fresh.uri)
            _assert_complete(fresh, reference)
        except (AssertionError, pytest.fail.Exception) as exc:
            failures.append(f"{step} (lost reply: {lost_reply}): {str(exc)[:300]}")

    # Assert
    assert len(cases) > 30, f"only {len(cases)} cases besides the named ones: {steps}"
    assert failures == [], "\n".join(failures)


def test_the_model_is_a_logged_model_of_the_parent(reference, trained):
    # Arrange
    client, parent = reference.client, reference.parent

    # Act
    (model,) = client.search_logged_models(experiment_ids=[reference.experiment_id])
    files = {item.path for item in client.list_logged_model_artifacts(model.model_id)}
    mlmodel = Path(model.artifact_location.removeprefix("file://"), "MLmodel").read_text()

    # Assert: what MLflow's own log_model makes: the runs list's Models column, the model page.
    assert (model.name, str(model.status), model.source_run_id) == (
        "model", "READY", parent.info.run_id
    ), model  # fmt: skip
    assert [o.model_id for o in parent.outputs.model_outputs] == [model.model_id], parent.outputs
    assert {"MLmodel", "pyfunc_model.py", "artifacts", "code"} <= files, files
    assert f"model_id: {model.model_id}" in mlmodel, mlmodel
    assert model.params == {"l2_lambda": str(trained.best["training.l2_lambda"])}, model.params
    made_by = {k: parent.data.tags[k] for k in ("mlflow.user", "mlflow.source.name")}
    assert made_by.items() <= model.tags.items(), model.tags
    # Its description (the page's, the Models list's) is its registered version's.
    version = client.get_model_version(MODEL_NAME, "1")
    assert model.tags["mlflow.note.content"] == version.description, model.tags
    assert version.description.startswith("A 784-8-10 MLP trained on mnist-sample"), version
    metrics = {m.key: m.value for m in model.metrics}
    assert metrics == {
        "test_accuracy": trained.evaluation.accuracy, "test_loss": trained.evaluation.loss
    }, metrics  # fmt: skip
    assert parent.data.tags["model_uri"] == f"runs:/{parent.info.run_id}/model", parent.data.tags


# ------------------------------------------------------------------------------------ registry
def test_the_first_version_becomes_the_champion(reference):
    # Assert: the module's publish registered version 1 and crowned it.
    registration = reference.published.registration
    assert (registration.name, registration.version) == (MODEL_NAME, "1"), registration
    assert registration.champion and registration.note == "", registration
    champion = reference.client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(champion.version) == "1", champion
    assert champion.run_id == reference.parent.info.run_id, "registered from another run"
    (model,) = reference.client.search_logged_models(experiment_ids=[reference.experiment_id])
    assert champion.source == model.artifact_location, (champion.source, model)
    versions = json.loads(model.tags["mlflow.modelVersions"])
    assert versions == [{"name": MODEL_NAME, "version": "1"}], model.tags


def test_the_version_tags_say_what_and_where_it_was_tested(reference, trained):
    version = reference.client.get_model_version(MODEL_NAME, "1")
    commit = reference.run.get("git_commit")
    assert version.tags == {
        "test_accuracy": repr(trained.evaluation.accuracy), "test_set": trained.test_set,
        "test_images": "300", "dataset.name": "mnist-sample",
        "dataset.fingerprint": trained.dataset.fingerprint,
        "l2_lambda": repr(trained.final.l2_lambda), **({"git_commit": commit} if commit else {}),
    }, version.tags  # fmt: skip
    lam = f"{trained.final.l2_lambda:g}"
    assert version.description == (
        f"A 784-8-10 MLP trained on mnist-sample (lambda={lam}, chosen by {FOLDS}-fold "
        f"cross-validation); test accuracy {trained.evaluation.accuracy:.4f} on 300 images. "
        f"Run record {reference.run['id']}."
    ), version.description


def test_the_champion_moves_only_on_improvement(reference, fresh, tmp_path):
    # Arrange
    records = [
        _claiming(reference.record, tmp_path, f"run-{i}", accuracy)
        for i, accuracy in enumerate((0.9, 0.8, 0.95))
    ]

    # Act
    outcomes = []
    for record in records:
        registration = publish(record, fresh.uri).registration
        champion = fresh.client.get_model_version_by_alias(MODEL_NAME, "champion").version
        outcomes.append((registration.version, registration.champion, str(champion)))

    # Assert
    assert outcomes == [("1", True, "1"), ("2", False, "1"), ("3", True, "3")], outcomes
    notes = [fresh.client.get_model_version(MODEL_NAME, v).tags.get("champion_comparison")
             for v in ("1", "2", "3")]  # fmt: skip
    assert notes == [None, "champion stays version 1, 0.9000", "beats version 1, 0.9000"], notes
    tags = fresh.client.get_model_version(MODEL_NAME, "2").tags
    assert tags["test_accuracy"] == "0.8" and tags["dataset.name"] == "mnist-sample", tags


@pytest.mark.slow
def test_a_tie_does_not_move_the_champion(reference, fresh, tmp_path):
    for name in ("first", "tie"):
        publish(_claiming(reference.record, tmp_path, name, 0.9), fresh.uri)
    champion = fresh.client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(champion.version) == "1", "an equal accuracy took the alias"


@pytest.mark.slow
def test_a_champion_tested_elsewhere_is_scored_on_this_test_set(
    reference, trained, fresh, tmp_path
):
    """Accuracies on different test sets are not comparable: the champion is scored again,
    from its weights, on the challenger's test set."""
    # Arrange: version 1 claims 0.99 on another test set; its network really scores
    # ``on_this`` on this one.
    on_this = trained.evaluation.accuracy
    first = _claiming(reference.record, tmp_path, "v1", 0.99, test_set="another test set")
    second = _claiming(reference.record, tmp_path, "v2", on_this + 0.001)
    third = _claiming(reference.record, tmp_path, "v3", on_this)

    # Act
    registrations = [publish(record, fresh.uri).registration for record in (first, second, third)]

    # Assert
    assert [(r.version, r.champion) for r in registrations] == [
        ("1", True), ("2", True), ("3", False),
    ], registrations  # fmt: skip
    assert registrations[1].note == f"beats version 1, {on_this:.4f} on this test set", (
        registrations[1].note
    )
    assert registrations[2].note == f"champion stays version 2, {on_this + 0.001:.4f}", (
        registrations[2].note
    )
    assert str(fresh.client.get_model_version_by_alias(MODEL_NAME, "champion").version) == "2"
    parent = fresh.client.get_run(publish(second, fresh.uri).run_id)
    assert parent.data.tags["champion_comparison"] == registrations[1].note, parent.data.tags


@pytest.mark.slow
@pytest.mark.parametrize("figure", ["abc", "nan", None])
def test_a_champion_whose_recorded_figure_is_nonsense_is_scored_from_its_weights(
    reference, trained, fresh, tmp_path, figure
):
    """Anyone who can write the registry can edit a tag: an unusable figure is not trusted
    (nor fatal to every later publish); the champion is scored again from its weights."""
    # Arrange
    on_this = trained.evaluation.accuracy
    publish(_claiming(reference.record, tmp_path, "v1", 0.99), fresh.uri)
    if figure is None:
        fresh.client.delete_model_version_tag(MODEL_NAME, "1", "test_accuracy")
    else:
        fresh.client.set_model_version_tag(MODEL_NAME, "1", "test_accuracy", figure)
    challenger = _claiming(reference.record, tmp_path, "v2", on_this + 0.001)

    # Act
    registration = publish(challenger, fresh.uri).registration

    # Assert
    assert registration.champion, registration
    assert registration.note == f"beats version 1, {on_this:.4f} on this test set", (
        registration.note
    )


def _model_dir(client: MlflowClient, run_id: str) -> Path:
    """Where the logged model of ``run_id`` keeps its files (a local store)."""
    model = logged_model(client, client.get_run(run_id))
    return Path(model.artifact_location.removeprefix("file://"))


def test_a_champion_whose_files_are_gone_stays_and_says_why(reference, fresh, tmp_path):
    # Arrange: the champion's model files are gone (a store cleaned by hand), and the
    # challenger was tested elsewhere: it cannot be compared, so it is not crowned on a guess.
    first = publish(_claiming(reference.record, tmp_path, "v1", 0.5), fresh.uri)
    shutil.rmtree(_model_dir(fresh.client, first.run_id))
    challenger = _claiming(reference.record, tmp_path, "v2", 0.99, test_set="another test set")

    # Act
    registration = publish(challenger, fresh.uri).registration

    # Assert
    assert not registration.champion, registration
    assert registration.note.startswith(
        "champion stays version 1: it could not be scored on this test set ("
    ), registration.note
    assert "\n" not in registration.note, registration.note
    assert str(fresh.client.get_model_version_by_alias(MODEL_NAME, "champion").version) == "1"
    assert fresh.client.get_model_version(MODEL_NAME, "2").tags["champion_comparison"] == (
        registration.note
    )


def test_no_registration_without_a_registered_model(reference, fresh, tmp_path, mlflow_uri):
    # Arrange
    record = _clone(reference.record, tmp_path)
    _edit(record, "run.json", "run", lambda run: run["config"]["tracking"].update(
        registered_model=None
    ))  # fmt: skip

    # Act
    published = publish(record, fresh.uri)

    # Assert
    assert published.registration is None, published.registration
    assert fresh.client.search_registered_models() == [], "a model was registered"
    tags = fresh.client.get_run(published.run_id).data.tags
    assert "registered_model" not in tags and "champion" not in tags, tags
    mlflow_uri(fresh.uri)
    model = mlflow.pyfunc.load_model(f"runs:/{published.run_id}/model")
    assert model.predict(np.zeros((2, 784), np.float32)).shape == (2,), "the model is logged"


_PLANTED = "open({marker!r}, 'a').write({name!r} + '\\n')\n"


def test_the_champion_comparison_never_runs_model_code(
    reference, trained, fresh, tmp_path, mlflow_uri
):
    """Loading a pyfunc model runs the code stored with it; scoring a champion must not."""
    # Arrange: the champion's stored code (the pyfunc file and its code/ packages) replaced
    # by code that leaves a marker, as a tampered artifact store could hold.
    marker = tmp_path / "model-code-ran"
    first = _claiming(reference.record, tmp_path, "v1", 0.99, test_set="another test set")
    champion = publish(first, fresh.uri)
    model_dir = _model_dir(fresh.client, champion.run_id)
    planted = sorted(model_dir.glob("*.py")) + sorted((model_dir / "code").rglob("*.py"))
    assert model_dir / "pyfunc_model.py" in planted, f"no pyfunc file among {planted}"
    for path in planted:
        code = _PLANTED.format(marker=str(marker), name=path.name)
        path.write_text(path.read_text(encoding="utf-8") + "\n" + code, encoding="utf-8")
    challenger = _claiming(reference.record, tmp_path, "v2", trained.evaluation.accuracy + 0.01)

    # Act: the challenger's test set differs: the champion is scored from its files.
    registration = publish(challenger, fresh.uri).registration
    network, _, _ = load_network(f"models:/{MODEL_NAME}/1", fresh.uri)

    # Assert
    assert registration.note.endswith("on this test set"), f"not scored: {registration.note}"
    assert network.n_features == 784, "the champion's weights were read"
    assert not marker.exists(), f"model code ran: {marker.read_text(encoding='utf-8')}"
    # Control: MLflow's own loader does run the planted code.
    mlflow_uri(fresh.uri)
    mlflow.pyfunc.load_model(str(model_dir))
    assert "pyfunc_model.py" in marker.read_text(encoding="utf-8"), "the plant is not live"


@pytest.mark.parametrize("read", ["get_registered_model", "get_model_version_by_alias"])
def test_a_failed_alias_read_does_not_crown_a_worse_model(
    reference, fresh, tmp_path, monkeypatch, reliability_log, read
):
    """Only a missing alias means "no champion": a timeout must not move it to a worse model."""
    # Arrange
    publish(_claiming(reference.record, tmp_path, "v1", 0.95), fresh.uri)
    worse = _claiming(reference.record, tmp_path, "v2", 0.10)

    # Act
    _publish_with_fault(worse, fresh.uri, monkeypatch, read)
    monkeypatch.undo()
    registration = publish(worse, fresh.uri).registration

    # Assert
    assert not registration.champion, registration
    assert registration.note == "champion stays version 1, 0.9500", registration.note
    assert str(fresh.client.get_model_version_by_alias(MODEL_NAME, "champion").version) == "1"
    reliability_log(f"MLflow failing once on the champion's alias ({read})", survived=True,
                    results_lost=0)  # fmt: skip


def test_a_retry_after_the_alias_moved_reports_the_new_champion(
    reference, fresh, tmp_path, monkeypatch, reliability_log
):
    """The alias moved, then the reply was lost: the retry must not compare the version with
    itself and call it "not the champion"."""
    # Arrange
    publish(_claiming(reference.record, tmp_path, "v1", 0.5), fresh.uri)
    better = _claiming(reference.record, tmp_path, "v2", 0.9)

    # Act
    _publish_with_fault(
        better, fresh.uri, monkeypatch, "set_registered_model_alias", lost_reply=True
    )
    monkeypatch.undo()
    published = publish(better, fresh.uri)

    # Assert
    assert published.registration.champion, published.registration
    assert published.registration.note == "beats version 1, 0.5000", published.registration
    assert str(fresh.client.get_model_version_by_alias(MODEL_NAME, "champion").version) == "2"
    tags = fresh.client.get_run(published.run_id).data.tags
    assert (tags["champion"], tags["registered_model_version"]) == ("true", "2"), tags
    reliability_log("MLflow reply lost after moving the alias", survived=True, results_lost=0)


# ------------------------------------------------------------------------------------ stale runs
def test_a_record_left_running_by_a_dead_process_publishes_as_failed(reference, fresh, tmp_path):
    # Arrange: killed -9 after the sweep: RUNNING, no end, its process gone.
    record = _clone(
        reference.record, tmp_path, status="RUNNING", end_time=None, pid=_dead_pid(), summary={}
    )

    # Act
    published = publish(record, fresh.uri)

    # Assert
    parent = fresh.client.get_run(published.run_id)
    assert parent.info.status == "FAILED", parent.info.status
    assert parent.data.tags["error"] == "the process ended without closing the run", (
        parent.data.tags
    )
    assert parent.info.end_time is not None, "a failed run needs an end"
    children = [
        r for r in _runs(fresh.client, _experiment_id(fresh.client)) if PART_TAG in r.data.tags
    ]
    assert {r.info.status for r in children} == {"FINISHED"}, "finished trainings stay finished"


def test_a_publish_killed_midway_is_finished_by_the_next_one(
    reference, fresh, tmp_path, monkeypatch
):
    """The process that published died mid-way: the next start marks its RUNNING runs FAILED
    (stale), then ``mlp-pipeline publish`` finishes them as the record says."""
    # Arrange: a FINISHED record whose process is gone; its publish stopped before the end.
    record = _clone(reference.record, tmp_path, pid=_dead_pid())
    _publish_with_fault(record, fresh.uri, monkeypatch, "log_batch pipeline metrics")
    monkeypatch.undo()
    parent_id = _runs(fresh.client, _experiment_id(fresh.client), "pipeline")[0].info.run_id
    open_store(fresh.uri, EXPERIMENT)  # the next start: the stale parent is marked FAILED
    assert fresh.client.get_run(parent_id).info.status == "FAILED", "not marked stale"

    # Act
    publish(record, fresh.uri)

    # Assert
    parent = fresh.client.get_run(parent_id)
    assert parent.info.status == "FINISHED", parent.info.status
    assert parent.info.end_time == reference.run["end_time"], "not the record's end"
    assert "error" not in parent.data.tags, (
        f"a FINISHED run keeps the stale mark: error={parent.data.tags.get('error')!r}"
    )


def test_a_training_run_marked_stale_loses_the_mark_when_its_result_is_published(reference, fresh):
    """A fold run was RUNNING when its process died (MLflow away, exit 3): the next start marks
    it FAILED with an ``error`` tag; ``mlp-pipeline publish`` then finishes it from the record."""
    # Arrange: a whole publish, then one fold run marked the way ``mark_stale_runs`` marks it.
    publish(reference.record, fresh.uri)
    experiment_id = _experiment_id(fresh.client)
    child = next(r for r in _runs(fresh.client, experiment_id) if PART_TAG in r.data.tags)
    fresh.client.set_tag(child.info.run_id, "error", "the process ended without closing the run")
    fresh.client.set_terminated(child.info.run_id, "FAILED")

    # Act
    publish(reference.record, fresh.uri)

    # Assert
    run = fresh.client.get_run(child.info.run_id)
    assert run.info.status == "FINISHED", run.info.status
    assert "error" not in run.data.tags, f"a FINISHED run keeps the stale mark: {run.data.tags}"


# ------------------------------------------------------------------------------------ live
def _config_for(trained, uri: str, tmp_path: Path, **extra: Any) -> PipelineConfig:
    return trained.config.replace(
        {"tracking.tracking_uri": uri, "execution.cache_dir": str(tmp_path / "cache"), **extra}
    )


def _publisher_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "mlflow-publish" and t.is_alive()]


def _dataset(trained) -> dict[str, str]:
    return {"name": trained.dataset.name, "fingerprint": trained.dataset.fingerprint}


def _epoch_rows(history: dict[str, list[float]]) -> list[dict[str, float]]:
    """``fit``'s per-epoch records (with their wall time), as the final model's callback gets
    them, from a finished history."""
    return [
        {key: values[i] for key, values in history.items()} for i in range(len(history["epoch"]))
    ]


def _final_child(fresh: SimpleNamespace) -> Any:
    (child,) = _runs(fresh.client, _experiment_id(fresh.client), "final")
    return child


def _steps(client: MlflowClient, run_id: str, key: str = "train_loss") -> list[int]:
    return sorted(point.step for point in client.get_metric_history(run_id, key))


def _before_the_final_model(trained: SimpleNamespace) -> RunRecord:
    """A record whose folds and CV are done: the final model is next."""
    record = RunRecord.create(
        trained.config, flow="mlp-pipeline", dataset=trained.dataset.summary(),
        prefect_flow_run=PREFECT_RUN,
    )  # fmt: skip
    _fill(record, trained, ("folds", "cv"))
    return record


def test_the_final_models_curves_appear_epoch_by_epoch_in_the_run_it_ends_in(trained, fresh):
    # Arrange: the CV done, the final model in training.
    record = _before_the_final_model(trained)
    history = trained.final.history
    rows = _epoch_rows(history)

    # Act + Assert: each epoch reaches MLflow as it ends, in one RUNNING child.
    for done in (1, 2):
        record.add_final_progress(trained.best, rows[:done])
        publish(record, fresh.uri)
        live = _final_child(fresh)
        assert live.info.status == "RUNNING", live.info.status
        for key in ("train_loss", "train_accuracy", "lr"):
            assert _steps(fresh.client, live.info.run_id, key) == list(range(1, done + 1)), key
    started = round((history["wall_time"][0] - history["seconds"][0]) * 1000)
    assert abs(live.info.start_time - started) <= 1, (live.info.start_time, started)

    # ... and the finished model ends that same run, each point once.
    _fill(record, trained, ("final",))
    record.finish("FINISHED")
    publish(record, fresh.uri)
    final = _final_child(fresh)
    assert (final.info.run_id, final.info.status) == (live.info.run_id, "FINISHED"), final.info
    for key in ("train_loss", "train_accuracy", "lr"):
        assert _steps(fresh.client, final.info.run_id, key) == [1, 2, 3], key
    assert "test_accuracy" in final.data.metrics, final.data.metrics


def test_a_run_stopped_during_the_final_training_ends_its_final_run_too(trained, fresh):
    record = _before_the_final_model(trained)
    record.add_final_progress(trained.best, _epoch_rows(trained.final.history)[:2])
    publish(record, fresh.uri)

    record.finish("KILLED", error="interrupted (KeyboardInterrupt)")
    publish(record, fresh.uri)

    final = _final_child(fresh)
    assert final.info.status == "KILLED", final.info.status
    assert _steps(fresh.client, final.info.run_id) == [1, 2]
    ended = round(trained.final.history["wall_time"][1] * 1000)
    assert abs(final.info.end_time - ended) <= 1, (final.info.end_time, ended)


def _fold_started(trained: SimpleNamespace) -> tuple[RunRecord, Any, int]:
    """A record whose first fold's training started (recorded as the flow records it)."""
    record = RunRecord.create(
        trained.config, flow="mlp-pipeline", dataset=trained.dataset.summary(),
        prefect_flow_run=PREFECT_RUN,
    )  # fmt: skip
    result = trained.folds[0]
    started = round((result.history["wall_time"][0] - result.history["seconds"][0]) * 1000)
    record.add_fold_start(result.candidate, result.fold, started)
    return record, result, started


def test_a_folds_run_exists_from_its_start_and_its_result_finishes_that_run(trained, fresh):
    # Arrange
    record, result, started = _fold_started(trained)

    # Act: published while it trains ...
    publish(record, fresh.uri)
    (live,) = _runs(fresh.client, _experiment_id(fresh.client), "cv")

    # Assert: RUNNING since its training started, its values as params, no result yet.
    assert (live.info.status, live.info.start_time) == ("RUNNING", started), live.info
    assert live.info.run_name == f"cv lambda={result.l2_lambda:g} fold={result.fold}", live.info
    params = {"l2_lambda": str(result.l2_lambda), "fold": str(result.fold)}
    assert live.data.params == params, live.data.params
    assert "fold_val_accuracy" not in live.data.metrics, live.data.metrics

    # Act: ... and once its result is recorded: the same run, finished at its last epoch.
    record.add_fold(result)
    record.add_fold_start(result.candidate, result.fold, started + 5000)  # a later rung: ignored
    publish(record, fresh.uri)
    (done,) = _runs(fresh.client, _experiment_id(fresh.client), "cv")

    # Assert
    assert (done.info.run_id, done.info.status) == (live.info.run_id, "FINISHED"), done.info
    end = int(result.history["wall_time"][-1] * 1000)
    assert (done.info.start_time, done.info.end_time) == (started, end), done.info
    assert done.data.params["seed"] == str(result.seed), done.data.params
    assert _steps(fresh.client, done.info.run_id) == list(range(1, result.epochs + 1))


def test_a_run_stopped_mid_training_ends_its_started_fold_runs_as_it_ended(trained, fresh):
    record, _, started = _fold_started(trained)
    publish(record, fresh.uri)

    record.finish("KILLED", error="interrupted (SIGTERM)")
    publish(record, fresh.uri)

    (child,) = _runs(fresh.client, _experiment_id(fresh.client), "cv")
    assert (child.info.status, child.info.start_time) == ("KILLED", started), child.info
    assert child.info.end_time == record.run()["end_time"], child.info


def test_a_started_fold_pruned_or_diverged_gets_its_tags_when_its_result_comes(trained, fresh):
    # Arrange: a halving candidate pruned after its first epoch; its run made at the start.
    record, result, _ = _fold_started(trained)
    publish(record, fresh.uri)
    pruned = dataclasses.replace(result, budget=1)

    # Act
    record.add_fold(pruned)
    publish(record, fresh.uri)

    # Assert
    (child,) = _runs(fresh.client, _experiment_id(fresh.client), "cv")
    assert child.info.status == "FINISHED", child.info
    assert child.data.tags["pruned_at_epoch"] == "1", child.data.tags


@pytest.mark.parametrize(("step", "lost_reply"),
                         [("create_run cv", True), ("log_batch cv", False)])  # fmt: skip
def test_a_started_folds_run_failed_half_way_gets_its_params_on_the_retry(
    trained, fresh, monkeypatch, step, lost_reply
):
    # Arrange + Act: the first publish of a started training fails at ``step``.
    record, result, started = _fold_started(trained)
    _publish_with_fault(record, fresh.uri, monkeypatch, step, lost_reply)
    monkeypatch.undo()
    record.finish("KILLED", error="interrupted (SIGTERM)")
    publish(record, fresh.uri)

    # Assert: one run, its params, ended with the execution.
    (child,) = _runs(fresh.client, _experiment_id(fresh.client), "cv")
    params = {"l2_lambda": str(result.l2_lambda), "fold": str(result.fold)}
    assert child.data.params == params, child.data.params
    assert (child.info.status, child.info.start_time) == ("KILLED", started), child.info


def test_a_tampered_fold_start_is_refused(trained):
    record, result, _ = _fold_started(trained)
    _edit(record, f"started/{fold_file(result)}", "fold-start",
          lambda data: data.update(start_time="yesterday"))  # fmt: skip

    with pytest.raises(RecordError, match="not a training start"):
        record.fold_starts()


def test_a_tampered_progress_file_is_refused(trained, tmp_path):
    record = RunRecord.create(trained.config, flow="mlp-pipeline",
                              dataset=trained.dataset.summary())  # fmt: skip
    record.add_final_progress(trained.best, _epoch_rows(trained.final.history)[:1])
    assert record.final_progress()["history"]["epoch"] == [1.0]
    _edit(record, "final-progress.json", "final-progress",
          lambda data: data["history"].update(train_loss=["0.5"]))  # fmt: skip
    with pytest.raises(RecordError, match="not a final-model progress record"):
        record.final_progress()


@pytest.mark.slow
def test_system_metrics_are_sampled_into_the_parent_while_it_runs(
    trained, fresh, tmp_path, monkeypatch
):
    # Arrange: MLflow's own sampler, every half second instead of 10 s.
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    config = _config_for(trained, fresh.uri, tmp_path, **{"tracking.system_metrics": True})

    # Act
    with recorded(
        config, flow="mlp-pipeline", dataset=_dataset(trained), prefect_flow_run=PREFECT_RUN
    ) as (record, publisher):
        deadline = time.monotonic() + 120  # a hang guard, not a speed requirement
        while publisher.published is None:
            assert time.monotonic() < deadline, "the parent never reached MLflow"
            time.sleep(0.05)
        time.sleep(2.5)
        _fill(record, trained, ("folds", "cv", "final"))

    # Assert
    parent = fresh.client.get_run(publisher.published.run_id)
    system = {key for key in parent.data.metrics if key.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
    points = fresh.client.get_metric_history(
        parent.info.run_id, "system/cpu_utilization_percentage"
    )
    assert len(points) >= 2, points
    assert parent.info.status == "FINISHED", parent.info.status
    assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"], (
        "the sampler outlived the run"
    )


def test_live_publishes_are_spaced_and_the_last_one_is_not_held_back(
    trained, fresh, tmp_path, monkeypatch
):
    # Arrange: count the publishes; a spacing longer than the whole test.
    import pipeline.tracking.publish as publishing

    calls: list[float] = []
    real_publish = publishing.publish

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(time.monotonic())
        return real_publish(*args, **kwargs)

    monkeypatch.setattr(publishing, "publish", counted)
    monkeypatch.setattr(publishing.LivePublisher, "INTERVAL", 600.0)
    config = _config_for(trained, fresh.uri, tmp_path)
    started = time.monotonic()

    # Act: the first publish, then a burst of requests (a fast final training's epochs).
    with recorded(
        config, flow="mlp-pipeline", dataset=_dataset(trained), prefect_flow_run=PREFECT_RUN
    ) as (record, publisher):
        deadline = time.monotonic() + 120  # a hang guard, not a speed requirement
        while not calls:
            assert time.monotonic() < deadline, "no first publish"
            time.sleep(0.01)
        for _ in range(20):
            publisher.request()
        _fill(record, trained, ("folds", "cv", "final"))

    # Assert: the burst waited for the closing publish, which did not wait out the spacing.
    assert len(calls) == 2, f"{len(calls)} publishes"
    assert time.monotonic() - started < 300, "leaving the block waited for the spacing"
    parent = fresh.client.get_run(publisher.published.run_id)
    assert parent.info.status == "FINISHED" and "test_accuracy" in parent.data.metrics, parent.info


def test_no_system_metrics_unless_asked(reference):
    parent = reference.parent
    assert not [key for key in parent.data.metrics if key.startswith("system/")], parent.data


def test_recorded_publishes_while_the_block_runs(trained, reference, fresh, tmp_path):
    # Arrange
    config = _config_for(trained, fresh.uri, tmp_path)

    # Act
    with recorded(
        config, flow="mlp-pipeline", dataset=_dataset(trained), prefect_flow_run=PREFECT_RUN
    ) as (record, publisher):
        _fill(record, trained, ("folds",))
        publisher.request()
        experiment_id = _experiment_id(fresh.client)
        deadline = time.monotonic() + 120  # a hang guard, not a speed requirement
        while len(_runs(fresh.client, experiment_id, "cv")) < len(trained.folds):
            assert publisher.error is None, f"the live publish failed: {publisher.error}"
            assert time.monotonic() < deadline, "the folds never reached MLflow during the run"
            time.sleep(0.05)
        _fill(record, trained, ("cv", "final"))

    # Assert
    assert _publisher_threads() == [], "the publisher thread outlived the block"
    assert record.run()["status"] == "FINISHED", record.run()["status"]
    published = publisher.published
    assert published is not None and publisher.error is None, publisher.error
    state = mlflow_state(fresh.client, experiment_id)
    assert _counts(state) == {
        (f"parent {record.run()['id']}" if part.startswith("parent") else part): count
        for part, count in _counts(reference.state).items()
    }, _counts(state)
    parent = fresh.client.get_run(published.run_id)
    assert parent.info.status == "FINISHED", parent.info.status
    assert {item.path for item in fresh.client.list_artifacts(published.run_id)} == (
        PARENT_ARTIFACTS
    ), "artifacts missing"
    assert published.registration.version == "1", published.registration


@pytest.mark.parametrize(
    ("exception", "status"), [(RuntimeError("boom\nsecond line"), "FAILED"),
                              (KeyboardInterrupt(), "KILLED")],
)  # fmt: skip
def test_an_exception_inside_recorded_ends_record_and_runs(
    trained, fresh, tmp_path, exception, status
):
    # Arrange
    config = _config_for(trained, fresh.uri, tmp_path)
    records = []

    # Act
    with (
        pytest.raises(type(exception)),
        recorded(config, flow="cv", dataset=_dataset(trained)) as (record, _),
    ):
        records.append(record)
        _fill(record, trained, ("folds",))
        raise exception

    # Assert
    assert _publisher_threads() == [], "the publisher thread outlived the block"
    run = records[0].run()
    assert run["status"] == status, run
    parent = _runs(fresh.client, _experiment_id(fresh.client), "pipeline")
    assert len(parent) == 1, f"{len(parent)} parent runs"
    assert parent[0].info.status == status, parent[0].info.status
    assert parent[0].data.tags["error"] == run["error"], parent[0].data.tags
    if status == "FAILED":
        assert run["error"] == "RuntimeError: boom second line", run["error"]
    children = _runs(fresh.client, _experiment_id(fresh.client), "cv")
    assert [r.info.status for r in children] == ["FINISHED"] * len(trained.folds), children


def test_a_signal_during_the_closing_publish_names_the_command_that_finishes_it(
    trained, fresh, tmp_path, monkeypatch, caplog
):
    # Arrange: the closing publish of a finished record is under way (a slow model upload, say)
    # when the signal comes, and the process ends before it does.
    closing, signalled, cut = threading.Event(), threading.Event(), threading.Event()
    real_publish = publish_module.publish

    def cut_short(record: RunRecord, *args: Any, **kwargs: Any) -> Any:
        if record.run()["status"] == "RUNNING":
            return real_publish(record, *args, **kwargs)
        closing.set()
        signalled.wait(60)
        cut.set()
        raise RuntimeError("the process ended")

    def send_signal() -> None:
        if closing.wait(120):
            os.kill(os.getpid(), signal.SIGUSR1)

    def handle(signum: int, frame: Any) -> None:  # as the command's handler does
        raise KeyboardInterrupt

    monkeypatch.setattr(publish_module, "publish", cut_short)
    config = _config_for(trained, fresh.uri, tmp_path / "my runs")  # a space, as in many homes
    sender = threading.Thread(target=send_signal, daemon=True)
    previous = signal.signal(signal.SIGUSR1, handle)
    records = []

    # Act
    try:
        with (
            caplog.at_level(logging.WARNING, logger="pipeline"),
            pytest.raises(KeyboardInterrupt),
            recorded(config, flow="mlp-pipeline", dataset=_dataset(trained)) as (record, live),
        ):
            records.append(record)
            deadline = time.monotonic() + 120  # a hang guard
            while live.published is None:  # the first publish done: the next is the closing one
                assert time.monotonic() < deadline and live.error is None, live.error
                time.sleep(0.01)
            _fill(record, trained)
            sender.start()
    finally:
        signal.signal(signal.SIGUSR1, previous)
        signalled.set()
    assert cut.wait(60), "the closing publish never ran"

    # Assert: the record is whole, and the one command the warning names finishes MLflow's copy.
    (record,) = records
    assert record.run()["status"] == "FINISHED", record.run()["status"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    found = [w for w in warnings if "interrupted while publishing" in w]
    assert len(found) == 1, warnings
    command = re.search(r"`(mlp-pipeline publish [^`]+)`", found[0])
    assert command and shlex.split(command.group(1))[2:] == [str(record.folder)], found[0]
    parent = fresh.client.get_run(real_publish(record).run_id)
    assert parent.info.status == "FINISHED", parent.info.status
    assert "test_accuracy" in parent.data.metrics, parent.data.metrics


def test_mlflow_lost_during_the_run_is_exit_3_and_a_later_publish_records_it(
    trained, reference, fresh, tmp_path, monkeypatch, refused_server
):
    # Arrange: the store answers when the run starts, then MLflow is gone (its server's port
    # refuses every connection; no retries, so the failures come at once).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    real_open_store = publish_module.open_store

    def opened_then_lost(uri: str, experiment: str):
        real_open_store(uri, experiment)
        return MlflowClient(tracking_uri=refused_server.url), "0"

    monkeypatch.setattr(publish_module, "open_store", opened_then_lost)
    config = _config_for(trained, fresh.uri, tmp_path)

    # Act
    with (
        pytest.raises(NotPublishedError) as info,
        recorded(config, flow="cv", dataset=_dataset(trained)) as (record, _),
    ):
        _fill(record, trained, ("folds", "cv"))
    monkeypatch.undo()
    published = publish(record, fresh.uri)  # `mlp-pipeline publish <folder>`, MLflow back

    # Assert
    message = str(info.value)
    assert info.value.exit_code == 3, info.value.exit_code
    assert str(record.folder) in message, message
    assert f"mlp-pipeline publish {record.folder}" in message, message
    assert "\n" not in message, message
    assert record.run()["status"] == "FINISHED", "the results are complete in the record"
    state = mlflow_state(fresh.client, _experiment_id(fresh.client))
    assert sorted(_counts(state).values()) == [1] * (len(trained.folds) + 1), _counts(state)
    parent = fresh.client.get_run(published.run_id)
    assert parent.info.status == "FINISHED", parent.info.status
    assert "best_l2_lambda" in parent.data.metrics, parent.data.metrics


@pytest.fixture()
def full_disk(tmp_path):
    """A real, nearly full filesystem (a 64 KiB tmpfs) at a folder: ``full_disk(path)``."""
    mounted: list[Path] = []

    def mount(path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)],
            capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_artifact_disk_ends_the_parent_failed_and_a_later_publish_finishes_it(
    trained, fresh, tmp_path, full_disk
):
    # Arrange: the store's database has room, its artifacts' disk does not.
    full_disk(tmp_path / "store" / "artifacts")
    config = _config_for(trained, fresh.uri, tmp_path)

    # Act
    with (
        pytest.raises(NotPublishedError) as info,
        recorded(config, flow="mlp-pipeline", dataset=_dataset(trained)) as (record, _),
    ):
        _fill(record, trained)
    (parent,) = _runs(fresh.client, _experiment_id(fresh.client), "pipeline")
    subprocess.run(["umount", "-l", str(tmp_path / "store" / "artifacts")], check=True)
    republished = publish(record, fresh.uri)

    # Assert: not left RUNNING; the error names the way out; the later publish completes it.
    assert "No space left on device" in str(info.value), info.value
    assert parent.info.status == "FAILED", parent.info.status
    assert f"mlp-pipeline publish {record.folder}" in parent.data.tags["error"], parent.data.tags
    after = fresh.client.get_run(republished.run_id)
    assert after.info.status == "FINISHED", after.info.status
    assert "error" not in after.data.tags, after.data.tags
    model = logged_model(fresh.client, after)
    assert model is not None and str(model.status) == "READY", model


@pytest.mark.slow
def test_a_store_locked_for_seconds_mid_run_delays_the_publish_and_loses_nothing(
    trained, reference, fresh, tmp_path
):
    """Another process holds the SQLite store's write lock longer than MLflow waits for it
    (a backup, a long query): the live publish fails quietly, the record goes on, and the
    publish after the lock is gone completes the runs, once each."""
    import sqlite3

    # Arrange
    config = _config_for(trained, fresh.uri, tmp_path)
    database = tmp_path / "store" / "mlflow.db"

    # Act
    with recorded(config, flow="mlp-pipeline", dataset=_dataset(trained)) as (record, publisher):
        holder = sqlite3.connect(database, timeout=30)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            _fill(record, trained, ("folds", "cv"))
            publisher.request()
            deadline = time.monotonic() + 120  # a hang guard
            while publisher.error is None:
                assert time.monotonic() < deadline, "the publish never met the lock"
                time.sleep(0.1)
            error = publisher.error
        finally:
            holder.rollback()
            holder.close()
        _fill(record, trained, ("final",))

    # Assert
    assert "locked" in str(error), error
    assert publisher.error is None and publisher.published is not None, publisher.error
    state = mlflow_state(fresh.client, _experiment_id(fresh.client))
    assert _counts(state) == {
        (f"parent {record.run()['id']}" if part.startswith("parent") else part): count
        for part, count in _counts(reference.state).items()
    }, _counts(state)
    assert fresh.client.get_run(publisher.published.run_id).info.status == "FINISHED"
    empty = [
        path for path in record.folder.rglob("*") if path.is_file() and not path.stat().st_size
    ]
    assert empty == [], f"empty files in the record: {empty}"


def test_recorded_refuses_an_unusable_store_before_any_record(trained, tmp_path):
    config = _config_for(trained, "sqlite:///:memory:", tmp_path)
    with (
        pytest.raises(TrackingError, match="names no database file"),
        recorded(config, flow="cv", dataset=_dataset(trained)),
    ):
        pytest.fail("the block ran without a usable store")
    assert not (tmp_path / "cache").exists(), "a record was made for a run that never started"


# ------------------------------------------------------------------------------------ secrets
def _texts(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` that reads as text."""
    found = {}
    for path in folder.rglob("*"):
        if path.is_file():
            with contextlib.suppress(UnicodeDecodeError):
                found[str(path)] = path.read_text(encoding="utf-8")
    return found


@pytest.mark.parametrize("where", ["config", "environment"])
def test_credentials_in_an_http_tracking_uri_go_to_mlflows_environment(monkeypatch, where):
    """Credentials leave an http(s) URI wherever it comes from; MLflow's HTTP client reads
    them from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD. (End to end against a real
    server: tests/flows/test_mlflow_server.py, tests/test_security.py.)"""
    # Arrange
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    secret_uri = "http://bob:hunter2@127.0.0.1:5000"
    if where == "environment":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", secret_uri)

    # Act
    uri = default_tracking_uri(secret_uri if where == "config" else None)

    # Assert
    assert uri == "http://127.0.0.1:5000", f"credentials left in the URI: {uri}"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == (
        "bob", "hunter2",
    ), "the credentials did not reach MLflow's environment variables"  # fmt: skip


# SQLite has no password: its driver ignores the one this test puts in the URI, and says so.
@pytest.mark.filterwarnings("ignore:Query string argument.*pysqlite")
def test_publish_takes_the_records_store_with_the_password_mlflow_tracking_uri_holds(
    trained, tmp_path, fresh, monkeypatch
):
    """A record keeps its store without credentials; publishing it later, from Python as from
    the CLI, connects with MLFLOW_TRACKING_URI when that names the same store with them. Another
    store there is not the record's: the record goes where its run began."""
    # Arrange
    record = RunRecord.create(
        _config_for(trained, fresh.uri, tmp_path), flow="cv", dataset=_dataset(trained)
    )
    record.finish("FINISHED")
    with_password = f"{fresh.uri}?password=hunter2"
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere' / 'mlflow.db'}"

    # Act
    monkeypatch.setenv("MLFLOW_TRACKING_URI", with_password)
    same_store = publish(record)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    other_store = publish(record)

    # Assert
    assert same_store.tracking_uri == with_password, same_store
    assert other_store.tracking_uri == fresh.uri, other_store
    assert other_store.run_id == same_store.run_id, "published twice"
    assert not (tmp_path / "elsewhere").exists(), "published to MLFLOW_TRACKING_URI's store"


def test_a_database_uri_keeps_its_password_for_the_connection_but_not_in_the_record(
    trained, tmp_path
):
    """MLflow reads no environment variable for a database's password: the URI keeps it in
    memory, and every config the pipeline records or logs shows it without."""
    # Arrange
    secret_uri = "postgresql://bob:hunter2@db.example:5432/mlflow"
    config = _config_for(trained, secret_uri, tmp_path)

    # Act
    kept = default_tracking_uri(secret_uri)
    record = RunRecord.create(config, flow="cv", dataset=_dataset(trained))

    # Assert
    assert kept == secret_uri, "a database URI lost its password: MLflow could not connect"
    leaks = [name for name, text in _texts(record.folder).items() if "hunter2" in text]
    assert leaks == [], f"the record holds the password: {leaks}"
    assert "hunter2" not in str(config.flat()), "the logged params would hold the password"


def test_credentials_elsewhere_in_the_config_are_not_logged(reference, fresh, tmp_path):
    """A Dask scheduler address with credentials: MLflow params and config.json show it
    without them (tests/pipeline/test_tracking.py, f4a4994)."""
    # Arrange
    record = _clone(reference.record, tmp_path)

    def with_secret(run: dict) -> None:
        run["config"]["execution"].update(runner="dask", dask_address="tcp://bob:pw123@sched:8786")

    _edit(record, "run.json", "run", with_secret)

    # Act
    published = publish(record, fresh.uri)

    # Assert
    params = fresh.client.get_run(published.run_id).data.params
    assert params["execution.dask_address"] == "tcp://sched:8786", params["execution.dask_address"]
    config = Path(fresh.client.download_artifacts(published.run_id, "config.json", str(tmp_path)))
    assert "pw123" not in config.read_text(encoding="utf-8"), "config.json holds the password"
