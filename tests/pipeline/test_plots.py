"""Every plot writes a readable PNG, including the awkward inputs (lambda 0, no errors)."""

from __future__ import annotations

import math

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from pipeline import plots


def _read_png(path) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 0, f"{path} missing or empty"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 100, f"{path}: odd image shape {image.shape}"
    assert image.std() > 0, f"{path} is a blank image"
    return image


def _cv_table(lambdas: list[float]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "l2_lambda": lambdas,
            "mean_val_accuracy": np.linspace(0.90, 0.95, len(lambdas)),
            "std_val_accuracy": [0.01] * len(lambdas),
        }
    )


@pytest.mark.parametrize(
    "lambdas", [[1e-4, 1e-3, 1e-2], [0.0, 1e-4, 1e-3], [0.0]], ids=["log", "with-zero", "only-zero"]
)
def test_cv_lambda_plot(tmp_path, lambdas):
    best = {"training.l2_lambda": lambdas[-1]}
    path = plots.plot_cv_search(_cv_table(lambdas), best, tmp_path / "cv.png")
    _read_png(path)


def test_cv_lambda_plot_tolerates_a_single_fold_std_nan(tmp_path):
    table = _cv_table([1e-3, 1e-2]).assign(std_val_accuracy=math.nan)
    _read_png(plots.plot_cv_search(table, None, tmp_path / "cv.png"))


def test_a_search_plot_has_one_panel_per_searched_setting(tmp_path):
    # Arrange: 2 lambdas x 2 architectures x 2 learning rates.
    rows = [
        {"l2_lambda": lam, "model.hidden_sizes": hidden, "training.lr": lr}
        for lam in (1e-4, 1e-3)
        for hidden in ([64], [128, 64])
        for lr in (0.05, 0.1)
    ]
    table = pd.DataFrame(rows).assign(
        mean_val_accuracy=np.linspace(0.90, 0.97, len(rows)), std_val_accuracy=0.01
    )
    best = {"training.l2_lambda": 1e-3, "model.hidden_sizes": [128, 64], "training.lr": 0.1}

    # Act
    one = _read_png(plots.plot_cv_search(table[["l2_lambda", "mean_val_accuracy",
                                                "std_val_accuracy"]].head(2),
                                         None, tmp_path / "one.png"))  # fmt: skip
    three = _read_png(plots.plot_cv_search(table, best, tmp_path / "three.png"))

    # Assert: three panels side by side, as tall as one.
    assert three.shape[0] == one.shape[0], (one.shape, three.shape)
    assert three.shape[1] == pytest.approx(3 * one.shape[1], rel=0.02), (one.shape, three.shape)


@pytest.mark.parametrize("with_val", [True, False])
def test_training_curves(tmp_path, with_val):
    epochs = 5
    history = {
        "epoch": list(range(1, epochs + 1)),
        "train_loss": np.linspace(2.0, 0.3, epochs).tolist(),
        "train_accuracy": np.linspace(0.3, 0.95, epochs).tolist(),
        "val_loss": np.linspace(2.1, 0.4, epochs).tolist() if with_val else [math.nan] * epochs,
        "val_accuracy": np.linspace(0.3, 0.9, epochs).tolist() if with_val else [math.nan] * epochs,
    }
    _read_png(plots.plot_training_curves(history, tmp_path / "curves.png"))


def test_training_curves_draw_the_cross_validation_curve_beside_the_final_ones(tmp_path):
    # The final model has no validation data: the chosen candidate's CV mean stands beside it.
    epochs = 5
    history = {
        "epoch": list(range(1, epochs + 1)),
        "train_loss": np.linspace(2.0, 0.3, epochs).tolist(),
        "train_accuracy": np.linspace(0.3, 0.95, epochs).tolist(),
    }
    held_out = {"val_loss": [1.0, 0.8, 0.7], "val_accuracy": [0.5, 0.6, 0.65]}
    alone = _read_png(plots.plot_training_curves(history, tmp_path / "alone.png"))
    beside = _read_png(plots.plot_training_curves(history, tmp_path / "beside.png", held_out))
    assert alone.shape == beside.shape
    assert np.abs(alone.astype(float) - beside.astype(float)).sum() > 0, "no curve was added"


def test_confusion_matrix(tmp_path):
    rng = np.random.default_rng(0)
    confusion = rng.integers(0, 50, size=(10, 10)) + np.diag(np.full(10, 900))
    names = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat"] + [f"c{i}" for i in range(5)]
    _read_png(plots.plot_confusion_matrix(confusion.tolist(), tmp_path / "cm.png"))
    _read_png(plots.plot_confusion_matrix(confusion, tmp_path / "cm-names.png", names))


def test_a_confusion_matrix_of_many_classes_gets_room(tmp_path):
    # EMNIST balanced: 47 classes; the figure grows with them instead of crowding 10 classes' room.
    rng = np.random.default_rng(0)
    names = [str(i) for i in range(10)] + [chr(c) for c in range(ord("A"), ord("A") + 37)]
    few = _read_png(plots.plot_confusion_matrix(rng.integers(0, 9, (10, 10)), tmp_path / "a.png"))
    many = _read_png(
        plots.plot_confusion_matrix(rng.integers(0, 9, (47, 47)), tmp_path / "b.png", names)
    )
    assert many.shape[0] > 1.5 * few.shape[0] and many.shape[1] > 1.5 * few.shape[1]


@pytest.mark.parametrize("n_wrong", [0, 5, 50])
def test_misclassified(tmp_path, n_wrong):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(60, 784)).astype(np.float32)
    y_true = rng.integers(0, 10, size=60)
    y_pred = y_true.copy()
    y_pred[:n_wrong] = (y_pred[:n_wrong] + 1) % 10
    _read_png(plots.plot_misclassified(images, y_true, y_pred, tmp_path / "wrong.png"))


def test_no_pyplot_figures_leak(tmp_path):
    before = plt.get_fignums()
    plots.plot_cv_search(_cv_table([1e-3, 1e-2]), None, tmp_path / "cv.png")
    assert plt.get_fignums() == before, "plots must not register figures with pyplot"


def test_the_profile_of_a_halving_search_leaves_out_the_pruned_candidates():
    """At each value the best candidate that trained every epoch, not a pruned one's mean."""
    from matplotlib.figure import Figure

    from pipeline.results import FoldResult
    from pipeline.selection import cv_table

    def result(lr: float, hidden: int, acc: float, budget: int) -> FoldResult:
        return FoldResult(1e-3, 0, 0, acc, 0.3, acc, 0.2, budget, 1.0,
                          settings={"training.lr": lr, "model.hidden_sizes": [hidden]},
                          budget=budget)  # fmt: skip

    # At lr 0.1 a pruned candidate (2 epochs) scored above the survivor (6 epochs).
    table = cv_table([result(0.1, 16, 0.97, 2), result(0.1, 8, 0.93, 6), result(0.2, 8, 0.91, 6)])
    axes = Figure().add_subplot()

    plots._plot_setting(axes, table, "training.lr", None)

    (profile,) = axes.containers
    assert profile.lines[0].get_ydata().tolist() == pytest.approx([0.93, 0.91])
