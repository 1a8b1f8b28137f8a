"""The ``mlp-pipeline`` command line: one Typer app, every command (``python -m flows.cli``).

Exit codes: 0 success; 2 bad input, configuration or data (one ``error:`` line, no traceback);
3 the pipeline finished but MLflow could not record it (the run record keeps the results);
1 an unexpected failure; 130 interrupted
(129 after SIGHUP). ``MLP_PIPELINE_DEBUG=1`` adds the traceback to any error.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import logging
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flows.interrupt import exit_code, interruptible
from mlp import MLPError
from pipeline.config import PipelineConfig, parse_set_options, redact_uri, resolve_config
from pipeline.errors import ConfigError, NotPublishedError, PipelineError
from pipeline.search import L2_KEY

app = typer.Typer(
    name="mlp-pipeline",
    help="Train, cross-validate and track a from-scratch NumPy MLP on MNIST.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Inspect and verify the datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

out = Console(soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

# ----------------------------------------------------------------------------- options
Preset = Annotated[
    str | None, typer.Option("--preset", help="notebook, default or quick (default: default)")
]
ConfigFile = Annotated[
    Path | None,
    # Typer renders help as Rich markup: an unescaped [data] is read as a style tag and vanishes.
    typer.Option("--config", help=r"TOML file with \[data], \[model], ... sections"),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a setting: --set training.epochs=3 (repeatable)"),
]
Dataset = Annotated[
    str | None,
    typer.Option(
        "--dataset",
        help="mnist, fashion-mnist, mnist-sample; with the torchvision extra kmnist, qmnist, "
        "emnist-<split>",
    ),
]
DataDir = Annotated[
    str | None,
    typer.Option("--data-dir", help="Folder of the IDX files (env MLP_PIPELINE_DATA_DIR, ./data)"),
]
Hidden = Annotated[
    str | None, typer.Option("--hidden", help="Hidden layer sizes, comma-separated: 256,128")
]
Activation = Annotated[str | None, typer.Option(help="relu, tanh or sigmoid")]
Optimizer = Annotated[str | None, typer.Option(help="gd, sgd, momentum, nesterov or adam")]
Lr = Annotated[float | None, typer.Option("--lr", help="Learning rate")]
Epochs = Annotated[int | None, typer.Option(help="Epochs of each cross-validation training")]
FinalEpochs = Annotated[
    int | None, typer.Option("--final-epochs", help="Epochs of the final model")
]
BatchSize = Annotated[int | None, typer.Option("--batch-size", help="Mini-batch size")]
Seed = Annotated[int | None, typer.Option(help="Random seed")]
LimitTrain = Annotated[int | None, typer.Option("--limit-train", help="Training subset size")]
LimitTest = Annotated[int | None, typer.Option("--limit-test", help="Test subset size")]
L2Grid = Annotated[
    str | None,
    typer.Option("--l2-grid", help="L2 strengths to cross-validate, comma-separated: 1e-4,1e-3"),
]
Grid = Annotated[
    list[str] | None,
    typer.Option(
        "--grid",
        help="Search a setting: --grid 'training.lr=[0.05,0.1]' (a JSON list, or a distribution "
        "like '{\"log_uniform\": [1e-5, 1e-1]}'; repeatable)",
    ),
]
Strategy = Annotated[
    str | None, typer.Option("--strategy", help="Search strategy: grid, random or halving")
]
Selection = Annotated[
    str | None,
    typer.Option("--selection", help="best, or one-se: the most regularized within 1 std error"),
]
Folds = Annotated[int | None, typer.Option(help="Number of CV folds")]
Runner = Annotated[str | None, typer.Option(help="sequential, thread, process or dask")]
Workers = Annotated[int | None, typer.Option(help="Parallel workers (default: cores)")]
DaskAddress = Annotated[
    str | None, typer.Option("--dask-address", help="tcp://host:port of a Dask scheduler")
]
TrackingUri = Annotated[
    str | None,
    typer.Option("--tracking-uri", help="MLflow URI (env MLFLOW_TRACKING_URI, sqlite in mlruns/)"),
]
Experiment = Annotated[str | None, typer.Option(help="MLflow experiment name")]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="Hide progress bars")]

# Flags that changed name: an unknown-option error names the new one.
RENAMED_FLAGS = {"--lambdas": "--l2-grid"}
# Flags and the settings they set.
SETTINGS = {
    "dataset": "data.dataset",
    "data_dir": "data.data_dir",
    "limit_train": "data.limit_train",
    "limit_test": "data.limit_test",
    "hidden": "model.hidden_sizes",
    "activation": "model.activation",
    "optimizer": "training.optimizer",
    "lr": "training.lr",
    "epochs": "training.epochs",
    "final_epochs": "training.final_epochs",
    "batch_size": "training.batch_size",
    "l2_grid": "cv.l2_lambdas",
    "strategy": "search.strategy",
    "selection": "cv.selection",
    "folds": "cv.folds",
    "seed": "cv.seed",
    "runner": "execution.runner",
    "workers": "execution.workers",
    "dask_address": "execution.dask_address",
    "tracking_uri": "tracking.tracking_uri",
    "experiment": "tracking.experiment",
}


def config_from_options(
    preset: str | None,
    config: Path | None,
    set_: list[str] | None,
    grid: list[str] | None = None,
    **flags: Any,
) -> PipelineConfig:
    """The config of a command: preset, file, ``--set`` and flags; no credentials left in it.

    ``--grid`` entries join the search space of the preset and file (a key named again is
    replaced).
    """
    from pipeline.tracking.store import credentials_to_environment

    overrides = parse_set_options(set_ or [])
    for flag, value in flags.items():
        if value is not None:
            overrides[SETTINGS[flag]] = (
                _numbers(flag, value) if flag in {"hidden", "l2_grid"} else value
            )
    searched = parse_grid_options(grid or [])
    if L2_KEY in searched and "cv.l2_lambdas" in overrides:
        raise ConfigError(f"--l2-grid and --grid {L2_KEY}=... both set the L2 strengths: keep one")
    cfg = resolve_config(preset, config, overrides)
    if searched:
        cfg = cfg.replace({"search.space": {**cfg.search.space, **searched}})
    uri = cfg.tracking.tracking_uri
    safe = credentials_to_environment(uri)
    if safe is not None and redact_uri(safe) != safe:
        # A database password or a secret query key: MLflow reads those only from the URI, so
        # the URI travels in this process's environment, which Prefect never stores.
        os.environ["MLFLOW_TRACKING_URI"] = safe
        safe = None
    return cfg if safe == uri else cfg.replace({"tracking.tracking_uri": safe})


def parse_grid_options(items: list[str]) -> dict[str, Any]:
    """``--grid KEY=JSON`` entries as a search space: a JSON list, or a distribution object."""
    searched: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        try:
            values = json.loads(raw) if sep and key.strip() else None
        except json.JSONDecodeError:
            values = None
        if not isinstance(values, list | dict):
            raise ConfigError(
                f"--grid expects KEY=JSON_LIST, like 'training.lr=[0.05,0.1]' (got {item!r})"
            )
        searched[key.strip()] = values
    return searched


def _numbers(flag: str, text: str) -> list[float] | list[int]:
    option = "--" + flag.replace("_", "-")
    parts = [part.strip() for part in text.split(",")]
    if not all(parts):
        raise PipelineError(f"{option} ({SETTINGS[flag]}) has an empty item: {text!r}")
    try:
        values = [float(part) for part in parts]
    except ValueError:
        raise PipelineError(f"{option} expects comma-separated numbers, got {text!r}") from None
    if flag != "hidden":
        return values
    if not all(math.isfinite(v) and v == int(v) for v in values):
        raise PipelineError(f"--hidden expects whole numbers, got {text!r}")
    return [int(v) for v in values]


# ----------------------------------------------------------------------------- run, cv
def _run_flow(name: str, cfg: PipelineConfig, progress: bool, preset_name: str) -> None:
    """Run a flow in this process with progress bars, and print its summary.

    The flow run is named by dataset and preset (``mnist-accurate-brave-otter``); on a lasting
    Prefect server its UI address is printed. Bad data, an unusable MLflow store or an
    unreachable Dask scheduler fail in one line before any flow run exists, while a temporary
    Prefect server boots.
    """
    from flows.server import prefect_api

    def prepare() -> None:
        from flows.pipeline_flow import prepare_run

        prepare_run(cfg)

    try:
        with prefect_api(prepare) as temporary_server:
            from prefect.utilities.names import generate_slug

            from flows.pipeline_flow import cv_flow, mlp_pipeline
            from pipeline.progress import ConsoleReporter, reporting

            flow_fn = {"mlp-pipeline": mlp_pipeline, "cv": cv_flow}[name]
            run_name = f"{cfg.data.dataset}-{preset_name}-{generate_slug(2)}"
            links = temporary_server is None  # a temporary server's pages end with the run
            # Named, not tagged: Prefect's tags context tags every task run too, and a tagged
            # task run asks the server for its tag's concurrency slot (it hangs when the server
            # is gone).
            with reporting(ConsoleReporter(enabled=progress, links=links)):
                summary = flow_fn.with_options(flow_run_name=run_name)(cfg)
    except NotPublishedError as exc:
        # The results are in the record: shown all the same, once the progress bars are gone
        # (their last redraw would overwrite them).
        _print_recorded_summary(exc.record, cfg)
        raise
    _print_summary(summary, cfg)


def preset_name(preset: str | None, config: Path | None) -> str:
    """The preset a command's config starts from: ``--preset``, the file's own, or default."""
    from pipeline.config import load_toml

    named = load_toml(config).get("preset") if preset is None and config is not None else None
    return preset or (named if isinstance(named, str) else "default")


SHOWN_CANDIDATES = 10  # the summary's CV table shows the best few of a large search
SHORT_NAMES = {"model.hidden_sizes": "hidden"}  # column headers of searched settings


def _print_summary(summary: dict[str, Any], cfg: PipelineConfig) -> None:
    import pandas as pd

    from pipeline import notebook
    from pipeline.search import label

    best = summary["best"]
    table = pd.DataFrame(summary["cv_table"])
    _print_cv_table(f"cross-validation ({cfg.cv.folds} folds, {cfg.search.strategy})", table,
                    best)  # fmt: skip
    beside_notebook = notebook.follows_protocol(cfg)
    if beside_notebook:  # the notebook's protocol: its published figures beside ours
        published = pd.DataFrame(
            {
                "l2_lambda": l2,
                "mean_val_accuracy": percent / 100,
                "mean_val_loss": notebook.CV_LOSS[l2],
            }
            for l2, percent in sorted(notebook.CV_ACCURACY_PERCENT.items())
        )
        _print_cv_table("the homework notebook, as published", published,
                        {L2_KEY: notebook.BEST_LAMBDA})  # fmt: skip
    out.print(
        f"trainings: {summary['trained_folds']} run, {summary['cached_folds']} reused from cache; "
        f"wall time {summary['wall_seconds']:.1f} s"
    )
    if summary["worker_restarts"]:
        out.print(
            f"worker pool restarted {summary['worker_restarts']} time(s) after a worker died; "
            "the unfinished trainings were resubmitted"
        )
    if "test_accuracy" in summary:
        chosen = escape(label(best, "λ"))
        out.print(
            f"[bold]test accuracy {summary['test_accuracy']:.4f}[/bold] ({chosen}, "
            f"test loss {summary['test_loss']:.4f})"
        )
        if beside_notebook:
            out.print(
                f"notebook: λ={notebook.BEST_LAMBDA:g} chosen, test accuracy "
                f"{notebook.TEST_ACCURACY_ONE_HIDDEN_PERCENT / 100:.4f}"
            )
    if "published" in summary:  # a record's own summary: MLflow did not record it
        _print_published(summary["published"])


def _print_recorded_summary(folder: Path | None, cfg: PipelineConfig) -> None:
    """The summary a finished run's record holds (its MLflow publish failed)."""
    from pipeline.record import RunRecord

    if folder is not None:
        # Whatever goes wrong here, the exit-3 line that follows matters more (it names the
        # folder): never a traceback in its place.
        with contextlib.suppress(Exception):
            run = RunRecord(folder).run()
            if run["status"] == "FINISHED":
                _print_summary(run["summary"], cfg)


def _print_cv_table(title: str, table: Any, best: dict[str, Any]) -> None:
    """One row per candidate, the best first (the best few of a large search), chosen marked.

    ``table``: a CV table (:func:`pipeline.selection.cv_table`); the notebook's published one
    has only lambda, mean accuracy and mean loss.
    """
    from pipeline.search import candidate_id
    from pipeline.selection import candidate_of, pruned, ranked, searched_columns

    settings = searched_columns(table)
    budget = bool(pruned(table).any())  # halving: the epochs each candidate reached
    diverged = "diverged_folds" in table and bool(table["diverged_folds"].fillna(0).any())
    if "n_folds" in table:
        table = ranked(table)
    chosen_id = candidate_id(best)
    shown = table.head(SHOWN_CANDIDATES)
    rest = table.iloc[SHOWN_CANDIDATES:]
    chosen_rows = [row for _, row in rest.iterrows()
                   if candidate_id(candidate_of(row, settings)) == chosen_id]  # fmt: skip
    view = Table(title=title)
    headers = ["λ", *(SHORT_NAMES.get(key, key.split(".")[-1]) for key in settings),
               *(["epochs"] if budget else []), "val acc ± std", "val loss",
               *(["diverged"] if diverged else []), ""]  # fmt: skip
    for column in headers:
        view.add_column(column, justify="right")
    for _, row in [*shown.iterrows(), *((None, row) for row in chosen_rows)]:
        candidate = candidate_of(row, settings)
        chosen = candidate_id(candidate) == chosen_id
        std = row.get("std_val_accuracy")
        view.add_row(
            f"{candidate[L2_KEY]:g}",
            *(_cell(candidate[key]) for key in settings),
            *([str(int(row["budget"]))] if budget else []),
            f"{row['mean_val_accuracy']:.4f}" + ("" if _absent(std) else f" ± {std:.4f}"),
            f"{row['mean_val_loss']:.4f}",
            *([str(int(row["diverged_folds"]))] if diverged else []),
            "[bold green]← chosen[/bold green]" if chosen else "",
            style="bold" if chosen else None,
        )
    out.print(view)
    if hidden := len(rest) - len(chosen_rows):
        out.print(f"... and {hidden} more candidates (cv_results.csv in the MLflow run)")


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return escape(f"{value:g}" if isinstance(value, float) else str(value))


def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _print_published(published: Any) -> None:
    """The registered version (champion or why not), the MLflow run and how to open it."""
    registration = published.registration
    if registration is not None:
        if registration.champion:
            status = f"new champion: {registration.note}" if registration.note else "new champion"
        else:
            status = registration.note or "not the champion"
        out.print(
            f"model {registration.name} version {registration.version} ({status})", markup=False
        )
    out.print(f"MLflow run {published.run_id}")
    from pipeline.tracking.store import ui_command

    out.print(f"open the MLflow UI: {ui_command(published.tracking_uri)}", markup=False)


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
    l2_grid: L2Grid = None,
    grid: Grid = None,
    strategy: Strategy = None,
    selection: Selection = None,
    folds: Folds = None,
    seed: Seed = None,
    runner: Runner = None,
    workers: Workers = None,
    dask_address: DaskAddress = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = None,
    no_progress: NoProgress = False,
) -> None:
    """Run the whole pipeline: cross-validated search, final model, test evaluation, MLflow."""
    cfg = config_from_options(
        preset, config, set_, grid, strategy=strategy, selection=selection, dataset=dataset,
        data_dir=data_dir, limit_train=limit_train,
        limit_test=limit_test, hidden=hidden, activation=activation, optimizer=optimizer, lr=lr,
        epochs=epochs, final_epochs=final_epochs, batch_size=batch_size, l2_grid=l2_grid,
        folds=folds, seed=seed, runner=runner, workers=workers, dask_address=dask_address,
        tracking_uri=tracking_uri, experiment=experiment,
    )  # fmt: skip
    _run_flow("mlp-pipeline", cfg, not no_progress, preset_name(preset, config))


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
    l2_grid: L2Grid = None,
    grid: Grid = None,
    strategy: Strategy = None,
    selection: Selection = None,
    folds: Folds = None,
    seed: Seed = None,
    runner: Runner = None,
    workers: Workers = None,
    dask_address: DaskAddress = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = None,
    no_progress: NoProgress = False,
) -> None:
    """Run only the cross-validated search and record its table."""
    cfg = config_from_options(
        preset, config, set_, grid, strategy=strategy, selection=selection, dataset=dataset,
        data_dir=data_dir, limit_train=limit_train,
        hidden=hidden, activation=activation, optimizer=optimizer, lr=lr, epochs=epochs,
        batch_size=batch_size, l2_grid=l2_grid, folds=folds, seed=seed, runner=runner,
        workers=workers, dask_address=dask_address, tracking_uri=tracking_uri,
        experiment=experiment,
    )  # fmt: skip
    _run_flow("cv", cfg, not no_progress, preset_name(preset, config))


# ----------------------------------------------------------------------------- train
@app.command()
def train(
    l2: Annotated[
        float | None,
        typer.Option(
            "--l2",
            help="L2 strength lambda [default: the config's training.l2_lambda if above 0, "
            "else 1e-4]",
            min=0.0,
            show_default=False,
        ),
    ] = None,
    preset: Preset = None,
    config: ConfigFile = None,
    set_: SetOption = None,
    dataset: Dataset = None,
    data_dir: DataDir = None,
    hidden: Hidden = None,
    activation: Activation = None,
    optimizer: Optimizer = None,
    lr: Lr = None,
    final_epochs: FinalEpochs = None,
    batch_size: BatchSize = None,
    seed: Seed = None,
    limit_train: LimitTrain = None,
    limit_test: LimitTest = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = None,
    no_track: Annotated[bool, typer.Option("--no-track", help="Don't record in MLflow")] = False,
    no_progress: NoProgress = False,
) -> None:
    """Train one network on all training data with a given lambda and report test accuracy."""
    from pipeline.data import fingerprint_test_set
    from pipeline.progress import epoch_bar
    from pipeline.tracking.publish import recorded
    from pipeline.training import check_memory, load_configured_dataset, predict_test, train_final

    cfg = config_from_options(
        preset, config, set_, dataset=dataset, data_dir=data_dir, hidden=hidden,
        activation=activation, optimizer=optimizer, lr=lr, final_epochs=final_epochs,
        batch_size=batch_size, seed=seed, limit_train=limit_train, limit_test=limit_test,
        tracking_uri=tracking_uri, experiment=experiment,
    )  # fmt: skip
    if l2 is None:  # the config's default, 0, is "no lambda chosen" for a search
        l2 = cfg.training.l2_lambda or 1e-4
    data = load_configured_dataset(cfg.data)
    check_memory(cfg, data)

    def train_and_evaluate(publisher: Any = None) -> tuple[Any, Any, Any]:
        """``publisher``: shows the epochs in MLflow as they end."""
        epochs_total = cfg.training.resolved_final_epochs
        with epoch_bar(epochs_total, f"train λ={l2:g}", enabled=not no_progress) as on_bar:
            on_epoch = on_bar if publisher is None else publisher.final_epochs({L2_KEY: l2}, on_bar)
            final = train_final(cfg, data, {L2_KEY: l2}, callback=on_epoch)
        evaluation, predicted = predict_test(final, data)
        out.print(
            f"test accuracy {evaluation.accuracy:.4f}  test loss {evaluation.loss:.4f}  "
            f"({data.name}, {evaluation.n_samples} test images, {final.seconds:.1f} s training)"
        )
        return final, evaluation, predicted

    if no_track:
        train_and_evaluate()
        return
    with recorded(
        cfg,
        flow="train",
        dataset=data.summary(),
        params={"l2_lambda": l2},
    ) as (record, publisher):
        final, evaluation, predicted = train_and_evaluate(publisher)
        test_set = fingerprint_test_set(data.X_test, data.y_test)
        record.add_final(final, evaluation, data.X_test, data.y_test, predicted, test_set,
                         data.class_names)  # fmt: skip
        record.finish("FINISHED")
    _print_published(publisher.published)


# ----------------------------------------------------------------------------- publish
@app.command()
def publish(
    folder: Annotated[Path, typer.Argument(help="A run record: .mlp-pipeline/runs/<id>")],
    tracking_uri: TrackingUri = None,
) -> None:
    """Publish a run record to MLflow (again): what MLflow lacks is added, nothing twice."""
    from pipeline.record import RunRecord
    from pipeline.tracking.publish import publish as publish_record
    from pipeline.tracking.store import one_line

    record = RunRecord(folder)
    run_ = record.run()  # a RecordError (exit 2) when it is not a record
    try:
        published = publish_record(record, tracking_uri)
    except PipelineError:  # a damaged record, an unusable store: exit 2
        raise
    except Exception as exc:  # noqa: BLE001 -- the store failed mid-way: publish again
        raise NotPublishedError(f"publishing {folder} failed: {one_line(exc)}") from None
    out.print(f"published {run_['flow']} run {run_['id']} ({run_['status']})")
    _print_published(published)


# ----------------------------------------------------------------------------- evaluate
@app.command()
def evaluate(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="MLflow model URI: models:/NAME@champion, models:/NAME/VERSION, runs:/ID/model "
            "(ID: the run id a command printed)",
        ),
    ],
    dataset: Annotated[
        str | None,
        typer.Option("--dataset", help="a dataset of `run --dataset` (default: the model's own)"),
    ] = None,
    data_dir: DataDir = None,
    limit_test: LimitTest = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Test accuracy of a logged or registered model (reads only the test files)."""
    from pipeline.data import load_test_set
    from pipeline.tracking.model import accuracy, load_network
    from pipeline.tracking.store import default_tracking_uri, require_store

    cfg = config_from_options(
        None, None, None, dataset=dataset, data_dir=data_dir, limit_test=limit_test
    )
    uri = default_tracking_uri(tracking_uri)
    require_store(uri)
    network, normalizer, trained_on = load_network(model, uri)
    name = dataset or trained_on.dataset or cfg.data.dataset
    # Without --data-dir: the folder the model's own data came from, if it is still there.
    recorded = trained_on.data_dir if name == trained_on.dataset else None
    folder = cfg.data.data_dir or (recorded if recorded and Path(recorded).is_dir() else None)
    X_test, y_test = load_test_set(name, folder, cfg.data.download, limit_test=cfg.data.limit_test)
    score = accuracy(network, normalizer, X_test, y_test)
    out.print(
        f"test accuracy {score:.4f} ({name}, {y_test.size} test images, {model})", markup=False
    )


# ----------------------------------------------------------------------------- runs
@app.command()
def runs(
    experiment: Annotated[
        str | None, typer.Option(help="MLflow experiment name (default: mlp-pipeline)")
    ] = None,
    last: Annotated[
        int | None, typer.Option("--last", min=1, help="Only the N most recent executions")
    ] = None,
    format_: Annotated[
        str, typer.Option("--format", help="table, csv or json (csv/json go to stdout)")
    ] = "table",
    tracking_uri: TrackingUri = None,
) -> None:
    """List pipeline executions side by side, newest first: config, best lambda, accuracies."""
    from pipeline import listing
    from pipeline.tracking.runs import DEFAULT_EXPERIMENT, list_pipeline_runs

    if format_ not in ("table", "csv", "json"):
        raise PipelineError(f"--format must be table, csv or json, got {format_!r}")
    name = experiment or DEFAULT_EXPERIMENT
    frame = list_pipeline_runs(name, tracking_uri=tracking_uri, last=last)
    if format_ != "table":
        if frame.empty:  # still valid (empty) output for scripts; the hint goes to stderr
            err.print(f"no pipeline runs in experiment {name!r} yet", markup=False)
        sys.stdout.write(listing.to_json(frame) if format_ == "json" else listing.to_csv(frame))
        return
    if frame.empty:
        out.print(
            f"no pipeline runs in experiment {name!r} yet: start one with "
            "`mlp-pipeline run --preset quick`",
            markup=False,
        )
        return
    rows = listing.table_rows(frame)
    shown = listing.columns_that_fit(rows, out.width)
    left_out = len(rows[0]) - len(shown)
    # No vertical rules and one space between columns: 14 columns in about 140 characters.
    table = Table(
        title=f"pipeline runs in {escape(repr(name))}, newest first (full run ids: --format csv "
        "or json)",
        caption=(
            f"{left_out} more column{'s' if left_out > 1 else ''} on a wider terminal, "
            "or with --format csv"
            if left_out
            else None
        ),
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
        pad_edge=False,
    )
    for column in shown:
        table.add_column(
            column,
            justify="right" if column in listing.NUMERIC_COLUMNS else "left",
            no_wrap=column in {"started", "status"},
        )
    for row in rows:
        style = {"FAILED": "red", "KILLED": "yellow", "RUNNING": "cyan"}.get(row["status"])
        table.add_row(*(row[column] for column in shown), style=style)
    out.print(table)


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
    from flows.server import check_api

    url = dep.require_api_url()
    cfg = dep.absolute_paths(config_from_options(preset, config, set_))
    served = dep.build_deployments(cfg, name=name, cron=cron, interval=interval)
    check_api(url)
    for deployment in served:
        schedule = ", ".join(dep.describe_schedule(s) for s in deployment.schedules)
        out.print(f"serving {dep.FLOW_NAME}/{deployment.name} ({schedule or 'on request'})",
                  highlight=False)  # fmt: skip
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
    from prefect.utilities.urls import url_for

    from flows import deployments as dep
    from flows.server import check_api

    overrides = parse_set_options(set_ or [])
    url = dep.require_api_url()
    check_api(url)
    name = dep.full_name(deployment)
    with get_client(sync_client=True) as client:
        found = dep.read_deployment(client, name)
        cfg = dep.deployment_config(found, overrides)
        flow_run = dep.create_run(client, found, cfg)
        out.print(f"flow run {flow_run.name} ({flow_run.id}) of {name}", highlight=False)
        if page := url_for("flow-run", obj_id=flow_run.id):
            out.print(f"Prefect UI: {page}", highlight=False)
        if not wait:
            return
        state = dep.follow_run(client, flow_run.id, _print_state, timeout=timeout)
    if dep.is_failure(state):
        message = " ".join((state.message or "").split())
        raise dep.FlowRunFailed(f"flow run {flow_run.name} ended {state.name}: {message}")
    outcome = dep.find_mlflow_run(cfg, flow_run.id)
    if "test_accuracy" in outcome.data.metrics:
        out.print(f"[bold]test accuracy {outcome.data.metrics['test_accuracy']:.4f}[/bold]")
    _print_published(dep.published_from(outcome, cfg))


def _print_state(state: Any) -> None:
    hint = ""
    if state.name == "Late":
        hint = " (nothing picked it up yet: is `mlp-pipeline serve` or a worker running?)"
    out.print(f"state: {state.name}{hint}", highlight=False)


# ----------------------------------------------------------------------------- data
@data_app.command("info")
def data_info(data_dir: DataDir = None) -> None:
    """Show which dataset files are found where."""
    from pipeline.data import dataset_status, resolve_data_dir

    root = resolve_data_dir(data_dir)
    table = _plain_table(f"datasets under {escape(str(root))}")
    table.add_column("dataset", no_wrap=True)
    table.add_column("file", overflow="fold")  # paths wrap whole, never cut to "…"
    table.add_column("layout", no_wrap=True)
    table.add_column("bytes", justify="right", no_wrap=True)
    for row in dataset_status(data_dir):
        where = (
            f"[red]missing[/red]: {row['file']}" + ("" if row["role"] == "torchvision" else "(.gz)")
            if row["path"] is None
            else _under(row["path"], root, row["layout"])
        )
        size = "-" if row["size"] is None else f"{row['size']:,}"
        table.add_row(row["dataset"], where, row["layout"] or "-", size)
    out.print(table)


@data_app.command("verify")
def data_verify(
    dataset: Annotated[
        str | None, typer.Option("--dataset", help="One dataset (default: every one found)")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Check dataset files against their canonical SHA-256 (exit 2 on any mismatch)."""
    from pipeline import torchvision_datasets as tv
    from pipeline.data import DATASET_NAMES, dataset_status, resolve_data_dir, verify_dataset

    if dataset is None:
        present = {row["dataset"] for row in dataset_status(data_dir) if row["path"]}
        # A torchvision folder is checked once (EMNIST's splits share one download).
        present |= {next(name for name, spec in tv.SPECS.items() if spec.class_name == folder)
                    for label, folder in tv.FOLDERS.items() if label in present}  # fmt: skip
        names = [name for name in DATASET_NAMES if name in present]
    else:
        names = [dataset]
    root = resolve_data_dir(data_dir)
    mismatches = []
    table = _plain_table("SHA-256 of the decompressed files (torchvision's: MD5 of its downloads)")
    table.add_column("file", overflow="fold")
    table.add_column("sha256", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for name in names:
        for row in verify_dataset(name, data_dir):
            shown = _under(row["file"], root)
            if not row["ok"]:
                mismatches.append((shown, row))
            # Abbreviated as git does; a mismatch gets both hashes whole below the table.
            status = "[green]ok[/green]" if row["ok"] else "[red]MISMATCH[/red]"
            table.add_row(shown, row["actual"][:16] + "…", status)
    out.print(table)
    for shown, row in mismatches:
        out.print(f"{shown}\n  expected {row['expected']}\n  actual   {row['actual']}")
    if mismatches:
        raise PipelineError(f"{len(mismatches)} file(s) do not match their canonical checksum")


def _plain_table(title: str) -> Table:
    return Table(title=title, box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)


def _under(path: str, root: Path, layout: str | None = None) -> str:
    """``path`` relative to ``root`` when it lies there (a bundled file: its name, the package's
    folder is long), escaped for Rich markup (a folder named ``[old]`` would otherwise vanish
    as a style tag)."""
    if layout == "bundled":
        return escape(Path(path).name)
    return escape(str(Path(path).relative_to(root)) if Path(path).is_relative_to(root) else path)


# ----------------------------------------------------------------------------- entry point
def _library_defaults() -> None:
    """Defaults for Prefect and MLflow, before they are imported; the environment wins.

    The progress bars and the summary tell the story: Prefect's console shows only what stops a
    run (its API and UI get the flow's log lines). A flow run's log tells what happened (the
    data, each fold's result, the choice, the test score), not "Finished in state Completed()"
    once per task run: task runs log their warnings and failures only (set
    PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL=INFO for all, Prefect's retry notices too).
    No telemetry from offline machines. MLflow's own log lines are off: its errors carry
    tracebacks (a full disk under the store), and the command reports every MLflow failure
    itself in one line. MLflow's HTTP retries are bounded, so a tracking server
    lost mid-run costs seconds, not minutes: the run record keeps the results, and
    ``mlp-pipeline publish`` sends them later.
    """
    for name, value in {
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL",
        "PREFECT_INTERNAL_LOGGING_LEVEL": "CRITICAL",
        "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL": "WARNING",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
        "MLFLOW_LOGGING_LEVEL": "CRITICAL",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    }.items():
        os.environ.setdefault(name, value)


class _ConsoleWarnings(logging.Handler):
    """``warning: <message>`` on stderr, above any progress bars, for WARNING and above."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        err.print(f"warning: {' '.join(record.getMessage().split())}", markup=False)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: run the app and turn every failure into an exit code."""
    debug = os.environ.get("MLP_PIPELINE_DEBUG", "") not in {"", "0"}
    _library_defaults()
    # A library's failed log handler (Prefect's, sending to a server that is gone) stays
    # silent instead of printing its own error: the command reports what went wrong.
    logging.raiseExceptions = debug
    # The pipeline's own warnings (a damaged fold-cache entry trained again) are the user's to
    # see; Prefect's console shows only what stops a run.
    pipeline_logger = logging.getLogger("pipeline")
    if not any(isinstance(h, _ConsoleWarnings) for h in pipeline_logger.handlers):
        pipeline_logger.addHandler(_ConsoleWarnings())
    # Registered first, so it runs last: Python's collections at exit would walk every object
    # Prefect and MLflow made, for nothing (benchmarks/README.md has the cost).
    atexit.register(gc.freeze)
    try:
        with interruptible() as interrupt:
            # Outside standalone mode, typer returns 130 for a KeyboardInterrupt.
            code = app(args=argv, standalone_mode=False, prog_name="mlp-pipeline")
        if code == 130:
            err.print("error: interrupted")
            code = interrupt.exit_code
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt) as exc:  # also a signal just outside the app
        err.print("error: interrupted")
        sys.exit(exit_code(getattr(exc, "signum", None)))
    except typer.TyperException as exc:  # an unknown option, a bad value, a missing argument
        if type(exc).__name__ == "NoArgsIsHelpError":
            sys.exit(0)  # the help was printed: asking for it is not an error
        message = " ".join(
            (exc.format_message() if hasattr(exc, "format_message") else str(exc)).split()
        )
        renamed = [
            f"{old} is now {new}" for old, new in RENAMED_FLAGS.items() if f": {old}" in message
        ]
        err.print(f"error: {message}" + (f" ({renamed[0]})" if renamed else ""), markup=False)
        sys.exit(2)
    except (PipelineError, MLPError) as exc:
        if debug:
            traceback.print_exc()
        err.print(f"error: {' '.join(str(exc).split())}", markup=False)
        sys.exit(getattr(exc, "exit_code", 2))
    except Exception as exc:  # noqa: BLE001 -- the last line of defence of a CLI
        if debug:
            traceback.print_exc()
        err.print(
            f"unexpected error: {type(exc).__name__}: {' '.join(str(exc).split())} "
            "(set MLP_PIPELINE_DEBUG=1 for a traceback)",
            markup=False,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
