"""The IDX reader: real files, both compressions, and every kind of broken file."""

from __future__ import annotations

import gzip
import hashlib
import os
import struct

import numpy as np
import pytest

from pipeline import idx
from pipeline.errors import DataError
from pipeline.idx import read_idx, read_idx_file, write_idx


def _idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


@pytest.fixture
def small_images(tmp_path):
    """A raw (uncompressed) 5x3x2 uint8 IDX file and its array."""
    array = np.arange(30, dtype=np.uint8).reshape(5, 3, 2)
    path = tmp_path / "images-idx3-ubyte"
    path.write_bytes(_idx_bytes(array))
    return path, array


def test_real_mnist_labels_and_hash(shared_data_dir):
    info = read_idx_file(shared_data_dir / "mnist" / "t10k-labels-idx1-ubyte.gz")
    assert info.array.shape == (10000,), info
    assert info.compressed, "the shared .gz must be detected as gzip"
    assert info.sha256 == "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"
    assert np.bincount(info.array).tolist() == [
        980,
        1135,
        1032,
        1010,
        982,
        892,
        958,
        1028,
        974,
        1009,
    ]


def test_raw_and_gzip_give_same_array_and_hash(small_images, tmp_path):
    path, array = small_images
    gz = tmp_path / "images-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    raw_info, gz_info = read_idx_file(path), read_idx_file(gz)
    np.testing.assert_array_equal(raw_info.array, array)
    np.testing.assert_array_equal(gz_info.array, array)
    assert raw_info.sha256 == gz_info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (raw_info.compressed, gz_info.compressed) == (False, True)


def test_compression_detected_by_content_not_name(small_images, tmp_path):
    path, array = small_images
    raw_named_gz = tmp_path / "raw-but-named.gz"
    raw_named_gz.write_bytes(path.read_bytes())
    gz_named_raw = tmp_path / "gzip-but-no-suffix"
    gz_named_raw.write_bytes(gzip.compress(path.read_bytes()))
    np.testing.assert_array_equal(read_idx(raw_named_gz), array)
    np.testing.assert_array_equal(read_idx(gz_named_raw), array)


def test_result_is_read_only(small_images):
    array = read_idx(small_images[0])
    assert not array.flags.writeable, "cached arrays must not be writable"


@pytest.mark.parametrize(
    ("code", "dtype"),
    [(0x09, "i1"), (0x0B, ">i2"), (0x0C, ">i4"), (0x0D, ">f4"), (0x0E, ">f8")],
)
def test_every_idx_dtype(tmp_path, code, dtype):
    array = np.arange(-3, 9).reshape(3, 4).astype(dtype)
    path = tmp_path / "x.idx"
    path.write_bytes(_idx_bytes(array, code))
    out = read_idx(path)
    np.testing.assert_array_equal(out, array)
    assert out.dtype.isnative, f"expected native byte order, got {out.dtype}"


def test_write_idx_roundtrip(tmp_path):
    array = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    path = write_idx(tmp_path / "x.gz", array, compress=True)
    np.testing.assert_array_equal(read_idx(path), array)


# ----------------------------------------------------------------------- broken files
# Each case: a function turning valid IDX bytes into broken bytes, and a phrase of the message.
BROKEN = {
    "empty": (lambda b: b"", "empty file"),
    "short header": (lambda b: b[:3], "truncated IDX header"),
    "missing dims": (lambda b: b[:9], "truncated IDX header"),
    "truncated data": (lambda b: b[:-5], "truncated IDX file"),
    "trailing bytes": (lambda b: b + b"\x00\x00", "trailing bytes"),
    "wrong magic": (lambda b: b"\x01\x02" + b[2:], "not an IDX file"),
    "wrong dtype code": (lambda b: b[:2] + b"\x07" + b[3:], "unknown IDX dtype code 0x07"),
    "zero dims": (lambda b: b[:3] + b"\x00", "0 dimensions"),
    "dimension/length mismatch": (
        lambda b: b[:4] + struct.pack(">I", 6) + b[8:],
        "truncated IDX file",
    ),
    "text file": (lambda b: b"hello, world\n", "not an IDX file"),
}


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_file_gives_one_data_error_naming_file(small_images, tmp_path, case, compress):
    path, _ = small_images
    breaker, phrase = BROKEN[case]
    content = breaker(path.read_bytes())
    bad = tmp_path / f"bad-{case.replace(' ', '-').replace('/', '-')}"
    bad.write_bytes(gzip.compress(content) if compress else content)
    with pytest.raises(DataError) as excinfo:
        read_idx(bad)
    message = str(excinfo.value)
    assert str(bad) in message, f"message must name the file: {message}"
    assert phrase in message, f"expected {phrase!r} in: {message}"


@pytest.mark.parametrize(
    ("case", "mangle"),
    [
        ("truncated gzip", lambda gz: gz[: len(gz) // 2]),
        ("bad deflate data", lambda gz: gz[:10] + b"\xff" * 20 + gz[30:]),
        ("bad crc", lambda gz: gz[:-8] + bytes(4) + gz[-4:]),
        ("gzip magic only", lambda gz: gz[:2]),
        ("garbage after stream", lambda gz: gz + b"garbage!"),
    ],
)
def test_corrupt_gzip_stream(small_images, tmp_path, case, mangle):
    path, _ = small_images
    bad = tmp_path / "bad.gz"
    bad.write_bytes(mangle(gzip.compress(path.read_bytes())))
    with pytest.raises(DataError, match="corrupt gzip stream") as excinfo:
        read_idx(bad)
    assert str(bad) in str(excinfo.value), case
    assert excinfo.value.__cause__ is None, "no zlib/OSError traceback chained to the user"


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found") as excinfo:
        read_idx(tmp_path / "nope.gz")
    assert "nope.gz" in str(excinfo.value)


def test_directory_instead_of_file(tmp_path):
    folder = tmp_path / "train-images-idx3-ubyte.gz"
    folder.mkdir()
    with pytest.raises(DataError, match="is a directory") as excinfo:
        read_idx(folder)
    assert str(folder) in str(excinfo.value)


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read any file"
)
def test_no_read_permission_real_chmod(small_images):
    path, _ = small_images
    path.chmod(0)
    try:
        with pytest.raises(DataError, match="permission denied"):
            read_idx(path)
    finally:
        path.chmod(0o644)


def test_no_read_permission_simulated(small_images, monkeypatch):
    """Runs as root too: ``open`` inside pipeline.idx raises PermissionError like a chmod 000."""
    path, _ = small_images

    def deny(file, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(idx, "open", deny, raising=False)
    with pytest.raises(DataError, match="permission denied") as excinfo:
        read_idx(path)
    assert str(path) in str(excinfo.value)


def test_absurd_header_does_not_allocate(tmp_path):
    """A header claiming 4e9 x 4e9 items must fail on the real length, not run out of memory."""
    bad = tmp_path / "huge"
    bad.write_bytes(bytes([0, 0, 0x08, 2]) + struct.pack(">2I", 2**32 - 1, 2**32 - 1) + b"x" * 10)
    with pytest.raises(DataError, match="truncated IDX file"):
        read_idx(bad)


def test_empty_axis_with_absurd_other_axes_is_a_data_error(tmp_path):
    """Found by the fuzzer: 0 data bytes, but NumPy cannot shape 0 x 821 x 1e8 x 1e8."""
    bad = tmp_path / "empty-axis"
    bad.write_bytes(bytes([0, 0, 0x08, 4]) + struct.pack(">4I", 0, 821, 105985019, 105999078))
    with pytest.raises(DataError, match="empty dimension"):
        read_idx(bad)
