"""``mlp-pipeline runs``: parent runs of a real SQLite store listed side by side.

The store is written once per module: one execution's run record published through the real
:func:`~pipeline.tracking.publish.publish` (so the listing follows what the pipeline really
logs), plus hand-made parent runs with known start times, children and statuses, and runs
carrying params the listing cannot parse.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import socket
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

import pipeline.tracking.runs
from pipeline.config import preset
from pipeline.errors import TrackingError
from pipeline.listing import columns_that_fit, table_rows, to_csv, to_json
from pipeline.record import RunRecord
from pipeline.results import FoldResult
from pipeline.selection import cv_table, select_candidate
from pipeline.tracking.publish import publish
from pipeline.tracking.runs import COLUMNS, list_pipeline_runs

HAND = "hand-made"  # experiment of the hand-made runs
EMPTY = "nothing-yet"
T0 = 1_700_000_000_000  # ms since the epoch


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def store_uri(tmp_path_factory, _empty_store) -> str:
    """The module's store: a copy of the session's empty one (MLflow's migrations take seconds)."""
    database = tmp_path_factory.mktemp("runs-store") / "mlflow.db"
    shutil.copyfile(_empty_store, database)
    return f"sqlite:///{database}"


def _parent(client, experiment_id, *, start, minutes, status, params, metrics, tags) -> str:
    run = client.create_run(
        experiment_id, start_time=start, tags={"stage": "pipeline", "flow": "mlp-pipeline", **tags}
    )
    run_id = run.info.run_id
    for key, value in params.items():
        client.log_param(run_id, key, value)
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    client.set_terminated(run_id, status, end_time=start + minutes * 60_000)
    return run_id


@pytest.fixture(scope="module")
def hand_made(store_uri) -> dict[str, str]:
    """Three executions (oldest FINISHED, a FAILED one, newest FINISHED) and their children."""
    client = MlflowClient(tracking_uri=store_uri)
    experiment_id = client.create_experiment(HAND)
    client.create_experiment(EMPTY)
    params = {
        "dataset.name": "mnist",
        "model.hidden_sizes": "[256, 128]",
        "training.optimizer": "nesterov",
        "training.lr": "0.05",
        "training.epochs": "10",
        "training.final_epochs": "None",
        "cv.folds": "4",
        "cv.l2_lambdas": "[1e-05, 0.0001, 0.001]",
    }
    ids = {}
    ids["old"] = _parent(
        client, experiment_id, start=T0, minutes=3, status="FINISHED",
        params=params,
        metrics={"best_l2_lambda": 1e-4, "cv_best_mean_val_accuracy": 0.97,
                 "test_accuracy": 0.975},
        tags={"prefect.flow_run_name": "old-flow"},
    )  # fmt: skip
    ids["failed"] = _parent(
        client, experiment_id, start=T0 + 3_600_000, minutes=1, status="FAILED",
        params=params, metrics={}, tags={"prefect.flow_run_name": "failed-flow"},
    )  # fmt: skip
    ids["new"] = _parent(
        client, experiment_id, start=T0 + 7_200_000, minutes=2, status="FINISHED",
        params={**params, "training.optimizer": "adam", "training.final_epochs": "20"},
        metrics={"best_l2_lambda": 1e-3, "cv_best_mean_val_accuracy": 0.98,
                 "test_accuracy": 0.981},
        tags={"prefect.flow_run_name": "new-flow"},
    )  # fmt: skip
    for parent in ids.values():  # children must never show up as executions
        child = client.create_run(experiment_id, tags={"stage": "cv", "mlflow.parentRunId": parent})
        client.log_metric(child.info.run_id, "test_accuracy", 0.5)
        client.set_terminated(child.info.run_id, "FINISHED")
    return ids


@pytest.fixture(scope="module")
def recorded(store_uri, tmp_path_factory) -> tuple[str, object]:
    """A CV-only execution: a real run record, published (no final model: no test accuracy)."""
    config = preset("quick").replace(
        {
            "tracking.tracking_uri": store_uri,
            "tracking.experiment": "recorded",
            "execution.cache_dir": str(tmp_path_factory.mktemp("runs-cache")),
        }
    )
    results = [
        FoldResult(lam, fold, fold, 0.9 + lam, 0.3, 0.95, 0.2, 2, 0.5, {"epoch": [1, 2]})
        for lam in config.cv.l2_lambdas
        for fold in range(config.cv.folds)
    ]
    record = RunRecord.create(
        config, flow="cv", dataset={"name": "mnist-sample", "fingerprint": "f" * 64}
    )
    for result in results:
        record.add_fold(result)
    table = cv_table(results)
    record.add_cv(table, select_candidate(table))
    record.finish("FINISHED")
    return publish(record, store_uri).run_id, config


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------ listing
def test_parent_runs_newest_first_without_children(store_uri, hand_made):
    frame = list_pipeline_runs(HAND, tracking_uri=store_uri)
    expected = [hand_made["new"], hand_made["failed"], hand_made["old"]]
    assert frame["run_id"].tolist() == expected, frame[["run_id", "start_time"]]
    assert list(frame.columns) == [name for name, _ in COLUMNS]


def test_values_are_typed(store_uri, hand_made):
    frame = list_pipeline_runs(HAND, tracking_uri=store_uri).set_index("run_id")
    new, failed = frame.loc[hand_made["new"]], frame.loc[hand_made["failed"]]
    assert new["hidden_sizes"] == [256, 128], new["hidden_sizes"]
    assert new["l2_lambdas"] == [1e-5, 1e-4, 1e-3], new["l2_lambdas"]
    assert (new["optimizer"], new["lr"], new["epochs"], new["folds"]) == ("adam", 0.05, 10, 4)
    assert new["final_epochs"] == 20, new["final_epochs"]
    assert (new["best_lambda"], new["cv_accuracy"], new["test_accuracy"]) == (1e-3, 0.98, 0.981)
    assert new["duration_seconds"] == pytest.approx(120.0), new["duration_seconds"]
    assert new["start_time"] == pd.Timestamp(T0 + 7_200_000, unit="ms", tz="UTC")
    assert (new["prefect_flow_run"], new["status"]) == ("new-flow", "FINISHED")
    assert failed["status"] == "FAILED", failed
    assert math.isnan(failed["test_accuracy"]) and math.isnan(failed["best_lambda"]), failed
    assert pd.isna(frame.loc[hand_made["old"], "final_epochs"]), "None must become missing"


def test_last_keeps_the_most_recent(store_uri, hand_made):
    frame = list_pipeline_runs(HAND, tracking_uri=store_uri, last=2)
    assert frame["run_id"].tolist() == [hand_made["new"], hand_made["failed"]], frame


def test_lists_what_the_recorder_writes(store_uri, recorded):
    run_id, config = recorded
    frame = list_pipeline_runs("recorded", tracking_uri=store_uri)
    assert frame["run_id"].tolist() == [run_id], frame
    row = frame.iloc[0]
    assert row["dataset"] == "mnist-sample" and row["flow"] == "cv", row
    assert row["hidden_sizes"] == config.model.hidden_sizes, row["hidden_sizes"]
    assert row["l2_lambdas"] == config.cv.l2_lambdas, row["l2_lambdas"]
    assert row["optimizer"] == config.training.optimizer, row["optimizer"]
    assert row["lr"] == config.training.lr and row["epochs"] == config.training.epochs, row
    assert row["folds"] == config.cv.folds, row
    assert row["best_lambda"] == max(config.cv.l2_lambdas), row  # 0.9 + lambda: largest wins
    assert row["cv_accuracy"] == pytest.approx(0.9 + max(config.cv.l2_lambdas)), row
    assert math.isnan(row["test_accuracy"]), "a CV-only execution has no test accuracy"
    assert row["status"] == "FINISHED", row


def test_empty_experiment_gives_an_empty_frame(store_uri, hand_made):
    frame = list_pipeline_runs(EMPTY, tracking_uri=store_uri)
    assert frame.empty and list(frame.columns) == [name for name, _ in COLUMNS], frame


def test_unknown_experiment_names_the_existing_ones(store_uri, hand_made):
    with pytest.raises(TrackingError, match="no MLflow experiment 'nope'") as info:
        list_pipeline_runs("nope", tracking_uri=store_uri)
    assert HAND in str(info.value), str(info.value)


def test_missing_sqlite_store_is_an_error_and_not_created(tmp_path):
    database = tmp_path / "elsewhere" / "mlflow.db"
    with pytest.raises(TrackingError, match="no MLflow store"):
        list_pipeline_runs(tracking_uri=f"sqlite:///{database}")
    assert not database.parent.exists(), "listing must not create a store"


def test_default_store_is_not_created(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(TrackingError, match="no MLflow store"):
        list_pipeline_runs()
    assert not (tmp_path / "mlruns").exists(), "listing must not create ./mlruns"


def test_unreachable_server_fails_fast(monkeypatch, refused_server):
    # "Fast" as behaviour: one short /health request, and MLflow's client (whose HTTP retries
    # back off for minutes) never used.
    base_url = refused_server.url
    searches = []

    def refusing_search(*args, **kwargs):
        # Raises rather than reaching MLflow: a regression fails here instead of retrying.
        searches.append(args)
        raise AssertionError("MLflow queried after a failed health check")

    monkeypatch.setattr(pipeline.tracking.runs, "_search", refusing_search)
    with pytest.raises(TrackingError, match="not reachable") as info:
        list_pipeline_runs(tracking_uri=base_url)
    refused_server.assert_one_short_health_request()
    assert searches == [], f"MLflow was queried after a failed health check: {searches}"
    assert "\n" not in str(info.value), f"not one line: {info.value}"


def test_not_a_store_is_a_tracking_error(tmp_path):
    junk = tmp_path / "mlflow.db"
    junk.write_text("not a database")
    with pytest.raises(TrackingError, match="cannot read MLflow store"):
        list_pipeline_runs(tracking_uri=f"sqlite:///{junk}")


# ------------------------------------------------------------------------------------ odd params
# A run in the experiment whose params the listing cannot parse: written by hand, by another
# tool or by an older version: (its params and tags, the column that must show it missing).
ODD_PARAMS = [
    pytest.param({"cv.l2_lambdas": "not json"}, "l2_lambdas", id="lambdas-not-json"),
    pytest.param({"training.lr": "abc"}, "lr", id="lr-not-a-number"),
    pytest.param({"model.hidden_sizes": "[64"}, "hidden_sizes", id="hidden-cut-short"),
    pytest.param({"training.epochs": "many"}, "epochs", id="epochs-not-a-number"),
    pytest.param({"cv.folds": "2.5"}, "folds", id="folds-not-whole"),
    pytest.param(
        {"training.epochs": "1e20"},
        "epochs",
        id="epochs-too-large",
        marks=pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning"),
    ),  # fmt: skip
    pytest.param(
        {"cv.l2_lambdas": '["a", 1]'},
        "l2_lambdas",
        id="lambdas-not-numbers",
    ),  # fmt: skip
    pytest.param(
        {"model.hidden_sizes": '{"x": 1}'},
        "hidden_sizes",
        id="hidden-a-mapping",
    ),  # fmt: skip
    pytest.param({"cv.l2_lambdas": "null"}, "l2_lambdas", id="lambdas-null"),
    pytest.param({"search.space": "{not json"}, "l2_lambdas", id="space-not-json"),
    pytest.param({"search.space": "[1]"}, "l2_lambdas", id="space-a-list"),
    pytest.param(
        {"search.space": '{"training.l2_lambda": ["x"]}'}, "l2_lambdas", id="space-lambdas-text"
    ),
    pytest.param(
        {"l2_lambda": "abc", "tags.flow": "train"},
        "best_lambda",
        id="train-lambda-not-a-number",
    ),  # fmt: skip
]


@pytest.mark.parametrize(("params", "column"), ODD_PARAMS)
def test_a_run_with_params_the_listing_cannot_parse_does_not_break_it(
    store_uri, hand_made, params, column, cli, monkeypatch
):
    # Arrange: a good run and an odd one in one experiment.
    client = MlflowClient(tracking_uri=store_uri)
    name = f"odd {sorted(params.items())}"
    experiment_id = client.create_experiment(name)
    tags = {k.removeprefix("tags."): v for k, v in params.items() if k.startswith("tags.")}
    odd = {k: v for k, v in params.items() if not k.startswith("tags.")}
    good = _parent(
        client, experiment_id, start=T0, minutes=1, status="FINISHED",
        params={"training.lr": "0.05", "cv.l2_lambdas": "[0.001]", "model.hidden_sizes": "[8]",
                "training.epochs": "2", "cv.folds": "2"},
        metrics={"test_accuracy": 0.9}, tags={},
    )  # fmt: skip
    bad = _parent(
        client, experiment_id, start=T0 + 60_000, minutes=1, status="FINISHED",
        params=odd, metrics={"test_accuracy": 0.5}, tags=tags,
    )  # fmt: skip

    # Act
    frame = list_pipeline_runs(name, tracking_uri=store_uri)
    rows, csv, records = table_rows(frame), to_csv(frame), json.loads(to_json(frame))
    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = cli(["runs", "--tracking-uri", store_uri, "--experiment", name])

    # Assert: both runs listed, the odd value shown as missing.
    assert frame["run_id"].tolist() == [bad, good], frame
    value = frame.set_index("run_id").loc[bad, column]
    assert value is None or pd.isna(value), f"{column}: {value!r} from {odd}"
    assert len(rows) == 2 and len(records) == 2 and len(csv.strip().splitlines()) == 3, csv
    assert code == 0 and "0.5000" in out and "0.9000" in out, (code, out, err)


def test_a_search_space_naming_lambda_gives_the_lambdas_tried(store_uri):
    client = MlflowClient(tracking_uri=store_uri)
    experiment_id = client.create_experiment("searched")
    space = {"training.l2_lambda": [0.0, 0.5], "training.lr": [0.1, 0.2]}
    _parent(
        client, experiment_id, start=T0, minutes=1, status="FINISHED",
        params={"cv.l2_lambdas": "[0.001]", "search.space": json.dumps(space)},
        metrics={"best_l2_lambda": 0.5}, tags={},
    )  # fmt: skip

    row = list_pipeline_runs("searched", tracking_uri=store_uri).iloc[0]

    assert row["l2_lambdas"] == [0.0, 0.5] and row["best_lambda"] == 0.5, row


# ------------------------------------------------------------------------------------ formats
def test_json_and_csv_round_trip(store_uri, hand_made):
    frame = list_pipeline_runs(HAND, tracking_uri=store_uri)
    records = json.loads(to_json(frame))
    assert [r["run_id"] for r in records] == frame["run_id"].tolist()
    assert records[0]["start_time"].endswith("Z"), records[0]["start_time"]
    assert records[0]["l2_lambdas"] == [1e-5, 1e-4, 1e-3], records[0]
    assert records[1]["test_accuracy"] is None, "NaN must become null"
    table = pd.read_csv(io.StringIO(to_csv(frame)))
    assert table["run_id"].tolist() == frame["run_id"].tolist()
    assert table["l2_lambdas"].iloc[0] == "1e-05;0.0001;0.001", table["l2_lambdas"].iloc[0]
    assert table["test_accuracy"].iloc[0] == 0.981, table["test_accuracy"]


def test_table_rows_are_short_strings(store_uri, hand_made):
    rows = table_rows(list_pipeline_runs(HAND, tracking_uri=store_uri))
    new, failed, old = rows
    assert (new["hidden"], new["λ tried"], new["best λ"]) == ("256,128", "1e-5,1e-4,1e-3", "1e-3")
    assert (new["epochs"], old["epochs"]) == ("10/20", "10"), (new, old)
    assert (new["CV acc"], new["test acc"], new["took"]) == ("0.9800", "0.9810", "2m00s"), new
    assert (failed["test acc"], failed["status"]) == ("-", "FAILED"), failed


def test_columns_that_fit_keep_the_results_first(store_uri, hand_made):
    rows = table_rows(list_pipeline_runs(HAND, tracking_uri=store_uri))
    every = list(rows[0])

    def width(names):  # what the kept columns need: longest cell or header, plus the gap
        return sum(max(len(n), *(len(r[n]) for r in rows)) + 2 for n in names)

    assert columns_that_fit(rows, 10_000) == every
    narrow = columns_that_fit(rows, 80)
    assert {"started", "best λ", "CV acc", "test acc", "status"} <= set(narrow), narrow
    assert narrow == [n for n in every if n in narrow], "table order is kept"
    assert width(narrow) <= 80 < width(every), (narrow, width(narrow))
    assert columns_that_fit(rows, 5) == ["started"], "at least one column, the first in priority"


# ------------------------------------------------------------------------------------ CLI
def test_cli_json_lists_the_runs(store_uri, hand_made, cli):
    code, out, err = cli(
        ["runs", "--tracking-uri", store_uri, "--experiment", HAND, "--format", "json"]
    )
    assert code == 0, err
    assert [r["run_id"] for r in json.loads(out)][0] == hand_made["new"], out


def test_cli_table_shows_every_execution(store_uri, hand_made, cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = cli(["runs", "--tracking-uri", store_uri, "--experiment", HAND])
    assert code == 0, err
    for text in ("new-flow", "failed-flow", "old-flow", "0.9810", "FAILED", "256,128"):
        assert text in out, f"{text!r} missing from the table:\n{out}"
    assert out.index("new-flow") < out.index("old-flow"), "newest first"


def test_cli_table_on_a_narrow_terminal_cuts_columns_not_cells(
    store_uri, hand_made, cli, monkeypatch
):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = cli(["runs", "--tracking-uri", store_uri, "--experiment", HAND])
    assert code == 0, err
    lines = out.splitlines()
    assert all(len(line) <= 80 for line in lines), out
    assert "…" not in out, f"cells were cut short:\n{out}"
    for text in ("0.9810", "FAILED", "1e-3"):
        assert text in out, f"{text!r} missing from the narrow table:\n{out}"
    assert "on a wider terminal, or with --format csv" in out, out


@pytest.mark.slow
def test_cli_table_lists_a_train_run_without_flow_run(store_uri, cli, monkeypatch):
    # Arrange: `mlp-pipeline train` records an execution that no Prefect flow ran, beside one
    # that a flow ran (the flow-run column then holds a string and a missing value: NaN).
    monkeypatch.setenv("COLUMNS", "200")
    client = MlflowClient(tracking_uri=store_uri)
    _parent(
        client, client.create_experiment("trained"), start=T0, minutes=1, status="FINISHED",
        params={}, metrics={}, tags={"prefect.flow_run_name": "a-flow"},
    )  # fmt: skip
    where = ["--tracking-uri", store_uri, "--experiment", "trained"]
    code, _, err = cli(["train", "--preset", "quick", "--l2", "1e-3", "--no-progress", *where])
    assert code == 0, err

    # Act
    code, out, err = cli(["runs", *where])

    # Assert: listed, its missing flow run shown as "-"
    assert code == 0, err
    row = next(line for line in out.splitlines() if "mnist-sample" in line)
    assert "FINISHED" in row and " - " in row, out


@pytest.mark.slow
def test_cli_prints_bracketed_paths_and_names_as_they_are(tmp_path, cli, monkeypatch):
    # Rich markup would read "[v1]" as a style tag and drop it from the commands printed.
    monkeypatch.setenv("COLUMNS", "200")
    store = tmp_path / "[v1]"
    store.mkdir()
    where = ["--tracking-uri", f"sqlite:///{store}/mlflow.db", "--experiment", "[exp]"]
    code, out, err = cli(["train", "--preset", "quick", "--no-progress", *where])
    assert code == 0, err
    # Shell-quoted: brackets are glob characters to a shell.
    assert f"--backend-store-uri 'sqlite:///{store}/mlflow.db' " in out, out
    code, out, err = cli(["runs", *where])
    assert code == 0, err
    assert "pipeline runs in '[exp]'" in out, out


def test_cli_csv_with_last(store_uri, hand_made, cli):
    code, out, err = cli(
        ["runs", "--tracking-uri", store_uri, "--experiment", HAND, "--format", "csv",
         "--last", "1"]
    )  # fmt: skip
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 2 and hand_made["new"] in lines[1], out


def test_cli_empty_experiment_is_friendly(store_uri, hand_made, cli):
    code, out, err = cli(["runs", "--tracking-uri", store_uri, "--experiment", EMPTY])
    assert code == 0, err
    assert "no pipeline runs" in out, out
    code, out, err = cli(
        ["runs", "--tracking-uri", store_uri, "--experiment", EMPTY, "--format", "json"]
    )
    assert (code, json.loads(out)) == (0, []), (code, out)
    assert "no pipeline runs" in err, err


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--experiment", "nope"], "no MLflow experiment 'nope'"),
        (["--format", "xml"], "--format must be table, csv or json"),
        (["--last", "0"], "--last"),
    ],
)
def test_cli_errors_are_one_line_exit_2(store_uri, hand_made, cli, argv, fragment):
    code, out, err = cli(["runs", "--tracking-uri", store_uri, *argv])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit {code}; stderr {err!r}"
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert fragment in lines[0], lines[0]


def test_cli_unreachable_server_exit_2(cli):
    code, _, err = cli(["runs", "--tracking-uri", f"http://127.0.0.1:{_free_port()}"])
    assert code == 2 and err.startswith("error: MLflow tracking server"), (code, err)
    assert len(err.strip().splitlines()) == 1, err


def test_cli_missing_store_exit_2(tmp_path: Path, cli):
    uri = f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}"
    code, _, err = cli(["runs", "--tracking-uri", uri])
    assert code == 2 and "no MLflow store" in err, (code, err)
