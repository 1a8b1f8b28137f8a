"""Rich progress bars for epochs and for the cross-validation sweep."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column
from rich.text import Text

console = Console(stderr=True)


class StatusColumn(ProgressColumn):
    """The task's ``status`` field on one line, cut with an ellipsis when the line is full.

    Rich shrinks only wrappable columns when a row is wider than the terminal, and every
    stock column is not: on an 80-column terminal the counts, elapsed time and ETA were cut to
    ``0:…`` by a long status. This column is the one that gives way.
    """

    def __init__(self) -> None:
        super().__init__(table_column=Column(no_wrap=False, min_width=0))

    def render(self, task: Task) -> Text:
        return Text(str(task.fields.get("status", "")), no_wrap=True, overflow="ellipsis")


def _progress(enabled: bool, console: Console = console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        StatusColumn(),
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


class Reporter:
    """Receives pipeline progress events; the default ignores them.

    The CLI installs a :class:`ConsoleReporter` before calling a flow in-process; scheduled
    runs have none and rely on Prefect's logs.
    """

    def run_started(self, name: str, url: str | None) -> None:
        """A flow run named ``name`` started; ``url``: its page in the Prefect UI."""

    def sweep_started(self, total: int) -> None: ...

    def fold_finished(self, result: Any, cached: bool) -> None: ...

    def final_started(self, epochs: int, candidate: str) -> None: ...

    def final_epoch(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class ConsoleReporter(Reporter):
    """Rich bars: sweep trainings done / total with ETA, then the final model's epochs."""

    def __init__(
        self, enabled: bool = True, console: Console = console, links: bool = False
    ) -> None:
        """``links``: print the flow run's Prefect UI address (a lasting server has one)."""
        self._progress = _progress(enabled, console)
        self._progress.start()
        self._links = links
        self._sweep: Any = None
        self._final: Any = None

    def run_started(self, name: str, url: str | None) -> None:
        if self._links and url:  # on stdout: stderr is for the one line of an error
            Console(soft_wrap=True, highlight=False).print(
                f"Prefect flow run {escape(name)}: {escape(url)}"
            )

    def sweep_started(self, total: int) -> None:
        self._sweep = self._progress.add_task("cross-validation", total=total, status="")

    def fold_finished(self, result: Any, cached: bool) -> None:
        how = "cached" if cached else f"{result.seconds:.0f} s"
        from pipeline.search import label

        what = label(result.candidate, l2_name="λ")
        status = f"{what} fold {result.fold}: val acc {result.val_accuracy:.4f}"
        status = escape(f"{status} ({how})")
        self._progress.update(self._sweep, advance=1, status=status)

    def final_started(self, epochs: int, candidate: str) -> None:
        """``candidate``: its label (``lambda=0.0001 lr=0.05``)."""
        self._final = self._progress.add_task(
            escape(f"final model {candidate}"), total=epochs, status=""
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
