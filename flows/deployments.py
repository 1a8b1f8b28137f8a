"""Prefect deployments of the pipeline: serve them on a schedule and trigger runs of them.

``mlp-pipeline serve`` registers two deployments of the ``mlp-pipeline`` flow with the Prefect
API in ``PREFECT_API_URL`` and executes their runs in subprocesses until it is stopped:

- ``mlp-pipeline/scheduled`` (name configurable) on a cron or interval schedule;
- ``mlp-pipeline/on-demand`` without a schedule, for ``mlp-pipeline trigger`` and
  ``prefect deployment run``.

Both carry the whole :class:`~pipeline.config.PipelineConfig` as their single parameter
``config`` (JSON). Relative paths in it are made absolute when serving, so runs started in
another working directory and ``trigger`` read and write the same stores. Prefect stores and
shows parameters: a tracking URI holding a credential is refused (:func:`config_parameters`).

Their runs execute :data:`served_pipeline`: the flow with state hooks that print one ``error:``
line per failed or crashed run in the ``serve`` console (whose Prefect console logging is off).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
import traceback
import urllib.parse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flows.server import START_SERVER_HINT
from pipeline.config import PipelineConfig, build_config, redact_uri
from pipeline.errors import ConfigError, PipelineError

FLOW_NAME = "mlp-pipeline"
SCHEDULED = "scheduled"
ON_DEMAND = "on-demand"
SERVED_ENTRYPOINT = "flows.deployments.served_pipeline"
_FAILED_STATES = {"FAILED", "CRASHED", "CANCELLED"}


# ------------------------------------------------------------------------------ the API


class FlowRunFailed(PipelineError):
    """A triggered flow run ended Failed, Crashed or Cancelled (exit code 1)."""

    exit_code = 1


def require_api_url() -> str:
    """Prefect's API URL (the environment, or the active profile as ``prefect config set``
    leaves it); a one-line :class:`PipelineError` when none is set."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url or ""
    if not url:
        raise PipelineError(f"PREFECT_API_URL is not set: deployments need a running server; "
                            f"{START_SERVER_HINT}")  # fmt: skip
    return url.rstrip("/")


# ------------------------------------------------------------------------------ config


PATH_KEYS = ("tracking.tracking_uri", "execution.cache_dir", "data.data_dir")


def absolute_paths(config: PipelineConfig, keys: Iterable[str] = PATH_KEYS) -> PipelineConfig:
    """``config`` with its tracking store, cache and data folders (those in ``keys``) absolute.

    Runs of a served deployment execute in subprocesses whose working directory may differ from
    the one ``serve`` or ``trigger`` was started in; relative paths would then point at other
    stores. Defaults are resolved too (tracking: ``$MLFLOW_TRACKING_URI`` or ``./mlruns``; data:
    ``$MLP_PIPELINE_DATA_DIR`` or ``./data``), so the running process's environment no longer
    matters.
    """
    from pipeline.data import resolve_data_dir
    from pipeline.tracking.store import default_tracking_uri

    resolvers = {
        "tracking.tracking_uri": lambda: _absolute_sqlite(
            default_tracking_uri(config.tracking.tracking_uri)
        ),
        "execution.cache_dir": lambda: str(
            Path(config.execution.cache_dir).expanduser().absolute()
        ),
        "data.data_dir": lambda: str(resolve_data_dir(config.data.data_dir)),
    }
    return build_config(base=config, overrides={key: resolvers[key]() for key in keys})


def _absolute_sqlite(uri: str) -> str:
    """``sqlite:///rel.db`` (relative to the working directory) as ``sqlite:////abs/rel.db``."""
    from pipeline.tracking.store import sqlite_database, sqlite_uri

    database = sqlite_database(uri)
    if database is None or database.is_absolute():
        return uri
    query = urllib.parse.urlsplit(uri).query
    return sqlite_uri(database.expanduser().absolute()) + (f"?{query}" if query else "")


def config_parameters(config: PipelineConfig) -> dict[str, Any]:
    """The deployment parameters carrying ``config`` (plain JSON, as the API stores them).

    Prefect stores parameters and shows them in its UI and API, and copies them into every flow
    run: a tracking URI holding a credential is a one-line :class:`ConfigError` instead.
    """
    check_no_credentials(config.tracking.tracking_uri)
    return {"config": config.model_dump(mode="json")}


def check_no_credentials(uri: str | None) -> None:
    """A one-line :class:`ConfigError` when ``uri`` holds a credential (a user or password,
    a token or password query parameter): whatever :func:`~pipeline.config.redact_uri` hides."""
    if not uri or redact_uri(uri) == uri:
        return
    raise ConfigError(
        f"the tracking URI {redact_uri(uri)} cannot carry credentials: Prefect stores "
        "deployment and flow-run parameters. Pass them through the environment where "
        "`mlp-pipeline serve` runs: MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
        "(or MLFLOW_TRACKING_TOKEN) for an http(s) server; for a database, a URI without user "
        "or password and the driver's own mechanism (postgresql: PGUSER, PGPASSWORD or ~/.pgpass)"
    )


# ------------------------------------------------------------------------------ serve


def report_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """A flow-run state hook: one ``error:`` line on stderr for a failed or crashed run.

    The ``serve`` console shows what its runs print (Prefect streams their output), and Prefect's
    own console logging is off (flows/cli.py): without this line a failure passes unseen. The
    traceback follows only with ``MLP_PIPELINE_DEBUG=1``.
    """
    message = " ".join((state.message or "").split()) or "no reason given"
    print(  # noqa: T201 -- the serve console is the user's terminal
        f"error: flow run {flow_run.name} ended {state.name}: {message}",
        file=sys.stderr,
        flush=True,
    )
    if os.environ.get("MLP_PIPELINE_DEBUG", "") not in {"", "0"}:
        exc = None
        with contextlib.suppress(Exception):  # a crash may have no exception to show
            exc = state.result(raise_on_failure=False)
        if isinstance(exc, BaseException):
            traceback.print_exception(exc, file=sys.stderr)


@functools.cache
def served_flow() -> Any:
    """The ``mlp-pipeline`` flow with :func:`report_failure` on failure and crash.

    Returns
    -------
    prefect.Flow
    """
    from flows.pipeline_flow import mlp_pipeline

    return mlp_pipeline.with_options(on_failure=[report_failure], on_crashed=[report_failure])


def __getattr__(name: str) -> Any:
    """``served_pipeline``: the served deployments' entrypoint, built on first use (importing
    the flow is heavy, and ``trigger`` never needs it)."""
    if name == "served_pipeline":
        return served_flow()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_deployments(
    config: PipelineConfig,
    *,
    name: str = SCHEDULED,
    cron: str | None = None,
    interval: float | None = None,
) -> list[Any]:
    """The scheduled deployment (when ``cron`` or ``interval`` is given) and the on-demand one.

    Returns
    -------
    list of prefect.deployments.runner.RunnerDeployment
    """
    from prefect.types.entrypoint import EntrypointType

    if cron is not None and interval is not None:
        raise ConfigError("give either --cron or --interval, not both")
    if interval is not None and not interval > 0:
        raise ConfigError(f"--interval must be a positive number of seconds (got {interval:g})")
    if name == ON_DEMAND:
        raise ConfigError(f"--name {ON_DEMAND!r} is taken by the unscheduled deployment")
    if cron is not None:
        _check_cron(cron)

    served = served_flow()
    common = {
        "parameters": config_parameters(config),
        # A module entrypoint: the installed package is found from any working directory.
        "entrypoint_type": EntrypointType.MODULE_PATH,
        "tags": ["mlp-pipeline"],
    }
    deployments = []
    if cron is not None or interval is not None:
        schedule = f"cron {cron!r}" if cron is not None else f"every {interval:g} s"
        deployments.append(
            served.to_deployment(
                name=name,
                cron=cron,
                interval=interval,
                description=f"The whole pipeline, {schedule}.",
                **common,
            )
        )
    deployments.append(
        served.to_deployment(
            name=ON_DEMAND,
            description="The whole pipeline, run on request (mlp-pipeline trigger).",
            **common,
        )
    )
    for deployment in deployments:
        # The module path Prefect derives names the flow's function (flows.pipeline_flow), whose
        # flow object has no hooks: the runs load this module's hooked one.
        deployment.entrypoint = SERVED_ENTRYPOINT
    return deployments


def describe_schedule(schedule: Any) -> str:
    """``cron 0 2 * * * UTC`` or ``every 3600 s``."""
    inner = getattr(schedule, "schedule", schedule)
    if getattr(inner, "cron", None):
        return f"cron {inner.cron} {inner.timezone or 'UTC'}"
    if getattr(inner, "interval", None) is not None:
        return f"every {inner.interval.total_seconds():g} s"
    return str(inner)


def _check_cron(expression: str) -> None:
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=expression)
    except ValidationError:
        raise ConfigError(
            f"--cron {expression!r} is not a valid cron expression "
            "(five fields: minute hour day-of-month month day-of-week, e.g. '0 2 * * *')"
        ) from None


def serve_deployments(deployments: list[Any], limit: int | None = None) -> None:
    """Register ``deployments`` and execute their runs here until SIGINT / SIGTERM.

    On shutdown Prefect pauses the schedules; runs due meanwhile wait (Late) for the next serve.
    """
    from prefect import serve

    serve(*deployments, limit=limit, print_starting_message=False)


# ------------------------------------------------------------------------------ trigger


def full_name(deployment: str) -> str:
    """``on-demand`` -> ``mlp-pipeline/on-demand`` (a ``flow/deployment`` name is kept)."""
    return deployment if "/" in deployment else f"{FLOW_NAME}/{deployment}"


def read_deployment(client: Any, name: str) -> Any:
    """The deployment ``flow/deployment``; a one-line error when the API does not know it."""
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_deployment_by_name(name)
    except ObjectNotFound:
        raise PipelineError(
            f"unknown deployment {name!r}; start `mlp-pipeline serve` first "
            f"(`prefect deployment ls` lists the known ones)"
        ) from None


def deployment_config(deployment: Any, overrides: dict[str, Any]) -> PipelineConfig:
    """The deployment's own ``config`` parameter with dotted ``overrides`` applied and validated."""
    stored = (deployment.parameters or {}).get("config")
    try:
        base = PipelineConfig.model_validate(stored or {})
    except ValueError as exc:
        problem = " ".join(str(exc).split())
        raise ConfigError(
            f"deployment {deployment.name!r} carries an invalid config: {problem}"
        ) from None
    if not overrides:
        return base
    uri = overrides.get("tracking.tracking_uri")
    if isinstance(uri, str):
        check_no_credentials(uri)  # before the config is built: its errors could echo the URI
    # Only the paths given now are relative to this working directory; the stored ones are kept.
    given = [key for key in PATH_KEYS if key in overrides]
    return absolute_paths(build_config(base=base, overrides=overrides), given)


def create_run(client: Any, deployment: Any, config: PipelineConfig) -> Any:
    """Create a flow run of ``deployment`` with ``config``; the serving process picks it up.

    Named like a command's runs, by dataset and deployment: ``mnist-on-demand-brave-otter``.

    Returns
    -------
    prefect.client.schemas.objects.FlowRun
    """
    from prefect.utilities.names import generate_slug

    return client.create_flow_run_from_deployment(
        deployment.id,
        parameters=config_parameters(config),
        name=f"{config.data.dataset}-{deployment.name}-{generate_slug(2)}",
        tags=["mlp-pipeline", "trigger", f"dataset:{config.data.dataset}"],
    )


def follow_run(
    client: Any,
    flow_run_id: Any,
    on_state: Callable[[Any], None],
    *,
    poll_seconds: float = 1.0,
    timeout: float | None = None,
) -> Any:
    """Poll the flow run until it reaches a final state, calling ``on_state`` on every change.

    Returns the final state; raises :class:`PipelineError` after ``timeout`` seconds.
    """
    started = time.monotonic()
    last = None
    while True:
        run = client.read_flow_run(flow_run_id)
        state = run.state
        key = (state.type, state.name) if state is not None else None
        if state is not None and key != last:
            last = key
            on_state(state)
        if state is not None and state.is_final():
            return state
        if timeout is not None and time.monotonic() - started > timeout:
            raise PipelineError(
                f"flow run {run.name} still {state.name if state else 'unknown'} "
                f"after {timeout:g} s (it keeps running; follow it in the Prefect UI)"
            )
        time.sleep(poll_seconds)


def is_failure(state: Any) -> bool:
    return state.type.value in _FAILED_STATES


def find_mlflow_run(config: PipelineConfig, flow_run_id: Any) -> Any:
    """The MLflow parent run a flow run recorded (tag ``prefect.flow_run_id``)."""
    from mlflow import MlflowClient

    from pipeline.tracking.store import default_tracking_uri, redact_uri

    uri = default_tracking_uri(config.tracking.tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    runs = client.search_runs(
        [experiment.experiment_id] if experiment else [],
        f"tags.`prefect.flow_run_id` = '{flow_run_id}' and tags.stage = 'pipeline'",
        max_results=1,
    )
    if not runs:
        raise FlowRunFailed(f"no MLflow run of flow run {flow_run_id} in {redact_uri(uri)}")
    return runs[0]


def published_from(run: Any, config: PipelineConfig) -> Any:
    """What the command line prints of a published run, read back from its tags."""
    from pipeline.tracking.publish import Published
    from pipeline.tracking.registry import Registration
    from pipeline.tracking.store import default_tracking_uri

    tags = run.data.tags
    registration = None
    if tags.get("registered_model"):
        registration = Registration(
            tags["registered_model"],
            tags.get("registered_model_version", ""),
            tags.get("champion") == "true",
            tags.get("champion_comparison", ""),
        )
    uri = default_tracking_uri(config.tracking.tracking_uri)
    return Published(run.info.run_id, uri, registration)
