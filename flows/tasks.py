"""Prefect tasks: thin wrappers over the plain pipeline functions."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE

from mlp import MLPError
from pipeline.cache import fold_cache_key
from pipeline.config import PipelineConfig
from pipeline.data import DatasetRef
from pipeline.errors import PipelineError
from pipeline.resources import set_blas_threads
from pipeline.results import FoldResult
from pipeline.training import dataset_from_ref, train_fold


class TrainingStopped(Exception):
    """A training stopped between epochs because its sweep was interrupted (not retried)."""


# Set when a sweep is interrupted; every training checks it between epochs. One per process
# tree: forked workers inherit it, spawned ones get it from the pool's initializer, thread
# workers share it. None where no sweep of ours started the process (a Dask worker).
_stop: Any = None


def stop_event() -> Any:
    """This process's stop flag, created on first use (a spawn-safe ``multiprocessing.Event``)."""
    global _stop
    if _stop is None:
        _stop = multiprocessing.get_context("spawn").Event()
    return _stop


def use_stop_event(event: Any) -> None:
    """Make ``event`` this process's stop flag (in a worker, the parent's)."""
    global _stop
    _stop = event


def stop_soon() -> None:
    """Set the stop flag, if this process has one, from a helper thread.

    For signal handlers: they run in the main thread, which may hold the flag's lock then.
    """
    if _stop is not None:
        threading.Thread(target=_stop.set, name="stop-trainings", daemon=True).start()


def raise_if_stopped(record: dict[str, Any] | None = None) -> None:
    """Raise :class:`TrainingStopped` once the stop flag is set (an epoch callback)."""
    if _stop is not None and _stop.is_set():
        after = f" after epoch {record['epoch']}" if record else " before its first epoch"
        raise TrainingStopped(f"training stopped{after}: the run was interrupted")


def _fold_key(context: Any, parameters: dict[str, Any]) -> str:
    return fold_cache_key(
        parameters["config"],
        parameters["ref"].fingerprint,
        parameters["l2_lambda"],
        parameters["fold"],
    )


def _retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient failures only: a bad config or dataset fails the same way every time."""
    try:
        state.result()
    except (PipelineError, MLPError, TrainingStopped):
        return False
    except Exception:  # noqa: BLE001 -- anything else may be transient
        return True
    return False


@task(
    name="train_fold",
    task_run_name="train_fold λ={l2_lambda} fold={fold}",
    cache_key_fn=_fold_key,
    persist_result=True,
    retry_condition_fn=_retry_unless_user_error,
)
def train_fold_task(
    config: PipelineConfig, ref: DatasetRef, l2_lambda: float, fold: int, blas_threads: int = 1
) -> FoldResult:
    """Train and validate one (lambda, fold); the worker loads the dataset once per process.

    An interrupted sweep sets the stop flag: the training then ends at its next epoch instead
    of running to the end while the run waits for it.
    """
    raise_if_stopped()
    set_blas_threads(blas_threads)
    dataset = dataset_from_ref(config.data, ref)
    return train_fold(config, dataset, l2_lambda, fold, callback=raise_if_stopped)


def configured_fold_task(config: PipelineConfig) -> Task:
    """``train_fold_task`` with the run's retries, result folder and resume choice."""
    return train_fold_task.with_options(
        retries=config.execution.retries,
        result_storage=Path(config.execution.cache_dir).resolve(),
        # Without resume, recompute every fold (and overwrite what was cached).
        refresh_cache=not config.execution.resume,
    )


def step(fn: Any, *, name: str) -> Task:
    """A task for a step that runs in the flow process.

    Its inputs are big arrays or models: no input hashing (NO_CACHE), no result persistence.
    """
    return task(fn, name=name, cache_policy=NO_CACHE, persist_result=False)
