"""Task runners chosen from the execution config at run time."""

from __future__ import annotations

import socket

from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from pipeline.config import ExecutionConfig
from pipeline.errors import ConfigError, PipelineError
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
    """An existing cluster at ``dask_address``, else a LocalCluster of ``workers`` processes.

    With an existing cluster the workers' processes and threads are theirs to choose; each
    training sets its worker's BLAS threads itself (``train_fold_task``).
    """
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ConfigError(
            "runner 'dask' needs the dask extra: pip install 'mlp-pipeline[dask]'"
        ) from None
    if execution.dask_address:
        check_scheduler_reachable(execution.dask_address)
        return DaskTaskRunner(address=execution.dask_address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": workers,
            # One thread per worker process; each training then sets its process's BLAS
            # threads to the budget (cores // workers), so processes never oversubscribe.
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": "127.0.0.1:0",
        },
    )


def check_scheduler_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in one line when nothing listens at a tcp/tls scheduler address.

    Otherwise the Dask client retries for 30 s and ends with a traceback.
    """
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, location = parse_address(address)
        if scheme not in {"tcp", "tls"}:
            return  # other transports (ucx, ws, inproc): let the Dask client judge
        host, port = parse_host_port(location)
    except ValueError as exc:
        raise ConfigError(
            f"bad dask_address {address!r} ({exc}); expected tcp://HOST:PORT"
        ) from None
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise PipelineError(
            f"no Dask scheduler reachable at {address} ({exc}); start one with "
            f"`dask scheduler --port {port}` and workers with `dask worker {address}`"
        ) from None
