"""Interruptions, in one place: signals end a run cleanly, and its trainings stop between epochs.

The command line turns SIGINT, SIGTERM and SIGHUP into :class:`Interrupted` (a
``KeyboardInterrupt``) and sets the stop flag that every training checks after each epoch, in
this process, its threads and its pool workers. The run record and the MLflow runs then end
KILLED, and the command exits 130 (129 after SIGHUP).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# This process's stop flag: created by the process that handles the signals, handed to pool
# workers by their initializer, shared by threads. None where no run of ours set it up (a Dask
# worker): trainings there run to their end.
_stop: Any = None


class Interrupted(KeyboardInterrupt):
    """A signal interrupted the run."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


class TrainingStopped(Exception):
    """A training stopped between epochs because its run was interrupted (not retried)."""


def stop_event() -> Any:
    """This process's stop flag, created on first use (a spawn-safe ``multiprocessing.Event``)."""
    global _stop
    if _stop is None:
        _stop = multiprocessing.get_context("spawn").Event()
    return _stop


def raise_if_stopped(record: dict[str, Any] | None = None) -> None:
    """Raise :class:`TrainingStopped` once the stop flag is set (an epoch callback)."""
    if _stop is not None and _stop.is_set():
        after = f" after epoch {record['epoch']}" if record else " before its first epoch"
        raise TrainingStopped(f"training stopped{after}: the run was interrupted")


def exit_code(signum: int | None) -> int:
    """The command's exit code after signal ``signum``: 129 after SIGHUP, else 130."""
    return 129 if signum == signal.SIGHUP else 130


class Caught:
    """The signal an :func:`interruptible` block received, if any."""

    signum: int | None = None

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum)


@contextmanager
def interruptible() -> Iterator[Caught]:
    """In the main thread: the signals raise :class:`Interrupted` and set the stop flag."""
    stop = stop_event()
    stop.clear()
    caught = Caught()

    def handle(signum: int, frame: Any) -> None:
        caught.signum = signum
        # The flag's lock may be held by the interrupted code: set it from another thread.
        threading.Thread(target=stop.set, name="stop-trainings", daemon=True).start()
        raise Interrupted(signum)

    previous = {signum: signal.signal(signum, handle) for signum in SIGNALS}
    try:
        yield caught
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def init_worker(stop: Any) -> None:
    """In a pool worker: share the parent's stop flag, leave the signals to the parent.

    A terminal's Ctrl-C (or a closed terminal's SIGHUP) reaches every process of the job; the
    parent stops the trainings through the flag, and a KeyboardInterrupt raised inside a
    worker's task would escape Prefect's result handling and hang the pool. SIGTERM keeps its
    default: the pool's shutdown may need it. A parent killed outright (SIGKILL, the OOM
    killer) closes nothing: the worker then ends itself.
    """
    global _stop
    _stop = stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    parent = os.getppid()

    def end_with_parent() -> None:
        while os.getppid() == parent:
            time.sleep(0.25)
        os._exit(1)

    threading.Thread(target=end_with_parent, name="end-with-parent", daemon=True).start()
