"""Aggregate cross-validation results into a table and choose the L2 strength."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError
from pipeline.results import FoldResult


def cv_table(results: Iterable[FoldResult]) -> pd.DataFrame:
    """One row per lambda: mean and std of validation accuracy and loss, then per-fold values.

    Diverged trainings count in ``diverged_folds`` and are left out of the means. A mean is the
    correctly rounded sum (``math.fsum``) over the count: the same fold values in any order give
    the same mean, to the last bit, so a tie between lambdas is a tie whatever order the folds
    finished in.
    """
    frame = pd.DataFrame(
        [
            {
                "l2_lambda": r.l2_lambda,
                "fold": r.fold,
                "val_accuracy": r.val_accuracy if r.ok else np.nan,
                "val_loss": r.val_loss if r.ok else np.nan,
                "diverged": not r.ok,
            }
            for r in results
        ]
    )
    if frame.empty:
        raise PipelineError("no cross-validation results to aggregate")
    grouped = frame.groupby("l2_lambda", sort=True)
    table = pd.DataFrame(
        {
            "mean_val_accuracy": grouped["val_accuracy"].agg(_exact_mean),
            "std_val_accuracy": grouped["val_accuracy"].std(ddof=1),
            "mean_val_loss": grouped["val_loss"].agg(_exact_mean),
            "std_val_loss": grouped["val_loss"].std(ddof=1),
            "n_folds": grouped["fold"].count(),
            "diverged_folds": grouped["diverged"].sum().astype(int),
        }
    )
    for metric in ("val_accuracy", "val_loss"):
        per_fold = frame.pivot(index="l2_lambda", columns="fold", values=metric)
        per_fold.columns = [f"{metric}_fold{fold}" for fold in per_fold.columns]
        table = table.join(per_fold)
    return table.reset_index()


def _exact_mean(values: pd.Series) -> float:
    present = values.dropna()
    return math.fsum(present) / len(present) if len(present) else math.nan


def select_lambda(table: pd.DataFrame) -> float:
    """The lambda with the highest mean validation accuracy; ties go to the larger lambda.

    Larger lambda on a tie: the simpler (more regularized) model generalizes at least as well.
    A lambda with a diverged fold, or with fewer folds than the others, is not eligible.
    """
    complete = table["n_folds"] == table["n_folds"].max()
    eligible = table[complete & (table["diverged_folds"] == 0) & table["mean_val_accuracy"].notna()]
    if eligible.empty:
        raise PipelineError("every lambda diverged in at least one fold: try a smaller training.lr")
    best = eligible["mean_val_accuracy"].max()
    return float(eligible.loc[eligible["mean_val_accuracy"] == best, "l2_lambda"].max())
