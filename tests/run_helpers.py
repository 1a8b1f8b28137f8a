"""Helpers for tests that run commands and read what they left on disk (run records, the fold
cache). Importable from any test module (``pythonpath`` in pyproject.toml)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.record import RunRecord


def wait_for(
    process,
    ready: Callable[[], bool],
    what: str,
    timeout: float = 300,
    meanwhile: Callable[[], None] = lambda: None,
) -> None:
    """Block until ``ready()``, calling ``meanwhile()`` (a check) on the way; fail if the
    command ends first (or a hang guard expires).
    """
    deadline = time.monotonic() + timeout
    while not (meanwhile() or ready()):
        if process.poll() is not None:
            _, stderr = process.communicate()
            pytest.fail(f"the command ended (exit {process.returncode}) before {what}: {stderr}")
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.05)


def records(cache: Path) -> list[RunRecord]:
    """The run records under ``cache``, oldest first (their folder names start with the time)."""
    root = cache / "runs"
    return [RunRecord(folder) for folder in sorted(root.iterdir())] if root.is_dir() else []


def folds_recorded(cache: Path) -> int:
    """How many fold results the run records under ``cache`` hold."""
    return len(list(cache.glob("runs/*/folds/*.json")))


def fold_cache(cache: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every fold-cache entry: an entry written again gets a new inode."""
    return {
        path.name: (path.stat().st_ino, path.stat().st_mtime_ns)
        for path in (cache / "folds").glob("*.json")
    }


def rewritten(before: dict[str, tuple[int, int]], cache: Path) -> int:
    """How many of the entries in ``before`` were written again since (trained again)."""
    after = fold_cache(cache)
    return sum(after.get(name) != stamp for name, stamp in before.items())
