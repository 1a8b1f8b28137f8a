"""A real interruption: SIGTERM to `mlp-pipeline cv` mid-sweep, then a resuming re-run."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

EXPERIMENT = "interrupt-test"
# Epochs of the resumed sweeps (4,000 training images a fold): over a CPU-second of training
# each, so the 6 trainings left after the second finished fold outlast the wait for it by far
# and the signal lands mid-sweep. With 3 epochs (0.06 CPU-s) the sweep could finish first.
RESUMED_EPOCHS = 60
TRAININGS = re.compile(r"trainings: (\d+) run, (\d+) reused from cache")


def _wait_for(process: subprocess.Popen, ready, what: str) -> None:
    """Block until ``ready()``, failing if the run ends first or 240 s pass."""
    deadline = time.monotonic() + 240
    while not ready():
        assert process.poll() is None, f"ended before the interruption: {process.communicate()}"
        assert time.monotonic() < deadline, f"{what} did not happen in time"
        time.sleep(0.2)


def _wait_for_folds(process: subprocess.Popen, client: MlflowClient, count: int) -> None:
    """Block until ``count`` folds are recorded FINISHED, failing if the run ends first."""
    _wait_for(process, lambda: _finished_cv_runs(client) >= count, f"{count} folds finished")


def _sweep_args(
    data_dir: Path, tracking_uri: str, cache: Path, runner="thread", workers=1, n=8000, epochs=3
) -> list[str]:
    """`mlp-pipeline cv` of 8 trainings (4 lambdas x 2 folds) on ``n`` real MNIST images."""
    return [
        "cv", "--dataset", "mnist", "--data-dir", str(data_dir), "--limit-train", str(n),
        "--hidden", "64", "--epochs", str(epochs), "--l2-grid", "1e-5,1e-4,1e-3,1e-2",
        "--folds", "2",
        "--runner", runner, "--workers", str(workers), "--tracking-uri", tracking_uri,
        "--experiment", EXPERIMENT, "--set", f"execution.cache_dir={cache}", "--no-progress",
    ]  # fmt: skip


def _cli(args: list[str], cwd: Path, env: dict[str, str], reaped) -> subprocess.Popen:
    """``mlp-pipeline ARGS`` in its own session and process group, like a terminal job.

    A Ctrl-C reaches the whole group; the test's end kills the group (``reaped``).
    """
    return reaped(
        subprocess.Popen(
            [sys.executable, "-m", "flows.cli", *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    )


def _trainings(stdout: str) -> tuple[int, int]:
    """(trained, reused) from the summary line ``trainings: N run, M reused from cache``."""
    found = TRAININGS.search(stdout)
    assert found, f"no 'trainings: N run, M reused from cache' line in the output:\n{stdout}"
    return int(found.group(1)), int(found.group(2))


def _wait_for_training(
    process: subprocess.Popen, cpu_seconds, units, count: int, seconds: float = 2.0
) -> None:
    """Block until ``count`` of ``units()`` ((pid, thread or None) pairs) have each used
    ``seconds`` more CPU time than when this was called: trainings well into their epochs.

    An epoch of 10,000 images takes about 0.05 CPU-s here: 2 CPU-s are dozens of epochs, and
    more than anything else in the run uses in one thread or pool worker meanwhile.
    """

    def used() -> dict:
        found = {}
        with contextlib.suppress(OSError):  # the process ended: _wait_for reports it
            for unit in units():
                with contextlib.suppress(OSError):
                    found[unit] = cpu_seconds(*unit)
        return found

    start = used()

    def busy() -> int:
        # A unit seen for the first time started after the wait began: all its time counts.
        return sum(cpu - start.get(unit, 0.0) >= seconds for unit, cpu in used().items())

    _wait_for(process, lambda: busy() >= count, f"{count} trainings {seconds} CPU-s in")


def _threads(pid: int) -> list[tuple[int, int]]:
    """(pid, thread id) of every thread of a process: the thread runner trains in them."""
    return [(pid, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")]


def _processes(pids: list[int]) -> list[tuple[int, None]]:
    """(pid, None) of pool workers: each trains in its own process."""
    return [(pid, None) for pid in pids]


def _finished_cv_runs(client: MlflowClient) -> int:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return 0
    runs = client.search_runs([experiment.experiment_id], "tags.stage = 'cv'", max_results=100)
    return sum(run.info.status == "FINISHED" for run in runs)


def _train_fold_runs(client: MlflowClient) -> list:
    """Prefect's ``train_fold`` task runs in the flow run behind the experiment's parent run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    experiment = client.get_experiment_by_name(EXPERIMENT)
    parents = (
        client.search_runs([experiment.experiment_id], "tags.stage = 'pipeline'")
        if experiment
        else []
    )
    if not parents:
        return []
    flow_run_id = parents[0].data.tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as prefect:
        runs = prefect.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return [run for run in runs if run.name.startswith("train_fold")]


@pytest.mark.parametrize(("runner", "workers"), [("process", 2), ("thread", 1)])
def test_interrupt_stops_running_trainings_at_their_next_epoch(
    runner,
    workers,
    shared_data_dir,
    prefect_api_url,
    tmp_path,
    tracking_uri,
    reliability_log,
    reaped,
    cpu_seconds,
    pool_workers,
):
    # Trainings of about a minute each (600 epochs on 10,000 images): without the stop flag,
    # closing the runner would wait for them, and they would end Completed (and be cached).
    cache = tmp_path / "cache"
    args = _sweep_args(
        shared_data_dir, tracking_uri, cache, runner=runner, workers=workers, n=20000, epochs=600
    )
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url}
    client = MlflowClient(tracking_uri=tracking_uri)
    pipeline = _cli(args, tmp_path, env, reaped)
    _wait_for(
        pipeline,
        lambda: sum(run.state_name == "Running" for run in _train_fold_runs(client)) >= workers,
        f"{workers} trainings running",
    )

    def units() -> list:  # where the trainings run: pool workers, or the pipeline's threads
        if runner == "process":
            return _processes(pool_workers(pipeline.pid))
        return _threads(pipeline.pid)

    _wait_for_training(pipeline, cpu_seconds, units, count=workers)  # dozens of epochs in

    pipeline.send_signal(signal.SIGTERM)
    _, stderr = pipeline.communicate(timeout=120)

    assert pipeline.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "TrainingStopped" not in stderr, stderr[-2000:]
    # The server records task-run states from the workers' events, shortly after they happen.
    deadline = time.monotonic() + 30
    while "Running" in (states := [run.state_name for run in _train_fold_runs(client)]):
        assert time.monotonic() < deadline, states
        time.sleep(0.2)
    runs = _train_fold_runs(client)
    assert "Completed" not in states, states
    stopped = [run for run in runs if "training stopped" in (run.state.message or "")]
    assert len(stopped) >= workers, [(run.state_name, run.state.message) for run in runs]
    # The running ones stopped between two epochs, mid-training.
    mid_training = [run for run in stopped if "training stopped after epoch" in run.state.message]
    assert len(mid_training) >= workers, [(run.state_name, run.state.message) for run in runs]
    statuses = _statuses(client)
    assert "RUNNING" not in statuses, statuses
    reliability_log(
        f"SIGTERM mid-training ({runner} runner): running trainings stop at their next epoch",
        survived=True,
        results_lost=0,
    )


def test_sigterm_ends_runs_killed_and_rerun_resumes(
    shared_data_dir, prefect_api_url, tmp_path, tracking_uri, reliability_log, reaped
):
    args = _sweep_args(shared_data_dir, tracking_uri, tmp_path / "cache", epochs=RESUMED_EPOCHS)
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url}
    client = MlflowClient(tracking_uri=tracking_uri)

    first = _cli(args, tmp_path, env, reaped)
    _wait_for_folds(first, client, 2)
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=120)
    finished_before = _finished_cv_runs(client)

    assert first.returncode == 130, f"exit {first.returncode}: {stderr[-2000:]}"
    assert "Traceback" not in stderr, stderr[-2000:]
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    statuses = {run.info.status for run in runs}
    assert "RUNNING" not in statuses, statuses
    parent = [r for r in runs if r.data.tags.get("stage") == "pipeline"][0]
    assert parent.info.status == "KILLED", parent.info
    assert 2 <= finished_before < 8, finished_before

    second = _cli(args, tmp_path, env, reaped)
    stdout, stderr = second.communicate(timeout=600)
    assert second.returncode == 0, stderr[-2000:]
    # Every fold that finished before the interruption is reused, not retrained.
    trained, reused = _trainings(stdout)
    assert reused >= finished_before, (reused, finished_before, stdout)
    assert trained + reused == 8, stdout
    reliability_log(
        "SIGTERM mid-sweep (thread runner), then re-run",
        survived=True,
        results_lost=8 - (trained + reused),
        folds_retrained=max(0, finished_before - reused),
    )


def test_sigkill_then_rerun_resumes_and_marks_the_dead_run_failed(
    shared_data_dir, prefect_api_url, tmp_path, tracking_uri, reliability_log, reaped
):
    args = _sweep_args(shared_data_dir, tracking_uri, tmp_path / "cache", epochs=RESUMED_EPOCHS)
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url}
    client = MlflowClient(tracking_uri=tracking_uri)

    first = _cli(args, tmp_path, env, reaped)
    _wait_for_folds(first, client, 2)
    first.kill()  # SIGKILL: no handler runs, the MLflow runs stay RUNNING
    first.communicate(timeout=60)
    finished_before = _finished_cv_runs(client)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    dead_parent = client.search_runs([experiment.experiment_id], "tags.stage = 'pipeline'")[0]
    assert dead_parent.info.status == "RUNNING", dead_parent.info

    second = _cli(args, tmp_path, env, reaped)
    stdout, stderr = second.communicate(timeout=600)

    assert second.returncode == 0, stderr[-2000:]
    trained, reused = _trainings(stdout)
    assert trained + reused == 8, stdout
    assert trained <= 8 - finished_before, (trained, finished_before, stdout)
    assert client.get_run(dead_parent.info.run_id).info.status == "FAILED", (
        "the next execution marks runs left RUNNING by a dead process FAILED"
    )
    reliability_log(
        "pipeline process SIGKILL mid-sweep, then re-run",
        survived=True,
        results_lost=8 - (trained + reused),
        folds_retrained=max(0, finished_before - reused),
    )


def test_two_pipelines_at_once_share_one_store(
    prefect_api_url, tmp_path, tracking_uri, reliability_log, reaped
):
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url}
    runs = [
        _cli(
            [
                "run",
                "--preset",
                "quick",
                "--tracking-uri",
                tracking_uri,
                "--experiment",
                "concurrent",
                "--set",
                f"execution.cache_dir={tmp_path / name}",
                "--seed",
                str(seed),
                "--no-progress",
            ],  # fmt: skip
            tmp_path,
            env,
            reaped,
        )
        for seed, name in enumerate(("a", "b"))
    ]
    outputs = [run.communicate(timeout=600) for run in runs]

    for run, (_, stderr) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, stderr[-2000:]
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiment = client.get_experiment_by_name("concurrent")
    all_runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in all_runs if r.data.tags.get("stage") == "pipeline"]
    assert len(parents) == 2 and {p.info.status for p in parents} == {"FINISHED"}, parents
    for parent in parents:
        children = [
            r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
        ]
        stages = sorted(r.data.tags["stage"] for r in children)
        assert stages == ["cv"] * 4 + ["final"], stages
        assert "test_accuracy" in parent.data.metrics
    versions = client.search_model_versions("name = 'mlp-mnist-sample'")  # quick: the sample
    assert len(versions) == 2, versions
    # Registrations take turns: the second compares with the first, whichever finished first.
    champion = client.get_model_version_by_alias("mlp-mnist-sample", "champion")
    best = max(float(v.tags["test_accuracy"]) for v in versions)
    assert float(champion.tags["test_accuracy"]) == best, [v.tags for v in versions]
    second = max(versions, key=lambda v: int(v.version))
    assert "champion_comparison" in second.tags, "the second registration saw the first"
    database = tracking_uri.removeprefix("sqlite:///")
    with sqlite3.connect(database) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    reliability_log("two pipelines at once on one SQLite store", survived=True, results_lost=0)


def test_sigterm_stops_process_workers_too(
    shared_data_dir,
    prefect_api_url,
    tmp_path,
    tracking_uri,
    pool_workers,
    reliability_log,
    reaped,
    cpu_seconds,
):
    # Trainings of about a minute (as above): the signal lands while the workers train.
    args = _sweep_args(
        shared_data_dir, tracking_uri, tmp_path / "cache", runner="process", workers=2,
        n=20000, epochs=600,
    )  # fmt: skip
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url}
    client = MlflowClient(tracking_uri=tracking_uri)
    pipeline = _cli(args, tmp_path, env, reaped)
    _wait_for_training(pipeline, cpu_seconds, lambda: _processes(pool_workers(pipeline.pid)), 2)
    workers = pool_workers(pipeline.pid)
    assert len(workers) == 2, f"pool workers of the pipeline: {workers}"

    pipeline.send_signal(signal.SIGTERM)
    _, stderr = pipeline.communicate(timeout=120)

    assert pipeline.returncode == 130, stderr[-2000:]
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in workers):
        assert time.monotonic() < deadline, f"worker processes still alive: {workers}"
        time.sleep(0.2)
    statuses = _statuses(client)
    assert "RUNNING" not in statuses, statuses
    reliability_log("SIGTERM mid-sweep (process runner): workers gone", survived=True)


def _wait_for_parent_run(process: subprocess.Popen, client: MlflowClient) -> None:
    """Block until the pipeline's parent MLflow run exists: the sweep is starting."""

    def started() -> bool:
        experiment = client.get_experiment_by_name(EXPERIMENT)
        return bool(
            experiment and client.search_runs([experiment.experiment_id], "tags.stage = 'pipeline'")
        )

    _wait_for(process, started, "the sweep's start")


def _temporary_server_of(pid: int, child_processes) -> int:
    servers = [child for child, cmdline in child_processes(pid) if "uvicorn" in cmdline]
    assert servers, f"no temporary Prefect server under {pid}"
    return servers[0]


def _statuses(client: MlflowClient) -> set[str]:
    """The status of every MLflow run of the experiment."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return {r.info.status for r in client.search_runs([experiment.experiment_id])}


def _without_api() -> dict[str, str]:
    """This environment without ``PREFECT_API_URL``: the run starts its temporary server."""
    return {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}


def test_ctrl_c_in_a_terminal_ends_the_run_cleanly_on_its_temporary_server(
    shared_data_dir,
    tmp_path,
    tracking_uri,
    reliability_log,
    child_processes,
    pool_workers,
    reaped,
    cpu_seconds,
):
    # A terminal's Ctrl-C sends SIGINT to the whole foreground process group. The temporary
    # server must not die with it under the run: the run ends its Prefect and MLflow runs
    # through it, then stops it.
    args = _sweep_args(
        shared_data_dir, tracking_uri, tmp_path / "cache", runner="process", workers=2,
        n=20000, epochs=600,
    )  # fmt: skip
    client = MlflowClient(tracking_uri=tracking_uri)
    pipeline = _cli(args, tmp_path, _without_api(), reaped)
    _wait_for_parent_run(pipeline, client)
    server = _temporary_server_of(pipeline.pid, child_processes)
    # Mid-training: both pool workers have trained a while.
    _wait_for_training(pipeline, cpu_seconds, lambda: _processes(pool_workers(pipeline.pid)), 2)

    os.killpg(pipeline.pid, signal.SIGINT)
    _, stderr = pipeline.communicate(timeout=90)  # dropping nothing, it took minutes

    assert pipeline.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "Unable to connect" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "error: interrupted", stderr[-2000:]
    assert not Path(f"/proc/{server}").exists(), "the temporary server outlived the run"
    statuses = _statuses(client)
    assert "RUNNING" not in statuses, statuses
    reliability_log("Ctrl-C to the whole process group mid-sweep (temporary server)", survived=True)


def test_a_temporary_server_lost_mid_run_is_one_line_and_no_hang(
    shared_data_dir, tmp_path, tracking_uri, reliability_log, child_processes, reaped
):
    args = _sweep_args(
        shared_data_dir, tracking_uri, tmp_path / "cache", runner="thread", workers=1,
        n=8000, epochs=40,
    )  # fmt: skip
    client = MlflowClient(tracking_uri=tracking_uri)
    pipeline = _cli(args, tmp_path, _without_api(), reaped)
    _wait_for_parent_run(pipeline, client)
    os.kill(_temporary_server_of(pipeline.pid, child_processes), signal.SIGKILL)  # OOM, say

    # Before, Prefect flushed every queued event to the dead server at exit, 7 s each: minutes.
    _, stderr = pipeline.communicate(timeout=180)

    assert pipeline.returncode == 1, stderr[-2000:]
    assert (
        "error: the temporary Prefect server stopped during the run (killed by signal 9)" in stderr
    ), stderr[-3000:]
    statuses = _statuses(client)
    assert "RUNNING" not in statuses, statuses
    reliability_log("the temporary Prefect server SIGKILLed mid-run", survived=True)
