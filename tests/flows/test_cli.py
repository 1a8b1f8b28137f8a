"""The mlp-pipeline command line (``flows/cli.py``): one module, every command.

A real ``train`` on the bundled sample (recorded and published to a throwaway MLflow store),
``evaluate`` and ``publish`` on what it recorded, one-line errors with exit code 2 for bad
input, the help of every command, the data commands, credentials kept out of every config,
and signals during a tracked ``train`` (exit 130, 129 after SIGHUP, runs KILLED).

``run`` and ``cv`` are driven only up to their checks here (a Prefect API set to a closed
port, so no server starts): the flows themselves are tested in test_pipeline_flow.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

CLI = Path(sys.executable).with_name("mlp-pipeline")
# The list: `python -m flows.cli --help` shows every one.
COMMANDS = ["run", "cv", "train", "publish", "evaluate", "runs", "serve", "trigger", "data"]
SUBCOMMANDS = [["data", "info"], ["data", "verify"]]
QUICK_TRAIN = ["train", "--dataset", "mnist-sample", "--final-epochs", "1", "--hidden", "16",
               "--no-track", "--no-progress"]  # fmt: skip
SECRET = "p%40ss-w0rd"  # "p@ss-w0rd", percent-encoded as a URI must carry it
PLAIN_SECRET = "p@ss-w0rd"


def _clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k != "MLP_PIPELINE_DEBUG" and not k.startswith("MLFLOW_")}  # fmt: skip
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path}/should-not-exist.db"
    env["COLUMNS"] = "200"
    return env


def _assert_one_error_line(code: int, err: str, fragment: str, expected: int = 2) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expected, f"exit code {code}, expected {expected}; stderr: {err!r}"
    assert "Traceback" not in err, f"a traceback leaked to stderr:\n{err}"
    assert len(lines) == 1, f"expected ONE stderr line, got {len(lines)}:\n{err}"
    assert lines[0].startswith("error:"), f"stderr line should start with 'error:': {lines[0]!r}"
    assert fragment.lower() in lines[0].lower(), f"expected {fragment!r} in {lines[0]!r}"
    return lines[0]


@pytest.fixture(autouse=True)
def _no_inherited_settings(monkeypatch):
    for name in ("MLP_PIPELINE_DEBUG", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                 "MLFLOW_TRACKING_PASSWORD"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)


@pytest.fixture()
def closed_port():
    """A loopback port bound by the test and never listening: connections are refused."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture()
def no_prefect_server(monkeypatch, closed_port):
    """A Prefect API URL on a closed port: `run` and `cv` start no temporary server, and any
    contact with Prefect would fail. The commands here stop at their checks before that."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = f"http://127.0.0.1:{closed_port}/api"
    monkeypatch.setenv("PREFECT_API_URL", url)
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield url


def _spy(monkeypatch, module: Any, name: str) -> list[tuple[tuple, dict]]:
    """Record the calls of ``module.name`` (still calling it): the config a command built."""
    calls: list[tuple[tuple, dict]] = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


# ----------------------------------------------------------------------------- the console script


@pytest.mark.slow
def test_train_on_the_sample_prints_test_accuracy(tmp_path):
    # Arrange: the installed console script, run in an empty folder.
    env = _clean_env(tmp_path)

    # Act
    proc = subprocess.run(
        [str(CLI), *QUICK_TRAIN], capture_output=True, text=True, cwd=tmp_path, env=env,
        timeout=300,
    )  # fmt: skip

    # Assert
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    match = re.search(r"test accuracy (\d\.\d+)", proc.stdout)
    assert match, f"no 'test accuracy' in stdout:\n{proc.stdout}"
    accuracy = float(match.group(1))
    assert 0.5 < accuracy <= 1.0, f"one epoch on the sample should beat chance clearly: {accuracy}"
    assert "1000 test images" in proc.stdout, f"the sample has 1000 test images:\n{proc.stdout}"
    assert "MLflow" not in proc.stdout, f"--no-track should not record:\n{proc.stdout}"
    assert not (tmp_path / "mlruns").exists(), "--no-track created an mlruns folder"
    assert not (tmp_path / "should-not-exist.db").exists(), "--no-track touched the tracking store"
    assert not (tmp_path / ".mlp-pipeline").exists(), "--no-track wrote a run record"


def test_console_script_error_has_no_traceback(tmp_path):
    # Act
    proc = subprocess.run(
        [str(CLI), "train", "--lr", "-1", "--dataset", "mnist-sample", "--no-track"],
        capture_output=True, text=True, cwd=tmp_path, env=_clean_env(tmp_path), timeout=120,
    )  # fmt: skip

    # Assert
    _assert_one_error_line(proc.returncode, proc.stderr, "training.lr")
    assert proc.stdout.strip() == "", f"nothing should go to stdout on error: {proc.stdout!r}"


def test_python_m_flows_cli_help_lists_every_command(tmp_path):
    # Act: the module itself, as the issue asks ("python -m <it> --help lists every command").
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True,
        cwd=tmp_path, env=_clean_env(tmp_path), timeout=120,
    )  # fmt: skip

    # Assert
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr}"
    listed = re.findall(r"^│ (\w+)\s", proc.stdout, flags=re.MULTILINE)
    assert sorted(listed) == sorted(COMMANDS), f"commands listed: {listed}\n{proc.stdout}"


# ----------------------------------------------------------------------------- help


def test_no_arguments_shows_help_and_exits_0(cli):
    # Act
    code, out, err = cli([])

    # Assert
    assert code == 0, f"bare invocation should show the help and exit 0, got {code}: {err!r}"
    assert all(command in out for command in COMMANDS), f"help should list the commands:\n{out}"
    assert "Traceback" not in err and "error" not in err, f"bare invocation errored:\n{err}"


def test_data_without_a_subcommand_shows_its_help_and_exits_0(cli):
    code, out, err = cli(["data"])

    assert code == 0, f"`data` alone should show its help, got {code}: {err!r}"
    assert "info" in out and "verify" in out, f"data's help should list its commands:\n{out}"


@pytest.mark.parametrize(
    "command", [[c] for c in COMMANDS] + SUBCOMMANDS, ids=lambda c: " ".join(c)
)
def test_help_of_every_command_exits_0(cli, command):
    # Act
    code, out, err = cli([*command, "--help"])

    # Assert
    assert code == 0, f"{' '.join(command)} --help exited {code}; stderr {err!r}"
    assert "Usage:" in out and f"mlp-pipeline {' '.join(command)}" in out, out
    assert err.strip() == "", f"--help wrote to stderr: {err!r}"


def test_train_help_lists_its_options(cli):
    # Act
    code, out, err = cli(["train", "--help"])

    # Assert
    assert code == 0, f"--help should exit 0, got {code}; stderr {err!r}"
    for option in ("--no-track", "--final-epochs", "--l2"):
        assert option in out, f"train --help should list {option}:\n{out}"
    # Help text is Rich markup: section names in brackets must survive as text.
    assert "[data]," in out, f"--config's help lost its section names:\n{out}"


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--bogus"], "--bogus"),
        (["--lr", "-1"], "training.lr"),
        (["--lr", "abc"], "--lr"),
        (["--hidden", "0"], "model.hidden_sizes"),
        (["--hidden", "abc"], "--hidden"),
        (["--hidden", "1.5"], "--hidden"),
        (["--final-epochs", "abc"], "--final-epochs"),
        (["--final-epochs", "0"], "training.final_epochs"),
        # The old name of --final-epochs: the error points to the new one.
        (["--epochs", "3"], "--final-epochs"),
        (["--l2", "-1"], "--l2"),
        (["--dataset", "nope"], "data.dataset"),
        (["--set", "nosuchsection.x=1"], "nosuchsection.x"),
        (["--set", "training.epochs=abc"], "training.epochs"),
        (["--set", "training.epochs"], "key=value"),
        (["--set", "model.activation=gelu"], "model.activation"),
        (["--preset", "nope"], "preset"),
        # Numbers a float holds but a layer size cannot, and ints past NumPy's.
        (["--hidden", "nan"], "--hidden"),
        (["--hidden", "1e400"], "--hidden"),
        (["--hidden", "64,,32"], "empty item"),
        (["--final-epochs", "99999999999999999999999"], "training.final_epochs"),
        (["--batch-size", "99999999999999999999999"], "training.batch_size"),
        (["--set", "cv.l2_lambdas=1e-3,,2"], "empty item"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_train_input_exits_2_with_one_error_line(cli, extra, fragment):
    # Arrange
    argv = ["train", "--dataset", "mnist-sample", "--no-track", "--no-progress", *extra]

    # Act
    code, out, err = cli(argv)

    # Assert
    _assert_one_error_line(code, err, fragment)


def test_missing_config_file_exits_2(cli, tmp_path):
    # Arrange
    missing = tmp_path / "missing.toml"

    # Act
    code, out, err = cli(["train", "--config", str(missing), "--no-track"])

    # Assert
    _assert_one_error_line(code, err, "does not exist")
    assert "missing.toml" in err, f"the message should name the file: {err!r}"


def test_invalid_config_file_exits_2(cli, tmp_path):
    # Arrange
    path = tmp_path / "bad.toml"
    path.write_text("[training]\nepochz = 3\n", encoding="utf-8")

    # Act
    code, out, err = cli(["train", "--config", str(path), "--no-track"])

    # Assert
    line = _assert_one_error_line(code, err, "training.epochz")
    assert "bad.toml" in line, f"the message should name the file: {line!r}"


def test_empty_data_dir_without_download_exits_2(cli, tmp_path):
    # Arrange
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["train", "--dataset", "mnist", "--data-dir", str(empty), "--set",
            "data.download=false", "--no-track", "--no-progress"]  # fmt: skip

    # Act
    code, out, err = cli(argv)

    # Assert
    line = _assert_one_error_line(code, err, "error:")
    assert str(empty) in line or "download" in line.lower(), (
        f"the message should say where it looked or how to get the data: {line!r}"
    )
    assert list(empty.iterdir()) == [], "nothing should be downloaded with data.download=false"


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--set", "execution.dask_address=tcp://127.0.0.1:1", "--no-track"],
        ["run", "--dask-address", "tcp://127.0.0.1:1"],
        ["cv", "--runner", "thread", "--dask-address", "tcp://127.0.0.1:1"],
    ],
    ids=["train", "run", "cv"],
)
def test_dask_address_without_dask_runner_exits_2(cli, argv, tmp_path):
    # Act
    code, out, err = cli(argv)

    # Assert: rejected by validation, before any flow, server or store.
    _assert_one_error_line(code, err, "dask_address")
    assert not (tmp_path / "mlruns").exists(), "a store was made for a bad config"


@pytest.mark.parametrize(
    "make",
    [
        lambda tmp: ["--set", "cv.lambdas=1e-3,1e-2"],
        lambda tmp: ["--config", _write(tmp / "old.toml", "[cv]\nlambdas = [1e-3, 1e-2]\n")],
    ],
    ids=["--set", "toml"],
)
@pytest.mark.parametrize("command", ["run", "cv", "train"])
def test_the_renamed_l2_setting_names_its_new_name(cli, tmp_path, make, command):
    # Act
    code, out, err = cli([command, *make(tmp_path), "--no-progress"])

    # Assert
    line = _assert_one_error_line(code, err, "cv.l2_lambdas")
    assert "cv.lambdas" in line, f"the message should name the old setting too: {line!r}"


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_the_renamed_lambdas_flag_names_l2_grid(cli):
    code, out, err = cli(["cv", "--lambdas", "1e-3,1e-2", "--no-progress"])

    _assert_one_error_line(code, err, "--l2-grid")


@pytest.mark.parametrize("command", ["run", "cv"])
def test_l2_grid_sets_cv_l2_lambdas(cli, monkeypatch, prefect_api_url, closed_port, command):
    # Arrange: the command stops at the MLflow store check (a closed port), after its config
    # and its Prefect API's (the session's live server).
    import flows.pipeline_flow

    monkeypatch.setenv("PREFECT_API_URL", prefect_api_url)

    prepared = _spy(monkeypatch, flows.pipeline_flow, "prepare_run")
    argv = [command, "--preset", "quick", "--l2-grid", "1e-2, 1e-3,0.5", "--no-progress",
            "--tracking-uri", f"http://127.0.0.1:{closed_port}"]  # fmt: skip

    # Act
    code, out, err = cli(argv)

    # Assert
    _assert_one_error_line(code, err, "not reachable")
    assert len(prepared) == 1, f"{command} should prepare its run once: {prepared}"
    config = prepared[0][0][0]
    assert config.cv.l2_lambdas == [1e-3, 1e-2, 0.5], config.cv


@pytest.mark.parametrize("command", ["run", "cv"])
def test_grid_strategy_and_selection_set_the_search(
    cli, monkeypatch, prefect_api_url, closed_port, command
):
    # Arrange: as above, the command stops at the MLflow store check.
    import flows.pipeline_flow

    monkeypatch.setenv("PREFECT_API_URL", prefect_api_url)
    prepared = _spy(monkeypatch, flows.pipeline_flow, "prepare_run")
    argv = [command, "--preset", "quick", "--grid", "training.lr=[0.05, 0.1]",
            "--grid", 'model.hidden_sizes=[[8], [16, 8]]', "--strategy", "halving",
            "--selection", "one-se", "--no-progress",
            "--tracking-uri", f"http://127.0.0.1:{closed_port}"]  # fmt: skip

    # Act
    code, out, err = cli(argv)

    # Assert
    _assert_one_error_line(code, err, "not reachable")
    config = prepared[0][0][0]
    assert config.search.space == {
        "training.lr": [0.05, 0.1],
        "model.hidden_sizes": [[8], [16, 8]],
    }, config.search
    assert (config.search.strategy, config.cv.selection) == ("halving", "one-se")


@pytest.mark.slow
def test_a_command_names_its_flow_run_and_prints_its_page(
    cli, monkeypatch, prefect_api_url, tracking_uri, tmp_path
):
    # Arrange: a lasting server (the session's): its pages outlive the run.
    from prefect.client.orchestration import get_client

    monkeypatch.setenv("PREFECT_API_URL", prefect_api_url)
    argv = ["cv", "--preset", "quick", "--no-progress", "--tracking-uri", tracking_uri,
            "--set", f"execution.cache_dir={tmp_path / 'cache'}"]  # fmt: skip

    # Act
    code, out, err = cli(argv)

    # Assert
    assert code == 0, f"{out}\n{err}"
    found = re.search(r"Prefect flow run (mnist-sample-quick-[a-z]+-[a-z]+): (\S+)", out)
    assert found, out
    name, url = found.groups()
    base = prefect_api_url.rstrip("/").removesuffix("/api")
    assert url.startswith(f"{base}/runs/flow-run/"), url
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(url.rsplit("/", 1)[1])
    assert flow_run.name == name, flow_run.name


@pytest.mark.slow
def test_a_damaged_fold_cache_entry_is_reported_on_the_console(
    cli, monkeypatch, prefect_api_url, tracking_uri, tmp_path
):
    # Arrange: a first cv fills the fold cache; one of its entries is then cut short.
    monkeypatch.setenv("PREFECT_API_URL", prefect_api_url)
    cache = tmp_path / "cache"
    argv = ["cv", "--preset", "quick", "--epochs", "1", "--no-progress", "--tracking-uri",
            tracking_uri, "--set", f"execution.cache_dir={cache}"]  # fmt: skip
    assert cli(argv)[0] == 0
    damaged = sorted((cache / "folds").glob("*.json"))[0]
    damaged.write_bytes(damaged.read_bytes()[:20])

    # Act
    code, out, err = cli(argv)

    # Assert: the run succeeds, retrains that fold, and says why in one line.
    assert code == 0, err
    assert "trainings: 1 run, 3 reused from cache" in out, out
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, err
    assert "trained again" in warnings[0] and damaged.name in warnings[0], warnings


def test_a_run_mlflow_lost_during_prints_its_results_once_the_bars_are_gone(
    cli, monkeypatch, prefect_api_url, tracking_uri, tmp_path
):
    """MLflow answers the first publish, then is gone: the run goes on, prints the CV table and
    the test accuracy from its record (after its progress bars, whose last redraw would
    overwrite them on a terminal), and exits 3 in one line naming the record."""
    # Arrange
    import flows.cli
    import pipeline.progress
    import pipeline.tracking.publish as publishing

    monkeypatch.setenv("PREFECT_API_URL", prefect_api_url)
    real_publish, calls = publishing.publish, []

    def publish_once(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        if len(calls) > 1:
            raise ConnectionError("MLflow went away")
        return real_publish(*args, **kwargs)

    monkeypatch.setattr(publishing, "publish", publish_once)
    real_print, reporters = flows.cli._print_recorded_summary, []

    def print_recorded(*args: Any) -> None:
        reporters.append(pipeline.progress.reporter())
        real_print(*args)

    monkeypatch.setattr(flows.cli, "_print_recorded_summary", print_recorded)
    cache = tmp_path / "cache"
    argv = ["run", "--preset", "quick", "--epochs", "1", "--final-epochs", "1", "--tracking-uri",
            tracking_uri, "--set", f"execution.cache_dir={cache}"]  # fmt: skip

    # Act
    code, out, err = cli(argv)

    # Assert
    assert code == 3, f"exit {code}: {err}"
    (record,) = (cache / "runs").iterdir()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"mlp-pipeline publish {record}" in errors[0], err
    assert "Traceback" not in err, err
    from pipeline.record import RunRecord

    accuracy = RunRecord(record).final()["evaluation"]["accuracy"]
    assert out.count("← chosen") == 1, out
    assert out.count(f"test accuracy {accuracy:.4f}") == 1, out
    assert "MLflow run" not in out, out
    assert [type(r) for r in reporters] == [pipeline.progress.Reporter], "printed under the bars"


@pytest.mark.slow
def test_a_flow_runs_log_tells_what_happened_not_each_task_runs_state(
    prefect_api_url, tracking_uri, tmp_path
):
    # Arrange: a new process, as a user starts it (the CLI's logging defaults apply from its
    # start; this process set up Prefect's logging long before).
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )

    env = {**_clean_env(tmp_path), "PREFECT_API_URL": prefect_api_url}
    argv = [str(CLI), "run", "--preset", "quick", "--no-progress", "--tracking-uri", tracking_uri,
            "--set", f"execution.cache_dir={tmp_path / 'cache'}"]  # fmt: skip

    # Act
    done = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    # Assert
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    found = re.search(r"Prefect flow run \S+: \S+/runs/flow-run/(\S+)", done.stdout)
    assert found, done.stdout
    flow_run_id = found.group(1)
    # The server records states and logs in the background: polled until the flow run's last
    # line and its 9 task runs' end (load_data, 4 folds, cv_table, select, final, evaluate).
    deadline = time.monotonic() + 60
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
            )
            task_runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
        completed = [run for run in task_runs if run.state and run.state.is_completed()]
        ended = any(log.message.startswith("Finished in state") for log in logs)
        if (ended and len(completed) == 9) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    # The task runs ran and reported their states: only their log lines are gone.
    folds = [run for run in completed if run.name.startswith("train_fold")]
    assert len(folds) == 4 and len(completed) == len(task_runs) == 9, task_runs
    task_lines = [log.message for log in logs if log.task_run_id]
    assert not task_lines, f"task runs logged: {task_lines}"
    flow_lines = "\n".join(log.message for log in logs)
    for expected in (
        "dataset mnist-sample: ",
        "lambda=0.0001 fold 0: val accuracy ",
        "lambda=0.001 fold 1: val accuracy ",
        "chosen: lambda=",
        "final model: 4 epochs on ",
        "test accuracy ",
        "MLflow run ",
    ):
        assert expected in flow_lines, f"{expected!r} not in the flow run's log:\n{flow_lines}"


def test_a_config_files_preset_names_the_flow_run(tmp_path):
    from flows.cli import preset_name

    file = tmp_path / "c.toml"
    file.write_text('preset = "accurate"\n')
    assert preset_name(None, file) == "accurate"
    assert preset_name("quick", file) == "quick", "--preset wins over the file's"
    assert preset_name(None, None) == "default"
    file.write_text("[training]\nepochs = 3\n")
    assert preset_name(None, file) == "default"


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--grid", "training.lr=0.05"], "KEY=JSON_LIST"),
        (["--grid", "training.lr"], "KEY=JSON_LIST"),
        (["--grid", "=[1]"], "KEY=JSON_LIST"),
        (["--grid", "training.lr=[0.05, -1]"], "candidate 2 (lambda=0.0001 lr=-1) is not valid"),
        (["--grid", "training.lr=[0.1, 0.1]"], "the same"),
        (["--grid", "cv.folds=[2, 3]"], "cannot be searched"),
        (["--grid", "training.l2_lambda=[0.1]", "--l2-grid", "1e-3"], "keep one"),
        (["--strategy", "bayes"], "search.strategy"),
        (["--selection", "worst"], "cv.selection"),
        (["--grid", 'training.lr={"uniform": [0.01, 0.1]}'], "random or halving"),
    ],
    ids=["not-a-list", "no-value", "no-key", "invalid-candidate", "duplicate", "not-searchable",
         "lambda-twice", "strategy", "selection", "distribution-in-a-grid"],
)  # fmt: skip
def test_a_bad_search_exits_2_before_anything_is_written(cli, tmp_path, monkeypatch, argv,
                                                         fragment):  # fmt: skip
    monkeypatch.chdir(tmp_path)

    code, out, err = cli(["cv", "--preset", "quick", "--no-progress", *argv])

    _assert_one_error_line(code, err, fragment)
    assert list(tmp_path.iterdir()) == [], "a refused search left files behind"


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["train", "--lr", "-1", "--no-track"], "training.lr"),
        (["train", "--dataset", "mnist", "--data-dir", "{empty}", "--set", "data.download=false",
          "--no-track"], "not found"),
        (["train", "--preset", "quick", "--tracking-uri", "sqlite:///"], "no database file"),
        (["publish", "{empty}"], "unreadable record file"),
    ],
    ids=["config", "data", "store", "record"],
)  # fmt: skip
def test_debug_adds_a_traceback_and_keeps_the_exit_code(cli, monkeypatch, tmp_path, argv,
                                                        fragment):  # fmt: skip
    # Arrange
    (tmp_path / "empty").mkdir()
    argv = [arg.format(empty=tmp_path / "empty") for arg in argv]
    monkeypatch.setenv("MLP_PIPELINE_DEBUG", "1")

    # Act
    code, out, err = cli(argv)

    # Assert
    assert code == 2, f"MLP_PIPELINE_DEBUG=1 changed the exit code to {code}: {err}"
    assert "Traceback (most recent call last)" in err, f"no traceback with debug on:\n{err}"
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:") and fragment in last, f"the error line should end it: {err}"


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [("sqlite:///", "no database file"), ("http://127.0.0.1:{port}", "not reachable")],
    ids=["sqlite-without-file", "refused-server"],
)
def test_train_checks_the_store_before_training(cli, tmp_path, closed_port, uri, fragment):
    # Act
    argv = ["train", "--preset", "quick", "--no-progress", "--tracking-uri",
            uri.format(port=closed_port)]  # fmt: skip
    code, out, err = cli(argv)

    # Assert
    _assert_one_error_line(code, err, fragment)
    assert "test accuracy" not in out, f"it trained before checking the store:\n{out}"
    assert not (tmp_path / ".mlp-pipeline").exists(), "a run record was made for no store"


# ----------------------------------------------------------------------------- data


@pytest.mark.slow
def test_data_verify_shared_dir_exits_0(cli, shared_data_dir):
    # Act
    code, out, err = cli(["data", "verify", "--data-dir", str(shared_data_dir)])

    # Assert
    assert code == 0, f"exit {code}; stderr: {err}"
    assert " mnist/train-images-idx3-ubyte.gz " in out, f"relative paths, whole:\n{out}"
    assert out.count(" ok") == 12, f"8 IDX files and 4 sample arrays should be ok:\n{out}"
    assert "MISMATCH" not in out, f"a file did not match its checksum:\n{out}"


def test_data_verify_mismatch_exits_2(cli, tmp_path, shared_data_dir, monkeypatch):
    # Arrange: the real MNIST, one file of it replaced by a valid IDX file of other content.
    import hashlib

    from pipeline.data import SPECS

    monkeypatch.setenv("COLUMNS", "80")
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz"):  # fmt: skip
        (folder / name).symlink_to(shared_data_dir / "mnist" / name)
    wrong = b"\x00\x00\x08\x01\x00\x00\x00\x01\x07"
    (folder / "t10k-labels-idx1-ubyte").write_bytes(wrong)
    expected = SPECS["mnist"].sha256["test_labels"]

    # Act
    code, out, err = cli(["data", "verify", "--dataset", "mnist", "--data-dir", str(tmp_path)])

    # Assert: exit 2, one error line, and both hashes of the bad file whole on stdout.
    _assert_one_error_line(code, err, "do not match their canonical checksum")
    assert out.count(" ok") == 3 and "MISMATCH" in out, out
    assert f"expected {expected}" in out, f"the expected hash, whole:\n{out}"
    assert f"actual   {hashlib.sha256(wrong).hexdigest()}" in out, f"the actual hash:\n{out}"


def test_data_info_exits_0(cli, shared_data_dir, monkeypatch):
    # Arrange: an 80-column terminal
    monkeypatch.setenv("COLUMNS", "80")

    # Act: the folder named through a "..".
    detour = shared_data_dir / "mnist" / ".."
    code, out, err = cli(["data", "info", "--data-dir", str(detour)])

    # Assert: every file's path, relative to the data folder, whole on one line.
    assert code == 0, f"exit {code}; stderr: {err}"
    assert f"datasets under {os.path.abspath(shared_data_dir)}\n" in out, f"no '..':\n{out}"
    for name in ("mnist", "fashion-mnist"):
        for role in ("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
            assert f" {name}/{role}.gz " in out, f"{name}/{role}.gz not shown whole:\n{out}"
    assert " mnist-sample.npz " in out, f"the bundled file by its name, whole:\n{out}"
    assert "…" not in out, f"cells were cut short:\n{out}"


def test_data_info_on_empty_dir_reports_missing(cli, tmp_path, monkeypatch):
    # Arrange: no --data-dir, no env var: ./data under an empty working directory.
    monkeypatch.delenv("MLP_PIPELINE_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)

    # Act
    code, out, err = cli(["data", "info"])

    # Assert
    assert code == 0, f"info on an empty folder should still exit 0; stderr: {err}"
    assert "missing" in out, f"missing files should be reported:\n{out}"


def test_data_info_shows_a_bracketed_folder_name(cli, tmp_path):
    # Arrange: Rich markup would read "[v1]" as a style tag and drop it.
    folder = tmp_path / "[v1]"
    folder.mkdir()

    # Act
    code, out, err = cli(["data", "info", "--data-dir", str(folder)])

    # Assert
    assert code == 0, err
    assert "[v1]" in out, f"the folder name lost its brackets:\n{out}"


# ----------------------------------------------------------------------------- credentials


@pytest.mark.parametrize("source", ["flag", "--set", "toml"])
def test_credentials_leave_the_config_from_every_source(monkeypatch, tmp_path, source):
    # Arrange: registered with monkeypatch so the variables are restored after the test.
    from flows.cli import config_from_options

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "before")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "before")
    uri = f"http://bob:{SECRET}@127.0.0.1:5000"
    toml = tmp_path / "c.toml"
    toml.write_text(f'[tracking]\ntracking_uri = "{uri}"\n', encoding="utf-8")
    args = {"flag": (None, None, None), "--set": (None, None, [f"tracking.tracking_uri={uri}"]),
            "toml": (None, toml, None)}[source]  # fmt: skip
    flags = {"tracking_uri": uri} if source == "flag" else {}

    # Act
    cfg = config_from_options(*args, **flags)

    # Assert
    assert cfg.tracking.tracking_uri == "http://127.0.0.1:5000", cfg.tracking
    assert "bob" not in cfg.model_dump_json(), cfg.model_dump_json()
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "bob", "the user name was lost"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == PLAIN_SECRET, "the password was lost"


@pytest.mark.parametrize(
    "uri",
    [f"postgresql://bob:{SECRET}@127.0.0.1:5432/mlflow",
     f"http://127.0.0.1:5000/?token={SECRET}&x=1"],
    ids=["database-password", "secret-query-key"],
)  # fmt: skip
def test_a_secret_only_mlflow_reads_from_the_uri_travels_in_the_environment(
    monkeypatch, tmp_path, uri
):
    """MLflow reads a database password only from the URI: the URI goes to this process's
    environment (MLFLOW_TRACKING_URI, which Prefect never stores), not into the config."""
    # Arrange: registered with monkeypatch so it is restored after the test.
    from flows.cli import config_from_options
    from pipeline.tracking.store import default_tracking_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/mlflow.db")
    toml = tmp_path / "c.toml"
    toml.write_text(f'[tracking]\ntracking_uri = "{uri}"\n', encoding="utf-8")

    # Act
    cfg = config_from_options(None, toml, None)

    # Assert
    assert cfg.tracking.tracking_uri is None, cfg.tracking
    assert SECRET not in cfg.model_dump_json(), cfg.model_dump_json()
    assert default_tracking_uri(cfg.tracking.tracking_uri) == uri, "the store was lost"


# (command, module and function that receive the command's whole config, extra arguments)
CONFIG_RECEIVERS = {
    "run": ("flows.pipeline_flow", "prepare_run", ["--preset", "quick"]),
    "cv": ("flows.pipeline_flow", "prepare_run", ["--preset", "quick"]),
    "train": ("pipeline.tracking.publish", "recorded", ["--preset", "quick"]),
    "serve": ("flows.deployments", "build_deployments", []),
}


@pytest.mark.parametrize("command", list(CONFIG_RECEIVERS))
def test_credentials_never_reach_the_config_of_any_command(
    cli, monkeypatch, prefect_api_url, no_prefect_server, closed_port, command
):
    # Arrange: a store with credentials on a closed port; each command stops at a check.
    # `run` and `cv` check their Prefect API first: the session's live one (set up before
    # no_prefect_server, a session fixture) lets them reach the store.
    import importlib

    from prefect.settings import PREFECT_API_URL, temporary_settings

    settings = contextlib.nullcontext()
    if command in {"run", "cv"}:
        monkeypatch.setenv("PREFECT_API_URL", prefect_api_url)
        settings = temporary_settings(updates={PREFECT_API_URL: prefect_api_url})

    module, function, extra = CONFIG_RECEIVERS[command]
    received = _spy(monkeypatch, importlib.import_module(module), function)
    uri = f"http://bob:{SECRET}@127.0.0.1:{closed_port}"

    # Act
    with settings:
        code, out, err = cli([command, *extra, "--set", f"tracking.tracking_uri={uri}"])

    # Assert
    _assert_one_error_line(code, err, "127.0.0.1")  # the store or Prefect API is unreachable
    assert len(received) == 1, f"{function} was not called by {command}: {err}"
    config = received[0][0][0]
    text = config.model_dump_json()
    assert "bob" not in text and "w0rd" not in text, f"credentials in {command}'s config: {text}"
    assert config.tracking.tracking_uri == f"http://127.0.0.1:{closed_port}", config.tracking
    assert "w0rd" not in out + err, f"{command} printed the password:\n{out}{err}"


def test_serve_puts_no_credentials_in_the_deployment_parameters(
    cli, monkeypatch, no_prefect_server, closed_port
):
    # Arrange
    import flows.deployments

    built: list[Any] = []
    real = flows.deployments.build_deployments

    def keep(*args, **kwargs):
        built.extend(real(*args, **kwargs))
        return built

    monkeypatch.setattr(flows.deployments, "build_deployments", keep)
    uri = f"http://bob:{SECRET}@127.0.0.1:{closed_port}"

    # Act: serve stops at the Prefect API check, after building its deployments.
    code, out, err = cli(["serve", "--cron", "0 2 * * *", "--set", f"tracking.tracking_uri={uri}"])

    # Assert
    _assert_one_error_line(code, err, "no Prefect server answers")
    assert len(built) == 2, f"expected the scheduled and the on-demand deployment: {built}"
    for deployment in built:
        text = json.dumps(deployment.parameters)
        assert "bob" not in text and "w0rd" not in text, f"credentials in {deployment.name}: {text}"


def test_trigger_refuses_credentials_in_a_runs_overrides():
    # Arrange: a deployment as the API returns it (its stored parameters).
    from flows.deployments import config_parameters, deployment_config
    from pipeline.config import build_config
    from pipeline.errors import ConfigError

    stored = SimpleNamespace(name="on-demand", parameters=config_parameters(build_config()))

    # Act
    with pytest.raises(ConfigError) as info:
        deployment_config(stored, {"tracking.tracking_uri": f"http://bob:{SECRET}@h:5000"})

    # Assert
    assert "credentials" in str(info.value) and "w0rd" not in str(info.value), info.value


@pytest.mark.parametrize("command", ["run", "cv", "train", "evaluate", "runs", "publish"])
def test_no_command_prints_the_password_of_an_unreachable_store(
    cli, no_prefect_server, closed_port, tmp_path, command
):
    # Arrange
    from pipeline.config import build_config
    from pipeline.record import RunRecord

    record = RunRecord.create(
        build_config(overrides={"execution.cache_dir": str(tmp_path / "c")}),
        flow="train",
        dataset={"name": "mnist-sample", "fingerprint": "f"},
    )
    extra = {"run": ["--preset", "quick"], "cv": ["--preset", "quick"],
             "train": ["--preset", "quick"], "evaluate": ["--model", "models:/m@champion"],
             "runs": [], "publish": [str(record.folder)]}[command]  # fmt: skip
    uri = f"http://bob:{SECRET}@127.0.0.1:{closed_port}"

    # Act
    code, out, err = cli([command, *extra, "--tracking-uri", uri])

    # Assert
    line = _assert_one_error_line(code, err, f"127.0.0.1:{closed_port}")
    assert "w0rd" not in out + err and "bob" not in line, f"credentials shown:\n{out}{err}"


def test_ui_command_quotes_the_store_and_makes_it_absolute(tmp_path, monkeypatch):
    from pipeline.tracking.store import default_tracking_uri, ui_command

    # Arrange: a project folder with a space and a quote in its name.
    project = tmp_path / "it's mine"
    project.mkdir()
    monkeypatch.chdir(project)

    # Act: the default store, as every command resolves it.
    command = ui_command(default_tracking_uri())

    # Assert: a shell splits it back into the right, absolute URI.
    words = shlex.split(command)
    uri = words[words.index("--backend-store-uri") + 1]
    assert uri == f"sqlite:///{project / 'mlruns' / 'mlflow.db'}", command
    assert words[:2] == ["mlflow", "ui"] and words[-4:] == ["--host", "127.0.0.1", "--port",
                                                           "5000"], command  # fmt: skip


def test_ui_command_makes_a_relative_store_absolute(tmp_path):
    from pipeline.tracking.store import ui_command

    # Act: a relative store whose folder has a space, as a user may pass it.
    command = ui_command("sqlite:///my store/mlflow.db")

    # Assert: a shell splits it back into the right, absolute URI.
    words = shlex.split(command)
    uri = words[words.index("--backend-store-uri") + 1]
    assert uri == f"sqlite:///{tmp_path / 'my store' / 'mlflow.db'}", command


def test_ui_command_of_a_server_shows_no_credentials():
    from pipeline.tracking.store import ui_command

    assert ui_command(f"https://bob:{SECRET}@mlflow.example:443") == "https://mlflow.example:443"


@pytest.mark.parametrize(
    "store",
    [f"sqlite:////srv/mlflow.db?password={SECRET}", f"postgresql://bob:{SECRET}@db.example/mlflow"],
)
def test_ui_command_of_a_database_shows_no_credentials(store):
    from pipeline.tracking.store import ui_command

    command = ui_command(store)

    assert SECRET not in command, command
    assert command.startswith("mlflow ui --backend-store-uri "), command


def test_train_takes_its_l2_from_the_config_unless_the_flag_gives_one():
    def scores(*extra: str) -> str:
        code, out, err = _main([*QUICK_TRAIN, *extra])
        assert code == 0, err
        return re.search(r"test accuracy \S+  test loss \S+", out).group()

    # Act
    from_config = scores("--set", "training.l2_lambda=0.5")
    from_flag = scores("--l2", "0.5")
    flag_over_config = scores("--l2", "1e-4", "--set", "training.l2_lambda=0.5")
    neither = scores()

    # Assert: the same network and seed, so the same lambda gives the same scores.
    assert from_config == from_flag, (from_config, from_flag)
    assert flag_over_config == neither != from_flag, (flag_over_config, neither, from_flag)


def test_mlflows_own_error_lines_and_their_tracebacks_stay_off_the_console():
    # Arrange: the command's library defaults, then an error logged the way MLflow's store logs
    # a failed write (a full disk under a SQLite store: an ERROR record with its traceback).
    code = (
        "from flows.cli import _library_defaults\n"
        "_library_defaults()\n"
        "import logging, mlflow\n"
        "try:\n"
        "    raise OSError(28, 'No space left on device')\n"
        "except OSError:\n"
        "    logging.getLogger('mlflow.store.db.utils').exception('database write failed')\n"
        "logging.getLogger('pipeline').error('the line the command prints')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_LOGGING")}

    # Act
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)

    # Assert: nothing of MLflow's, while other loggers still reach the console.
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "database write failed" not in done.stderr, (
        done.stderr
    )
    assert "the line the command prints" in done.stderr, done.stderr


# ----------------------------------------------------------------------------- a tracked train


def _main(argv: list[str]) -> tuple[int, str, str]:
    """``flows.cli.main(argv)`` in this process -> (exit code, stdout, stderr); env restored."""
    from flows.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, _empty_store) -> dict[str, Any]:
    """`mlp-pipeline train` on the sample, tracked in a fresh store: what it printed and made.

    2 final epochs of a 784-64-10 network; registers mlp-mnist-sample version 1 (champion).
    """
    folder = tmp_path_factory.mktemp("trained")
    (folder / "mlruns").mkdir()
    shutil.copyfile(_empty_store, folder / "mlruns" / "mlflow.db")
    store = f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"
    code, out, err = _main(["train", "--preset", "quick", "--final-epochs", "2", "--no-progress",
                            "--tracking-uri", store, "--set",
                            f"execution.cache_dir={folder / '.mlp-pipeline'}"])  # fmt: skip
    assert code == 0, f"train failed ({code}):\n{out}\n{err}"
    accuracy = re.search(r"test accuracy (\d\.\d+)", out)
    run_id = re.search(r"MLflow run (\w+)", out)
    assert accuracy and run_id, f"unexpected output:\n{out}"
    (record,) = (folder / ".mlp-pipeline" / "runs").iterdir()
    return {"store": store, "accuracy": accuracy.group(1), "run_id": run_id.group(1),
            "record": record, "out": out, "folder": folder}  # fmt: skip


def test_train_records_a_run_and_publishes_it(trained):
    from mlflow import MlflowClient

    from pipeline.record import RunRecord

    # Arrange
    record = RunRecord(trained["record"])
    client = MlflowClient(trained["store"], registry_uri=trained["store"])

    # Act
    run = record.run()
    final = record.final()
    parent = client.get_run(trained["run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{trained['run_id']}'"
    )
    champion = client.get_model_version_by_alias("mlp-mnist-sample", "champion")

    # Assert: the record is the source of truth ...
    assert run["status"] == "FINISHED" and run["flow"] == "train", run
    assert f"{final['evaluation']['accuracy']:.4f}" == trained["accuracy"], final["evaluation"]
    assert len(final["history"]["epoch"]) == 2, f"--final-epochs 2 ran {final['history']}"
    # ... and MLflow its publish: the printed run is the record's parent run.
    assert parent.data.tags["mlp_pipeline.record_id"] == run["id"], parent.data.tags
    assert parent.info.status == "FINISHED", parent.info
    assert f"{parent.data.metrics['test_accuracy']:.4f}" == trained["accuracy"], parent.data
    assert parent.data.params["l2_lambda"] == "0.0001", parent.data.params
    assert [c.data.tags["stage"] for c in children] == ["final"], children
    assert children[0].data.params["epochs"] == "2", children[0].data.params
    history = client.get_metric_history(children[0].info.run_id, "train_loss")
    assert [point.step for point in history] == [1, 2], history
    assert (str(champion.version), champion.run_id) == ("1", trained["run_id"]), champion
    assert "model mlp-mnist-sample version 1 (new champion)" in trained["out"], trained["out"]


def _evaluated(cli, model_uri: str, store: str, *extra: str) -> tuple[str, str]:
    code, out, err = cli(["evaluate", "--model", model_uri, "--tracking-uri", store, *extra])
    assert code == 0, f"evaluate {model_uri} exited {code}: {err}"
    match = re.search(r"test accuracy (\d\.\d+) \((.+?), (\d+) test images", out)
    assert match, f"unexpected output: {out!r}"
    return match.group(1), f"{match.group(2)}/{match.group(3)}"


def test_evaluate_in_a_folder_without_a_store_exits_2_and_creates_none(cli, tmp_path):
    # Arrange: the default store (./mlruns/mlflow.db) does not exist here.
    assert Path.cwd() == tmp_path and not (tmp_path / "mlruns").exists()

    # Act
    code, out, err = cli(["evaluate", "--model", "models:/mlp-mnist-sample@champion"])

    # Assert: refused as `runs` refuses it; MLflow did not make an empty store.
    _assert_one_error_line(code, err, "no MLflow store")
    assert not (tmp_path / "mlruns" / "mlflow.db").exists(), "an empty store was created"


@pytest.mark.parametrize(
    "model_uri",
    ["models:/mlp-mnist-sample@champion", "models:/mlp-mnist-sample/1", "runs:/{run_id}/model"],
    ids=["alias", "version", "printed-run-id"],
)
def test_evaluate_scores_the_model_as_train_did(cli, trained, model_uri):
    # Arrange: the run id `train` printed is the pipeline's parent run, which holds the model.
    uri = model_uri.format(run_id=trained["run_id"])

    # Act: no --dataset: the model's own (the sample) is used.
    accuracy, scored_on = _evaluated(cli, uri, trained["store"])

    # Assert
    assert accuracy == trained["accuracy"], (
        f"evaluate {uri} gave {accuracy}, train printed {trained['accuracy']}"
    )
    assert scored_on == "mnist-sample/1000", f"scored on {scored_on}, not the model's dataset"


def test_evaluate_reads_the_data_folder_the_model_was_trained_from(
    cli, shared_data_dir, tracking_uri, tmp_path, monkeypatch
):
    # Arrange: a model trained from the shared folder; the default folder is now elsewhere.
    code, out, err = cli(["train", "--dataset", "mnist", "--data-dir", str(shared_data_dir),
                          "--limit-train", "2000", "--limit-test", "500", "--hidden", "16",
                          "--final-epochs", "1", "--no-progress", "--tracking-uri", tracking_uri,
                          "--set", f"execution.cache_dir={tmp_path / 'cache'}"])  # fmt: skip
    assert code == 0, f"{out}\n{err}"
    run_id = re.search(r"MLflow run (\w+)", out).group(1)
    monkeypatch.setenv("MLP_PIPELINE_DATA_DIR", str(tmp_path / "empty"))

    # Act
    accuracy, scored_on = _evaluated(
        cli, f"runs:/{run_id}/model", tracking_uri, "--limit-test", "500"
    )

    # Assert: the same 500 test images, from the folder the run recorded.
    assert scored_on == "mnist/500", scored_on
    assert re.search(rf"test accuracy {accuracy}\b", out), (accuracy, out)


def test_evaluate_reads_only_the_test_files(cli, trained, shared_data_dir, tmp_path, monkeypatch):
    import mlflow
    import numpy as np

    from pipeline.data import load_dataset

    # Arrange: a data folder with MNIST's two test files only (no download is possible here).
    (tmp_path / "data" / "mnist").mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(shared_data_dir / "mnist" / name, tmp_path / "data" / "mnist" / name)
    uri = "models:/mlp-mnist-sample@champion"

    # Act
    accuracy, scored_on = _evaluated(
        cli, uri, trained["store"],
        "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--limit-test", "2000",
    )  # fmt: skip

    # Assert: the same figure as the logged model's own predictions on that test subset.
    test = load_dataset("mnist", shared_data_dir, download=False).limit(None, 2000)
    # As a user loads it: MLflow resolves runs:/ to the logged model on its tracking URI.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["store"])
    model = mlflow.pyfunc.load_model(f"runs:/{trained['run_id']}/model")
    predicted = model.predict(test.X_test.astype(np.float32))
    expected = float(np.mean(np.asarray(predicted) == test.y_test))
    assert scored_on == "mnist/2000", scored_on
    assert accuracy == f"{expected:.4f}", f"evaluate printed {accuracy}, direct scoring {expected}"
    assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ], "evaluate fetched or wrote files it does not need"


# ----------------------------------------------------------------------------- publish


def _snapshot(store: str) -> dict[str, Any]:
    """Everything a publish could add to a store: runs, their data, artifacts, versions."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(store, registry_uri=store)
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    runs = {}
    for run in client.search_runs(experiments, run_view_type=ViewType.ALL):
        run_id = run.info.run_id
        history = {key: sorted((m.step, m.timestamp, m.value)
                               for m in client.get_metric_history(run_id, key))
                   for key in run.data.metrics}  # fmt: skip
        artifacts, folders = [], [None]
        while folders:
            for item in client.list_artifacts(run_id, folders.pop()):
                (folders if item.is_dir else artifacts).append(item.path)
        runs[run_id] = {
            "info": (run.info.status, run.info.start_time, run.info.end_time, run.info.run_name),
            "params": run.data.params,
            "tags": {k: v for k, v in run.data.tags.items() if k != "mlflow.log-model.history"},
            "metrics": history,
            "artifacts": sorted(artifacts),
        }
    versions = sorted(
        (v.name, v.version, v.run_id, v.source, tuple(sorted(v.tags.items())))
        for v in client.search_model_versions()
    )
    models = {m.name: m.aliases for m in client.search_registered_models()}
    return {"runs": runs, "versions": versions, "models": models}


def test_republishing_a_record_changes_nothing_in_mlflow(cli, trained):
    # Arrange: train published the record already.
    before = _snapshot(trained["store"])

    # Act
    code, out, err = cli(["publish", str(trained["record"]), "--tracking-uri", trained["store"]])

    # Assert
    assert code == 0, f"publish exited {code}: {err}"
    assert f"MLflow run {trained['run_id']}" in out, f"publish found another parent run:\n{out}"
    after = _snapshot(trained["store"])
    assert after["versions"] == before["versions"], "publish registered the model again"
    assert after["models"] == before["models"], "publish moved an alias"
    assert after["runs"].keys() == before["runs"].keys(), "publish created runs"
    for run_id, data in before["runs"].items():
        assert after["runs"][run_id] == data, f"publish changed run {run_id}"


@pytest.mark.slow
def test_a_record_published_later_matches_and_publishes_once(cli, trained, tracking_uri):
    # Arrange: MLflow was away: the record goes to another (empty) store.
    record = str(trained["record"])

    # Act
    first = cli(["publish", record, "--tracking-uri", tracking_uri])
    once = _snapshot(tracking_uri)
    second = cli(["publish", record, "--tracking-uri", tracking_uri])

    # Assert
    assert first[0] == 0 and second[0] == 0, f"publish failed: {first[2]} {second[2]}"
    assert _snapshot(tracking_uri) == once, "the second publish changed the store"
    (parent,) = [run for run in once["runs"].values() if run["tags"].get("stage") == "pipeline"]
    assert parent["tags"]["mlp_pipeline.record_id"] == trained["record"].name, parent["tags"]
    accuracy = parent["metrics"]["test_accuracy"][0][2]
    assert f"{accuracy:.4f}" == trained["accuracy"], parent["metrics"]
    assert [str(v[1]) for v in once["versions"]] == ["1"], once["versions"]
    assert "model mlp-mnist-sample version 1 (new champion)" in first[1], first[1]


@pytest.mark.slow
# SQLite has no password: its driver ignores the one this test puts in the URI, and says so.
@pytest.mark.filterwarnings("ignore:Query string argument.*pysqlite")
def test_publish_takes_a_password_for_the_records_store_from_mlflow_tracking_uri(
    cli, trained, tracking_uri, monkeypatch
):
    """The record keeps its store without credentials; MLFLOW_TRACKING_URI holds them. Another
    store in MLFLOW_TRACKING_URI is not the record's: the printed command finishes the job where
    the run began."""
    # Arrange: the record as if made on a store whose URI carried a password.
    record = trained["record"]
    run_file = record / "run.json"
    saved = run_file.read_text(encoding="utf-8")
    from pipeline.record import read_json, write_json

    data = read_json(run_file, "run")
    data["config"]["tracking"]["tracking_uri"] = tracking_uri
    write_json(run_file, "run", data)
    elsewhere = f"sqlite:///{record.parent / 'elsewhere' / 'mlflow.db'}"
    import pipeline.tracking.publish as publishing

    real, used = publishing.open_store, []  # the store each publish opens
    monkeypatch.setattr(
        publishing, "open_store", lambda uri, experiment: used.append(uri) or real(uri, experiment)
    )
    try:
        # Act
        monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
        code_elsewhere, _, err_elsewhere = cli(["publish", str(record)])
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"{tracking_uri}?password={SECRET}")
        code, out, err = cli(["publish", str(record)])
    finally:
        run_file.write_text(saved, encoding="utf-8")

    # Assert: both went to the record's store (one parent), never to the other one.
    assert (code_elsewhere, code) == (0, 0), err_elsewhere + err
    parents = [r for r in _snapshot(tracking_uri)["runs"].values()
               if r["tags"].get("stage") == "pipeline"]  # fmt: skip
    assert [r["tags"]["mlp_pipeline.record_id"] for r in parents] == [record.name]
    assert not (record.parent / "elsewhere").exists(), "published to MLFLOW_TRACKING_URI's store"
    assert used == [tracking_uri, f"{tracking_uri}?password={SECRET}"], used
    assert SECRET not in out + err, out + err


@pytest.mark.parametrize("kind", ["missing", "empty-folder", "a-file", "runs-folder"])
def test_publish_of_something_else_than_a_record_exits_2(cli, tmp_path, tracking_uri, kind):
    # Arrange
    target = tmp_path / "target"
    if kind == "empty-folder":
        target.mkdir()
    elif kind == "a-file":
        target.write_text("{}")
    elif kind == "runs-folder":  # the parent of the records, a common slip
        (target / "20260101T000000Z-0a1b2c3d").mkdir(parents=True)

    # Act
    code, out, err = cli(["publish", str(target), "--tracking-uri", tracking_uri])

    # Assert
    _assert_one_error_line(code, err, str(target))
    assert out.strip() == "", f"nothing should be printed on stdout: {out!r}"


def test_publish_to_an_unreachable_store_is_one_line(cli, trained, closed_port):
    # Act
    code, out, err = cli(["publish", str(trained["record"]), "--tracking-uri",
                          f"http://127.0.0.1:{closed_port}"])  # fmt: skip

    # Assert
    _assert_one_error_line(code, err, f"http://127.0.0.1:{closed_port} is not reachable")


# ----------------------------------------------------------------------------- signals


def _statuses(database: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        try:
            return [row[0] for row in db.execute("select status from runs")]
        except sqlite3.OperationalError:  # locked or being written: ask again
            return []


@pytest.mark.parametrize(("signum", "expected"), [(signal.SIGINT, 130), (signal.SIGHUP, 129)],
                         ids=["SIGINT", "SIGHUP"])  # fmt: skip
def test_a_signal_as_the_command_ends_is_the_one_line_too(monkeypatch, signum, expected):
    # Arrange: a real signal once the app has returned, while the command's handlers are still
    # in place (outside the app, which turns an interruption into its exit code itself).
    import flows.cli
    from flows.interrupt import interruptible

    @contextlib.contextmanager
    def signalled_as_it_ends():
        with interruptible() as caught:
            yield caught
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(flows.cli, "interruptible", signalled_as_it_ends)

    # Act
    try:
        code, _, err = _main(["data", "--help"])
    except KeyboardInterrupt:
        pytest.fail("the interruption escaped main()")

    # Assert
    assert code == expected, f"exit {code}, expected {expected}: {err}"
    assert err.strip().splitlines() == ["error: interrupted"], err


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "expected"), [(signal.SIGTERM, 130), (signal.SIGHUP, 129)],
                         ids=["SIGTERM", "SIGHUP"])  # fmt: skip
def test_a_signal_during_a_tracked_train_ends_its_runs_killed(
    tmp_path, tracking_uri, reaped, signum, expected
):
    # Arrange: a training long enough to be stopped while it runs.
    database = Path(tracking_uri.removeprefix("sqlite:///"))
    env = {**_clean_env(tmp_path), "MLFLOW_TRACKING_URI": tracking_uri}
    argv = [str(CLI), "train", "--preset", "quick", "--final-epochs", "100000", "--no-progress"]
    proc = reaped(subprocess.Popen(
        argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    ))  # fmt: skip
    deadline = time.monotonic() + 300
    while "RUNNING" not in _statuses(database):
        assert proc.poll() is None, f"train ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, "the parent run never opened"
        time.sleep(0.2)

    # Act
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)

    # Assert
    assert proc.returncode == expected, f"exit {proc.returncode}, expected {expected}: {err!r}"
    assert "error: interrupted" in err and "Traceback" not in err, err
    statuses = _statuses(database)
    assert statuses and set(statuses) == {"KILLED"}, f"MLflow runs left as {statuses}"
    (record,) = (tmp_path / ".mlp-pipeline" / "runs").iterdir()
    run = json.loads((record / "run.json").read_text())["data"]
    assert run["status"] == "KILLED" and "interrupted" in run["error"], run
