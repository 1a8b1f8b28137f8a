"""PipelineConfig: presets, TOML files, --set parsing, precedence and one-line validation errors."""

from __future__ import annotations

import json
import math

import pydantic
import pytest

from pipeline.config import (
    PRESETS,
    PipelineConfig,
    build_config,
    load_toml,
    parse_set_options,
    preset,
    resolve_config,
)
from pipeline.errors import ConfigError

SECTIONS = ("data", "model", "training", "augment", "cv", "search", "execution", "tracking")


def _write(tmp_path, text: str, name: str = "config.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- presets


def test_notebook_preset_is_the_homework_protocol():
    # Arrange: the values written in the homework, typed here independently of PRESETS.
    expected = {
        "data.dataset": "mnist",
        "data.normalization": "scale",
        "model.hidden_sizes": [64],
        "model.activation": "relu",
        "model.init": "notebook",
        "training.optimizer": "gd",
        "training.lr": 0.05,
        "training.batch_size": None,
        "training.epochs": 200,
        "training.final_epochs": 300,
        "cv.folds": 4,
        "cv.shuffle": False,
        "cv.stratify": False,
    }

    # Act
    cfg = preset("notebook")
    flat = cfg.flat()

    # Assert
    for key, value in expected.items():
        assert flat[key] == value, f"notebook preset {key}: got {flat[key]!r}, expected {value!r}"
    assert sorted(cfg.cv.l2_lambdas) == [1e-4, 1e-3, 1e-2, 1e-1], (
        f"notebook lambdas should be 1e-1..1e-4, got {cfg.cv.l2_lambdas}"
    )
    assert cfg.training.resolved_final_epochs == 300, "final model must train 300 epochs"


def test_notebook_preset_network_is_784_64_10():
    # Arrange
    from mlp import MLP

    cfg = preset("notebook")

    # Act
    net = MLP(
        n_features=784, hidden_sizes=cfg.model.hidden_sizes, n_classes=10,
        activation=cfg.model.activation, init=cfg.model.init, dtype=cfg.model.dtype, seed=0,
    )  # fmt: skip

    # Assert
    shapes = [w.shape for w in net.weights]
    assert shapes == [(784, 64), (64, 10)], f"notebook network shapes {shapes}, expected 784-64-10"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates(name):
    # Act
    cfg = preset(name)

    # Assert
    assert isinstance(cfg, PipelineConfig), f"preset {name} did not build a PipelineConfig"


def test_quick_preset_uses_the_bundled_sample():
    # Act
    cfg = preset("quick")

    # Assert
    assert cfg.data.dataset == "mnist-sample", f"quick preset dataset is {cfg.data.dataset}"
    assert cfg.training.epochs <= 5, f"quick preset trains {cfg.training.epochs} epochs"


def test_unknown_preset_names_it():
    # Act / Assert
    with pytest.raises(ConfigError, match="nope") as info:
        preset("nope")
    assert "notebook" in str(info.value), "message should list the valid presets"


# ----------------------------------------------------------------------------- TOML files


def test_toml_nested_sections_are_applied(tmp_path):
    # Arrange
    path = _write(
        tmp_path,
        '[model]\nhidden_sizes = [32, 16]\nactivation = "tanh"\n'
        "[training]\nepochs = 7\nlr = 0.01\n"
        "[cv]\nl2_lambdas = [0.5, 0.25]\nfolds = 3\n",
    )

    # Act
    cfg = resolve_config(config_file=path)

    # Assert
    assert cfg.model.hidden_sizes == [32, 16], f"hidden_sizes {cfg.model.hidden_sizes}"
    assert cfg.model.activation == "tanh", f"activation {cfg.model.activation}"
    assert cfg.training.epochs == 7, f"epochs {cfg.training.epochs}"
    assert cfg.training.lr == 0.01, f"lr {cfg.training.lr}"
    assert sorted(cfg.cv.l2_lambdas) == [0.25, 0.5], f"lambdas {cfg.cv.l2_lambdas}"
    assert cfg.cv.folds == 3, f"folds {cfg.cv.folds}"
    # Untouched settings keep the default preset's values.
    assert cfg.data == PipelineConfig().data, "an unmentioned section should keep its defaults"


def test_toml_top_level_preset_is_the_base(tmp_path):
    # Arrange
    path = _write(tmp_path, 'preset = "quick"\n[training]\nepochs = 2\n')

    # Act
    cfg = resolve_config(config_file=path)

    # Assert: quick's values, with the file's override on top.
    quick = preset("quick")
    assert cfg.data.dataset == quick.data.dataset == "mnist-sample", f"dataset {cfg.data.dataset}"
    assert cfg.model.hidden_sizes == quick.model.hidden_sizes, "hidden sizes should come from quick"
    assert cfg.training.epochs == 2, f"file value should win over the preset: {cfg.training.epochs}"


def test_explicit_preset_wins_over_the_file_preset(tmp_path):
    # Arrange
    path = _write(tmp_path, 'preset = "quick"\n')

    # Act
    cfg = resolve_config("notebook", path)

    # Assert
    assert cfg == preset("notebook"), "an explicit preset argument should replace the file's"


def test_toml_non_string_preset_is_rejected(tmp_path):
    # Arrange
    path = _write(tmp_path, "preset = 3\n")

    # Act / Assert
    with pytest.raises(ConfigError, match="preset"):
        resolve_config(config_file=path)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[training]\nepochz = 3\n", "training.epochz"),
        ("[nosuchsection]\nx = 1\n", "nosuchsection.x"),
        ("epochs = 3\n", "epochs"),
    ],
    ids=["unknown-key", "unknown-section", "top-level-key"],
)
def test_toml_unknown_key_is_named(tmp_path, text, named):
    # Arrange
    path = _write(tmp_path, text)

    # Act
    with pytest.raises(ConfigError) as info:
        resolve_config(config_file=path)

    # Assert
    message = str(info.value)
    assert named in message, f"message should name {named!r}: {message}"
    assert str(path) in message, f"message should name the file: {message}"
    assert "\n" not in message, f"message should be one line: {message!r}"


def test_toml_invalid_value_names_file_and_field(tmp_path):
    # Arrange
    path = _write(tmp_path, "[training]\nlr = -1.0\n")

    # Act
    with pytest.raises(ConfigError) as info:
        resolve_config(config_file=path)

    # Assert
    message = str(info.value)
    assert "training.lr" in message and str(path) in message, f"unhelpful message: {message}"


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda d: _write(d, "[training\nepochs = 3\n"), "not valid TOML"),
        (lambda d: d / "missing.toml", "does not exist"),
        (lambda d: d, "is a directory"),
        (lambda d: _bytes(d, b'[data]\ndataset = "mn\xffist"\n'), "not UTF-8"),
    ],
    ids=["malformed", "missing", "directory", "not-utf8"],
)
def test_unreadable_toml_is_one_line_config_error(tmp_path, make, fragment):
    # Arrange
    path = make(tmp_path)

    # Act
    with pytest.raises(ConfigError) as info:
        load_toml(path)

    # Assert
    message = str(info.value)
    assert fragment in message, f"expected {fragment!r} in {message!r}"
    assert str(path) in message, f"message should name the path: {message!r}"
    assert "\n" not in message, f"message should be one line: {message!r}"


def _bytes(directory, data: bytes):
    path = directory / "latin1.toml"
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------- --set parsing


@pytest.mark.parametrize(
    ("item", "key", "value"),
    [
        ("training.epochs=3", "training.epochs", 3),
        ("training.lr=1e-3", "training.lr", 1e-3),
        ("cv.shuffle=false", "cv.shuffle", False),
        ("model.hidden_sizes=[64, 32]", "model.hidden_sizes", [64, 32]),
        ("model.activation=tanh", "model.activation", "tanh"),
        ('model.activation="tanh"', "model.activation", "tanh"),
        ("cv.l2_lambdas=1e-3,1e-4", "cv.l2_lambdas", [1e-3, 1e-4]),
        ("model.hidden_sizes=64,32", "model.hidden_sizes", [64, 32]),
        ("training.batch_size=null", "training.batch_size", None),
        ("training.batch_size=None", "training.batch_size", None),
        (" training.epochs = 4 ", "training.epochs", 4),
        ("tracking.tracking_uri=http://h:5000/?a=b", "tracking.tracking_uri", "http://h:5000/?a=b"),
    ],
)
def test_parse_set_options_values(item, key, value):
    # Act
    parsed = parse_set_options([item])

    # Assert
    assert parsed == {key: value}, f"{item!r} parsed to {parsed!r}, expected {{{key!r}: {value!r}}}"
    assert type(parsed[key]) is type(value), f"{item!r}: type {type(parsed[key]).__name__}"


@pytest.mark.parametrize(
    "item", ["cv.l2_lambdas=1e-3,,2", "cv.l2_lambdas=1e-3,", "model.hidden_sizes=,64"]
)
def test_parse_set_options_rejects_an_empty_list_item(item):
    # A typo must not quietly become a different grid.
    with pytest.raises(ConfigError, match="empty item"):
        parse_set_options([item])


@pytest.mark.parametrize("item", ["training.epochs", "=3", ""])
def test_parse_set_options_without_key_value_is_rejected(item):
    # Act / Assert
    with pytest.raises(ConfigError, match="key=value"):
        parse_set_options([item])


def test_parse_set_options_later_wins():
    # Act
    parsed = parse_set_options(["training.epochs=3", "training.epochs=5"])

    # Assert
    assert parsed == {"training.epochs": 5}, f"the last --set should win: {parsed}"


# ----------------------------------------------------------------------------- precedence


def test_precedence_preset_then_file_then_overrides(tmp_path):
    # Arrange: the preset sets epochs, hidden sizes and folds; the file overrides two of them;
    # the overrides one of those two.
    path = _write(tmp_path, "[training]\nepochs = 11\n[cv]\nfolds = 3\n")

    # Act
    cfg = resolve_config("quick", path, {"training.epochs": 12})

    # Assert
    assert cfg.model.hidden_sizes == preset("quick").model.hidden_sizes, "preset value lost"
    assert cfg.cv.folds == 3, f"file should win over preset: folds {cfg.cv.folds}"
    assert cfg.training.epochs == 12, f"override should win over file: {cfg.training.epochs}"


def test_a_flag_can_complete_a_file_that_is_incomplete_alone(tmp_path):
    # Arrange: the file names a Dask scheduler; the runner comes from the command line.
    path = _write(tmp_path, '[execution]\ndask_address = "tcp://127.0.0.1:8786"\n')

    # Act
    cfg = resolve_config("quick", path, {"execution.runner": "dask"})

    # Assert: the layers are validated once, merged.
    assert cfg.execution.runner == "dask", cfg.execution
    assert cfg.execution.dask_address == "tcp://127.0.0.1:8786", cfg.execution


def test_an_error_names_the_file_only_when_the_file_caused_it(tmp_path):
    # Arrange
    path = _write(tmp_path, "[training]\nlr = -1.0\n")

    # Act: the file alone is wrong; then an override sets the same field wrong again.
    with pytest.raises(ConfigError) as from_file:
        resolve_config("quick", path, {"training.epochs": 3})
    with pytest.raises(ConfigError) as from_override:
        resolve_config("quick", path, {"training.lr": -2.0})

    # Assert
    assert str(path) in str(from_file.value), f"should name the file: {from_file.value}"
    assert str(path) not in str(from_override.value), (
        f"the override set the bad value, not the file: {from_override.value}"
    )
    assert "training.lr" in str(from_override.value), from_override.value


def test_a_toml_list_setting_needs_a_list(tmp_path):
    # Arrange: `--set model.hidden_sizes=64` means [64]; in a TOML file a string is a typo.
    path = _write(tmp_path, '[model]\nhidden_sizes = "64"\n')

    # Act / Assert
    with pytest.raises(ConfigError, match="model.hidden_sizes"):
        resolve_config(config_file=path)


def test_replace_validates_and_returns_new_object():
    # Arrange
    cfg = PipelineConfig()

    # Act
    changed = cfg.replace({"training.epochs": 4})

    # Assert
    assert changed.training.epochs == 4, f"replace did not apply: {changed.training.epochs}"
    assert cfg.training.epochs == PipelineConfig().training.epochs, "replace mutated the original"
    with pytest.raises(ConfigError, match="training.epochs"):
        cfg.replace({"training.epochs": 0})


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"cv.l2_lambdas": []}, "cv.l2_lambdas"),
        ({"cv.l2_lambdas": [-1e-3]}, "cv.l2_lambdas"),
        ({"cv.l2_lambdas": [1e-3, 1e-4, 1e-3]}, "cv.l2_lambdas"),
        ({"cv.l2_lambdas": [math.nan]}, "cv.l2_lambdas"),
        ({"cv.l2_lambdas": [math.inf]}, "cv.l2_lambdas"),
        ({"cv.l2_lambdas": [1e-3, -math.inf]}, "cv.l2_lambdas"),
        ({"cv.folds": 1}, "cv.folds"),
        ({"cv.folds": 0}, "cv.folds"),
        ({"model.hidden_sizes": [0]}, "model.hidden_sizes"),
        ({"model.hidden_sizes": [64, 0]}, "model.hidden_sizes"),
        ({"model.hidden_sizes": []}, "model.hidden_sizes"),
        ({"training.lr": 0}, "training.lr"),
        ({"training.lr": -0.1}, "training.lr"),
        ({"training.lr": math.nan}, "training.lr"),
        ({"training.lr": math.inf}, "training.lr"),
        ({"data.dataset": "nope"}, "data.dataset"),
        ({"data.normalization": "zscore"}, "data.normalization"),
        ({"training.epochs": "abc"}, "training.epochs"),
        ({"training.epochs": 2.5}, "training.epochs"),
        ({"training.epochs": 0}, "training.epochs"),
        ({"training.dropout": 1.0}, "training.dropout"),
        ({"training.dropout": -0.1}, "training.dropout"),
        ({"training.momentum": 1.0}, "training.momentum"),
        ({"training.optimizer": "rmsprop"}, "training.optimizer"),
        ({"model.activation": "gelu"}, "model.activation"),
        ({"data.limit_train": 0}, "data.limit_train"),
        ({"execution.dask_address": "tcp://127.0.0.1:8786"}, "dask_address"),
        ({"execution.runner": "gpu"}, "execution.runner"),
        # Past NumPy's integers: rejected here, not as an overflow inside a training.
        ({"training.epochs": 10**23}, "training.epochs"),
        ({"training.final_epochs": 10**23}, "training.final_epochs"),
        ({"training.batch_size": 2**70}, "training.batch_size"),
        ({"model.hidden_sizes": [64, 2**70]}, "model.hidden_sizes"),
        ({"data.limit_train": 2**70}, "data.limit_train"),
        ({"cv.folds": 2**70}, "cv.folds"),
        ({"cv.seed": 2**32}, "cv.seed"),
        ({"execution.workers": 10**6}, "execution.workers"),
    ],
    ids=lambda v: json.dumps(v, default=str) if isinstance(v, dict) else str(v),
)
def test_invalid_values_give_one_line_config_error_naming_the_field(overrides, field):
    # Act
    with pytest.raises(ConfigError) as info:
        build_config(overrides=overrides)

    # Assert
    message = str(info.value)
    assert field in message, f"message should name {field!r}: {message}"
    assert "\n" not in message, f"message should be one line: {message!r}"


def test_dask_address_with_dask_runner_is_valid():
    # Act
    cfg = build_config(
        overrides={"execution.runner": "dask", "execution.dask_address": "tcp://127.0.0.1:8786"}
    )

    # Assert
    assert cfg.execution.dask_address == "tcp://127.0.0.1:8786", "dask address was not kept"


@pytest.mark.parametrize(
    "dotted", ["nosuchsection.x", "training.epochz", "training", "training.epochs.x"]
)
def test_unknown_override_key_is_named(dotted):
    # Act
    with pytest.raises(ConfigError) as info:
        build_config(overrides={dotted: 1})

    # Assert
    assert repr(dotted) in str(info.value), f"message should quote {dotted!r}: {info.value}"


def test_lambdas_are_sorted_and_validated_as_floats():
    # Act
    cfg = build_config(overrides={"cv.l2_lambdas": [1e-2, 0, 1e-4]})

    # Assert
    assert cfg.cv.l2_lambdas == [0.0, 1e-4, 1e-2], f"not sorted ascending: {cfg.cv.l2_lambdas}"


# ----------------------------------------------------------------------------- flat, JSON, frozen


def test_flat_keys_are_section_dot_field():
    # Arrange: the expected keys from the pydantic model definitions.
    cfg = PipelineConfig()
    expected = {
        f"{section}.{name}"
        for section in SECTIONS
        for name in type(getattr(cfg, section)).model_fields
    }

    # Act
    flat = cfg.flat()

    # Assert
    assert set(flat) == expected, f"flat() keys differ: {set(flat) ^ expected}"
    assert flat["training.epochs"] == cfg.training.epochs, "flat() value differs from the field"
    assert flat["model.hidden_sizes"] == list(cfg.model.hidden_sizes), "lists kept as lists"
    json.dumps(flat)  # MLflow params and tables need plain JSON values


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_round_trips_through_json(name):
    # Arrange
    cfg = preset(name).replace({"training.batch_size": None, "data.data_dir": "/tmp/x"})

    # Act
    back = PipelineConfig.model_validate_json(cfg.model_dump_json())

    # Assert
    assert back == cfg, f"JSON round trip changed the config: {back.flat()} vs {cfg.flat()}"


def test_flat_round_trips_through_build_config():
    # Arrange
    cfg = preset("notebook")

    # Act
    back = build_config(overrides=cfg.flat())

    # Assert
    assert back == cfg, "building from flat() should give the same config"


def test_config_is_frozen():
    # Arrange
    cfg = PipelineConfig()

    # Act / Assert
    with pytest.raises(pydantic.ValidationError):
        cfg.training.epochs = 99  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        cfg.training = cfg.training  # type: ignore[misc]
    assert cfg.training.epochs == PipelineConfig().training.epochs, "assignment changed the config"


def test_config_forbids_unknown_keys_when_validated_directly():
    # Act / Assert
    with pytest.raises(pydantic.ValidationError, match="extra"):
        PipelineConfig.model_validate({"training": {"epochz": 3}})


def test_blas_budget_defaults_split_the_cores_and_give_the_final_model_all():
    from pipeline.config import ExecutionConfig

    process = ExecutionConfig(runner="process")
    assert process.resolved_workers(2) == 2
    assert process.resolved_blas_threads(2) == 1  # 2 workers x 1 thread: never oversubscribed
    assert ExecutionConfig(runner="sequential").resolved_blas_threads(2) == 2
    assert process.resolved_final_blas_threads(2) == 2
    assert ExecutionConfig(final_blas_threads=1).resolved_final_blas_threads(2) == 1


def test_registered_model_is_named_after_the_dataset_by_default():
    tracking = preset("default").tracking
    assert tracking.registered_model_for("mnist") == "mlp-mnist"
    assert tracking.registered_model_for("fashion-mnist") == "mlp-fashion-mnist"
    fixed = preset("default").replace({"tracking.registered_model": "digits-{{v2}}"}).tracking
    assert fixed.registered_model_for("mnist") == "digits-{v2}"
    off = preset("default").replace({"tracking.registered_model": None}).tracking
    assert off.registered_model_for("mnist") is None


@pytest.mark.parametrize("name", ["mlp-{model}", "mlp-{dataset!r}", "mlp-{dataset:>9}", "m-{"])
def test_registered_model_accepts_only_the_dataset_placeholder(name):
    with pytest.raises(ConfigError, match="tracking.registered_model"):
        preset("default").replace({"tracking.registered_model": name})
