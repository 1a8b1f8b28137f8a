"""Where MLflow runs go: the tracking URI resolved, checked and stripped of secrets.

Standard library only, so a command can settle its URI before anything imports MLflow,
pandas or matplotlib.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from pipeline.errors import TrackingError

DEFAULT_STORE_DIR = "mlruns"
# Query parameters whose values are secrets in database and server URIs.
_SECRET_QUERY_KEYS = {"password", "passwd", "pwd", "token", "access_token", "secret", "api_key"}
_HEALTH_TIMEOUT_SECONDS = 5.0


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use: ``uri``, else ``$MLFLOW_TRACKING_URI``, else the local store.

    The local store is ``sqlite:///<absolute ./mlruns>/mlflow.db`` (four slashes: an absolute
    path, so a later ``cd`` does not start a second store); its folder is created.
    """
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    store = Path(DEFAULT_STORE_DIR).resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def redact_uri(uri: str) -> str:
    """``uri`` without credentials (``user:password@`` and secret query parameters), for logs."""
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:
        return "<unparsable URI>"
    redacted = uri
    if "@" in parts.netloc:
        redacted = redacted.replace(parts.netloc, parts.netloc.rpartition("@")[2], 1)
    if parts.query:
        pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        kept = [(key, value) for key, value in pairs if key.lower() not in _SECRET_QUERY_KEYS]
        if len(kept) != len(pairs):
            query = urllib.parse.urlencode(kept)
            redacted = redacted.replace("?" + parts.query, "?" + query if query else "", 1)
    return redacted


def credentials_to_environment(uri: str | None) -> str | None:
    """Move ``user:password@`` out of a tracking URI into MLflow's environment variables.

    Configs are stored and shown (Prefect flow parameters, deployments, ``config.json``), so
    they must not carry secrets; MLflow reads ``MLFLOW_TRACKING_USERNAME`` and
    ``MLFLOW_TRACKING_PASSWORD`` itself. Returns the URI without credentials.
    """
    if not uri or "@" not in urllib.parse.urlsplit(uri).netloc:
        return uri
    parts = urllib.parse.urlsplit(uri)
    user = urllib.parse.unquote(parts.username or "")
    # MLflow sends basic auth only with both halves. A password kept out of the URI, in the
    # environment, is the usual way to pair with a user named in it.
    password = urllib.parse.unquote(parts.password or "") or os.environ.get(
        "MLFLOW_TRACKING_PASSWORD", ""
    )
    safe = redact_uri(uri)
    if not user:
        raise TrackingError(f"the tracking URI {safe} has a password but no user name")
    if not password:
        raise TrackingError(
            # The user is not named: a token passed in its place would be printed.
            f"the tracking URI {safe} names a user but no password: put it in the URI "
            "(http://user:password@host) or in MLFLOW_TRACKING_PASSWORD"
        )
    os.environ["MLFLOW_TRACKING_USERNAME"] = user
    os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    return safe


def default_artifact_location(uri: str) -> str | None:
    """Where a new experiment's artifacts go: next to a SQLite store, else the server's choice.

    Without an explicit location MLflow would use the working directory of whichever process
    happened to create the experiment.
    """
    database = sqlite_database(uri)
    if database is None:
        return None
    if not database.is_absolute():
        database = Path.cwd() / database  # sqlite:///rel.db is relative to the working dir
    return (database.parent / "artifacts").as_uri()


def sqlite_database(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative or absolute); None for other stores.

    In-memory databases are not files: None too.
    """
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme != "sqlite" or parts.path in ("", "/", "/:memory:"):
        return None
    return Path(parts.path[1:] if parts.path.startswith("//") else parts.path.lstrip("/"))


def check_tracking_uri(uri: str, timeout: float = _HEALTH_TIMEOUT_SECONDS) -> None:
    """Fail fast (before any training) when an http(s) tracking server does not answer.

    Raises
    ------
    TrackingError
        One line naming the (redacted) URI and the reason.
    """
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme == "sqlite":
        database = sqlite_database(uri)
        if database is None:
            # SQLAlchemy would open an in-memory database: every run gone when the process ends.
            raise TrackingError(
                f"the MLflow store {redact_uri(uri)} names no database file (an in-memory store "
                "is lost at exit); use sqlite:///path/to/mlflow.db"
            )
        try:
            database.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(
                f"cannot create the MLflow store folder {database.parent}: {exc.strerror}"
            ) from None
        return
    if parts.scheme not in ("http", "https"):
        return
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    health = urllib.parse.urlunsplit(
        (parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", "")
    )
    request = urllib.request.Request(health, method="GET")
    if parts.username is not None:
        import base64

        user = urllib.parse.unquote(parts.username)
        token = f"{user}:{urllib.parse.unquote(parts.password or '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(token.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(
            f"MLflow tracking server {redact_uri(uri)} is not reachable ({reason}); start it "
            f"(mlflow server) or choose another tracking.tracking_uri"
        ) from None
    if status >= 500 or status == 404:
        raise TrackingError(
            f"MLflow tracking server {redact_uri(uri)} answered HTTP {status} on /health; "
            f"is it an MLflow server?"
        )
