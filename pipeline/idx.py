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

Nothing is read that a header merely claims: a file that is not a regular file (a FIFO, whose
``open`` would block forever, a socket, a device, a directory) is refused before it is opened,
and a header declaring more data than the file can hold, or than the caller expects, is refused
before its payload is read. :func:`require_regular_file` is the check every reader of the
package's own files uses.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import stat
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
#: Deflate expands at most about 1032:1, so a gzip file of n bytes holds at most this many
#: times n bytes of content (a little margin on top of the theoretical 1032.3).
GZIP_MAX_RATIO = 1040


# ------------------------------------------------------------------------- regular files
def _kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))  # fmt: skip
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _check_mode(
    st: os.stat_result, path: str | Path, error_cls: type[Exception], what: str
) -> os.stat_result:
    if not stat.S_ISREG(st.st_mode):
        raise error_cls(f"{path}: {what} (is {_kind(st.st_mode)}, not a regular file)")
    return st


def require_regular_file(
    path: str | Path, error_cls: type[Exception] = DataError, what: str = "cannot read the file"
) -> os.stat_result:
    """``os.stat(path)`` if it is a regular file (symlinks followed), else one ``error_cls``.

    Checked with ``stat`` before anything opens the file: opening a FIFO for reading blocks
    until a writer appears, and a device may do anything. The message is one line,
    ``"<path>: <what> (is a FIFO (named pipe), not a regular file)"``.

    Parameters
    ----------
    path : str or Path
    error_cls : type of Exception
        Raised for a file that exists but is not regular (``DataError``, ``RecordError``,
        ``ConfigError``...).
    what : str
        The start of the message, after the path (e.g. ``"unreadable record file"``).

    Raises
    ------
    error_cls
        The path is a directory, FIFO, socket or device.
    OSError
        ``stat`` itself failed (missing file, no search permission): each caller keeps its
        own message for those.
    """
    return _check_mode(os.stat(path), path, error_cls, what)


def _nonblocking(path: str, flags: int) -> int:
    """An ``opener`` for :func:`open`: never blocks, even on a FIFO swapped in after a check."""
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


def open_regular_file(
    path: str | Path, error_cls: type[Exception] = DataError, what: str = "cannot read the file"
) -> BinaryIO:
    """Open a regular file for reading in binary mode, refusing anything else.

    :func:`require_regular_file` first; then the file is opened without blocking and its
    ``fstat`` checked again, so a FIFO put in its place between the two cannot hang the
    caller. Errors as in :func:`require_regular_file` (``OSError`` from the ``open`` too).
    """
    require_regular_file(path, error_cls, what)
    handle = open(path, "rb", opener=_nonblocking)  # noqa: SIM115 (returned to the caller)
    try:
        _check_mode(os.fstat(handle.fileno()), path, error_cls, what)
    except BaseException:
        handle.close()
        raise
    return handle


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


def read_idx(path: str | Path, *, expected_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) into a read-only array.

    Parameters
    ----------
    path : str or Path
        The file to read.
    expected_shape : tuple of int, optional
        The shape the file should hold (one byte per item, as MNIST's uint8 files). A header
        declaring more data bytes than this is refused before its payload is read; a smaller
        one is read (its size is bounded) and left to the caller's checks.

    Returns
    -------
    np.ndarray
        Shape and dtype as declared in the header (e.g. ``(60000, 28, 28)`` uint8 for MNIST
        training images), native byte order, ``flags.writeable`` False.

    Raises
    ------
    DataError
        If the file is missing, unreadable, not a regular file, not IDX, truncated, larger
        than expected, has trailing bytes or is a corrupt gzip stream. The message names the
        file and the problem.
    """
    return read_idx_file(path, expected_shape=expected_shape).array


def read_idx_file(path: str | Path, *, expected_shape: tuple[int, ...] | None = None) -> IdxFile:
    """Read an IDX file once, hashing its decompressed bytes while reading.

    See :func:`read_idx`; this also returns the SHA-256 and whether the file was compressed.
    Memory is bounded before the payload is read: by ``expected_shape`` when given, and in
    any case by what the file can hold (its size for a raw file, :data:`GZIP_MAX_RATIO` times
    its size for a gzip one).
    """
    path = Path(path)
    try:
        with open_regular_file(path, DataError, "cannot read the IDX file") as raw:
            size = os.fstat(raw.fileno()).st_size
            compressed = raw.read(2) == GZIP_MAGIC
            raw.seek(0)
            limits = _Limits(expected_shape, size * GZIP_MAX_RATIO if compressed else size)
            if compressed:
                with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                    return _parse(path, stream, compressed=True, limits=limits)
            return _parse(path, raw, compressed=False, limits=limits)
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


@dataclass(frozen=True)
class _Limits:
    """What a header may declare: at most ``expected`` items (if known), ``content`` bytes."""

    expected: tuple[int, ...] | None
    content: int  # the most (decompressed) bytes the file can hold, header included

    def check(self, path: Path, dims: tuple[int, ...], dtype: np.dtype, header: int) -> None:
        shape = "x".join(map(str, dims))
        declared = math.prod(dims) * dtype.itemsize
        if self.expected is not None and declared > math.prod(self.expected):
            wanted = "x".join(map(str, self.expected))
            raise DataError(
                f"{path}: IDX header declares {shape} {dtype.name} ({declared} bytes), more "
                f"than the expected {wanted} ({math.prod(self.expected)} bytes); not read"
            )
        if declared > self.content - header:
            raise DataError(
                f"{path}: truncated IDX file: header declares {shape} {dtype.name} "
                f"({declared} data bytes), more than the file can hold "
                f"(at most {max(self.content - header, 0)})"
            )


def _parse(path: Path, stream: BinaryIO, *, compressed: bool, limits: _Limits) -> IdxFile:
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
    limits.check(path, dims, dtype, header=4 + 4 * ndim)
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
        with open_regular_file(path) as f:
            return f.read(2) == GZIP_MAGIC
    except (OSError, DataError):
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
