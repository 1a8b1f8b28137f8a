"""Recording that survives a tracking server going away mid-run.

:class:`ResilientRecorder` wraps a :class:`~pipeline.tracking.PipelineRecorder`: every call is
retried with exponential backoff; when the store stays unreachable the calls are queued (training
goes on), replayed if the store comes back, and otherwise everything is written to a local report
folder at the end. The execution then fails with :class:`NotRecordedError` naming that folder, so
nothing is lost and the exit code says the run was not recorded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.errors import PipelineError
from pipeline.results import FoldResult
from pipeline.tracking import PipelineRecorder
from pipeline.tracking_uri import check_tracking_uri, redact_uri

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def deferred_signals(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends, then deliver them.

    A signal handled in the middle of a SQLite write (Prefect's SIGTERM handler raises inside
    whatever runs) leaves that connection holding the database lock, so ending the runs as
    KILLED then fails with "database is locked" and they stay RUNNING. Writes are short: the
    signal waits for the one in progress, then acts as usual.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be swapped (and only run) in the main thread
        return
    received: list[int] = []
    previous = {signum: signal.getsignal(signum) for signum in signums}
    for signum in signums:
        signal.signal(signum, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)


class NotRecordedError(PipelineError):
    """The pipeline finished but its record could not reach the tracking store."""

    exit_code = 3


class ResilientRecorder:
    """Retry, queue and, as a last resort, report locally what the recorder could not log.

    Parameters
    ----------
    recorder : PipelineRecorder
        The real recorder; its ``start`` must succeed (an unreachable store at start is a
        clean error before any training, not something to retry for minutes).
    attempts : int
        Tries per call while the store is believed reachable.
    backoff_seconds : float
        First wait between tries; doubled after each failure.
    sleep : callable
        Injected for tests.
    """

    def __init__(
        self,
        recorder: PipelineRecorder,
        *,
        attempts: int = 3,
        backoff_seconds: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.recorder = recorder
        if recorder.tracking_uri.startswith(("http://", "https://")):
            # MLflow's own HTTP retries (7, exponential up to 2 minutes a call) would stall
            # training; this class retries instead, with its own shorter backoff.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.attempts = attempts
        self.backoff_seconds = backoff_seconds
        self._sleep = sleep
        self.queued: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.last_error: str | None = None
        self.fold_results: list[FoldResult] = []

    # -- pass-through lifecycle ----------------------------------------------------------------
    def __enter__(self) -> ResilientRecorder:
        self.recorder.__enter__()
        return self

    def __exit__(self, exc_type, exc, traceback) -> bool:
        if self.offline and exc is None and not self._store_back():
            # Nothing more can be recorded; the flow raises NotRecordedError after writing the
            # report. Leave the parent alone: the next execution marks it FAILED.
            return False
        try:
            with deferred_signals():
                return self.recorder.__exit__(exc_type, exc, traceback)
        except Exception as error:  # noqa: BLE001 -- the original exception matters more
            logger.warning("could not end the MLflow runs: %s", error)
            return False

    def start(self, *args: Any, **kwargs: Any) -> str:
        with deferred_signals():
            return self.recorder.start(*args, **kwargs)

    def warm_up(self, *, final_model: bool) -> None:
        """:meth:`PipelineRecorder.warm_up` (a head start only: never queued or retried)."""
        self.recorder.warm_up(final_model=final_model)

    @property
    def offline(self) -> bool:
        """True while some calls are waiting for the store to come back."""
        return bool(self.queued)

    @property
    def tracking_uri(self) -> str:
        return self.recorder.tracking_uri

    # -- recorded calls ------------------------------------------------------------------------
    def log_fold(self, result: FoldResult) -> Any:
        self.fold_results.append(result)
        return self._call("log_fold", result)

    def log_cv_summary(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("log_cv_summary", *args, **kwargs)

    def log_final(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("log_final", *args, **kwargs)

    def log_metrics_summary(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("log_metrics_summary", *args, **kwargs)

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self.queued and not self._store_back():
            self.queued.append((name, args, kwargs))
            return None
        delay = self.backoff_seconds
        for attempt in range(1, self.attempts + 1):
            try:
                with deferred_signals():
                    return getattr(self.recorder, name)(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 -- any store failure: retry, then queue
                self.last_error = _describe(exc)
                logger.warning(
                    "MLflow %s failed (attempt %d/%d): %s", name, attempt, self.attempts, exc
                )
                if attempt < self.attempts:
                    self._sleep(delay)
                    delay *= 2
        self.queued.append((name, args, kwargs))
        return None

    def _store_back(self) -> bool:
        """Replay the queue if the store answers again; True when nothing is left queued."""
        try:
            check_tracking_uri(self.recorder.tracking_uri, timeout=2.0)
        except PipelineError:
            return False
        pending, self.queued = self.queued, []
        for position, (name, args, kwargs) in enumerate(pending):
            try:
                with deferred_signals():
                    getattr(self.recorder, name)(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001
                self.last_error = _describe(exc)
                self.queued = pending[position:]
                return False
        logger.warning("MLflow store reachable again: %d queued calls replayed", len(pending))
        return True

    # -- the last resort -----------------------------------------------------------------------
    def write_report(self, folder: Path, summary: dict[str, Any], final: Any = None) -> Path:
        """Write everything this execution produced to ``folder``; returns the folder."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "summary.json").write_text(
            json.dumps(_jsonable(summary), indent=2) + "\n", encoding="utf-8"
        )
        (folder / "folds.json").write_text(
            json.dumps([_jsonable(asdict(r)) for r in self.fold_results], indent=2) + "\n",
            encoding="utf-8",
        )
        if summary.get("cv_table"):
            pd.DataFrame(summary["cv_table"]).to_csv(folder / "cv_results.csv", index=False)
        if final is not None:
            final.network.save(folder / "weights.npz")
            (folder / "normalizer.json").write_text(
                json.dumps(final.normalizer.to_dict()), encoding="utf-8"
            )
        return folder

    def not_recorded(self, folder: Path) -> NotRecordedError:
        where = redact_uri(self.recorder.tracking_uri)
        return NotRecordedError(
            f"the pipeline finished but MLflow at {where} stayed unreachable "
            f"({self.last_error}); results saved to {folder}"
        )


def _describe(exc: BaseException) -> str:
    """An exception as one short line, for the not-recorded message."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"


def report_folder(cache_dir: str | Path, run_name: str | None) -> Path:
    """Where an unrecorded execution's report goes: ``<cache_dir>/reports/<time>-<run name>``.

    Inside the configured folder, so the pipeline never writes elsewhere; the run name is
    reduced to safe characters so it cannot climb out of it.
    """
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_name or "run").strip(".-") or "run"
    return Path(cache_dir).resolve() / "reports" / f"{stamp}-{safe}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, float) and value != value:
        return None  # NaN is not JSON
    return value
