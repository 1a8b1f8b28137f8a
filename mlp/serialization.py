"""Save and load a network as ONE ``.npz`` file, safely.

Layout: arrays ``W0, b0, W1, b1, ...`` plus ``metadata``, a 0-d unicode array holding JSON:
``format`` and ``version``, ``architecture``, ``init``, per-array ``shape``/``dtype``, and
``sha256`` over the arrays' bytes (in the order W0, b0, W1, b1, ...). No object arrays, so
loading uses ``allow_pickle=False``; every mismatch raises :class:`ModelFileError` with one
line naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from mlp.errors import MLPError, ModelFileError

FORMAT_NAME = "mlp-npz"
FORMAT_VERSION = 1


def _array_names(n_layers: int) -> list[str]:
    return [name for layer in range(n_layers) for name in (f"W{layer}", f"b{layer}")]


def _checksum(arrays: list[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()


def save(net, path: str | os.PathLike) -> Path:
    """Write ``net`` to ``path`` (exactly that name; written atomically).

    Returns
    -------
    Path
        The file written.
    """
    path = Path(path)
    names = _array_names(len(net.weights))
    arrays = dict(zip(names, net.params, strict=True))
    metadata = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "architecture": net.architecture,
        "init": net.init,
        "arrays": {k: {"shape": list(a.shape), "dtype": a.dtype.name} for k, a in arrays.items()},
        "sha256": _checksum(list(arrays.values())),
    }
    # Write to a temporary file in the same folder, then rename: a crash never leaves a
    # half-written model under the final name.
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, metadata=np.array(json.dumps(metadata, sort_keys=True)), **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | os.PathLike, expected_architecture: dict | None = None):
    """Read a network written by :func:`save`.

    Parameters
    ----------
    path : str or Path
    expected_architecture : dict, optional
        If given, every key in it must equal the file's architecture (``hidden_sizes``
        compared as lists).

    Raises
    ------
    ModelFileError
        Missing/unreadable/non-npz file, pickled content, unknown format, missing, extra,
        misshapen or mistyped arrays, checksum mismatch, unexpected architecture.
    """
    from mlp.network import MLP

    path = Path(path)

    def fail(problem: str) -> ModelFileError:
        return ModelFileError(f"model file {str(path)!r}: {problem}")

    if not path.is_file():
        raise fail("no such file")
    try:
        with path.open("rb") as fh:
            head = fh.read(6)
        # np.load reads anything that is neither zip nor .npy as a pickle: say what it really is.
        if not head.startswith((b"PK\x03\x04", b"\x93NUMPY")):
            raise fail("not a readable .npz archive (no zip signature)")
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise fail("not an .npz archive (a single .npy array)")
        with npz:
            contents = {name: npz[name] for name in npz.files}
    except ModelFileError:
        raise
    except Exception as exc:  # any failure to read is a bad file, reported in one line
        if isinstance(exc, ValueError) and "pickle" in str(exc):
            # numpy refuses pickled content (object arrays, pickle files) under allow_pickle=False
            raise fail("contains pickled data (refused; not a file written by mlp)") from None
        raise fail(f"not a readable .npz archive ({type(exc).__name__}: {exc})") from None

    if "metadata" not in contents:
        raise fail("no 'metadata' entry (not a file written by mlp)")
    raw = contents.pop("metadata")
    if raw.shape != () or raw.dtype.kind != "U":
        raise fail("'metadata' is not a 0-d unicode string")
    try:
        meta = json.loads(str(raw))
        fmt, version = meta["format"], meta["version"]
        arch, specs, checksum = meta["architecture"], meta["arrays"], meta["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise fail(f"corrupt metadata ({exc})") from None
    if fmt != FORMAT_NAME or version != FORMAT_VERSION:
        raise fail(
            f"format {fmt!r} version {version!r}, expected {FORMAT_NAME!r} version {FORMAT_VERSION}"
        )
    try:
        sizes = [arch["n_features"], *arch["hidden_sizes"], arch["n_classes"]]
        activation, dtype = arch["activation"], arch["dtype"]
    except (KeyError, TypeError) as exc:
        raise fail(f"corrupt architecture in metadata ({exc})") from None

    names = _array_names(len(sizes) - 1)
    expected_shapes = {}
    for layer, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        expected_shapes[f"W{layer}"] = (fan_in, fan_out)
        expected_shapes[f"b{layer}"] = (fan_out,)
    missing = [k for k in names if k not in contents]
    extra = sorted(set(contents) - set(names))
    if missing:
        raise fail(f"missing arrays {missing}")
    if extra:
        raise fail(f"unexpected arrays {extra}")
    if set(specs) != set(names):
        raise fail("metadata array list does not match the architecture")
    for k in names:
        a = contents[k]
        if a.shape != expected_shapes[k] or list(a.shape) != specs[k]["shape"]:
            raise fail(f"array {k} has shape {a.shape}, expected {expected_shapes[k]}")
        if a.dtype.name != dtype or specs[k]["dtype"] != dtype:
            raise fail(f"array {k} has dtype {a.dtype.name}, expected {dtype}")
    if _checksum([contents[k] for k in names]) != checksum:
        raise fail("checksum mismatch (the arrays were modified after saving)")

    if expected_architecture is not None:
        for key, want in expected_architecture.items():
            got = arch.get(key)
            if key == "hidden_sizes":
                got, want = list(got or []), list(want)
            if got != want:
                raise fail(f"architecture {key}={got!r}, expected {want!r}")
    try:
        return MLP.from_arrays(
            [contents[f"W{i}"] for i in range(len(sizes) - 1)],
            [contents[f"b{i}"] for i in range(len(sizes) - 1)],
            activation=activation,
            dtype=dtype,
            init=meta.get("init", "he"),
        )
    except MLPError as exc:
        raise fail(str(exc)) from None
