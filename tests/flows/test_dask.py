"""The ``dask`` runner: a real cluster on loopback (a scheduler and two workers started by the
test), the LocalCluster the runner starts itself, a worker killed mid-sweep, and an unreachable
scheduler.

The cluster's processes get neither ``PREFECT_API_URL`` nor the session's Prefect home: what
they report, they report to the flow's API because the runner hands it to them.
"""

from __future__ import annotations

import contextlib
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
from prefect import task

from flows.pipeline_flow import cv_flow
from flows.runners import task_runner
from pipeline.config import DataConfig, ExecutionConfig, PipelineConfig
from pipeline.record import RunRecord
from pipeline.threads import blas_threads

distributed = pytest.importorskip("distributed")

N_WORKERS = 2
DASK = str(Path(sys.executable).with_name("dask"))
LAMBDAS = [1e-4, 1e-2]
FOLDS = 2
TRAININGS = len(LAMBDAS) * FOLDS
FLOW_PROCESS_TASKS = 3  # load_data, cv_table, select_lambda


# ------------------------------------------------------------------------------ helpers


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """One cluster process in a session of its own, so that its children stop with it."""
    with log.open("wb") as out:
        return subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the process's group, SIGKILL what is left; reaped either way."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # a nanny's worker that outlived it
    process.wait(timeout=15)


def _listening(pids: set[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state held by ``pids``, from ``/proc``."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
        except OSError:
            continue  # the process ended meanwhile
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:
                continue
            address, port = fields[1].rsplit(":", 1)
            raw = bytes.fromhex(address)
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
            found.add((socket.inet_ntop(family, words), int(port, 16)))
    return found


def _tree(pid: int) -> set[int]:
    """``pid`` and its live descendants."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, grew = {pid}, True
    while grew:
        more = {child for child, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    return tree


def _finished_task_runs(flow_run_id: str, expected: int, timeout: float = 60) -> set[str]:
    """Task runs of a flow run that logged "Finished in state Completed()" to the session API.

    The cluster's workers send their logs in batches of their own: polled until ``expected``
    are there (``timeout`` is a hang guard).
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
            )
        finished = {
            str(log.task_run_id)
            for log in logs
            if log.task_run_id and log.message.startswith("Finished in state Completed")
        }
        if len(finished) >= expected or time.monotonic() > deadline:
            return finished
        time.sleep(0.5)


def _flow_run_id(summary: dict) -> str:
    return RunRecord(summary["record"]).run()["prefect_flow_run"]["id"]


def _table(summary: dict) -> pd.DataFrame:
    return pd.DataFrame(summary["cv_table"])


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory) -> Iterator[tuple[str, list[subprocess.Popen]]]:
    """``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1, one thread each.

    Yields the scheduler's address and the processes. They get no Prefect API and a Prefect
    home of their own: a worker that did not receive the flow's API would start a Prefect
    server of its own, or report nowhere.
    """
    logs = tmp_path_factory.mktemp("dask")
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(logs / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    processes = [
        _start(
            [DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port),
             "--dashboard-address", "127.0.0.1:0"],
            env, logs / "scheduler.log",
        )
    ]  # fmt: skip
    try:
        for i in range(N_WORKERS):
            processes.append(
                _start(
                    [DASK, "worker", address, "--nthreads", "1", "--nworkers", "1",
                     "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0",
                     "--name", f"worker-{i}"],
                    env, logs / f"worker-{i}.log",
                )
            )  # fmt: skip
        with distributed.Client(address, timeout=120) as client:
            client.wait_for_workers(N_WORKERS, timeout=180)
        yield address, processes
    finally:
        for process in reversed(processes):
            _stop(process)


@pytest.fixture()
def cluster_client(dask_cluster) -> Iterator[distributed.Client]:
    with distributed.Client(dask_cluster[0], timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def thread_table(prefect_api_url, tmp_path_factory, sample_flow_config) -> pd.DataFrame:
    """The reference: the same sweep on the thread runner."""
    folder = tmp_path_factory.mktemp("thread")
    config = sample_flow_config(folder / "cache", f"sqlite:///{folder / 'mlflow.db'}")
    summary = cv_flow(config)
    assert summary["trained_folds"] == TRAININGS, summary
    return _table(summary)


def _dask_config(sample_flow_config, tmp_path: Path, tracking_uri: str, **extra) -> PipelineConfig:
    return sample_flow_config(
        tmp_path / "cache", tracking_uri, **{"execution.runner": "dask", **extra}
    )


# ------------------------------------------------------------------------------ a real cluster


@pytest.mark.slow
@pytest.mark.server
def test_a_cluster_runs_the_sweep_like_threads_and_reports_to_the_flows_api(
    dask_cluster,
    cluster_client,
    thread_table,
    prefect_api_url,
    tmp_path,
    tracking_uri,
    sample_flow_config,
    new_prefect_servers,
):
    from pipeline.training import _load_configured

    address, processes = dask_cluster
    config = _dask_config(
        sample_flow_config,
        tmp_path,
        tracking_uri,
        # Not the nanny's default of 1: shows the task itself sets its worker's BLAS pools.
        **{"execution.dask_address": address, "execution.blas_threads": 2},
    )

    with (
        distributed.get_task_stream(client=cluster_client) as stream,
        new_prefect_servers(processes[0].pid) as scheduler_servers,
        new_prefect_servers(processes[1].pid) as worker_servers,
        new_prefect_servers(processes[2].pid) as other_worker_servers,
    ):
        first = cv_flow(config)

    assert (first["trained_folds"], first["cached_folds"]) == (TRAININGS, 0), first
    pd.testing.assert_frame_equal(_table(first), thread_table)
    ran_on = [record["worker"] for record in stream.data if "train_fold" in str(record["key"])]
    assert len(ran_on) == TRAININGS, [record["key"] for record in stream.data]
    assert set(ran_on) <= set(cluster_client.scheduler_info()["workers"]), ran_on
    loaded = cluster_client.run(lambda: _load_configured.cache_info().currsize)
    assert sum(loaded.values()) >= 1, f"no worker loaded the dataset: {loaded}"
    for worker, count in cluster_client.run(blas_threads).items():
        if loaded[worker]:
            assert count == 2, f"BLAS threads on {worker}: {count} (budget 2)"
    servers = {**scheduler_servers, **worker_servers, **other_worker_servers}
    assert not servers, f"the cluster started Prefect servers of its own: {servers}"
    finished = _finished_task_runs(_flow_run_id(first), FLOW_PROCESS_TASKS + TRAININGS)
    assert len(finished) == FLOW_PROCESS_TASKS + TRAININGS, (
        f"task runs that reported to the flow's API: {len(finished)} "
        f"({FLOW_PROCESS_TASKS} in the flow's process, {TRAININGS} on the cluster)"
    )

    second = cv_flow(config)  # the fold cache is the flow's: the cluster trains nothing

    assert (second["trained_folds"], second["cached_folds"]) == (0, TRAININGS), second
    pd.testing.assert_frame_equal(_table(second), thread_table)


def _kill_a_busy_worker(
    client: distributed.Client, killed: dict[str, object], stop: threading.Event
) -> None:
    """SIGKILL the process of the first worker seen with a training (its nanny restarts it)."""
    pids = client.run(os.getpid)
    while not stop.is_set():
        busy = {address: keys for address, keys in client.processing().items() if keys}
        if busy:
            address, keys = next(iter(busy.items()))
            os.kill(pids[address], signal.SIGKILL)
            killed.update(pid=pids[address], keys=[str(key) for key in keys])
            return
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.server
def test_the_sweep_survives_a_killed_cluster_worker(
    dask_cluster, cluster_client, prefect_api_url, tmp_path, tracking_uri, sample_flow_config
):
    lambdas = [1e-5, 1e-4, 1e-3]
    config = _dask_config(
        sample_flow_config,
        tmp_path,
        tracking_uri,
        **{
            "cv.l2_lambdas": lambdas,
            "training.epochs": 40,  # seconds per training: long enough to be caught running
            "execution.dask_address": dask_cluster[0],
        },
    )
    killed: dict[str, object] = {}
    stop = threading.Event()
    killer = threading.Thread(target=_kill_a_busy_worker, args=(cluster_client, killed, stop))
    killer.start()
    try:
        summary = cv_flow(config)
    finally:
        stop.set()
        killer.join(timeout=30)

    assert killed, "no worker was killed: the sweep finished before any training started"
    assert any("train_fold" in key for key in killed["keys"]), killed
    table = _table(summary)
    assert sorted(table["l2_lambda"]) == lambdas, table
    assert (table["n_folds"] == FOLDS).all(), table
    assert summary["trained_folds"] == len(lambdas) * FOLDS, summary
    # The nanny replaced the killed process: the module's cluster is whole again.
    cluster_client.wait_for_workers(N_WORKERS, timeout=120)
    assert killed["pid"] not in cluster_client.run(os.getpid).values(), killed


# ------------------------------------------------------------------------------ LocalCluster


@pytest.mark.slow
@pytest.mark.server
def test_the_local_cluster_listens_on_loopback_only(prefect_api_url):
    execution = ExecutionConfig(runner="dask", workers=2)
    before = _listening(_tree(os.getpid()))

    with task_runner(execution, DataConfig(dataset="mnist-sample")) as runner:
        assert type(runner).__name__ == "DaskTaskRunner", type(runner)
        runner.submit(task(blas_threads), {}).result()  # the cluster starts with a first task
        opened = _listening(_tree(os.getpid())) - before

    assert opened, "the local cluster listens nowhere: nothing was checked"
    exposed = {(host, port) for host, port in opened if host != "127.0.0.1"}
    assert not exposed, f"the local cluster listens beyond loopback: {exposed}"


@pytest.mark.slow
@pytest.mark.server
def test_the_local_cluster_runs_the_sweep_like_threads(
    thread_table, prefect_api_url, tmp_path, tracking_uri, sample_flow_config
):
    config = _dask_config(sample_flow_config, tmp_path, tracking_uri, **{"execution.workers": 2})

    summary = cv_flow(config)

    assert summary["trained_folds"] == TRAININGS, summary
    pd.testing.assert_frame_equal(_table(summary), thread_table)


# ------------------------------------------------------------------------------ unreachable


def test_an_unreachable_scheduler_is_one_line_before_anything_is_created(
    cli, monkeypatch, tmp_path, dead_endpoint, prefect_api_url
):
    closed = f"tcp://127.0.0.1:{dead_endpoint('closed').port}"
    # The session's Prefect API: the command launches no temporary server.
    monkeypatch.setenv("PREFECT_API_URL", prefect_api_url)
    store = tmp_path / "store" / "mlflow.db"

    code, out, err = cli(
        ["cv", "--preset", "quick", "--runner", "dask", "--dask-address", closed,
         "--tracking-uri", f"sqlite:///{store}", "--no-progress",
         "--set", f"execution.cache_dir={tmp_path / 'cache'}"]
    )  # fmt: skip

    assert code == 2, (code, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line: {err!r}"
    assert lines[0].startswith(f"error: no Dask scheduler reachable at {closed} ("), lines[0]
    assert "Traceback" not in out + err, err
    assert not (tmp_path / "cache").exists(), "a cache folder for a run that never started"
    assert not store.parent.exists(), "an MLflow store for a run that never started"
