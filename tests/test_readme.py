"""The README's quickstart output is what ``mlp-pipeline run --preset quick`` prints today."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _quickstart_output() -> list[str]:
    """The ``text`` block that follows "The first one ends with:" in the README."""
    text = README.read_text(encoding="utf-8").split("The first one ends with:", 1)[1]
    return text.split("```text\n", 1)[1].split("```", 1)[0].splitlines()


def _masked(line: str) -> str:
    """A line without what changes from run to run: wall time, run id, the store's folder."""
    line = re.sub(r"wall time \S+ s", "wall time … s", line)
    line = re.sub(r"\b[0-9a-f]{32}\b", "<run id>", line)
    line = re.sub(r"sqlite:////\S*/mlruns/", "sqlite:////…/mlruns/", line)
    return line.rstrip()


@pytest.mark.slow
def test_the_quickstart_output_is_that_of_a_real_run(cli, monkeypatch, prefect_api_url):
    # A new user's first command, in a fresh folder (the test's): a fresh store and cache.
    monkeypatch.setenv("PREFECT_API_URL", prefect_api_url)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default store, as a new user
    expected = [_masked(line) for line in _quickstart_output()]
    assert len(expected) > 5, expected

    code, out, err = cli(["run", "--preset", "quick", "--no-progress"])

    assert code == 0, err
    printed = [_masked(line) for line in out.splitlines()]
    assert expected[0] in printed, f"{expected[0]!r} not printed:\n{out}"
    start = printed.index(expected[0])
    assert printed[start : start + len(expected)] == expected, (
        "the README's quickstart output has drifted from a real run: update it\n" + out
    )
