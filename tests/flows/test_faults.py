"""Numerical and process faults injected for real: divergence, a worker killed with SIGKILL."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from flows.pipeline_flow import cv_flow
from pipeline.config import build_config
from pipeline.errors import PipelineError

pytestmark = pytest.mark.slow


def sample_config(tmp_path: Path, tracking_uri: str, **extra):
    overrides = {
        "data.dataset": "mnist-sample",
        "model.hidden_sizes": [32],
        "training.epochs": 2,
        "training.lr": 0.1,
        "cv.folds": 2,
        "execution.runner": "thread",
        "execution.workers": 2,
        "execution.cache_dir": str(tmp_path / "cache"),
        "tracking.tracking_uri": tracking_uri,
        "tracking.experiment": "faults",
    }
    overrides.update(extra)
    return build_config(overrides=overrides)


def test_diverged_lambda_is_recorded_and_left_out(
    prefect_api_url, tmp_path, tracking_uri, reliability_log
):
    # lr * lambda = 5 makes the weight decay step itself explode: lambda 50 diverges.
    config = sample_config(tmp_path, tracking_uri, **{"cv.l2_lambdas": [1e-4, 50.0]})

    summary = cv_flow(config)

    table = pd.DataFrame(summary["cv_table"]).set_index("l2_lambda")
    assert summary["best_l2_lambda"] == 1e-4, summary
    assert table.loc[50.0, "diverged_folds"] == 2, table
    assert pd.isna(table.loc[50.0, "mean_val_accuracy"]), table
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("faults")
    diverged = client.search_runs([experiment.experiment_id], "tags.diverged = 'true'")
    assert sorted(float(r.data.params["l2_lambda"]) for r in diverged) == [50.0, 50.0]
    assert all(r.info.status == "FINISHED" for r in diverged)
    reliability_log("one lambda diverges (lr x lambda = 5)", survived=True, results_lost=0)


def test_every_lambda_diverging_fails_with_advice(
    prefect_api_url, tmp_path, tracking_uri, reliability_log
):
    config = sample_config(tmp_path, tracking_uri, **{"cv.l2_lambdas": [50.0, 100.0]})

    with pytest.raises(PipelineError, match="smaller training.lr"):
        cv_flow(config)

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("faults")
    parent = client.search_runs([experiment.experiment_id], "tags.stage = 'pipeline'")[0]
    assert parent.info.status == "FAILED", parent.info
    assert "diverged" in parent.data.tags.get("error", ""), parent.data.tags
    reliability_log("every lambda diverges: clean failure with advice", survived=True)


def _finished_cv_runs(client: MlflowClient) -> int:
    experiment = client.get_experiment_by_name("faults")
    if experiment is None:
        return 0
    runs = client.search_runs([experiment.experiment_id], "tags.stage = 'cv'")
    return sum(run.info.status == "FINISHED" for run in runs)


def _process_sweep_args(data_dir: Path, tmp_path: Path, tracking_uri: str, epochs: int):
    """`mlp-pipeline cv` of 6 trainings (3 lambdas x 2 folds, 15,000 images) in 2 pool workers."""
    return [
        "cv", "--dataset", "mnist", "--data-dir", str(data_dir), "--limit-train", "30000",
        "--hidden", "64", "--epochs", str(epochs), "--l2-grid", "1e-4,1e-3,1e-2", "--folds", "2",
        "--runner", "process", "--workers", "2", "--tracking-uri", tracking_uri,
        "--experiment", "faults", "--no-progress",
        "--set", f"execution.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip


def _start_and_kill_a_worker(args, env, tmp_path, ready, pool_workers, reaped):
    """Start ``mlp-pipeline ARGS``; once ``ready()``, SIGKILL one of its pool workers."""
    pipeline = reaped(
        subprocess.Popen(
            [sys.executable, "-m", "flows.cli", *args],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    )
    deadline = time.monotonic() + 180
    while not ready(pipeline):
        assert pipeline.poll() is None, pipeline.communicate()
        assert time.monotonic() < deadline, "the sweep did not get under way in time"
        time.sleep(0.2)
    workers = pool_workers(pipeline.pid)
    assert workers, "no worker processes found"
    os.kill(workers[0], signal.SIGKILL)
    return pipeline


def test_worker_killed_mid_sweep_is_retried(
    prefect_api_url, tmp_path, tracking_uri, shared_data_dir, pool_workers, reliability_log, reaped
):
    args = _process_sweep_args(shared_data_dir, tmp_path, tracking_uri, epochs=3)
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url}
    # Wait until the sweep is under way (a first fold recorded), then SIGKILL a pool worker.
    client = MlflowClient(tracking_uri=tracking_uri)
    pipeline = _start_and_kill_a_worker(
        args, env, tmp_path, lambda _: _finished_cv_runs(client) > 0, pool_workers, reaped
    )
    stdout, stderr = pipeline.communicate(timeout=600)

    assert pipeline.returncode == 0, stderr[-3000:]
    assert "worker pool restarted 1 time" in stdout, stdout + stderr[-3000:]
    experiment = client.get_experiment_by_name("faults")
    cv_runs = client.search_runs([experiment.experiment_id], "tags.stage = 'cv'", max_results=50)
    pairs = sorted((float(r.data.params["l2_lambda"]), int(r.data.params["fold"])) for r in cv_runs)
    assert pairs == sorted((lam, f) for lam in (1e-4, 1e-3, 1e-2) for f in (0, 1)), pairs
    parent = client.search_runs([experiment.experiment_id], "tags.stage = 'pipeline'")[0]
    assert parent.info.status == "FINISHED"
    reliability_log("worker process SIGKILL mid-sweep", survived=True, results_lost=6 - len(pairs))

    # The same sweep without a fault (a fresh cache: it really trains) gives the same table.
    reference = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args[:-1], f"execution.cache_dir={tmp_path / 'ref'}",
         "--runner", "thread"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert reference.returncode == 0, reference.stderr[-3000:]
    table_of = {}
    for run in client.search_runs([experiment.experiment_id], "tags.stage = 'pipeline'"):
        artifact = client.download_artifacts(run.info.run_id, "cv_results.csv", str(tmp_path))
        table_of[run.data.params["execution.runner"]] = pd.read_csv(artifact)
    pd.testing.assert_frame_equal(table_of["process"], table_of["thread"])


def test_worker_deaths_beyond_the_retries_fail_in_one_line(
    prefect_api_url,
    tmp_path,
    tracking_uri,
    shared_data_dir,
    pool_workers,
    reliability_log,
    reaped,
    cpu_seconds,
):
    # No restart allowed. Trainings of 600 epochs (over 30 CPU-s each): a worker dies mid-training.
    args = [
        *_process_sweep_args(shared_data_dir, tmp_path, tracking_uri, epochs=600),
        "--set", "execution.retries=0",
    ]  # fmt: skip
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url}

    def training(pipeline) -> bool:  # both workers a CPU-second into their trainings
        busy = 0
        for worker in pool_workers(pipeline.pid):
            with contextlib.suppress(OSError):
                busy += cpu_seconds(worker) >= 1.0
        return busy == 2

    pipeline = _start_and_kill_a_worker(args, env, tmp_path, training, pool_workers, reaped)
    stdout, stderr = pipeline.communicate(timeout=300)

    # 1, not 2: a dying worker is no bad input.
    assert pipeline.returncode == 1, f"exit {pipeline.returncode}: {stderr[-3000:]}"
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got: {stderr[-3000:]}"
    assert lines[0].startswith("error: a worker process died 1 time ("), lines[0]
    # Killed a CPU-second into trainings of over 30: none had finished.
    assert lines[0].endswith("); 6 trainings unfinished"), lines[0]
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("faults")
    runs = client.search_runs([experiment.experiment_id], max_results=50)
    assert "RUNNING" not in {run.info.status for run in runs}, [r.info for r in runs]
    parent = [run for run in runs if run.data.tags.get("stage") == "pipeline"]
    assert len(parent) == 1 and parent[0].info.status == "FAILED", [r.info for r in parent]
    assert "a worker process died" in parent[0].data.tags.get("error", ""), parent[0].data.tags
    reliability_log("worker process SIGKILL with no retries left: clean failure", survived=True)


def test_pool_workers_end_when_the_pipeline_is_killed_outright(
    prefect_api_url, tmp_path, tracking_uri, shared_data_dir, pool_workers, reaped
):
    """SIGKILL (the OOM killer) runs no cleanup: the workers must notice and end themselves."""
    args = _process_sweep_args(shared_data_dir, tmp_path, tracking_uri, epochs=300)
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url}
    pipeline = reaped(
        subprocess.Popen(
            [sys.executable, "-m", "flows.cli", *args], cwd=tmp_path, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while len(workers := pool_workers(pipeline.pid)) < 2:
        assert pipeline.poll() is None, "the pipeline ended before its pool started"
        assert time.monotonic() < deadline, "the pool never started"
        time.sleep(0.2)

    # Act
    pipeline.kill()
    pipeline.wait(timeout=30)

    # Assert: the orphaned workers are gone within a few seconds (they check every second).
    deadline = time.monotonic() + 20
    while alive := [pid for pid in workers if Path(f"/proc/{pid}").exists() and _running(pid)]:
        assert time.monotonic() < deadline, f"workers {alive} outlived their pipeline"
        time.sleep(0.2)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
