"""New SQLite stores copied from a template (``pipeline.store_template``), checked against
stores MLflow builds itself."""

from __future__ import annotations

import os
import sqlite3
import stat
from contextlib import closing
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import TrackingConfig
from pipeline.store_template import seed_sqlite_store, template_path
from pipeline.tracking import prepare_store

# Columns that differ between any two stores built at different times.
_TIMES = {"creation_time", "last_update_time"}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache


def _opened(database: Path) -> Path:
    """Open ``database`` as a store the way MLflow's clients do (tracking and registry)."""
    uri = f"sqlite:///{database}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.search_registered_models(max_results=1)
    client.search_experiments()
    return database


def _schema(database: Path) -> dict[str, dict[str, list[str]]]:
    """Every table's columns, keys, indexes and constraints, as SQLAlchemy reads them.

    Compared as sorted lists, not as SQLite's ``CREATE TABLE`` text: MLflow's migrations write
    a table's CHECK constraints in no fixed order, so two stores MLflow builds can differ there.
    """
    import sqlalchemy

    engine = sqlalchemy.create_engine(f"sqlite:///{database}")
    try:
        inspector = sqlalchemy.inspect(engine)
        readers = {
            "columns": inspector.get_columns,
            "primary key": lambda t: [inspector.get_pk_constraint(t)],
            "foreign keys": inspector.get_foreign_keys,
            "indexes": inspector.get_indexes,
            "unique": inspector.get_unique_constraints,
            "checks": inspector.get_check_constraints,
        }
        return {
            table: {kind: sorted(map(repr, read(table))) for kind, read in readers.items()}
            for table in inspector.get_table_names()
        }
    finally:
        engine.dispose()


def _contents(database: Path) -> tuple[dict, dict]:
    """The schema and every row (less the times of day)."""
    with closing(sqlite3.connect(database)) as db:
        rows = {}
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            cursor = db.execute(f'SELECT * FROM "{table}"')  # noqa: S608 -- names from the file
            columns = [c[0] for c in cursor.description]
            rows[table] = sorted(
                tuple(v for c, v in zip(columns, row, strict=True) if c not in _TIMES)
                for row in cursor
            )
    return _schema(database), rows


def test_a_copied_store_is_the_store_mlflow_builds(tmp_path):
    built = _opened(tmp_path / "built" / "mlflow.db")  # MLflow's own migrations
    copied = tmp_path / "copied" / "mlflow.db"
    copied.parent.mkdir()
    assert seed_sqlite_store(copied), "a new store is created from the template"
    assert template_path().is_file()

    # Both opened from the same working directory: MLflow puts its Default experiment's
    # artifacts there, so even those paths compare equal.
    copied_schema, copied_rows = _contents(_opened(copied))
    built_schema, built_rows = _contents(built)
    assert copied_schema == built_schema
    assert copied_schema["runs"]["checks"], "constraints are compared too"
    assert copied_rows == built_rows
    assert copied_rows["alembic_version"], "the schema revision is recorded"
    assert [row[1] for row in copied_rows["experiments"]] == ["Default"]


def test_a_pipeline_store_from_the_template_records_and_registers(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    prepare_store(TrackingConfig(tracking_uri=uri, experiment="exp"))
    assert template_path().is_file(), "the first new store built the template"

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("exp")
    run = client.create_run(experiment.experiment_id)
    client.log_metric(run.info.run_id, "accuracy", 0.98, step=1)
    client.create_registered_model("m")
    version = client.create_model_version("m", f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_registered_model_alias("m", "champion", version.version)
    assert client.get_metric_history(run.info.run_id, "accuracy")[0].value == 0.98
    assert client.get_model_version_by_alias("m", "champion").run_id == run.info.run_id


def test_a_copied_store_has_the_permissions_of_a_new_file(tmp_path):
    previous = os.umask(0o027)
    try:
        built = _opened(tmp_path / "built.db")
        copied = tmp_path / "copied.db"
        assert seed_sqlite_store(copied)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(copied.stat().st_mode) == stat.S_IMODE(built.stat().st_mode) == 0o640


def test_a_store_in_a_missing_folder_is_left_to_the_caller(tmp_path):
    assert not seed_sqlite_store(tmp_path / "missing" / "mlflow.db")
    assert not (tmp_path / "missing").exists()


def test_an_existing_store_is_never_replaced(tmp_path):
    database = tmp_path / "mlflow.db"
    database.write_bytes(b"someone's store")
    assert not seed_sqlite_store(database)
    assert database.read_bytes() == b"someone's store"
    assert list(tmp_path.iterdir()) == [database], "no partial copy left behind"


def test_without_a_usable_cache_mlflow_builds_the_store(tmp_path, monkeypatch):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(not_a_folder))
    database = tmp_path / "store" / "mlflow.db"
    database.parent.mkdir()
    assert not seed_sqlite_store(database)
    assert not database.exists()

    prepare_store(TrackingConfig(tracking_uri=f"sqlite:///{database}", experiment="exp"))
    _schema, rows = _contents(database)
    assert [row[1] for row in rows["experiments"]] == ["Default", "exp"]


def test_a_damaged_template_is_built_again(tmp_path):
    template = template_path()
    template.parent.mkdir(parents=True)
    template.write_bytes(b"SQLite format 3\x00" + b"\x00" * 100)  # a truncated file
    database = tmp_path / "mlflow.db"
    assert seed_sqlite_store(database)
    _schema, rows = _contents(_opened(database))
    assert rows["alembic_version"]
    assert [row[1] for row in rows["experiments"]] == ["Default"]
