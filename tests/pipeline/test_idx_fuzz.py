"""Fuzzing the IDX reader: whatever the bytes, ``read_idx`` returns an array or raises DataError.

Inputs are random bytes, and a real small IDX file (the first MNIST images and labels of the
bundled sample) with bytes flipped, inserted, deleted or overwritten, raw or gzip-compressed
(mutated before compression: the parser sees it; after: the gzip layer does). A mutation that
still describes a valid file may load; then the array must agree with the bytes read.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipeline.data import load_dataset
from pipeline.errors import DataError
from pipeline.idx import GZIP_MAGIC, IDX_DTYPES, read_idx, read_idx_file

FUZZ = settings(
    max_examples=200,
    deadline=None,
    # One file per test, overwritten by every example: the tmp_path fixture is safe to share.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _idx_bytes(array: np.ndarray) -> bytes:
    code = {dt.newbyteorder("="): c for c, dt in IDX_DTYPES.items()}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _real_files() -> dict[str, bytes]:
    """Real MNIST content, small: 3 training images (28x28) and their 3 labels, raw IDX."""
    sample = load_dataset("mnist-sample")
    return {
        "images": _idx_bytes(np.ascontiguousarray(sample.X_train[:3].reshape(3, 28, 28))),
        "labels": _idx_bytes(np.ascontiguousarray(sample.y_train[:3])),
    }


REAL = _real_files()


def _header_length(content: bytes) -> int | None:
    """Length of a well-formed header at the start of ``content`` (None if there is none)."""
    if len(content) < 4 or content[:2] != b"\x00\x00" or content[2] not in IDX_DTYPES:
        return None
    return 4 + 4 * content[3]


def _check(path: Path, content: bytes) -> None:
    """Read ``path`` (whose decompressed bytes are ``content``); only DataError may escape."""
    try:
        info = read_idx_file(path)
    except DataError as exc:
        message = str(exc)
        assert message.startswith(str(path)), f"message should start with the path: {message!r}"
        assert "\n" not in message, f"one line: {message!r}"
        return
    # It loaded: the array must be exactly what the bytes say.
    header = _header_length(content)
    assert header is not None, f"loaded a file without a valid header: {content[:8]!r}"
    dtype = IDX_DTYPES[content[2]]
    dims = struct.unpack(f">{content[3]}I", content[4:header])
    assert info.array.shape == dims, f"shape {info.array.shape} vs header {dims}"
    assert info.array.size * dtype.itemsize == len(content) - header, "payload length"
    assert info.sha256 == hashlib.sha256(content).hexdigest(), "hash of the decompressed bytes"
    np.testing.assert_array_equal(
        info.array, np.frombuffer(content, dtype=dtype, offset=header).reshape(dims)
    )
    assert not info.array.flags.writeable, "arrays are returned read-only"


# ----------------------------------------------------------------------------- random bytes


@FUZZ
@given(content=st.binary(max_size=4096))
def test_random_bytes_load_or_raise_data_error(tmp_path, content):
    path = tmp_path / "random"
    path.write_bytes(content)
    _check(path, content)


@FUZZ
@given(tail=st.binary(max_size=2048))
def test_random_bytes_behind_the_gzip_magic(tmp_path, tail):
    path = tmp_path / "random.gz"
    path.write_bytes(GZIP_MAGIC + tail)
    try:
        read_idx(path)
    except DataError as exc:
        assert str(exc).startswith(str(path)), str(exc)


@FUZZ
@given(content=st.binary(max_size=4096))
def test_gzipped_random_bytes_load_or_raise_data_error(tmp_path, content):
    path = tmp_path / "random.gz"
    path.write_bytes(gzip.compress(content, mtime=0))
    _check(path, content)


@FUZZ
@given(
    code=st.sampled_from(sorted(IDX_DTYPES)),
    dims=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=4),
    payload=st.binary(max_size=512),
)
def test_random_headers_never_allocate_what_the_file_lacks(tmp_path, code, dims, payload):
    """Absurd declared sizes fail on the real length (no MemoryError, no overflow)."""
    content = bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + payload
    path = tmp_path / "header"
    path.write_bytes(content)
    _check(path, content)


# ----------------------------------------------------------------------------- mutated real files

_MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 64)),
    st.tuples(st.just("overwrite"), st.integers(0, 15), st.binary(min_size=1, max_size=4)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
)


def _mutate(content: bytes, mutations: list[tuple]) -> bytes:
    """Apply flips, insertions, deletions, header overwrites and truncations at given offsets."""
    data = bytearray(content)
    for kind, where, what in mutations:
        at = where % (len(data) + 1)
        if kind == "flip" and data:
            data[at % len(data)] ^= 1 << what
        elif kind == "insert":
            data[at:at] = what
        elif kind == "delete":
            del data[at : at + what]
        elif kind == "overwrite":
            data[where : where + len(what)] = what
        elif kind == "truncate":
            del data[at:]
    return bytes(data)


@pytest.mark.parametrize("which", sorted(REAL))
@FUZZ
@given(mutations=st.lists(_MUTATION, min_size=1, max_size=4))
def test_mutated_real_file_raw(tmp_path, which, mutations):
    content = _mutate(REAL[which], mutations)
    path = tmp_path / f"{which}-idx-ubyte"
    path.write_bytes(content)
    _check(path, content)


@pytest.mark.parametrize("which", sorted(REAL))
@FUZZ
@given(mutations=st.lists(_MUTATION, min_size=1, max_size=4))
def test_mutated_real_file_then_gzipped(tmp_path, which, mutations):
    content = _mutate(REAL[which], mutations)
    path = tmp_path / f"{which}-idx-ubyte.gz"
    path.write_bytes(gzip.compress(content, mtime=0))
    _check(path, content)


@pytest.mark.parametrize("which", sorted(REAL))
@FUZZ
@given(mutations=st.lists(_MUTATION, min_size=1, max_size=4))
def test_gzipped_real_file_then_mutated(tmp_path, which, mutations):
    compressed = gzip.compress(REAL[which], mtime=0)
    mutated = _mutate(compressed, mutations)
    assume(mutated != compressed)
    path = tmp_path / f"{which}-idx-ubyte.gz"
    path.write_bytes(mutated)
    try:
        info = read_idx_file(path)
    except DataError as exc:
        assert str(exc).startswith(str(path)), str(exc)
        assert "\n" not in str(exc), str(exc)
        return
    # A mutation gzip cannot notice (e.g. in the header's optional fields) may load; then the
    # content must still be the original, or the CRC would have failed.
    assert info.sha256 == hashlib.sha256(REAL[which]).hexdigest(), "a corrupt stream loaded"


def test_unmutated_real_files_load(tmp_path):
    """The baseline of the properties above: the real files themselves load, raw and gzipped."""
    for which, content in REAL.items():
        for compress in (False, True):
            path = tmp_path / f"{which}-{compress}"
            path.write_bytes(gzip.compress(content, mtime=0) if compress else content)
            info = read_idx_file(path)
            assert info.compressed is compress and info.array.shape[0] == 3, f"{which}: {info}"
