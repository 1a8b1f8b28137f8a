"""Pipeline executions as a terminal table, CSV or JSON (from :mod:`pipeline.tracking.runs`).

Plain pandas: the table keeps the columns that identify an execution and its results when the
terminal is too narrow for all, and shows short values (``1e-4``, ``0.9812``, ``1m05s``).
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Iterable
from typing import Any

import pandas as pd


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
