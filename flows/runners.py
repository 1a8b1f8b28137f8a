"""Task runners chosen from the execution config at run time."""

from __future__ import annotations

from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from pipeline.config import ExecutionConfig
from pipeline.errors import ConfigError
from pipeline.resources import cpu_count, set_blas_threads


def make_task_runner(execution: ExecutionConfig) -> TaskRunner:
    """A fresh task runner for the configured ``runner`` (use it as a context manager).

    ``sequential`` is a one-thread pool, so every runner goes through the same submit path.
    """
    cores = cpu_count()
    workers = execution.resolved_workers(cores)
    blas = execution.resolved_blas_threads(cores)
    if execution.runner in {"sequential", "thread"}:
        # Threads share this process's BLAS pool: the budget is set once, process-wide.
        set_blas_threads(blas)
        return ThreadPoolTaskRunner(max_workers=workers)
    if execution.runner == "process":
        return ProcessPoolTaskRunner(
            max_workers=workers, initializer=set_blas_threads, initargs=(blas,)
        )
    if execution.runner == "dask":
        return _dask_runner(execution, workers)
    raise ConfigError(f"unknown runner {execution.runner!r}")


def _dask_runner(execution: ExecutionConfig, workers: int) -> TaskRunner:
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ConfigError(
            "runner 'dask' needs the dask extra: pip install 'mlp-pipeline[dask]'"
        ) from None
    if execution.dask_address:
        return DaskTaskRunner(address=execution.dask_address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": workers,
            # One thread per worker process: distributed then limits BLAS to one thread too.
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": "127.0.0.1:0",
        },
    )
