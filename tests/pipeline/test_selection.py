"""cv_table aggregates fold results as computed by hand; select_candidate's rule over lambda
and its edge cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import PipelineError
from pipeline.results import FoldResult
from pipeline.selection import cv_table, mean_curves, select_candidate

# lambda -> per-fold (val_accuracy, val_loss), fold order 0..3
GRID = {
    1e-4: [(0.91, 0.31), (0.93, 0.27), (0.90, 0.35), (0.92, 0.29)],
    1e-3: [(0.95, 0.18), (0.94, 0.20), (0.96, 0.16), (0.95, 0.17)],
    1e-2: [(0.89, 0.40), (0.88, 0.42), (0.90, 0.39), (0.87, 0.45)],
}


def _result(
    lam: float, fold: int, acc: float, loss: float, *, diverged: bool = False
) -> FoldResult:
    nan = math.nan
    if diverged:
        return FoldResult(lam, fold, 0, nan, nan, nan, nan, 1, 0.1, diverged=True, message="boom")
    return FoldResult(lam, fold, 0, acc, loss, acc + 0.01, loss - 0.01, 5, 0.1)


def _results(
    grid: dict[float, list[tuple[float, float]]], diverged=frozenset()
) -> list[FoldResult]:
    return [
        _result(lam, fold, acc, loss, diverged=(lam, fold) in diverged)
        for lam, pairs in grid.items()
        for fold, (acc, loss) in enumerate(pairs)
    ]


def _table(grid, diverged=frozenset()) -> pd.DataFrame:
    return cv_table(_results(grid, diverged))


def select_lambda(table: pd.DataFrame) -> float:
    """The chosen candidate's lambda (these tables search lambda alone)."""
    chosen = select_candidate(table)
    assert list(chosen) == ["training.l2_lambda"], f"a lambda-only search chose {chosen}"
    return chosen["training.l2_lambda"]


# ----------------------------------------------------------------------------- cv_table


def test_cv_table_means_and_stds_equal_hand_computation():
    # Arrange
    results = _results(GRID)[::-1]  # arrival order must not matter

    # Act
    table = cv_table(results).set_index("l2_lambda")

    # Assert
    assert list(table.index) == sorted(GRID), f"rows not one per lambda ascending: {table.index}"
    for lam, pairs in GRID.items():
        acc = np.array([a for a, _ in pairs])
        loss = np.array([lo for _, lo in pairs])
        row = table.loc[lam]
        for column, expected in [
            ("mean_val_accuracy", acc.mean()),
            ("std_val_accuracy", acc.std(ddof=1)),
            ("mean_val_loss", loss.mean()),
            ("std_val_loss", loss.std(ddof=1)),
        ]:
            assert row[column] == pytest.approx(expected, rel=1e-12, abs=1e-15), (
                f"lambda {lam} {column}: table {row[column]!r}, numpy {expected!r}"
            )
        assert row["n_folds"] == 4, f"lambda {lam}: n_folds {row['n_folds']}"
        assert row["diverged_folds"] == 0, f"lambda {lam}: diverged_folds {row['diverged_folds']}"


def test_cv_table_has_per_fold_columns():
    # Act
    table = _table(GRID).set_index("l2_lambda")

    # Assert
    for fold in range(4):
        for metric, position in (("val_accuracy", 0), ("val_loss", 1)):
            column = f"{metric}_fold{fold}"
            assert column in table.columns, f"missing column {column}: {list(table.columns)}"
            for lam, pairs in GRID.items():
                assert table.loc[lam, column] == pairs[fold][position], (
                    f"{column} at lambda {lam}: {table.loc[lam, column]} vs {pairs[fold][position]}"
                )


def test_cv_table_columns_of_the_contract():
    # Act
    table = _table(GRID)

    # Assert
    expected = [
        "candidate", "l2_lambda", "budget", "mean_val_accuracy", "std_val_accuracy",
        "mean_val_loss", "std_val_loss", "n_folds", "diverged_folds",
    ]  # fmt: skip
    assert list(table.columns[: len(expected)]) == expected, f"columns {list(table.columns)}"


def test_cv_table_counts_and_excludes_diverged_folds():
    # Arrange: fold 2 of lambda 1e-4 diverged.
    diverged = {(1e-4, 2)}

    # Act
    table = _table(GRID, diverged).set_index("l2_lambda")

    # Assert
    kept = [pair for fold, pair in enumerate(GRID[1e-4]) if fold != 2]
    acc = np.array([a for a, _ in kept])
    loss = np.array([lo for _, lo in kept])
    row = table.loc[1e-4]
    assert row["diverged_folds"] == 1, f"diverged_folds {row['diverged_folds']}, expected 1"
    assert row["mean_val_accuracy"] == pytest.approx(acc.mean()), (
        f"mean over finite folds {acc.mean()}, table {row['mean_val_accuracy']}"
    )
    assert row["std_val_accuracy"] == pytest.approx(acc.std(ddof=1)), "std should skip diverged"
    assert row["mean_val_loss"] == pytest.approx(loss.mean()), "loss mean should skip diverged"
    assert math.isnan(row["val_accuracy_fold2"]), "a diverged fold's column should be NaN"
    assert table.loc[1e-3, "diverged_folds"] == 0, "other lambdas are unaffected"


def test_non_finite_accuracy_without_flag_counts_as_diverged():
    # Arrange: a result whose metrics are NaN but whose flag was not set (FoldResult.ok is False).
    results = _results(GRID)
    results[0] = FoldResult(1e-4, 0, 0, math.nan, math.nan, 0.5, 0.5, 5, 0.1)

    # Act
    table = cv_table(results).set_index("l2_lambda")

    # Assert
    assert table.loc[1e-4, "diverged_folds"] == 1, "a NaN accuracy should count as diverged"


def test_cv_table_of_nothing_is_an_error():
    # Act / Assert
    with pytest.raises(PipelineError, match="no cross-validation results"):
        cv_table([])


# ----------------------------------------------------------------------------- select_lambda


def test_select_lambda_picks_the_highest_mean():
    # Arrange
    table = _table(GRID)
    means = {lam: np.mean([a for a, _ in pairs]) for lam, pairs in GRID.items()}
    expected = max(means, key=means.get)

    # Act
    chosen = select_lambda(table)

    # Assert
    assert chosen == expected == 1e-3, f"chose {chosen}, highest mean is at {expected} ({means})"
    assert isinstance(chosen, float), f"select_lambda returned {type(chosen).__name__}"


@pytest.mark.parametrize("order", ["same", "permuted"])
def test_select_lambda_ties_go_to_the_larger_lambda(order):
    # Arrange: three lambdas with the same fold accuracies (possibly in another fold order, which
    # must still be a tie even though float sums depend on order).
    accs = [0.8564, 0.9512, 0.9237, 0.8501]  # naive sums differ by one ulp when reversed
    other = accs if order == "same" else accs[::-1]
    grid = {
        1e-5: [(a, 0.3) for a in accs],
        1e-4: [(a, 0.3) for a in other],
        1e-3: [(a, 0.3) for a in accs[1:] + accs[:1]],
        1e-2: [(a - 0.05, 0.3) for a in accs],
    }

    # Act
    chosen = select_lambda(_table(grid))

    # Assert
    assert chosen == 1e-3, f"tie among 1e-5, 1e-4, 1e-3 should go to 1e-3, chose {chosen}"


def test_select_lambda_skips_lambdas_with_a_diverged_fold():
    # Arrange: the best lambda (1e-3) diverged once; its remaining folds are still the best.
    table = _table(GRID, diverged={(1e-3, 0)})

    # Act
    chosen = select_lambda(table)

    # Assert
    assert chosen == 1e-4, f"1e-3 had a diverged fold and is not eligible; chose {chosen}"


def test_select_lambda_all_diverged_suggests_smaller_lr():
    # Arrange: every lambda has one diverged fold.
    table = _table(GRID, diverged={(lam, 1) for lam in GRID})

    # Act
    with pytest.raises(PipelineError) as info:
        select_lambda(table)

    # Assert
    assert "smaller" in str(info.value) and "lr" in str(info.value), (
        f"message should suggest a smaller learning rate: {info.value}"
    )


def test_select_lambda_with_lambda_zero():
    # Arrange
    grid = {0.0: [(0.99, 0.1), (0.99, 0.1)], 1e-4: [(0.5, 0.1), (0.5, 0.1)]}

    # Act
    chosen = select_lambda(_table(grid))

    # Assert
    assert chosen == 0.0, f"lambda 0 had the best mean but {chosen} was chosen"


def test_fold_values_in_any_order_give_the_same_mean_so_a_tie_stays_a_tie():
    # Arrange: two lambdas whose fold accuracies are permutations of each other, in orders
    # whose naive left-to-right float sums differ in the last bit.
    rng = np.random.default_rng(0)
    accuracies = [0.9791, 0.9813, 0.9807, 0.9799, 0.9802]
    orders = [rng.permutation(accuracies) for _ in range(300)]
    naive = {sum(order) for order in orders}
    assert len(naive) > 1, "the orders must disagree under a naive sum, or the test shows nothing"

    # Act
    chosen = []
    for order in orders:
        shuffled = rng.permutation(accuracies)
        grid = {1e-4: [(a, 0.1) for a in order], 1e-3: [(a, 0.1) for a in shuffled]}
        chosen.append(select_lambda(_table(grid)))

    # Assert: every tie goes to the larger lambda, whatever the orders.
    assert set(chosen) == {1e-3}, f"{chosen.count(1e-4)} of 300 ties went to the smaller lambda"


def test_a_lambda_with_a_missing_fold_is_not_eligible():
    # Arrange: 1e-2 has the best mean but only 3 of the 4 folds.
    grid = {**GRID, 1e-2: [(0.99, 0.1), (0.99, 0.1), (0.99, 0.1)]}
    table = _table(grid)

    # Act
    chosen = select_lambda(table)

    # Assert
    assert table.set_index("l2_lambda").loc[1e-2, "n_folds"] == 3
    assert chosen == 1e-3


def _with_history(result: FoldResult, accuracy: list[float], diverged: bool = False) -> FoldResult:
    return FoldResult(
        result.l2_lambda, result.fold, result.seed, result.val_accuracy, result.val_loss,
        result.train_accuracy, result.train_loss, len(accuracy), result.seconds,
        {"val_accuracy": accuracy, "val_loss": [1 - a for a in accuracy]}, diverged=diverged,
    )  # fmt: skip


def test_mean_curves_average_the_folds_epoch_by_epoch():
    base = FoldResult(1e-3, 0, 0, 0.9, 0.3, 0.95, 0.2, 3, 1.0, {})
    folds = [
        _with_history(base, [0.5, 0.7, 0.8]),
        _with_history(base, [0.6, 0.9, 0.9, 0.95]),  # longer: cut to the shortest
        _with_history(base, [0.1, float("nan")], diverged=True),  # left out
    ]
    curves = mean_curves(folds)
    np.testing.assert_allclose(curves["val_accuracy"], [0.55, 0.8, 0.85])
    np.testing.assert_allclose(curves["val_loss"], [0.45, 0.2, 0.15])
    assert mean_curves(folds[2:]) == {"val_accuracy": [], "val_loss": []}
