"""fold_cache_key changes with everything that changes a fold's result, and with nothing else."""

from __future__ import annotations

import re

import pytest

from pipeline import cache
from pipeline.cache import fold_cache_key
from pipeline.config import PipelineConfig, build_config
from pipeline.errors import ConfigError

FINGERPRINT = "a" * 64
# Spelled out (not a preset) so every override below really changes a value.
BASE_VALUES = {
    "data.dataset": "mnist-sample", "data.normalization": "standardize",
    "model.hidden_sizes": [64], "model.activation": "relu", "model.init": "he",
    "model.dtype": "float32", "training.optimizer": "nesterov", "training.lr": 0.05,
    "training.momentum": 0.9, "training.schedule": "cosine", "training.batch_size": 128,
    "training.epochs": 3, "training.dropout": 0.0, "cv.l2_lambdas": [1e-4, 1e-3], "cv.folds": 2,
    "cv.shuffle": True, "cv.stratify": True, "cv.seed": 0, "execution.runner": "thread",
}  # fmt: skip
BASE = build_config(overrides=BASE_VALUES)


def _key(config: PipelineConfig = BASE, fingerprint: str = FINGERPRINT, lam=1e-3, fold=1) -> str:
    return fold_cache_key(config, fingerprint, lam, fold)


def test_key_is_stable_and_well_formed():
    # Act
    first = _key()
    second = fold_cache_key(build_config(overrides=BASE_VALUES), FINGERPRINT, 1e-3, 1)

    # Assert
    assert first == second, "equal inputs gave different keys"
    assert re.fullmatch(r"fold-[0-9a-f]{32}", first), f"key {first!r} is not fold-<32 hex>"


@pytest.mark.parametrize(
    ("label", "kwargs"),
    [
        ("fingerprint", {"fingerprint": "b" * 64}),
        ("lambda", {"lam": 1e-4}),
        ("lambda-zero", {"lam": 0.0}),
        ("fold", {"fold": 0}),
        ("final-model", {"fold": -1}),
    ],
)
def test_key_changes_with_data_lambda_and_fold(label, kwargs):
    # Act
    changed = _key(**kwargs)

    # Assert
    assert changed != _key(), f"changing the {label} kept the cache key"


@pytest.mark.parametrize(
    "override",
    [
        {"cv.seed": 1},
        {"cv.folds": 3},
        {"cv.shuffle": False},
        {"cv.stratify": False},
        {"model.hidden_sizes": [32]},
        {"model.activation": "tanh"},
        {"model.init": "glorot"},
        {"model.dtype": "float64"},
        {"training.optimizer": "adam"},
        {"training.lr": 0.01},
        {"training.momentum": 0.5},
        {"training.schedule": "constant"},
        {"training.batch_size": 64},
        {"training.epochs": 4},
        {"training.dropout": 0.2},
        {"training.early_stopping": 2},
        {"data.normalization": "scale"},
        {"data.limit_train": 1000},
    ],
    ids=lambda o: next(iter(o)),
)
def test_key_changes_with_result_relevant_settings(override):
    # Arrange
    config = BASE.replace(override)
    assert config != BASE, f"{override} is not a change from the base config"

    # Act
    changed = _key(config)

    # Assert
    assert changed != _key(), f"{override} changes the result but kept the cache key"


@pytest.mark.parametrize(
    "override",
    [
        {"execution.runner": "sequential"},
        {"execution.workers": 7},
        {"execution.blas_threads": 3},
        {"execution.retries": 0},
        {"execution.resume": False},
        {"execution.cache_dir": "/elsewhere"},
        {"execution.runner": "dask", "execution.dask_address": "tcp://127.0.0.1:8786"},
        {"tracking.tracking_uri": "http://127.0.0.1:5000"},
        {"tracking.experiment": "other"},
        {"tracking.registered_model": None},
        {"data.data_dir": "/some/where/else"},
        {"data.download": False},
        {"cv.l2_lambdas": [1e-3]},
        {"training.final_epochs": 30},
        {"cv.l2_lambdas": [1e-3, 1e-4, 1e-2, 1e-1, 0.0]},
    ],
    ids=lambda o: "+".join(o),
)
def test_key_ignores_execution_tracking_location_and_grid(override):
    # Arrange
    config = BASE.replace(override)
    assert config != BASE, f"{override} is not a change from the base config"

    # Act
    same = _key(config)

    # Assert
    assert same == _key(), f"{override} cannot change a fold's result but changed the cache key"


def test_key_changes_with_the_dataset_name():
    # Arrange: same fingerprint, other dataset name (the name is part of the settings).
    config = BASE.replace({"data.dataset": "mnist"})

    # Act
    changed = _key(config)

    # Assert
    assert changed != _key(), "the dataset name is a result-relevant setting"


def test_key_changes_with_package_version(monkeypatch):
    # Arrange
    before = _key()
    monkeypatch.setattr(cache, "package_version", lambda: "999.0")

    # Act
    after = _key()

    # Assert
    assert after != before, "a new package version must not reuse old fold results"


def test_key_does_not_mutate_the_config():
    # Arrange
    dumped = BASE.model_dump()

    # Act
    _key()

    # Assert
    assert BASE.model_dump() == dumped, "computing a key changed the config"


# ----------------------------------------------------------------------------- the folder


def test_check_cache_dir_accepts_a_folder_yet_to_be_made(tmp_path):
    # Act
    folder = cache.check_cache_dir(tmp_path / "a" / "cache")

    # Assert
    assert folder == (tmp_path / "a" / "cache").resolve(), folder
    assert not (tmp_path / "a").exists(), "a check must not create anything"


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_check_cache_dir_refuses_a_file_in_the_way(tmp_path, where):
    # Arrange
    (tmp_path / "f").write_text("not a folder", encoding="utf-8")
    path = tmp_path / "f" if where == "file" else tmp_path / "f" / "cache"

    # Act / Assert
    with pytest.raises(ConfigError, match="is not a folder") as info:
        cache.check_cache_dir(path)
    assert "\n" not in str(info.value), f"one line: {info.value!r}"
