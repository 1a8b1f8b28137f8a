"""BLAS thread budget (``pipeline.threads``): the limit must hold however early a worker
process sets it, and the core count respects the CPU affinity."""

from __future__ import annotations

import subprocess
import sys

import numpy  # noqa: F401 -- loads the BLAS library before any limit is read or saved
import pytest
from threadpoolctl import ThreadpoolController, threadpool_limits

import pipeline.threads
from pipeline.threads import blas_threads, set_blas_threads

# Read in a fresh interpreter through threadpoolctl itself, not through pipeline.threads.
_PRINT_BLAS_THREADS = (
    "import numpy\n"
    "from threadpoolctl import threadpool_info\n"
    "pools = [p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas']\n"
    "print(pools)\n"
)


def _fresh_process_blas_pools(prelude: str = "") -> list[int]:
    """The thread count of every BLAS pool in a new interpreter after running ``prelude``."""
    out = subprocess.run(
        [sys.executable, "-c", prelude + _PRINT_BLAS_THREADS],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [int(n) for n in out.strip().strip("[]").split(",") if n.strip()]


def _blas_pools() -> list[int]:
    return [p.num_threads for p in ThreadpoolController().lib_controllers if p.user_api == "blas"]


@pytest.fixture
def restore_blas(monkeypatch):
    """Put every thread pool back to its limit from before the test (not to a guess such as
    the core count), and ``set_blas_threads``'s memory of what it applied with it."""
    saved = ThreadpoolController().info()
    monkeypatch.setattr(pipeline.threads, "_applied", pipeline.threads._applied)
    yield
    threadpool_limits(limits=saved)  # keyed by each library's file path
    restored = ThreadpoolController().info()
    assert [p["num_threads"] for p in restored] == [p["num_threads"] for p in saved], (
        f"BLAS limits not restored: {restored} vs {saved}"
    )


def test_limit_set_before_numpy_is_imported_still_applies() -> None:
    # A spawned pool worker runs its initializer before anything has imported NumPy; the
    # limit used to be recorded as applied while OpenBLAS later started with every core.
    default = _fresh_process_blas_pools()
    assert default, "no BLAS library loaded with numpy"
    # A budget the library would not pick by itself (on a 1-core runner its default is 1).
    budget = 2 if max(default) == 1 else 1
    prelude = (
        "import sys\n"
        "from pipeline.threads import set_blas_threads\n"
        "assert 'numpy' not in sys.modules, 'numpy imported before the budget was set'\n"
        f"set_blas_threads({budget})\n"
    )

    limited = _fresh_process_blas_pools(prelude)

    assert limited == [budget] * len(default), (
        f"set before numpy: pools {limited}, expected {budget} (library default {default})"
    )


def test_limit_follows_the_latest_budget(restore_blas) -> None:
    # Down, up, down again: every change must reach the pools (set_blas_threads skips a call
    # that repeats the last budget, so a stale memory would show here).
    assert _blas_pools(), "no BLAS library loaded"
    for threads in (1, 2, 1):
        set_blas_threads(threads)

        pools = _blas_pools()
        assert pools == [threads] * len(pools), (
            f"after set_blas_threads({threads}) threadpoolctl reports {pools}"
        )
        assert blas_threads() == threads, f"blas_threads() {blas_threads()}, pools {pools}"


def test_cpu_count_follows_the_cpu_affinity() -> None:
    # Arrange: a fresh interpreter allowed on one core only (os.cpu_count would say all).
    code = (
        "import os\n"
        "os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})\n"
        "from pipeline.threads import cpu_count\n"
        "print(cpu_count(), os.cpu_count())\n"
    )

    # Act
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout

    # Assert
    allowed, machine = (int(n) for n in out.split())
    assert allowed == 1, f"cpu_count() {allowed} on a process pinned to one core ({machine} cores)"
