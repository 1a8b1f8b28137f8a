"""Prefect tasks: thin wrappers over the plain pipeline functions."""

from __future__ import annotations

from typing import Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE

from flows.interrupt import TrainingStopped, raise_if_stopped
from mlp import MLPError
from pipeline.config import PipelineConfig
from pipeline.data import DatasetRef
from pipeline.errors import PipelineError
from pipeline.results import FoldResult
from pipeline.threads import set_blas_threads
from pipeline.training import dataset_from_ref, train_fold


def _retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient failures only: a bad config or dataset fails the same way every time."""
    try:
        state.result()
    except (PipelineError, MLPError, TrainingStopped):
        return False
    except Exception:  # noqa: BLE001 -- anything else may be transient
        return True
    return False


# No Prefect caching or result persistence (its files are pickles): the flow keeps finished
# folds in its own checksummed cache (pipeline.record.FoldCache).
@task(
    name="train_fold",
    task_run_name="train_fold lambda={l2_lambda:g} fold={fold}",
    cache_policy=NO_CACHE,
    persist_result=False,
    retry_condition_fn=_retry_unless_user_error,
)
def train_fold_task(
    config: PipelineConfig, ref: DatasetRef, l2_lambda: float, fold: int, blas_threads: int = 1
) -> FoldResult:
    """Train and validate one (lambda, fold); the worker loads the dataset once per process.

    An interrupted run sets the stop flag: the training then ends at its next epoch.
    """
    raise_if_stopped()
    set_blas_threads(blas_threads)
    dataset = dataset_from_ref(config.data, ref)
    return train_fold(config, dataset, l2_lambda, fold, callback=raise_if_stopped)


def step(fn: Any, *, name: str) -> Task:
    """A task for a step that runs in the flow process on big arrays: no input hashing."""
    return task(fn, name=name, cache_policy=NO_CACHE, persist_result=False)
