"""A flow run's Prefect artifacts (``flows.artifacts.FlowArtifacts``) when the API fails: a
real server that stops answering mid-run, or refuses one artifact. Decoration that never fails
the run and, once the API is gone, is not tried again (each try costs seconds of Prefect's
client retries). What a whole run shows: tests/flows/test_pipeline_flow.py.
"""

from __future__ import annotations

import contextlib

import httpx
import pandas as pd
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.runtime import flow_run

import flows.artifacts
from flows import server
from flows.artifacts import FlowArtifacts
from flows.server import prefect_settings
from pipeline.tracking.publish import Published

TABLE = pd.DataFrame({"l2_lambda": [1e-4, 1e-2], "mean_val_accuracy": [0.9, 0.8],
                      "std_val_accuracy": [0.01, 0.02],
                      "val_accuracy_fold0": [0.9, 0.8]})  # fmt: skip
SUMMARY = {
    "best": {"training.l2_lambda": 1e-4},
    "cv_table": TABLE.to_dict(orient="records"),
    "published": Published("0123abcd", "sqlite:///mlflow.db"),
    "trained_folds": 4,
    "cached_folds": 0,
    "wall_seconds": 3.0,
}


@pytest.fixture
def tries(monkeypatch) -> list[str]:
    """Every artifact call the module makes (its Prefect functions, counted, then called)."""
    made: list[str] = []
    for name in ("create_progress_artifact", "update_progress_artifact",
                 "create_table_artifact", "create_markdown_artifact"):  # fmt: skip
        real = getattr(flows.artifacts, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            made.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(flows.artifacts, name, counted)
    return made


def _artifacts_of(flow_run_id: str) -> dict[str, object]:
    wanted = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    with get_client(sync_client=True) as client:
        return {a.key: a.data for a in client.read_artifacts(artifact_filter=wanted)}


@pytest.mark.slow
@pytest.mark.server
def test_once_the_api_is_gone_no_artifact_is_tried_again(tries):
    # Arrange: a Prefect server of the test's own, SIGKILLed mid-run (the OOM killer, say).
    process, url = server.launch()
    try:
        server.wait_ready(process, url)
        artifacts = FlowArtifacts()

        @flow
        def sweep() -> None:
            artifacts.sweep_started(4)
            artifacts.training_finished()
            process.kill()
            process.wait()
            for _ in range(3):
                artifacts.training_finished()
            artifacts.cv_table(TABLE, "cross-validation")
            artifacts.run_summary(SUMMARY, "cv", "mnist-sample", "mlflow ui --port 5000")

        # Act: one retry per call, as the CLI sets for its temporary server.
        with (
            prefect_settings(PREFECT_API_URL=url, PREFECT_CLIENT_MAX_RETRIES="1"),
            contextlib.suppress(httpx.TransportError),  # the flow's own end: not recorded
        ):
            sweep()
    finally:
        server.stop(process)

    # Assert: the first failure is the last try.
    assert artifacts.api_lost
    assert tries == ["create_progress_artifact"] + ["update_progress_artifact"] * 2, tries


@pytest.mark.parametrize(
    ("failure", "api_lost"),
    [
        # The server answered (Prefect's client raises this subclass): it is there.
        (httpx.HTTPStatusError("422 Unprocessable Entity", request=httpx.Request("POST", "/"),
                               response=httpx.Response(422)), False),
        # No answer in time, after Prefect's retries: a hung server is as good as gone.
        (httpx.ReadTimeout("timed out"), True),
    ],
    ids=["refused", "timed-out"],
)  # fmt: skip
def test_a_refused_artifact_is_skipped_alone_a_timeout_ends_them(
    prefect_api_url, monkeypatch, tries, failure, api_lost
):
    def failing(*args, **kwargs):
        tries.append("create_table_artifact")
        raise failure

    monkeypatch.setattr(flows.artifacts, "create_table_artifact", failing)

    @flow
    def sweep() -> tuple[str, FlowArtifacts]:
        artifacts = FlowArtifacts()
        artifacts.cv_table(TABLE, "cross-validation")
        artifacts.run_summary(SUMMARY, "cv", "mnist-sample", "mlflow ui --port 5000")
        return str(flow_run.get_id()), artifacts

    flow_run_id, artifacts = sweep()

    assert artifacts.api_lost is api_lost
    made = set(_artifacts_of(flow_run_id))
    assert made == (set() if api_lost else {"run-summary"}), made
    assert tries == ["create_table_artifact"] + ([] if api_lost else ["create_markdown_artifact"])
