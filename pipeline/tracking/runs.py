"""Pipeline executions side by side: the parent runs of an MLflow experiment as one table.

Every execution the recorder writes has one parent run tagged ``stage=pipeline`` holding the
flattened config as params (strings) and the summary metrics (``best_l2_lambda``,
``cv_best_mean_val_accuracy``, ``test_accuracy``): one row per parent run, newest first, is
enough to compare executions without opening the MLflow UI. Read-only: listing never creates a
store, an experiment or a folder.
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Iterable
from typing import Any

import pandas as pd

from pipeline.errors import TrackingError
from pipeline.tracking.store import (
    check_tracking_uri,
    default_tracking_uri,
    redact_uri,
    sqlite_database,
)

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


def _check_store(uri: str) -> None:
    """A missing SQLite file is an error here: MLflow would silently create an empty store."""
    database = sqlite_database(uri)
    if database is not None and not database.is_file():
        raise TrackingError(
            f"no MLflow store at {database} (run `mlp-pipeline run` first, or pass "
            f"--tracking-uri / set MLFLOW_TRACKING_URI)"
        )
    if database is None:
        # http(s): one quick /health request before MLflow's retries; an in-memory SQLite
        # store is refused there (it holds no runs).
        check_tracking_uri(uri)


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
    _check_store(uri)
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
    }
    row = {}
    for name, source in COLUMNS:
        kind, _, key = source.partition(".")
        if kind == "info":
            row[name] = values[source]
        elif kind == "params":
            row[name] = data.params.get(key)
        elif kind == "metrics":
            row[name] = data.metrics.get(key, math.nan)
        else:
            row[name] = data.tags.get(key)
    for name in ("hidden_sizes", "l2_lambdas"):
        row[name] = _json_list(row[name])
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


# ------------------------------------------------------------------------------------ output
def to_json(frame: pd.DataFrame) -> str:
    """Records (one object per run), ISO-8601 UTC times, null for missing values."""
    return frame.to_json(orient="records", date_format="iso", indent=2) + "\n"


def to_csv(frame: pd.DataFrame) -> str:
    """One line per run; lists as ``64;32`` so the field needs no quoting."""
    flat = frame.copy()
    for column in ("hidden_sizes", "l2_lambdas"):
        flat[column] = flat[column].map(_joined)
    # %.10g: 0.9222, not the 0.9221999999999999 a mean of folds can be in binary.
    return flat.to_csv(index=False, date_format="%Y-%m-%dT%H:%M:%SZ", float_format="%.10g")


def _joined(values: Iterable[Any] | None, separator: str = ";", short: bool = False) -> str:
    if values is None:
        return ""
    return separator.join(_short(value) if short else f"{value:g}" for value in values)


def _short(value: float) -> str:
    """Compact lambdas and learning rates: 1e-4 rather than 0.0001."""
    if value and abs(value) < 0.01:
        mantissa, _, exponent = f"{value:.2e}".partition("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:.3g}"


def table_rows(frame: pd.DataFrame) -> list[dict[str, str]]:
    """The runs as short display strings, for a terminal table (local time, 4-digit accuracy)."""
    rows = []
    for record in frame.to_dict(orient="records"):
        epochs = _integer(record["epochs"])
        final = _integer(record["final_epochs"])
        rows.append(
            {
                "started": _local_time(record["start_time"]),
                "dataset": _text(record["dataset"]),
                "hidden": _joined(record["hidden_sizes"], ",") or "-",
                "optimizer": _text(record["optimizer"]),
                "lr": "-" if _missing(record["lr"]) else _short(record["lr"]),
                "epochs": epochs if final in ("-", epochs) else f"{epochs}/{final}",
                "folds": _integer(record["folds"]),
                "λ tried": _joined(record["l2_lambdas"], ",", short=True) or "-",
                "best λ": "-" if _missing(record["best_lambda"]) else _short(record["best_lambda"]),
                "CV acc": _number(record["cv_accuracy"], "{:.4f}"),
                "test acc": _number(record["test_accuracy"], "{:.4f}"),
                "flow run": _text(record["prefect_flow_run"]),
                "took": _duration(record["duration_seconds"]),
                "status": _text(record["status"]),
            }
        )
    return rows


# Which table columns stay when the terminal is too narrow for all: first what identifies an
# execution and its results, then the settings that tell executions apart.
_COLUMN_PRIORITY = (
    "started",
    "best λ",
    "CV acc",
    "test acc",
    "status",
    "took",
    "dataset",
    "epochs",
    "hidden",
    "flow run",
    "optimizer",
    "lr",
    "λ tried",
    "folds",
)


def columns_that_fit(rows: list[dict[str, str]], width: int, gap: int = 2) -> list[str]:
    """The table columns to show on a ``width``-character line, in table order.

    Columns are dropped from the end of ``_COLUMN_PRIORITY`` until every kept one fits whole
    (its longest value or header, plus ``gap``): a squeezed table cuts every cell to ``m…``.
    """
    names = list(rows[0]) if rows else []
    needed = {name: max(len(name), *(len(row[name]) for row in rows)) + gap for name in names}
    order = [name for name in _COLUMN_PRIORITY if name in needed]
    order += [name for name in names if name not in order]
    kept = set(order)
    for name in reversed(order):
        if sum(needed[n] for n in kept) <= width or len(kept) == 1:
            break
        kept.discard(name)
    return [name for name in names if name in kept]


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _text(value: Any) -> str:
    # A missing string is NaN in pandas' string columns (a run with no Prefect flow run, from
    # `mlp-pipeline train`), and NaN is truthy: `value or "-"` let it through to the table.
    return "-" if _missing(value) or value == "" else str(value)


def _number(value: Any, template: str = "{:g}") -> str:
    return "-" if _missing(value) else template.format(value)


def _integer(value: Any) -> str:
    return "-" if _missing(value) else str(int(value))


def _duration(seconds: Any) -> str:
    if _missing(seconds):
        return "-"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{seconds:.1f}s"


def _local_time(timestamp: Any) -> str:
    if timestamp is None or pd.isna(timestamp):
        return "-"
    local_zone = datetime.datetime.now().astimezone().tzinfo
    return timestamp.tz_convert(local_zone).strftime("%Y-%m-%d %H:%M")


NUMERIC_COLUMNS = {"lr", "epochs", "folds", "best λ", "CV acc", "test acc", "took"}
