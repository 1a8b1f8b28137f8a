"""Where MLflow runs go: the tracking URI resolved, checked, stripped of secrets, and opened.

The URI functions use the standard library only, so a command settles its store before
anything imports MLflow.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from pipeline.config import redact_uri, uri_parse_error
from pipeline.errors import TrackingError

DEFAULT_STORE_DIR = "mlruns"
_HEALTH_TIMEOUT_SECONDS = 5.0
# How long a second pipeline waits for another one's first use of a store or registration.
_LOCK_TIMEOUT_SECONDS = 120


def default_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<absolute ./mlruns>/mlflow.db``.

    Absolute (four slashes), so a later ``cd`` does not start a second store. Creates nothing.
    Credentials in the URI are moved to MLflow's environment variables, whatever the source.
    """
    if uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return credentials_to_environment(uri or os.environ["MLFLOW_TRACKING_URI"])
    return sqlite_uri(Path(DEFAULT_STORE_DIR).resolve() / "mlflow.db")


def credentials_to_environment(uri: str | None) -> str | None:
    """Move ``user:password@`` out of a tracking URI into MLflow's environment variables.

    Configs are stored and shown (Prefect flow parameters, deployments, the run record), so
    they must not carry secrets; MLflow reads ``MLFLOW_TRACKING_USERNAME`` and
    ``MLFLOW_TRACKING_PASSWORD`` itself. Returns the URI without credentials.
    """
    if uri and (why := uri_parse_error(uri)):  # MLFLOW_TRACKING_URI skips the config's check
        raise TrackingError(f"cannot parse the tracking URI {redact_uri(uri)}: {why}")
    parts = urllib.parse.urlsplit(uri or "")
    # Only MLflow's HTTP client reads these variables; a database URI keeps its password.
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri

    user = urllib.parse.unquote(parts.username or "")
    # MLflow sends basic auth only with both halves; a password kept out of the URI, in the
    # environment, is the usual way to pair with a user named in it.
    password = urllib.parse.unquote(parts.password or "") or os.environ.get(
        "MLFLOW_TRACKING_PASSWORD", ""
    )
    safe = redact_uri(uri)
    if not user:
        raise TrackingError(f"the tracking URI {safe} has a password but no user name")
    if not password:
        raise TrackingError(
            f"the tracking URI {safe} names a user but no password: put it in the URI "
            "(http://user:password@host) or in MLFLOW_TRACKING_PASSWORD"
        )
    os.environ["MLFLOW_TRACKING_USERNAME"] = user
    os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    return safe


def sqlite_uri(database: Path) -> str:
    """The ``sqlite:///`` URI of a database file.

    A ``?`` or ``#`` in a folder's name would end the path: they are percent-encoded (and ``%``
    itself), which SQLAlchemy decodes. Other characters stay as they are.
    """
    path = str(database).replace("%", "%25").replace("?", "%3F").replace("#", "%23")
    return f"sqlite:///{path}"


def sqlite_database(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative or absolute); None for other stores.

    In-memory databases are not files: None too.
    """
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme != "sqlite" or parts.path in ("", "/", "/:memory:"):
        return None
    path = parts.path[1:] if parts.path.startswith("//") else parts.path.lstrip("/")
    return Path(urllib.parse.unquote(path))


def artifact_location(uri: str) -> str | None:
    """Where a new experiment's artifacts go: next to a SQLite store, else the server's choice.

    Without an explicit location MLflow would use the working directory of whichever process
    happened to create the experiment.
    """
    database = sqlite_database(uri)
    if database is None:
        return None
    return (database.absolute().parent / "artifacts").as_uri()


def check_tracking_uri(uri: str, timeout: float = _HEALTH_TIMEOUT_SECONDS) -> None:
    """Fail fast, before any training, when the store cannot be used.

    A SQLite store needs a database file whose folder can be made; an http(s) server must
    answer ``/health``.

    Raises
    ------
    TrackingError
        One line naming the (redacted) URI and the reason.
    """
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme == "sqlite":
        database = sqlite_database(uri)
        if database is None:
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
    try:  # /health needs no credentials, even on a server with authentication
        with urllib.request.urlopen(health, timeout=timeout) as response:
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


def require_store(uri: str) -> None:
    """:func:`check_tracking_uri` for commands that read a store: a missing SQLite file is an
    error (MLflow would silently create an empty store there)."""
    database = sqlite_database(uri)
    if database is not None and not database.is_file():
        raise TrackingError(
            f"no MLflow store at {database} (run `mlp-pipeline run` first, or pass "
            f"--tracking-uri / set MLFLOW_TRACKING_URI)"
        )
    check_tracking_uri(uri)


def store_lock(uri: str) -> contextlib.AbstractContextManager[Any]:
    """Take turns with other processes on a SQLite store (elsewhere: no lock): ``with
    store_lock(uri):`` holds it for the block.

    For a store's first use (two pipelines would both create its schema) and for registering
    a model (both could see no champion).
    """
    database = sqlite_database(uri)
    if database is None:
        return contextlib.nullcontext()
    from filelock import FileLock, Timeout

    try:  # released when the block ends
        return FileLock(f"{database.absolute()}.lock").acquire(timeout=_LOCK_TIMEOUT_SECONDS)
    except Timeout:
        raise TrackingError(
            f"the MLflow store {database} stayed locked by another process for "
            f"{_LOCK_TIMEOUT_SECONDS} s"
        ) from None


def open_store(uri: str, experiment: str) -> tuple[Any, str]:
    """A client on ``uri`` and the id of ``experiment``, created (or restored) if needed.

    Raises :class:`TrackingError` with one line when the store cannot be used.
    """
    from mlflow import MlflowClient

    check_tracking_uri(uri)
    try:
        with store_lock(uri):
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            found = client.get_experiment_by_name(experiment)
            if found is None:
                experiment_id = client.create_experiment(
                    experiment, artifact_location=artifact_location(uri)
                )
            else:
                experiment_id = found.experiment_id
                if found.lifecycle_stage == "deleted":
                    client.restore_experiment(experiment_id)
            mark_stale_runs(client, experiment_id)
    except TrackingError:
        raise
    except Exception as exc:  # MlflowException, OSError, SQLAlchemy errors of a broken file
        raise TrackingError(f"cannot use MLflow store {redact_uri(uri)}: {one_line(exc)}") from None
    return client, experiment_id


def mark_stale_runs(client: Any, experiment_id: str) -> list[str]:
    """Set FAILED the runs left RUNNING by a process of this host that no longer exists.

    Only runs tagged with this host's name and a ``pid`` (every run the pipeline creates) are
    considered: another machine's process cannot be checked from here.
    """
    from pipeline.record import pid_alive  # here: the CLI reads this module before pandas

    host = socket.gethostname()
    stale = []
    for run in client.search_runs(
        [experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000
    ):
        tags = run.data.tags
        pid = tags.get("pid", "")
        if tags.get("host") != host or not pid.isdigit() or pid_alive(int(pid)):
            continue
        client.set_tag(run.info.run_id, "error", "the process ended without closing the run")
        client.set_terminated(run.info.run_id, "FAILED")
        stale.append(run.info.run_id)
    return stale


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def ui_command(tracking_uri: str) -> str:
    """The command that opens the MLflow UI on this store; never with its credentials (a
    database's password stays in ``MLFLOW_TRACKING_URI``, where the user put it)."""
    tracking_uri = redact_uri(tracking_uri)
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri
    database = sqlite_database(tracking_uri)
    if database is not None and not database.is_absolute() and "?" not in tracking_uri:
        tracking_uri = sqlite_uri(database.resolve())  # works from any folder
    return f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)} --host 127.0.0.1 --port 5000"
