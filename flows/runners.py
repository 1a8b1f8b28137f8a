"""Task runners chosen from the execution config at run time, and a pool started early."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any

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
        from flows.tasks import stop_event

        return EagerProcessPoolTaskRunner(
            max_workers=workers, initializer=warm_worker, initargs=(blas, data, stop_event())
        )
    if execution.runner == "dask":
        return _dask_runner(execution, workers)
    raise ConfigError(f"unknown runner {execution.runner!r}")


class EagerProcessPoolTaskRunner(ProcessPoolTaskRunner):
    """Prefect's process pool, with every worker process started when the runner is entered.

    Python's pool starts workers one per submission, so each one would import Prefect and load
    the dataset inside the first round of trainings; entered early
    (:func:`prestarted_task_runner`), the workers get ready while the Prefect server boots.

    Workers are forked when that is safe: on Linux, from a process running no other thread (the
    CLI, which has imported the task code and loaded the dataset by then). A forked worker
    starts in about 0.1 CPU-s and shares the parent's dataset pages; a spawned one imports
    Prefect and loads the data again (2.3-2.5 CPU-s each here). Anywhere else Prefect's
    ``spawn`` stays: forking a process whose other threads may hold locks can deadlock the
    child.
    """

    def __enter__(self) -> EagerProcessPoolTaskRunner:
        fork = _fork_is_safe()
        super().__enter__()
        # Prefect keeps its ProcessPoolExecutor private: if that changes, workers simply start
        # as Prefect starts them, on the first submissions.
        executor = getattr(self, "_executor", None)
        if executor is None:
            return self
        if fork:
            executor = self._executor = _forking_copy(executor)
        for _ in range(getattr(self, "_max_workers", 0) or 0):
            executor.submit(int)  # a no-op call: each one starts a worker while none idles
        return self

    def duplicate(self) -> ProcessPoolTaskRunner:
        """Prefect's lazy pool with the same workers and initializer.

        Prefect enters a duplicate of a flow's task runner in every process-pool worker, for
        each task it runs: an eager one would start (and then stop) a whole nested pool there,
        3.5 s per task here when this runner is a flow's ``task_runner``.
        """
        copy = ProcessPoolTaskRunner(max_workers=self._max_workers)
        copy._initializer = getattr(self, "_initializer", None)
        copy._initargs = getattr(self, "_initargs", ())
        return copy


def _fork_is_safe() -> bool:
    """True on Linux when this process runs no thread but the main one.

    Threads the C libraries start themselves (OpenBLAS's pool) are not counted: OpenBLAS
    handles ``fork`` with its own ``pthread_atfork`` hooks.
    """
    return sys.platform.startswith("linux") and threading.active_count() == 1


def _forking_copy(executor: ProcessPoolExecutor) -> ProcessPoolExecutor:
    """A pool like ``executor`` (Prefect's, not started yet) whose workers are forked.

    Prefect's message-forwarding thread is already running when the workers fork; it waits in a
    pipe read, holding only the message queue's read lock, which the workers never take (they
    only write to the queue). Without the private attributes this needs, ``executor`` is kept.
    """
    try:
        max_workers = executor._max_workers
        initializer = executor._initializer
        initargs = executor._initargs
    except AttributeError:
        return executor
    executor.shutdown(wait=False)  # it never started a process
    return ProcessPoolExecutor(
        max_workers=max_workers,
        mp_context=multiprocessing.get_context("fork"),
        initializer=initializer,
        initargs=initargs,
    )


def warm_worker(blas_threads: int, data: DataConfig | None = None, stop: Any = None) -> None:
    """Pool initializer: set the BLAS budget and stop flag, import the task code, load the data.

    Best effort beyond the BLAS budget and ``stop`` (the parent's
    :func:`flows.tasks.stop_event`): an initializer that raises breaks the whole pool, so a
    dataset problem is left for the task to report in its own words. In a forked worker the
    imports and the dataset are the parent's already.
    """
    if threading.current_thread() is threading.main_thread():
        # A forked worker inherits the CLI's SIGTERM handler (raise KeyboardInterrupt); the
        # pool's terminate() must end a worker, not raise inside its task.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # A terminal's Ctrl-C reaches every process of the group. The CLI stops the trainings
        # through the stop flag; a KeyboardInterrupt raised in a worker's task would escape
        # Prefect's result callback (it catches Exception only) and kill the pool's manager
        # thread, leaving the workers waiting for work forever and the CLI hung at exit.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_blas_threads(blas_threads)
    _exit_with_parent()
    try:
        import flows.tasks  # Prefect's task engine and the training code
        from flows.console import hide_known_failures_on_console
        from pipeline.training import load_configured_dataset

        if stop is not None:
            flows.tasks.use_stop_event(stop)
        hide_known_failures_on_console()  # a forked worker has the parent's filter already

        prime_prefect()

        if data is not None:
            load_configured_dataset(data)
    except Exception:  # noqa: BLE001, S110 -- the first task raises it again, with context
        pass


def _exit_with_parent(every_seconds: float = 1.0) -> None:
    """End this pool worker when the process that started it is gone.

    A parent killed outright (SIGKILL, the OOM killer) closes nothing: its workers would wait
    for work forever, each holding a copy of the dataset. A thread checks the parent's pid;
    Linux's parent-death signal is no substitute, as it fires when the creating *thread* ends.
    """
    if multiprocessing.parent_process() is None:
        return  # not a pool worker (a test calling the initializer in its own process)
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(every_seconds)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


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
    """An entered task runner: the prestarted pool for this config if there is one, else new.

    Interrupted (Ctrl-C, SIGTERM, a Prefect cancellation), it sets the trainings' stop flag
    before closing the runner: closing waits for the trainings already running or queued to
    the workers, which then end at their next epoch instead of running to the end (SIGTERM to
    exit took 21-32 s with the ``default`` preset; now 0.7-2.5 s).
    """
    from flows.tasks import stop_event

    stop_event().clear()
    with _prestarted_lock:
        found = next((e for e in _prestarted if e[0] == execution and e[1] == data), None)
        if found is not None:
            _prestarted.remove(found)
    if found is None and execution.runner == "process":
        _share_the_flows_api()
    runner = found[2] if found is not None else make_task_runner(execution, data).__enter__()
    try:
        yield runner
    except BaseException as exc:
        if not isinstance(exc, Exception):
            stop_event().set()
        raise
    finally:
        runner.__exit__(*sys.exc_info())  # the exception leaving the sweep, if any


def _share_the_flows_api() -> None:
    """Export the API this flow run reports to, for worker processes started from here.

    The CLI always sets ``PREFECT_API_URL``; a flow called from Python without it runs on a
    temporary server Prefect started in this process, which workers cannot know of: each would
    start one of its own (3 servers in all for 2 workers) and report its task runs there.
    """
    if os.environ.get("PREFECT_API_URL"):
        return
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    url = str(getattr(getattr(context, "client", None), "api_url", "") or "").rstrip("/")
    if url:
        from flows.server import _export_api_url

        _export_api_url(url)


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
