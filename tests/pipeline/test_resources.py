"""BLAS thread budget: the limit must hold however early a worker process sets it."""

from __future__ import annotations

import subprocess
import sys

from pipeline.resources import blas_threads, cpu_count, set_blas_threads


def test_limit_set_before_numpy_is_imported_still_applies() -> None:
    # A spawned pool worker runs its initializer before anything has imported NumPy; the
    # limit used to be recorded as applied while OpenBLAS later started with every core.
    code = (
        "import sys\n"
        "from pipeline.resources import set_blas_threads\n"
        "assert 'numpy' not in sys.modules\n"
        "set_blas_threads(1)\n"
        "import numpy\n"
        "from pipeline.resources import blas_threads\n"
        "print(blas_threads())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "1"


def test_limit_follows_the_latest_budget() -> None:
    try:
        set_blas_threads(1)
        assert blas_threads() == 1
        if cpu_count() > 1:
            set_blas_threads(2)
            assert blas_threads() == 2
    finally:
        set_blas_threads(cpu_count())
