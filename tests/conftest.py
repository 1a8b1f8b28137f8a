"""Shared fixtures: where the real datasets live."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The read-only folder holding real MNIST and Fashion-MNIST (``../shared/data``)."""
    path = Path(os.environ.get("MLP_PIPELINE_TEST_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not (path / "mnist" / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"real MNIST not found under {path}; set MLP_PIPELINE_TEST_DATA")
    return path
