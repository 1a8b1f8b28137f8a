"""Publish a run record to MLflow: whatever the record holds and MLflow lacks, once.

Runs are found by the record's id (a tag), metric points carry the record's own timestamps (the
store keeps one copy of an identical point) and artifacts are listed before they are uploaded,
so publishing again after any failure finishes the job without duplicates. Run layout::

    parent   stage=pipeline   params: flattened config, dataset, versions; summary metrics;
                               config.json, cv_results.csv, the figures, the pyfunc model
      child  stage=cv         one per (lambda, fold): per-epoch metrics (step = epoch)
      child  stage=final      the final model's per-epoch and test metrics
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.record import RunRecord
from pipeline.results import WALL_TIME, FoldResult
from pipeline.tracking.model import build_pyfunc
from pipeline.tracking.registry import Registration, register
from pipeline.tracking.store import default_tracking_uri, one_line, open_store, redact_uri

RECORD_TAG = "mlp_pipeline.record_id"
PART_TAG = "mlp_pipeline.part"
MODEL_TAG = "mlp_pipeline.model_logged"
# History columns logged per epoch (step = epoch); the others (epoch, seconds) are bookkeeping.
EPOCH_METRICS = (
    "train_loss",
    "train_objective",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "lr",
)


class NotPublishedError(PipelineError):
    """The pipeline finished, but its record could not reach MLflow (exit code 3)."""

    exit_code = 3


@dataclass(frozen=True)
class Published:
    """Where a record went: its parent run, and the registered version if any."""

    run_id: str
    tracking_uri: str
    registration: Registration | None = None


def publish(record: RunRecord, tracking_uri: str | None = None, store: Any = None) -> Published:
    """Copy into MLflow what ``record`` holds and MLflow lacks; returns where it went.

    ``tracking_uri`` overrides the record's; ``store`` is an ``(MlflowClient, experiment_id)``
    already opened on it.
    """
    # The whole record is read and checked before MLflow sees any of it.
    run, folds, cv, final = record.run(), record.folds(), record.cv(), record.final()
    config = PipelineConfig.model_validate(run["config"])
    uri = default_tracking_uri(tracking_uri or config.tracking.tracking_uri)
    client, experiment_id = store or open_store(uri, config.tracking.experiment)
    parent = _parent(client, experiment_id, run, config)
    parent_id = parent.info.run_id
    tags = _shared_tags(run)
    children = {
        child.data.tags.get(PART_TAG): child
        for child in client.search_runs(
            [experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=10_000
        )
    }
    for fold in folds:
        _child(client, experiment_id, parent_id, children, **_fold_child(fold, tags))
    uploaded = {artifact.path for artifact in client.list_artifacts(parent_id)}
    if "config.json" not in uploaded:
        _upload_text(client, parent_id, "config.json", json.dumps(config.redacted(), indent=2))
    metrics: dict[str, tuple[float, int]] = {}
    if cv is not None:
        table, best = cv["table"], cv["best_l2_lambda"]
        chosen = table.loc[table["l2_lambda"] == best, "mean_val_accuracy"]
        metrics["best_l2_lambda"] = (best, cv["time"])
        metrics["cv_best_mean_val_accuracy"] = (float(chosen.iloc[0]), cv["time"])
        if "cv_results.csv" not in uploaded:
            _upload_text(client, parent_id, "cv_results.csv", table.to_csv(index=False))
        _upload(client, parent_id, uploaded, record.folder, ["cv_lambda.png"])
    registration = None
    if final is not None:
        evaluation = final["evaluation"]
        test = {"test_accuracy": evaluation["accuracy"], "test_loss": evaluation["loss"]}
        metrics.update({key: (value, final["time"]) for key, value in test.items()})
        _child(client, experiment_id, parent_id, children, **_final_child(final, test, tags))
        _upload(client, parent_id, uploaded, record.folder, [
            "training_curves.png", "confusion_matrix.png", "misclassified.png",
        ])  # fmt: skip
        _log_model(client, parent, record.folder, final)
        registration = _register(client, uri, parent, run, config, final)
    summary = run["summary"]
    if "wall_seconds" in summary and run["end_time"]:
        metrics["wall_seconds"] = (summary["wall_seconds"], run["end_time"])
    _log(client, parent_id, _points(metrics, parent.data.metrics))
    if run["status"] != "RUNNING" and parent.info.status != run["status"]:
        if run["error"]:
            client.set_tag(parent_id, "error", run["error"])
        elif "error" in parent.data.tags:  # marked stale before this publish finished it
            client.delete_tag(parent_id, "error")
        client.set_terminated(parent_id, run["status"], end_time=run["end_time"])
    return Published(parent_id, uri, registration)


# ------------------------------------------------------------------------------------ parent
def _parent(client: Any, experiment_id: str, run: dict[str, Any], config: PipelineConfig):
    """The record's parent run, created with its params and config.json if it is new."""
    from mlflow.entities import Param, ViewType

    found = client.search_runs(
        [experiment_id],
        f"tags.`{RECORD_TAG}` = '{run['id']}'",
        run_view_type=ViewType.ALL,
        max_results=1,
    )
    dataset = run["dataset"]
    if found:
        parent = found[0]
    else:
        prefect_run = run["prefect_flow_run"].get("name")
        name = " ".join(part for part in (run["flow"], dataset["name"], prefect_run) if part)
        commit = _git_commit()
        parent = client.create_run(
            experiment_id,
            start_time=run["start_time"],
            run_name=name,
            tags={
                **_shared_tags(run),
                RECORD_TAG: run["id"],
                "stage": "pipeline",
                "flow": run["flow"],
                **({"mlflow.source.git.commit": commit} if commit else {}),
            },
        )
    params = {key: _text(value) for key, value in config.flat().items()}
    params.update(
        {
            "dataset.name": dataset["name"],
            "dataset.fingerprint": dataset["fingerprint"],
            "package.version": run["package_version"],
            **{key: _text(value) for key, value in run["params"].items()},
        }
    )
    missing = {key: value for key, value in params.items() if key not in parent.data.params}
    if missing:
        client.log_batch(
            parent.info.run_id, params=[Param(key, value) for key, value in missing.items()]
        )
    return parent


def _shared_tags(run: dict[str, Any]) -> dict[str, str]:
    """Tags of every run of a record: where it ran, and its Prefect flow run."""
    prefect_run = run["prefect_flow_run"]
    tags = {"host": run["host"], "pid": str(run["pid"])}
    if prefect_run:
        tags["prefect.flow_run_id"] = prefect_run.get("id", "")
        tags["prefect.flow_run_name"] = prefect_run.get("name", "")
    return tags


# ------------------------------------------------------------------------------------ children
def _fold_child(result: FoldResult, tags: dict[str, str]) -> dict[str, Any]:
    summary = {
        "fold_val_accuracy": result.val_accuracy,
        "fold_val_loss": result.val_loss,
        "fold_train_accuracy": result.train_accuracy,
        "fold_train_loss": result.train_loss,
        "epochs_run": result.epochs,
        "train_seconds": result.seconds,
    }
    child_tags = {**tags, "stage": "cv"}
    if result.diverged:
        child_tags.update({"diverged": "true", "diverged_message": result.message[:5000]})
    return {
        "key": f"fold {result.l2_lambda!r} {result.fold}",
        "name": f"cv lambda={result.l2_lambda:g} fold={result.fold}",
        "tags": child_tags,
        "history": result.history,
        "seconds": result.seconds,
        "summary": summary,
        "params": {"l2_lambda": result.l2_lambda, "fold": result.fold, "seed": result.seed},
    }


def _final_child(final: dict[str, Any], test: dict[str, float], tags: dict[str, str]):
    return {
        "key": "final",
        "name": f"final lambda={final['l2_lambda']:g}",
        "tags": {**tags, "stage": "final"},
        "history": final["history"],
        "seconds": final["seconds"],
        "summary": test,
        "params": {"l2_lambda": final["l2_lambda"], "epochs": len(final["history"]["epoch"])},
    }


def _child(client, experiment_id, parent_id, children, *, key, name, tags, history, seconds,
           summary, params) -> str:  # fmt: skip
    """A FINISHED child run of ``parent_id`` for one recorded training, made once.

    Its start and end are those of the training; its metric points carry each epoch's end.
    """
    from mlflow.entities import Param

    existing = children.get(key)
    if existing is not None and existing.info.status == "FINISHED":
        return existing.info.run_id
    ended = history.get(WALL_TIME) or []
    end = int(ended[-1] * 1000) if ended and not math.isnan(ended[-1]) else None
    start = end - int(seconds * 1000) if end is not None else None
    if existing is None:
        run_id = client.create_run(
            experiment_id,
            start_time=start,
            run_name=name,
            tags={"mlflow.parentRunId": parent_id, PART_TAG: key, **tags},
        ).info.run_id
    else:
        run_id = existing.info.run_id
    points = _epoch_points(history) + _points({k: (v, end or 0) for k, v in summary.items()})
    _log(client, run_id, points, [Param(k, _text(v)) for k, v in params.items()])
    client.set_terminated(run_id, "FINISHED", end_time=end)
    return run_id


def _epoch_points(history: Mapping[str, Sequence[float]]) -> list[Any]:
    """One metric point per (column, epoch), step = the epoch, at the epoch's end."""
    from mlflow.entities import Metric

    epochs = [int(epoch) for epoch in history.get("epoch", [])]
    ended = [int(t * 1000) if not math.isnan(t) else 0 for t in history.get(WALL_TIME, [])]
    points = []
    for key in EPOCH_METRICS:
        values = history.get(key)
        if values is None or all(math.isnan(v) for v in values):
            continue  # e.g. val_* of a model trained without validation data
        points += [
            Metric(key, float(v), at, e) for e, at, v in zip(epochs, ended, values, strict=True)
        ]
    return points


def _points(metrics: dict[str, tuple[float, int]], present: Mapping[str, Any] = ()) -> list[Any]:
    from mlflow.entities import Metric

    return [
        Metric(key, float(value), at, 0)
        for key, (value, at) in metrics.items()
        if key not in present
    ]


def _log(client: Any, run_id: str, metrics: list[Any], params: list[Any] = ()) -> None:
    if metrics or params:
        client.log_batch(run_id, metrics=metrics, params=list(params))


# ------------------------------------------------------------------------------------ final
def _upload_text(client: Any, run_id: str, name: str, text: str) -> None:
    with tempfile.TemporaryDirectory(prefix="mlp-pipeline-") as tmp:
        (Path(tmp) / name).write_text(text, encoding="utf-8")
        client.log_artifact(run_id, str(Path(tmp) / name))


def _upload(client: Any, run_id: str, uploaded: set[str], folder: Path, names: list[str]):
    for name in names:
        if name not in uploaded:
            client.log_artifact(run_id, str(folder / name))


def _log_model(client: Any, parent: Any, folder: Path, final: dict[str, Any]) -> None:
    """The pyfunc model, at ``runs:/<parent id>/model`` (uploaded whole, then marked done)."""
    if parent.data.tags.get(MODEL_TAG) == "true":
        return
    with tempfile.TemporaryDirectory(prefix="mlp-pipeline-") as tmp:
        model = build_pyfunc(folder / "final", final["input_example"], Path(tmp) / "model")
        client.log_artifacts(parent.info.run_id, str(model), "model")
    client.set_tag(parent.info.run_id, "model_uri", f"runs:/{parent.info.run_id}/model")
    client.set_tag(parent.info.run_id, MODEL_TAG, "true")


def _register(client, uri, parent, run, config, final) -> Registration | None:
    """Register the parent's model once; the registration's tags on the parent mark it done."""
    name = config.tracking.registered_model_for(run["dataset"]["name"])
    tags = parent.data.tags
    if name is None:
        return None
    if tags.get("registered_model") == name and "champion" in tags:
        return Registration(
            name,
            tags["registered_model_version"],
            tags["champion"] == "true",
            tags.get("champion_comparison", ""),
        )
    evaluation = final["evaluation"]
    version_tags = {
        "test_accuracy": repr(evaluation["accuracy"]),
        "test_set": final["test_set"],
        "test_images": str(evaluation["n_samples"]),
        "dataset.name": run["dataset"]["name"],
        "dataset.fingerprint": run["dataset"]["fingerprint"],
    }

    def test_set() -> Any:
        from pipeline.data import load_test_set

        data = config.data
        try:
            return load_test_set(
                data.dataset, data.data_dir, False, limit_test=data.limit_test, progress=False
            )
        except PipelineError:
            return None

    registration = register(client, uri, name, parent, version_tags, test_set)
    for key, value in {
        "registered_model": name,
        "registered_model_version": registration.version,
        "champion_comparison": registration.note,
        "champion": str(registration.champion).lower(),  # last: it marks the registration done
    }.items():
        if value and tags.get(key) != value:
            client.set_tag(parent.info.run_id, key, value)
    return registration


# ------------------------------------------------------------------------------------ helpers
def _text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, list | tuple | dict) else str(value)


def _git_commit() -> str | None:
    """The commit of the code that runs, when it is a git checkout that tracks this file."""
    here = Path(__file__).resolve()

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", *args], capture_output=True, text=True, timeout=5, check=False,
                cwd=here.parent,
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    return git("rev-parse", "HEAD") if git("ls-files", here.name) else None


# ------------------------------------------------------------------------------------ live
class LivePublisher:
    """Publishes a record from one background thread while the flow goes on.

    The flow calls :meth:`request` after each write to the record: MLflow's latency, or its
    absence, never holds up the work, and a signal never lands in the middle of a write.
    Leaving the block publishes what the record then holds and waits for it.
    """

    def __init__(self, record: RunRecord, tracking_uri: str, store: Any) -> None:
        self.record = record
        self.tracking_uri = tracking_uri
        self.store = store  # (MlflowClient, experiment id) from open_store
        self.published: Published | None = None
        self.error: BaseException | None = None
        self._wanted = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="mlflow-publish", daemon=True)

    def __enter__(self) -> LivePublisher:
        self._thread.start()
        self.request()
        return self

    def request(self) -> None:
        """Publish again soon (what the record holds by then)."""
        self._wanted.set()

    def _loop(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            closing = self._closing
            try:
                self.published = publish(self.record, self.tracking_uri, self.store)
                self.error = None
            except Exception as exc:  # noqa: BLE001 -- the record keeps it: published later
                self.error = exc
            if closing:
                return

    def __exit__(self, *exc_info: Any) -> None:
        self._closing = True
        self._wanted.set()
        self._thread.join()

    def raise_if_unpublished(self) -> None:
        """Raise :class:`NotPublishedError`, naming the record's folder, if MLflow stayed away."""
        if self.error is not None or self.published is None:
            raise NotPublishedError(
                f"the pipeline finished but MLflow at {redact_uri(self.tracking_uri)} could not "
                f"record it ({one_line(self.error or RuntimeError('not published'))}); the results "
                f"are in {self.record.folder}: publish them with "
                f"`mlp-pipeline publish {self.record.folder}`"
            )


@contextlib.contextmanager
def recorded(
    config: PipelineConfig,
    *,
    flow: str,
    dataset: dict[str, str],
    prefect_flow_run: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
) -> Iterator[tuple[RunRecord, LivePublisher]]:
    """A new run record, published to MLflow as it grows; the block writes its results.

    The store is opened first: an unusable one fails in one line before any record or
    training. A block that raises leaves the record FAILED (KILLED when interrupted), and so
    do its MLflow runs. At the end, :class:`NotPublishedError` if MLflow stayed away.
    """
    # The record keeps where it goes, without credentials: a later publish finds the store.
    uri = default_tracking_uri(config.tracking.tracking_uri)
    if config.tracking.tracking_uri != uri:
        config = config.replace({"tracking.tracking_uri": uri})
    store = open_store(uri, config.tracking.experiment)
    record = RunRecord.create(
        config, flow=flow, dataset=dataset, prefect_flow_run=prefect_flow_run, params=params
    )
    with LivePublisher(record, uri, store) as publisher, record.running():
        yield record, publisher
        if record.run()["status"] == "RUNNING":
            record.finish("FINISHED")
    publisher.raise_if_unpublished()
