"""CPU budget: BLAS threads per worker so that workers x threads never exceeds the cores."""

from __future__ import annotations

import os

from threadpoolctl import threadpool_info, threadpool_limits

_applied: int | None = None


def cpu_count() -> int:
    """Cores this process may use (respects CPU affinity, unlike ``os.cpu_count``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_blas_threads(threads: int) -> None:
    """Limit this process's BLAS pools to ``threads`` (process-wide; cheap when unchanged).

    Workers whose BLAS pools add up to more threads than cores slow each other down
    (oversubscription): see benchmarks/README.md.
    """
    global _applied
    if _applied != threads:
        # threadpoolctl only limits libraries already loaded: a fresh worker process that has
        # not imported NumPy yet would otherwise keep OpenBLAS's default (every core).
        import numpy  # noqa: F401

        threadpool_limits(limits=threads, user_api="blas")
        _applied = threads


def blas_threads() -> int | None:
    """The current BLAS thread count (None if no BLAS library is loaded)."""
    counts = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    return max(counts) if counts else None
