"""The ``dask`` runner on a real cluster: a scheduler and two workers started as separate processes.

Also the default LocalCluster path (no address), fold caching across runs on the cluster, BLAS
threads set by the task inside the workers, and a worker killed with SIGKILL mid-sweep.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from flows.pipeline_flow import cv_flow
from flows.runners import make_task_runner
from pipeline.config import ExecutionConfig, PipelineConfig
from pipeline.errors import ConfigError, PipelineError
from pipeline.resources import blas_threads
from pipeline.training import _load_configured

distributed = pytest.importorskip("distributed")

pytestmark = [pytest.mark.slow, pytest.mark.server]

N_WORKERS = 2
DASK = str(Path(sys.executable).parent / "dask")
LAMBDAS = [1e-4, 1e-2]
FOLDS = 2


@pytest.fixture(scope="module")
def dask_config(small_config):
    """The flow tests' tiny config, one epoch, in its own experiment."""

    def make(data_dir: Path, tmp_path: Path, tracking_uri: str, **extra) -> PipelineConfig:
        extra = {"training.epochs": 1, "tracking.experiment": "test-dask", **extra}
        return small_config(data_dir, tmp_path, tracking_uri, **extra)

    return make


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """One cluster process in its own process group, so its children stop with it."""
    with log.open("wb") as out:
        return subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


@pytest.fixture(scope="module")
def dask_cluster(prefect_api_url, tmp_path_factory) -> Iterator[str]:
    """``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1; yields the address.

    The workers get the session's Prefect API, so their task runs report where the flow's do.
    """
    logs = tmp_path_factory.mktemp("dask-logs")
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    address = f"tcp://127.0.0.1:{_free_port()}"
    port = address.rsplit(":", 1)[1]
    procs = [
        _start(
            [DASK, "scheduler", "--host", "127.0.0.1", "--port", port,
             "--dashboard-address", "127.0.0.1:0"],
            env,
            logs / "scheduler.log",
        )
    ]  # fmt: skip
    try:
        for i in range(N_WORKERS):
            procs.append(
                _start(
                    [DASK, "worker", address, "--nthreads", "1", "--nworkers", "1",
                     "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0",
                     "--name", f"worker-{i}"],
                    env,
                    logs / f"worker-{i}.log",
                )
            )  # fmt: skip
        with distributed.Client(address, timeout=60) as client:
            client.wait_for_workers(N_WORKERS, timeout=90)
        yield address
    finally:
        for proc in reversed(procs):
            _stop(proc)


@pytest.fixture()
def cluster_client(dask_cluster) -> Iterator[distributed.Client]:
    with distributed.Client(dask_cluster, timeout=60) as client:
        yield client


def _cv_table(config: PipelineConfig) -> tuple[pd.DataFrame, dict]:
    summary = cv_flow(config)
    return pd.DataFrame(summary["cv_table"]), summary


@pytest.fixture(scope="module")
def thread_table(shared_data_dir, prefect_api_url, tmp_path_factory, dask_config) -> pd.DataFrame:
    """The reference: the same sweep on the thread runner."""
    tmp_path = tmp_path_factory.mktemp("thread")
    config = dask_config(shared_data_dir, tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    table, summary = _cv_table(config)
    assert summary["trained_folds"] == len(LAMBDAS) * FOLDS, summary
    return table


def test_external_cluster_matches_thread_runner_and_resumes(
    shared_data_dir, dask_cluster, cluster_client, thread_table, tmp_path, tracking_uri, dask_config
):
    config = dask_config(
        shared_data_dir,
        tmp_path,
        tracking_uri,
        **{
            "execution.runner": "dask",
            "execution.dask_address": dask_cluster,
            # Not the nanny's default of 1: shows the task itself sets the workers' BLAS pools.
            "execution.blas_threads": 2,
        },
    )
    with distributed.get_task_stream(client=cluster_client) as stream:
        table, first = _cv_table(config)
    assert (first["trained_folds"], first["cached_folds"]) == (len(LAMBDAS) * FOLDS, 0), first
    pd.testing.assert_frame_equal(table, thread_table)

    # The trainings ran in the cluster's worker processes, not in this one.
    ran_on = [rec["worker"] for rec in stream.data if "train_fold" in str(rec["key"])]
    assert len(ran_on) == len(LAMBDAS) * FOLDS, [rec["key"] for rec in stream.data]
    workers = set(cluster_client.scheduler_info()["workers"])
    assert set(ran_on) <= workers, (ran_on, workers)
    # Functions of importable modules only: the workers cannot import this test module.
    infos = cluster_client.run(_load_configured.cache_info)
    loaded = {worker: info.currsize for worker, info in infos.items()}
    assert sum(loaded.values()) >= 1, f"no worker loaded the dataset: {loaded}"
    blas = cluster_client.run(blas_threads)
    for worker, count in blas.items():
        if loaded[worker]:
            assert count == 2, f"BLAS threads on {worker}: {count} (expected 2)"

    # A rerun on the cluster reuses every fold the workers persisted.
    table_again, second = _cv_table(config)
    assert (second["trained_folds"], second["cached_folds"]) == (0, len(LAMBDAS) * FOLDS), second
    pd.testing.assert_frame_equal(table_again, thread_table)


def test_local_cluster_matches_thread_runner(
    shared_data_dir, prefect_api_url, thread_table, tmp_path, tracking_uri, dask_config
):
    config = dask_config(
        shared_data_dir,
        tmp_path,
        tracking_uri,
        **{"execution.runner": "dask", "execution.workers": 2},
    )
    table, summary = _cv_table(config)
    assert summary["trained_folds"] == len(LAMBDAS) * FOLDS, summary
    pd.testing.assert_frame_equal(table, thread_table)


def _train_fold_states(mlflow_run_id: str, tracking_uri: str) -> dict[str, str]:
    """Final Prefect state name of every train_fold run of the flow run behind an MLflow run."""
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    tags = MlflowClient(tracking_uri=tracking_uri).get_run(mlflow_run_id).data.tags
    flow_run_id = tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {run.name: run.state_name for run in runs if run.name.startswith("train_fold")}


def _kill_a_busy_worker(
    client: distributed.Client, killed: dict[str, object], stop: threading.Event
) -> None:
    """SIGKILL the process of the first worker seen with a training (its nanny restarts it)."""
    pids = client.run(os.getpid)
    while not stop.is_set():
        busy = {addr: keys for addr, keys in client.processing().items() if keys}
        if busy:
            addr, keys = next(iter(busy.items()))
            os.kill(pids[addr], signal.SIGKILL)
            killed.update(pid=pids[addr], keys=[str(key) for key in keys])
            return
        time.sleep(0.02)


def test_sweep_survives_a_killed_worker(
    shared_data_dir, dask_cluster, cluster_client, tmp_path, tracking_uri, dask_config
):
    lambdas = [1e-5, 1e-4, 1e-3]
    config = dask_config(
        shared_data_dir,
        tmp_path,
        tracking_uri,
        **{
            "cv.l2_lambdas": lambdas,
            "training.epochs": 3,
            "execution.runner": "dask",
            "execution.dask_address": dask_cluster,
        },
    )
    killed: dict[str, object] = {}
    stop = threading.Event()
    killer = threading.Thread(target=_kill_a_busy_worker, args=(cluster_client, killed, stop))
    killer.start()
    try:
        table, summary = _cv_table(config)
    finally:
        stop.set()
        killer.join(timeout=30)
    assert killed, "no worker was killed: the sweep finished before any training started"
    assert any("train_fold" in key for key in killed["keys"]), killed
    assert sorted(table["l2_lambda"]) == lambdas, table
    assert (table["n_folds"] == FOLDS).all(), table
    assert summary["trained_folds"] == len(lambdas) * FOLDS, summary
    # Prefect's record: every training of this flow run ends Completed, the re-run one too.
    states = _train_fold_states(summary["mlflow_run_id"], tracking_uri)
    assert sorted(states.values()) == ["Completed"] * len(lambdas) * FOLDS, states

    # The nanny replaced the killed process: the module's cluster is whole again.
    cluster_client.wait_for_workers(N_WORKERS, timeout=60)
    assert killed["pid"] not in cluster_client.run(os.getpid).values(), killed


def test_unreachable_scheduler_fails_in_one_line(dead_endpoint):
    port = dead_endpoint("closed").port  # held by the test, never listening
    closed = f"tcp://127.0.0.1:{port}"
    config = ExecutionConfig(runner="dask", dask_address=closed)
    with pytest.raises(PipelineError) as failure:
        make_task_runner(config)
    # Fast: the one socket probe was refused at once; no Dask client was made to retry and time
    # out (30 s, then a traceback of its own).
    message = str(failure.value)
    assert message.startswith(f"no Dask scheduler reachable at {closed} ("), message
    assert "Connection refused" in message, message
    assert f"start one with `dask scheduler --port {port}`" in message, message
    assert failure.traceback[-1].name == "check_scheduler_reachable", failure.traceback
    assert failure.value.__suppress_context__, "the socket error belongs in the one line only"
    with pytest.raises(ConfigError, match="expected tcp://HOST:PORT"):
        make_task_runner(ExecutionConfig(runner="dask", dask_address="tcp://127.0.0.1"))
