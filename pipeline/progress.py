"""Rich progress bars for epochs and for the cross-validation sweep."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        disable=not enabled,
        transient=False,
    )


@contextmanager
def epoch_bar(total: int, description: str, enabled: bool = True) -> Iterator[Any]:
    """A bar advanced by an epoch callback; yields the callback to pass to training."""
    with _progress(enabled) as progress:
        task = progress.add_task(description, total=total, status="")

        def on_epoch(record: dict[str, Any]) -> None:
            status = f"loss {record.get('train_loss', float('nan')):.4f}"
            if record.get("val_accuracy") is not None:
                val = record["val_accuracy"]
                if val == val:  # not NaN
                    status += f"  val acc {val:.4f}"
            progress.update(task, advance=1, status=status)

        yield on_epoch


@contextmanager
def task_bar(total: int, description: str, enabled: bool = True) -> Iterator[Any]:
    """A bar for tasks done / total with ETA; yields ``advance(status: str)``."""
    with _progress(enabled) as progress:
        task = progress.add_task(description, total=total, status="")

        def advance(status: str = "") -> None:
            progress.update(task, advance=1, status=status)

        yield advance


class Reporter:
    """Receives pipeline progress events; the default ignores them.

    The CLI installs a :class:`ConsoleReporter` before calling a flow in-process; scheduled
    runs have none and rely on Prefect's logs.
    """

    def sweep_started(self, total: int) -> None: ...

    def fold_finished(self, result: Any, cached: bool) -> None: ...

    def final_started(self, epochs: int, l2_lambda: float) -> None: ...

    def final_epoch(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class ConsoleReporter(Reporter):
    """Rich bars: sweep trainings done / total with ETA, then the final model's epochs."""

    def __init__(self, enabled: bool = True) -> None:
        self._progress = _progress(enabled)
        self._progress.start()
        self._sweep: Any = None
        self._final: Any = None

    def sweep_started(self, total: int) -> None:
        self._sweep = self._progress.add_task("cross-validation", total=total, status="")

    def fold_finished(self, result: Any, cached: bool) -> None:
        how = "cached" if cached else f"{result.seconds:.0f} s"
        status = (
            f"λ={result.l2_lambda:g} fold {result.fold}: val acc {result.val_accuracy:.4f} ({how})"
        )
        self._progress.update(self._sweep, advance=1, status=status)

    def final_started(self, epochs: int, l2_lambda: float) -> None:
        self._final = self._progress.add_task(
            f"final model λ={l2_lambda:g}", total=epochs, status=""
        )

    def final_epoch(self, record: dict[str, Any]) -> None:
        status = f"loss {record['train_loss']:.4f}  acc {record['train_accuracy']:.4f}"
        self._progress.update(self._final, advance=1, status=status)

    def close(self) -> None:
        self._progress.stop()


_reporter: Reporter = Reporter()


def reporter() -> Reporter:
    """The progress reporter of this process."""
    return _reporter


@contextmanager
def reporting(new: Reporter) -> Iterator[Reporter]:
    """Install ``new`` as this process's reporter for the duration of the block."""
    global _reporter
    previous, _reporter = _reporter, new
    try:
        yield new
    finally:
        new.close()
        _reporter = previous
