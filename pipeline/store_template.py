"""New SQLite MLflow stores start as a copy of an empty store, built once per MLflow version.

MLflow builds a new SQLite store by creating its first schema and then running every alembic
migration since (dozens of steps, each rewriting tables): 2.1 s here (a copy: 0.14 s), every
time a folder gets its first store (a project's first run, each test, each benchmark round),
and before any training can start. The result does not depend on the folder: the template is
exactly that result, made by MLflow's own function (``mlflow.store.db.utils._initialize_tables``,
the one its ``SqlAlchemyStore`` calls on an empty database), kept in the user's cache and
copied. MLflow then opens the copy as it would a store it had just built: it checks the schema
is at its current revision and adds its ``Default`` experiment, with this store's own paths.

Everything here is best effort: whatever fails (no cache folder, a read-only disk, an MLflow
without that function, a damaged template), MLflow builds the store itself, as before.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sqlite3
import tempfile
from pathlib import Path


def cache_folder() -> Path:
    """Where templates are kept: ``$XDG_CACHE_HOME/mlp-pipeline``, else ``~/.cache/...``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mlp-pipeline"


def template_path() -> Path:
    """The template for the installed MLflow (its schema changes between versions)."""
    import mlflow

    return cache_folder() / f"mlflow-{mlflow.__version__}-empty-store.db"


def seed_sqlite_store(database: Path) -> bool:
    """Create ``database`` as a copy of the empty-store template, if it does not exist yet.

    Returns True when the store was created here, False when it already existed or anything
    failed (MLflow then builds it, as it always did). Never replaces an existing file: a store
    another process created meanwhile is kept. Call it holding the store's lock
    (``pipeline.tracking._store_lock``), as MLflow's own first use of a store needs too.
    """
    # The folder is the caller's to make (``check_tracking_uri`` does for the pipeline).
    if database.exists() or not database.parent.is_dir():
        return False
    try:
        return _copy_if_absent(_ensure_template(), database)
    except Exception:  # noqa: BLE001 -- best effort: MLflow builds the store itself
        return False


def _ensure_template() -> Path:
    """The template, built first if missing or unusable."""
    template = template_path()
    if _is_usable_template(template):
        return template
    template.parent.mkdir(parents=True, exist_ok=True)
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables

    handle, building = tempfile.mkstemp(dir=template.parent, prefix=".building-", suffix=".db")
    os.close(handle)
    try:
        engine = sqlalchemy.create_engine(f"sqlite:///{building}")
        try:
            _initialize_tables(engine)
        finally:
            engine.dispose()
        if not _is_usable_template(Path(building)):
            raise RuntimeError("the template MLflow built is not usable")
        # Atomic: another process building the same template at the same time writes the same
        # content; either file may win.
        os.replace(building, template)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(building)
    return template


def _is_usable_template(database: Path) -> bool:
    """True for an intact SQLite file whose schema carries one alembic revision.

    Which revision MLflow expects is its to check (``_verify_schema``, on open): the template's
    name carries the MLflow version that built it.
    """
    if not database.is_file():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            if db.execute("PRAGMA quick_check").fetchone() != ("ok",):
                return False
            revisions = db.execute("SELECT version_num FROM alembic_version").fetchall()
            experiments = db.execute("SELECT COUNT(*) FROM experiments").fetchone()
    except sqlite3.Error:
        return False
    # MLflow adds its Default experiment when it opens a store: a template has none yet.
    return len(revisions) == 1 and experiments == (0,)


def _copy_if_absent(template: Path, database: Path) -> bool:
    """Copy ``template`` to ``database`` unless that appears first; atomic, never overwrites.

    The copy gets the permissions SQLite gives a new database (0666 less the umask), not the
    0600 of a temporary file: a store others read (``mlflow ui`` run by a teammate) stays
    readable.
    """
    partial = database.with_name(f".{database.name}-{os.getpid()}-{secrets.token_hex(4)}")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as target, open(template, "rb") as source:
            shutil.copyfileobj(source, target)
        try:
            os.link(partial, database)  # fails if the file exists: never replaces a store
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
