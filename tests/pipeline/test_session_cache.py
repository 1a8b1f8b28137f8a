"""The test session's own cache (tests/conftest.py): new MLflow stores are seeded from a
template built there, never from the user's ``~/.cache``, in this process and in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow

from pipeline.config import TrackingConfig
from pipeline.tracking import prepare_store


def _session_template() -> Path:
    """Where the template must be, from the documented layout (not from store_template)."""
    cache_home = Path(os.environ["XDG_CACHE_HOME"])
    return cache_home / "mlp-pipeline" / f"mlflow-{mlflow.__version__}-empty-store.db"


def test_the_session_cache_is_not_the_users():
    # Arrange
    cache_home = Path(os.environ.get("XDG_CACHE_HOME", "")).resolve()
    users = (Path.home() / ".cache").resolve()

    # Assert
    assert os.environ.get("XDG_CACHE_HOME"), "tests/conftest.py must set XDG_CACHE_HOME"
    assert cache_home.is_dir(), f"the session cache {cache_home} does not exist"
    assert not cache_home.is_relative_to(users), f"{cache_home} is inside the user's {users}"


def test_stores_are_seeded_from_one_session_template(tmp_path):
    # Arrange: a first store builds the template if no earlier test of the session has.
    template = _session_template()
    prepare_store(TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'first' / 'mlflow.db'}"))
    assert template.is_file(), f"no template at {template} after a first store"
    built = template.stat()

    # Act: a second store in this process, a third in a subprocess (inherited environment).
    prepare_store(TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'second' / 'mlflow.db'}"))
    script = textwrap.dedent(
        f"""
        import json, os
        from pathlib import Path
        from pipeline.store_template import seed_sqlite_store, template_path

        folder = Path({str(tmp_path / "third")!r})
        folder.mkdir()
        seeded = seed_sqlite_store(folder / "mlflow.db")
        print(json.dumps([os.environ.get("XDG_CACHE_HOME"), str(template_path()), seeded]))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )

    # Assert
    assert done.returncode == 0, done.stderr[-3000:]
    cache_home, child_template, seeded = json.loads(done.stdout.strip().splitlines()[-1])
    assert cache_home == os.environ["XDG_CACHE_HOME"], f"subprocess cache {cache_home}"
    assert Path(child_template) == template, f"subprocess template {child_template}"
    assert seeded is True, "the subprocess did not seed its store from the template"
    for name in ("second", "third"):
        assert (tmp_path / name / "mlflow.db").is_file(), f"no {name} store"
    now = template.stat()
    assert (now.st_ino, now.st_mtime_ns) == (built.st_ino, built.st_mtime_ns), (
        "the template was rebuilt instead of reused"
    )
