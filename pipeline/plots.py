"""The pipeline's figures, written as PNG files.

Every function builds its own :class:`matplotlib.figure.Figure` (Agg canvas, no pyplot), saves it
and drops it, so plotting from the flow process or a worker thread leaks no global state and needs
no display.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.selection import pruned

_DPI = 110


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)  # attaches itself as figure.canvas
    return figure


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    figure.clear()  # drop the artists now: a figure without pyplot is freed with its last reference
    return path


def warm_up() -> None:
    """Draw and encode a small figure in memory: the first figure of a process loads fonts."""
    figure = _new_figure(1.0, 1.0)
    figure.add_subplot().set_title("warm-up")
    figure.savefig(io.BytesIO(), format="png")
    figure.clear()


def plot_cv_search(table: pd.DataFrame, best: Mapping[str, Any] | None, path: str | Path) -> Path:
    """Mean validation accuracy against each searched setting, one panel per setting.

    In each panel every candidate is a faint point; the line joins, for each value of the
    setting, the best candidate with that value (error bars one std over its folds) of those
    that trained their full budget: a value whose candidates successive halving all pruned has
    no point on it. Over lambda alone that is the classic validation curve.

    Parameters
    ----------
    table : pandas.DataFrame
        The CV table of :func:`pipeline.selection.cv_table`: ``l2_lambda``, one dotted column
        per other searched setting, ``mean_val_accuracy`` and ``std_val_accuracy``.
    best : mapping or None
        The chosen candidate (``training.l2_lambda`` and the dotted settings), marked in every
        panel (None: nothing marked).
    path : str or Path
        Where the PNG goes.

    Returns
    -------
    Path
        ``path``.
    """
    settings = ["l2_lambda"] + [column for column in table.columns if "." in column]
    figure = _new_figure(5.0 * len(settings), 4.0)
    chosen = None
    if best is not None:
        wanted = {"l2_lambda": best.get("training.l2_lambda"), **best}
        matches = table.index[
            np.logical_and.reduce([table[c].map(repr) == repr(wanted.get(c)) for c in settings])
        ]
        chosen = matches[0] if len(matches) else None
    for number, setting in enumerate(settings, start=1):
        axes = figure.add_subplot(1, len(settings), number)
        _plot_setting(axes, table, setting, chosen)
    figure.suptitle("Cross-validation: mean validation accuracy per searched setting")
    return _save(figure, path)


def _plot_setting(axes: Any, table: pd.DataFrame, setting: str, chosen: Any) -> None:
    values = table[setting].tolist()
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if numeric:
        positions = np.asarray(values, dtype=float)
        ticks = None
    else:  # lists (hidden sizes) and names: one slot per distinct value, in table order
        names = list(dict.fromkeys(map(_tick, values)))
        positions = np.asarray([names.index(_tick(v)) for v in values], dtype=float)
        ticks = names
    means = table["mean_val_accuracy"].to_numpy(dtype=float)
    stds = np.nan_to_num(table["std_val_accuracy"].to_numpy(dtype=float), nan=0.0)
    axes.scatter(positions, means, alpha=0.35, color="tab:blue", label="candidates")
    # The profile: the best candidate at each value, of those that trained their full budget (a
    # candidate pruned by successive halving has the mean of its fewer epochs).
    full = ~pruned(table).to_numpy()
    order = pd.DataFrame({"x": positions, "mean": means, "std": stds})[full]
    order = order.dropna(subset=["mean"])
    top = order.sort_values("mean").groupby("x").tail(1).sort_values("x")
    axes.errorbar(top["x"], top["mean"], yerr=top["std"], marker="o", capsize=4,
                  label="best at each value")  # fmt: skip
    if ticks is not None:
        axes.set_xticks(range(len(ticks)), ticks, rotation=20)
    else:
        positive = positions[positions > 0]
        if len(positive) == len(positions) and positions.max() > 4 * positions.min():
            axes.set_xscale("log")
        elif len(positive) and setting == "l2_lambda":
            # A log axis cannot show lambda = 0: symlog is linear below the smallest positive.
            axes.set_xscale("symlog", linthresh=float(positive.min()))
    if chosen is not None:
        where = table.index.get_loc(chosen)
        axes.scatter([positions[where]], [means[where]], s=160, facecolors="none",
                     edgecolors="tab:red", zorder=3, linewidths=2,
                     label=f"chosen: {_tick(values[where])}")  # fmt: skip
        axes.axvline(positions[where], color="tab:red", linestyle=":", linewidth=1)
    axes.set_xlabel("L2 strength lambda" if setting == "l2_lambda" else setting)
    axes.set_ylabel("validation accuracy")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="best")


def _tick(value: Any) -> str:
    if isinstance(value, list):
        return "-".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def plot_training_curves(
    history_columns: Mapping[str, Sequence[float]],
    path: str | Path,
    held_out: Mapping[str, Sequence[float]] | None = None,
) -> Path:
    """Loss and accuracy per epoch, side by side (validation curves too when present).

    Parameters
    ----------
    history_columns : mapping of str to sequence of float
        ``History.as_columns()``: ``epoch``, ``train_loss``, ``train_accuracy`` and optionally
        ``val_loss``, ``val_accuracy`` (all NaN means absent), one value per epoch.
    path : str or Path
    held_out : mapping of str to sequence of float, optional
        ``val_loss`` and ``val_accuracy`` per epoch from epoch 1, measured elsewhere: the final
        model has no validation data, so the pipeline passes the chosen candidate's mean over
        its cross-validation folds.

    Returns
    -------
    Path
    """
    n_epochs = len(history_columns.get("train_loss", ()))
    epochs = list(history_columns.get("epoch", range(1, n_epochs + 1)))
    figure = _new_figure(10.0, 4.0)
    for axes, kind in zip(figure.subplots(1, 2), ("loss", "accuracy"), strict=True):
        for split, style in (("train", "-"), ("val", "--")):
            values = _present(history_columns.get(f"{split}_{kind}"))
            if values is not None:
                axes.plot(epochs[: len(values)], values, style, marker=".", label=split)
        values = _present((held_out or {}).get(f"val_{kind}"))
        if values is not None:
            axes.plot(range(1, len(values) + 1), values, ":", marker=".",
                      label="validation (mean of the CV folds)")  # fmt: skip
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("epoch")
        axes.set_ylabel(kind)
        axes.set_title(f"Final model: {kind} per epoch")
        axes.grid(True, alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(loc="best")
    return _save(figure, path)


def _present(values: Sequence[float] | None) -> np.ndarray | None:
    if values is None or len(values) == 0:
        return None
    array = np.asarray(values, dtype=float)
    return None if np.isnan(array).all() else array


def plot_confusion_matrix(
    confusion: Sequence[Sequence[int]] | np.ndarray,
    path: str | Path,
    class_names: Sequence[str] | None = None,
) -> Path:
    """The confusion matrix, every count written in its cell (up to 20 classes).

    Parameters
    ----------
    confusion : array-like, shape (n_classes, n_classes)
        ``confusion[true][predicted]`` counts.
    path : str or Path
    class_names : sequence of str, optional
        Tick labels (default: 0..n_classes-1).

    Returns
    -------
    Path
    """
    counts = np.asarray(confusion, dtype=np.int64)
    n = counts.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
    grow = max(0.0, 0.2 * (n - 10))  # EMNIST's 47 or 62 classes need room
    figure = _new_figure(6.5 + grow, 5.5 + grow)
    axes = figure.add_subplot()
    image = axes.imshow(counts, cmap="Blues")
    figure.colorbar(image, ax=axes, shrink=0.8)
    threshold = counts.max() / 2 if counts.size else 0
    for true in range(n if n <= 20 else 0):  # beyond, the colours say it: the digits would not
        for pred in range(n):
            value = counts[true, pred]
            axes.text(
                pred,
                true,
                str(value),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if value > threshold else "black",
            )
    small = {"fontsize": 7} if n > 20 else {}
    axes.set_xticks(range(n), names, rotation=45 if max(map(len, names)) > 2 else 0, **small)
    axes.set_yticks(range(n), names, **small)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    accuracy = np.trace(counts) / counts.sum() if counts.sum() else math.nan
    axes.set_title(f"Confusion matrix (accuracy {accuracy:.4f})")
    return _save(figure, path)


def plot_misclassified(
    images: np.ndarray,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    path: str | Path,
    max_images: int = 36,
    class_names: Sequence[str] | None = None,
) -> Path:
    """A grid of the first ``max_images`` test errors, each titled "pred P / true T" (the
    classes' names when given).

    Parameters
    ----------
    images : np.ndarray, shape (n_samples, 784)
        Raw pixels (any range; each image is shown on its own gray scale).
    y_true, y_pred : np.ndarray, shape (n_samples,)
    path : str or Path
    max_images : int
    class_names : sequence of str, optional

    Returns
    -------
    Path
    """
    images = np.asarray(images)
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    errors = np.flatnonzero(y_true != y_pred)
    wrong = errors[:max_images]
    columns = max(1, min(6, len(wrong)))
    rows = max(1, math.ceil(len(wrong) / columns))
    figure = _new_figure(1.6 * columns, 1.75 * rows + 0.4)
    if len(wrong) == 0:
        axes = figure.add_subplot()
        axes.text(0.5, 0.5, "no misclassified images", ha="center", va="center")
        axes.set_axis_off()
        return _save(figure, path)
    # One image of all tiles (a label band above each) instead of one axes per tile: 36 axes
    # under a constrained layout take seconds to draw, one mosaic a fraction of that.
    # Short names fit a tile's title (EMNIST's letters); long ones (Fashion-MNIST's) would not.
    short = class_names is not None and max(map(len, class_names)) <= 4

    def name(label: Any) -> str:
        return str(class_names[int(label)]) if short else str(int(label))

    side = int(round(math.sqrt(images.shape[1])))
    band, gap = side // 2, 2
    tile_h, tile_w = side + band + gap, side + gap
    mosaic = np.full((rows * tile_h, columns * tile_w), np.nan)
    axes = figure.add_subplot()
    for slot, index in enumerate(wrong):
        row, column = divmod(slot, columns)
        top, left = row * tile_h + band, column * tile_w
        pixels = images[index].reshape(side, side).astype(float)
        span = np.ptp(pixels) or 1.0
        mosaic[top : top + side, left : left + side] = (pixels - pixels.min()) / span
        axes.text(
            left + side / 2,
            top - 1,
            f"pred {name(y_pred[index])} / true {name(y_true[index])}",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    axes.imshow(mosaic, cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")
    axes.set_axis_off()
    figure.suptitle(f"Misclassified test images: first {len(wrong)} of {len(errors)}")
    return _save(figure, path)
