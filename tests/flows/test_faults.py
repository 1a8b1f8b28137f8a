"""Faults injected for real: pool workers and the pipeline killed, diverging trainings, two
pipelines on one store, the temporary Prefect server lost mid-run.

The commands run as terminal jobs on the bundled sample; progress is read from the run record
and the fold cache (files), never from the clock. Each test logs its figures for
``benchmarks/reliability.py``.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from run_helpers import fold_cache, folds_recorded, records, rewritten, wait_for
from threadpoolctl import threadpool_limits

from pipeline.config import PipelineConfig
from pipeline.record import RunRecord, read_json
from pipeline.selection import cv_table
from pipeline.training import load_configured_dataset, train_fold

pytestmark = pytest.mark.slow

EXPERIMENT = "faults"
TRAININGS = 4  # the quick preset: 2 L2 strengths x 2 folds
# About 0.013 CPU-s an epoch on the sample (quick preset): 120 epochs are 1.6 CPU-s, long
# enough for a fault to land mid-training, short enough to train again.
EPOCHS = 120
SUMMARY = re.compile(r"trainings: (\d+) run, (\d+) reused from cache")


# ------------------------------------------------------------------------------ helpers
def _sweep_args(
    tracking_uri: str, cache: Path, runner: str, epochs: int = EPOCHS, workers: int = 2
) -> list[str]:
    """``mlp-pipeline cv`` of 4 trainings on the sample, ``workers`` at a time."""
    return [
        "cv", "--preset", "quick", "--epochs", str(epochs), "--runner", runner,
        "--workers", str(workers),
        "--tracking-uri", tracking_uri, "--experiment", EXPERIMENT, "--no-progress",
        "--set", f"execution.cache_dir={cache}",
    ]  # fmt: skip


def _env(prefect_api_url: str | None) -> dict[str, str]:
    """The test's environment with this Prefect API, or none (a temporary server per run)."""
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    if prefect_api_url:
        env["PREFECT_API_URL"] = prefect_api_url
    return env


def _alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (an exited process nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pids, what: str) -> None:
    """Fail unless every pid is gone soon (a hang guard: they end with their command)."""
    deadline = time.monotonic() + 20
    while alive := [pid for pid in pids if _alive(pid)]:
        assert time.monotonic() < deadline, f"{what} outlived the command: {alive}"
        time.sleep(0.1)


def _busy(pids: list[int], cpu_seconds, seconds: float) -> Callable[[], bool]:
    """A condition: every pid has used ``seconds`` more CPU than when this was called."""
    start = {pid: cpu_seconds(pid) for pid in pids}

    def ready() -> bool:
        with contextlib.suppress(OSError):
            return all(cpu_seconds(pid) - start[pid] >= seconds for pid in pids)
        return False

    return ready


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got: {stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def _trainings(stdout: str) -> tuple[int, int]:
    """(trained, reused) from the summary line ``trainings: N run, M reused from cache``."""
    found = SUMMARY.search(stdout)
    assert found, f"no 'trainings: N run, M reused from cache' line in the output:\n{stdout}"
    return int(found.group(1)), int(found.group(2))


def _mlflow_runs(tracking_uri: str, experiment: str = EXPERIMENT) -> list:
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} in {tracking_uri}"
    return client.search_runs([found.experiment_id], max_results=1000)


def _parents(runs: list) -> list:
    """The pipeline (parent) runs, oldest first."""
    parents = [run for run in runs if run.data.tags.get("stage") == "pipeline"]
    return sorted(parents, key=lambda run: run.info.start_time)


def _assert_nothing_running(tracking_uri: str, experiment: str = EXPERIMENT) -> None:
    statuses = [(r.info.run_name, r.info.status) for r in _mlflow_runs(tracking_uri, experiment)]
    assert not [s for s in statuses if s[1] == "RUNNING"], f"runs left RUNNING: {statuses}"


def _reference_table(record: RunRecord) -> pd.DataFrame:
    """The CV table of the record's config trained here, in this process, without a fault.

    One BLAS thread, as in a pool worker of a 2-core machine.
    """
    config = PipelineConfig.model_validate(record.run()["config"])
    dataset = load_configured_dataset(config.data)
    with threadpool_limits(limits=1):
        results = [
            train_fold(config, dataset, {"training.l2_lambda": l2_lambda}, fold)
            for l2_lambda in config.cv.l2_lambdas
            for fold in range(config.cv.folds)
        ]
    return cv_table(results)


# ------------------------------------------------------------------------------ pool workers
def test_a_killed_pool_worker_is_replaced_and_the_sweep_ends_with_the_same_table(
    tmp_path, tracking_uri, prefect_api_url, start_command, pool_workers, reliability_log
):
    cache = tmp_path / "cache"
    pipeline = start_command(
        _sweep_args(tracking_uri, cache, "process"), tmp_path, _env(prefect_api_url)
    )
    # A fold is done: the pool is up and the next trainings have started.
    wait_for(pipeline, lambda: folds_recorded(cache) >= 1, "a first fold recorded")
    workers = pool_workers(pipeline.pid)
    assert len(workers) == 2, f"pool workers of the pipeline: {workers}"
    finished = fold_cache(cache)

    os.kill(workers[0], signal.SIGKILL)  # the OOM killer, say
    stdout, stderr = pipeline.communicate(timeout=300)

    assert pipeline.returncode == 0, f"exit {pipeline.returncode}: {stderr[-3000:]}"
    assert "worker pool restarted 1 time(s)" in stdout, stdout + stderr[-3000:]
    (record,) = records(cache)
    run = record.run()
    assert run["status"] == "FINISHED", run["status"]
    assert run["summary"]["worker_restarts"] == 1, run["summary"]
    pairs = sorted((fold.l2_lambda, fold.fold) for fold in record.folds())
    assert pairs == [(1e-4, 0), (1e-4, 1), (1e-3, 0), (1e-3, 1)], pairs
    runs = _mlflow_runs(tracking_uri)
    assert [p.info.status for p in _parents(runs)] == ["FINISHED"], _parents(runs)
    children = sorted(
        (float(r.data.params["l2_lambda"]), int(r.data.params["fold"]))
        for r in runs
        if r.data.tags.get("stage") == "cv"
    )
    assert children == pairs, f"MLflow fold runs {children}, recorded {pairs}"
    retrained = rewritten(finished, cache)
    assert retrained == 0, f"{retrained} folds finished before the fault were trained again"
    # The same sweep without a fault gives the same table.
    table = record.cv()["table"].drop(columns="parameters")  # the network's size, per candidate
    pd.testing.assert_frame_equal(table, _reference_table(record), check_exact=False, rtol=1e-6)
    reliability_log(
        "pool worker SIGKILL mid-sweep: pool rebuilt, trainings resubmitted",
        survived=True,
        results_lost=TRAININGS - len(pairs),
        folds_retrained=retrained,
    )


def test_workers_dying_past_the_retries_fail_in_one_line_and_keep_the_finished_folds(
    tmp_path, tracking_uri, prefect_api_url, start_command, pool_workers, reliability_log
):
    cache = tmp_path / "cache"
    # One worker (each costs seconds to start): killed in its second training.
    args = [
        *_sweep_args(tracking_uri, cache, "process", workers=1),
        "--set", "execution.retries=0",
    ]  # fmt: skip
    pipeline = start_command(args, tmp_path, _env(prefect_api_url))
    wait_for(pipeline, lambda: folds_recorded(cache) >= 1, "a first fold recorded")
    workers = pool_workers(pipeline.pid)
    assert len(workers) == 1, f"pool workers of the pipeline: {workers}"

    os.kill(workers[0], signal.SIGKILL)
    _, stderr = pipeline.communicate(timeout=300)

    # 1, not 2: a dying worker is no bad input.
    assert pipeline.returncode == 1, f"exit {pipeline.returncode}: {stderr[-3000:]}"
    line = _one_error_line(stderr)
    (record,) = records(cache)
    recorded = len(record.folds())
    assert line.startswith("error: a worker process died 1 time ("), line
    assert line.endswith(f"); {TRAININGS - recorded} trainings unfinished"), (line, recorded)
    run = record.run()
    assert run["status"] == "FAILED", run["status"]
    assert "a worker process died" in run["error"], run["error"]
    assert len(fold_cache(cache)) == recorded >= 1, "the finished folds are cached"
    parents = _parents(_mlflow_runs(tracking_uri))
    assert [p.info.status for p in parents] == ["FAILED"], parents
    assert "a worker process died" in parents[0].data.tags.get("error", ""), parents[0].data.tags
    _assert_nothing_running(tracking_uri)
    _wait_gone(workers, "the pool workers")
    reliability_log(
        "pool worker SIGKILL with no retries left: one-line failure",
        survived=True,
        results_lost=recorded - len(fold_cache(cache)),
    )


# ------------------------------------------------------------------------------ pipeline killed
def test_a_pipeline_killed_outright_is_marked_failed_and_the_next_run_resumes(
    tmp_path, tracking_uri, prefect_api_url, start_command, cpu_seconds, reliability_log
):
    cache = tmp_path / "cache"
    args = _sweep_args(tracking_uri, cache, "thread", epochs=200)
    first = start_command(args, tmp_path, _env(prefect_api_url))
    wait_for(first, lambda: folds_recorded(cache) >= 1, "a first fold recorded")
    wait_for(first, _busy([first.pid], cpu_seconds, 0.5), "the next trainings under way")

    first.kill()  # SIGKILL: no handler runs, the record and the MLflow runs stay RUNNING
    first.communicate(timeout=60)
    finished = fold_cache(cache)  # nothing writes there any more
    (dead,) = records(cache)
    raw = read_json(dead.folder / "run.json", "run")
    (dead_parent,) = _parents(_mlflow_runs(tracking_uri))
    assert (raw["status"], dead_parent.info.status) == ("RUNNING", "RUNNING"), "premise"
    assert dead.run()["status"] == "FAILED", "a record left RUNNING by a dead process reads FAILED"
    assert dead.run()["error"] == "the process ended without closing the run", dead.run()
    assert 1 <= len(finished) < TRAININGS, f"{len(finished)} folds finished before the kill"

    second = start_command(args, tmp_path, _env(prefect_api_url))
    stdout, stderr = second.communicate(timeout=300)

    assert second.returncode == 0, f"exit {second.returncode}: {stderr[-3000:]}"
    trained, reused = _trainings(stdout)
    assert reused == len(finished), f"{reused} reused, {len(finished)} had finished: {stdout}"
    assert trained + reused == TRAININGS, stdout
    retrained = rewritten(finished, cache)
    assert retrained == 0, f"{retrained} finished folds were trained again"
    parents = _parents(_mlflow_runs(tracking_uri))
    assert [p.info.run_id for p in parents][0] == dead_parent.info.run_id, parents
    assert [p.info.status for p in parents] == ["FAILED", "FINISHED"], parents
    tags = parents[0].data.tags
    assert tags.get("error") == "the process ended without closing the run", tags
    assert (tags.get("pid"), tags.get("host")) == (str(raw["pid"]), raw["host"]), tags
    reliability_log(
        "pipeline SIGKILL mid-sweep, then the same command again",
        survived=True,
        results_lost=len(finished) - min(reused, len(finished)),
        folds_retrained=retrained,
    )


def test_pool_workers_end_when_the_pipeline_is_killed_outright(
    tmp_path,
    tracking_uri,
    prefect_api_url,
    start_command,
    pool_workers,
    cpu_seconds,
    reliability_log,
):
    # Trainings of about 4 CPU-s: a worker that goes on with its training after the kill shows.
    cache = tmp_path / "cache"
    args = _sweep_args(tracking_uri, cache, "process", epochs=300, workers=1)
    pipeline = start_command(args, tmp_path, _env(prefect_api_url))
    wait_for(pipeline, lambda: folds_recorded(cache) >= 1, "a first fold recorded")
    workers = pool_workers(pipeline.pid)
    assert len(workers) == 1, f"pool workers of the pipeline: {workers}"
    wait_for(pipeline, _busy(workers, cpu_seconds, 0.3), "the next trainings under way")
    at_kill = {worker: cpu_seconds(worker) for worker in workers}

    pipeline.kill()
    pipeline.wait(timeout=30)

    # Like a signal, the kill must end their trainings within an epoch or so; and a worker
    # that sits alive with its CPU time unchanged for 2 s is idle: it would wait forever.
    deadline = time.monotonic() + 60  # a hang guard
    changed = {worker: (time.monotonic(), used) for worker, used in at_kill.items()}
    while alive := [worker for worker in workers if _alive(worker)]:
        for worker in alive:
            with contextlib.suppress(OSError):
                used = cpu_seconds(worker)
                spent = used - at_kill[worker]
                assert spent < 1.0, f"worker {worker} trained on: {spent:.2f} CPU-s after the kill"
                since, seen = changed[worker]
                if used != seen:
                    changed[worker] = (time.monotonic(), used)
                else:
                    assert time.monotonic() - since < 2.0, f"worker {worker} idles, alive"
        assert time.monotonic() < deadline, f"workers {alive} outlived their pipeline"
        time.sleep(0.05)
    reliability_log("pipeline SIGKILL: its pool workers end too", survived=True)


# ------------------------------------------------------------------------------ divergence
def test_a_diverged_l2_strength_is_recorded_and_left_out_of_the_choice(
    tmp_path, tracking_uri, prefect_api_url, cli, reliability_log
):
    # lr 0.1 x lambda 50 = 5: the weight-decay step alone blows the weights up.
    cache = tmp_path / "cache"
    code, out, err = cli([
        "cv", "--preset", "quick", "--epochs", "2", "--l2-grid", "1e-4,50", "--tracking-uri",
        tracking_uri, "--experiment", EXPERIMENT, "--no-progress",
        "--set", f"execution.cache_dir={cache}",
    ])  # fmt: skip

    assert code == 0, f"exit {code}: {err}"
    (record,) = records(cache)
    diverged = [fold for fold in record.folds() if fold.diverged]
    assert sorted((f.l2_lambda, f.fold) for f in diverged) == [(50.0, 0), (50.0, 1)], diverged
    assert all(math.isnan(f.val_accuracy) and math.isnan(f.val_loss) for f in diverged), diverged
    assert all("diverged" in f.message for f in diverged), [f.message for f in diverged]
    cv = record.cv()
    assert cv["best_l2_lambda"] == 1e-4, cv["best_l2_lambda"]
    table = cv["table"].set_index("l2_lambda")
    assert table.loc[50.0, "diverged_folds"] == 2, table
    assert pd.isna(table.loc[50.0, "mean_val_accuracy"]), table
    assert table.loc[1e-4, "diverged_folds"] == 0, table
    runs = _mlflow_runs(tracking_uri)
    tagged = [r for r in runs if r.data.tags.get("diverged") == "true"]
    assert sorted(float(r.data.params["l2_lambda"]) for r in tagged) == [50.0, 50.0], tagged
    assert {r.info.status for r in tagged} == {"FINISHED"}, [r.info for r in tagged]
    assert all(math.isnan(r.data.metrics["fold_val_accuracy"]) for r in tagged), tagged
    (parent,) = _parents(runs)
    assert parent.data.metrics["best_l2_lambda"] == 1e-4, parent.data.metrics
    assert parent.info.status == "FINISHED", parent.info.status
    reliability_log(
        "one L2 strength diverges (lr x lambda = 5): recorded, left out",
        survived=True,
        results_lost=TRAININGS - len(record.folds()),
    )


def test_every_l2_strength_diverging_is_a_one_line_error(
    tmp_path, tracking_uri, prefect_api_url, cli, reliability_log
):
    cache = tmp_path / "cache"
    code, out, err = cli([
        "cv", "--preset", "quick", "--epochs", "2", "--l2-grid", "50,100", "--tracking-uri",
        tracking_uri, "--experiment", EXPERIMENT, "--no-progress",
        "--set", f"execution.cache_dir={cache}",
    ])  # fmt: skip

    assert code == 2, f"exit {code}: {err}"
    line = _one_error_line(err)
    assert line.startswith("error: every candidate diverged"), line
    assert "smaller training.lr" in line, line
    (record,) = records(cache)
    run = record.run()
    assert run["status"] == "FAILED", run["status"]
    assert "diverged" in run["error"], run["error"]
    assert len(record.folds()) == TRAININGS, "the diverged folds are recorded all the same"
    (parent,) = _parents(_mlflow_runs(tracking_uri))
    assert parent.info.status == "FAILED", parent.info.status
    assert "diverged" in parent.data.tags.get("error", ""), parent.data.tags
    _assert_nothing_running(tracking_uri)
    reliability_log("every L2 strength diverges: one-line error with advice", survived=True)


# ------------------------------------------------------------------------------ two at once
def test_two_pipelines_at_once_on_one_store_both_complete_and_crown_the_better(
    tmp_path, tracking_uri, prefect_api_url, start_command, reliability_log
):
    def args(seed: int) -> list[str]:
        return [
            "run", "--preset", "quick", "--epochs", "2", "--final-epochs", "2",
            "--seed", str(seed), "--tracking-uri", tracking_uri, "--experiment", "concurrent",
            "--no-progress", "--set", f"execution.cache_dir={tmp_path / f'cache-{seed}'}",
        ]  # fmt: skip

    first = start_command(args(0), tmp_path, _env(prefect_api_url))
    second = start_command(args(1), tmp_path, _env(prefect_api_url))
    assert first.poll() is None, "premise: the two runs overlap"
    outputs = [first.communicate(timeout=300), second.communicate(timeout=300)]

    for process, (_, stderr) in zip((first, second), outputs, strict=True):
        assert process.returncode == 0, f"exit {process.returncode}: {stderr[-3000:]}"
    runs = _mlflow_runs(tracking_uri, "concurrent")
    parents = _parents(runs)
    assert [p.info.status for p in parents] == ["FINISHED", "FINISHED"], parents
    assert len({p.data.tags["mlp_pipeline.record_id"] for p in parents}) == 2, "two records"
    for parent in parents:
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        stages = sorted(r.data.tags["stage"] for r in children)
        assert stages == ["cv"] * TRAININGS + ["final"], stages
        assert "test_accuracy" in parent.data.metrics, parent.data.metrics
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    versions = client.search_model_versions("name = 'mlp-mnist-sample'")
    assert len(versions) == 2, versions
    assert {v.run_id for v in versions} == {p.info.run_id for p in parents}, versions
    # Registrations take turns: the second compares with the first, whichever came first.
    champion = client.get_model_version_by_alias("mlp-mnist-sample", "champion")
    best = max(float(v.tags["test_accuracy"]) for v in versions)
    assert float(champion.tags["test_accuracy"]) == best, [v.tags for v in versions]
    later = max(versions, key=lambda v: int(v.version))
    assert "champion_comparison" in later.tags, "the second registration saw the first"
    database = tracking_uri.removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(database)) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    reliability_log("two pipelines at once on one SQLite store", survived=True, results_lost=0)


# ------------------------------------------------------------------------------ Prefect server
@pytest.mark.server
def test_the_temporary_prefect_server_lost_mid_run_is_one_line_and_no_hang(
    tmp_path, tracking_uri, start_command, child_processes, reliability_log
):
    cache = tmp_path / "cache"
    pipeline = start_command(
        _sweep_args(tracking_uri, cache, "thread", epochs=30), tmp_path, _env(None)
    )
    wait_for(pipeline, lambda: any(cache.glob("runs/*/run.json")), "the flow's record")
    servers = [pid for pid, cmdline in child_processes(pipeline.pid) if "server start" in cmdline]
    assert len(servers) == 1, f"the temporary Prefect server: {child_processes(pipeline.pid)}"

    os.kill(servers[0], signal.SIGKILL)  # the OOM killer, say
    (record,) = records(cache)
    wait_for(pipeline, lambda: record.run()["status"] != "RUNNING", "the record closed")
    # No hang: what is left after the record is closed takes seconds, not Prefect's retries.
    _, stderr = pipeline.communicate(timeout=20)

    assert pipeline.returncode == 1, f"exit {pipeline.returncode}: {stderr[-3000:]}"
    line = _one_error_line(stderr)
    assert line.startswith("error: the temporary Prefect server stopped during the run"), line
    assert "run the command again to resume" in line, line
    assert len(fold_cache(cache)) == len(record.folds()), "every finished fold is cached"
    _assert_nothing_running(tracking_uri)
    reliability_log(
        "the temporary Prefect server SIGKILLed mid-run: one line, no hang",
        survived=True,
        results_lost=len(record.folds()) - len(fold_cache(cache)),
    )
