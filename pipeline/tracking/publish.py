"""Publish a run record to MLflow: whatever the record holds and MLflow lacks, once.

Runs are found by the record's id and part (tags), metric points carry the record's own
timestamps (the store keeps one copy of an identical point), artifacts are listed before they
are uploaded and the model version is looked up by run: publishing again after any failure
finishes the job without duplicates. The run layout is in docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shlex
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.errors import NotPublishedError, PipelineError
from pipeline.record import RunRecord
from pipeline.results import WALL_TIME, FoldResult
from pipeline.search import L2_KEY, candidate_config, candidate_id, full_epochs, label
from pipeline.selection import mean_curves, ranked
from pipeline.tracking.model import MODEL_NAME, build_pyfunc, logged_model
from pipeline.tracking.registry import Registration, register
from pipeline.tracking.store import default_tracking_uri, one_line, open_store, redact_uri

logger = logging.getLogger(__name__)

RECORD_TAG = "mlp_pipeline.record_id"
PART_TAG = "mlp_pipeline.part"
MODEL_TAG = "mlp_pipeline.model_logged"
# History columns logged per epoch (step = epoch); the others (epoch, seconds) are bookkeeping.
EPOCH_METRICS = ("train_loss", "train_objective", "train_accuracy", "val_loss", "val_accuracy",
                 "lr")  # fmt: skip
CV_FIGURES = ["cv_lambda.png"]
FINAL_FIGURES = ["training_curves.png", "confusion_matrix.png", "misclassified.png"]


@dataclass(frozen=True)
class Published:
    """Where a record went: its parent run, and the registered version if any."""

    run_id: str
    tracking_uri: str
    registration: Registration | None = None


def publish(record: RunRecord, tracking_uri: str | None = None, store: Any = None) -> Published:
    """Copy into MLflow what ``record`` holds and MLflow lacks; returns where it went.

    ``tracking_uri`` overrides the record's store (see :func:`_record_store`); ``store`` is an
    ``(MlflowClient, experiment_id)`` already opened on it. The whole record is read and checked
    before MLflow sees any of it.
    """
    from mlflow.entities import Metric

    run, folds, cv, final = record.run(), record.folds(), record.cv(), record.final()
    progress = record.final_progress() if final is None else None
    config = PipelineConfig.model_validate(run["config"])
    uri = default_tracking_uri(tracking_uri or _record_store(config.tracking.tracking_uri))
    client, experiment_id = store or open_store(uri, config.tracking.experiment)
    # The chosen values as params too: MLflow's charts and compare view plot params as values.
    best = {f"best.{key}": value for key, value in cv["best"].items()} if cv else {}
    parent = _parent(client, experiment_id, run, config, best)
    parent_id, tags = parent.info.run_id, _shared_tags(run)
    if not parent.inputs.dataset_inputs:  # the Datasets column of the runs list
        data = run["dataset"]
        client.log_inputs(parent_id, [_dataset_input(data, "train", "training"),
                                      _dataset_input(data, "test", "testing")])  # fmt: skip
    children = {
        child.data.tags.get(PART_TAG): child
        for child in client.search_runs(
            [experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=50_000
        )
    }

    def child(key: str, name: str, stage: str, part: dict[str, Any], inputs: list) -> None:
        existing = children.get(key)
        if existing is None or existing.info.status != "FINISHED":
            run_tags = {**tags, "stage": stage, PART_TAG: key, **part.pop("tags", {})}
            _child(client, experiment_id, parent_id, existing, name, run_tags, inputs, **part)

    for fold in folds:
        part = f"fold {fold.fold + 1} of {config.cv.folds}, seed {config.cv.seed}"
        child(_fold_part_key(fold.candidate, fold.fold),
              f"cv {label(fold.candidate)} fold={fold.fold}", "cv",
              _fold_part(fold, full_epochs(config, fold.candidate)),
              [_dataset_input(run["dataset"], "train", "training", f"all but {part}"),
               _dataset_input(run["dataset"], "train", "validation", part)])  # fmt: skip
    recorded = {_fold_part_key(fold.candidate, fold.fold) for fold in folds}
    for start in record.fold_starts():  # trainings under way: their runs exist from the start
        candidate = {L2_KEY: start["l2_lambda"], **start["settings"]}
        key = _fold_part_key(candidate, start["fold"])
        if key not in recorded:
            _started_child(client, experiment_id, parent_id, children.get(key),
                           f"cv {label(candidate)} fold={start['fold']}",
                           {**tags, "stage": "cv", PART_TAG: key},
                           {"l2_lambda": start["l2_lambda"], **start["settings"],
                            "fold": start["fold"]},
                           start["start_time"], run)  # fmt: skip
    uploaded = {artifact.path for artifact in client.list_artifacts(parent_id)}
    texts = {"config.json": json.dumps(config.redacted(), indent=2)}
    metrics: dict[str, tuple[float, int]] = {}
    if cv is not None and "cv_best_mean_val_accuracy" not in parent.data.metrics:
        # Logged before the summary metrics below, whose presence marks them done.
        _log(client, parent_id, _candidate_curves(cv["table"], folds, cv["time"]))
    if cv is not None:
        table, chosen = cv["table"], cv["chosen_row"]["mean_val_accuracy"]
        metrics.update(best_l2_lambda=(cv["best_l2_lambda"], cv["time"]),
                       cv_best_mean_val_accuracy=(chosen, cv["time"]))  # fmt: skip
        texts["cv_results.csv"] = table.to_csv(index=False)
    registration = None
    if progress is not None:  # the final model while it trains, or where it stopped
        chosen = {L2_KEY: progress["l2_lambda"], **progress["settings"]}
        _live_child(
            client,
            experiment_id,
            parent_id,
            children.get("final"),
            f"final {label(chosen)}",
            {**tags, "stage": "final", PART_TAG: "final"},
            progress["history"],
            None if run["status"] == "RUNNING" else run["status"],
        )
    if final is not None:
        evaluation = final["evaluation"]
        test = {"test_accuracy": evaluation["accuracy"], "test_loss": evaluation["loss"]}
        metrics.update({key: (value, final["time"]) for key, value in test.items()})
        history = final["history"]
        chosen = {L2_KEY: final["l2_lambda"], **final["settings"]}
        child("final", f"final {label(chosen)}", "final", {
            "history": history, "seconds": final["seconds"], "summary": test,
            "params": {"l2_lambda": final["l2_lambda"], **final["settings"],
                       "epochs": len(history["epoch"])},
        }, [_dataset_input(run["dataset"], "train", "training")])  # fmt: skip
    _upload(client, parent_id, uploaded, record.folder, texts,
            CV_FIGURES * (cv is not None) + FINAL_FIGURES * (final is not None))  # fmt: skip
    model = None
    if final is not None:
        description = _model_description(run, config, final, cv is not None)
        model = _log_model(client, parent, record.folder, final, description)
        registration = _register(client, uri, parent, run, config, final, description, model)
    if "wall_seconds" in run["summary"] and run["end_time"]:
        metrics["wall_seconds"] = (run["summary"]["wall_seconds"], run["end_time"])
    # The test metrics belong to the model too: its page and the Models list show them.
    of_model = {"test_accuracy", "test_loss"} if model else set()
    points = [Metric(k, float(v), at, 0, model_id=model.model_id if k in of_model else None)
              for k, (v, at) in metrics.items() if k not in parent.data.metrics]  # fmt: skip
    _log(client, parent_id, points)
    note = _description(run, config, cv, final, registration)
    if parent.data.tags.get("mlflow.note.content") != note:
        client.set_tag(parent_id, "mlflow.note.content", note)  # the run page's description
    if run["status"] != "RUNNING" and parent.info.status != run["status"]:
        if run["error"]:
            client.set_tag(parent_id, "error", run["error"])
        elif "error" in parent.data.tags:  # marked stale before this publish finished it
            client.delete_tag(parent_id, "error")
        client.set_terminated(parent_id, run["status"], end_time=run["end_time"])
    return Published(parent_id, uri, registration)


def _record_store(recorded: str | None) -> str | None:
    """Where a record is published: the store it names (kept without credentials), or
    ``MLFLOW_TRACKING_URI`` when that is the same store with the credentials the record left out
    (a database password). Another store there does not take the record away from its start.
    A record that names no store (made by hand: the pipeline's always do) goes where
    :func:`default_tracking_uri` says."""
    environment = os.environ.get("MLFLOW_TRACKING_URI")
    if recorded and environment and redact_uri(environment) == recorded:
        return environment
    return recorded


def _parent(
    client: Any,
    experiment_id: str,
    run: dict[str, Any],
    config: PipelineConfig,
    best: dict[str, Any],
):
    """The record's parent run, created if it is new, with every param it lacks."""
    from mlflow.entities import Param, ViewType

    found = client.search_runs([experiment_id], f"tags.`{RECORD_TAG}` = '{run['id']}'",
                               run_view_type=ViewType.ALL, max_results=1)  # fmt: skip
    dataset = run["dataset"]
    if found:
        parent = found[0]
    else:
        # "mlp-pipeline mnist-default-brave-otter" (the CLI's flow-run names start with the
        # dataset), "mlp-pipeline mnist inquisitive-chimera" (a deployment's).
        flow_run = run["prefect_flow_run"].get("name", "")
        named = flow_run.startswith(f"{dataset['name']}-")
        name = " ".join(filter(None, (run["flow"], None if named else dataset["name"], flow_run)))
        commit = run.get("git_commit")
        commit = {"mlflow.source.git.commit": commit} if commit else {}
        parent = client.create_run(
            experiment_id,
            start_time=run["start_time"],
            run_name=name,
            tags={**_shared_tags(run), RECORD_TAG: run["id"], "stage": "pipeline",
                  "flow": run["flow"], **commit},
        )  # fmt: skip
    params = {
        **config.flat(),
        "dataset.name": dataset["name"],
        "dataset.fingerprint": dataset["fingerprint"],
        # The folder its files were read from: `evaluate` reads the test set there again.
        **({"dataset.data_dir": dataset["data_dir"]} if dataset.get("data_dir") else {}),
        "package.version": run["package_version"],
        **run["params"],
        **best,
    }
    missing = [Param(k, _text(v)) for k, v in params.items() if k not in parent.data.params]
    if missing:
        client.log_batch(parent.info.run_id, params=missing)
    return parent


def _description(run, config, cv, final, registration: Registration | None) -> str:
    """What ran and what came out, in a few lines of Markdown: the parent run's description."""
    flow_run = run["prefect_flow_run"].get("name")
    where = f" (Prefect flow run {flow_run})" if flow_run else ""
    lines = [f"**{run['flow']}** on {run['dataset']['name']}{where}: {run['status'].lower()}."]
    if cv is not None:
        table, row = cv["table"], cv["chosen_row"]
        lines.append(
            f"Cross-validation: {len(table)} candidates x {config.cv.folds} folds "
            f"({config.search.strategy}); chosen {label(cv['best'])}, mean validation "
            f"accuracy {row['mean_val_accuracy']:.4f}."
        )
    if final is not None:
        evaluation = final["evaluation"]
        lines.append(f"Final model: test accuracy {evaluation['accuracy']:.4f} on "
                     f"{evaluation['n_samples']:,} images.")  # fmt: skip
    if registration is not None:
        lines.append(f"Registered as {registration.name} version {registration.version}"
                     + (" (champion)." if registration.champion else "."))  # fmt: skip
    if run["error"]:
        lines.append(f"Error: {run['error']}")
    return "\n\n".join(lines)


def _candidate_curves(table: Any, folds: list[FoldResult], at: int) -> list[Any]:
    """The mean validation curves (step = epoch) of the best 10 candidates, for the parent:
    two executions compare by curve there. Named ``cv_mean_val_accuracy/lambda 0.0001 ...``."""
    from mlflow.entities import Metric

    # Records from before candidate ids (a lambda-only search) have few candidates: all of them.
    best = set(ranked(table)["candidate"][:10]) if "candidate" in table else None
    by_candidate: dict[str, list[FoldResult]] = {}
    for fold in folds:
        if best is None or candidate_id(fold.candidate) in best:
            by_candidate.setdefault(candidate_id(fold.candidate), []).append(fold)
    points = []
    for results in by_candidate.values():
        name = re.sub(r"[^\w.\- ]", "_", label(results[0].candidate).replace("=", " "))
        for key, curve in mean_curves(results).items():
            points += [Metric(f"cv_mean_{key}/{name}", value, at, epoch)
                       for epoch, value in enumerate(curve, 1) if math.isfinite(value)]  # fmt: skip
    return points


def _dataset_input(data: dict[str, Any], split: str, context: str, part: str = "") -> Any:
    """An MLflow dataset input: a split of the record's dataset (or a fold's ``part`` of it).

    The digest comes from the dataset's fingerprint (no array is hashed again); records from
    before sizes were kept have no profile.
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag

    name = f"{data['name']}-{split}" + (f" ({part})" if part else "")
    digest = hashlib.sha256(f"{data['fingerprint']} {name}".encode()).hexdigest()[:16]
    rows = data.get(f"n_{split}")
    profile = json.dumps({"num_rows": rows}) if rows and not part else None
    dataset = Dataset(name, digest, "local", str(data.get("source", "")), None, profile)
    return DatasetInput(dataset, [InputTag("mlflow.data.context", context)])


def _shared_tags(run: dict[str, Any]) -> dict[str, str]:
    """Tags of every run of a record: what ran it, where and by whom, its Prefect flow run."""
    prefect_run = run["prefect_flow_run"]
    command = {"mlp-pipeline": "run"}.get(run["flow"], run["flow"])
    tags = {"mlflow.source.name": f"mlp-pipeline {command}", "host": run["host"],
            "pid": str(run["pid"])}  # fmt: skip
    if run.get("user"):
        tags["mlflow.user"] = run["user"]
    if prefect_run:
        tags["prefect.flow_run_id"] = prefect_run.get("id", "")
        tags["prefect.flow_run_name"] = prefect_run.get("name", "")
    return tags


def _fold_part_key(candidate: dict[str, Any], fold: int) -> str:
    """The ``PART_TAG`` of a (candidate, fold) child run."""
    searched = f"{candidate_id(candidate)} " if len(candidate) > 1 else ""
    return f"fold {float(candidate[L2_KEY])!r} {searched}{fold}"


def _fold_part(result: FoldResult, epochs: int) -> dict[str, Any]:
    """A fold's child run; ``epochs``: its candidate's full budget (a halving candidate pruned
    before it is tagged with the epoch it stopped at)."""
    tags = (
        {"diverged": "true", "diverged_message": result.message[:5000]} if result.diverged else {}
    )
    if result.budget is not None and result.budget < epochs:
        tags["pruned_at_epoch"] = str(result.budget)
    return {
        "tags": tags,
        "history": result.history,
        "seconds": result.seconds,
        "summary": {
            "fold_val_accuracy": result.val_accuracy,
            "fold_val_loss": result.val_loss,
            "fold_train_accuracy": result.train_accuracy,
            "fold_train_loss": result.train_loss,
            "epochs_run": result.epochs,
            "train_seconds": result.seconds,
        },
        "params": {
            "l2_lambda": result.l2_lambda,
            **result.settings,
            "fold": result.fold,
            "seed": result.seed,
        },
    }


def _child(client, experiment_id, parent_id, existing, name, tags, inputs, *, history, seconds,
           summary, params) -> None:  # fmt: skip
    """A FINISHED child run of ``parent_id`` for one training (``existing``: a half-made one,
    or the final model's live run).

    Its start and end are those of the training; each metric point carries its epoch's end.
    """
    from mlflow.entities import Metric, Param, RunTag

    ended = _ended(history)
    end = ended[-1] if ended and ended[-1] else None
    missing_tags = []
    if existing is None:
        start = end - int(seconds * 1000) if end is not None else None
        run_id = _new_child(client, experiment_id, parent_id, name, tags, start)
    else:  # made when the training started: the result's tags (pruned, diverged) are new
        run_id = existing.info.run_id
        missing_tags = [RunTag(k, v) for k, v in tags.items() if existing.data.tags.get(k) != v]
        if "error" in existing.data.tags:  # marked stale when its process died: finished now
            client.delete_tag(run_id, "error")
    points = _epoch_points(client, run_id if existing else None, history)
    points += [Metric(key, float(value), end or 0, 0) for key, value in summary.items()]
    _log(client, run_id, points, [Param(k, _text(v)) for k, v in params.items()], missing_tags)
    client.log_inputs(run_id, inputs)  # before FINISHED: a finished child is never revisited
    client.set_terminated(run_id, "FINISHED", end_time=end)


def _live_child(client, experiment_id, parent_id, existing, name, tags, history,
                ended_as: str | None) -> None:  # fmt: skip
    """The final model's child run while it trains: its curves so far, epoch by epoch.

    ``ended_as``: the execution ended before the final model did (KILLED or FAILED): so does
    its run, at its last epoch.
    """
    if existing is not None and existing.info.status != "RUNNING":
        return
    ended = _ended(history)
    if existing is None:
        start = ended[0] - int(history["seconds"][0] * 1000) if ended and ended[0] else None
        run_id = _new_child(client, experiment_id, parent_id, name, tags, start)
    else:
        run_id = existing.info.run_id
    _log(client, run_id, _epoch_points(client, run_id if existing else None, history))
    if ended_as is not None:
        client.set_terminated(run_id, ended_as, end_time=ended[-1] if ended else None)


def _started_child(client, experiment_id, parent_id, existing, name, tags, params, start: int,
                   run: dict[str, Any]) -> None:  # fmt: skip
    """A (candidate, fold) child run while it trains (RUNNING since its training started); its
    result completes it. An execution that ended first ends it too, as the execution ended."""
    from mlflow.entities import Param

    if existing is None:
        run_id, logged = _new_child(client, experiment_id, parent_id, name, tags, start), {}
    elif existing.info.status == "RUNNING":
        run_id, logged = existing.info.run_id, existing.data.params
    else:
        return
    _log(client, run_id, [], [Param(k, _text(v)) for k, v in params.items() if k not in logged])
    if run["status"] != "RUNNING":
        client.set_terminated(run_id, run["status"], end_time=run["end_time"])


def _new_child(client, experiment_id, parent_id, name, tags, start: int | None) -> str:
    tags = {"mlflow.parentRunId": parent_id, **tags}
    return client.create_run(experiment_id, start_time=start, run_name=name, tags=tags).info.run_id


def _ended(history: dict[str, list[float]]) -> list[int]:
    """Each epoch's end in epoch milliseconds (0 where unknown)."""
    return [int(t * 1000) if not math.isnan(t) else 0 for t in history.get(WALL_TIME, [])]


def _epoch_points(client: Any, run_id: str | None, history: dict[str, list[float]]) -> list[Any]:
    """The per-epoch metric points (step = epoch) of ``history`` that run ``run_id`` (None: a
    new run) lacks: a live run already has its first epochs."""
    from mlflow.entities import Metric

    keys = [key for key in EPOCH_METRICS
            # A column of NaN only: val_* of a model trained without validation data.
            if key in history and not all(math.isnan(v) for v in history[key])]  # fmt: skip
    epochs, ended = [int(epoch) for epoch in history.get("epoch", [])], _ended(history)
    points = []
    for key in keys:
        logged = (
            {point.step for point in client.get_metric_history(run_id, key)} if run_id else set()
        )
        points += [Metric(key, float(value), at, epoch)
                   for epoch, at, value in zip(epochs, ended, history[key], strict=True)
                   if epoch not in logged]  # fmt: skip
    return points


def _log(
    client: Any, run_id: str, metrics: list[Any], params: list[Any] = (), tags: list[Any] = ()
) -> None:
    if metrics or params or tags:
        client.log_batch(run_id, metrics=metrics, params=list(params), tags=list(tags))


def _text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, list | tuple | dict) else str(value)


def _upload(client, run_id, uploaded, folder, texts: dict[str, str], files: list[str]) -> None:
    """Upload the texts and the record's files that ``run_id`` does not list yet."""
    for name, text in texts.items():
        if name not in uploaded:
            client.log_text(run_id, text, name)
    for name in files:
        if name not in uploaded:
            client.log_artifact(run_id, str(folder / name))


def _log_model(
    client: Any, parent: Any, folder: Path, final: dict[str, Any], description: str
) -> Any:
    """The pyfunc model as an MLflow logged model of the parent (``runs:/<parent id>/model``,
    the runs list's Models column): created, uploaded whole, READY, an output of the run.
    Returns it (None: logged as run artifacts by an earlier version of this package)."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    run_id = parent.info.run_id
    model = logged_model(client, parent)
    if parent.data.tags.get(MODEL_TAG) == "true":
        return model
    if model is None:
        # Who and what made it, as MLflow's log_model tags a model from its run's context.
        made_by = ("mlflow.user", "mlflow.source.name", "mlflow.source.git.commit")
        params = {"l2_lambda": final["l2_lambda"], **final["settings"]}
        model = client.create_logged_model(
            parent.info.experiment_id,
            name=MODEL_NAME,
            source_run_id=run_id,
            params={key: _text(value) for key, value in params.items()},
            tags={
                **{key: value for key, value in parent.data.tags.items() if key in made_by},
                "mlflow.note.content": description,
            },  # fmt: skip
        )
    if model.status != LoggedModelStatus.READY:
        with tempfile.TemporaryDirectory(prefix="mlp-pipeline-") as tmp:
            built = build_pyfunc(folder / "final", final["input_example"], Path(tmp) / "model",
                                 model)  # fmt: skip
            client.log_model_artifacts(model.model_id, str(built))
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    outputs = parent.outputs.model_outputs if parent.outputs else []
    if model.model_id not in {output.model_id for output in outputs}:
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    client.set_tag(run_id, "model_uri", f"runs:/{run_id}/{MODEL_NAME}")
    client.set_tag(run_id, MODEL_TAG, "true")
    return model


def _model_description(run, config, final, cv_ran: bool) -> str:
    """What the model is and how it scored: the logged model's and its versions' description."""
    evaluation, dataset = final["evaluation"], run["dataset"]["name"]
    chosen = {L2_KEY: final["l2_lambda"], **final["settings"]}
    chosen_by = f"chosen by {config.cv.folds}-fold cross-validation" if cv_ran else "given"
    hidden = candidate_config(config, chosen).model.hidden_sizes
    n_classes = len(evaluation["confusion"])
    shape = "-".join(map(str, [len(final["input_example"][0]), *hidden, n_classes]))
    return (
        f"A {shape} MLP trained on {dataset} ({label(chosen)}, {chosen_by}); test accuracy "
        f"{evaluation['accuracy']:.4f} on {evaluation['n_samples']:,} images. "
        f"Run record {run['id']}."
    )


def _register(client, uri, parent, run, config, final, description, model) -> Registration | None:
    """Register the parent's model once; the registration's tags on the parent mark it done."""
    name = config.tracking.registered_model_for(run["dataset"]["name"])
    tags = parent.data.tags
    if name is None:
        return None
    if tags.get("registered_model") == name and "champion" in tags:
        return Registration(name, tags["registered_model_version"], tags["champion"] == "true",
                            tags.get("champion_comparison", ""))  # fmt: skip
    evaluation, dataset = final["evaluation"], run["dataset"]["name"]
    version_tags = {
        "test_accuracy": repr(evaluation["accuracy"]),
        "test_set": final["test_set"],
        "test_images": str(evaluation["n_samples"]),
        "dataset.name": dataset,
        "dataset.fingerprint": run["dataset"]["fingerprint"],
        "l2_lambda": repr(final["l2_lambda"]),
        **{key: str(value) for key, value in final["settings"].items()},
        **({"git_commit": run["git_commit"]} if run.get("git_commit") else {}),
    }

    def test_set() -> Any:
        from pipeline.data import load_test_set

        data = config.data
        with contextlib.suppress(PipelineError):
            return load_test_set(data.dataset, data.data_dir, False, limit_test=data.limit_test,
                                 progress=False)  # fmt: skip
        return None

    registration = register(client, uri, name, parent, version_tags, test_set, description, model)
    for key, value in {
        "registered_model": name,
        "registered_model_version": registration.version,
        "champion_comparison": registration.note,
        "champion": str(registration.champion).lower(),  # last: it marks the registration done
    }.items():
        if value and tags.get(key) != value:
            client.set_tag(parent.info.run_id, key, value)
    return registration


class LivePublisher:
    """Publishes a record from one background thread while the flow goes on.

    The flow calls :meth:`request` after each write to the record: MLflow's latency, or its
    absence, never holds up the work, and a signal never lands in the middle of a write.
    Requests made within :attr:`INTERVAL` seconds of a publish share the next one. Leaving the
    block publishes what the record then holds at once, and waits for it.
    """

    # A publish reads the whole record and queries MLflow: one per epoch of a short-epoch
    # training took CPU from it (benchmarks/README.md, "Live publishing").
    INTERVAL = 2.0

    def __init__(
        self, record: RunRecord, tracking_uri: str, store: Any, system_metrics: bool = False
    ) -> None:
        """``system_metrics``: MLflow samples the machine's use into the parent run meanwhile."""
        self.record, self.tracking_uri, self.store = record, tracking_uri, store
        self.published: Published | None = None
        self.error: BaseException | None = None
        self._system_metrics = system_metrics
        self._monitor: Any = None
        self._wanted = threading.Event()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlflow-publish", daemon=True)

    def __enter__(self) -> LivePublisher:
        self._thread.start()
        self.request()
        return self

    def request(self) -> None:
        """Publish again soon (what the record holds by then)."""
        self._wanted.set()

    def _loop(self) -> None:
        closing = False
        while not closing:
            self._wanted.wait()
            self._wanted.clear()
            closing = self._closing.is_set()  # read first: a later request gets its own publish
            if closing and self._monitor is not None:  # its last samples before the run ends
                with contextlib.suppress(Exception):
                    self._monitor.finish()
                self._monitor = None
            try:
                self.published = publish(self.record, self.tracking_uri, self.store)
                self.error = None
            except Exception as exc:  # noqa: BLE001 -- the record keeps it: published later
                self.error = exc
            if self._system_metrics and self._monitor is None and not closing and self.published:
                self._monitor = self._start_monitor(self.published.run_id)
            if not closing:
                self._closing.wait(self.INTERVAL)

    def final_epochs(self, candidate: dict[str, Any], also: Any = None) -> Any:
        """An epoch callback for the final model: each epoch goes to the record, then to MLflow
        (its curves live); ``also(row)`` is called first (a progress bar)."""
        epochs: list[dict[str, Any]] = []

        def on_epoch(row: dict[str, Any]) -> None:
            if also is not None:
                also(row)
            epochs.append(row)
            self.record.add_final_progress(candidate, epochs)
            self.request()

        return on_epoch

    def _start_monitor(self, run_id: str) -> Any:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, tracking_uri=self.tracking_uri)
        monitor.start()
        return monitor

    def __exit__(self, *exc_info: Any) -> None:
        try:
            self._closing.set()
            self._wanted.set()
            self._thread.join()
        except KeyboardInterrupt:  # a signal while the closing publish runs: it may stop short
            logger.warning(
                "interrupted while publishing to MLflow; the run record %s holds the results: "
                "publish them with `%s`",
                self.record.folder, publish_command(self.record.folder),
            )  # fmt: skip
            raise

    def raise_if_unpublished(self) -> None:
        """Raise :class:`NotPublishedError`, naming the record's folder, if MLflow stayed away."""
        if self.error is not None or self.published is None:
            reason = one_line(self.error or RuntimeError("not published"))
            later = f"publish them with `{publish_command(self.record.folder)}`"
            if self.published is not None:  # the parent exists: not left RUNNING (best effort)
                client, run_id = self.store[0], self.published.run_id
                with contextlib.suppress(Exception):
                    client.set_tag(run_id, "error", f"not all published ({reason}); {later}")
                    client.set_terminated(run_id, "FAILED")
            raise NotPublishedError(
                f"the pipeline finished but MLflow at {redact_uri(self.tracking_uri)} could not "
                f"record it ({reason}); the results are in {self.record.folder}: {later}",
                record=self.record.folder,
            )


def publish_command(folder: Path) -> str:
    """The command that publishes the run record in ``folder``, quoted for a shell."""
    return f"mlp-pipeline publish {shlex.quote(str(folder))}"


@contextlib.contextmanager
def recorded(config: PipelineConfig, **record: Any) -> Iterator[tuple[RunRecord, LivePublisher]]:
    """A new run record (``RunRecord.create(config, **record)``), published as it grows.

    The store is opened first: an unusable one fails in one line before any record or
    training. A block that raises leaves the record FAILED (KILLED when interrupted), and so
    do its MLflow runs. At the end, :class:`NotPublishedError` if MLflow stayed away.
    """
    # The record keeps where it goes, without credentials: a later publish finds the store.
    uri = default_tracking_uri(config.tracking.tracking_uri)
    if config.tracking.tracking_uri != uri:
        config = config.replace({"tracking.tracking_uri": uri})
    store = open_store(uri, config.tracking.experiment)
    run_record = RunRecord.create(config, **record)
    publishing = LivePublisher(run_record, uri, store, config.tracking.system_metrics)
    with publishing as publisher, run_record.running():
        yield run_record, publisher
        if run_record.run()["status"] == "RUNNING":
            run_record.finish("FINISHED")
    publisher.raise_if_unpublished()
