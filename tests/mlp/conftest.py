"""Fixtures for the mlp tests: a small real-MNIST subset and tiny random problems."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_limits


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """One BLAS thread: these small matrices gain nothing from two, and on a shared 2-core
    machine a descheduled OpenBLAS worker thread makes every step wait (10x slower runs).

    Module scope, undone at teardown: the limit stays inside tests/mlp. (A ``package`` scope
    would not: tests/mlp has no ``__init__.py``, and pytest then keeps such a fixture until the
    end of the session, so tests/pipeline would run with this limit in a full run only.)
    """
    with threadpool_limits(limits=1):
        yield


def _read_idx(path: Path, offset: int) -> np.ndarray:
    """Raw bytes of a gzipped IDX file after its header (16 bytes images, 8 labels)."""
    with gzip.open(path, "rb") as fh:
        return np.frombuffer(fh.read(), dtype=np.uint8, offset=offset)


@pytest.fixture(scope="session")
def mnist_small(shared_data_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """2000 training + 500 validation MNIST images scaled to [0, 1], float32, and labels."""
    folder = shared_data_dir / "mnist"
    X = _read_idx(folder / "train-images-idx3-ubyte.gz", 16).reshape(-1, 784)[:2500]
    y = _read_idx(folder / "train-labels-idx1-ubyte.gz", 8)[:2500].astype(np.int64)
    X = X.astype(np.float32) / 255.0
    return X[:2000], y[:2000], X[2000:], y[2000:]


@pytest.fixture
def tiny_problem() -> tuple[np.ndarray, np.ndarray]:
    """7 samples, 5 features, 3 classes, float64: small enough for finite differences."""
    rng = np.random.default_rng(123)
    return rng.standard_normal((7, 5)), rng.integers(0, 3, size=7)
