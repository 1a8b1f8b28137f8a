"""The orchestrated commands of ``mlp-pipeline``, added to the app of :mod:`pipeline.cli`.

``mlp-pipeline run`` and ``mlp-pipeline cv`` call the Prefect flows in this process, with one
Prefect API for the flow and its workers (a temporary local server unless ``PREFECT_API_URL`` is
set) and rich progress bars.
"""

from __future__ import annotations

import gc
import signal
import sys
from contextlib import ExitStack, nullcontext
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from pipeline.cli import (
    Activation,
    BatchSize,
    ConfigFile,
    DataDir,
    Dataset,
    Epochs,
    Experiment,
    Hidden,
    LimitTest,
    LimitTrain,
    Lr,
    NoProgress,
    Optimizer,
    Preset,
    Seed,
    SetOption,
    TrackingUri,
    app,
    config_from_options,
    main,
    out,
    print_registration,
    ui_command,
)
from pipeline.config import PipelineConfig

__all__ = ["app", "main"]

Lambdas = Annotated[
    str | None, typer.Option("--lambdas", help="L2 strengths, comma-separated: 1e-4,1e-3")
]
Folds = Annotated[int | None, typer.Option(help="Number of CV folds")]
FinalEpochs = Annotated[
    int | None, typer.Option("--final-epochs", help="Epochs of the final model")
]
Runner = Annotated[str | None, typer.Option(help="sequential, thread, process or dask")]
Workers = Annotated[int | None, typer.Option(help="Parallel workers (default: cores)")]
DaskAddress = Annotated[
    str | None, typer.Option("--dask-address", help="tcp://host:port of a Dask scheduler")
]


def _run_flow(name: str, cfg: PipelineConfig, progress: bool) -> dict[str, Any]:
    """Run a flow in this process with one Prefect API and progress bars.

    Without ``PREFECT_API_URL`` a temporary Prefect server boots first (4-7 s here); the
    checks, imports, MLflow store and worker pool get ready meanwhile, on the other core.
    """
    from flows.server import prefect_api
    from pipeline.progress import ConsoleReporter, reporting

    interrupted: list[int] = []

    def _interrupt(signum: int, frame: Any) -> None:
        # SIGTERM ends the run like Ctrl-C, so its MLflow runs end KILLED, not RUNNING. The
        # trainings are told to stop here, not only where the KeyboardInterrupt lands: it can
        # land inside a library that turns it into another error (pydantic's serializer does).
        interrupted.append(signum)
        _stop_trainings_soon()
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}

    # Start-up imports Prefect, MLflow, pandas and matplotlib: the collector's full passes over
    # their objects took 0.7 CPU-s of a 4.5 s start-up that is CPU-bound on 2 cores.
    gc.disable()
    try:
        with (
            ExitStack() as started,
            prefect_api(while_starting=lambda: _prepare_run(cfg, started)) as temporary_api,
            reporting(ConsoleReporter(enabled=progress)),
        ):
            # What start-up built lives until exit: frozen, later full passes skip it.
            gc.freeze()
            gc.enable()
            from flows.pipeline_flow import cv_flow, mlp_pipeline

            flow_fn = {"mlp-pipeline": mlp_pipeline, "cv": cv_flow}[name]
            with _no_flow_heartbeats() if temporary_api else nullcontext():
                return flow_fn(cfg)
    except Exception:
        if interrupted:  # the interruption, whatever a library made of it on the way
            raise KeyboardInterrupt(f"signal {interrupted[0]}") from None
        raise
    finally:
        gc.enable()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop_trainings_soon() -> None:
    """Tell running trainings to stop; no import in a signal handler (before the task code
    is imported, no training runs)."""
    tasks = sys.modules.get("flows.tasks")
    if tasks is not None:
        tasks.stop_soon()


def _no_flow_heartbeats() -> Any:
    """Prefect settings without flow-run heartbeats, for a run on its own temporary server.

    Heartbeats let a lasting server mark a flow run Crashed when its process vanishes; a
    temporary server vanishes with the run. They only cost: the flow's teardown waits up to
    1 s for the heartbeat thread, which sleeps in 1 s steps.
    """
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


def _prepare_run(cfg: PipelineConfig, started: ExitStack) -> None:
    """Everything a run needs before its flow starts; runs while the Prefect server boots.

    Bad data, an unreachable Dask scheduler or MLflow store fail here, in one line, before any
    flow run exists. The dataset is memoized, so the flow's own load costs nothing more. The
    worker pool (closed by ``started``) starts once the task code is imported and the data
    loaded, so its workers fork ready to train (:class:`flows.runners.EagerProcessPoolTaskRunner`);
    the MLflow store is opened after the fork, so no worker inherits its connections.
    """
    from pipeline.cache import check_cache_dir
    from pipeline.training import load_data_checked

    check_cache_dir(cfg.execution.cache_dir)
    load_data_checked(cfg)
    if cfg.execution.runner == "dask" and cfg.execution.dask_address:
        from flows.runners import check_scheduler_reachable

        check_scheduler_reachable(cfg.execution.dask_address)
    import flows.pipeline_flow  # noqa: F401 -- its imports, while the server boots
    from flows.console import hide_known_failures_on_console
    from flows.runners import prestarted_task_runner, prime_prefect

    prime_prefect()
    hide_known_failures_on_console()  # before the workers fork: they print to this console too
    started.enter_context(prestarted_task_runner(cfg.execution, cfg.data))
    from pipeline.tracking import prepare_store

    prepare_store(cfg.tracking)  # checks the URI first (one health request for a server)


def _print_summary(result: dict[str, Any], cfg: PipelineConfig) -> None:
    from pipeline import notebook
    from pipeline.tracking_uri import resolve_tracking_uri

    best = result["best_l2_lambda"]
    table = Table(title=f"cross-validation ({cfg.cv.folds} folds)")
    for column in ("λ", "val accuracy (mean ± std)", "val loss", "diverged", ""):
        table.add_column(column, justify="right")
    for row in result["cv_table"]:
        chosen = row["l2_lambda"] == best
        table.add_row(
            f"{row['l2_lambda']:g}",
            f"{row['mean_val_accuracy']:.4f} ± {row['std_val_accuracy']:.4f}",
            f"{row['mean_val_loss']:.4f}",
            str(row["diverged_folds"]),
            "[bold green]← chosen[/bold green]" if chosen else "",
            style="bold" if chosen else None,
        )
    out.print(table)
    # A run of the notebook's protocol (its preset): its published figures beside ours.
    beside_notebook = notebook.follows_protocol(cfg)
    if beside_notebook:
        published = Table(title="the homework notebook, as published")
        for column in ("λ", "val accuracy (mean)", "val loss", ""):
            published.add_column(column, justify="right")
        for lam, percent in sorted(notebook.CV_ACCURACY_PERCENT.items()):
            published.add_row(
                f"{lam:g}",
                f"{percent / 100:.4f}",
                f"{notebook.CV_LOSS[lam]:.4f}",
                "← chosen" if lam == notebook.BEST_LAMBDA else "",
            )
        out.print(published)
    out.print(
        f"trainings: {result['trained_folds']} run, {result['cached_folds']} reused from cache; "
        f"wall time {result['wall_seconds']:.1f} s"
    )
    if result.get("worker_restarts"):
        out.print(
            f"worker pool restarted {result['worker_restarts']} time(s) after a worker died; "
            "the unfinished trainings were resubmitted"
        )
    if "test_accuracy" in result:
        out.print(
            f"[bold]test accuracy {result['test_accuracy']:.4f}[/bold] (λ={best:g}, "
            f"test loss {result['test_loss']:.4f})"
        )
        if beside_notebook:
            out.print(
                f"notebook: λ={notebook.BEST_LAMBDA:g} chosen, test accuracy "
                f"{notebook.TEST_ACCURACY_ONE_HIDDEN_PERCENT / 100:.4f}"
            )
        print_registration(
            result.get("registered_model"),
            result.get("registered_version"),
            bool(result.get("champion")),
            result.get("champion_note", ""),
        )
    out.print(f"MLflow run {result['mlflow_run_id']}")
    out.print(
        f"open the MLflow UI: {ui_command(resolve_tracking_uri(cfg.tracking.tracking_uri))}",
        markup=False,
    )


@app.command()
def run(
    preset: Preset = None,
    config: ConfigFile = None,
    set_: SetOption = None,
    dataset: Dataset = None,
    data_dir: DataDir = None,
    limit_train: LimitTrain = None,
    limit_test: LimitTest = None,
    hidden: Hidden = None,
    activation: Activation = None,
    optimizer: Optimizer = None,
    lr: Lr = None,
    epochs: Epochs = None,
    final_epochs: FinalEpochs = None,
    batch_size: BatchSize = None,
    lambdas: Lambdas = None,
    folds: Folds = None,
    seed: Seed = None,
    runner: Runner = None,
    workers: Workers = None,
    dask_address: DaskAddress = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = None,
    no_progress: NoProgress = False,
) -> None:
    """Run the whole pipeline: CV over lambda, final model, test evaluation, MLflow record."""
    cfg = config_from_options(
        preset, config, set_, dataset=dataset, data_dir=data_dir, limit_train=limit_train,
        limit_test=limit_test, hidden=hidden, activation=activation, optimizer=optimizer, lr=lr,
        epochs=epochs, final_epochs=final_epochs, batch_size=batch_size, lambdas=lambdas,
        folds=folds, seed=seed, runner=runner, workers=workers, dask_address=dask_address,
        tracking_uri=tracking_uri, experiment=experiment,
    )  # fmt: skip
    _print_summary(_run_flow("mlp-pipeline", cfg, progress=not no_progress), cfg)


@app.command()
def cv(
    preset: Preset = None,
    config: ConfigFile = None,
    set_: SetOption = None,
    dataset: Dataset = None,
    data_dir: DataDir = None,
    limit_train: LimitTrain = None,
    hidden: Hidden = None,
    activation: Activation = None,
    optimizer: Optimizer = None,
    lr: Lr = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    lambdas: Lambdas = None,
    folds: Folds = None,
    seed: Seed = None,
    runner: Runner = None,
    workers: Workers = None,
    dask_address: DaskAddress = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = None,
    no_progress: NoProgress = False,
) -> None:
    """Run only the cross-validation sweep and record its table."""
    cfg = config_from_options(
        preset, config, set_, dataset=dataset, data_dir=data_dir, limit_train=limit_train,
        hidden=hidden, activation=activation, optimizer=optimizer, lr=lr, epochs=epochs,
        batch_size=batch_size, lambdas=lambdas, folds=folds, seed=seed, runner=runner,
        workers=workers, dask_address=dask_address, tracking_uri=tracking_uri,
        experiment=experiment,
    )  # fmt: skip
    _print_summary(_run_flow("cv", cfg, progress=not no_progress), cfg)


# ----------------------------------------------------------------------------- deployments

Cron = Annotated[str | None, typer.Option("--cron", help="Cron schedule (UTC), e.g. '0 2 * * *'")]
Interval = Annotated[
    float | None, typer.Option("--interval", help="Run every SECONDS (instead of --cron)")
]
DeploymentName = Annotated[str, typer.Option("--name", help="Name of the scheduled deployment")]
Limit = Annotated[
    int | None,
    typer.Option("--limit", min=1, help="At most this many runs at once (default: no limit)"),
]


@app.command()
def serve(
    cron: Cron = None,
    interval: Interval = None,
    name: DeploymentName = "scheduled",
    preset: Preset = None,
    config: ConfigFile = None,
    set_: SetOption = None,
    limit: Limit = None,
) -> None:
    """Serve the pipeline as Prefect deployments (scheduled and on-demand) until stopped.

    Needs a Prefect server: `prefect server start --host 127.0.0.1` and PREFECT_API_URL.
    """
    from flows import deployments as dep
    from pipeline.tracking_uri import redact_uri

    url = dep.require_api_url()
    cfg = dep.absolute_paths(config_from_options(preset, config, set_))
    served = dep.build_deployments(cfg, name=name, cron=cron, interval=interval)
    dep.check_api(url)
    for deployment in served:
        schedule = ", ".join(_describe_schedule(s) for s in deployment.schedules) or "on request"
        out.print(f"serving {dep.FLOW_NAME}/{deployment.name} ({schedule})", highlight=False)
    out.print(
        f"config: preset {preset or 'default'}, dataset {cfg.data.dataset}, "
        f"runner {cfg.execution.runner}; MLflow {redact_uri(cfg.tracking.tracking_uri or '')}",
        highlight=False,
    )
    out.print(
        f"trigger a run: mlp-pipeline trigger [--set key=value ...] [--wait]; "
        f"Prefect API {url}; stop with Ctrl-C",
        highlight=False,
    )
    dep.serve_deployments(served, limit=limit)
    out.print("stopped; the schedules are paused until the next serve", highlight=False)


def _describe_schedule(schedule: Any) -> str:
    inner = getattr(schedule, "schedule", schedule)
    if getattr(inner, "cron", None):
        return f"cron {inner.cron} {inner.timezone or 'UTC'}"
    if getattr(inner, "interval", None) is not None:
        return f"every {inner.interval.total_seconds():g} s"
    return str(inner)


@app.command()
def trigger(
    deployment: Annotated[
        str, typer.Option("--deployment", help="Deployment name (flow mlp-pipeline)")
    ] = "on-demand",
    set_: SetOption = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the run and print its result")
    ] = False,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="With --wait: give up after SECONDS")
    ] = None,
) -> None:
    """Start a run of a served deployment, with --set overrides on its config."""
    from prefect.client.orchestration import get_client

    from flows import deployments as dep
    from pipeline.config import parse_set_options

    err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)
    overrides = parse_set_options(set_ or [])
    url = dep.require_api_url()
    dep.check_api(url)
    name = dep.full_name(deployment)
    with get_client(sync_client=True) as client:
        found = dep.read_deployment(client, name)
        cfg = dep.deployment_config(found, overrides)
        run_ = dep.create_run(client, found, cfg)
        out.print(f"flow run {run_.name} ({run_.id}) of {name}", highlight=False)
        if not wait:
            return
        state = dep.follow_run(client, run_.id, _print_state, timeout=timeout)
    if dep.is_failure(state):
        message = " ".join((state.message or "").split())
        err.print(f"error: flow run {run_.name} ended {state.name}: {message}")
        raise typer.Exit(1)
    outcome = dep.find_mlflow_run(cfg, run_.id)
    if outcome is None:
        err.print(f"error: no MLflow run of flow run {run_.id} in {cfg.tracking.tracking_uri}")
        raise typer.Exit(1)
    out.print(f"MLflow run {outcome.run_id}", highlight=False)
    if outcome.test_accuracy is not None:
        out.print(f"[bold]test accuracy {outcome.test_accuracy:.4f}[/bold]", highlight=False)
    print_registration(
        outcome.registered_model, outcome.registered_version, outcome.champion,
        outcome.champion_note,
    )  # fmt: skip
    out.print(f"open the MLflow UI: {ui_command(outcome.tracking_uri)}", markup=False)


def _print_state(state: Any) -> None:
    hint = ""
    if state.name == "Late":
        hint = " (nothing picked it up yet: is `mlp-pipeline serve` or a worker running?)"
    out.print(f"state: {state.name}{hint}", highlight=False)


if __name__ == "__main__":
    main()
