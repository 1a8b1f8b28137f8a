"""Task runners chosen from the execution config at run time, and a pool started early."""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from pipeline.config import DataConfig, ExecutionConfig
from pipeline.errors import ConfigError, PipelineError
from pipeline.resources import cpu_count, set_blas_threads


def make_task_runner(execution: ExecutionConfig, data: DataConfig | None = None) -> TaskRunner:
    """A fresh task runner for the configured ``runner`` (use it as a context manager).

    ``sequential`` is a one-thread pool, so every runner goes through the same submit path.
    With ``data``, process workers load that dataset as they start, not in their first task.
    """
    cores = cpu_count()
    workers = execution.resolved_workers(cores)
    blas = execution.resolved_blas_threads(cores)
    if execution.runner in {"sequential", "thread"}:
        # Threads share this process's BLAS pool: the budget is set once, process-wide.
        set_blas_threads(blas)
        return ThreadPoolTaskRunner(max_workers=workers)
    if execution.runner == "process":
        return EagerProcessPoolTaskRunner(
            max_workers=workers, initializer=warm_worker, initargs=(blas, data)
        )
    if execution.runner == "dask":
        return _dask_runner(execution, workers)
    raise ConfigError(f"unknown runner {execution.runner!r}")


class EagerProcessPoolTaskRunner(ProcessPoolTaskRunner):
    """Prefect's process pool, with every worker process started when the runner is entered.

    Python's pool spawns workers one per submission, so each one would import Prefect and load
    the dataset (about 3 s on 2 busy cores) inside the first round of trainings; entered early
    (:func:`prestarted_task_runner`), the workers do that while the Prefect server boots.
    """

    def __enter__(self) -> EagerProcessPoolTaskRunner:
        super().__enter__()
        # Prefect keeps its ProcessPoolExecutor private: if that changes, workers simply start
        # on the first submissions again.
        executor = getattr(self, "_executor", None)
        if executor is not None:
            for _ in range(getattr(self, "_max_workers", 0) or 0):
                executor.submit(int)  # a no-op call: each one spawns a worker while none idles
        return self


def warm_worker(blas_threads: int, data: DataConfig | None = None) -> None:
    """Pool initializer: set the BLAS budget, import the task code and load the dataset.

    Best effort beyond the BLAS budget: an initializer that raises breaks the whole pool, so a
    dataset problem is left for the task to report in its own words.
    """
    set_blas_threads(blas_threads)
    try:
        import flows.tasks  # noqa: F401 -- Prefect's task engine and the training code
        from pipeline.training import load_configured_dataset

        prime_prefect()

        if data is not None:
            load_configured_dataset(data)
    except Exception:  # noqa: BLE001, S110 -- the first task raises it again, with context
        pass


def prime_prefect() -> None:
    """Do now what Prefect does lazily in a process's first task run.

    Its first block (the result storage) loads every installed Prefect collection, importing
    prefect-dask and distributed (0.26 s alone, about 1 s on busy cores), in each worker's first
    training.
    """
    from prefect.plugins import load_prefect_collections

    load_prefect_collections()


_prestarted: list[tuple[ExecutionConfig, DataConfig, TaskRunner]] = []
_prestarted_lock = threading.Lock()


@contextmanager
def prestarted_task_runner(execution: ExecutionConfig, data: DataConfig) -> Iterator[None]:
    """Start the process pool now, so its workers get ready while other start-up work runs.

    The next :func:`task_runner` call for the same ``execution`` and ``data`` takes this pool
    (and closes it after use); if none does, it is closed on exit. Other runners start fast
    and are not prestarted.
    """
    if execution.runner != "process":
        yield
        return
    runner = make_task_runner(execution, data)
    runner.__enter__()
    entry = (execution, data, runner)
    with _prestarted_lock:
        _prestarted.append(entry)
    try:
        yield
    finally:
        with _prestarted_lock:
            unused = entry in _prestarted
            if unused:
                _prestarted.remove(entry)
        if unused:
            runner.__exit__(None, None, None)


@contextmanager
def task_runner(execution: ExecutionConfig, data: DataConfig) -> Iterator[TaskRunner]:
    """An entered task runner: the prestarted pool for this config if there is one, else new."""
    with _prestarted_lock:
        found = next((e for e in _prestarted if e[0] == execution and e[1] == data), None)
        if found is not None:
            _prestarted.remove(found)
    if found is None:
        with make_task_runner(execution, data) as runner:
            yield runner
        return
    runner = found[2]
    try:
        yield runner
    finally:
        runner.__exit__(*sys.exc_info())  # the exception leaving the sweep, if any


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
