"""Prefect tasks: thin wrappers over the plain pipeline functions."""

from __future__ import annotations

from typing import Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run

from flows.interrupt import TrainingStopped, raise_if_stopped
from mlp import MLPError
from pipeline.config import PipelineConfig
from pipeline.data import DatasetRef
from pipeline.errors import PipelineError
from pipeline.results import FoldResult
from pipeline.search import label
from pipeline.threads import set_blas_threads
from pipeline.training import Checkpoint, dataset_from_ref, train_rung


def _retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient failures only: a bad config or dataset fails the same way every time."""
    try:
        state.result()
    except (PipelineError, MLPError, TrainingStopped):
        return False
    except Exception:  # noqa: BLE001 -- anything else may be transient
        return True
    return False


def _task_run_name() -> str:
    """``train_fold lambda=0.0001 lr=0.05 fold=2`` (``@10`` in a halving rung of 10 epochs)."""
    parameters = task_run.parameters
    stop = parameters.get("stop_epoch")
    rung = f" @{stop}" if stop else ""
    return f"train_fold {label(parameters['candidate'])} fold={parameters['fold']}{rung}"


# No Prefect caching or result persistence (its files are pickles): the flow keeps finished
# folds in its own checksummed cache (pipeline.record.FoldCache).
@task(
    name="train_fold",
    task_run_name=_task_run_name,
    cache_policy=NO_CACHE,
    persist_result=False,
    retry_condition_fn=_retry_unless_user_error,
)
def train_fold_task(
    config: PipelineConfig,
    ref: DatasetRef,
    candidate: dict[str, Any],
    fold: int,
    blas_threads: int = 1,
    stop_epoch: int | None = None,
    resume: Checkpoint | None = None,
) -> tuple[FoldResult, Checkpoint | None]:
    """Train and validate one (candidate, fold); the worker loads the dataset once per process.

    ``stop_epoch`` and ``resume``: a rung of successive halving (:func:`train_rung`). An
    interrupted run sets the stop flag: the training then ends at its next epoch.
    """
    raise_if_stopped()
    set_blas_threads(blas_threads)
    dataset = dataset_from_ref(config.data, ref)
    return train_rung(config, dataset, candidate, fold, stop_epoch, resume=resume,
                      callback=raise_if_stopped)  # fmt: skip


def step(fn: Any, *, name: str) -> Task:
    """A task for a step that runs in the flow process on big arrays: no input hashing."""
    return task(fn, name=name, cache_policy=NO_CACHE, persist_result=False)
