"""The MLflow tracking server unreachable at start, and lost in the middle of a run.

At start: one line, exit 2, before any training or record. Mid-run: the trainings go on, the
run record keeps everything, the command exits 3 naming ``mlp-pipeline publish <folder>``, and
that command completes the MLflow record once the server is back, without duplicates.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.record import RunRecord
from pipeline.tracking.model import logged_model

pytestmark = pytest.mark.slow

EXPERIMENT = "lost"
TRAININGS = 4  # the quick preset: 2 L2 strengths x 2 folds
EPOCHS = 150  # about 2 CPU-s a training on the sample: the server dies mid-sweep


def _records(cache: Path) -> list[RunRecord]:
    root = cache / "runs"
    return [RunRecord(folder) for folder in sorted(root.iterdir())] if root.is_dir() else []


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("closed", "Connection refused"), ("hangs up", "closed connection without response")],
    ids=["closed", "hangs-up"],
)
def test_mlflow_unreachable_at_start_fails_in_one_line_before_any_training(
    kind, reason, tmp_path, prefect_api_url, cli, dead_endpoint, reliability_log
):
    # One health request, not MLflow's own retries (minutes with its defaults).
    dead = dead_endpoint(kind)
    cache = tmp_path / "cache"

    code, out, err = cli([
        "run", "--preset", "quick", "--epochs", "2", "--tracking-uri", dead.url,
        "--experiment", EXPERIMENT, "--no-progress", "--set", f"execution.cache_dir={cache}",
    ])  # fmt: skip

    assert code == 2, f"exit {code}: {err}"
    lines = _error_lines(err)
    assert len(lines) == 1, f"expected one error line, got: {err}"
    assert lines[0].startswith(f"error: MLflow tracking server {dead.url} is not reachable ("), (
        lines[0]
    )
    assert reason in lines[0], lines[0]
    assert "Traceback" not in err, err
    if kind == "hangs up":
        assert dead.connections == 1, f"{dead.connections} connections to the tracking server"
    assert _records(cache) == [], "no run record (left RUNNING or not) before the store works"
    assert not list(cache.glob("folds/*.json")), "no training before the store is known to work"
    reliability_log(
        f"MLflow server unreachable at start ({kind}): one line, no training", survived=True
    )


@pytest.mark.server
def test_mlflow_lost_mid_run_keeps_every_result_and_publish_completes_it_later(
    tmp_path,
    tracking_uri,
    prefect_api_url,
    mlflow_servers,
    start_command,
    cli,
    reliability_log,
):
    # A real server on a copy of an empty store, killed by pid once a fold's run reached it.
    server = mlflow_servers(tracking_uri, tmp_path / "server")
    cache = tmp_path / "cache"
    args = [
        "run", "--preset", "quick", "--epochs", str(EPOCHS), "--final-epochs", "5",
        "--runner", "thread", "--workers", "2", "--tracking-uri", server.url,
        "--experiment", EXPERIMENT, "--no-progress", "--set", f"execution.cache_dir={cache}",
    ]  # fmt: skip
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    # Fewer and shorter HTTP retries than the command's own bound (3, 20 s): the same path.
    env.update(
        PREFECT_API_URL=prefect_api_url,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
        MLFLOW_HTTP_REQUEST_TIMEOUT="5",
    )
    pipeline = start_command(args, tmp_path, env)
    client = MlflowClient(tracking_uri=server.url, registry_uri=server.url)

    def fold_published() -> bool:
        experiment = client.get_experiment_by_name(EXPERIMENT)
        if experiment is None:  # the command is still starting
            return False
        # A fold's run reaches the server when its training starts: killed then, the server
        # leaves that run RUNNING, and the sweep is surely under way.
        return bool(client.search_runs([experiment.experiment_id], "tags.stage = 'cv'"))

    deadline = time.monotonic() + 300  # a hang guard
    while not fold_published():
        assert pipeline.poll() is None, f"the run ended first: {pipeline.communicate()}"
        assert time.monotonic() < deadline, "no fold reached the server"
        time.sleep(0.2)
    folds_at_kill = len(list(cache.glob("runs/*/folds/*.json")))
    server.kill()  # SIGKILL, by pid: gone for good, mid-sweep

    stdout, stderr = pipeline.communicate(timeout=300)

    assert pipeline.returncode == 3, f"exit {pipeline.returncode}: {stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    (record,) = _records(cache)
    assert f"mlp-pipeline publish {record.folder}" in stderr, stderr[-3000:]
    errors = [line for line in _error_lines(stderr) if line.startswith("error:")]
    assert len(errors) == 1 and str(record.folder) in errors[0], stderr[-3000:]
    # The trainings went on: the record holds the whole run.
    assert folds_at_kill < TRAININGS, f"premise: the server died mid-sweep ({folds_at_kill})"
    run = record.run()
    assert run["status"] == "FINISHED", run["status"]
    folds = record.folds()
    assert len(folds) == TRAININGS, [(f.l2_lambda, f.fold) for f in folds]
    assert record.cv() is not None, "cv.json is recorded"
    final = record.final()  # checks weights.npz and normalizer.json against their SHA-256
    assert final is not None and "final/weights.npz" in final["files"], final
    # The results show all the same: the CV table, its choice and the test accuracy.
    assert "← chosen" in stdout, stdout
    assert f"test accuracy {final['evaluation']['accuracy']:.4f}" in stdout, stdout
    assert "MLflow run" not in stdout, stdout

    # The server back on the same store and port; then the command the message named.
    restarted = mlflow_servers(tracking_uri, tmp_path / "server", port=server.port)
    try:
        code, out, err = cli(["publish", str(record.folder)])

        assert code == 0, f"exit {code}: {err}"
        experiment = client.get_experiment_by_name(EXPERIMENT)
        runs = client.search_runs([experiment.experiment_id], max_results=1000)
        parents = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
        assert len(parents) == 1, f"{len(parents)} parent runs for one record"
        parent = parents[0]
        assert parent.data.tags["mlp_pipeline.record_id"] == run["id"], parent.data.tags
        assert parent.info.status == "FINISHED", parent.info.status
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        parts = sorted(r.data.tags["mlp_pipeline.part"] for r in children)
        assert len(parts) == len(set(parts)) == TRAININGS + 1, parts
        assert sorted(r.data.tags["stage"] for r in children) == ["cv"] * TRAININGS + ["final"]
        assert {r.info.status for r in runs} == {"FINISHED"}, [r.info for r in runs]
        for child in children:
            if child.data.tags["stage"] == "cv":
                history = client.get_metric_history(child.info.run_id, "val_accuracy")
                steps = sorted(point.step for point in history)
                assert steps == list(range(1, EPOCHS + 1)), f"{len(steps)} points, once each"
        assert parent.data.metrics["test_accuracy"] == final["evaluation"]["accuracy"]
        versions = client.search_model_versions(f"run_id = '{parent.info.run_id}'")
        assert len(versions) == 1, versions
        model = logged_model(client, parent)
        model_files = {a.path for a in client.list_logged_model_artifacts(model.model_id)}
        assert "MLmodel" in model_files and str(model.status) == "READY", (model, model_files)
    finally:
        restarted.stop()
    reliability_log(
        "MLflow server SIGKILLed mid-run, then `mlp-pipeline publish`",
        survived=True,
        results_lost=TRAININGS - len(folds),
    )
