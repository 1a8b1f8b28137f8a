"""The process pool started ahead of the sweep: warm workers, handed over once, always closed."""

from __future__ import annotations

import os
import time

import pytest

from flows.runners import (
    EagerProcessPoolTaskRunner,
    prestarted_task_runner,
    task_runner,
    warm_worker,
)
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


def test_prestarted_pool_spawns_every_worker_before_any_task(pool_workers):
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
        other = ExecutionConfig(runner="thread", workers=2)
        with task_runner(other, data) as runner:
            assert not isinstance(runner, EagerProcessPoolTaskRunner)
        # The prestarted pool is still waiting for its own sweep.
        assert len(pool_workers(os.getpid())) == 2


def test_thread_runners_are_not_prestarted(pool_workers):
    with prestarted_task_runner(ExecutionConfig(runner="thread"), DataConfig()):
        assert not pool_workers(os.getpid())


def test_warm_up_leaves_dataset_errors_to_the_task(tmp_path):
    # An initializer that raised would break the whole pool with a misleading message.
    missing = DataConfig(dataset="mnist", data_dir=str(tmp_path), download=False)
    with pytest.raises(DataError):  # the data really is unusable...
        load_configured_dataset(missing)
    try:
        warm_worker(1, missing)  # ...yet the warm-up returns, with the BLAS budget applied
        assert blas_threads() == 1
    finally:
        set_blas_threads(cpu_count())
