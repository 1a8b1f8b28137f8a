"""The MLflow store (``pipeline.tracking.store``): the tracking URI resolved, redacted, checked,
its credentials moved out of it; the store's lock, its opening, its stale runs."""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

import pipeline.tracking.store as store
from pipeline.errors import TrackingError
from pipeline.tracking.store import (
    artifact_location,
    check_tracking_uri,
    credentials_to_environment,
    default_tracking_uri,
    mark_stale_runs,
    open_store,
    redact_uri,
    sqlite_database,
    store_lock,
)


@pytest.fixture()
def no_credentials(monkeypatch):
    """No MLflow credentials in the environment, before and (restored) after the test."""
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


# ------------------------------------------------------------------------------ the URI
def test_default_tracking_uri_precedence(tmp_path, monkeypatch, no_credentials):
    # Arrange: the tests run in tmp_path (tests/conftest.py).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")

    # Act / Assert
    assert default_tracking_uri("sqlite:////x/y.db") == "sqlite:////x/y.db", "argument wins"
    assert default_tracking_uri(None) == "http://env:5000", "then the environment"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    default = default_tracking_uri(None)
    assert default == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db", default
    assert default.startswith("sqlite:////"), "absolute path: four slashes"
    assert not (tmp_path / "mlruns").exists(), "resolving the URI must create nothing"


def test_credentials_in_mlflow_tracking_uri_move_to_the_environment(monkeypatch, no_credentials):
    # Arrange
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://bob:hunter2@127.0.0.1:5000/mlflow")

    # Act
    uri = default_tracking_uri(None)

    # Assert
    assert uri == "http://127.0.0.1:5000/mlflow", uri
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "bob", "user not moved"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "hunter2", "password not moved"


def test_credentials_in_the_argument_move_to_the_environment(no_credentials):
    uri = default_tracking_uri("https://al%40ice:p%3Ass@mlflow.example/api")
    assert uri == "https://mlflow.example/api", uri
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "al@ice", "user not unquoted"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "p:ss", "password not unquoted"


def test_artifact_location_is_beside_a_sqlite_store(tmp_path):
    database = tmp_path / "store" / "mlflow.db"
    assert artifact_location(f"sqlite:///{database}") == (database.parent / "artifacts").as_uri()
    assert artifact_location("http://server:5000") is None, "a server chooses its own"
    assert artifact_location("sqlite:///:memory:") is None, "no folder for an in-memory store"


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
        ("http://host:5000/?API_KEY=abc&x=1", "http://host:5000/?x=1"),
        ("tcp://bob:pw123@sched:8786", "tcp://sched:8786"),
        ("http://[::1", "<unparsable URI>"),
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
        ("sqlite:///", None),
        ("http://host:5000", None),
        ("postgresql://db/mlflow", None),
    ],
)
def test_sqlite_database(uri, expected):
    found = sqlite_database(uri)
    assert (None if found is None else str(found)) == expected


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
def test_half_credentials_are_refused(no_credentials, uri, fragment):
    # Arrange: MLflow sends basic auth only with both halves; nothing to pair with here.
    # Act / Assert
    with pytest.raises(TrackingError, match=fragment) as info:
        credentials_to_environment(uri)
    message = str(info.value)
    assert "s3cret" not in message and "tok" not in message, f"a secret leaked: {message}"
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ, "nothing should be set on refusal"
    assert "MLFLOW_TRACKING_USERNAME" not in os.environ, "nothing should be set on refusal"


@pytest.mark.parametrize(
    "uri", ["http://bob:s3cret@127.0.0.1:99999", "http://[::1", "http://127.0.0.1:port/"]
)
def test_an_unparsable_uri_from_the_environment_is_a_tracking_error(
    monkeypatch, no_credentials, uri
):
    # Arrange: MLFLOW_TRACKING_URI bypasses the config's own check.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    # Act / Assert
    with pytest.raises(TrackingError, match="cannot parse the tracking URI") as info:
        default_tracking_uri()
    assert "s3cret" not in str(info.value), f"a secret leaked: {info.value}"


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


# ------------------------------------------------------------------------------ checks
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
    assert not (tmp_path / "a" / "b" / "mlflow.db").exists(), "only the folder"


def test_a_store_folder_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "file").write_text("in the way", encoding="utf-8")
    with pytest.raises(TrackingError, match="cannot create the MLflow store folder") as info:
        check_tracking_uri(f"sqlite:///{tmp_path / 'file' / 'sub' / 'mlflow.db'}")
    assert "\n" not in str(info.value), str(info.value)


def test_other_stores_are_left_to_mlflow(refused_server):
    # A database server or a file store is MLflow's business: no request, no error.
    check_tracking_uri("postgresql://u:pw@127.0.0.1:1/mlflow")
    check_tracking_uri("file:///nonexistent/mlruns")
    assert refused_server.requests == [], refused_server.requests


def test_an_unreachable_server_is_one_short_health_request(refused_server, no_credentials):
    # Arrange
    uri = refused_server.url.replace("http://", "http://bob:hunter2@") + "/prefix/"
    credentials_to_environment(uri)

    # Act
    with pytest.raises(TrackingError, match="is not reachable") as info:
        check_tracking_uri(uri)

    # Assert
    message = str(info.value)
    assert refused_server.requests[0][0] == f"{refused_server.url}/prefix/health", "path kept"
    assert len(refused_server.requests) == 1, refused_server.requests
    assert 0 < refused_server.requests[0][1] <= 5, "health check timeout"
    assert "\n" not in message and "hunter2" not in message, message


class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200
    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:  # noqa: N802 -- http.server's name
        type(self).seen.append({"path": self.path, **dict(self.headers)})
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def http_server():
    """A local HTTP server answering every GET with ``_Handler.status``; yields its class."""

    class Handler(_Handler):
        seen: list[dict[str, str]] = []

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    Handler.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield Handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.mark.parametrize(("status", "ok"), [(200, True), (401, True), (404, False), (503, False)])
def test_a_server_is_judged_by_its_health_answer(http_server, no_credentials, status, ok):
    # Arrange: 401 is a server that wants credentials: it is there.
    http_server.status = status

    # Act / Assert
    if ok:
        check_tracking_uri(http_server.url)
    else:
        with pytest.raises(TrackingError, match=f"answered HTTP {status} on /health"):
            check_tracking_uri(http_server.url)
    assert [seen["path"] for seen in http_server.seen] == ["/health"], http_server.seen


def test_the_health_check_sends_no_credentials(http_server, no_credentials):
    """MLflow serves /health without authentication: the credentials are not sent there."""
    # Arrange
    uri = credentials_to_environment(http_server.url.replace("http://", "http://bob:hunter2@"))

    # Act
    check_tracking_uri(uri)

    # Assert
    assert [seen["path"] for seen in http_server.seen] == ["/health"], http_server.seen
    assert "Authorization" not in http_server.seen[0], http_server.seen


# ------------------------------------------------------------------------------ the lock
_HOLD_LOCK = textwrap.dedent(
    """
    import sys
    from pipeline.tracking.store import store_lock

    log = open(sys.argv[2], "a", buffering=1)
    with store_lock(sys.argv[1]):
        log.write("child in\\n")
        print("locked", flush=True)
        sys.stdin.readline()
        log.write("child out\\n")
    """
)


@pytest.fixture()
def lock_holder(tmp_path):
    """``hold(uri)``: another process holding ``store_lock(uri)`` until ``release()``."""
    started: list[subprocess.Popen] = []
    log = tmp_path / "lock.log"

    def hold(uri: str) -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "-c", _HOLD_LOCK, uri, str(log)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        started.append(process)
        assert process.stdout.readline().strip() == "locked", "the other process never locked"
        return process

    hold.log = log
    yield hold
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        process.stdin.close()
        process.stdout.close()


@pytest.mark.slow
def test_store_lock_makes_two_processes_take_turns(tmp_path, lock_holder, monkeypatch):
    # Arrange: another process holds the lock of this store.
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    other = lock_holder(uri)
    entered = threading.Event()

    def take_the_lock() -> None:
        with store_lock(uri):
            with lock_holder.log.open("a") as log:
                log.write("parent in\n")
            entered.set()

    # Act 1: a short timeout gives up in one line.
    monkeypatch.setattr(store, "_LOCK_TIMEOUT_SECONDS", 0.2)
    with (
        pytest.raises(TrackingError, match="stayed locked by another process") as info,
        store_lock(uri),
    ):
        pytest.fail("the lock was taken while another process held it")
    monkeypatch.undo()
    # Act 2: the usual timeout waits for the other process.
    waiter = threading.Thread(target=take_the_lock)
    waiter.start()
    held_off = not entered.wait(timeout=1.0)
    other.stdin.write("release\n")
    other.stdin.flush()
    waiter.join(timeout=60)

    # Assert
    assert "\n" not in str(info.value), str(info.value)
    assert held_off, "the lock was taken while another process held it"
    assert entered.is_set(), "the lock was never taken after the other process let it go"
    log = lock_holder.log.read_text(encoding="utf-8").splitlines()
    assert log == ["child in", "child out", "parent in"], f"not one at a time: {log}"


def test_store_lock_is_reentrant_in_sequence_and_free_elsewhere(tmp_path, refused_server):
    # Arrange
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    # Act: one after the other in one process; a server store has no local lock.
    for _ in range(2):
        with store_lock(uri):
            pass
    with store_lock(refused_server.url):
        pass

    # Assert
    assert (tmp_path / "mlflow.db.lock").exists(), "the lock file sits beside the database"
    assert refused_server.requests == [], "a lock must not reach the server"


# ------------------------------------------------------------------------------ opening
def test_open_store_creates_the_experiment_beside_the_database(tracking_uri):
    # Act
    client, experiment_id = open_store(tracking_uri, "first")
    again = open_store(tracking_uri, "first")[1]

    # Assert
    experiment = client.get_experiment(experiment_id)
    assert experiment.name == "first" and again == experiment_id, (experiment, again)
    assert experiment.artifact_location == artifact_location(tracking_uri), "artifacts elsewhere"


def test_open_store_restores_a_deleted_experiment(tracking_uri):
    # Arrange
    client, experiment_id = open_store(tracking_uri, "binned")
    client.delete_experiment(experiment_id)

    # Act
    _, again = open_store(tracking_uri, "binned")

    # Assert
    assert again == experiment_id, "a second experiment of the same name"
    assert client.get_experiment(again).lifecycle_stage == "active", "still deleted"


@pytest.mark.parametrize(
    "content", [b"not a database", b"SQLite format 3\x00" + b"\x00" * 200], ids=["text", "cut"]
)
def test_open_store_on_a_broken_file_is_one_line(tmp_path, content):
    # Arrange
    database = tmp_path / "mlflow.db"
    database.write_bytes(content)

    # Act / Assert
    with pytest.raises(TrackingError, match="cannot use MLflow store") as info:
        open_store(f"sqlite:///{database}", "never")
    assert "\n" not in str(info.value), str(info.value)
    assert len(str(info.value)) < 500, str(info.value)


def test_open_store_on_an_unreachable_server_fails_fast(refused_server, no_credentials):
    # "Fast" as behaviour: one short /health request, before MLflow's client (whose HTTP
    # retries back off for minutes) is used.
    uri = credentials_to_environment(refused_server.url.replace("http://", "http://u:hunter2@"))

    with pytest.raises(TrackingError, match="not reachable") as info:
        open_store(uri, "never")

    refused_server.assert_one_short_health_request()
    assert "\n" not in str(info.value) and "hunter2" not in str(info.value), str(info.value)


def test_open_store_refuses_an_in_memory_store():
    with pytest.raises(TrackingError, match="names no database file"):
        open_store("sqlite:///:memory:", "never")


def test_open_store_marks_the_runs_of_dead_processes_failed(tracking_uri):
    # Arrange: RUNNING runs of a dead process of this host, of a live one, of another host,
    # and one the pipeline did not make (no pid tag).
    client, experiment_id = open_store(tracking_uri, "stale")
    host = socket.gethostname()
    dead = str(_dead_pid())
    runs = {
        "dead": {"host": host, "pid": dead},
        "alive": {"host": host, "pid": str(os.getpid())},
        "foreign": {"host": "elsewhere", "pid": dead},
        "untagged": {},
        "odd pid": {"host": host, "pid": "not-a-pid"},
    }
    ids = {
        name: client.create_run(experiment_id, tags=tags).info.run_id for name, tags in runs.items()
    }
    finished = client.create_run(experiment_id, tags={"host": host, "pid": dead}).info.run_id
    client.set_terminated(finished, "FINISHED")

    # Act
    open_store(tracking_uri, "stale")

    # Assert
    statuses = {name: client.get_run(run_id).info.status for name, run_id in ids.items()}
    assert statuses == {
        "dead": "FAILED", "alive": "RUNNING", "foreign": "RUNNING", "untagged": "RUNNING",
        "odd pid": "RUNNING",
    }, statuses  # fmt: skip
    error = client.get_run(ids["dead"]).data.tags.get("error")
    assert error == "the process ended without closing the run", error
    assert client.get_run(finished).info.status == "FINISHED", "a finished run was touched"
    assert mark_stale_runs(client, experiment_id) == [], "marked twice"


def test_an_absolute_store_is_the_same_wherever_it_is_opened_from(
    tmp_path, monkeypatch, _empty_store
):
    # Arrange: a default store resolved in one folder (a copy of an empty store, to skip
    # MLflow's migrations), opened from another.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "a" / "mlruns").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    shutil.copyfile(_empty_store, tmp_path / "a" / "mlruns" / "mlflow.db")
    monkeypatch.chdir(tmp_path / "a")
    uri = default_tracking_uri(None)

    # Act
    monkeypatch.chdir(tmp_path / "b")
    client, experiment_id = open_store(uri, "here")

    # Assert
    assert (tmp_path / "a" / "mlruns" / "mlflow.db").is_file(), "the store is not where resolved"
    assert not (tmp_path / "b" / "mlruns").exists(), "a second store in the working directory"
    location = client.get_experiment(experiment_id).artifact_location
    assert location == (tmp_path / "a" / "mlruns" / "artifacts").as_uri(), location
