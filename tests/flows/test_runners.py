"""``flows.runners.task_runner``: each runner's workers, BLAS budget and stop flag; trainings
stopped between epochs; ``check_scheduler_reachable``.

Tasks are submitted straight to the runner (no flow): what a sweep does, one training at a
time. The stop tests wait on CPU time spent in the training, never on the clock.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prefect import task
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from flows.interrupt import TrainingStopped, raise_if_stopped, stop_event
from flows.runners import check_scheduler_reachable, task_runner
from flows.tasks import train_fold_task
from pipeline.config import DataConfig, ExecutionConfig
from pipeline.errors import ConfigError, DataError, PipelineError
from pipeline.threads import blas_threads, cpu_count, set_blas_threads
from pipeline.training import load_configured_dataset

# Tasks run outside a flow here: Prefect warns that their logs have no flow run to go to.
pytestmark = pytest.mark.filterwarnings("ignore:Logger 'prefect.task_runs' attempted to send")

SAMPLE = DataConfig(dataset="mnist-sample")
LONG = 5000  # epochs of a training that must be stopped: minutes if it ran to its end


@pytest.fixture(autouse=True)
def _clean_process_state() -> Iterator[None]:
    """The stop flag down and every BLAS thread back after each test (this is pytest's process)."""
    yield
    stop_event().clear()
    set_blas_threads(cpu_count())


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 120) -> None:
    """Poll ``predicate``; ``timeout`` is a hang guard, not a speed requirement."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(0.05)


# ------------------------------------------------------------------------------ threads


_barrier = threading.Barrier(2, timeout=60)
_active = {"now": 0, "max": 0}
_active_lock = threading.Lock()


@task
def _meet() -> int:
    """Returns once two of these run at the same time (a BrokenBarrierError after 60 s)."""
    return _barrier.wait()


@task
def _count_concurrency() -> None:
    with _active_lock:
        _active["now"] += 1
        _active["max"] = max(_active["max"], _active["now"])
    time.sleep(0.05)  # a window for another task to overlap, were there one
    with _active_lock:
        _active["now"] -= 1


def test_the_thread_runner_runs_workers_in_parallel_on_the_blas_budget(prefect_api_url):
    execution = ExecutionConfig(runner="thread", workers=2, blas_threads=1)

    with task_runner(execution, SAMPLE) as runner:
        assert isinstance(runner, ThreadPoolTaskRunner), type(runner)
        assert blas_threads() == 1, f"BLAS threads {blas_threads()}, budget 1 per worker"
        arrivals = sorted(f.result() for f in [runner.submit(_meet, {}) for _ in range(2)])

    assert arrivals == [0, 1], f"two tasks did not run at once: {arrivals}"


def test_the_sequential_runner_runs_one_task_at_a_time_with_every_blas_thread(prefect_api_url):
    execution = ExecutionConfig(runner="sequential", workers=4)  # workers: ignored
    _active.update(now=0, max=0)

    with task_runner(execution, SAMPLE) as runner:
        assert blas_threads() == cpu_count(), f"BLAS threads {blas_threads()} of {cpu_count()}"
        for future in [runner.submit(_count_concurrency, {}) for _ in range(4)]:
            future.result()

    assert _active["max"] == 1, f"{_active['max']} tasks ran at once"


def test_an_error_in_the_block_leaves_the_stop_flag_down():
    """A failure is not an interruption: trainings still running may finish."""
    with pytest.raises(DataError), task_runner(ExecutionConfig(runner="thread"), SAMPLE):
        raise DataError("a failure, not an interruption")

    assert not stop_event().is_set(), "the stop flag was set by an ordinary error"


# ------------------------------------------------------------------------------ processes


@pytest.fixture()
def pickled_by_value() -> Iterator[None]:
    """This module's functions sent to pool workers by value: the workers cannot import it."""
    import cloudpickle

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        yield
    finally:
        cloudpickle.unregister_pickle_by_value(module)


def _worker_pid() -> int:
    return os.getpid()


def _datasets_loaded() -> int:
    from pipeline.training import _load_configured

    return _load_configured.cache_info().currsize


def _handler(name: str) -> int:
    return int(signal.getsignal(getattr(signal, name)))


@pytest.mark.slow
def test_process_workers_get_the_budget_the_stop_flag_and_the_dataset(
    prefect_api_in_every_thread, pickled_by_value
):
    execution = ExecutionConfig(runner="process", workers=1, blas_threads=1)

    with task_runner(execution, SAMPLE) as runner:
        assert isinstance(runner, ProcessPoolTaskRunner), type(runner)

        def run(fn: Callable[..., Any], **parameters: Any) -> Any:
            return runner.submit(task(fn), parameters).result()

        assert run(_worker_pid) != os.getpid(), "the task ran in the flow's own process"
        assert run(blas_threads) == 1, "the worker's BLAS threads ignore the budget"
        assert run(_datasets_loaded) == 1, "the worker did not load the dataset at start"
        handlers = {name: run(_handler, name=name) for name in ("SIGINT", "SIGHUP", "SIGTERM")}
        expected = {"SIGINT": signal.SIG_IGN, "SIGHUP": signal.SIG_IGN, "SIGTERM": signal.SIG_DFL}
        assert handlers == expected, f"a worker leaves Ctrl-C and hang-ups to the flow: {handlers}"
        assert run(raise_if_stopped) is None, "the flag is down: the task runs"
        stop_event().set()
        with pytest.raises(TrainingStopped, match="before its first epoch"):
            run(raise_if_stopped)


@pytest.mark.slow
def test_a_dataset_a_worker_cannot_load_leaves_the_pool_working(
    prefect_api_in_every_thread, pickled_by_value, tmp_path
):
    """The initializer loads the dataset at best: raising there would break the whole pool
    with a misleading message; the first training reports the problem in its own words."""
    missing = DataConfig(dataset="mnist", data_dir=str(tmp_path), download=False)
    with pytest.raises(DataError):  # the data really is unusable
        load_configured_dataset(missing)
    execution = ExecutionConfig(runner="process", workers=1, blas_threads=1)

    with task_runner(execution, missing) as runner:
        loaded = runner.submit(task(_datasets_loaded), {}).result()
        budget = runner.submit(task(blas_threads), {}).result()

    assert loaded == 0, f"{loaded} datasets loaded from an empty folder"
    assert budget == 1, "the rest of the initializer did not run"


def test_the_dask_runner_needs_the_dask_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "prefect_dask", None)  # as if it were not installed

    with pytest.raises(ConfigError) as failure, task_runner(ExecutionConfig(runner="dask"), SAMPLE):
        pass

    assert "pip install 'mlp-pipeline[dask]'" in str(failure.value), failure.value


# ------------------------------------------------------------------------------ stopping


@contextmanager
def _long_training(
    runner_name: str, sample_flow_config, tmp_path: Path, cpu_seconds, pool_workers
) -> Iterator[tuple[Any, Callable[[], None]]]:
    """A task runner with one LONG training submitted; yields its future and ``wait_busy``.

    ``wait_busy()`` returns once the training has spent 1.5 s of CPU (hundreds of epochs of
    this tiny network): it is past its first epoch, and far from its last.
    """
    config = sample_flow_config(
        tmp_path / "cache",
        "sqlite:///unused.db",
        **{"execution.runner": runner_name, "execution.workers": 1, "training.epochs": LONG},
    )
    dataset = load_configured_dataset(config.data)
    parameters = {
        "config": config, "ref": dataset.ref, "candidate": {"training.l2_lambda": 1e-4}, "fold": 0,
        "blas_threads": 1,
    }  # fmt: skip
    with task_runner(config.execution, config.data) as runner:
        if runner_name == "process":  # the worker started and initialized: its CPU is idle
            pid = runner.submit(task(_worker_pid), {}).result()
            assert pid in pool_workers(os.getpid()), f"{pid} is no pool worker of this process"
            worker = pool_workers(os.getpid())[0]
        else:
            worker = os.getpid()
        before = cpu_seconds(worker)
        future = runner.submit(train_fold_task, parameters)

        def wait_busy() -> None:
            _wait_for(lambda: cpu_seconds(worker) > before + 1.5, "the training never ran")

        yield future, wait_busy


def _stopped_epoch(future: Any) -> int:
    """The epoch after which the training stopped (it must not have finished)."""
    with pytest.raises(TrainingStopped) as stopped:
        result = future.result(timeout=600)
        pytest.fail(f"the training ran to its end: {result.epochs} epochs")
    found = re.fullmatch(
        r"training stopped after epoch (\d+): the run was interrupted", str(stopped.value)
    )
    assert found, f"not stopped between epochs: {stopped.value}"
    return int(found.group(1))


@pytest.mark.slow
@pytest.mark.parametrize("runner_name", ["thread", "process"])
def test_the_stop_flag_stops_a_running_training_at_its_next_epoch(
    runner_name,
    prefect_api_in_every_thread,
    pickled_by_value,
    sample_flow_config,
    tmp_path,
    cpu_seconds,
    pool_workers,
):
    with _long_training(runner_name, sample_flow_config, tmp_path, cpu_seconds, pool_workers) as (
        future,
        wait_busy,
    ):
        wait_busy()
        stop_event().set()
        epoch = _stopped_epoch(future)

    assert 1 <= epoch < LONG, f"stopped after epoch {epoch} of {LONG}"


@pytest.mark.slow
@pytest.mark.parametrize("runner_name", ["thread", "process"])
def test_an_interruption_in_the_block_stops_the_trainings_instead_of_waiting_for_them(
    runner_name,
    prefect_api_in_every_thread,
    pickled_by_value,
    sample_flow_config,
    tmp_path,
    cpu_seconds,
    pool_workers,
):
    """A KeyboardInterrupt (a signal, Prefect's TerminationSignal) leaving the block sets the
    flag: the runner's exit, which waits for running tasks, waits one epoch, not a training."""
    with (
        pytest.raises(KeyboardInterrupt),
        _long_training(runner_name, sample_flow_config, tmp_path, cpu_seconds, pool_workers) as (
            future,
            wait_busy,
        ),
    ):
        assert not stop_event().is_set(), "the flag was up before the interruption"
        wait_busy()
        raise KeyboardInterrupt

    assert stop_event().is_set(), "the interruption did not set the stop flag"
    epoch = _stopped_epoch(future)
    assert 1 <= epoch < LONG, f"stopped after epoch {epoch} of {LONG}"


def test_a_runner_after_an_interrupted_one_runs_its_trainings(prefect_api_url):
    execution = ExecutionConfig(runner="thread", workers=1)
    with pytest.raises(KeyboardInterrupt), task_runner(execution, SAMPLE):
        raise KeyboardInterrupt

    with task_runner(execution, SAMPLE) as runner:
        outcome = runner.submit(task(raise_if_stopped), {}).result(raise_on_failure=False)

    assert not isinstance(outcome, TrainingStopped), f"the next sweep was stopped: {outcome}"


# ------------------------------------------------------------------------------ Dask scheduler


def _one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message, f"not one line: {message!r}"
    assert error.__suppress_context__, "the socket error belongs in the one line only"
    return message


def test_an_unreachable_scheduler_is_one_line(dead_endpoint):
    port = dead_endpoint("closed").port  # held by the test, never listening
    address = f"tcp://127.0.0.1:{port}"

    with pytest.raises(PipelineError) as failure:
        check_scheduler_reachable(address)

    message = _one_line(failure.value)
    assert message.startswith(f"no Dask scheduler reachable at {address} ("), message
    assert "Connection refused" in message, message
    assert f"start one with `dask scheduler --port {port}`" in message, message
    assert f"`dask worker {address}`" in message, message


@pytest.mark.parametrize("address", ["tcp://127.0.0.1", "tcp://127.0.0.1:port"])
def test_a_malformed_scheduler_address_is_one_config_line(address):
    with pytest.raises(ConfigError) as failure:
        check_scheduler_reachable(address)

    message = _one_line(failure.value)
    assert message.startswith(f"bad dask_address {address!r} ("), message
    assert message.endswith("expected tcp://HOST:PORT"), message


def test_a_listening_scheduler_or_another_transport_passes():
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        address = f"tcp://127.0.0.1:{listening.getsockname()[1]}"

        assert check_scheduler_reachable(address) is None, "a listening scheduler refused"

    assert check_scheduler_reachable("inproc://127.0.0.1/1/1") is None, "left to Dask's client"
