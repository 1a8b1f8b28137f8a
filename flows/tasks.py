"""Prefect tasks: thin wrappers over the plain pipeline functions."""

from __future__ import annotations

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
    except (PipelineError, MLPError):
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
    """Train and validate one (lambda, fold); the worker loads the dataset once per process."""
    set_blas_threads(blas_threads)
    dataset = dataset_from_ref(config.data, ref)
    return train_fold(config, dataset, l2_lambda, fold)


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
