"""The run record (``pipeline.record``): atomic files, checksummed JSON envelopes, the fold cache
and its key, a record's life (RUNNING -> FINISHED / FAILED / KILLED), the cache folder check.

One small real record (the bundled ``mnist-sample``, a 784-8-10 network, 2 lambdas x 2 folds,
2 epochs) is built once per module; tests that damage files work on a copy of it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import shutil
import socket
import subprocess
import threading
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import pipeline.record
from mlp import MLP
from pipeline.config import PipelineConfig, build_config
from pipeline.data import fingerprint_test_set
from pipeline.errors import ConfigError
from pipeline.record import (
    FORMAT,
    FoldCache,
    RecordError,
    RunRecord,
    check_cache_dir,
    check_files,
    fold_key,
    pid_alive,
    read_json,
    write_bytes,
    write_json,
)
from pipeline.results import FoldResult
from pipeline.selection import cv_table, select_candidate
from pipeline.training import load_configured_dataset, predict_test, train_final, train_fold

EPOCHS = 2
L2_GRID = [1e-4, 1e-2]
FOLDS = 2


# ------------------------------------------------------------------------------------ fixtures
def _small_config(cache_dir: Path) -> PipelineConfig:
    return build_config(
        overrides={
            "data.dataset": "mnist-sample",
            "data.limit_train": 600,
            "data.limit_test": 300,
            "model.hidden_sizes": [8],
            "training.epochs": EPOCHS,
            "cv.l2_lambdas": L2_GRID,
            "cv.folds": FOLDS,
            "execution.runner": "thread",
            "execution.cache_dir": str(cache_dir),
        }
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> SimpleNamespace:
    """A complete, FINISHED record of real trainings, and what was written into it."""
    config = _small_config(tmp_path_factory.mktemp("record") / "cache")
    dataset = load_configured_dataset(config.data)
    folds = [
        train_fold(config, dataset, {"training.l2_lambda": l2}, fold)
        for l2 in L2_GRID
        for fold in range(FOLDS)
    ]
    table = cv_table(folds)
    best = select_candidate(table)
    final = train_final(config, dataset, best)
    evaluation, predicted = predict_test(final, dataset)
    test_set = fingerprint_test_set(dataset.X_test, dataset.y_test)
    data = {"name": dataset.name, "fingerprint": dataset.fingerprint}
    record = RunRecord.create(config, flow="mlp-pipeline", dataset=data)
    for result in folds:
        record.add_fold(result)
    record.add_cv(table, best)
    record.add_final(final, evaluation, dataset.X_test, dataset.y_test, predicted, test_set)
    record.finish("FINISHED", summary={"wall_seconds": 1.5})
    return SimpleNamespace(
        config=config, dataset=dataset, folds=folds, table=table, best=best, final=final,
        evaluation=evaluation, predicted=predicted, test_set=test_set, record=record,
    )  # fmt: skip


@pytest.fixture()
def copied(built, tmp_path) -> RunRecord:
    """A copy of the module's record, free to damage."""
    folder = tmp_path / "copy" / built.record.folder.name
    shutil.copytree(built.record.folder, folder)
    return RunRecord(folder)


@pytest.fixture()
def config(tmp_path) -> PipelineConfig:
    return _small_config(tmp_path / "cache")


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def _rewrite(path: Path, edit) -> None:
    """Apply ``edit`` to a record file's JSON and write it back as valid JSON (checksum kept)."""
    envelope = json.loads(path.read_text(encoding="utf-8"))
    edit(envelope)
    path.write_text(json.dumps(envelope, indent=1), encoding="utf-8")


def _as_json(result: FoldResult) -> str:
    """A fold result as text: NaN equals NaN here, unlike in ``==``."""
    return json.dumps(asdict(result), sort_keys=True)


# ------------------------------------------------------------------------------ atomic writes
def test_write_bytes_replaces_the_file_and_leaves_no_temporary(tmp_path):
    # Arrange
    path = tmp_path / "deep" / "file.bin"

    # Act
    write_bytes(path, b"first")
    write_bytes(path, b"second")

    # Assert
    assert path.read_bytes() == b"second", path.read_bytes()
    assert sorted(p.name for p in path.parent.iterdir()) == ["file.bin"], "a temporary was left"


@pytest.mark.parametrize("failure", ["bad content", "rename fails", "interrupted at the rename"])
def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_partial(
    tmp_path, monkeypatch, failure
):
    # Arrange
    path = tmp_path / "file.bin"
    write_bytes(path, b"old content")
    content: object = b"new content"
    expected: type[BaseException] = RecordError  # an OSError: one line naming the file
    if failure == "bad content":
        content, expected = "text, not bytes", TypeError
    else:
        raised = OSError("disk full") if failure == "rename fails" else KeyboardInterrupt()

        def failing_replace(*args, **kwargs):
            raise raised

        monkeypatch.setattr(os, "replace", failing_replace)
        expected = RecordError if failure == "rename fails" else KeyboardInterrupt

    # Act
    with pytest.raises(expected):
        write_bytes(path, content)  # type: ignore[arg-type]
    monkeypatch.undo()

    # Assert
    assert path.read_bytes() == b"old content", f"{failure}: the old file was damaged"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"], f"{failure}: a partial file left"


def test_readers_see_the_old_file_or_the_new_one_never_a_part(tmp_path):
    # Arrange: two large contents, written in turn while another thread reads.
    path = tmp_path / "big.bin"
    versions = (b"a" * 2_000_000, b"b" * 3_000_000)
    write_bytes(path, versions[0])
    seen: list[int] = []
    odd: list[int] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            content = path.read_bytes()
            (seen if content in versions else odd).append(len(content))

    reader = threading.Thread(target=read)
    reader.start()

    # Act
    try:
        for i in range(60):
            write_bytes(path, versions[i % 2])
    finally:
        done.set()
        reader.join(timeout=60)

    # Assert
    assert seen, "the reader never read the file"
    assert odd == [], f"the reader saw {len(odd)} partial files (sizes {odd[:5]})"


# ------------------------------------------------------------------------------ envelopes
def test_an_envelope_round_trips_and_names_its_kind_and_checksum(tmp_path):
    # Arrange
    data = {"numbers": [1, 2.5, -3e-7], "text": "λ", "nested": {"nan": math.nan, "none": None}}

    # Act
    write_json(tmp_path / "x.json", "thing", data)
    read = read_json(tmp_path / "x.json", "thing")
    envelope = json.loads((tmp_path / "x.json").read_text(encoding="utf-8"))

    # Assert
    assert read["numbers"] == data["numbers"] and read["text"] == "λ", read
    assert math.isnan(read["nested"]["nan"]) and read["nested"]["none"] is None, read
    assert (envelope["kind"], envelope["format"]) == ("thing", FORMAT), envelope
    assert re.fullmatch(r"[0-9a-f]{64}", envelope["sha256"]), envelope["sha256"]


def test_a_reformatted_envelope_is_still_valid(tmp_path):
    # The checksum covers the content, not its layout: re-indenting a file changes nothing.
    path = tmp_path / "x.json"
    write_json(path, "thing", {"b": 1, "a": [1, 2]})
    envelope = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps(envelope, indent=8, sort_keys=False), encoding="utf-8")

    assert read_json(path, "thing") == {"b": 1, "a": [1, 2]}, "a re-indented file was refused"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda e: e["data"].update(accuracy=0.99), "does not match its checksum"),
        (lambda e: e["data"]["values"].append(4), "does not match its checksum"),
        (lambda e: e.update(sha256="0" * 64), "does not match its checksum"),
        (lambda e: e.update(kind="fold"), "a 'fold' file"),
        (lambda e: e.update(format=FORMAT + 1), f"of format {FORMAT + 1}"),
        (lambda e: e.pop("sha256"), "unreadable record file"),
        (lambda e: e.pop("data"), "unreadable record file"),
    ],
    ids=["number", "list", "checksum", "kind", "format", "no-checksum", "no-data"],
)
def test_an_edited_but_valid_json_file_is_refused(tmp_path, edit, message):
    # Arrange: still valid JSON after the edit.
    path = tmp_path / "x.json"
    write_json(path, "cv", {"accuracy": 0.91, "values": [1, 2, 3]})
    _rewrite(path, edit)

    # Act / Assert
    with pytest.raises(RecordError, match=message) as info:
        read_json(path, "cv")
    assert str(path) in str(info.value), f"the message does not name the file: {info.value}"


@pytest.mark.parametrize(
    "content", [None, b"", b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe"],
    ids=["missing", "empty", "truncated", "a-list", "a-string", "binary"],
)  # fmt: skip
def test_a_missing_or_unreadable_file_is_a_record_error(tmp_path, content):
    # Arrange
    path = tmp_path / "x.json"
    if content is not None:
        path.write_bytes(content)

    # Act / Assert
    with pytest.raises(RecordError, match="unreadable record file"):
        read_json(path, "cv")


def test_check_files_catches_an_edited_or_missing_file(tmp_path):
    # Arrange
    (tmp_path / "a.bin").write_bytes(b"abc")
    checksums = {"a.bin": pipeline.record.file_sha256(tmp_path / "a.bin")}
    check_files(tmp_path, checksums)  # as written: accepted

    # Act / Assert
    (tmp_path / "a.bin").write_bytes(b"abd")
    with pytest.raises(RecordError, match="a.bin: missing or does not match"):
        check_files(tmp_path, checksums)
    (tmp_path / "a.bin").unlink()
    with pytest.raises(RecordError, match="a.bin: missing or does not match"):
        check_files(tmp_path, checksums)


# ------------------------------------------------------------------------------ the record
def test_a_new_record_is_running_and_says_what_runs(config):
    # Act
    record = RunRecord.create(
        config,
        flow="cv",
        dataset={"name": "mnist-sample", "fingerprint": "f" * 64},
        prefect_flow_run={"id": "abc", "name": "brave-fox"},
        params={"l2_lambda": 0.001},
    )
    run = record.run()

    # Assert
    runs = Path(config.execution.cache_dir).resolve() / "runs"
    assert record.folder.parent == runs, f"record at {record.folder}, not under {runs}"
    assert run["id"] == record.folder.name, run["id"]
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{8}", run["id"]), run["id"]
    assert (run["status"], run["end_time"], run["error"]) == ("RUNNING", None, ""), run
    assert (run["host"], run["pid"]) == (socket.gethostname(), os.getpid()), run
    assert run["flow"] == "cv" and run["params"] == {"l2_lambda": 0.001}, run
    assert run["prefect_flow_run"] == {"id": "abc", "name": "brave-fox"}, run
    assert PipelineConfig.model_validate(run["config"]) == config, "config does not round-trip"
    assert run["package_version"] == pipeline.record.package_version(), run["package_version"]
    assert record.folds() == [] and record.cv() is None and record.final() is None


def test_two_records_started_together_get_two_folders(config):
    records = [RunRecord.create(config, flow="cv", dataset={}) for _ in range(5)]
    assert len({r.folder for r in records}) == 5, [r.folder.name for r in records]


def test_folds_cv_and_final_read_back_as_written(built):
    # Act
    record = RunRecord(built.record.folder)
    folds, cv, final = record.folds(), record.cv(), record.final()

    # Assert
    names = sorted(p.name for p in (record.folder / "folds").iterdir())
    assert names == [
        f"lambda={l2:g}-fold={fold}.json" for l2 in L2_GRID for fold in range(FOLDS)
    ], names
    assert folds == sorted(built.folds, key=lambda r: (r.l2_lambda, r.fold)), "folds differ"
    pd.testing.assert_frame_equal(cv["table"], built.table, check_dtype=False)
    assert cv["best"] == built.best, cv["best"]
    assert cv["best_l2_lambda"] == built.best["training.l2_lambda"], cv["best_l2_lambda"]
    assert set(cv["files"]) == {"cv_lambda.png"}, cv["files"]
    assert final["evaluation"] == asdict(built.evaluation), final["evaluation"]
    best = built.best["training.l2_lambda"]
    assert (final["l2_lambda"], final["test_set"]) == (best, built.test_set), final
    assert json.dumps(final["history"]) == json.dumps(built.final.history), "history differs"
    expected_files = {
        "final/weights.npz", "final/normalizer.json", "training_curves.png",
        "confusion_matrix.png", "misclassified.png",
    }  # fmt: skip
    assert set(final["files"]) == expected_files, final["files"]
    assert np.asarray(final["input_example"]).shape == (5, 784), "input example shape"
    network = MLP.load(record.folder / "final" / "weights.npz")
    for mine, theirs in zip(network.params, built.final.network.params, strict=True):
        np.testing.assert_array_equal(mine, theirs, err_msg="the recorded weights differ")


@pytest.mark.parametrize(
    ("damaged", "reader"),
    [
        ("cv_lambda.png", "cv"),
        ("final/weights.npz", "final"),
        ("final/normalizer.json", "final"),
        ("misclassified.png", "final"),
    ],
)
def test_an_edited_binary_file_of_the_record_is_refused(copied, damaged, reader):
    # Arrange: one byte changed in the middle of the file.
    path = copied.folder / damaged
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0xFF
    path.write_bytes(bytes(content))

    # Act / Assert
    with pytest.raises(RecordError, match=re.escape(damaged)):
        getattr(copied, reader)()


def test_an_edited_fold_number_is_refused(copied):
    # Arrange: a better accuracy typed into a fold file, still valid JSON.
    path = sorted((copied.folder / "folds").iterdir())[0]
    _rewrite(path, lambda e: e["data"].update(val_accuracy=0.999))

    # Act / Assert
    with pytest.raises(RecordError, match="does not match its checksum"):
        copied.folds()


def test_finish_records_status_time_error_and_summary(config):
    # Arrange
    record = RunRecord.create(config, flow="cv", dataset={})
    started = record.run()["start_time"]

    # Act
    record.finish("FAILED", error="x" * 6000, summary={"wall_seconds": 2.0})
    record.finish("FAILED", error="again", summary={"trained_folds": 4})
    run = record.run()

    # Assert
    assert run["status"] == "FAILED", run["status"]
    assert run["end_time"] >= started, (started, run["end_time"])
    assert run["error"] == "again", run["error"]
    assert run["summary"] == {"wall_seconds": 2.0, "trained_folds": 4}, "summaries merge"
    record.finish("FAILED", error="y" * 6000)
    assert len(record.run()["error"]) == 5000, "a long error is cut to 5000 characters"


@pytest.mark.parametrize("status", ["RUNNING", "DONE", "finished"])
def test_finish_refuses_an_unknown_status(config, status):
    record = RunRecord.create(config, flow="cv", dataset={})
    with pytest.raises(ValueError, match="status must be one of"):
        record.finish(status)
    assert record.run()["status"] == "RUNNING", "a refused status was written"


@pytest.mark.parametrize(
    ("exception", "status", "error"),
    [
        (RuntimeError("boom\n  second line"), "FAILED", "RuntimeError: boom second line"),
        (ValueError(""), "FAILED", "ValueError: ValueError"),
        (KeyboardInterrupt(), "KILLED", "interrupted (KeyboardInterrupt)"),
        (SystemExit(143), "KILLED", "interrupted (SystemExit)"),
    ],
    ids=["error", "empty-message", "ctrl-c", "exit"],
)
def test_running_ends_the_record_failed_or_killed(config, exception, status, error):
    # Arrange
    record = RunRecord.create(config, flow="cv", dataset={})

    # Act
    with pytest.raises(type(exception)), record.running():
        raise exception

    # Assert: the exception went through, and the record says how it ended.
    run = record.run()
    assert (run["status"], run["error"]) == (status, error), run
    assert run["end_time"] is not None, "no end time"


def test_running_leaves_a_record_it_did_not_end_alone(config):
    # Arrange
    finished = RunRecord.create(config, flow="cv", dataset={})
    still_running = RunRecord.create(config, flow="cv", dataset={})

    # Act
    with pytest.raises(RuntimeError), finished.running():
        finished.finish("FINISHED")
        raise RuntimeError("after the end")
    with still_running.running():
        pass

    # Assert
    assert finished.run()["status"] == "FINISHED", "an error after the end changed the status"
    assert still_running.run()["status"] == "RUNNING", "a block without error ended the record"


def test_a_record_left_running_by_a_dead_process_reads_as_failed(config):
    # Arrange: three RUNNING records: a dead process of this host, one of another host, ours.
    dead, foreign, alive = (RunRecord.create(config, flow="cv", dataset={}) for _ in range(3))
    pid = _dead_pid()
    for record, changes in ((dead, {"pid": pid}), (foreign, {"pid": pid, "host": "elsewhere"})):
        run = read_json(record.folder / "run.json", "run")
        write_json(record.folder / "run.json", "run", {**run, **changes})

    # Act
    runs = [record.run() for record in (dead, foreign, alive)]

    # Assert
    assert runs[0]["status"] == "FAILED", runs[0]
    assert runs[0]["error"] == "the process ended without closing the run", runs[0]["error"]
    assert runs[1]["status"] == "RUNNING", "another host's process cannot be checked from here"
    assert runs[2]["status"] == "RUNNING", "this process is alive"


def test_pid_alive():
    assert pid_alive(os.getpid()), "this process"
    assert pid_alive(1), "init exists (even when owned by someone else)"
    assert not pid_alive(_dead_pid()), "a reaped process"


# ------------------------------------------------------------------------------ fold cache
def test_the_fold_cache_returns_what_was_put(built, tmp_path, caplog):
    # Arrange
    cache = FoldCache(tmp_path / "cache")
    diverged = replace(
        built.folds[0], val_accuracy=math.nan, val_loss=math.nan, diverged=True, message="inf"
    )

    # Act
    with caplog.at_level(logging.WARNING, logger="pipeline.record"):
        missing = cache.get("fold-absent")
        cache.put("fold-a", built.folds[0])
        cache.put("fold-b", diverged)
        got = cache.get("fold-a"), cache.get("fold-b")

    # Assert
    assert missing is None and caplog.records == [], "an absent entry is no warning"
    assert got[0] == built.folds[0], "the cached result differs"
    assert _as_json(got[1]) == _as_json(diverged), "a diverged result (NaN) differs"
    assert (tmp_path / "cache" / "folds" / "fold-a.json").is_file(), "not under <cache>/folds/"


@pytest.mark.parametrize(
    "damage",
    ["edited number", "truncated", "not json", "another kind", "another format", "not a fold"],
)
def test_a_damaged_fold_cache_entry_is_not_used(built, tmp_path, caplog, damage):
    # Arrange
    cache = FoldCache(tmp_path)
    cache.put("fold-x", built.folds[0])
    path = tmp_path / "folds" / "fold-x.json"
    if damage == "edited number":
        _rewrite(path, lambda e: e["data"].update(val_accuracy=0.999))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "not json":
        path.write_bytes(b"\x00" * 100)
    elif damage == "another kind":
        write_json(path, "run", asdict(built.folds[0]))
    elif damage == "another format":
        _rewrite(path, lambda e: e.update(format=FORMAT - 1))
    else:  # a valid envelope whose data is not a FoldResult
        write_json(path, "fold", {**asdict(built.folds[0]), "surprise": 1})

    # Act
    with caplog.at_level(logging.WARNING, logger="pipeline.record"):
        got = cache.get("fold-x")

    # Assert
    assert got is None, f"{damage}: a damaged entry was used"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "trained again" in warnings[0], warnings
    assert str(path) in warnings[0] or damage == "not a fold", f"file not named: {warnings}"


class _Payload:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_nothing_in_the_fold_cache_is_unpickled(tmp_path, caplog):
    # Arrange: a pickle whose loading runs code, under the entry's name and beside it.
    payload = pickle.dumps(_Payload(tmp_path / "ran"))
    pickle.loads(pickle.dumps(_Payload(tmp_path / "control")))
    assert (tmp_path / "control").exists(), "the payload does not run code when unpickled"
    folder = tmp_path / "cache" / "folds"
    folder.mkdir(parents=True)
    for name in ("fold-x.json", "fold-x.pkl", "fold-x.pickle", "fold-x"):
        (folder / name).write_bytes(payload)

    # Act
    with caplog.at_level(logging.WARNING, logger="pipeline.record"):
        got = FoldCache(tmp_path / "cache").get("fold-x")

    # Assert
    assert got is None, f"a pickle was taken for a fold result: {got}"
    assert not (tmp_path / "ran").exists(), "the fold cache unpickled its entry and ran its code"
    assert "trained again" in caplog.text, "the refused entry was not reported"


# ------------------------------------------------------------------------------ fold_key
FINGERPRINT = "a" * 64
# Spelled out (not a preset) so every override below really changes a value.
BASE_VALUES = {
    "data.dataset": "mnist-sample", "data.normalization": "standardize",
    "model.hidden_sizes": [64], "model.activation": "relu", "model.init": "he",
    "model.dtype": "float32", "training.optimizer": "nesterov", "training.lr": 0.05,
    "training.momentum": 0.9, "training.schedule": "cosine", "training.batch_size": 128,
    "training.epochs": 3, "training.dropout": 0.0, "cv.l2_lambdas": [1e-4, 1e-3], "cv.folds": 2,
    "cv.shuffle": True, "cv.stratify": True, "cv.seed": 0, "execution.runner": "thread",
}  # fmt: skip
BASE = build_config(overrides=BASE_VALUES)


def _key(config: PipelineConfig = BASE, fingerprint: str = FINGERPRINT, lam=1e-3, fold=1) -> str:
    return fold_key(config, fingerprint, {"training.l2_lambda": lam}, fold)


def test_key_is_stable_and_well_formed():
    # Act
    first = _key()
    second = fold_key(
        build_config(overrides=BASE_VALUES), FINGERPRINT, {"training.l2_lambda": 1e-3}, 1
    )

    # Assert
    assert first == second, "equal inputs gave different keys"
    assert re.fullmatch(r"fold-[0-9a-f]{32}", first), f"key {first!r} is not fold-<32 hex>"


@pytest.mark.parametrize(
    ("label", "kwargs"),
    [
        ("fingerprint", {"fingerprint": "b" * 64}),
        ("lambda", {"lam": 1e-4}),
        ("lambda-zero", {"lam": 0.0}),
        ("lambda-nearby", {"lam": 1e-3 * (1 + 1e-15)}),
        ("fold", {"fold": 0}),
        ("final-model", {"fold": -1}),
    ],
)
def test_key_changes_with_data_lambda_and_fold(label, kwargs):
    # Act
    changed = _key(**kwargs)

    # Assert
    assert changed != _key(), f"changing the {label} kept the cache key"


@pytest.mark.parametrize(
    "override",
    [
        {"cv.seed": 1},
        {"cv.folds": 3},
        {"cv.shuffle": False},
        {"cv.stratify": False},
        {"model.hidden_sizes": [32]},
        {"model.activation": "tanh"},
        {"model.init": "glorot"},
        {"model.dtype": "float64"},
        {"training.optimizer": "adam"},
        {"training.lr": 0.01},
        {"training.momentum": 0.5},
        {"training.schedule": "constant"},
        {"training.batch_size": 64},
        {"training.epochs": 4},
        {"training.dropout": 0.2},
        {"training.early_stopping": 2},
        {"data.normalization": "scale"},
        {"data.limit_train": 1000},
        {"data.dataset": "mnist"},
    ],
    ids=lambda o: next(iter(o)),
)
def test_key_changes_with_result_relevant_settings(override):
    # Arrange
    config = BASE.replace(override)
    assert config != BASE, f"{override} is not a change from the base config"

    # Act
    changed = _key(config)

    # Assert
    assert changed != _key(), f"{override} changes the result but kept the cache key"


@pytest.mark.parametrize(
    "override",
    [
        {"execution.runner": "sequential"},
        {"execution.workers": 7},
        {"execution.blas_threads": 3},
        {"execution.final_blas_threads": 3},
        {"execution.retries": 0},
        {"execution.resume": False},
        {"execution.cache_dir": "/elsewhere"},
        {"execution.runner": "dask", "execution.dask_address": "tcp://127.0.0.1:8786"},
        {"tracking.tracking_uri": "http://127.0.0.1:5000"},
        {"tracking.experiment": "other"},
        {"tracking.registered_model": None},
        {"data.data_dir": "/some/where/else"},
        {"data.download": False},
        {"cv.l2_lambdas": [1e-3]},
        {"training.final_epochs": 30},
        {"cv.l2_lambdas": [1e-3, 1e-4, 1e-2, 1e-1, 0.0]},
    ],
    ids=lambda o: "+".join(o),
)
def test_key_ignores_execution_tracking_location_and_grid(override):
    # Arrange
    config = BASE.replace(override)
    assert config != BASE, f"{override} is not a change from the base config"

    # Act
    same = _key(config)

    # Assert
    assert same == _key(), f"{override} cannot change a fold's result but changed the cache key"


def test_adding_a_lambda_to_the_grid_keeps_the_other_keys():
    # Arrange
    grown = BASE.replace({"cv.l2_lambdas": [*BASE.cv.l2_lambdas, 1e-2]})

    # Act
    before = {(l2, k): _key(BASE, lam=l2, fold=k) for l2 in BASE.cv.l2_lambdas for k in (0, 1)}
    after = {(l2, k): _key(grown, lam=l2, fold=k) for l2 in grown.cv.l2_lambdas for k in (0, 1)}

    # Assert
    assert {item: after[item] for item in before} == before, "a grown grid changed old keys"
    assert len(set(after.values())) == len(after), "two (lambda, fold) share a key"


def test_key_changes_with_package_version(monkeypatch):
    # Arrange
    before = _key()
    monkeypatch.setattr(pipeline.record, "package_version", lambda: "999.0")

    # Act
    after = _key()

    # Assert
    assert after != before, "a new package version must not reuse old fold results"


def test_key_does_not_mutate_the_config():
    # Arrange
    dumped = BASE.model_dump()

    # Act
    _key()

    # Assert
    assert BASE.model_dump() == dumped, "computing a key changed the config"


# ------------------------------------------------------------------------------ the folder
def test_check_cache_dir_accepts_a_folder_yet_to_be_made(tmp_path):
    # Act
    folder = check_cache_dir(tmp_path / "a" / "cache")

    # Assert
    assert folder == (tmp_path / "a" / "cache").resolve(), folder
    assert not (tmp_path / "a").exists(), "a check must not create anything"


def test_check_cache_dir_makes_a_relative_folder_absolute(tmp_path):
    # The tests run in tmp_path (tests/conftest.py).
    assert check_cache_dir(".mlp-pipeline") == (tmp_path / ".mlp-pipeline").resolve()


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_check_cache_dir_refuses_a_file_in_the_way(tmp_path, where):
    # Arrange
    (tmp_path / "f").write_text("not a folder", encoding="utf-8")
    path = tmp_path / "f" if where == "file" else tmp_path / "f" / "cache"

    # Act / Assert
    with pytest.raises(ConfigError, match="is not a folder") as info:
        check_cache_dir(path)
    assert "\n" not in str(info.value), f"one line: {info.value!r}"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_check_cache_dir_refuses_a_read_only_folder(tmp_path):
    # Arrange
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)

    # Act / Assert
    try:
        with pytest.raises(ConfigError, match="is not writable"):
            check_cache_dir(locked / "cache")
    finally:
        locked.chmod(0o700)
