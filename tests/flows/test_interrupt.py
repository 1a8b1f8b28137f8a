"""Real signals to a real ``mlp-pipeline`` command, mid-sweep and during the final training.

Every test starts the command as a terminal job (its own session), lets it get under way on the
bundled sample, sends a real signal and checks how the run ends: exit 130 (129 after SIGHUP),
one ``error: interrupted`` line, the run record and the MLflow runs KILLED, the trainings
stopped at their next epoch (measured in CPU seconds spent after the signal, never on the
clock) and no process left behind. Running the same command again resumes from the fold cache.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient
from run_helpers import fold_cache, folds_recorded, records, rewritten, wait_for

from pipeline.record import RunRecord

pytestmark = pytest.mark.slow

EXPERIMENT = "interrupt"
# A training of the quick preset (784-64-10, 2,500 sample images a fold) costs about 0.013
# CPU-s an epoch here: 300 epochs are 3.9 CPU-s, far more than what a run spends after a signal
# (0.2 CPU-s with threads; 0.8-0.95 a pool worker: the task its pool had already queued still
# goes through Prefect's task engine before it sees the stop flag, then the worker exits), so a
# training that did not stop shows.
EPOCHS = 300
TRAININGS = 4  # quick: 2 L2 strengths x 2 folds
WORKERS = 2  # the thread runner's, and the process runner's when it resumes
SUMMARY = re.compile(r"trainings: (\d+) run, (\d+) reused from cache")
SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGHUP": signal.SIGHUP}
# CPU seconds a run may spend after the signal: every training stopped at its next epoch.
AFTER_SIGNAL_CPU = {"thread": 1.5, "process": 2.5}  # the whole process tree
AFTER_SIGNAL_CPU_PER_WORKER = 1.5


# ------------------------------------------------------------------------------ helpers
def _sweep_args(tracking_uri: str, cache: Path, runner: str, workers: int = WORKERS) -> list[str]:
    """``mlp-pipeline cv`` of 4 trainings of EPOCHS epochs on the sample, ``workers`` at a time."""
    return [
        "cv", "--preset", "quick", "--epochs", str(EPOCHS), "--runner", runner,
        "--workers", str(workers), "--tracking-uri", tracking_uri, "--experiment", EXPERIMENT,
        "--no-progress", "--set", f"execution.cache_dir={cache}",
    ]  # fmt: skip


def _descendants(pid: int, child_processes) -> dict[int, str]:
    """Every live descendant of ``pid``: pid -> command line."""
    found: dict[int, str] = {}
    parents = [pid]
    while parents:
        for child, cmdline in child_processes(parents.pop()):
            found[child] = cmdline
            parents.append(child)
    return found


def _alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (an exited process nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pids, what: str) -> None:
    """Fail unless every pid is gone soon (a hang guard: they end with the command)."""
    deadline = time.monotonic() + 20
    while alive := [pid for pid in pids if _alive(pid)]:
        assert time.monotonic() < deadline, f"{what} outlived the command: {alive}"
        time.sleep(0.1)


def _units(pid: int, runner: str, pool_workers) -> list[tuple[int, int | None]]:
    """Where the trainings run: (pid, None) per pool worker, or (pid, tid) per thread."""
    if runner == "process":
        return [(worker, None) for worker in pool_workers(pid)]
    with contextlib.suppress(OSError):
        return [(pid, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")]
    return []


def _wait_for_training(
    process, units, cpu_seconds, count: int, seconds: float, meanwhile=lambda: None
) -> None:
    """Block until ``count`` of ``units()`` have each used ``seconds`` more CPU than now."""

    def used() -> dict:
        found = {}
        for unit in units():
            with contextlib.suppress(OSError):
                found[unit] = cpu_seconds(*unit)
        return found

    start = used()

    def busy() -> bool:  # a unit seen for the first time started since: all its time counts
        return sum(cpu - start.get(unit, 0.0) >= seconds for unit, cpu in used().items()) >= count

    wait_for(process, busy, f"{count} trainings {seconds} CPU-s further", meanwhile=meanwhile)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _mlflow_runs(tracking_uri: str) -> list:
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, f"no experiment {EXPERIMENT!r} in {tracking_uri}"
    return client.search_runs([experiment.experiment_id], max_results=1000)


def _parents(runs: list) -> list:
    """The pipeline (parent) runs, oldest first."""
    parents = [run for run in runs if run.data.tags.get("stage") == "pipeline"]
    return sorted(parents, key=lambda run: run.info.start_time)


def _trainings(stdout: str) -> tuple[int, int]:
    """(trained, reused) from the summary line ``trainings: N run, M reused from cache``."""
    found = SUMMARY.search(stdout)
    assert found, f"no 'trainings: N run, M reused from cache' line in the output:\n{stdout}"
    return int(found.group(1)), int(found.group(2))


def _env(prefect_api_url: str | None) -> dict[str, str]:
    """The test's environment with this Prefect API, or none (a temporary server per run)."""
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    if prefect_api_url:
        env["PREFECT_API_URL"] = prefect_api_url
    return env


@dataclass
class Interruption:
    """What a signal left: the folds its run record holds, and the fold cache as it was then."""

    folds_recorded: int
    fold_cache: dict[str, tuple[int, int]]


def _assert_ended_interrupted(process, stderr: str, expected_code: int) -> None:
    assert process.returncode == expected_code, (
        f"exit {process.returncode}, expected {expected_code}: {stderr[-3000:]}"
    )
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and lines[-1] == "error: interrupted", f"last stderr line: {stderr[-3000:]}"
    assert sum(line.startswith("error:") for line in lines) == 1, stderr[-3000:]


def _assert_killed_everywhere(record: RunRecord, tracking_uri: str, folds: int) -> None:
    run = record.run()
    assert run["status"] == "KILLED", f"run record status {run['status']}, expected KILLED"
    assert run["error"].startswith("interrupted"), run["error"]
    runs = _mlflow_runs(tracking_uri)
    statuses = [(run.info.run_name, run.info.status) for run in runs]
    assert not [s for s in statuses if s[1] == "RUNNING"], f"runs left RUNNING: {statuses}"
    parents = _parents(runs)
    assert [p.info.status for p in parents] == ["KILLED"], f"parent runs: {statuses}"
    children = [r for r in runs if r.data.tags.get("stage") == "cv"]
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert len(finished) == folds, f"{len(finished)} finished fold runs for {folds} recorded folds"
    # The trainings the signal cut short keep the runs they had from their start, KILLED.
    assert {r.info.status for r in children} <= {"FINISHED", "KILLED"}, statuses
    assert len(children) <= TRAININGS, statuses


def _interrupt_mid_sweep(
    runner: str,
    workers: int,
    signame: str,
    to_group: bool,
    tmp_path: Path,
    tracking_uri: str,
    prefect_api_url: str,
    start_command,
    pool_workers,
    child_processes,
    cpu_seconds,
) -> Interruption:
    """Run the sweep, signal it once a fold is done and the next trainings are under way (the
    whole process group, as a terminal's Ctrl-C does, with ``to_group``), and check how it
    ended. Returns the folds recorded and the fold cache once the run has ended.
    """
    cache = tmp_path / "cache"
    cpu_before = _children_cpu()
    pipeline = start_command(
        _sweep_args(tracking_uri, cache, runner, workers), tmp_path, _env(prefect_api_url)
    )
    wait_for(pipeline, lambda: folds_recorded(cache) >= 1, "a first fold recorded")
    # Mid-training: the trainings that started after the first fold are a little way in.
    units = lambda: _units(pipeline.pid, runner, pool_workers)  # noqa: E731
    _wait_for_training(pipeline, units, cpu_seconds, count=workers, seconds=0.3)

    tree = _descendants(pipeline.pid, child_processes)
    pool = pool_workers(pipeline.pid) if runner == "process" else []
    assert len(pool) == (workers if runner == "process" else 0), f"pool workers: {pool}"
    worker_cpu = {worker: cpu_seconds(worker) for worker in pool}
    cpu_at_signal = cpu_seconds(pipeline.pid) + sum(worker_cpu.values())
    folds_finished = folds_recorded(cache)
    if to_group:
        os.killpg(pipeline.pid, SIGNALS[signame])
    else:
        pipeline.send_signal(SIGNALS[signame])
    at_signal = dict(worker_cpu)
    deadline = time.monotonic() + 120  # a hang guard
    while pipeline.poll() is None and time.monotonic() < deadline:
        for worker in pool:  # their CPU time until the command reaps them
            with contextlib.suppress(OSError):
                worker_cpu[worker] = cpu_seconds(worker)
        time.sleep(0.02)
    _, stderr = pipeline.communicate(timeout=120)
    after_signal = _children_cpu() - cpu_before - cpu_at_signal

    _assert_ended_interrupted(pipeline, stderr, 129 if signame == "SIGHUP" else 130)
    (record,) = records(cache)
    recorded = len(record.folds())
    assert folds_finished <= recorded < TRAININGS, (
        f"{recorded} folds recorded, {folds_finished} before the signal: the running trainings "
        "must stop, not finish"
    )
    assert record.cv() is None, "an interrupted sweep records no CV table"
    _assert_killed_everywhere(record, tracking_uri, recorded)
    # The flow's thread, which the signal interrupts, writes each result to the fold cache,
    # then to the record: one that arrives as the signal comes can be cached and not recorded.
    # The cache, which a resume reuses, holds every recorded fold and at most that one more.
    cached = len(fold_cache(cache))
    assert recorded <= cached <= recorded + 1, f"{cached} folds in the cache, {recorded} recorded"
    # The trainings stopped at their next epoch: a training left running would spend over 2
    # CPU-s more (EPOCHS epochs), a stopped run a few tenths.
    assert after_signal < AFTER_SIGNAL_CPU[runner], (
        f"the run spent {after_signal:.2f} CPU-s after the signal"
    )
    for worker in pool:
        spent = worker_cpu[worker] - at_signal[worker]
        assert spent < AFTER_SIGNAL_CPU_PER_WORKER, (
            f"pool worker {worker} spent {spent:.2f} CPU-s after the signal"
        )
    _wait_gone(tree, f"processes of the run ({tree})")
    return Interruption(recorded, fold_cache(cache))


# ------------------------------------------------------------------------------ mid-sweep
@pytest.mark.parametrize(
    ("runner", "workers", "signame"),
    [
        ("thread", 2, "SIGINT"),
        ("thread", 2, "SIGHUP"),
        ("process", 1, "SIGTERM"),  # one worker: a second pool worker costs 4 CPU-s to start
        ("process", 1, "SIGHUP"),
    ],
)
def test_a_signal_mid_sweep_stops_the_trainings_at_their_next_epoch(
    runner,
    workers,
    signame,
    tmp_path,
    tracking_uri,
    prefect_api_url,
    start_command,
    pool_workers,
    child_processes,
    cpu_seconds,
    reliability_log,
):
    interruption = _interrupt_mid_sweep(
        runner, workers, signame, False, tmp_path, tracking_uri, prefect_api_url,
        start_command, pool_workers, child_processes, cpu_seconds,
    )  # fmt: skip

    reliability_log(
        f"{signame} mid-sweep ({runner} runner): trainings stop at their next epoch",
        survived=True,
        results_lost=interruption.folds_recorded - len(interruption.fold_cache),
    )


@pytest.mark.parametrize(
    ("runner", "signame", "to_group"),
    [("thread", "SIGTERM", False), ("process", "SIGINT", True)],  # SIGINT to all: a Ctrl-C
    ids=["thread-SIGTERM", "process-ctrl-c"],
)
def test_the_same_command_after_a_signal_resumes_from_the_fold_cache(
    runner,
    signame,
    to_group,
    tmp_path,
    tracking_uri,
    prefect_api_url,
    start_command,
    pool_workers,
    child_processes,
    cpu_seconds,
    reliability_log,
):
    cache = tmp_path / "cache"
    interruption = _interrupt_mid_sweep(
        runner, WORKERS, signame, to_group, tmp_path, tracking_uri, prefect_api_url,
        start_command, pool_workers, child_processes, cpu_seconds,
    )  # fmt: skip

    again = start_command(_sweep_args(tracking_uri, cache, runner), tmp_path, _env(prefect_api_url))
    stdout, stderr = again.communicate(timeout=300)

    assert again.returncode == 0, f"exit {again.returncode}: {stderr[-3000:]}"
    trained, reused = _trainings(stdout)
    finished = len(interruption.fold_cache)
    assert reused == finished, f"{reused} folds reused, {finished} had finished: {stdout}"
    assert trained + reused == TRAININGS, stdout
    retrained = rewritten(interruption.fold_cache, cache)
    assert retrained == 0, f"{retrained} finished folds were trained again"
    first, second = records(cache)
    assert (first.run()["status"], second.run()["status"]) == ("KILLED", "FINISHED")
    assert len(second.folds()) == TRAININGS, "the resumed record holds every fold"
    parents = _parents(_mlflow_runs(tracking_uri))
    assert [p.info.status for p in parents] == ["KILLED", "FINISHED"], parents
    reliability_log(
        f"{'Ctrl-C' if to_group else signame} mid-sweep ({runner} runner), then the same "
        "command again",
        survived=True,
        results_lost=finished - min(reused, finished),
        folds_retrained=retrained,
    )


def test_a_trainings_mlflow_run_exists_from_its_start_and_a_signal_ends_it_killed(
    tmp_path, tracking_uri, prefect_api_url, start_command, reliability_log
):
    # Arrange: trainings long enough to be seen mid-way (about 5x EPOCHS each).
    cache = tmp_path / "cache"
    args = _sweep_args(tracking_uri, cache, "thread")
    args[args.index("--epochs") + 1] = str(5 * EPOCHS)
    pipeline = start_command(args, tmp_path, _env(prefect_api_url))

    def running() -> list:
        runs = _mlflow_runs(tracking_uri) if (tmp_path / "cache" / "runs").exists() else []
        return [r for r in runs if r.data.tags.get("stage") == "cv" and r.info.status == "RUNNING"]

    # Act: the first trainings' runs appear while they train, before any result ...
    wait_for(pipeline, lambda: len(running()) == WORKERS, "a run per training under way")
    assert folds_recorded(cache) == 0, "a result came first: the runs did not show the start"
    live = {run.info.run_id: run.info for run in running()}
    pipeline.send_signal(signal.SIGTERM)
    _, stderr = pipeline.communicate(timeout=120)

    # Assert: ... and end KILLED when the signal stops them, from the same start.
    _assert_ended_interrupted(pipeline, stderr, 130)
    ended = {r.info.run_id: r for r in _mlflow_runs(tracking_uri)}
    for run_id, info in live.items():
        run = ended[run_id]
        assert run.info.status == "KILLED", run.info
        assert run.info.start_time == info.start_time <= run.info.end_time, run.info
        assert run.data.params["l2_lambda"] and run.data.params["fold"], run.data.params
    (record,) = records(cache)
    _assert_killed_everywhere(record, tracking_uri, len(record.folds()))
    reliability_log(
        "SIGTERM during the first trainings: their MLflow runs, there from the start, end KILLED",
        survived=True,
        results_lost=max(0, len(record.folds()) - len(fold_cache(cache))),
    )


# ------------------------------------------------------------------------------ final model
def test_a_signal_during_the_final_training_stops_it_and_the_folds_stay_cached(
    tmp_path,
    tracking_uri,
    prefect_api_url,
    start_command,
    child_processes,
    cpu_seconds,
    reliability_log,
):
    # A short sweep, then a final training of about 10 CPU-s (400 epochs on 5,000 images).
    cache = tmp_path / "cache"
    args = [
        "run", "--preset", "quick", "--epochs", "2", "--runner", "thread", "--workers", "2",
        "--tracking-uri", tracking_uri, "--experiment", EXPERIMENT, "--no-progress",
        "--set", f"execution.cache_dir={cache}",
    ]  # fmt: skip
    cpu_before = _children_cpu()
    pipeline = start_command([*args, "--final-epochs", "400"], tmp_path, _env(prefect_api_url))
    # Its first epoch recorded: the training is under way, and its MLflow run has something to show.
    wait_for(pipeline, lambda: any(cache.glob("runs/*/final-progress.json")), "a final epoch")
    tree = _descendants(pipeline.pid, child_processes)
    cpu_at_signal = cpu_seconds(pipeline.pid)
    cached = fold_cache(cache)

    pipeline.send_signal(signal.SIGTERM)
    _, stderr = pipeline.communicate(timeout=120)
    after_signal = _children_cpu() - cpu_before - cpu_at_signal

    _assert_ended_interrupted(pipeline, stderr, 130)
    (record,) = records(cache)
    assert record.final() is None, "an interrupted final training records no final model"
    assert not (record.folder / "final" / "weights.npz").exists(), "no weights of a cut training"
    _assert_killed_everywhere(record, tracking_uri, TRAININGS)
    # The final model's run showed its epochs live; it ends KILLED where the training stopped.
    (final,) = [r for r in _mlflow_runs(tracking_uri) if r.data.tags.get("stage") == "final"]
    assert final.info.status == "KILLED", final.info.status
    history = MlflowClient(tracking_uri).get_metric_history(final.info.run_id, "train_loss")
    steps = [point.step for point in history]
    assert sorted(steps) == list(range(1, len(steps) + 1)) and 0 < len(steps) < 400, steps
    assert "test_accuracy" not in final.data.metrics, final.data.metrics
    # Stopped within an epoch or so: left running, it had about 9 CPU-s to go.
    assert after_signal < AFTER_SIGNAL_CPU["thread"], (
        f"the run spent {after_signal:.2f} CPU-s after the signal"
    )
    _wait_gone(tree, f"processes of the run ({tree})")

    # The same run with a short final training (final epochs are not part of a fold's key).
    again = start_command([*args, "--final-epochs", "3"], tmp_path, _env(prefect_api_url))
    stdout, stderr = again.communicate(timeout=300)

    assert again.returncode == 0, f"exit {again.returncode}: {stderr[-3000:]}"
    trained, reused = _trainings(stdout)
    assert (trained, reused) == (0, TRAININGS), stdout
    assert "test accuracy" in stdout, stdout
    retrained = rewritten(cached, cache)
    assert retrained == 0, f"{retrained} finished folds were trained again"
    reliability_log(
        "SIGTERM during the final training, then the run again",
        survived=True,
        results_lost=TRAININGS - reused,
        folds_retrained=retrained,
    )


# ------------------------------------------------------------------------------ Ctrl-C
def _prefect_servers(tree: dict[int, str]) -> list[int]:
    """The Prefect servers among processes: ``prefect server start``, or the ephemeral one
    Prefect starts itself (uvicorn serving ``prefect.server.api.server``)."""
    return [
        pid
        for pid, cmdline in tree.items()
        if "prefect server start" in cmdline or "prefect.server.api.server" in cmdline
    ]


@pytest.mark.parametrize(
    ("runner", "workers"),
    [
        ("thread", 2),
        ("process", 1),
    ],
)
def test_ctrl_c_in_a_terminal_ends_the_run_and_its_temporary_server_cleanly(
    runner,
    workers,
    tmp_path,
    tracking_uri,
    start_command,
    pool_workers,
    child_processes,
    cpu_seconds,
    reliability_log,
):
    # A terminal's Ctrl-C sends SIGINT to the whole foreground process group. The temporary
    # Prefect server has its own session: it must not die under the run, which ends its Prefect
    # and MLflow runs through it, then stops it. It must be the run's only Prefect server.
    cache = tmp_path / "cache"
    pipeline = start_command(
        _sweep_args(tracking_uri, cache, runner, workers), tmp_path, _env(None)
    )

    def one_server() -> None:
        tree = _descendants(pipeline.pid, child_processes)
        servers = _prefect_servers(tree)
        assert len(servers) <= 1, f"more than one Prefect server: {[tree[p] for p in servers]}"

    wait_for(pipeline, lambda: folds_recorded(cache) >= 1, "a first fold", meanwhile=one_server)
    units = lambda: _units(pipeline.pid, runner, pool_workers)  # noqa: E731
    _wait_for_training(pipeline, units, cpu_seconds, workers, seconds=0.3, meanwhile=one_server)
    tree = _descendants(pipeline.pid, child_processes)
    servers = _prefect_servers(tree)
    assert len(servers) == 1, f"one temporary Prefect server expected among {tree}"

    os.killpg(pipeline.pid, signal.SIGINT)
    _, stderr = pipeline.communicate(timeout=120)

    _assert_ended_interrupted(pipeline, stderr, 130)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines == ["error: interrupted"], f"stderr holds more than the one line: {lines}"
    (record,) = records(cache)
    _assert_killed_everywhere(record, tracking_uri, len(record.folds()))
    _wait_gone(servers, "the temporary Prefect server")
    _wait_gone(tree, f"processes of the run ({tree})")
    reliability_log(
        f"Ctrl-C to the whole process group mid-sweep ({runner} runner, temporary server)",
        survived=True,
        results_lost=max(0, len(record.folds()) - len(fold_cache(cache))),
    )
