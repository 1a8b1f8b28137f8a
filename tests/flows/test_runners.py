"""The process pool started ahead of the sweep: warm workers, handed over once, always closed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from prefect.task_runners import ProcessPoolTaskRunner

from flows.runners import (
    EagerProcessPoolTaskRunner,
    prestarted_task_runner,
    task_runner,
    warm_worker,
)
from flows.tasks import TrainingStopped, raise_if_stopped, stop_event
from pipeline.config import DataConfig, ExecutionConfig
from pipeline.errors import DataError
from pipeline.resources import blas_threads, cpu_count, set_blas_threads
from pipeline.training import load_configured_dataset


def _wait_for(predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_prestarted_pool_starts_every_worker_before_any_task(pool_workers):
    execution = ExecutionConfig(runner="process", workers=2)
    data = DataConfig(dataset="mnist-sample")
    with prestarted_task_runner(execution, data):
        assert _wait_for(lambda: len(pool_workers(os.getpid())) == 2), pool_workers(os.getpid())
        spawned = set(pool_workers(os.getpid()))
        with task_runner(execution, data) as runner:
            assert isinstance(runner, EagerProcessPoolTaskRunner)
            assert set(pool_workers(os.getpid())) == spawned  # the same, warm processes
        # Handed over once: the sweep closed it; nothing is left to close here.
        assert _wait_for(lambda: not pool_workers(os.getpid()))
    assert not pool_workers(os.getpid())


def test_unused_prestarted_pool_is_closed_on_exit(pool_workers):
    execution = ExecutionConfig(runner="process", workers=2)
    with prestarted_task_runner(execution, DataConfig(dataset="mnist-sample")):
        assert _wait_for(lambda: len(pool_workers(os.getpid())) == 2)
    assert _wait_for(lambda: not pool_workers(os.getpid()))


def test_a_different_config_gets_a_fresh_runner(pool_workers):
    execution = ExecutionConfig(runner="process", workers=2)
    data = DataConfig(dataset="mnist-sample")
    with prestarted_task_runner(execution, data):
        assert _wait_for(lambda: len(pool_workers(os.getpid())) == 2), pool_workers(os.getpid())
        prestarted = set(pool_workers(os.getpid()))
        other = ExecutionConfig(runner="thread", workers=2)
        with task_runner(other, data) as runner:
            assert not isinstance(runner, EagerProcessPoolTaskRunner), runner
        # The prestarted pool is still waiting for its own sweep: the same workers, not closed.
        assert set(pool_workers(os.getpid())) == prestarted, (pool_workers(os.getpid()), prestarted)


def test_thread_runners_are_not_prestarted(pool_workers):
    with prestarted_task_runner(ExecutionConfig(runner="thread"), DataConfig()):
        assert not pool_workers(os.getpid())


def test_warm_up_leaves_dataset_errors_to_the_task(tmp_path):
    # An initializer that raised would break the whole pool with a misleading message.
    missing = DataConfig(dataset="mnist", data_dir=str(tmp_path), download=False)
    with pytest.raises(DataError):  # the data really is unusable...
        load_configured_dataset(missing)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        warm_worker(1, missing)  # ...yet the warm-up returns, with the BLAS budget applied
        assert blas_threads() == 1
        # A worker leaves Ctrl-C to the CLI (which stops it through the stop flag) and dies
        # on SIGTERM.
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        set_blas_threads(cpu_count())
        for sig, handler in handlers.items():  # this is pytest's process, not a worker
            signal.signal(sig, handler)


def _start_kinds(pid: int, workers: list[int]) -> set[str]:
    """``fork`` for a worker running its parent's command line, ``spawn`` for a fresh one."""
    parent = Path(f"/proc/{pid}/cmdline").read_bytes()
    return {
        "fork" if Path(f"/proc/{w}/cmdline").read_bytes() == parent else "spawn" for w in workers
    }


def test_workers_fork_from_a_process_without_other_threads(tmp_path):
    # What the CLI does: the task code imported and the data loaded, then the pool started.
    script = tmp_path / "start_pool.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, multiprocessing
            from pathlib import Path
            from flows.runners import prestarted_task_runner, task_runner
            from flows.tasks import train_fold_task
            from pipeline.config import DataConfig, ExecutionConfig
            from pipeline.training import load_configured_dataset

            if __name__ == "__main__":
                execution = ExecutionConfig(runner="process", workers=2)
                data = DataConfig(dataset="mnist-sample")
                load_configured_dataset(data)
                me = Path("/proc/self/cmdline").read_bytes()
                with prestarted_task_runner(execution, data):
                    with task_runner(execution, data) as runner:
                        pids = [c.pid for c in multiprocessing.active_children()]
                        kinds = [
                            "fork" if Path(f"/proc/{p}/cmdline").read_bytes() == me else "spawn"
                            for p in pids
                        ]
                        # The pool works: a forked worker computes like a spawned one.
                        squares = [runner._executor.submit(pow, n, 2).result() for n in range(4)]
                print(json.dumps({"kinds": kinds, "squares": squares}))
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"kinds": ["fork", "fork"], "squares": [0, 1, 4, 9]}


def test_workers_are_spawned_while_another_thread_runs(pool_workers):
    # Forking a process whose other threads may hold locks can deadlock the child.
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)
    other.start()
    execution = ExecutionConfig(runner="process", workers=2)
    try:
        with prestarted_task_runner(execution, DataConfig(dataset="mnist-sample")):
            assert _wait_for(lambda: len(pool_workers(os.getpid())) == 2)
            assert _start_kinds(os.getpid(), pool_workers(os.getpid())) == {"spawn"}
    finally:
        stop.set()


def test_spawned_workers_see_the_parents_stop_flag(pool_workers):
    other = threading.Thread(target=threading.Event().wait, args=(30,), daemon=True)
    other.start()  # another thread: the workers are spawned, and get the flag from initargs
    execution = ExecutionConfig(runner="process", workers=2)
    data = DataConfig(dataset="mnist-sample")
    try:
        with prestarted_task_runner(execution, data), task_runner(execution, data) as runner:
            assert _start_kinds(os.getpid(), pool_workers(os.getpid())) == {"spawn"}
            assert runner._executor.submit(raise_if_stopped).result() is None
            stop_event().set()
            for _ in range(2):  # whichever worker takes it
                with pytest.raises(TrainingStopped, match="before its first epoch"):
                    runner._executor.submit(raise_if_stopped).result()
    finally:
        stop_event().clear()


def test_an_interrupted_sweep_sets_the_stop_flag_and_the_next_one_clears_it():
    execution = ExecutionConfig(runner="thread", workers=1)
    try:
        with pytest.raises(KeyboardInterrupt), task_runner(execution, DataConfig()):
            assert not stop_event().is_set()
            raise KeyboardInterrupt
        assert stop_event().is_set()
        with task_runner(execution, DataConfig()):
            assert not stop_event().is_set()
        with pytest.raises(DataError), task_runner(execution, DataConfig()):
            raise DataError("a failure, not an interruption: running trainings may finish")
        assert not stop_event().is_set()
    finally:
        stop_event().clear()


def test_a_duplicate_is_prefects_lazy_pool(pool_workers):
    # Prefect enters a duplicate of a flow's runner in each worker, for every task it runs.
    runner = EagerProcessPoolTaskRunner(max_workers=2, initializer=warm_worker, initargs=(1,))
    copy = runner.duplicate()
    assert type(copy) is ProcessPoolTaskRunner
    assert (copy._initializer, copy._initargs) == (warm_worker, (1,))
    with copy:
        assert not pool_workers(os.getpid())  # nothing started until a task is submitted
