"""Save and load a network's state as ONE ``.npz`` file, safely.

This module works on plain state dicts (the format of :meth:`mlp.MLP.get_state`:
``architecture``, ``init``, ``weights``, ``biases``) and knows nothing of the network class;
:meth:`mlp.MLP.save` and :meth:`mlp.MLP.load` wrap :func:`save_state` and :func:`load_state`.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlp.errors import ModelFileError

FORMAT_NAME = "mlp-npz"
FORMAT_VERSION = 1

# Builds the error for one problem with the file being loaded (see :func:`model_file_error`).
_Fail = Callable[[str], ModelFileError]


def model_file_error(path: str | os.PathLike, problem: str) -> ModelFileError:
    """The one-line error every loading problem raises: ``model file '<path>': <problem>``."""
    return ModelFileError(f"model file {str(Path(path))!r}: {problem}")


def _array_names(n_layers: int) -> list[str]:
    return [name for layer in range(n_layers) for name in (f"W{layer}", f"b{layer}")]


def _checksum(arrays: list[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()


# ============================================================================ save


def save_state(state: dict, path: str | os.PathLike) -> Path:
    """Write a network state to ``path`` (exactly that name; written atomically).

    Parameters
    ----------
    state : dict
        As returned by :meth:`mlp.MLP.get_state`: ``architecture`` (JSON-ready dict),
        ``init`` (str), ``weights`` and ``biases`` (lists of ndarray, one per layer).
    path : str or Path

    Returns
    -------
    Path
        The file written.
    """
    path = Path(path)
    weights, biases = state["weights"], state["biases"]
    params = [p for pair in zip(weights, biases, strict=True) for p in pair]
    arrays = dict(zip(_array_names(len(weights)), params, strict=True))
    metadata = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "architecture": state["architecture"],
        "init": state["init"],
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


# ============================================================================ load


def load_state(path: str | os.PathLike, expected_architecture: dict | None = None) -> dict:
    """Read and check a network state written by :func:`save_state`.

    Parameters
    ----------
    path : str or Path
    expected_architecture : dict, optional
        If given, every key in it must equal the file's architecture (``hidden_sizes``
        compared as lists).

    Returns
    -------
    dict
        ``architecture``, ``init``, ``weights``, ``biases``: what :meth:`mlp.MLP.from_state`
        takes. The weights have the shapes and dtype the architecture says, are finite and
        match the checksum; the activation name is not checked here (the network is).

    Raises
    ------
    ModelFileError
        Missing/unreadable/non-npz file, pickled content, an entry that is not a ``.npy``
        array, unknown format, missing, extra, misshapen, mistyped or non-finite arrays,
        checksum mismatch, unexpected architecture.
    """
    path = Path(path)

    def fail(problem: str) -> ModelFileError:
        return model_file_error(path, problem)

    contents = _read_npz(path, fail)
    meta = _check_metadata(contents.pop("metadata", None), fail)
    params = _check_arrays(contents, meta, fail)
    if expected_architecture is not None:
        _check_expected_architecture(meta.architecture, expected_architecture, fail)
    return {
        "architecture": meta.architecture,
        "init": meta.init,
        "weights": params[0::2],
        "biases": params[1::2],
    }


def _read_npz(path: Path, fail: _Fail) -> dict[str, np.ndarray | bytes]:
    """Every entry of the archive at ``path``, read with ``allow_pickle=False``.

    An entry that is not a ``.npy`` file comes back as its raw bytes (that is what
    ``NpzFile`` gives); the checks that look at it by name reject it.
    """
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
            return {name: npz[name] for name in npz.files}
    except ModelFileError:
        raise
    except Exception as exc:  # any failure to read is a bad file, reported in one line
        if isinstance(exc, ValueError) and "pickle" in str(exc):
            # numpy refuses pickled content (object arrays, pickle files) under allow_pickle=False
            raise fail("contains pickled data (refused; not a file written by mlp)") from None
        raise fail(f"not a readable .npz archive ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class _Metadata:
    """What the ``metadata`` entry says, after the checks of :func:`_check_metadata`."""

    architecture: dict
    sizes: list  # [n_features, *hidden_sizes, n_classes]
    activation: str  # checked by the network built from the state
    dtype: str
    init: str
    specs: dict  # array name -> {"shape": [...], "dtype": "..."}, as written
    sha256: str


def _check_metadata(raw: np.ndarray | bytes | None, fail: _Fail) -> _Metadata:
    """Parse the ``metadata`` entry: its JSON, format, version and architecture."""
    if raw is None:
        raise fail("no 'metadata' entry (not a file written by mlp)")
    if not isinstance(raw, np.ndarray) or raw.shape != () or raw.dtype.kind != "U":
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
    return _Metadata(arch, sizes, activation, dtype, meta.get("init", "he"), specs, checksum)


def _check_arrays(
    contents: dict[str, np.ndarray | bytes], meta: _Metadata, fail: _Fail
) -> list[np.ndarray]:
    """Check the arrays against the metadata; return them in the order W0, b0, W1, b1, ..."""
    names = _array_names(len(meta.sizes) - 1)
    _check_array_names(set(contents), names, meta.specs, fail)
    params = [contents[k] for k in names]
    for k, a, shape in zip(names, params, _expected_shapes(meta.sizes), strict=True):
        _check_array(k, a, shape, meta.specs[k], meta.dtype, fail)
    if _checksum(params) != meta.sha256:
        raise fail("checksum mismatch (the arrays were modified after saving)")
    for k, a in zip(names, params, strict=True):
        # Other dtypes than floats are refused when the network is built from the state.
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise fail(f"array {k} contains NaN or infinite values")
    return params


def _check_array_names(found: set[str], names: list[str], specs, fail: _Fail) -> None:
    """The archive and the metadata's array list both hold exactly ``names``."""
    missing = [k for k in names if k not in found]
    extra = sorted(found - set(names))
    if missing:
        raise fail(f"missing arrays {missing}")
    if extra:
        raise fail(f"unexpected arrays {extra}")
    if not isinstance(specs, dict) or set(specs) != set(names):
        raise fail("metadata array list does not match the architecture")


def _check_array(
    name: str, a: np.ndarray | bytes, shape: tuple, spec, dtype: str, fail: _Fail
) -> None:
    """One array has the architecture's ``shape`` and ``dtype``, as its metadata ``spec`` says."""
    if not isinstance(a, np.ndarray):
        raise fail(f"array {name} is not a valid .npy array")
    if not isinstance(spec, dict):
        spec = {}  # a corrupt spec matches nothing
    if a.shape != shape or list(a.shape) != spec.get("shape"):
        raise fail(f"array {name} has shape {a.shape}, expected {shape}")
    if a.dtype.name != dtype or spec.get("dtype") != dtype:
        raise fail(f"array {name} has dtype {a.dtype.name}, expected {dtype}")


def _expected_shapes(sizes: list) -> list[tuple]:
    """``[(n_in, n_out), (n_out,), ...]``: the shapes of W0, b0, W1, b1, ..."""
    shapes = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        shapes += [(fan_in, fan_out), (fan_out,)]
    return shapes


def _check_expected_architecture(arch: dict, expected: dict, fail: _Fail) -> None:
    for key, want in expected.items():
        got = arch.get(key)
        if key == "hidden_sizes":
            got, want = list(got or []), list(want)
        if got != want:
            raise fail(f"architecture {key}={got!r}, expected {want!r}")
