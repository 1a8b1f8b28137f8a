"""The run summary the CLI prints: with the notebook's published figures for its protocol."""

from __future__ import annotations

from flows.cli import _print_summary
from pipeline.config import preset


def _result(lambdas, best):
    return {
        "best_l2_lambda": best,
        "cv_table": [
            {"l2_lambda": lam, "mean_val_accuracy": 0.86, "std_val_accuracy": 0.004,
             "mean_val_loss": 0.47, "diverged_folds": 0}
            for lam in lambdas
        ],
        "trained_folds": 4 * len(lambdas), "cached_folds": 0, "wall_seconds": 1.0,
        "test_accuracy": 0.8912, "test_loss": 0.4, "mlflow_run_id": "0" * 32,
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
