"""Prefect's task runners, chosen from the execution config at run time."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from prefect.context import FlowRunContext
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from flows.interrupt import init_worker, stop_event
from flows.server import prefect_settings
from pipeline.config import DataConfig, ExecutionConfig
from pipeline.errors import ConfigError, PipelineError
from pipeline.threads import cpu_count, set_blas_threads
from pipeline.training import load_configured_dataset


@contextmanager
def task_runner(execution: ExecutionConfig, data: DataConfig) -> Iterator[TaskRunner]:
    """An entered task runner for the configured ``runner``.

    ``sequential`` is a one-thread pool, so every runner goes through the same submit path.
    Process workers start with the stop flag and the dataset loaded, and report to the flow's
    own Prefect API: without one configured, each would start a temporary server of its own.
    """
    stop_event().clear()  # an earlier interrupted run in this process set it
    cores = cpu_count()
    workers = execution.resolved_workers(cores)
    blas = execution.resolved_blas_threads(cores)
    shared_api: Any = nullcontext()
    if execution.runner in {"sequential", "thread"}:
        # Threads share this process's BLAS pool: the budget is set once, process-wide.
        set_blas_threads(blas)
        runner: TaskRunner = ThreadPoolTaskRunner(max_workers=workers)
    elif execution.runner == "process":
        runner = ProcessPoolTaskRunner(
            max_workers=workers,
            initializer=_init_process_worker,
            initargs=(stop_event(), blas, data),
        )
        # This flow run's API for the workers and Prefect's own threads, when it is not in the
        # environment already (a flow called from Python in a settings context).
        context = FlowRunContext.get()
        if context is not None and not os.environ.get("PREFECT_API_URL"):
            shared_api = prefect_settings(PREFECT_API_URL=str(context.client.api_url))
    else:  # "dask": the config allows no other value
        runner = _dask_runner(execution, workers)
    with shared_api, runner:
        try:
            yield runner
        except BaseException as exc:
            # Interrupted (a signal, Prefect's TerminationSignal): the runner waits for the
            # trainings still running when it closes; they stop at their next epoch.
            if not isinstance(exc, Exception):
                stop_event().set()
            raise


def _init_process_worker(stop: Any, blas_threads: int, data: DataConfig) -> None:
    """Pool initializer: the stop flag, the BLAS budget, the dataset loaded (best effort)."""
    init_worker(stop)
    set_blas_threads(blas_threads)
    with contextlib.suppress(Exception):  # the first task reports it in its own words
        load_configured_dataset(data)


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
            # One thread per worker process: each training then sets its process's BLAS
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
