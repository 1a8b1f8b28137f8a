"""The mlp-pipeline command line: a real train run, one-line errors with exit code 2, data commands.

No Prefect and no MLflow here: ``train`` runs with ``--no-track``.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CLI = Path(sys.executable).with_name("mlp-pipeline")
QUICK_TRAIN = ["train", "--dataset", "mnist-sample", "--epochs", "1", "--hidden", "16",
               "--no-track", "--no-progress"]  # fmt: skip


def _clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLP_PIPELINE_DEBUG"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path}/should-not-exist.db"
    env["COLUMNS"] = "200"
    return env


def _assert_one_error_line(code: int, err: str, fragment: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit code {code}, expected 2; stderr: {err!r}"
    assert "Traceback" not in err, f"a traceback leaked to stderr:\n{err}"
    assert len(lines) == 1, f"expected ONE stderr line, got {len(lines)}:\n{err}"
    assert lines[0].startswith("error:"), f"stderr line should start with 'error:': {lines[0]!r}"
    assert fragment.lower() in lines[0].lower(), f"expected {fragment!r} in {lines[0]!r}"


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("MLP_PIPELINE_DEBUG", raising=False)


# ----------------------------------------------------------------------------- train


def test_train_on_the_sample_prints_test_accuracy(tmp_path):
    # Arrange: the installed console script, run in an empty folder.
    env = _clean_env(tmp_path)

    # Act
    proc = subprocess.run(
        [str(CLI), *QUICK_TRAIN], capture_output=True, text=True, cwd=tmp_path, env=env,
        timeout=120,
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


def test_console_script_error_has_no_traceback(tmp_path):
    # Arrange
    env = _clean_env(tmp_path)

    # Act
    proc = subprocess.run(
        [str(CLI), "train", "--lr", "-1", "--dataset", "mnist-sample", "--no-track"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60,
    )  # fmt: skip

    # Assert
    _assert_one_error_line(proc.returncode, proc.stderr, "training.lr")
    assert proc.stdout.strip() == "", f"nothing should go to stdout on error: {proc.stdout!r}"


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        pytest.param(["--bogus"], "--bogus"),
        (["--lr", "-1"], "training.lr"),
        pytest.param(["--lr", "abc"], "--lr"),
        (["--hidden", "0"], "model.hidden_sizes"),
        (["--hidden", "abc"], "--hidden"),
        (["--hidden", "1.5"], "--hidden"),
        pytest.param(["--epochs", "abc"], "--epochs"),
        (["--epochs", "0"], "training.final_epochs"),
        pytest.param(["--l2", "-1"], "--l2"),
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
        (["--epochs", "99999999999999999999999"], "training.final_epochs"),
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
    _assert_one_error_line(code, err, "training.epochz")


def test_empty_data_dir_without_download_exits_2(cli, tmp_path):
    # Arrange
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["train", "--dataset", "mnist", "--data-dir", str(empty), "--set",
            "data.download=false", "--no-track", "--no-progress"]  # fmt: skip

    # Act
    code, out, err = cli(argv)

    # Assert
    _assert_one_error_line(code, err, "error:")
    assert str(empty) in err or "download" in err.lower(), (
        f"the message should say where it looked or how to get the data: {err!r}"
    )
    assert list(empty.iterdir()) == [], "nothing should be downloaded with data.download=false"


def test_dask_address_without_dask_runner_exits_2(cli):
    # Act
    code, out, err = cli(
        ["train", "--set", "execution.dask_address=tcp://127.0.0.1:1", "--no-track"]
    )

    # Assert: rejected by validation, before any flow or server starts.
    _assert_one_error_line(code, err, "dask_address")


def test_no_arguments_shows_help_without_error(cli):
    # Act
    code, out, err = cli([])

    # Assert
    assert "train" in out + err, f"help should list the commands:\n{out}{err}"
    assert "Traceback" not in err, f"traceback on bare invocation:\n{err}"
    assert "unexpected error" not in err, f"bare invocation is not an unexpected error:\n{err}"
    assert code in (0, 2), f"bare invocation should exit 0 or 2 (usage), got {code}"


def test_help_exits_0(cli):
    # Act
    code, out, err = cli(["train", "--help"])

    # Assert
    assert code == 0, f"--help should exit 0, got {code}; stderr {err!r}"
    assert "--no-track" in out, f"train --help should list its options:\n{out}"
    # Help text is Rich markup: section names in brackets must survive as text.
    assert "[data]," in out, f"--config's help lost its section names:\n{out}"


# ----------------------------------------------------------------------------- data


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
    import shutil

    from pipeline.data import SPECS

    monkeypatch.setenv("COLUMNS", "80")
    folder = tmp_path / "mnist"
    shutil.copytree(shared_data_dir / "mnist", folder)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    wrong = b"\x00\x00\x08\x01\x00\x00\x00\x01\x07"
    (folder / "t10k-labels-idx1-ubyte").write_bytes(wrong)
    expected = SPECS["mnist"].sha256["test_labels"]

    # Act
    code, out, err = cli(["data", "verify", "--dataset", "mnist", "--data-dir", str(tmp_path)])

    # Assert: exit 2, one error line, and both hashes of the bad file whole on stdout.
    assert code == 2, f"a corrupt or missing file should exit 2, got {code}; stderr {err!r}"
    assert "Traceback" not in err, f"traceback leaked:\n{err}"
    assert err.strip().startswith("error:"), f"stderr should start with 'error:': {err!r}"
    assert out.count(" ok") == 3 and "MISMATCH" in out, out
    assert f"expected {expected}" in out, f"the expected hash, whole:\n{out}"
    assert f"actual   {hashlib.sha256(wrong).hexdigest()}" in out, f"the actual hash:\n{out}"


def test_data_info_exits_0(cli, shared_data_dir, monkeypatch):
    # Arrange: an 80-column terminal
    monkeypatch.setenv("COLUMNS", "80")

    # Act
    code, out, err = cli(["data", "info", "--data-dir", str(shared_data_dir)])

    # Assert: every file's path, relative to the data folder, whole on one line.
    assert code == 0, f"exit {code}; stderr: {err}"
    for name in ("mnist", "fashion-mnist"):
        for role in ("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
            assert f" {name}/{role}.gz " in out, f"{name}/{role}.gz not shown whole:\n{out}"
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


def test_credentials_leave_the_config_of_every_command(monkeypatch):
    # Registered with monkeypatch so the variables are restored after the test.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "before")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "before")
    from pipeline.cli import config_from_options

    cfg = config_from_options(
        None, None, ["tracking.tracking_uri=http://bob:p%40ss@127.0.0.1:5000"]
    )

    assert cfg.tracking.tracking_uri == "http://127.0.0.1:5000", cfg.tracking
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "bob"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "p@ss"


# ----------------------------------------------------------------------------- tracked train


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("sqlite:///", "no database file"),
        ("http://127.0.0.1:9", "not reachable"),
    ],
)
def test_train_checks_the_store_before_training(cli, uri, fragment):
    # Act
    code, out, err = cli(["train", "--preset", "quick", "--no-progress", "--tracking-uri", uri])

    # Assert
    _assert_one_error_line(code, err, fragment)
    assert "test accuracy" not in out, f"it trained before checking the store:\n{out}"


def test_ui_command_quotes_the_store_and_makes_it_absolute(tmp_path):
    import shlex

    from pipeline.cli import ui_command

    # Act: a relative store whose folder has a space, as a user may pass it.
    command = ui_command("sqlite:///my store/mlflow.db")

    # Assert: a shell splits it back into the right, absolute URI.
    words = shlex.split(command)
    uri = words[words.index("--backend-store-uri") + 1]
    assert uri == f"sqlite:///{tmp_path / 'my store' / 'mlflow.db'}", command


# ----------------------------------------------------------------------------- evaluate


@pytest.fixture(scope="module")
def trained_sample_model(tmp_path_factory):
    """A model trained by `mlp-pipeline train` on the sample, recorded in a fresh store."""
    folder = tmp_path_factory.mktemp("evaluate")
    store = f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"
    env = {**_clean_env(folder), "MLFLOW_TRACKING_URI": store}
    proc = subprocess.run(
        [str(CLI), "train", "--preset", "quick", "--epochs", "2", "--no-progress"],
        capture_output=True, text=True, cwd=folder, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, f"train failed:\n{proc.stdout}\n{proc.stderr}"
    accuracy = re.search(r"test accuracy (\d\.\d+)", proc.stdout)
    run_id = re.search(r"MLflow run (\w+)", proc.stdout)
    assert accuracy and run_id, f"unexpected output:\n{proc.stdout}"
    return {"store": store, "accuracy": accuracy.group(1), "run_id": run_id.group(1)}


def _evaluated(cli, model_uri: str, store: str, *extra: str) -> tuple[str, str]:
    code, out, err = cli(["evaluate", "--model", model_uri, "--tracking-uri", store, *extra])
    assert code == 0, f"evaluate {model_uri} exited {code}: {err}"
    match = re.search(r"test accuracy (\d\.\d+) \((.+?), (\d+) test images", out)
    assert match, f"unexpected output: {out!r}"
    return match.group(1), f"{match.group(2)}/{match.group(3)}"


@pytest.mark.parametrize(
    "model_uri",
    ["models:/mlp-mnist-sample@champion", "models:/mlp-mnist-sample/1", "runs:/{run_id}/model"],
    ids=["alias", "version", "printed-run-id"],
)
def test_evaluate_scores_the_model_as_train_did(cli, trained_sample_model, model_uri):
    # Arrange: the run id `train` printed is the pipeline's parent run, not the final child's.
    uri = model_uri.format(run_id=trained_sample_model["run_id"])

    # Act: no --dataset: the model's own (the sample) is used.
    accuracy, scored_on = _evaluated(cli, uri, trained_sample_model["store"])

    # Assert
    assert accuracy == trained_sample_model["accuracy"], (
        f"evaluate {uri} gave {accuracy}, train printed {trained_sample_model['accuracy']}"
    )
    assert scored_on == "mnist-sample/1000", f"scored on {scored_on}, not the model's dataset"


def test_evaluate_reads_only_the_test_files(cli, trained_sample_model, shared_data_dir, tmp_path):
    import shutil

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
        cli, uri, trained_sample_model["store"],
        "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--limit-test", "2000",
    )  # fmt: skip

    # Assert: the same figure as scoring the full dataset's limited test set directly.
    test = load_dataset("mnist", shared_data_dir, download=False).limit(None, 2000)
    store = trained_sample_model["store"]
    client = mlflow.MlflowClient(store, registry_uri=store)
    source = client.get_model_version_by_alias("mlp-mnist-sample", "champion").source
    folder = client.get_logged_model(source.rpartition("/")[2]).artifact_location
    predicted = mlflow.pyfunc.load_model(folder).predict(test.X_test.astype(np.float32))
    expected = float(np.mean(np.asarray(predicted) == test.y_test))
    assert scored_on == "mnist/2000", scored_on
    assert accuracy == f"{expected:.4f}", f"evaluate printed {accuracy}, direct scoring {expected}"
    assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ], "evaluate fetched or wrote files it does not need"


def test_sigterm_during_a_tracked_train_ends_its_runs_killed(tmp_path):
    import signal
    import sqlite3
    import time

    # Arrange: a training long enough to be stopped while it runs.
    store = tmp_path / "mlruns" / "mlflow.db"
    env = {**_clean_env(tmp_path), "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    argv = [str(CLI), "train", "--preset", "quick", "--epochs", "2000", "--no-progress"]
    proc = subprocess.Popen(
        argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip

    def statuses() -> list[str]:
        if not store.is_file():
            return []
        with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as db:
            try:
                return [row[0] for row in db.execute("select status from runs")]
            except sqlite3.OperationalError:  # the schema is still being made
                return []

    try:
        deadline = time.monotonic() + 120
        while "RUNNING" not in statuses():
            assert proc.poll() is None, f"train ended early: {proc.communicate()}"
            assert time.monotonic() < deadline, "the parent run never opened"
            time.sleep(0.2)

        # Act
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    # Assert
    assert proc.returncode == 130, f"exit {proc.returncode}; stderr {err!r}"
    assert "error: interrupted" in err, err
    assert statuses() and set(statuses()) == {"KILLED"}, f"runs left as {statuses()}"
