"""The MLflow tracking server unreachable at start, and lost in the middle of a sweep."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.slow, pytest.mark.server]

LAMBDAS = "1e-5,1e-4,1e-3,1e-2"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_mlflow_server(tmp_path: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--default-artifact-root",
            str(tmp_path / "artifacts"),
        ],  # fmt: skip
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: stop it and its workers together
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return server, url
        except OSError:
            pass
        assert server.poll() is None, "mlflow server exited"
        assert time.monotonic() < deadline, "mlflow server did not become healthy"
        time.sleep(0.5)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def _cv_args(shared_data_dir: Path, tmp_path: Path, uri: str) -> list[str]:
    return [
        "cv", "--dataset", "mnist", "--data-dir", str(shared_data_dir), "--limit-train", "12000",
        "--hidden", "64", "--epochs", "3", "--l2-grid", LAMBDAS, "--folds", "2",
        "--runner", "thread", "--workers", "1", "--tracking-uri", uri, "--experiment", "lost",
        "--no-progress", "--set", f"execution.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("closed", "Connection refused"), ("hangs up", "closed connection without response")],
    ids=["closed", "hangs-up"],
)
def test_unreachable_server_at_start_fails_before_training(
    kind, reason, shared_data_dir, prefect_api_url, tmp_path, reliability_log, dead_endpoint
):
    # Fast: one health request, not MLflow's own retries (7, exponential, up to 2 min a call).
    dead = dead_endpoint(kind)
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", *_cv_args(shared_data_dir, tmp_path, dead.url)],
        env={**os.environ, "PREFECT_API_URL": prefect_api_url},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    assert f"MLflow tracking server {dead.url} is not reachable (" in lines[0], lines[0]
    assert reason in lines[0], lines[0]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    if kind == "hangs up":
        assert dead.connections == 1, f"{dead.connections} connections to the tracking server"
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir()), (
        "no training may happen before the store is known to work"
    )
    reliability_log(
        f"MLflow server unreachable at start ({kind}): clean error, no training", survived=True
    )


def test_server_lost_mid_sweep_keeps_results_in_a_local_report(
    shared_data_dir, prefect_api_url, tmp_path, reliability_log, reaped
):
    server, url = _start_mlflow_server(tmp_path)
    try:
        pipeline = reaped(
            subprocess.Popen(
                [sys.executable, "-m", "flows.cli", *_cv_args(shared_data_dir, tmp_path, url)],
                env={**os.environ, "PREFECT_API_URL": prefect_api_url},
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        )
        client = MlflowClient(tracking_uri=url)
        deadline = time.monotonic() + 240
        while True:
            experiment = client.get_experiment_by_name("lost")
            runs = (
                client.search_runs([experiment.experiment_id], "tags.stage = 'cv'")
                if experiment
                else []
            )
            if any(run.info.status == "FINISHED" for run in runs):
                break
            assert pipeline.poll() is None, pipeline.communicate()
            assert time.monotonic() < deadline, "no fold was recorded in time"
            time.sleep(0.3)
    finally:
        _stop(server)  # the tracking server goes away for good, mid-sweep

    stdout, stderr = pipeline.communicate(timeout=600)

    assert pipeline.returncode == 3, f"exit {pipeline.returncode}: {stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    match = re.search(r"results saved to (\S+)", stderr)
    assert match, stderr[-3000:]
    report = Path(match.group(1))
    folds = json.loads((report / "folds.json").read_text())
    pairs = sorted((f["l2_lambda"], f["fold"]) for f in folds)
    expected = sorted((float(lam), fold) for lam in LAMBDAS.split(",") for fold in (0, 1))
    assert pairs == expected, "every (lambda, fold) result must be in the report"
    summary = json.loads((report / "summary.json").read_text())
    assert len(summary["cv_table"]) == 4 and summary["best_l2_lambda"] in {1e-5, 1e-4, 1e-3, 1e-2}
    assert (report / "cv_results.csv").is_file()
    reliability_log(
        "MLflow server lost mid-sweep", survived=True, results_lost=len(expected) - len(folds)
    )


def test_credentials_never_reach_params_or_prefect(
    shared_data_dir, prefect_api_url, tmp_path, reliability_log
):
    server, url = _start_mlflow_server(tmp_path)
    secret = "s3cr3t-pa55"
    with_credentials = url.replace("http://", f"http://alice:{secret}@")
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "flows.cli",
                "cv",
                "--preset",
                "quick",
                "--epochs",
                "1",
                "--tracking-uri",
                with_credentials,
                "--experiment",
                "secrets",
                "--no-progress",
                "--set",
                f"execution.cache_dir={tmp_path / 'cache'}",
            ],  # fmt: skip
            env={**os.environ, "PREFECT_API_URL": prefect_api_url},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert secret not in result.stdout + result.stderr
        client = MlflowClient(tracking_uri=url)
        experiment = client.get_experiment_by_name("secrets")
        for run in client.search_runs([experiment.experiment_id], max_results=50):
            recorded = json.dumps([run.data.params, run.data.tags])
            assert secret not in recorded, "a credential reached MLflow params or tags"
        parent = client.search_runs([experiment.experiment_id], "tags.stage = 'pipeline'")[0]
        flow_run_id = parent.data.tags["prefect.flow_run_id"]
    finally:
        _stop(server)

    with urllib.request.urlopen(f"{prefect_api_url}/flow_runs/{flow_run_id}", timeout=10) as r:
        flow_run = json.loads(r.read())
    assert secret not in json.dumps(flow_run["parameters"]), "a credential reached Prefect"
    assert flow_run["parameters"]["config"]["tracking"]["tracking_uri"] == url
    reliability_log("tracking URI with credentials: kept out of MLflow and Prefect", survived=True)
