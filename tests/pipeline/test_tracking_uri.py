"""The tracking URI: resolved, redacted, its artifact folder (``pipeline.tracking_uri``)."""

from __future__ import annotations

import os

import pytest

from pipeline.errors import TrackingError
from pipeline.tracking_uri import (
    check_tracking_uri,
    credentials_to_environment,
    default_artifact_location,
    redact_uri,
    resolve_tracking_uri,
    sqlite_database,
)


def test_resolve_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri("sqlite:////x/y.db") == "sqlite:////x/y.db", "argument wins"
    assert resolve_tracking_uri(None) == "http://env:5000", "then the environment"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    default = resolve_tracking_uri(None)
    assert default == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db", default
    assert default.startswith("sqlite:////"), "absolute path: four slashes"
    assert (tmp_path / "mlruns").is_dir(), "the store folder is created"
    assert default_artifact_location(default) == (tmp_path.resolve() / "mlruns/artifacts").as_uri()
    assert default_artifact_location("http://server:5000") is None


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("http://alice:s3cret@host:5000", "http://host:5000"),
        ("https://token@host/mlflow", "https://host/mlflow"),
        (
            "postgresql://u:pw@db:5432/mlflow?password=pw&sslmode=require",
            "postgresql://db:5432/mlflow?sslmode=require",
        ),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
        ("http://host:5000/?token=abc", "http://host:5000/"),
    ],
)
def test_redact_uri(uri, expected):
    assert redact_uri(uri) == expected


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("sqlite:////abs/dir/mlflow.db", "/abs/dir/mlflow.db"),
        ("sqlite:///rel/mlflow.db", "rel/mlflow.db"),
        ("sqlite:///:memory:", None),
        ("sqlite://", None),
        ("http://host:5000", None),
        ("postgresql://db/mlflow", None),
    ],
)
def test_sqlite_database(uri, expected):
    found = sqlite_database(uri)
    assert (None if found is None else str(found)) == expected


@pytest.mark.parametrize("uri", ["sqlite:///", "sqlite://", "sqlite:///:memory:"])
def test_an_in_memory_store_is_refused(uri):
    # Its runs, registry and champion would vanish when the command exits.
    with pytest.raises(TrackingError, match="names no database file"):
        check_tracking_uri(uri)


def test_a_sqlite_store_gets_its_folder(tmp_path):
    # Act
    check_tracking_uri(f"sqlite:///{tmp_path / 'a' / 'b' / 'mlflow.db'}")

    # Assert
    assert (tmp_path / "a" / "b").is_dir(), "the store's folder should be created"


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("http://bob@127.0.0.1:5000", "no password"),
        ("https://tok%2Fen@mlflow.example/api", "no password"),
        ("http://bob:@127.0.0.1:5000", "no password"),
        ("http://:s3cret@127.0.0.1:5000", "no user"),
    ],
    ids=["user-only", "token-only", "empty-password", "password-only"],
)
def test_half_credentials_are_refused(monkeypatch, uri, fragment):
    # Arrange: MLflow sends basic auth only with both halves; nothing to pair with here.
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)

    # Act / Assert
    with pytest.raises(TrackingError, match=fragment) as info:
        credentials_to_environment(uri)
    message = str(info.value)
    assert "s3cret" not in message and "tok" not in message, f"a secret leaked: {message}"
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ, "nothing should be set on refusal"


def test_a_user_in_the_uri_pairs_with_the_password_in_the_environment(monkeypatch):
    # Arrange: the password kept out of the URI, as MLflow's docs advise.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "earlier-user")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "from-env")

    # Act
    returned = credentials_to_environment("http://bob@127.0.0.1:5000")

    # Assert
    assert returned == "http://127.0.0.1:5000", returned
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "bob", os.environ["MLFLOW_TRACKING_USERNAME"]
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "from-env", "the password was replaced"


@pytest.mark.parametrize("uri", [None, "", "http://127.0.0.1:5000", "sqlite:////tmp/a@b/mlflow.db"])
def test_a_uri_without_credentials_leaves_the_environment_alone(monkeypatch, uri):
    # Arrange
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "earlier-user")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "earlier-password")

    # Act
    returned = credentials_to_environment(uri)

    # Assert
    assert returned == uri, f"{uri!r} changed to {returned!r}"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "earlier-user"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "earlier-password"
