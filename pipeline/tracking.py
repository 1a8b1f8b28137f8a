"""Everything the pipeline writes to MLflow, in one place.

Where runs go (:func:`resolve_tracking_uri`), the experiment, and :class:`PipelineRecorder`: the
single writer of one pipeline execution. Only the flow process records; parallel workers return
plain :class:`~pipeline.results.FoldResult` objects and never touch MLflow, so there is no
per-thread active-run stack to get wrong: every call names its run id through ``MlflowClient``.

Run layout of one execution::

    parent   stage=pipeline   params: flattened config, dataset, versions; cv/test summary metrics;
                               config.json, cv_results.csv and the PNG plots
      child  stage=cv         one per (lambda, fold): per-epoch metrics (step = epoch)
      child  stage=final      the final model's per-epoch metrics and the logged pyfunc model
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import math
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import plots
from pipeline.data import array_sha256
from pipeline.errors import DataError, PipelineError, TrackingError
from pipeline.results import WALL_TIME, Evaluation, FoldResult
from pipeline.store_template import seed_sqlite_store
from pipeline.tracking_uri import (
    check_tracking_uri,
    default_artifact_location,
    redact_uri,
    resolve_tracking_uri,
    sqlite_database,
)

CHAMPION_ALIAS = "champion"
MODEL_NAME = "model"  # the logged model's name inside its run
RECORD_KEY_TAG = "record_key"  # a child run's own key: a retried creation finds it by this
MODEL_CODE_PATH = Path(__file__).with_name("mlflow_model.py")
PACKAGE_NAME = "mlp-pipeline"
# History columns recorded per epoch (step = epoch); the others (epoch, seconds) are bookkeeping.
EPOCH_METRICS = (
    "train_loss",
    "train_objective",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "lr",
)
_TERMINAL = ("FINISHED", "FAILED", "KILLED")


@contextlib.contextmanager
def _fluent_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's module-level (fluent) API at ``uri`` for a block, then restore it.

    Only model logging and loading need the fluent API; ``mlflow.set_tracking_uri`` also writes
    ``$MLFLOW_TRACKING_URI``, which is restored too.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils as service_utils

    previous_uri = getattr(service_utils, "_tracking_uri", None)
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous_uri)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# ------------------------------------------------------------------------------------ helpers
def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialize a step across processes on a SQLite store (elsewhere: no lock).

    Taken for a store's first use (two pipelines starting together on a new store would both
    run MLflow's schema migrations and both create the experiment; the second failed with
    "table ... already exists") and for registering a model (see ``log_final``).
    """
    database = sqlite_database(uri)
    if database is None:
        yield
        return
    import fcntl

    with open(f"{database}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_store(tracking_config: Any) -> None:
    """Create the store's schema and the experiment now (the recorder then finds them ready).

    Raises :class:`TrackingError` with one line when the store cannot be used.
    """
    uri = resolve_tracking_uri(tracking_config.tracking_uri)
    check_tracking_uri(uri)
    try:
        _open_store(uri, tracking_config.experiment)
    except Exception as exc:  # MlflowException, OSError, SQLAlchemy errors of a broken file
        raise TrackingError(
            f"cannot use MLflow store {redact_uri(uri)}: {_one_line(exc)}"
        ) from None


def _open_store(uri: str, experiment: str) -> tuple[Any, str]:
    """A client and the experiment's id; first use of a SQLite store creates its schema."""
    with _store_lock(uri):
        database = sqlite_database(uri)
        if database is not None:
            seed_sqlite_store(database)  # a new store: a copy, not MLflow's 2 s of migrations
        client = _client(uri)
        # First use creates the tracking and the registry schema: both under the lock.
        client.search_registered_models(max_results=1)
        experiment_id = get_or_create_experiment(client, experiment, default_artifact_location(uri))
    return client, experiment_id


def _once(steps: dict[str, Any], step: str, action: Callable[..., Any], *args, **kwargs) -> Any:
    """``action(*args, **kwargs)``, unless ``steps`` says an earlier attempt did it: its result.

    ``steps`` are one recorded call's (:meth:`PipelineRecorder._steps`):
    :class:`~pipeline.recording.ResilientRecorder` retries a failed call from the top, and each
    retry used to create one more child run (a second final run could register the model
    again) or log a metric point twice.
    """
    if step not in steps:
        steps[step] = action(*args, **kwargs)
    return steps[step]


def _tried_before(steps: dict[str, Any], step: str) -> bool:
    """Whether an earlier attempt started ``step`` (it may have failed, or its reply was lost);
    marks it started. For the steps that create something a retry must look up, not repeat."""
    tried = steps.get(f"{step} tried", False)
    steps[f"{step} tried"] = True
    return tried


def get_or_create_experiment(client, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name``, created (with ``artifact_location``) or restored if needed."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, artifact_location=artifact_location)
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _mark_stale(client, experiment_id: str) -> list[str]:
    host = socket.gethostname()
    runs = client.search_runs(
        [experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000
    )
    stale = []
    for run in runs:
        tags = run.data.tags
        if tags.get("host") != host or not tags.get("pid", "").isdigit():
            continue  # another machine's run, or not ours: its liveness is unknowable here
        if _pid_alive(int(tags["pid"])):
            continue
        client.set_tag(run.info.run_id, "error", "process ended without closing the run")
        client.set_terminated(run.info.run_id, "FAILED")
        stale.append(run.info.run_id)
    return stale


def mark_stale_runs_failed(experiment: str, tracking_uri: str | None = None) -> list[str]:
    """Set FAILED the runs of ``experiment`` left RUNNING by a process that no longer exists.

    Only runs tagged with this host's name and a ``pid`` (every run the recorder creates) are
    considered. Returns the run ids changed (empty if the experiment does not exist).
    """
    client = _client(resolve_tracking_uri(tracking_uri))
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else _mark_stale(client, found.experiment_id)


def _stringify(value: Any) -> str:
    if isinstance(value, list | tuple | dict):
        return json.dumps(value)
    return str(value)


def _package_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE_NAME)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _git_commit() -> str | None:
    """The commit of the code that runs (an editable checkout), not of the working directory.

    Only when this very file is tracked by that repository: an installed copy that happens to
    sit inside someone's checkout (``project/.venv/...``) must not report their commit.
    """
    here = Path(__file__).resolve()

    def git(*args: str) -> subprocess.CompletedProcess[str] | None:
        try:
            return subprocess.run(
                ["git", *args], capture_output=True, text=True, timeout=5, check=False,
                cwd=here.parent,
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return None

    tracked = git("ls-files", "--error-unmatch", here.name)
    if tracked is None or tracked.returncode != 0:
        return None
    result = git("rev-parse", "HEAD")
    commit = result.stdout.strip() if result is not None and result.returncode == 0 else ""
    return commit or None


def _epoch_metrics(history: Mapping[str, Sequence[float]], timestamp: int) -> list:
    """One ``Metric`` per (column, epoch) of a history, step = the epoch number (1-based).

    Each point gets its epoch's end time when the history has it (``wall_time``), so MLflow's
    wall-time axis shows the training as it ran; else ``timestamp`` (milliseconds).
    """
    from mlflow.entities import Metric

    n_epochs = max((len(v) for k, v in history.items() if k in EPOCH_METRICS), default=0)
    epochs = [int(e) for e in history.get("epoch", range(1, n_epochs + 1))]
    ended = [
        timestamp if _is_nan(t) else int(t * 1000)
        for t in history.get(WALL_TIME, [math.nan] * len(epochs))
    ]
    metrics = []
    for key in EPOCH_METRICS:
        values = history.get(key)
        if values is None or all(_is_nan(v) for v in values):
            continue  # e.g. val_* of a model trained without validation data
        for epoch, at, value in zip(epochs, ended, values, strict=False):
            if value is not None:
                metrics.append(Metric(key, float(value), at, epoch))
    return metrics


def _is_nan(value: Any) -> bool:
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return True


def _metrics(values: Mapping[str, float], timestamp: int) -> list:
    from mlflow.entities import Metric

    return [Metric(key, float(value), timestamp, 0) for key, value in values.items()]


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class FinalRecord:
    """Where the final model went: its run, its URI, its registry version, champion or not."""

    run_id: str
    model_uri: str
    registered_version: str | None
    champion: bool
    registered_model: str | None = None
    # How the champion was decided, e.g. "champion stays version 2, 0.9850 on this test set".
    champion_note: str = ""


# ------------------------------------------------------------------------------------ recorder
class PipelineRecorder:
    """Record one pipeline execution: a parent run, its CV and final child runs, the model.

    Use as a context manager so no run is ever left RUNNING::

        with PipelineRecorder(config.tracking) as recorder:
            recorder.start(config, ds.name, ds.fingerprint)
            ...

    An exception marks the runs FAILED (tag ``error``: its message on one line);
    ``KeyboardInterrupt``, ``SystemExit`` or Prefect's ``TerminationSignal`` (SIGTERM) marks them
    KILLED.

    Parameters
    ----------
    tracking_config : pipeline.config.TrackingConfig
        ``tracking_uri`` (None: see :func:`resolve_tracking_uri`), ``experiment``,
        ``registered_model`` (None: the model is logged but not registered).
    """

    def __init__(self, tracking_config: Any) -> None:
        self.tracking_config = tracking_config
        self.tracking_uri = resolve_tracking_uri(tracking_config.tracking_uri)
        self.client = None
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.stale_run_ids: list[str] = []
        self._dataset: dict[str, str] = {}
        self._shared_tags: dict[str, str] = {}
        self._registered_model: str | None = None
        self._open_children: list[str] = []
        # What each recorded call has done so far, by call (see _once).
        self._done: dict[tuple[Any, ...], dict[str, Any]] = {}
        self._finished = False
        self._warm_up: threading.Thread | None = None
        if urllib.parse.urlsplit(self.tracking_uri).scheme in ("http", "https"):
            # MLflow would print "View run ... at: <url>" for every run it ends.
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

    # -- warm-up ------------------------------------------------------------------------------
    def warm_up(self, *, final_model: bool) -> None:
        """Load, on a background thread, what the first plot and model log would load.

        About 1 s (0.7 s of it MLflow's map of installed packages, which it builds to check a
        logged model's requirements) that would otherwise sit in the serial end of a run. Call
        it before the sweep: the flow process mostly waits there. The plotting and logging
        calls wait for it, so nothing is imported by two threads at once.
        """
        if self._warm_up is None:
            self._warm_up = threading.Thread(
                target=_warm_up_logging, args=(final_model,), name="mlflow-warm-up", daemon=True
            )
            self._warm_up.start()

    def _warmed_up(self) -> None:
        if self._warm_up is not None:
            self._warm_up.join()

    # -- context manager ----------------------------------------------------------------------
    def __enter__(self) -> PipelineRecorder:
        return self

    def __exit__(self, exc_type, exc, traceback) -> bool:
        # A run that failed early may leave the warm-up importing: let it finish here rather
        # than at interpreter exit, where a daemon thread holding an import lock can hang it.
        self._warmed_up()
        if self.parent_run_id is None or self._finished:
            return False
        if exc is None:
            self.finish("FINISHED")
            return False
        # Best effort: if the store itself is what failed, the original exception matters more.
        with contextlib.suppress(Exception):
            # KeyboardInterrupt, SystemExit and Prefect's TerminationSignal (SIGTERM) are
            # BaseExceptions, not errors of the pipeline: the run was killed.
            if not isinstance(exc, Exception):
                self.finish("KILLED", error=f"interrupted ({exc_type.__name__})")
            else:
                self.finish("FAILED", error=f"{exc_type.__name__}: {_one_line(exc)}")
        return False

    # -- lifecycle ----------------------------------------------------------------------------
    def start(
        self,
        config: Any,
        dataset_name: str,
        dataset_fingerprint: str,
        *,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> str:
        """Open the parent run and log the configuration; returns the parent run id.

        ``tags`` go on the parent and every child run; ``params`` join the configuration's
        (``train`` adds the one ``l2_lambda`` it trains with).

        Raises :class:`TrackingError` (quickly, before any training) when the store is unusable.
        """
        from mlflow.entities import Param

        check_tracking_uri(self.tracking_uri)
        where = redact_uri(self.tracking_uri)
        try:
            self.client, self.experiment_id = _open_store(
                self.tracking_uri, self.tracking_config.experiment
            )
            self.stale_run_ids = _mark_stale(self.client, self.experiment_id)
            run = self.client.create_run(
                self.experiment_id,
                run_name=run_name,
                tags={**self._process_tags(), "stage": "pipeline", **(tags or {})},
            )
        except Exception as exc:  # MlflowException, OSError, SQLAlchemy errors of a broken file
            raise TrackingError(f"cannot use MLflow store {where}: {_one_line(exc)}") from None
        self.parent_run_id = run.info.run_id
        self._shared_tags = dict(tags or {})  # the Prefect flow run's id and name, on every run
        self._finished = False
        self._done = {}
        self._dataset = {"dataset.name": dataset_name, "dataset.fingerprint": dataset_fingerprint}
        self._registered_model = self.tracking_config.registered_model_for(dataset_name)

        extra_params = dict(params or {})
        params = {key: _stringify(_redact(value)) for key, value in config.flat().items()}
        params.update(
            {
                "dataset.name": dataset_name,
                "dataset.fingerprint": dataset_fingerprint,
                "package.version": _package_version(),
                **{key: _stringify(value) for key, value in extra_params.items()},
            }
        )
        commit = _git_commit()
        if commit:
            params["git.commit"] = commit
        extra_tags = {"mlflow.source.git.commit": commit} if commit else {}
        self._log(
            self.parent_run_id,
            params=[Param(key, value) for key, value in params.items()],
            tags=extra_tags,
        )
        with tempfile.TemporaryDirectory(prefix="mlp-pipeline-") as tmp:
            path = Path(tmp) / "config.json"
            path.write_text(_config_json(config), encoding="utf-8")
            self.client.log_artifact(self.parent_run_id, str(path))
        return self.parent_run_id

    def finish(self, status: str = "FINISHED", *, error: str | None = None) -> None:
        """End any child run still open and the parent with ``status`` (FINISHED/FAILED/KILLED)."""
        if status not in _TERMINAL:
            raise ValueError(f"status must be one of {_TERMINAL}, got {status!r}")
        if self.parent_run_id is None or self._finished:
            return
        for run_id in list(self._open_children):
            self._end(run_id, status, error)
        self._end(self.parent_run_id, status, error)
        self._finished = True

    def _end(self, run_id: str, status: str, error: str | None) -> None:
        if error:
            self.client.set_tag(run_id, "error", error[:5000])
        self.client.set_terminated(run_id, status)
        if run_id in self._open_children:
            self._open_children.remove(run_id)

    # -- cross-validation ---------------------------------------------------------------------
    def log_fold(self, result: FoldResult) -> str:
        """One finished child run for one (lambda, fold) training; returns its run id.

        Per-epoch metrics use the history's column names with step = epoch; the summary
        values (the last epoch's, or with early stopping the restored best epoch's) go to
        ``fold_*`` metrics so they do not add a point to the histories. A diverged training is
        tagged ``diverged=true`` with its message.
        """
        from mlflow.entities import Param

        tags = {"stage": "cv"}
        if result.diverged:
            tags.update({"diverged": "true", "diverged_message": result.message[:5000]})
        steps = self._steps("fold", result.l2_lambda, result.fold)  # a retry resumes
        run_id = self._child_once(steps, f"cv lambda={result.l2_lambda:g} fold={result.fold}", tags)
        now = _once(steps, "time", _now_ms)
        summary = {
            "fold_val_accuracy": result.val_accuracy,
            "fold_val_loss": result.val_loss,
            "fold_train_accuracy": result.train_accuracy,
            "fold_train_loss": result.train_loss,
            "epochs_run": result.epochs,
            "train_seconds": result.seconds,
        }
        if result.diverged:
            summary.update({k: math.nan for k in summary if k.startswith("fold_")})
        _once(
            steps, "metrics", self._log, run_id,
            metrics=_epoch_metrics(result.history, now) + _metrics(summary, now),
            params=[
                Param("l2_lambda", _stringify(result.l2_lambda)),
                Param("fold", str(result.fold)),
                Param("seed", str(result.seed)),
            ],
        )  # fmt: skip
        _once(steps, "ended", self._end, run_id, "FINISHED", None)
        return run_id

    def log_cv_summary(self, table: pd.DataFrame, best_lambda: float) -> None:
        """On the parent: the chosen lambda, ``cv_results.csv`` (the table), ``cv_lambda.png``."""
        self._warmed_up()
        best = table.loc[table["l2_lambda"] == best_lambda, "mean_val_accuracy"]
        best_accuracy = float(best.iloc[0]) if len(best) else math.nan
        summary = {"best_l2_lambda": best_lambda, "cv_best_mean_val_accuracy": best_accuracy}
        steps = self._steps("cv summary")  # a retry does not log the metrics twice
        now = _once(steps, "time", _now_ms)  # same points again: the store keeps one copy
        _once(steps, "metrics", self._log, self._parent(), metrics=_metrics(summary, now))
        with tempfile.TemporaryDirectory(prefix="mlp-pipeline-") as tmp:
            csv = Path(tmp) / "cv_results.csv"
            table.to_csv(csv, index=False)
            png = plots.plot_cv_lambda(table, best_lambda, Path(tmp) / "cv_lambda.png")
            self.client.log_artifact(self._parent(), str(csv))
            self.client.log_artifact(self._parent(), str(png))

    # -- final model --------------------------------------------------------------------------
    def log_final(
        self,
        model: Any,
        normalizer: Any,
        history_columns: Mapping[str, Sequence[float]],
        evaluation: Evaluation,
        test_images: np.ndarray,
        test_labels: np.ndarray,
        test_predictions: np.ndarray,
        *,
        l2_lambda: float,
    ) -> FinalRecord:
        """Record the final model: its training run, test metrics, plots, the pyfunc model.

        Parameters
        ----------
        model : mlp.MLP
            The trained network (saved with its own ``save``).
        normalizer : pipeline.normalize.Normalizer
            Fitted on the training data; saved with ``to_dict()``.
        history_columns : mapping of str to list
            ``History.as_columns()`` of the final training.
        evaluation : Evaluation
            Test accuracy, loss and confusion matrix.
        test_images : np.ndarray, shape (n_test, 784)
            Raw test pixels (0..255), for the misclassified grid and the input example.
        test_labels, test_predictions : np.ndarray, shape (n_test,)
        l2_lambda : float
            The lambda the final model was trained with.

        Returns
        -------
        FinalRecord
        """
        from mlflow.entities import Param

        self._warmed_up()
        parent = self._parent()
        steps = self._steps("final")  # a retried call resumes where it failed
        run_id = self._child_once(steps, f"final lambda={l2_lambda:g}", {"stage": "final"})
        now = _once(steps, "time", _now_ms)
        test = {"test_accuracy": evaluation.accuracy, "test_loss": evaluation.loss}
        epochs = len(history_columns.get("train_loss", ()))
        _once(
            steps, "metrics", self._log, run_id,
            metrics=_epoch_metrics(history_columns, now) + _metrics(test, now),
            params=[Param("l2_lambda", _stringify(l2_lambda)), Param("epochs", str(epochs))],
        )  # fmt: skip
        _once(steps, "parent metrics", self._log, parent, metrics=_metrics(test, now))
        _once(
            steps, "figures", self._log_final_figures, parent,
            history_columns, evaluation, test_images, test_labels, test_predictions,
        )  # fmt: skip
        model_info = _once(steps, "model", self._log_model, run_id, model, normalizer, test_images)
        _once(steps, "ended", self._end, run_id, "FINISHED", None)

        version = None
        champion = False
        note = ""
        name = self._registered_model
        if name:
            # One registration at a time per local store: choosing the champion reads the
            # current one, then moves the alias; two pipelines doing it at once could both
            # see no champion, or each keep the model it beat.
            with _store_lock(self.tracking_uri):
                retried = _tried_before(steps, "version")
                version = _once(
                    steps, "version", self._create_version, name, run_id, model_info, retried
                )
                champion, note = _once(
                    steps, "champion", self._register,
                    name, version, evaluation.accuracy, test_images, test_labels,
                )  # fmt: skip
            self.client.set_tag(parent, "registered_model", name)
            self.client.set_tag(parent, "registered_model_version", version)
            self.client.set_tag(parent, "champion", str(champion).lower())
            if note:
                self.client.set_tag(parent, "champion_comparison", note)
        self.client.set_tag(parent, "model_uri", model_info.model_uri)
        return FinalRecord(run_id, model_info.model_uri, version, champion, name, note)

    def _log_final_figures(
        self,
        parent: str,
        history_columns: Mapping[str, Sequence[float]],
        evaluation: Evaluation,
        test_images: np.ndarray,
        test_labels: np.ndarray,
        test_predictions: np.ndarray,
    ) -> None:
        """The final model's training curves, confusion matrix and misclassified grid."""
        with tempfile.TemporaryDirectory(prefix="mlp-pipeline-") as tmp:
            folder = Path(tmp)
            figures = [
                plots.plot_training_curves(history_columns, folder / "training_curves.png"),
                plots.plot_confusion_matrix(evaluation.confusion, folder / "confusion_matrix.png"),
                plots.plot_misclassified(
                    test_images, test_labels, test_predictions, folder / "misclassified.png"
                ),
            ]
            for figure in figures:
                self.client.log_artifact(parent, str(figure))

    def _log_model(self, run_id: str, model: Any, normalizer: Any, test_images):
        """Log the pyfunc model with the code it runs, so it needs only numpy and mlflow.

        The package is on no index: a model that required it could not be served by
        ``mlflow models serve`` in the environment MLflow builds from the requirements.
        """
        import mlflow

        requirements = [f"numpy=={np.__version__}", f"mlflow=={mlflow.__version__}"]
        # The fluent API is used only here and only on this thread, resuming the run by id.
        nested = mlflow.active_run() is not None
        with (
            tempfile.TemporaryDirectory(prefix="mlp-pipeline-") as tmp,
            _fluent_tracking_uri(self.tracking_uri),
            mlflow.start_run(run_id=run_id, nested=nested),
        ):
            weights = model.save(Path(tmp) / "weights.npz")
            normalizer_path = Path(tmp) / "normalizer.json"
            normalizer_path.write_text(json.dumps(normalizer.to_dict()), encoding="utf-8")
            return mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=str(MODEL_CODE_PATH),
                artifacts={"weights": str(weights), "normalizer": str(normalizer_path)},
                input_example=np.asarray(test_images[:5], dtype=np.float32),
                pip_requirements=requirements,
                code_paths=_model_code(Path(tmp) / "code"),
            )

    def _create_version(self, name: str, run_id: str, model_info: Any, retried: bool) -> str:
        """Register the logged model (through the client: the fluent call prints to stderr).

        A retry first looks for the version an earlier attempt created: a server may have
        created it and then lost the reply.
        """
        from mlflow.exceptions import MlflowException

        if retried:
            for existing in self.client.search_model_versions(f"run_id = '{run_id}'"):
                if existing.name == name:
                    return str(existing.version)
        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        # The SQLite registry resolves the models:/ source through the fluent tracking URI.
        with _fluent_tracking_uri(self.tracking_uri):
            created = self.client.create_model_version(
                name, source=model_info.model_uri, run_id=run_id, model_id=model_info.model_id
            )
        return str(created.version)

    def _register(
        self,
        name: str,
        version: str,
        test_accuracy: float,
        test_images: np.ndarray,
        test_labels: np.ndarray,
    ) -> tuple[bool, str]:
        """Tag the new version; move the champion alias to it if it beats the current one.

        Accuracies are only compared on one test set. A champion scored on another one (another
        dataset, a ``limit_test`` subset, a version from before this tag existed) is loaded and
        scored on this version's test set first, as MLflow's champion/challenger guide does.
        Returns (champion or not, how it was decided).
        """
        from mlflow.exceptions import MlflowException

        test_set = test_set_fingerprint(test_images, test_labels)
        tags = {
            "test_accuracy": repr(test_accuracy),
            "test_set": test_set,
            "test_images": str(len(test_labels)),
            **self._dataset,
        }
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, key, value)
        if not math.isfinite(test_accuracy):
            return False, "not compared: its test accuracy is not finite"
        try:
            current = self.client.get_model_version_by_alias(name, CHAMPION_ALIAS)
        except MlflowException as exc:
            if not _alias_not_found(exc):
                raise  # a timeout or a locked store is not "no champion": retried by the caller
            self.client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
            return True, ""
        if str(current.version) == str(version):  # an earlier try moved the alias, then failed
            return True, current.tags.get("champion_comparison", "")
        if current.tags.get("test_set") == test_set:
            current_accuracy = float(current.tags.get("test_accuracy", "nan"))
            measured = f"{current_accuracy:.4f}"
        else:
            try:
                model = load_model_for_eval(f"models:/{name}/{current.version}", self.tracking_uri)
                predicted = model.predict(np.asarray(test_images, dtype=np.float32))
                current_accuracy = float(np.mean(np.asarray(predicted) == test_labels))
            except Exception as exc:  # noqa: BLE001 -- kept as champion, and the reason shown
                note = (
                    f"champion stays version {current.version}: it could not be scored on this "
                    f"test set ({_one_line(exc)})"
                )
                self.client.set_model_version_tag(name, version, "champion_comparison", note)
                return False, note
            measured = f"{current_accuracy:.4f} on this test set"
        if math.isnan(current_accuracy) or test_accuracy > current_accuracy:
            champion, note = True, f"beats version {current.version}, {measured}"
        else:
            champion, note = False, f"champion stays version {current.version}, {measured}"
        # The note first, the alias last: a retry after any failure here compares again.
        self.client.set_model_version_tag(name, version, "champion_comparison", note)
        if champion:
            self.client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
        return champion, note

    # -- summary ------------------------------------------------------------------------------
    def log_metrics_summary(self, wall_seconds: float) -> None:
        """The execution's wall-clock time, on the parent."""
        # A retry after a lost reply sends the same point again: the store keeps one copy.
        now = _once(self._steps("wall seconds"), "time", _now_ms)
        self._log(self._parent(), metrics=_metrics({"wall_seconds": wall_seconds}, now))

    # -- internals ----------------------------------------------------------------------------
    def _parent(self) -> str:
        if self.parent_run_id is None:
            raise PipelineError("PipelineRecorder.start() must be called before logging")
        return self.parent_run_id

    def _process_tags(self) -> dict[str, str]:
        return {"host": socket.gethostname(), "pid": str(os.getpid())}

    def _steps(self, *call: Any) -> dict[str, Any]:
        """The steps an earlier attempt of ``call`` (its name and identity) has done."""
        return self._done.setdefault(call, {})

    def _child_once(self, steps: dict[str, Any], run_name: str, tags: Mapping[str, str]) -> str:
        """The child run of one recorded call, created once even when a reply was lost.

        The run carries a key made here; a retry looks the key up before creating another run,
        since a server may have created the first one and then lost the reply.
        """
        if "run" in steps:
            return steps["run"]
        retried = _tried_before(steps, "run")
        key = steps.setdefault(RECORD_KEY_TAG, uuid.uuid4().hex)
        run_id = self._find_child(key) if retried else None
        if run_id is None:
            run_id = self._child(run_name, {**tags, RECORD_KEY_TAG: key})
        elif run_id not in self._open_children:
            self._open_children.append(run_id)
        steps["run"] = run_id
        return run_id

    def _find_child(self, key: str) -> str | None:
        from mlflow.entities import ViewType

        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.{RECORD_KEY_TAG} = '{key}'",
            run_view_type=ViewType.ALL,
            max_results=1,
        )
        return found[0].info.run_id if found else None

    def _child(self, run_name: str, tags: Mapping[str, str]) -> str:
        parent = self._parent()
        run = self.client.create_run(
            self.experiment_id,
            run_name=run_name,
            tags={
                "mlflow.parentRunId": parent,
                **self._process_tags(),
                **self._shared_tags,
                **tags,
            },
        )
        self._open_children.append(run.info.run_id)
        return run.info.run_id

    def _log(self, run_id: str, *, metrics=(), params=(), tags: Mapping[str, str] | None = None):
        from mlflow.entities import RunTag

        run_tags = [RunTag(key, value) for key, value in (tags or {}).items()]
        self.client.log_batch(run_id, metrics=list(metrics), params=list(params), tags=run_tags)


# What the logged model imports (pipeline/mlflow_model.py): the engine, and of the pipeline
# only the normalizer and the errors it raises.
_MODEL_PIPELINE_MODULES = ("__init__.py", "errors.py", "normalize.py")


def _model_code(folder: Path) -> list[str]:
    """Copy the code the logged model runs into ``folder``; its packages, for ``code_paths``.

    MLflow puts them in the model's ``code/`` folder and on ``sys.path`` when it loads it.
    """
    import mlp

    engine = Path(mlp.__file__).parent
    packages = {"mlp": sorted(engine.glob("*.py"))}
    here = Path(__file__).parent
    packages["pipeline"] = [here / name for name in _MODEL_PIPELINE_MODULES]
    for package, files in packages.items():
        (folder / package).mkdir(parents=True)
        for file in files:
            shutil.copy2(file, folder / package / file.name)
    return [str(folder / package) for package in packages]


def _alias_not_found(exc: Any) -> bool:
    """Whether an alias lookup failed because the alias (or its model) does not exist.

    MLflow says so with these codes, locally and from a server; anything else (a timeout, a
    server error, a locked database) says nothing about the champion.
    """
    code = getattr(exc, "error_code", "")
    return code == "RESOURCE_DOES_NOT_EXIST" or (
        code == "INVALID_PARAMETER_VALUE" and "not found" in str(exc)
    )


def _warm_up_logging(final_model: bool) -> None:
    """What :meth:`PipelineRecorder.warm_up` runs in its thread."""
    try:
        plots.warm_up()
        if final_model:
            import mlflow.pyfunc  # noqa: F401 -- 0.2 s
            from mlflow.utils import requirements_utils

            # Private, so guarded: if it goes, the map is built on first use, as before.
            requirements_utils._init_modules_to_packages_map()
    except Exception:  # noqa: BLE001, S110 -- only a head start: first use does it, or reports
        pass


def _redact(value: Any) -> Any:
    """Strings that are URIs lose their credentials; lists and dicts are walked."""
    if isinstance(value, str):
        return redact_uri(value) if "://" in value else value
    if isinstance(value, list | tuple):
        return [_redact(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _redact(item) for key, item in value.items()}
    return value


def _config_json(config: Any) -> str:
    data = config.model_dump(mode="json") if hasattr(config, "model_dump") else config.flat()
    return json.dumps(_redact(data), indent=2) + "\n"


def test_set_fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """One digest of a test set's pixels and labels: the same digest, comparable accuracies."""
    return hashlib.sha256(f"{array_sha256(images)}\n{array_sha256(labels)}".encode()).hexdigest()


# ------------------------------------------------------------------------------------ loading
def load_model_for_eval(uri: str, tracking_uri: str | None = None) -> Any:
    """Load a logged model (``runs:/<id>/model``, ``models:/name@champion``, ``models:/name/1``).

    ``runs:/<id>/model`` also takes the id of a pipeline's parent run, the id the commands
    print: its model lives in the final child run (the parent's ``model_uri`` tag says where).

    Returns
    -------
    CheckedModel
        ``predict(images)`` with raw pixels, shape (n, 784) float32, returns int64 labels;
        ``trained_on`` names the dataset of its training when the record says so.

    Raises
    ------
    PipelineError
        One line when the run, model, version or alias does not exist.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    resolved = resolve_tracking_uri(tracking_uri)
    check_tracking_uri(resolved)
    try:
        with _fluent_tracking_uri(resolved):
            client = _client(resolved)
            source = _pipeline_model_uri(client, uri) or uri
            model = mlflow.pyfunc.load_model(source)
    except (MlflowException, OSError) as exc:
        raise PipelineError(f"cannot load model {uri!r}: {_one_line(exc)}") from None
    except ImportError as exc:  # s3://, gs://... without their client library
        raise PipelineError(
            f"cannot load model {uri!r}: {_one_line(exc)} (install the library for that storage)"
        ) from None
    return CheckedModel(model, trained_on=_trained_on(client, model))


def _pipeline_model_uri(client: Any, uri: str) -> str | None:
    """The model of a pipeline run named by ``runs:/<parent id>/model``; None for other URIs."""
    prefix, _, rest = uri.partition(":/")
    run_id, _, path = rest.strip("/").partition("/")
    if prefix != "runs" or path.strip("/") != MODEL_NAME:
        return None
    try:
        tags = client.get_run(run_id).data.tags
    except Exception:  # noqa: BLE001 -- not a run: MLflow's own load reports it
        return None
    if tags.get("stage") != "pipeline":
        return None
    return tags.get("model_uri")


def _trained_on(client: Any, model: Any) -> str | None:
    """The dataset a loaded model was trained on, from its pipeline run's params (best effort)."""
    try:
        run = client.get_run(model.metadata.run_id)
        parent = run.data.tags.get("mlflow.parentRunId")
        params = client.get_run(parent).data.params if parent else run.data.params
        return params.get("dataset.name")
    except Exception:  # noqa: BLE001 -- a model logged elsewhere: the caller's default
        return None


class CheckedModel:
    """A loaded pyfunc model whose input errors are one-line :class:`DataError` s.

    MLflow enforces the logged signature (float32, shape (-1, 784)) before the model's own
    checks run, and reports a mismatch as a multi-line ``MlflowException`` quoting the data.
    """

    def __init__(self, model: Any, trained_on: str | None = None) -> None:
        self._model = model
        self.trained_on = trained_on

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return self._model.predict(data, params=params)
        except MlflowException as exc:
            if "enforce schema" not in str(exc):
                raise
            array = np.asarray(data)
            raise DataError(
                f"model input rejected: expected {self._expected()}, "
                f"got dtype {array.dtype} and shape {array.shape}"
            ) from None

    def _expected(self) -> str:
        schema = self._model.metadata.get_input_schema()
        specs = schema.inputs if schema is not None else []
        if len(specs) == 1 and hasattr(specs[0], "shape"):
            return f"dtype {specs[0].type} and shape {specs[0].shape}"
        return f"the signature {schema}"
