"""Aggregate cross-validation results into a table and choose a candidate.

"More regularized" orders candidates for ties and for the one-standard-error rule: the larger
L2 strength first, then the network with fewer parameters, then the first in the table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError
from pipeline.results import FoldResult
from pipeline.search import EPOCHS_KEY, L2_KEY, candidate_id

SELECTION_RULES = ("best", "one-se")


def cv_table(
    results: Iterable[FoldResult], parameters: Mapping[str, int] | None = None
) -> pd.DataFrame:
    """One row per candidate: its values, mean and std of validation accuracy and loss, folds.

    Columns: ``candidate`` (its id), ``l2_lambda``, one column per other searched setting (the
    dotted key: ``training.lr``), ``parameters`` (the network's size, when ``parameters`` maps
    candidate ids to it), ``budget`` (the epochs its trainings were given: its last rung in
    successive halving), the means and stds, ``n_folds``, ``diverged_folds``, then per-fold
    values. Rows by lambda, then by the other values (their JSON text), whatever order the
    results came in.

    Diverged trainings count in ``diverged_folds`` and are left out of the means. A mean is the
    correctly rounded sum (``math.fsum``) over the count: the same fold values in any order give
    the same mean, to the last bit, so a tie between candidates is a tie whatever order the folds
    finished in.
    """
    results = list(results)
    if not results:
        raise PipelineError("no cross-validation results to aggregate")
    values: dict[str, dict[str, Any]] = {}
    for result in results:
        values.setdefault(candidate_id(result.candidate), result.candidate)
    frame = pd.DataFrame(
        [
            {
                "candidate": candidate_id(r.candidate),
                "fold": r.fold,
                "budget": r.budget,
                "val_accuracy": r.val_accuracy if r.ok else np.nan,
                "val_loss": r.val_loss if r.ok else np.nan,
                "diverged": not r.ok,
            }
            for r in results
        ]
    )
    order = sorted(values, key=lambda key: (values[key][L2_KEY], json.dumps(values[key])))
    frame["candidate"] = pd.Categorical(frame["candidate"], categories=order, ordered=True)
    grouped = frame.groupby("candidate", sort=True, observed=True)
    settings = sorted({key for candidate in values.values() for key in candidate} - {L2_KEY})
    index = pd.Index(list(grouped.groups), name="candidate")
    columns: dict[str, Any] = {
        "l2_lambda": [values[key][L2_KEY] for key in index],
        # Object columns: a searched int stays an int (not 64.0), a list stays a list.
        **{name: pd.Series([values[key].get(name) for key in index], index=index, dtype=object)
           for name in settings},
    }  # fmt: skip
    table = pd.DataFrame(columns, index=index)
    if parameters is not None:
        table["parameters"] = [parameters[key] for key in table.index]
    table["budget"] = grouped["budget"].max()
    table["mean_val_accuracy"] = grouped["val_accuracy"].agg(_exact_mean)
    table["std_val_accuracy"] = grouped["val_accuracy"].std(ddof=1)
    table["mean_val_loss"] = grouped["val_loss"].agg(_exact_mean)
    table["std_val_loss"] = grouped["val_loss"].std(ddof=1)
    table["n_folds"] = grouped["fold"].count()
    table["diverged_folds"] = grouped["diverged"].sum().astype(int)
    for metric in ("val_accuracy", "val_loss"):
        per_fold = frame.pivot(index="candidate", columns="fold", values=metric)
        per_fold.columns = [f"{metric}_fold{fold}" for fold in per_fold.columns]
        table = table.join(per_fold)
    return table.reset_index()


def _exact_mean(values: pd.Series) -> float:
    present = values.dropna()
    return math.fsum(present) / len(present) if len(present) else math.nan


def searched_columns(table: pd.DataFrame) -> list[str]:
    """The table's searched settings besides lambda: its dotted column names."""
    return [column for column in table.columns if "." in column]


def candidate_of(row: Mapping[str, Any], settings: Iterable[str]) -> dict[str, Any]:
    """The candidate a CV-table row describes: lambda first, then ``settings``."""
    return {L2_KEY: float(row["l2_lambda"]), **{key: _plain(row[key]) for key in settings}}


def _plain(value: Any) -> Any:
    """A table cell as the JSON value it came from (NumPy scalars as Python numbers)."""
    return value.item() if isinstance(value, np.generic) else value


def mean_curves(
    results: Iterable[FoldResult], keys: tuple[str, ...] = ("val_accuracy", "val_loss")
) -> dict[str, list[float]]:
    """Per-epoch means over one candidate's folds (diverged ones left out), for each of ``keys``.

    Up to the shortest history among them; empty lists when no fold is left.
    """
    histories = [result.history for result in results if not result.diverged]
    curves: dict[str, list[float]] = {}
    for key in keys:
        columns = [history.get(key, []) for history in histories]
        epochs = min(map(len, columns), default=0)
        stacked = np.array([column[:epochs] for column in columns], dtype=float)
        curves[key] = stacked.mean(axis=0).tolist() if epochs else []
    return curves


def ranked(table: pd.DataFrame) -> pd.DataFrame:
    """The rows, best first: by mean validation accuracy, ties to the more regularized.

    The eligible candidates come first: every fold present, none diverged and none pruned (in
    successive halving, the candidates that reached the last rung; see :func:`pruned`).
    """
    keys = pd.DataFrame(
        {
            "eligible": ~_eligible(table),
            "score": -table["mean_val_accuracy"].fillna(-np.inf),
            "order": _regularization_order(table),
        },
        index=table.index,
    )
    return table.loc[keys.sort_values(list(keys.columns), kind="stable").index]


def select_candidate(table: pd.DataFrame, rule: str = "best") -> dict[str, Any]:
    """The chosen candidate of a CV table (:func:`cv_table`).

    ``best``: the highest mean validation accuracy; ties go to the more regularized candidate
    (it generalizes at least as well). ``one-se``: the most regularized candidate whose mean is
    within one standard error (std / sqrt(folds)) of the best one's, the rule of Hastie,
    Tibshirani and Friedman (The Elements of Statistical Learning, section 7.10).

    A candidate with a diverged fold, with fewer folds than the others, or (successive halving)
    pruned before the last rung is not eligible.
    """
    if rule not in SELECTION_RULES:
        raise PipelineError(f"unknown selection rule {rule!r}; choose one of {SELECTION_RULES}")
    eligible = table[_eligible(table)]
    if eligible.empty:
        # Successive halving: every survivor diverged (the pruned candidates never got there).
        which = "of the last rung " if pruned(table).any() else ""
        raise PipelineError(
            f"every candidate {which}diverged in at least one fold: try a smaller training.lr"
        )
    best = ranked(eligible).iloc[0]
    chosen = best
    if rule == "one-se":
        std = best["std_val_accuracy"]
        margin = 0.0 if math.isnan(std) else std / math.sqrt(best["n_folds"])
        close = eligible[eligible["mean_val_accuracy"] >= best["mean_val_accuracy"] - margin]
        order = _regularization_order(close)
        chosen = close.loc[order.sort_values(kind="stable").index[0]]
    return candidate_of(chosen, searched_columns(table))


def pruned(table: pd.DataFrame) -> pd.Series:
    """Whether each row stopped below its full budget: successive halving pruned it.

    The full budget is the row's own ``training.epochs`` when the space searches it (grid or
    random: halving refuses it), else the table's largest (the last rung's). No budget: a
    result recorded before halving existed, trained every epoch.
    """
    if "budget" not in table:
        return pd.Series(False, index=table.index)
    full = table[EPOCHS_KEY].astype(float) if EPOCHS_KEY in table else table["budget"].max()
    return table["budget"].notna() & (table["budget"] < full)


def _eligible(table: pd.DataFrame) -> pd.Series:
    return (
        (table["n_folds"] == table["n_folds"].max())
        & (table["diverged_folds"] == 0)
        & table["mean_val_accuracy"].notna()
        & ~pruned(table)
    )


def _regularization_order(table: pd.DataFrame) -> pd.Series:
    """Each row's rank from the most regularized: larger lambda, then fewer parameters."""
    keys = pd.DataFrame({"l2": -table["l2_lambda"].astype(float)}, index=table.index)
    if "parameters" in table:
        keys["parameters"] = table["parameters"]
    keys["row"] = np.arange(len(table))
    ordered = keys.sort_values(list(keys.columns), kind="stable").index
    return pd.Series(np.arange(len(table)), index=ordered).reindex(table.index)
