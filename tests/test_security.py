"""Security properties: loopback servers, no writes outside the configured folders."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import pytest

from flows.runners import make_task_runner
from pipeline.config import ExecutionConfig
from pipeline.recording import report_folder


@pytest.mark.parametrize(
    "run_name", ["../../etc/passwd", "/absolute/path", "..", "a/../../b", "ok-name_1.2", None]
)
def test_report_folder_stays_inside_the_cache_folder(tmp_path: Path, run_name: str | None):
    cache = tmp_path / "cache"

    folder = report_folder(cache, run_name)

    assert folder.resolve().is_relative_to(cache.resolve()), folder
    assert folder.parent == cache.resolve() / "reports", folder


def test_temporary_prefect_server_binds_loopback(prefect_api_url: str, listening_hosts):
    port = urllib.parse.urlsplit(prefect_api_url).port
    assert listening_hosts(port) == {"127.0.0.1"}, listening_hosts(port)


def test_local_dask_cluster_binds_loopback():
    runner = make_task_runner(ExecutionConfig(runner="dask", workers=2))

    kwargs = runner.cluster_kwargs
    assert kwargs["host"] == "127.0.0.1", kwargs
    assert kwargs["dashboard_address"].startswith("127.0.0.1:"), kwargs
