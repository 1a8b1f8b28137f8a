"""Save/load round trip and every kind of bad model file -> ModelFileError."""

from __future__ import annotations

import ast
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

import mlp
from mlp import MLP, ModelFileError
from mlp.serialization import load_state, save_state


@pytest.fixture
def saved(tmp_path):
    net = MLP(6, [5, 4], 3, activation="tanh", init="glorot", seed=2)
    path = net.save(tmp_path / "model.npz")
    return net, path


def _assert_one_line_naming(path, error: ModelFileError) -> None:
    message = str(error)
    assert str(path) in message and "\n" not in message, f"message: {message}"


def _rewrite(path, **changes):
    """Rewrite an .npz with some arrays replaced (None removes one)."""
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def test_round_trip_gives_identical_predictions(saved):
    net, path = saved
    loaded = MLP.load(path)
    X = np.random.default_rng(0).standard_normal((10, 6))
    np.testing.assert_array_equal(loaded.forward(X), net.forward(X))
    assert loaded.architecture == net.architecture and loaded.init == "glorot"
    assert path.name == "model.npz", "save must write exactly the given name"


def test_file_layout_has_no_object_arrays(saved):
    _, path = saved
    with np.load(path, allow_pickle=False) as npz:
        names = sorted(npz.files)
        meta = json.loads(str(npz["metadata"]))
        assert npz["metadata"].shape == () and npz["metadata"].dtype.kind == "U"
    assert names == ["W0", "W1", "W2", "b0", "b1", "b2", "metadata"], f"arrays {names}"
    assert meta["format"] == "mlp-npz" and meta["version"] == 1
    assert meta["arrays"]["W0"] == {"shape": [6, 5], "dtype": "float32"}
    assert len(meta["sha256"]) == 64


def test_expected_architecture_is_checked(saved):
    net, path = saved
    assert MLP.load(path, expected_architecture=net.architecture).n_classes == 3
    with pytest.raises(ModelFileError, match=r"hidden_sizes=\[5, 4\], expected \[5\]"):
        MLP.load(path, expected_architecture={"hidden_sizes": [5]})


@pytest.mark.parametrize(
    ("tamper", "match"),
    [
        ("changed", "checksum mismatch"),
        ("missing", r"missing arrays \['b1'\]"),
        ("extra", r"unexpected arrays \['W9'\]"),
        ("shape", "W1 has shape"),
        ("dtype", "W1 has dtype float64"),
        ("pickled", "pickled"),
        ("metadata", "format 'other'"),
        ("no_metadata", "no 'metadata'"),
    ],
)
def test_tampered_files_raise_model_file_error(saved, tamper, match):
    net, path = saved
    W1 = net.weights[1]
    if tamper == "changed":
        _rewrite(path, W1=W1 + np.float32(1e-3))
    elif tamper == "missing":
        _rewrite(path, b1=None)
    elif tamper == "extra":
        _rewrite(path, W9=np.zeros(2, np.float32))
    elif tamper == "shape":
        _rewrite(path, W1=np.zeros((5, 5), np.float32))
    elif tamper == "dtype":
        _rewrite(path, W1=W1.astype(np.float64))
    elif tamper == "pickled":
        _rewrite(path, W1=np.array([{"evil": 1}, None], dtype=object))
    elif tamper == "metadata":
        with np.load(path) as npz:
            meta = json.loads(str(npz["metadata"]))
        meta["format"] = "other"
        _rewrite(path, metadata=np.array(json.dumps(meta)))
    elif tamper == "no_metadata":
        _rewrite(path, metadata=None)
    with pytest.raises(ModelFileError, match=match) as info:
        MLP.load(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message, f"message: {message}"


def test_other_architecture_file_is_rejected(tmp_path):
    path = MLP(6, [7], 3).save(tmp_path / "other.npz")
    with pytest.raises(ModelFileError, match="expected"):
        MLP.load(path, expected_architecture={"n_features": 6, "hidden_sizes": [5, 4]})


def test_truncated_missing_and_foreign_files(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "notes.npz"
    text.write_text("not a model")
    npy = tmp_path / "single.npy"
    np.save(npy, np.zeros(3))
    not_mlp_zip = tmp_path / "plain.zip"
    with zipfile.ZipFile(not_mlp_zip, "w") as zf:
        zf.writestr("hello.txt", "hi")
    cases = [
        (tmp_path / "absent.npz", "no such file"),
        (truncated, "not a readable"),
        (text, "pickled|not a readable"),
        (npy, "single .npy"),
        (not_mlp_zip, "metadata"),
    ]
    for bad, match in cases:
        with pytest.raises(ModelFileError, match=match):
            MLP.load(bad)


def test_save_overwrites_atomically_and_leaves_no_temp_files(saved):
    net, path = saved
    net.weights[0][0, 0] += 1
    net.save(path)
    assert MLP.load(path).weights[0][0, 0] == net.weights[0][0, 0]
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.npz"]


def test_module_level_save_and_load_take_and_return_an_mlp(saved, tmp_path):
    net, _ = saved
    path = mlp.save(net, tmp_path / "module.npz")
    loaded = mlp.load(path, expected_architecture={"hidden_sizes": [5, 4]})
    assert isinstance(loaded, MLP) and path == tmp_path / "module.npz"
    for i, (a, b) in enumerate(zip(loaded.params, net.params, strict=True)):
        np.testing.assert_array_equal(a, b, err_msg=f"param {i}")


def test_state_functions_work_on_plain_dicts(saved, tmp_path):
    net, _ = saved
    path = save_state(net.get_state(), tmp_path / "state.npz")
    state = load_state(path)
    assert state["architecture"] == net.architecture and state["init"] == "glorot"
    got, want = state["weights"] + state["biases"], net.weights + net.biases
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_array_equal(a, b, err_msg=f"array {i}")


def test_serialization_does_not_import_the_network():
    source = Path(mlp.serialization.__file__).read_text()
    imported = {
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert "mlp.network" not in imported and "mlp" not in imported, f"imports {imported}"


@pytest.mark.parametrize(
    ("entry", "content", "match"),
    [
        ("W1", b"not an array", r"array W1 is not a valid \.npy array"),
        ("metadata", b"not an array", "'metadata' is not a 0-d unicode string"),
        ("b0", b"\x93NUMPY then garbage", r"not a readable \.npz archive"),
    ],
)
def test_entry_that_is_not_a_valid_npy_raises_model_file_error(saved, entry, content, match):
    # numpy hands back the raw bytes of an entry without the .npy magic: no AttributeError.
    _, path = saved
    with zipfile.ZipFile(path) as zf:
        entries = {name: zf.read(name) for name in zf.namelist()}
    assert f"{entry}.npy" in entries, f"entries {sorted(entries)}"
    entries[f"{entry}.npy"] = content
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    with pytest.raises(ModelFileError, match=match) as info:
        MLP.load(path)
    _assert_one_line_naming(path, info.value)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(("array", "index"), [("W1", (2, 3)), ("b2", (1,))])
def test_non_finite_weights_are_refused_at_load(saved, value, array, index):
    net, path = saved
    params = dict(zip(["W0", "b0", "W1", "b1", "W2", "b2"], net.params, strict=True))
    params[array][index] = value
    net.save(path)  # a consistent file (checksum included): only the finiteness check objects
    for load in (MLP.load, mlp.load):
        with pytest.raises(ModelFileError, match=f"array {array} contains NaN or infinite") as info:
            load(path)
        _assert_one_line_naming(path, info.value)
