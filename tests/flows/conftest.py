"""Fixtures of the flow tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.config import PipelineConfig, build_config


@pytest.fixture(scope="session")
def small_config():
    """A factory of tiny real-MNIST configs: about a second per training.

    ``make(data_dir, tmp_path, tracking_uri, **overrides)``: 3,000 training and 500 test
    images, 784-32-10, 2 epochs (final 3), lambdas 1e-4 and 1e-2, 2 folds, 2 threads, fold
    cache in ``tmp_path / "cache"``.
    """

    def make(data_dir: Path, tmp_path: Path, tracking_uri: str, **extra: Any) -> PipelineConfig:
        overrides = {
            "data.dataset": "mnist",
            "data.data_dir": str(data_dir),
            "data.download": False,
            "data.limit_train": 3000,
            "data.limit_test": 500,
            "model.hidden_sizes": [32],
            "training.epochs": 2,
            "training.final_epochs": 3,
            "cv.lambdas": [1e-4, 1e-2],
            "cv.folds": 2,
            "execution.runner": "thread",
            "execution.workers": 2,
            "execution.cache_dir": str(tmp_path / "cache"),
            "tracking.tracking_uri": tracking_uri,
            "tracking.experiment": "test-pipeline",
            **extra,
        }
        return build_config(overrides=overrides)

    return make
