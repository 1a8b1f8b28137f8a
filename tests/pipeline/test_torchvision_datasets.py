"""torchvision's MNIST family (KMNIST, QMNIST, EMNIST) through torchvision's own downloader.

No internet here and no copy of these datasets: each test writes small files in the formats
torchvision reads (IDX; QMNIST's int labels; EMNIST's zip of gzip files). The download tests serve
them from a local HTTP mirror and give torchvision their MD5s in place of the real files' (the
one thing a test cannot reproduce); everything else, torchvision's downloader, its MD5 checks,
its extraction and its readers, runs as it ships.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import http.server
import io
import os
import re
import shutil
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline import data
from pipeline.errors import DataError
from pipeline.idx import write_idx

try:
    import torchvision.datasets as torchvision_datasets
except Exception as exc:  # not installed; or a wheel built for another torch (a RuntimeError)
    pytest.skip(f"needs the torchvision extra, working: pip install -e '.[torchvision]' ({exc})",
                allow_module_level=True)  # fmt: skip


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    data.clear_cache()
    monkeypatch.delenv(data.MIRRORS_ENV, raising=False)
    yield
    data.clear_cache()


def _split(seed: int, n: int, n_classes: int, first_label: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % n_classes + first_label).astype(np.uint8)
    return images, labels


def _gz(path: Path, array: np.ndarray) -> str:
    """Write ``array`` as a gzipped IDX file; its MD5, as torchvision checks it."""
    write_idx(path, array, compress=True)
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.requests.append(self.path)
        super().do_GET()


@pytest.fixture
def mirror(tmp_path):
    """A static HTTP server on 127.0.0.1 for ``tmp_path / "mirror"``: (base URL, requests)."""
    folder = tmp_path / "mirror"
    folder.mkdir()
    requests: list[str] = []
    handler = functools.partial(
        type("Handler", (_CountingHandler,), {"requests": requests}), directory=str(folder)
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}/", requests
    server.shutdown()
    server.server_close()


@pytest.fixture
def kmnist_mirror(mirror, monkeypatch):
    """KMNIST-format files on the mirror under ``kmnist/``, and torchvision told their MD5s."""
    folder, base, requests = mirror
    (folder / "kmnist").mkdir()
    arrays = {}
    resources = []
    for split, n in (("train", 120), ("t10k", 40)):
        images, labels = _split(len(split), n, 10)
        arrays[split] = images, labels
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{split}-{kind}-ubyte.gz"
            resources.append((name, _gz(folder / "kmnist" / name, array)))
    monkeypatch.setattr(torchvision_datasets.KMNIST, "resources", resources)
    monkeypatch.setenv(data.MIRRORS_ENV, base + "{dataset}/")
    return folder / "kmnist", arrays, requests


def test_kmnist_downloads_from_a_mirror_through_torchvision_and_loads_like_mnist(
    kmnist_mirror, tmp_path
):
    # Arrange
    served, arrays, requests = kmnist_mirror
    root = tmp_path / "data"

    # Act
    dataset = data.load_dataset("kmnist", root)
    data.clear_cache()
    again = data.load_dataset("kmnist", root)

    # Assert: torchvision's layout, the files it fetched, the arrays as written.
    assert sorted(p.name for p in (root / "KMNIST" / "raw").glob("*.gz")) == sorted(
        p.name for p in served.iterdir()
    )
    fetched = len(requests)  # torchvision opens each URL twice: redirects, then the file
    assert {Path(r).name for r in requests} == {p.name for p in served.iterdir()}, requests
    np.testing.assert_array_equal(dataset.X_train, arrays["train"][0].reshape(-1, 784))
    np.testing.assert_array_equal(dataset.y_train, arrays["train"][1])
    np.testing.assert_array_equal(dataset.X_test, arrays["t10k"][0].reshape(-1, 784))
    np.testing.assert_array_equal(dataset.y_test, arrays["t10k"][1])
    assert dataset.X_train.dtype == np.uint8 and not dataset.X_train.flags.writeable
    assert dataset.class_names == ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")
    assert dataset.n_classes == 10 and dataset.data_dir == str(root)
    # The second load downloads nothing and fingerprints the same content the same way.
    assert len(requests) == fetched, requests
    assert again.fingerprint == dataset.fingerprint
    assert re.fullmatch(r"[0-9a-f]{64}", dataset.fingerprint)
    assert dataset.summary()["n_classes"] == 10
    # `data verify` checks the downloads against torchvision's MD5s.
    rows = data.verify_dataset("kmnist", root)
    assert [row["ok"] for row in rows] == [True] * 4, rows


def test_a_changed_file_changes_the_fingerprint(kmnist_mirror, tmp_path):
    # Arrange
    root = tmp_path / "data"
    before = data.load_dataset("kmnist", root).fingerprint
    raw = root / "KMNIST" / "raw" / "t10k-labels-idx1-ubyte"
    labels = np.roll(data.load_dataset("kmnist", root).y_test, 1)
    data.clear_cache()

    # Act: the decompressed file torchvision reads, rewritten with other labels.
    write_idx(raw, labels)
    after = data.load_dataset("kmnist", root, download=False)

    # Assert
    assert after.fingerprint != before
    np.testing.assert_array_equal(after.y_test, labels)


def test_a_corrupt_download_is_refused_with_one_line(kmnist_mirror, tmp_path):
    # Arrange: one served file differs from the MD5 torchvision expects.
    served, _, _ = kmnist_mirror
    (served / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"not an IDX file"))

    # Act
    with pytest.raises(DataError) as caught:
        data.load_dataset("kmnist", tmp_path / "data")

    # Assert
    message = str(caught.value)
    assert "\n" not in message, message
    assert "kmnist could not be downloaded by torchvision" in message, message
    assert "corrupted" in message and "MLP_PIPELINE_MIRRORS" in message, message


def test_offline_names_the_folder_and_the_mirror_setting(monkeypatch, tmp_path):
    # Arrange: a mirror where nothing listens.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(data.MIRRORS_ENV, f"http://127.0.0.1:{port}/")

    # Act
    with pytest.raises(DataError) as caught:
        data.load_dataset("kmnist", tmp_path)

    # Assert
    message = str(caught.value)
    assert "\n" not in message and "refused" in message.lower(), message
    assert f"{tmp_path / 'KMNIST' / 'raw'}/" in message, message


def test_without_download_a_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match=r"kmnist is not in .*KMNIST/raw/\. .*data\.download"):
        data.load_dataset("kmnist", tmp_path, download=False)


@pytest.mark.parametrize("content", [b"", b"\x00\x00\x08\x09" + bytes(8), b"not IDX at all"])
@pytest.mark.parametrize("download", [False, True])  # with the files there: nothing to fetch
def test_a_broken_raw_file_is_one_error_line(kmnist_mirror, tmp_path, content, download):
    # Arrange: downloaded, then one of the files torchvision reads broken.
    root = tmp_path / "data"
    data.load_dataset("kmnist", root)
    data.clear_cache()
    (root / "KMNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(content)

    # Act
    with pytest.raises(DataError) as caught:
        data.load_dataset("kmnist", root, download=download)

    # Assert
    message = str(caught.value)
    assert message.startswith(f"kmnist: torchvision cannot read {root / 'KMNIST' / 'raw'}/ ("), (
        message
    )
    assert "\n" not in message, message


def test_qmnist_reads_the_class_from_its_label_table(mirror, monkeypatch, tmp_path):
    # Arrange: QMNIST's labels are an int32 table, one row of 8 details per image.
    folder, base, _ = mirror
    resources = {}
    expected = {}
    for what, n in (("train", 60), ("test", 30)):
        images, labels = _split(len(what), n, 10)
        table = np.zeros((n, 8), dtype=np.int32)
        table[:, 0] = labels
        table[:, 1] = 7  # the NIST writer, etc.: not the class
        files = []
        for name, array in ((f"qmnist-{what}-images-idx3-ubyte.gz", images),
                            (f"qmnist-{what}-labels-idx2-int.gz", table)):  # fmt: skip
            files.append((f"https://example.invalid/{name}", _gz(folder / name, array)))
        resources[what] = files
        expected[what] = images, labels
    monkeypatch.setattr(torchvision_datasets.QMNIST, "resources", resources)
    monkeypatch.setenv(data.MIRRORS_ENV, base)

    # Act
    dataset = data.load_dataset("qmnist", tmp_path / "data")
    X_test, y_test = data.load_test_set("qmnist", tmp_path / "data")

    # Assert
    np.testing.assert_array_equal(dataset.X_train, expected["train"][0].reshape(-1, 784))
    np.testing.assert_array_equal(dataset.y_train, expected["train"][1])
    np.testing.assert_array_equal(dataset.y_test, expected["test"][1])
    np.testing.assert_array_equal(X_test, dataset.X_test)
    np.testing.assert_array_equal(y_test, dataset.y_test)
    assert dataset.y_train.dtype == np.uint8


def _emnist_zip(folder: Path, split: str, n_classes: int, first_label: int) -> dict:
    """EMNIST's download: ``gzip.zip`` holding ``gzip/emnist-<split>-...gz``; the arrays."""
    buffer = io.BytesIO()
    arrays = {}
    with zipfile.ZipFile(buffer, "w") as archive:
        for part, n in (("train", 2 * n_classes), ("test", n_classes)):
            images, labels = _split(len(part), n, n_classes - first_label, first_label)
            arrays[part] = images, labels
            # Stored transposed, as NIST's files are.
            for kind, array in (
                ("images-idx3", images.transpose(0, 2, 1)),
                ("labels-idx1", labels),
            ):
                scratch = folder / "scratch.gz"
                _gz(scratch, np.ascontiguousarray(array))
                archive.write(scratch, f"gzip/emnist-{split}-{part}-{kind}-ubyte.gz")
                scratch.unlink()
    (folder / "emnist").mkdir(exist_ok=True)
    (folder / "emnist" / "gzip.zip").write_bytes(buffer.getvalue())
    return arrays


def test_emnist_letters_come_upright_with_27_classes(mirror, monkeypatch, tmp_path):
    # Arrange
    folder, base, _ = mirror
    arrays = _emnist_zip(folder, "letters", 27, 1)
    md5 = hashlib.md5((folder / "emnist" / "gzip.zip").read_bytes(), usedforsecurity=False)
    monkeypatch.setattr(torchvision_datasets.EMNIST, "md5", md5.hexdigest())
    monkeypatch.setenv(data.MIRRORS_ENV, base + "{dataset}")

    # Act
    dataset = data.load_dataset("emnist-letters", tmp_path / "data")

    # Assert: upright (as written before transposing), torchvision's labels and class names.
    np.testing.assert_array_equal(dataset.X_train, arrays["train"][0].reshape(-1, 784))
    np.testing.assert_array_equal(dataset.y_test, arrays["test"][1])
    assert dataset.n_classes == 27 and dataset.class_names[:3] == ("N/A", "a", "b")
    assert int(dataset.y_train.min()) == 1 and int(dataset.y_train.max()) == 26


def test_an_old_torchvisions_pickles_are_refused(tmp_path):
    # Arrange: torchvision < 0.9 cached processed/training.pt, read back with torch.load.
    processed = tmp_path / "KMNIST" / "processed"
    processed.mkdir(parents=True)
    (processed / "training.pt").write_bytes(b"\x80\x04K\x01.")

    # Act / Assert
    with pytest.raises(DataError, match=r"torch-pickled .* does not load; delete that folder"):
        data.load_dataset("kmnist", tmp_path, download=False)


def test_data_info_shows_the_torchvision_folders(kmnist_mirror, tmp_path):
    # Arrange
    root = tmp_path / "data"
    data.load_dataset("kmnist", root)

    # Act
    rows = {row["dataset"]: row for row in data.dataset_status(root)}

    # Assert
    assert rows["kmnist"]["path"] == str(root / "KMNIST" / "raw"), rows["kmnist"]
    assert rows["kmnist"]["size"] > 0 and rows["kmnist"]["layout"] == "torchvision"
    assert rows["emnist-*"]["path"] is None and rows["qmnist"]["path"] is None


# ------------------------------------------------------------------- through the pipeline


@pytest.fixture
def letters_from_the_sample(tmp_path) -> Path:
    """EMNIST-letters files made of the bundled sample's digits (labels 1..10 of 27 classes),
    already where torchvision keeps them: a dataset a model can learn."""
    sample = data.load_dataset(data.SAMPLE_NAME)
    raw = tmp_path / "data" / "EMNIST" / "raw"
    raw.mkdir(parents=True)
    for part, X, y in (("train", sample.X_train, sample.y_train),
                       ("test", sample.X_test, sample.y_test)):  # fmt: skip
        images = np.ascontiguousarray(X.reshape(-1, 28, 28).transpose(0, 2, 1))
        write_idx(raw / f"emnist-letters-{part}-images-idx3-ubyte", images)
        write_idx(raw / f"emnist-letters-{part}-labels-idx1-ubyte", (y + 1).astype(np.uint8))
    return tmp_path / "data"


@pytest.mark.slow
def test_a_27_class_dataset_trains_tracks_and_serves_probabilities(
    letters_from_the_sample, tracking_uri, tmp_path, monkeypatch
):
    import mlflow
    from mlflow import MlflowClient

    from flows.cli import main

    # Act: the quick preset on EMNIST letters, tracked.
    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    try:
        with (
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
            contextlib.suppress(SystemExit),
        ):
            main(["run", "--preset", "quick", "--dataset", "emnist-letters", "--no-progress",
                  "--data-dir", str(letters_from_the_sample), "--tracking-uri", tracking_uri,
                  "--set", f"execution.cache_dir={tmp_path / 'cache'}"])  # fmt: skip
    finally:
        os.environ.clear()
        os.environ.update(saved)

    # Assert: a score well above chance, the record and MLflow as for MNIST.
    accuracy = re.search(r"test accuracy (\d\.\d+)", out.getvalue())
    run_id = re.search(r"MLflow run (\w+)", out.getvalue())
    assert accuracy and run_id, f"stdout:\n{out.getvalue()}\nstderr:\n{err.getvalue()}"
    assert float(accuracy.group(1)) > 0.8, out.getvalue()
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    parent = client.get_run(run_id.group(1))
    assert parent.data.params["dataset.name"] == "emnist-letters", parent.data.params
    assert {i.dataset.name for i in parent.inputs.dataset_inputs} >= {
        "emnist-letters-train",
        "emnist-letters-test",
    }, parent.inputs
    assert "emnist-letters" in parent.info.run_name, parent.info.run_name
    version = client.get_model_version("mlp-emnist-letters", "1")
    assert "784-" in version.description and "-27 MLP" in version.description, version
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)  # what runs:/ resolves against
    model = mlflow.pyfunc.load_model(f"runs:/{run_id.group(1)}/model")
    sample = data.load_dataset(data.SAMPLE_NAME)
    probabilities = model.predict(sample.X_test[:5], params={"probabilities": True})
    assert probabilities.shape == (5, 27)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)  # float32 network
    labels = model.predict(sample.X_test[:200])
    assert np.mean(labels == sample.y_test[:200] + 1) > 0.8
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)


def test_data_verify_checks_the_torchvision_downloads_too(kmnist_mirror, tmp_path, cli):
    # Arrange
    root = tmp_path / "data"
    data.load_dataset("kmnist", root)

    # Act: every dataset found, then one download damaged.
    code, out, _ = cli(["data", "verify", "--data-dir", str(root)])
    (root / "KMNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"damaged")
    bad_code, bad_out, bad_err = cli(["data", "verify", "--data-dir", str(root)])

    # Assert
    assert code == 0 and out.count(" ok") == 4 + 4, out  # the bundled sample's 4 arrays too
    assert "KMNIST/raw/t10k-labels-idx1-ubyte.gz" in out, out
    assert bad_code == 2 and "MISMATCH" in bad_out, (bad_out, bad_err)
