"""The console progress bars: what a user reads on a narrow and on a wide terminal."""

from __future__ import annotations

import io
import re
from types import SimpleNamespace

import pytest
from rich.console import Console

from pipeline.progress import ConsoleReporter

FOLD_STATUS = "λ=0.0001 fold 3: val acc 0.9812 (9 s)"


def _render(width: int) -> list[str]:
    """Drive a reporter through a 16-training sweep and a 10-epoch final model at ``width``."""
    out = io.StringIO()
    reporter = ConsoleReporter(console=Console(file=out, width=width, color_system=None))
    reporter.sweep_started(16)
    for _ in range(16):
        reporter.fold_finished(
            SimpleNamespace(
                seconds=9.2, candidate={"training.l2_lambda": 1e-4}, fold=3, val_accuracy=0.9812
            ),
            cached=False,
        )
    reporter.final_started(10, "λ=0.0001")
    for _ in range(10):
        reporter.final_epoch({"train_loss": 0.0123, "train_accuracy": 0.9987})
    reporter.close()
    return [line for line in out.getvalue().splitlines() if line.strip()]


@pytest.mark.parametrize("width", [80, 100])
def test_narrow_terminal_keeps_counts_and_times_whole(width):
    # Act
    lines = _render(width)

    # Assert: the status gives way; counts, percentage, elapsed time and ETA stay readable.
    sweep = next(line for line in lines if line.startswith("cross-validation"))
    final = next(line for line in lines if line.startswith("final model"))
    assert all(len(line) <= width for line in lines), f"lines wider than {width}:\n{lines}"
    assert re.search(r" 16/16 +100% \d:\d\d:\d\d eta \d:\d\d:\d\d ", sweep), sweep
    assert re.search(r" 10/10 +100% \d:\d\d:\d\d eta \d:\d\d:\d\d ", final), final
    assert "λ=0.0001" in sweep, f"the status should keep what fits: {sweep!r}"
    if width == 80:
        assert sweep.rstrip().endswith("…"), f"the long status should be cut short: {sweep!r}"


def test_wide_terminal_shows_the_whole_status():
    # Act
    lines = _render(140)

    # Assert
    sweep = next(line for line in lines if line.startswith("cross-validation"))
    final = next(line for line in lines if line.startswith("final model"))
    assert sweep.rstrip().endswith(FOLD_STATUS), sweep
    assert final.rstrip().endswith("loss 0.0123  acc 0.9987"), final
