"""Fixtures for the mlp tests: a small MNIST subset (bundled sample) and tiny random problems."""

from __future__ import annotations

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


# Bundled with the package (5,000 train + 1,000 test MNIST images, uint8): no download needed.
MNIST_SAMPLE = Path(__file__).resolve().parents[2] / "pipeline" / "_data" / "mnist-sample.npz"


@pytest.fixture(scope="session")
def mnist_small() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """2000 training + 500 validation MNIST images scaled to [0, 1], float32, and labels.

    Read from the bundled sample (its first 2500 training images), so these tests need
    neither the real MNIST files (../shared/data) nor a download.
    """
    with np.load(MNIST_SAMPLE, allow_pickle=False) as npz:
        X, y = npz["X_train"][:2500], npz["y_train"][:2500].astype(np.int64)
    X = X.reshape(-1, 784).astype(np.float32) / 255.0
    return X[:2000], y[:2000], X[2000:], y[2000:]


@pytest.fixture
def tiny_problem() -> tuple[np.ndarray, np.ndarray]:
    """7 samples, 5 features, 3 classes, float64: small enough for finite differences."""
    rng = np.random.default_rng(123)
    return rng.standard_normal((7, 5)), rng.integers(0, 3, size=7)
