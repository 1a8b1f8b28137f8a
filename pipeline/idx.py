"""Read IDX files (the MNIST format), gzip-compressed or raw, with strict validation.

An IDX file is a header followed by the data in C order, big-endian::

    bytes 0-1   0x00 0x00
    byte  2     dtype code: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
                0x0D float32, 0x0E float64
    byte  3     number of dimensions (ndim)
    then ndim   big-endian uint32 sizes, then prod(sizes) items.

Whether a file is gzip-compressed is decided by its content (the gzip magic ``1f 8b``), not its
name, so a raw file called ``*.gz`` reads as well as a compressed one without the suffix.
Every problem (missing, unreadable, truncated, corrupt, trailing bytes) is one
:class:`~pipeline.errors.DataError` whose message starts with the file's path.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pipeline.errors import DataError

#: IDX dtype code -> NumPy dtype (big-endian, as stored in the file).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20


@dataclass(frozen=True, repr=False)
class IdxFile:
    """The content of one IDX file.

    Attributes
    ----------
    path : Path
        The file that was read.
    array : np.ndarray
        The data, shape as in the header, native byte order, read-only.
    sha256 : str
        SHA-256 (hex) of the *decompressed* file content, header included.
    compressed : bool
        Whether the file was gzip-compressed (detected from its content).
    """

    path: Path
    array: np.ndarray
    sha256: str
    compressed: bool

    def __repr__(self) -> str:
        return (
            f"IdxFile(path={str(self.path)!r}, shape={self.array.shape}, "
            f"dtype={self.array.dtype}, compressed={self.compressed})"
        )


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) into a read-only array.

    Parameters
    ----------
    path : str or Path
        The file to read.

    Returns
    -------
    np.ndarray
        Shape and dtype as declared in the header (e.g. ``(60000, 28, 28)`` uint8 for MNIST
        training images), native byte order, ``flags.writeable`` False.

    Raises
    ------
    DataError
        If the file is missing, unreadable, not IDX, truncated, has trailing bytes or is a
        corrupt gzip stream. The message names the file and the problem.
    """
    return read_idx_file(path).array


def read_idx_file(path: str | Path) -> IdxFile:
    """Read an IDX file once, hashing its decompressed bytes while reading.

    See :func:`read_idx`; this also returns the SHA-256 and whether the file was compressed.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected an IDX file")
    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == GZIP_MAGIC
            raw.seek(0)
            if compressed:
                with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                    return _parse(path, stream, compressed=True)
            return _parse(path, raw, compressed=False)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied (cannot read the file)") from None
    except (gzip.BadGzipFile, zlib.error, EOFError) as exc:
        # EOFError: the gzip stream ends early (a truncated download).
        raise DataError(f"{path}: corrupt gzip stream ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or exc})") from None


def _parse(path: Path, stream: BinaryIO, *, compressed: bool) -> IdxFile:
    """Validate the header, then read exactly the declared number of data bytes."""
    hasher = hashlib.sha256()
    magic = stream.read(4)
    hasher.update(magic)
    if len(magic) == 0:
        raise DataError(f"{path}: empty file, expected an IDX file")
    if len(magic) < 4:
        raise DataError(f"{path}: truncated IDX header ({len(magic)} bytes)")
    if magic[:2] != b"\x00\x00":
        raise DataError(
            f"{path}: not an IDX file (magic number {magic.hex()} should start with 0000)"
        )
    code, ndim = magic[2], magic[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise DataError(f"{path}: unknown IDX dtype code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares 0 dimensions")
    dims_raw = stream.read(4 * ndim)
    hasher.update(dims_raw)
    if len(dims_raw) < 4 * ndim:
        raise DataError(f"{path}: truncated IDX header (expected {ndim} dimension sizes)")
    dims = struct.unpack(f">{ndim}I", dims_raw)
    if 0 in dims:
        # An empty axis makes the data 0 bytes whatever the other sizes claim, and NumPy
        # refuses to even shape an empty array whose other axes overflow its size limit.
        shape = "x".join(map(str, dims))
        raise DataError(f"{path}: IDX header declares an empty dimension ({shape})")
    dtype = IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize  # Python ints: no overflow on absurd headers

    # Read at most one byte past the declared size: enough to detect trailing data, and a
    # header claiming absurd sizes cannot make us allocate more than the file really holds.
    buf = bytearray()
    while len(buf) <= expected:
        chunk = stream.read(min(_CHUNK, expected + 1 - len(buf)))
        if not chunk:
            break
        buf += chunk
        hasher.update(chunk)
    shape = "x".join(map(str, dims))
    if len(buf) < expected:
        raise DataError(
            f"{path}: truncated IDX file: header declares {shape} {dtype.name} "
            f"({expected} data bytes), found {len(buf)}"
        )
    if len(buf) > expected:
        raise DataError(
            f"{path}: trailing bytes after the {expected} data bytes declared by the header "
            f"({shape} {dtype.name})"
        )
    array = np.frombuffer(buf, dtype=dtype).reshape(dims)
    if dtype.itemsize > 1:
        array = array.astype(dtype.newbyteorder("="))
    array.flags.writeable = False
    return IdxFile(path=path, array=array, sha256=hasher.hexdigest(), compressed=compressed)


def is_gzip_file(path: str | Path) -> bool:
    """Whether ``path`` starts with the gzip magic bytes (False if it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return f.read(2) == GZIP_MAGIC
    except OSError:
        return False


def write_idx(path: str | Path, array: np.ndarray, *, compress: bool = False) -> Path:
    """Write ``array`` as an IDX file (used by tests and the sample tools).

    Parameters
    ----------
    path : str or Path
        Destination file.
    array : np.ndarray
        Any shape, dtype one of :data:`IDX_DTYPES`.
    compress : bool
        Gzip the output (deterministic: no name or timestamp in the gzip header).
    """
    path = Path(path)
    codes = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}
    native = np.dtype(array.dtype).newbyteorder("=")
    if native not in codes:
        raise DataError(f"{path}: cannot write dtype {array.dtype} as IDX")
    code = codes[native]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()
    if compress:
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    path.write_bytes(payload)
    return path
