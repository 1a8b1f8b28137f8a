"""The run summary the CLI prints: with the notebook's published figures for its protocol, the
worker restarts, and where MLflow recorded the run."""

from __future__ import annotations

import shlex

import pytest

from flows.cli import _print_summary
from pipeline.config import preset
from pipeline.tracking.publish import Published
from pipeline.tracking.registry import Registration

RUN_ID = "0123456789abcdef0123456789abcdef"


def _result(lambdas, best, *, restarts=0, registration=None, uri="sqlite:////s/mlflow.db"):
    return {
        "best_l2_lambda": best,
        "best": {"training.l2_lambda": best},
        "cv_table": [
            {"l2_lambda": lam, "mean_val_accuracy": 0.86, "std_val_accuracy": 0.004,
             "mean_val_loss": 0.47, "diverged_folds": 0}
            for lam in lambdas
        ],
        "trained_folds": 4 * len(lambdas), "cached_folds": 0, "wall_seconds": 1.0,
        "worker_restarts": restarts, "test_accuracy": 0.8912, "test_loss": 0.4,
        "published": Published(RUN_ID, uri, registration),
    }  # fmt: skip


def test_a_notebook_run_prints_the_published_figures_beside_its_own(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    config = preset("notebook")

    _print_summary(_result(config.cv.l2_lambdas, 1e-3), config)

    out = capsys.readouterr().out
    ours, published = out.split("the homework notebook, as published")
    assert ours.count("0.8600 ± 0.0040") == 4, ours
    row = next(line for line in published.splitlines() if "0.001 " in line)
    assert "0.8572" in row and "0.4767" in row and "← chosen" in row, row  # 85.7217 %
    row = next(line for line in published.splitlines() if " 0.1 " in line)
    assert "0.8137" in row and "1.0718" in row, row
    assert "notebook: λ=0.001 chosen, test accuracy 0.8839" in published, published
    tables = [line for line in out.splitlines() if line[:1] in "┏┃┡│└"]
    assert len(tables) == 16 and all(len(line) <= 80 for line in tables), out


def test_other_runs_print_no_notebook_columns(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    config = preset("default")

    _print_summary(_result(config.cv.l2_lambdas, 1e-3), config)

    out = capsys.readouterr().out
    assert "notebook" not in out, out
    assert "test accuracy 0.8912" in out, out
    assert "restarted" not in out, f"no worker died, yet:\n{out}"


def test_worker_restarts_are_reported(capsys):
    config = preset("default")

    _print_summary(_result(config.cv.l2_lambdas, 1e-3, restarts=2), config)

    out = capsys.readouterr().out
    assert "worker pool restarted 2 time(s)" in out, out
    assert "unfinished trainings were resubmitted" in out, out


@pytest.mark.parametrize(
    ("registration", "expected"),
    [
        (None, None),
        (Registration("mlp-mnist", "1", True), "model mlp-mnist version 1 (new champion)"),
        (Registration("mlp-mnist", "3", True, "beats version 2"),
         "model mlp-mnist version 3 (new champion: beats version 2)"),
        (Registration("mlp-mnist", "4", False, "champion stays version 3, 0.9170"),
         "model mlp-mnist version 4 (champion stays version 3, 0.9170)"),
        (Registration("mlp-[x]", "5", False), "model mlp-[x] version 5 (not the champion)"),
    ],
    ids=["not-registered", "first", "new-champion", "not-champion", "markup-in-name"],
)  # fmt: skip
def test_the_summary_says_where_mlflow_recorded_the_run(capsys, registration, expected):
    config = preset("default")

    _print_summary(_result(config.cv.l2_lambdas, 1e-3, registration=registration), config)

    lines = capsys.readouterr().out.splitlines()
    models = [line for line in lines if line.startswith("model ")]
    assert models == ([expected] if expected else []), lines
    assert f"MLflow run {RUN_ID}" in lines, lines
    (ui,) = [line for line in lines if line.startswith("open the MLflow UI: ")]
    words = shlex.split(ui.removeprefix("open the MLflow UI: "))
    assert words[:4] == ["mlflow", "ui", "--backend-store-uri", "sqlite:////s/mlflow.db"], ui


def test_the_summary_of_a_tracking_server_shows_no_credentials(capsys):
    config = preset("default")
    uri = "https://bob:secret@mlflow.example"

    _print_summary(_result(config.cv.l2_lambdas, 1e-3, uri=uri), config)

    out = capsys.readouterr().out
    assert "open the MLflow UI: https://mlflow.example" in out, out
    assert "secret" not in out and "bob" not in out, out


def test_a_large_search_shows_the_best_few_and_the_chosen_one(capsys, monkeypatch):
    # Arrange: 14 candidates (7 learning rates x 2 lambdas); one-se chose one ranked 12th.
    from pipeline.results import FoldResult
    from pipeline.selection import cv_table

    monkeypatch.setenv("COLUMNS", "160")
    lrs = [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07]
    results = [
        FoldResult(lam, fold, 0, 0.9 + 0.001 * i + lam, 0.3, 0.9, 0.3, 2, 0.1,
                   settings={"training.lr": lr}, budget=2)
        for i, lr in enumerate(lrs) for lam in (1e-4, 1e-3) for fold in range(2)
    ]  # fmt: skip
    table = cv_table(results)
    chosen = {"training.l2_lambda": 1e-4, "training.lr": 0.02}
    summary = {**_result([1e-4, 1e-3], 1e-4), "cv_table": table.to_dict(orient="records"),
               "best": chosen}  # fmt: skip

    # Act
    _print_summary(summary, preset("default"))

    # Assert: ten rows, best first, then the chosen one, and what was left out.
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert len(rows) == 11, out
    assert "0.07" in rows[0] and "0.001 " in rows[0], rows[0]
    assert "0.02" in rows[-1] and "← chosen" in rows[-1], rows[-1]
    assert "... and 3 more candidates" in out, out
    assert "test accuracy 0.8912 (λ=0.0001 lr=0.02" in out, out
