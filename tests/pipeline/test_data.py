"""Datasets: real files, layouts, verification, download from a local mirror, sample, limits."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import importlib.util
import json
import pickle
import re
import shutil
import socket
import sys
import threading
import typing
from pathlib import Path

import numpy as np
import pytest

from pipeline import data
from pipeline.config import DatasetName
from pipeline.data import (
    DATASET_NAMES,
    Dataset,
    DatasetRef,
    Normalizer,
    dataset_status,
    download_dataset,
    load_dataset,
    resolve_data_dir,
    stratified_indices,
    verify_dataset,
)
from pipeline.errors import ConfigError, DataError
from pipeline.idx import write_idx

REPO = Path(__file__).resolve().parents[2]
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
GZ_NAMES = [f"{n}.gz" for n in data.FILE_NAMES.values()]
# sha256("mnist\n" + the four decompressed files' SHA-256, one a line): see the fingerprint test.
MNIST_FINGERPRINT = "58054e851a8a9cb117b511f694b74f402d6231d8719073c6776bc682be981968"


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    """Tests choose their data dir and mirrors explicitly."""
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.delenv(data.MIRRORS_ENV, raising=False)


@pytest.fixture(scope="session")
def mnist(shared_data_dir) -> Dataset:
    return load_dataset("mnist", shared_data_dir, download=False)


@pytest.fixture
def mnist_copy(shared_data_dir, tmp_path) -> Path:
    """A writable copy of the shared MNIST folder: returns the data dir (holding ``mnist/``)."""
    shutil.copytree(shared_data_dir / "mnist", tmp_path / "copy" / "mnist")
    (tmp_path / "copy" / "mnist").chmod(0o755)
    for f in (tmp_path / "copy" / "mnist").iterdir():
        f.chmod(0o644)
    return tmp_path / "copy"


def _write_fake_mnist(root: Path, n_train=20, n_test=10, train_labels=None) -> Path:
    """Tiny, well-formed MNIST-like IDX files (wrong content, so checksums fail)."""
    rng = np.random.default_rng(0)
    folder = root / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    labels = train_labels if train_labels is not None else np.arange(n_train) % 10
    write_idx(folder / "train-images-idx3-ubyte", rng.integers(0, 256, (n_train, 28, 28), "u1"))
    write_idx(folder / "train-labels-idx1-ubyte", np.asarray(labels, dtype=np.uint8))
    write_idx(folder / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28), "u1"))
    write_idx(folder / "t10k-labels-idx1-ubyte", (np.arange(n_test) % 10).astype(np.uint8))
    return folder


# ----------------------------------------------------------------------- real data


def test_real_mnist_shapes_counts_and_read_only(mnist, shared_data_dir):
    assert mnist.X_train.shape == (60000, 784) and mnist.X_train.dtype == np.uint8
    assert mnist.X_test.shape == (10000, 784) and mnist.y_test.shape == (10000,)
    assert np.bincount(mnist.y_train).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(mnist.y_test).tolist() == MNIST_TEST_COUNTS
    for name in ("X_train", "y_train", "X_test", "y_test"):
        assert not getattr(mnist, name).flags.writeable, f"{name} must be read-only"
    with pytest.raises(ValueError, match="read-only"):
        mnist.X_train[0, 0] = 1
    assert mnist.ref == DatasetRef("mnist", str(shared_data_dir.absolute()), mnist.fingerprint)


def test_fashion_mnist_loads(shared_data_dir):
    ds = load_dataset("fashion-mnist", shared_data_dir, download=False)
    assert ds.X_train.shape == (60000, 784) and ds.X_test.shape == (10000, 784)
    assert np.bincount(ds.y_train).tolist() == [6000] * 10
    assert np.bincount(ds.y_test).tolist() == [1000] * 10
    assert ds.class_names[9] == "Ankle boot"


def test_loads_are_memoized(mnist, shared_data_dir):
    again = load_dataset("mnist", shared_data_dir, download=False)
    assert again is mnist, "a second load in the same process must reuse the cached dataset"


def test_fingerprint_is_the_hash_of_the_name_and_the_file_hashes(mnist, shared_data_dir):
    # Independent reference: SHA-256 of each decompressed file, checked against the data
    # folder's SHA256SUMS.decompressed; then SHA-256 of the name and those four hashes, one a
    # line, in the order train images, train labels, test images, test labels.
    listed = {}
    for line in (shared_data_dir / "SHA256SUMS.decompressed").read_text().splitlines():
        if line.strip():
            digest, name = line.split()
            listed[name] = digest
    hashes = []
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        with gzip.open(shared_data_dir / "mnist" / f"{name}.gz") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        assert digest == listed[f"mnist/{name}"], f"{name}: {digest} is not the listed hash"
        hashes.append(digest)
    expected = hashlib.sha256("\n".join(["mnist", *hashes]).encode()).hexdigest()

    assert mnist.fingerprint == expected, f"fingerprint {mnist.fingerprint}, expected {expected}"
    assert mnist.fingerprint == MNIST_FINGERPRINT, "the MNIST fingerprint changed"


def test_torchvision_layout_with_raw_files(mnist, shared_data_dir, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in GZ_NAMES:
        with gzip.open(shared_data_dir / "mnist" / name) as src:
            (raw / name.removesuffix(".gz")).write_bytes(src.read())
    ds = load_dataset("mnist", tmp_path, download=False)
    np.testing.assert_array_equal(ds.X_train, mnist.X_train)
    np.testing.assert_array_equal(ds.y_test, mnist.y_test)
    assert ds.fingerprint == mnist.fingerprint, "same content must give the same fingerprint"
    rows = [r for r in dataset_status(tmp_path) if r["dataset"] == "mnist"]
    assert {(r["layout"], r["compressed"]) for r in rows} == {("torchvision", False)}


def test_gz_name_on_raw_file_and_reverse_both_load(mnist, mnist_copy):
    folder = mnist_copy / "mnist"
    labels_gz = folder / "t10k-labels-idx1-ubyte.gz"
    labels_gz.write_bytes(gzip.decompress(labels_gz.read_bytes()))  # raw bytes, .gz name
    (folder / "t10k-images-idx3-ubyte.gz").rename(folder / "t10k-images-idx3-ubyte")  # reverse
    ds = load_dataset("mnist", mnist_copy, download=False)
    np.testing.assert_array_equal(ds.y_test, mnist.y_test)
    np.testing.assert_array_equal(ds.X_test, mnist.X_test)


def test_resolve_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert resolve_data_dir(None) == tmp_path / "data", "default is ./data"
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "env"))
    assert resolve_data_dir(None) == tmp_path / "env", "env var beats the default"
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg", "argument beats the env var"
    assert resolve_data_dir("rel").is_absolute()


def test_env_var_data_dir_is_used(mnist, shared_data_dir, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(shared_data_dir))
    assert load_dataset("mnist", download=False) is mnist


# ----------------------------------------------------------------------- broken datasets


def test_checksum_mismatch_names_file_and_both_hashes(tmp_path):
    folder = _write_fake_mnist(tmp_path)
    with pytest.raises(DataError, match="checksum mismatch") as excinfo:
        load_dataset("mnist", tmp_path, download=False)
    message = str(excinfo.value)
    assert str(folder / "train-images-idx3-ubyte") in message, message
    assert data.SPECS["mnist"].sha256["train_images"] in message, "expected hash missing"
    actual = data.read_idx_file(folder / "train-images-idx3-ubyte").sha256
    assert actual in message, "actual hash missing"


def test_verify_dataset_reports_mismatch_without_raising(tmp_path, shared_data_dir):
    _write_fake_mnist(tmp_path)
    rows = verify_dataset("mnist", tmp_path)
    assert [r["ok"] for r in rows] == [False] * 4
    assert rows[0]["expected"] == data.SPECS["mnist"].sha256["train_images"]
    good = verify_dataset("mnist", shared_data_dir)
    assert len(good) == 4 and all(r["ok"] for r in good), good


def test_count_mismatch(tmp_path):
    folder = _write_fake_mnist(tmp_path, train_labels=np.arange(19) % 10)
    with pytest.raises(DataError, match="count mismatch") as excinfo:
        load_dataset("mnist", tmp_path, download=False)
    assert str(folder / "train-labels-idx1-ubyte") in str(excinfo.value)


def test_labels_out_of_range(tmp_path):
    labels = np.arange(20) % 10
    labels[7] = 10
    folder = _write_fake_mnist(tmp_path, train_labels=labels)
    with pytest.raises(DataError, match=r"label 10 at index 7 is out of range \[0, 9\]") as exc:
        load_dataset("mnist", tmp_path, download=False)
    assert str(folder / "train-labels-idx1-ubyte") in str(exc.value)


def test_wrong_image_shape(tmp_path):
    folder = _write_fake_mnist(tmp_path)
    write_idx(folder / "t10k-images-idx3-ubyte", np.zeros((10, 28, 27), np.uint8))
    with pytest.raises(DataError, match=r"shape \(n, 28, 28\)"):
        load_dataset("mnist", tmp_path, download=False)


def test_truncated_real_file(mnist_copy):
    path = mnist_copy / "mnist" / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match="corrupt gzip stream") as excinfo:
        load_dataset("mnist", mnist_copy, download=False)
    assert str(path) in str(excinfo.value)
    with pytest.raises(DataError, match="corrupt gzip stream"):
        verify_dataset("mnist", mnist_copy)


def test_directory_instead_of_file(tmp_path):
    folder = _write_fake_mnist(tmp_path)
    (folder / "t10k-labels-idx1-ubyte").unlink()
    (folder / "t10k-labels-idx1-ubyte").mkdir()
    with pytest.raises(DataError, match="is a directory") as excinfo:
        load_dataset("mnist", tmp_path, download=False)
    assert str(folder / "t10k-labels-idx1-ubyte") in str(excinfo.value)


def test_missing_files_without_download_names_remedies(tmp_path):
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist", tmp_path, download=False)
    _assert_remedies(str(excinfo.value), tmp_path)
    with pytest.raises(DataError, match="not found"):
        verify_dataset("mnist", tmp_path)


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")


def _assert_remedies(message: str, root: Path) -> None:
    for needle in (
        str(root.absolute() / "mnist"),
        "MLP_PIPELINE_DATA_DIR",
        "--data-dir",
        "--dataset mnist-sample",
    ):
        assert needle in message, f"{needle!r} missing from: {message}"


# ----------------------------------------------------------------------- download


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def serve(tmp_path):
    """Start a static HTTP server on 127.0.0.1 for a folder; returns its base URL."""
    servers = []

    def start(folder: Path) -> str:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused, like being offline)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@pytest.fixture
def good_mirror(shared_data_dir, tmp_path, serve) -> str:
    """A mirror laid out as ``<base>/mnist/<file>.gz`` serving copies of the real files."""
    shutil.copytree(shared_data_dir / "mnist", tmp_path / "good" / "mnist")
    return serve(tmp_path / "good") + "{dataset}/"


@pytest.fixture
def bad_mirror(shared_data_dir, tmp_path, serve) -> str:
    """A mirror whose t10k labels are valid IDX with one label changed (checksum mismatch)."""
    folder = tmp_path / "bad"
    folder.mkdir()
    labels = gzip.decompress((shared_data_dir / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes())
    tampered = labels[:8] + bytes([(labels[8] + 1) % 10]) + labels[9:]
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(tampered))
    return serve(folder)


def test_download_all_files_from_local_mirror(mnist, good_mirror, tmp_path, monkeypatch):
    monkeypatch.setenv(data.MIRRORS_ENV, good_mirror)
    root = tmp_path / "data"
    ds = load_dataset("mnist", root, progress=True)
    assert sorted(p.name for p in (root / "mnist").iterdir()) == sorted(GZ_NAMES), "no .part left"
    np.testing.assert_array_equal(ds.X_train, mnist.X_train)
    assert ds.fingerprint == mnist.fingerprint


def test_bad_and_unreachable_mirrors_fall_through(
    mnist_copy, good_mirror, bad_mirror, closed_port_url, tmp_path
):
    missing = mnist_copy / "mnist" / "t10k-labels-idx1-ubyte.gz"
    missing.unlink()
    empty = tmp_path / "empty"
    empty.mkdir()
    mirrors = [closed_port_url, bad_mirror, good_mirror]
    paths = download_dataset("mnist", mnist_copy, mirrors=mirrors, progress=False)
    assert paths["test_labels"] == missing and missing.is_file()
    verified = verify_dataset("mnist", mnist_copy)
    assert len(verified) == 4 and all(r["ok"] for r in verified), verified


def test_only_bad_mirrors_give_one_error_and_leave_nothing(
    mnist_copy, bad_mirror, closed_port_url, serve, tmp_path
):
    labels = mnist_copy / "mnist" / "t10k-labels-idx1-ubyte.gz"
    real = labels.read_bytes()
    labels.unlink()
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "t10k-labels-idx1-ubyte.gz").write_bytes(real[:1000])
    mirrors = [bad_mirror, serve(truncated), serve(tmp_path / "copy"), closed_port_url]
    with pytest.raises(DataError) as excinfo:
        download_dataset("mnist", mnist_copy, mirrors=mirrors, progress=False)
    message = str(excinfo.value)
    assert "checksum mismatch" in message, message
    assert "corrupt gzip stream" in message, message
    assert "HTTP Error 404" in message, message
    assert "Connection refused" in message, message
    _assert_remedies(message, mnist_copy)
    leftovers = [p.name for p in (mnist_copy / "mnist").iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"temporary files left behind: {leftovers}"


def test_offline_message(closed_port_url, tmp_path, monkeypatch):
    monkeypatch.setenv(data.MIRRORS_ENV, f"{closed_port_url},{closed_port_url}other/")
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist", tmp_path / "data", progress=False)
    message = str(excinfo.value)
    assert "could not download train-images-idx3-ubyte from any mirror" in message, message
    assert message.count("Connection refused") == 2, message
    _assert_remedies(message, tmp_path / "data")
    assert not (tmp_path / "data" / "mnist").exists(), "no empty folder left behind"


def test_default_mirrors_are_public_https_or_http():
    for spec in data.SPECS.values():
        urls = data._mirror_urls(spec, "train-images-idx3-ubyte", None)
        assert len(urls) >= 2 and all(u.startswith("http") for u in urls), urls
    assert "ossci-datasets" in data.SPECS["mnist"].mirrors[0]


# ----------------------------------------------------------------------- bundled sample


def test_sample_loads_offline_and_ignores_data_dir(tmp_path):
    ds = load_dataset("mnist-sample", tmp_path / "does-not-exist", download=False)
    assert ds.X_train.shape == (5000, 784) and ds.X_test.shape == (1000, 784)
    assert ds.X_train.dtype == ds.y_train.dtype == np.uint8
    assert not ds.X_train.flags.writeable
    assert ds.ref.data_dir is None and ds.ref.name == "mnist-sample"


def test_sample_is_stratified():
    ds = load_dataset("mnist-sample")
    for counts, full, n in (
        (np.bincount(ds.y_train), MNIST_TRAIN_COUNTS, 5000),
        (np.bincount(ds.y_test), MNIST_TEST_COUNTS, 1000),
    ):
        expected = np.asarray(full) * n / sum(full)
        assert np.all(np.abs(counts - expected) < 1), f"{counts} vs {expected}"


def test_sample_matches_recorded_hashes():
    rows = verify_dataset("mnist-sample")
    assert len(rows) == 4 and all(r["ok"] for r in rows), rows


def test_sample_tamper_is_detected(tmp_path):
    src = REPO / "pipeline" / "_data"
    meta = tmp_path / "mnist-sample.json"
    shutil.copy(src / "mnist-sample.json", meta)
    with np.load(src / "mnist-sample.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["y_test"][0] = (arrays["y_test"][0] + 1) % 10
    npz_path = tmp_path / "mnist-sample.npz"
    np.savez_compressed(npz_path, **arrays)
    with pytest.raises(DataError, match="array y_test does not match"):
        data.read_sample(npz_path, meta)


def test_sample_script_regenerates_identical_arrays(shared_data_dir, tmp_path):
    spec = importlib.util.spec_from_file_location(
        "make_sample", REPO / "scripts" / "make_mnist_sample.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    arrays = script.build_sample(shared_data_dir)
    recorded = json.loads((REPO / "pipeline" / "_data" / "mnist-sample.json").read_text())
    for key, array in arrays.items():
        assert data.array_sha256(array) == recorded["sha256"][key], f"{key} differs"
    script.write_sample(tmp_path, arrays)
    assert (tmp_path / "mnist-sample.json").read_text() == json.dumps(recorded, indent=2) + "\n"
    assert data.read_sample(tmp_path / "mnist-sample.npz", tmp_path / "mnist-sample.json")


# ----------------------------------------------------------------------- limit and refs


def test_limit_is_stratified_and_deterministic(mnist):
    small = mnist.limit(1000, 300, seed=1)
    assert small.X_train.shape == (1000, 784) and small.y_test.shape == (300,)
    expected = np.asarray(MNIST_TRAIN_COUNTS) * 1000 / 60000
    assert np.all(np.abs(np.bincount(small.y_train) - expected) < 1)
    again = mnist.limit(1000, 300, seed=1)
    np.testing.assert_array_equal(again.X_train, small.X_train)
    assert again.fingerprint == small.fingerprint
    other = mnist.limit(1000, 300, seed=2)
    assert other.fingerprint != small.fingerprint
    assert not np.array_equal(other.y_train, small.y_train) or not np.array_equal(
        other.X_train, small.X_train
    )


def test_limit_fingerprint_includes_limits(mnist):
    fps = {
        mnist.fingerprint,
        mnist.limit(100, None).fingerprint,
        mnist.limit(None, 100).fingerprint,
    }
    assert len(fps) == 3, "full, train-limited and test-limited must differ"
    assert mnist.limit(None, None) is mnist
    assert mnist.limit(10**6, None) is mnist, "a limit above the size keeps everything"


def test_stratified_indices_rounding():
    y = np.array([0] * 5 + [1] * 3 + [2] * 2)
    idx = stratified_indices(y, 5, seed=0)
    assert len(idx) == 5 and np.all(np.diff(idx) > 0)
    assert np.bincount(y[idx]).tolist() == [3, 1, 1] or np.bincount(y[idx]).tolist() == [2, 2, 1]


@pytest.mark.parametrize("bad", [0, -5, 2.5, True])
def test_limit_rejects_bad_values(mnist, bad):
    with pytest.raises(ConfigError, match="positive integer"):
        mnist.limit(bad, None)


def test_ref_is_small_picklable_json_and_reloads(mnist):
    ref = mnist.limit(500, 100, seed=3).ref
    assert pickle.loads(pickle.dumps(ref)) == ref
    assert len(pickle.dumps(ref)) < 1000
    assert DatasetRef.from_dict(json.loads(json.dumps(ref.to_dict()))) == ref
    assert ref.load().fingerprint == ref.fingerprint
    assert load_dataset(ref.name, ref.data_dir, download=False) is mnist


def test_dataset_names_and_status(shared_data_dir, tmp_path):
    assert DATASET_NAMES == ("mnist", "fashion-mnist", "kmnist", "qmnist", "emnist-digits",
                             "emnist-mnist", "emnist-letters", "emnist-balanced", "emnist-bymerge",
                             "emnist-byclass", "mnist-sample")  # fmt: skip
    assert set(typing.get_args(DatasetName)) == set(DATASET_NAMES)  # the config accepts them all
    rows = dataset_status(shared_data_dir)
    mnist_rows = [r for r in rows if r["dataset"] == "mnist"]
    assert [r["role"] for r in mnist_rows] == list(data.ROLES)
    assert all(r["layout"] == "flat" and r["compressed"] for r in mnist_rows), mnist_rows
    empty = [r for r in dataset_status(tmp_path) if r["dataset"] != "mnist-sample"]
    assert len(empty) == 2 * len(data.ROLES) + 3, empty  # mnist, fashion-mnist; torchvision's
    assert all(r["path"] is None for r in empty), empty


# ----------------------------------------------------------------------- normalizer


def test_scale_is_x_over_255():
    X = np.array([[0, 51, 255]], dtype=np.uint8)
    out = Normalizer.fit(X, "scale").transform(X)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.0, 0.2, 1.0]], rtol=1e-6)


def test_standardize_uses_only_fit_statistics():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 100, (200, 6)).astype(np.uint8)
    test = rng.integers(150, 256, (50, 6)).astype(np.uint8)  # very different distribution
    train[:, 0] = 7  # a constant pixel
    norm = Normalizer.fit(train, "standardize-pixel")
    np.testing.assert_allclose(norm.mean_, train.mean(axis=0) / 255)
    np.testing.assert_allclose(norm.std_[1:], train[:, 1:].std(axis=0) / 255)
    assert norm.std_[0] == pytest.approx(1e-3), "constant pixel: std floored"
    out = norm.transform(test, dtype="float64")
    np.testing.assert_allclose(out, (test / 255 - norm.mean_) / norm.std_)
    assert np.all(np.isfinite(out))
    refit = Normalizer.fit(np.vstack([train, test]), "standardize-pixel")
    assert not np.allclose(refit.mean_, norm.mean_), "statistics must come from the fit data only"
    fitted = norm.transform(train)
    np.testing.assert_allclose(fitted[:, 1:].mean(axis=0), 0, atol=1e-5)


def test_standardize_uses_global_statistics_of_fit_data():
    rng = np.random.default_rng(1)
    train = rng.integers(0, 100, (300, 8)).astype(np.uint8)
    test = rng.integers(150, 256, (40, 8)).astype(np.uint8)
    norm = Normalizer.fit(train, "standardize")
    pixels = train.astype(np.float64) / 255
    np.testing.assert_allclose(norm.mean_, np.full(8, pixels.mean()), err_msg="global mean")
    np.testing.assert_allclose(norm.std_, np.full(8, pixels.std()), err_msg="global std")
    out = norm.transform(test, dtype="float64")
    np.testing.assert_allclose(out, (test / 255 - pixels.mean()) / pixels.std())
    fitted = norm.transform(train, dtype="float64")
    assert fitted.mean() == pytest.approx(0, abs=1e-9) and fitted.std() == pytest.approx(1)
    refit = Normalizer.fit(np.vstack([train, test]), "standardize")
    assert refit.mean_[0] != pytest.approx(norm.mean_[0]), "statistics from the fit data only"


def test_pixel_statistics_match_float64_numpy_on_real_mnist(mnist):
    # 20,001 real images: uint8 takes the exact integer path, in chunks that do not divide it.
    X = mnist.X_train[:20001]
    reference = X.astype(np.float64)
    norm = Normalizer.fit(X, "standardize-pixel", min_std=0.0)
    np.testing.assert_allclose(norm.mean_, reference.mean(axis=0) / 255, rtol=1e-12, atol=0)
    np.testing.assert_allclose(norm.std_, reference.std(axis=0) / 255, rtol=1e-9, atol=1e-15)
    pooled = Normalizer.fit(X, "standardize")
    assert pooled.mean_[0] == pytest.approx(reference.mean() / 255, rel=1e-12)
    assert pooled.std_[0] == pytest.approx(reference.std() / 255, rel=1e-9)
    # The same statistics from float input (the float64 path) and the same transform.
    as_float = Normalizer.fit(reference, "standardize-pixel", min_std=0.0)
    np.testing.assert_allclose(as_float.std_, norm.std_, rtol=1e-9, atol=1e-15)
    out = pooled.transform(X[:500], dtype="float64")
    expected = (reference[:500] / 255 - pooled.mean_) / pooled.std_
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_normalizer_roundtrip_and_errors():
    X = np.arange(24, dtype=np.uint8).reshape(4, 6)
    norm = Normalizer.fit(X, "standardize")
    back = Normalizer.from_dict(json.loads(json.dumps(norm.to_dict())))
    np.testing.assert_array_equal(back.transform(X), norm.transform(X))
    assert Normalizer.from_dict(Normalizer.fit(X).to_dict()).method == "scale"
    with pytest.raises(ConfigError, match="unknown normalization"):
        Normalizer.fit(X, "minmax")
    with pytest.raises(DataError, match="fitted on 6 features"):
        norm.transform(X[:, :5])
    assert X[0, 1] == 1, "input not modified"


# --------------------------------------------------------------------------- the test set alone


def test_load_test_set_needs_only_the_test_files(mnist, shared_data_dir, tmp_path):
    # Arrange: a folder holding MNIST's test pair only.
    (tmp_path / "d" / "mnist").mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(shared_data_dir / "mnist" / name, tmp_path / "d" / "mnist" / name)

    # Act
    X, y = data.load_test_set("mnist", tmp_path / "d", download=False)
    X_sub, y_sub = data.load_test_set("mnist", tmp_path / "d", download=False, limit_test=500)

    # Assert: the same arrays, and the same subset, as the whole dataset gives.
    np.testing.assert_array_equal(X, mnist.X_test)
    np.testing.assert_array_equal(y, mnist.y_test)
    subset = mnist.limit(None, 500)
    np.testing.assert_array_equal(X_sub, subset.X_test)
    np.testing.assert_array_equal(y_sub, subset.y_test)
    assert not X.flags.writeable and not X_sub.flags.writeable, "arrays should be read-only"


def test_load_test_set_checks_the_checksum(shared_data_dir, tmp_path):
    # Arrange: valid IDX labels with one label changed.
    (tmp_path / "mnist").mkdir()
    shutil.copy(shared_data_dir / "mnist" / "t10k-images-idx3-ubyte.gz", tmp_path / "mnist")
    labels = gzip.decompress((shared_data_dir / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes())
    tampered = labels[:8] + bytes([(labels[8] + 1) % 10]) + labels[9:]
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(tampered))

    # Act / Assert
    with pytest.raises(DataError, match="checksum mismatch"):
        data.load_test_set("mnist", tmp_path, download=False)


def test_load_test_set_downloads_only_the_test_files(good_mirror, tmp_path, monkeypatch):
    # Arrange
    monkeypatch.setenv(data.MIRRORS_ENV, good_mirror)

    # Act
    X, y = data.load_test_set("mnist", tmp_path / "data", progress=False)

    # Assert
    assert len(y) == 10_000 and X.shape == (10_000, 784), X.shape
    fetched = sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir())
    assert fetched == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"], fetched


def test_a_failed_download_leaves_no_folder_it_made(closed_port_url, tmp_path):
    # Act: a data dir two levels below anything that exists, and no mirror answers.
    with pytest.raises(DataError):
        download_dataset("mnist", tmp_path / "a" / "b", mirrors=[closed_port_url], progress=False)

    # Assert
    assert list(tmp_path.iterdir()) == [], f"left behind: {list(tmp_path.rglob('*'))}"


def test_a_mirror_serving_an_oversized_header_is_refused_before_reading(
    mnist_copy, serve, tmp_path
):
    """A small gzip whose header declares 5 million images: the download's check refuses it
    from the header (the expected shape is known), without reading the payload."""
    import struct
    import tracemalloc

    # Arrange
    (mnist_copy / "mnist" / "t10k-images-idx3-ubyte.gz").unlink()
    folder = tmp_path / "bomb"
    folder.mkdir()
    header = struct.pack(">I3I", 0x00000803, 5_000_000, 28, 28)
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + bytes(40 << 20)))

    # Act
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as excinfo:
            download_dataset("mnist", mnist_copy, mirrors=[serve(folder)], progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # Assert
    message = str(excinfo.value)
    assert (
        "declares 5000000x28x28 uint8 (3920000000 bytes), more than the expected 10000x28x28"
        in message
    ), message
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB traced: the payload was read"


def test_without_torchvision_the_error_names_the_extra(monkeypatch, tmp_path):
    # Arrange: torchvision not importable, as in an install without the extra.
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)

    # Act / Assert
    with pytest.raises(DataError, match=re.escape("pip install 'mlp-pipeline[torchvision]'")):
        data.load_dataset("kmnist", tmp_path)
