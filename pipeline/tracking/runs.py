"""Pipeline executions side by side: the parent runs of an MLflow experiment as one table.

Every execution the recorder writes has one parent run tagged ``stage=pipeline`` holding the
flattened config as params (strings) and the summary metrics (``best_l2_lambda``,
``cv_best_mean_val_accuracy``, ``test_accuracy``): one row per parent run, newest first, is
enough to compare executions without opening the MLflow UI. Read-only: listing never creates a
store, an experiment or a folder.
"""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any

import pandas as pd

from pipeline.errors import TrackingError
from pipeline.tracking.store import default_tracking_uri, redact_uri, require_store

DEFAULT_EXPERIMENT = "mlp-pipeline"  # TrackingConfig.experiment's default
PIPELINE_FILTER = "tags.stage = 'pipeline'"
_PAGE = 1000  # MLflow's largest page for search_runs

# Output columns, in order: (column, where it comes from). ``params.*`` are the config as logged
# (strings, JSON for lists), ``metrics.*`` the parent's summary metrics, ``tags.*`` its tags.
COLUMNS = (
    ("start_time", "info.start_time"),
    ("run_id", "info.run_id"),
    ("run_name", "info.run_name"),
    ("status", "info.status"),
    ("flow", "tags.flow"),
    ("dataset", "params.dataset.name"),
    ("hidden_sizes", "params.model.hidden_sizes"),
    ("optimizer", "params.training.optimizer"),
    ("lr", "params.training.lr"),
    ("epochs", "params.training.epochs"),
    ("final_epochs", "params.training.final_epochs"),
    ("folds", "params.cv.folds"),
    ("l2_lambdas", "params.cv.l2_lambdas"),
    ("best_lambda", "metrics.best_l2_lambda"),
    ("cv_accuracy", "metrics.cv_best_mean_val_accuracy"),
    ("test_accuracy", "metrics.test_accuracy"),
    ("duration_seconds", "info.duration"),
    ("prefect_flow_run", "tags.prefect.flow_run_name"),
)


def list_pipeline_runs(
    experiment: str = DEFAULT_EXPERIMENT,
    tracking_uri: str | None = None,
    last: int | None = None,
) -> pd.DataFrame:
    """The pipeline executions (parent runs) of ``experiment``, newest first.

    Parameters
    ----------
    experiment : str
        MLflow experiment name.
    tracking_uri : str, optional
        Store to read; default ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<./mlruns>/mlflow.db``.
    last : int, optional
        Only the ``last`` most recent executions (default: all).

    Returns
    -------
    pandas.DataFrame, shape (n_runs, len(COLUMNS))
        One row per parent run, columns as in :data:`COLUMNS`: ``start_time`` (UTC timestamp),
        ``hidden_sizes`` / ``l2_lambdas`` as lists, numbers as numbers, NaN where a run has no such
        value (a ``cv`` flow has no test accuracy; a failed run may have nothing).

    Raises
    ------
    TrackingError
        The store does not exist or does not answer, or it has no such experiment.
    """
    if last is not None and last < 1:
        raise TrackingError(f"--last must be at least 1, got {last}")
    uri = default_tracking_uri(tracking_uri)
    require_store(uri)
    runs = _search(uri, experiment, last)
    frame = pd.DataFrame([_row(run) for run in runs], columns=[name for name, _ in COLUMNS])
    frame["start_time"] = pd.to_datetime(frame["start_time"], unit="ms", utc=True)
    for column in ("lr", "best_lambda", "cv_accuracy", "test_accuracy", "duration_seconds"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    for column in ("epochs", "final_epochs", "folds"):
        numbers = pd.to_numeric(frame[column], errors="coerce")
        whole = numbers.notna() & (numbers % 1 == 0) & (numbers.abs() < 2**53)
        frame[column] = numbers.where(whole).astype("Int64")
    return frame


def _search(uri: str, experiment: str, last: int | None) -> list[Any]:
    """Parent runs through ``MlflowClient.search_runs``, page by page, newest first."""
    from mlflow.tracking import MlflowClient

    where = redact_uri(uri)
    try:
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        if found is None or found.lifecycle_stage == "deleted":
            names = sorted(e.name for e in client.search_experiments())
            known = f"; experiments there: {', '.join(names)}" if names else ""
            raise TrackingError(f"no MLflow experiment {experiment!r} in {where}{known}")
        runs: list[Any] = []
        token = None
        while last is None or len(runs) < last:
            page = client.search_runs(
                [found.experiment_id],
                filter_string=PIPELINE_FILTER,
                max_results=min(_PAGE, last - len(runs)) if last else _PAGE,
                order_by=["attributes.start_time DESC"],
                page_token=token,
            )
            runs.extend(page)
            token = page.token
            if not token:
                break
    except TrackingError:
        raise
    except Exception as exc:  # MlflowException, SQLAlchemy errors of a file that is no store
        text = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise TrackingError(f"cannot read MLflow store {where}: {text}") from None
    return runs


def _row(run: Any) -> dict[str, Any]:
    info, data = run.info, run.data
    values = {
        "info.start_time": info.start_time,
        "info.run_id": info.run_id,
        "info.run_name": info.run_name,
        "info.status": info.status,
        "info.duration": (
            (info.end_time - info.start_time) / 1000.0
            if info.end_time and info.start_time
            else math.nan
        ),
        **{f"params.{key}": value for key, value in data.params.items()},
        **{f"metrics.{key}": value for key, value in data.metrics.items()},
        **{f"tags.{key}": value for key, value in data.tags.items()},
    }
    row = {name: values.get(source, math.nan if source.startswith("metrics.") else None)
           for name, source in COLUMNS}  # fmt: skip
    for name in ("hidden_sizes", "l2_lambdas"):
        row[name] = _json_list(row[name])
    with contextlib.suppress(json.JSONDecodeError, TypeError, AttributeError):
        # A search space naming the L2 strength replaces cv.l2_lambdas (a list; not a draw).
        searched = json.loads(data.params.get("search.space", "{}")).get("training.l2_lambda")
        row["l2_lambdas"] = _json_list(json.dumps(searched)) if searched else row["l2_lambdas"]
    if row["flow"] == "train":
        # No sweep: the one lambda it trained with, and none of the config's CV settings.
        l2 = _json_list(data.params.get("l2_lambda"))
        row["l2_lambdas"] = l2
        row["best_lambda"] = l2[0] if l2 else math.nan
        row["epochs"] = row["folds"] = None
    return row


def _json_list(text: str | None) -> list[float] | None:
    """A param holding a number or a list of numbers, as a list; None for anything else."""
    try:
        value = json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        return None
    values = value if isinstance(value, list) else [value]
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    return values if values and numbers and all(math.isfinite(v) for v in values) else None
