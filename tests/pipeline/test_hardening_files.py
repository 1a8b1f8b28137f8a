"""Hostile and unlucky files (issue 15): resealed records with wrong values, FIFOs and other
non-regular files where files are expected, IDX headers that claim more than they should,
and full or read-only disks under the record.

Real files throughout: records written by real trainings, FIFOs made with ``os.mkfifo``, full
disks as small tmpfs mounts (skipped where mounting is not permitted).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import math
import os
import shutil
import socket
import struct
import subprocess
import threading
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from pipeline import data
from pipeline.config import build_config
from pipeline.data import dataset_status, load_dataset, load_test_set, verify_dataset
from pipeline.errors import ConfigError, DataError, PipelineError
from pipeline.idx import read_idx, read_idx_file, require_regular_file, write_idx
from pipeline.record import (
    FoldCache,
    RecordError,
    RunRecord,
    check_files,
    file_sha256,
    read_json,
    write_bytes,
    write_json,
)
from pipeline.results import FoldResult
from pipeline.selection import cv_table, select_candidate
from pipeline.training import load_configured_dataset, predict_test, train_final, train_fold

MNIST_TRAIN_IMAGES = (60000, 28, 28)


# ------------------------------------------------------------------------------------ helpers
def _reseal(path: Path, kind: str, edit: Callable[[Any], Any]) -> None:
    """Edit a record file's data and write it back with a valid checksum (as an attacker would)."""
    content = read_json(path, kind)
    write_json(path, kind, edit(content) or content)


def _set(**values: Any) -> Callable[[dict], None]:
    return lambda d: d.update(values)


def _drop(key: str) -> Callable[[dict], None]:
    return lambda d: d.pop(key) and None


def _without_blocking(fifo: Path, call: Callable[[], Any], wait: float = 5.0) -> Any:
    """``call()``'s result (or the exception it raised, returned), failing if it blocked on
    ``fifo``: the old behaviour. A blocked reader is released (a writer opens and closes the
    FIFO) so that a failing test ends instead of hanging the suite."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 (handed to the test)
            outcome["value"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(wait)
    blocked = thread.is_alive()
    for _ in range(50):  # each open of the FIFO the reader makes needs its own writer
        if not thread.is_alive():
            break
        with contextlib.suppress(OSError):  # ENXIO: nobody is reading at this instant
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(0.1)
    assert not blocked, f"blocked for {wait} s reading the FIFO {fifo}"
    return outcome["value"]


def _assert_one_line_naming(error: BaseException, kind: type, path: Path, *words: str) -> None:
    assert isinstance(error, kind), f"expected a {kind.__name__}, got {error!r}"
    message = str(error)
    assert "\n" not in message, f"one line: {message!r}"
    assert str(path) in message, f"the message does not name {path}: {message}"
    for word in words:
        assert word in message, f"{word!r} not in: {message}"


@contextlib.contextmanager
def _mounted_tmpfs(folder: Path, options: str) -> Iterator[Path]:
    """A small tmpfs at ``folder`` (skips the test where mounting is not permitted)."""
    folder.mkdir(parents=True, exist_ok=True)
    mount, umount = shutil.which("mount"), shutil.which("umount")
    if os.geteuid() != 0 or mount is None or umount is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    done = subprocess.run([mount, "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs not permitted here: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run([umount, str(folder)], check=True)


@pytest.fixture()
def full_disk(tmp_path) -> Iterator[Path]:
    """A 64 KiB filesystem, nearly full: room for a small file, not for a large one."""
    with _mounted_tmpfs(tmp_path / "full", "size=64k,mode=0755") as folder:
        yield folder


@pytest.fixture()
def read_only_disk(tmp_path) -> Iterator[Path]:
    """A read-only filesystem (even root cannot write it), holding one folder ``cache``."""
    with _mounted_tmpfs(tmp_path / "ro", "size=64k,mode=0755") as folder:
        (folder / "cache").mkdir()
        subprocess.run([shutil.which("mount") or "mount", "-o", "remount,ro", str(folder)],
                       check=True)  # fmt: skip
        yield folder


# ----------------------------------------------------------------------------- a real record
@pytest.fixture(scope="module")
def built(tmp_path_factory) -> SimpleNamespace:
    """A complete record of real (tiny) trainings: 2 lambdas x 2 folds, then the final model."""
    config = build_config(
        overrides={
            "data.dataset": "mnist-sample", "data.limit_train": 600, "data.limit_test": 300,
            "model.hidden_sizes": [8], "training.epochs": 2, "cv.l2_lambdas": [1e-4, 1e-2],
            "cv.folds": 2, "execution.runner": "thread",
            "execution.cache_dir": str(tmp_path_factory.mktemp("hardening") / "cache"),
        }
    )  # fmt: skip
    dataset = load_configured_dataset(config.data)
    folds = [
        train_fold(config, dataset, {"training.l2_lambda": l2}, fold)
        for l2 in (1e-4, 1e-2)
        for fold in (0, 1)
    ]
    table = cv_table(folds)
    best = select_candidate(table)
    final = train_final(config, dataset, best)
    evaluation, predicted = predict_test(final, dataset)
    record = RunRecord.create(
        config, flow="mlp-pipeline", dataset={"name": dataset.name, "fingerprint": "f" * 64}
    )
    for result in folds:
        record.add_fold(result)
    record.add_cv(table, best)
    record.add_final(final, evaluation, dataset.X_test, dataset.y_test, predicted, "t" * 64)
    record.finish("FINISHED")
    return SimpleNamespace(folds=folds, record=record)


@pytest.fixture()
def copied(built, tmp_path) -> RunRecord:
    """A copy of the module's record, free to damage."""
    folder = tmp_path / "copy" / built.record.folder.name
    shutil.copytree(built.record.folder, folder)
    return RunRecord(folder)


# =============================== 1. valid checksum, wrong field types or values ==============
# (case id, edit of a fold result's data, the field the message must name)
FOLD_VALUE_CASES: list[tuple[str, Callable[[dict], None], str]] = [
    ("accuracy-a-string", _set(val_accuracy="0.99"), "val_accuracy"),
    ("accuracy-above-1", _set(val_accuracy=1.5), "val_accuracy"),
    ("accuracy-nan-not-diverged", _set(val_accuracy=math.nan), "val_accuracy"),
    ("loss-infinite", _set(val_loss=math.inf), "val_loss"),
    ("loss-negative", _set(train_loss=-0.1), "train_loss"),
    ("accuracy-a-list", _set(train_accuracy=[0.9]), "train_accuracy"),
    ("accuracy-a-bool", _set(train_accuracy=True), "train_accuracy"),
    ("epochs-negative", _set(epochs=-3), "epochs"),
    ("epochs-a-float", _set(epochs=2.5), "epochs"),
    ("fold-a-string", _set(fold="0"), "fold"),
    ("seed-null", _set(seed=None), "seed"),
    ("lambda-nan", _set(l2_lambda=math.nan), "l2_lambda"),
    ("lambda-negative", _set(l2_lambda=-1e-3), "l2_lambda"),
    ("seconds-infinite", _set(seconds=math.inf), "seconds"),
    ("history-a-list", _set(history=[1, 2]), "history"),
    ("history-of-strings", _set(history={"epoch": ["1", "2"]}), "history"),
    ("diverged-a-string", _set(diverged="no"), "diverged"),
    ("message-a-number", _set(message=5), "message"),
    ("missing-val-loss", _drop("val_loss"), "val_loss"),
    ("missing-history", _drop("history"), "history"),
    ("unknown-field", _set(surprise=1), "surprise"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("edit", "field"), [c[1:] for c in FOLD_VALUE_CASES], ids=[c[0] for c in FOLD_VALUE_CASES]
)
def test_a_resealed_fold_cache_entry_with_a_bad_value_is_trained_again(
    built, tmp_path, caplog, edit, field
):
    # Arrange: an entry whose checksum matches its (wrong) content.
    cache = FoldCache(tmp_path / "cache")
    cache.put("fold-x", built.folds[0])
    path = cache.folder / "fold-x.json"
    _reseal(path, "fold", edit)

    # Act
    with caplog.at_level("WARNING", logger="pipeline.record"):
        got = cache.get("fold-x")

    # Assert
    assert got is None, f"a resealed entry with a bad {field} was used: {got}"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, f"expected one warning, got {warnings}"
    assert "trained again" in warnings[0] and str(path) in warnings[0], warnings[0]
    assert field in warnings[0], f"the warning does not name {field}: {warnings[0]}"


def test_a_diverged_fold_result_with_nan_metrics_is_still_valid(built, tmp_path):
    # Arrange: NaN metrics are what a diverged training records.
    cache = FoldCache(tmp_path / "cache")
    history = {"epoch": [1.0], "train_loss": [math.nan]}
    diverged = FoldResult(1e-3, 0, 7, math.nan, math.nan, math.nan, math.nan, 1, 0.2, history,
                          diverged=True, message="loss is inf")  # fmt: skip
    cache.put("fold-d", diverged)

    # Act
    got = cache.get("fold-d")

    # Assert
    assert got is not None and got.diverged, f"a diverged result was refused: {got}"
    assert math.isnan(got.val_accuracy), got


def test_a_resealed_fold_file_of_a_record_is_refused(copied):
    # Arrange
    path = sorted((copied.folder / "folds").iterdir())[0]
    _reseal(path, "fold", _set(val_accuracy="0.99"))

    # Act / Assert
    with pytest.raises(RecordError) as info:
        copied.folds()
    _assert_one_line_naming(info.value, RecordError, path, "val_accuracy")


# (case id, file, edit of its data, word the message must hold)
RECORD_VALUE_CASES: list[tuple[str, str, Callable[[dict], None], str]] = [
    ("cv-best-a-string", "cv", lambda d: d.update(best_l2_lambda=str(d["best_l2_lambda"])),
     "best_l2_lambda"),
    ("cv-best-not-in-table", "cv", _set(best_l2_lambda=0.5), "chosen candidate"),
    ("cv-best-candidate-not-in-table", "cv", _set(best={"training.l2_lambda": 0.5}),
     "chosen candidate"),
    ("cv-best-setting-not-in-table", "cv",
     lambda d: d.update(best={**d["best"], "training.lr": 0.5}), "chosen candidate"),
    ("cv-best-a-list", "cv", _set(best=[0.5]), "best"),
    ("cv-best-nan", "cv", _set(best_l2_lambda=math.nan), "best_l2_lambda"),
    ("cv-table-a-dict", "cv", _set(table={"l2_lambda": 1}), "table"),
    ("cv-table-empty", "cv", _set(table=[]), "table"),
    ("cv-row-accuracy-a-string", "cv",
     lambda d: d["table"][0].update(mean_val_accuracy="0.9"), "table"),
    ("cv-time-negative", "cv", _set(time=-1), "time"),
    ("cv-files-outside", "cv", _set(files={"../../etc/passwd": "0" * 64}), "files"),
    ("cv-missing-table", "cv", _drop("table"), "table"),
    ("final-accuracy-a-string", "final",
     lambda d: d["evaluation"].update(accuracy="0.93"), "accuracy"),
    ("final-loss-nan", "final", lambda d: d["evaluation"].update(loss=math.nan), "loss"),
    ("final-samples-negative", "final", lambda d: d["evaluation"].update(n_samples=-1),
     "n_samples"),
    ("final-confusion-miscounted", "final",
     lambda d: d["evaluation"]["confusion"][0].__setitem__(0, 10**6), "confusion"),
    ("final-lambda-a-list", "final", _set(l2_lambda=[1e-4]), "l2_lambda"),
    ("final-seconds-infinite", "final", _set(seconds=math.inf), "seconds"),
    ("final-history-without-epochs", "final", _set(history={"train_loss": [0.5]}), "history"),
    ("final-test-set-a-number", "final", _set(test_set=3), "test_set"),
    ("final-input-of-strings", "final", _set(input_example=[["0"] * 784]), "input_example"),
    ("final-evaluation-missing", "final", _drop("evaluation"), "evaluation"),
    ("run-pid-negative", "run", _set(pid=-1), "pid"),
    ("run-start-time-a-string", "run", _set(start_time="yesterday"), "start_time"),
    ("run-end-time-a-float", "run", _set(end_time=1.5), "end_time"),
    ("run-status-a-number", "run", _set(status=3), "status"),
    ("run-wall-seconds-a-string", "run", _set(summary={"wall_seconds": "1.5"}), "summary"),
    ("run-commit-a-list", "run", _set(git_commit=["abc"]), "git_commit"),
    ("run-user-a-number", "run", _set(user=0), "user"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "edit", "word"),
    [c[1:] for c in RECORD_VALUE_CASES],
    ids=[c[0] for c in RECORD_VALUE_CASES],
)
def test_a_resealed_cv_or_final_file_with_a_bad_value_is_refused(copied, name, edit, word):
    # Arrange
    path = copied.folder / f"{name}.json"
    _reseal(path, name, edit)

    # Act
    with pytest.raises(RecordError) as info:
        getattr(copied, name)()

    # Assert
    _assert_one_line_naming(info.value, RecordError, path, word)


def test_the_undamaged_record_reads_with_or_without_a_commit(copied):
    # Act
    folds, cv, final = copied.folds(), copied.cv(), copied.final()
    _reseal(copied.folder / "run.json", "run", _drop("git_commit"))  # an older record
    _reseal(copied.folder / "run.json", "run", _drop("user"))
    run = copied.run()

    # Assert: the baseline of the cases above.
    assert len(folds) == 4 and cv is not None and final is not None, (folds, cv, final)
    assert run["status"] == "FINISHED", run["status"]


# ============================== 5. non-regular files where files are expected ===============
def _make_special(path: Path, kind: str) -> Any:
    """Put a FIFO, a socket, a directory or a device (a symlink to /dev/null) at ``path``."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "device":
        path.symlink_to("/dev/null")
    else:
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(path))
        return listener  # kept open by the caller
    return None


SPECIAL = ["fifo", "socket", "device", "directory"]
WORDS = {"fifo": "FIFO", "socket": "socket", "device": "device", "directory": "directory"}


@pytest.fixture()
def short_tmp() -> Iterator[Path]:
    """A folder with a short path (a Unix socket's path is limited to 107 bytes)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="mlp-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("kind", SPECIAL)
def test_require_regular_file_refuses_what_is_not_a_file(short_tmp, kind):
    # Arrange
    path = short_tmp / "thing"
    keep = _make_special(path, kind)

    # Act
    try:
        with pytest.raises(ConfigError) as info:
            require_regular_file(path, ConfigError, "cannot read the config file")
    finally:
        if keep is not None:
            keep.close()

    # Assert
    _assert_one_line_naming(info.value, ConfigError, path, WORDS[kind], "cannot read the config")


def test_require_regular_file_passes_a_file_and_leaves_missing_to_the_caller(tmp_path):
    # Arrange
    (tmp_path / "f").write_bytes(b"123")

    # Act / Assert
    assert require_regular_file(tmp_path / "f").st_size == 3, "a regular file's stat"
    with pytest.raises(FileNotFoundError):
        require_regular_file(tmp_path / "missing")


@pytest.mark.parametrize("kind", SPECIAL)
def test_the_idx_reader_refuses_what_is_not_a_file(short_tmp, kind):
    # Arrange
    path = short_tmp / "train-images-idx3-ubyte"
    keep = _make_special(path, kind)

    # Act
    try:
        error = _without_blocking(path, lambda: read_idx(path)) if kind == "fifo" else None
        if error is None:
            with pytest.raises(DataError) as info:
                read_idx(path)
            error = info.value
    finally:
        if keep is not None:
            keep.close()

    # Assert
    _assert_one_line_naming(error, DataError, path, WORDS[kind])


def _fake_mnist(root: Path, *, without: str) -> Path:
    """Tiny well-formed MNIST-like raw files under ``root/mnist``, all but the file ``without``
    (a role): returns where that one belongs."""
    folder = root / "mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (20, 28, 28), "u1"),
        "train_labels": (np.arange(20) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (10, 28, 28), "u1"),
        "test_labels": (np.arange(10) % 10).astype(np.uint8),
    }
    for role, array in arrays.items():
        if role != without:
            write_idx(folder / data.FILE_NAMES[role], array)
    return folder / data.FILE_NAMES[without]


DATA_READERS: dict[str, Callable[[Path], Any]] = {
    "load_dataset": lambda root: load_dataset("mnist", root, download=False),
    "load_test_set": lambda root: load_test_set("mnist", root, download=False),
    "verify_dataset": lambda root: verify_dataset("mnist", root),
    "dataset_status": lambda root: dataset_status(root),
}


@pytest.mark.parametrize("reader", list(DATA_READERS))
def test_a_fifo_in_place_of_a_data_file_is_refused_not_waited_on(tmp_path, reader):
    # Arrange
    data.clear_cache()
    fifo = _fake_mnist(tmp_path / "data", without="test_labels")
    os.mkfifo(fifo)

    # Act
    error = _without_blocking(fifo, lambda: DATA_READERS[reader](tmp_path / "data"))

    # Assert
    _assert_one_line_naming(error, DataError, fifo, "FIFO")


RECORD_READERS: dict[str, Callable[[Path], Any]] = {
    "read_json": lambda folder: read_json(folder / "cv.json", "cv"),
    "RunRecord.cv": lambda folder: RunRecord(folder).cv(),
    "RunRecord.run": lambda folder: RunRecord(folder).run(),
    "check_files": lambda folder: check_files(folder, {"cv.json": "0" * 64}),
    "file_sha256": lambda folder: file_sha256(folder / "cv.json"),
}


@pytest.mark.parametrize("reader", list(RECORD_READERS))
def test_a_fifo_in_place_of_a_record_file_is_refused_not_waited_on(copied, reader):
    # Arrange
    name = "run.json" if reader == "RunRecord.run" else "cv.json"
    fifo = copied.folder / name
    fifo.unlink()
    os.mkfifo(fifo)

    # Act
    error = _without_blocking(fifo, lambda: RECORD_READERS[reader](copied.folder))

    # Assert
    assert isinstance(error, RecordError), f"expected a RecordError, got {error!r}"
    _assert_one_line_naming(error, RecordError, fifo)


def test_a_fifo_in_the_fold_cache_is_trained_again(tmp_path, caplog):
    # Arrange
    cache = FoldCache(tmp_path / "cache")
    cache.folder.mkdir(parents=True)
    fifo = cache.folder / "fold-x.json"
    os.mkfifo(fifo)

    # Act
    with caplog.at_level("WARNING", logger="pipeline.record"):
        got = _without_blocking(fifo, lambda: cache.get("fold-x"))

    # Assert
    assert got is None, f"a FIFO gave a fold result: {got!r}"
    assert "trained again" in caplog.text and "FIFO" in caplog.text, caplog.text


# ============================== 6. sizes checked before memory is spent =====================
def _gzip_declaring(path: Path, dims: tuple[int, ...], content: int) -> Path:
    """A gzip IDX file whose header declares ``dims`` (uint8) and holds ``content`` zero bytes.

    Zeros compress about 1000:1, so the file is small however much it holds.
    """
    header = bytes([0, 0, 0x08, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: a gzip container
    chunks = [packer.compress(header)]
    block = bytes(1 << 20)
    for start in range(0, content, len(block)):
        chunks.append(packer.compress(block[: content - start]))
    chunks.append(packer.flush())
    path.write_bytes(b"".join(chunks))
    return path


def _peak_bytes(call: Callable[[], Any]) -> tuple[BaseException | None, int]:
    """The exception ``call`` raised (or None) and the peak of traced memory meanwhile."""
    tracemalloc.start()
    try:
        call()
        error = None
    except Exception as exc:  # noqa: BLE001 (handed to the test)
        error = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return error, peak


def test_a_header_declaring_5_million_images_is_refused_before_reading(tmp_path):
    # Arrange: 5,000,000 x 28 x 28 declared, 40 MB really inside a ~40 KB gzip.
    path = _gzip_declaring(tmp_path / "train-images-idx3-ubyte.gz", (5_000_000, 28, 28),
                           40 << 20)  # fmt: skip
    assert path.stat().st_size < 200_000, "the crafted file should be small"

    # Act
    error, peak = _peak_bytes(lambda: read_idx(path, expected_shape=MNIST_TRAIN_IMAGES))

    # Assert
    assert peak < 4 << 20, f"{peak / 2**20:.1f} MiB allocated before the header was refused"
    _assert_one_line_naming(error, DataError, path, "5000000x28x28", "60000x28x28")


@pytest.mark.parametrize("reader", ["verify_dataset", "load_dataset"])
def test_data_commands_refuse_an_oversized_header_without_allocating(tmp_path, reader):
    # Arrange: a fake MNIST folder whose training images declare 5 million images.
    data.clear_cache()
    raw = _fake_mnist(tmp_path / "data", without="train_images")
    path = _gzip_declaring(raw.with_name(raw.name + ".gz"), (5_000_000, 28, 28), 40 << 20)

    # Act
    error, peak = _peak_bytes(lambda: DATA_READERS[reader](tmp_path / "data"))

    # Assert
    assert peak < 4 << 20, f"{peak / 2**20:.1f} MiB allocated before the header was refused"
    _assert_one_line_naming(error, DataError, path, "5000000x28x28", "60000x28x28")


def test_a_smaller_header_than_expected_is_read_and_left_to_the_callers_checks(tmp_path):
    # Arrange
    array = np.arange(5 * 28 * 28, dtype=np.uint8).reshape(5, 28, 28)
    path = write_idx(tmp_path / "images", array, compress=True)

    # Act
    got = read_idx(path, expected_shape=MNIST_TRAIN_IMAGES)

    # Assert
    np.testing.assert_array_equal(got, array, err_msg="a small, well-formed file must read")


def test_a_gzip_header_declaring_more_than_the_file_can_hold_is_refused_at_once(tmp_path):
    # Arrange: 100 bytes of gzip cannot expand to the declared 1 GB (deflate: at most ~1032:1).
    path = tmp_path / "unknown-idx"
    header = bytes([0, 0, 0x08, 2]) + struct.pack(">2I", 1_000_000, 1000)
    path.write_bytes(gzip.compress(header + bytes(1000), mtime=0))

    # Act
    error, peak = _peak_bytes(lambda: read_idx_file(path))

    # Assert
    _assert_one_line_naming(error, DataError, path, "truncated IDX file", "more than the file")
    assert peak < 1 << 20, f"{peak / 2**20:.1f} MiB allocated"


# ============================== 10b. full and read-only disks under the record ==============
def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_a_full_disk_is_one_record_error_naming_the_file(full_disk):
    # Arrange: a small file fits, a large one does not.
    path = full_disk / "folds" / "fold-x.json"
    write_bytes(path, b"old content")

    # Act
    with pytest.raises(RecordError) as info:
        write_bytes(path, b"x" * 200_000)

    # Assert
    _assert_one_line_naming(info.value, RecordError, path, "cannot write",
                            os.strerror(errno.ENOSPC))  # fmt: skip
    assert isinstance(info.value, PipelineError), "a RecordError is a PipelineError (exit 2)"
    assert path.read_bytes() == b"old content", "the old file was damaged"
    assert _leftovers(path.parent, {"fold-x.json"}) == [], "a temporary or 0-byte file was left"


def test_a_fold_cache_on_a_full_disk_leaves_no_empty_entry(built, full_disk):
    # Arrange: fill the disk first, so that not even a fold result fits.
    cache = FoldCache(full_disk)
    cache.folder.mkdir()
    with contextlib.suppress(OSError), (full_disk / "filler").open("wb") as filler:
        filler.write(bytes(1 << 20))

    # Act
    with pytest.raises(RecordError) as info:
        cache.put("fold-x", built.folds[0])

    # Assert
    path = cache.folder / "fold-x.json"
    _assert_one_line_naming(info.value, RecordError, path, os.strerror(errno.ENOSPC))
    assert _leftovers(cache.folder, set()) == [], "a temporary or 0-byte entry was left"
    assert cache.get("fold-x") is None, "an entry appeared"


def test_a_read_only_folder_is_one_record_error_naming_the_file(read_only_disk):
    # Arrange
    path = read_only_disk / "cache" / "runs" / "x" / "run.json"

    # Act
    with pytest.raises(RecordError) as info:
        write_json(path, "run", {"id": "x"})

    # Assert
    _assert_one_line_naming(info.value, RecordError, path, "cannot write",
                            os.strerror(errno.EROFS))  # fmt: skip
    assert _leftovers(read_only_disk / "cache", set()) == [], "something was created"


def test_a_record_under_a_read_only_cache_dir_is_one_record_error(read_only_disk):
    # Arrange
    config = build_config(
        overrides={"data.dataset": "mnist-sample",
                   "execution.cache_dir": str(read_only_disk / "cache")}
    )  # fmt: skip

    # Act
    with pytest.raises(RecordError) as info:
        RunRecord.create(config, flow="mlp-pipeline", dataset={"name": "x", "fingerprint": "f"})

    # Assert
    _assert_one_line_naming(info.value, RecordError, read_only_disk / "cache" / "runs",
                            "cannot write", os.strerror(errno.EROFS))  # fmt: skip
