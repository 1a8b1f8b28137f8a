"""The ``mlp-pipeline`` command line: the commands that need no Prefect.

``flows.cli`` adds the orchestrated ones (``run``, ``cv``, ...) to the same ``app``, so imports
keep pointing one way (flows -> pipeline -> mlp); the console script is ``flows.cli:main``.

Exit codes: 0 success, 2 bad input / config / data (one ``error:`` line, no traceback),
1 unexpected failure, 130 interrupted. Set ``MLP_PIPELINE_DEBUG=1`` to see tracebacks.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mlp import MLPError
from pipeline.config import PipelineConfig, parse_set_options, resolve_config
from pipeline.errors import PipelineError

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

# ----------------------------------------------------------------------------- shared options

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
    str | None, typer.Option("--dataset", help="mnist, fashion-mnist or mnist-sample")
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
Epochs = Annotated[int | None, typer.Option(help="Training epochs")]
BatchSize = Annotated[int | None, typer.Option("--batch-size", help="Mini-batch size")]
Seed = Annotated[int | None, typer.Option(help="Random seed")]
LimitTrain = Annotated[int | None, typer.Option("--limit-train", help="Training subset size")]
LimitTest = Annotated[int | None, typer.Option("--limit-test", help="Test subset size")]
TrackingUri = Annotated[
    str | None,
    typer.Option("--tracking-uri", help="MLflow URI (env MLFLOW_TRACKING_URI, sqlite in mlruns/)"),
]
Experiment = Annotated[str | None, typer.Option(help="MLflow experiment name")]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="Hide progress bars")]


def _overrides(**flags: Any) -> dict[str, Any]:
    """Map CLI flags to dotted config keys, skipping the ones not given."""
    keys = {
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
        "lambdas": "cv.lambdas",
        "folds": "cv.folds",
        "seed": "cv.seed",
        "runner": "execution.runner",
        "workers": "execution.workers",
        "dask_address": "execution.dask_address",
        "tracking_uri": "tracking.tracking_uri",
        "experiment": "tracking.experiment",
    }
    overrides: dict[str, Any] = {}
    for flag, value in flags.items():
        if value is None:
            continue
        if flag in {"hidden", "lambdas"}:
            value = _number_list(flag, value)
        overrides[keys[flag]] = value
    return overrides


def _number_list(flag: str, text: str) -> list[float]:
    parts = [part.strip() for part in text.split(",")]
    if not all(parts):
        setting = {"hidden": "model.hidden_sizes", "lambdas": "cv.lambdas"}[flag]
        raise PipelineError(f"--{flag} ({setting}) has an empty item: {text!r}")
    try:
        values = [float(part) for part in parts]
    except ValueError:
        raise PipelineError(f"--{flag} expects comma-separated numbers, got {text!r}") from None
    if flag == "hidden":
        if not all(math.isfinite(v) and v == int(v) for v in values):
            raise PipelineError(f"--hidden expects whole numbers, got {text!r}")
        return [int(v) for v in values]
    return values


def config_from_options(
    preset: str | None, config: Path | None, set_: list[str] | None, **flags: Any
) -> PipelineConfig:
    overrides = parse_set_options(set_ or [])
    overrides.update(_overrides(**flags))
    cfg = resolve_config(preset, config, overrides)
    from pipeline.tracking_uri import credentials_to_environment

    # Every command (run, serve, train...) builds its config here: secrets leave it here too.
    uri = cfg.tracking.tracking_uri
    safe_uri = credentials_to_environment(uri)
    return cfg if safe_uri == uri else cfg.replace({"tracking.tracking_uri": safe_uri})


# ----------------------------------------------------------------------------- train


@app.command()
def train(
    l2: Annotated[float, typer.Option("--l2", help="L2 strength lambda", min=0.0)] = 1e-4,
    preset: Preset = None,
    config: ConfigFile = None,
    set_: SetOption = None,
    dataset: Dataset = None,
    data_dir: DataDir = None,
    hidden: Hidden = None,
    activation: Activation = None,
    optimizer: Optimizer = None,
    lr: Lr = None,
    epochs: Epochs = None,
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
    from pipeline.training import load_configured_dataset

    cfg = config_from_options(
        preset, config, set_, dataset=dataset, data_dir=data_dir, hidden=hidden,
        activation=activation, optimizer=optimizer, lr=lr, final_epochs=epochs,
        batch_size=batch_size, seed=seed, limit_train=limit_train, limit_test=limit_test,
        tracking_uri=tracking_uri, experiment=experiment,
    )  # fmt: skip
    data = load_configured_dataset(cfg.data)
    if no_track:
        _train_and_evaluate(cfg, data, l2, no_progress)
        return
    from pipeline.tracking import PipelineRecorder

    # The parent run opens first (an unusable store fails before any training) and spans the
    # training, so its duration and an interruption's KILLED status are the training's.
    with sigterm_as_interrupt(), PipelineRecorder(cfg.tracking) as recorder:
        run_id = recorder.start(
            cfg, data.name, data.fingerprint, tags={"flow": "train"}, params={"l2_lambda": l2}
        )
        final, evaluation, predicted = _train_and_evaluate(cfg, data, l2, no_progress)
        record = recorder.log_final(
            final.network, final.normalizer, final.history, evaluation,
            data.X_test, data.y_test, predicted, l2_lambda=l2,
        )  # fmt: skip
    print_registration(
        record.registered_model, record.registered_version, record.champion, record.champion_note
    )
    out.print(f"MLflow run {run_id}")
    out.print(f"open the MLflow UI: {ui_command(recorder.tracking_uri)}", markup=False)


def _train_and_evaluate(cfg: PipelineConfig, data: Any, l2: float, no_progress: bool) -> Any:
    """Train the final model with ``l2`` on all training data; print and return its test score."""
    from pipeline.progress import epoch_bar
    from pipeline.training import predict_test, train_final

    epochs_total = cfg.training.resolved_final_epochs
    with epoch_bar(epochs_total, f"train λ={l2:g}", enabled=not no_progress) as on_epoch:
        final = train_final(cfg, data, l2, callback=on_epoch)
    evaluation, predicted = predict_test(final, data)
    out.print(
        f"test accuracy {evaluation.accuracy:.4f}  test loss {evaluation.loss:.4f}  "
        f"({data.name}, {evaluation.n_samples} test images, {final.seconds:.1f} s training)"
    )
    return final, evaluation, predicted


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt meanwhile, as Ctrl-C does.

    So a ``kill`` ends the MLflow runs KILLED (the recorder's exit handles the interrupt)
    instead of leaving them RUNNING, as Python's default (die at once) would.
    """

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def print_registration(
    name: str | None, version: str | None, champion: bool, note: str = ""
) -> None:
    """Print ``model NAME version N (new champion: ...)``; nothing if it was not registered."""
    if not name or version is None:
        return
    if champion:
        status = f"new champion: {note}" if note else "new champion"
    else:
        status = note or "not the champion"
    out.print(f"model {name} version {version} ({status})", markup=False)


def ui_command(tracking_uri: str) -> str:
    """The command that opens the MLflow UI on this store."""
    import shlex

    from pipeline.tracking_uri import redact_uri, sqlite_database

    if tracking_uri.startswith(("http://", "https://")):
        return redact_uri(tracking_uri)
    database = sqlite_database(tracking_uri)
    if database is not None and not database.is_absolute() and "?" not in tracking_uri:
        # Relative to this working directory: absolute, so it works from anywhere.
        tracking_uri = f"sqlite:///{database.resolve()}"
    return f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)} --host 127.0.0.1 --port 5000"


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
        typer.Option(
            "--dataset", help="mnist, fashion-mnist or mnist-sample (default: the model's own)"
        ),
    ] = None,
    data_dir: DataDir = None,
    limit_test: LimitTest = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Test accuracy of a logged or registered model (reads only the test files)."""
    import numpy as np

    from pipeline.data import load_test_set
    from pipeline.tracking import load_model_for_eval

    cfg = config_from_options(
        None, None, None, dataset=dataset, data_dir=data_dir, limit_test=limit_test
    )
    pyfunc = load_model_for_eval(model, tracking_uri=tracking_uri)
    if dataset is None and pyfunc.trained_on and pyfunc.trained_on != cfg.data.dataset:
        cfg = cfg.replace({"data.dataset": pyfunc.trained_on})
    X_test, y_test = load_test_set(
        cfg.data.dataset, cfg.data.data_dir, cfg.data.download, limit_test=cfg.data.limit_test
    )
    predicted = np.asarray(pyfunc.predict(X_test.astype(np.float32)))
    accuracy = float(np.mean(predicted == y_test))
    out.print(
        f"test accuracy {accuracy:.4f} ({cfg.data.dataset}, {y_test.size} test images, {model})",
        markup=False,
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
    from pipeline.runs import (
        DEFAULT_EXPERIMENT,
        columns_that_fit,
        list_pipeline_runs,
        table_rows,
        to_csv,
        to_json,
    )

    if format_ not in ("table", "csv", "json"):
        raise PipelineError(f"--format must be table, csv or json, got {format_!r}")
    name = experiment or DEFAULT_EXPERIMENT
    frame = list_pipeline_runs(name, tracking_uri=tracking_uri, last=last)
    if format_ != "table":
        if frame.empty:  # still valid (empty) output for scripts; the hint goes to stderr
            Console(stderr=True).print(f"no pipeline runs in experiment {name!r} yet", markup=False)
        sys.stdout.write(to_json(frame) if format_ == "json" else to_csv(frame))
        return
    if frame.empty:
        out.print(
            f"no pipeline runs in experiment {name!r} yet: start one with "
            "`mlp-pipeline run --preset quick`",
            markup=False,
        )
        return
    rows = table_rows(frame)
    shown = columns_that_fit(rows, out.width)
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
            justify="right" if column in _NUMERIC_COLUMNS else "left",
            no_wrap=column in {"started", "status"},
        )
    for row in rows:
        style = {"FAILED": "red", "KILLED": "yellow", "RUNNING": "cyan"}.get(row["status"])
        table.add_row(*(row[column] for column in shown), style=style)
    out.print(table)


_NUMERIC_COLUMNS = {"lr", "epochs", "folds", "best λ", "CV acc", "test acc", "took"}


# ----------------------------------------------------------------------------- data


@data_app.command("info")
def data_info(data_dir: DataDir = None) -> None:
    """Show which dataset files are found where."""
    from pipeline.data import dataset_status, resolve_data_dir

    root = resolve_data_dir(data_dir)
    table = Table(
        title=f"datasets under {escape(str(root))}",
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
        pad_edge=False,
    )
    table.add_column("dataset", no_wrap=True)
    # Paths are what a user copies: wrapped whole onto the next line, never cut to "…".
    table.add_column("file", overflow="fold")
    table.add_column("layout", no_wrap=True)
    table.add_column("bytes", justify="right", no_wrap=True)
    for row in dataset_status(data_dir):
        if row["path"] is None:
            where = f"[red]missing[/red]: {row['file']}(.gz)"
        else:
            where = _under(row["path"], root)
        table.add_row(
            row["dataset"],
            where,
            row["layout"] or "-",
            "-" if row["size"] is None else f"{row['size']:,}",
        )
    out.print(table)


@data_app.command("verify")
def data_verify(
    dataset: Annotated[
        str | None, typer.Option("--dataset", help="One dataset (default: every one found)")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Check dataset files against their canonical SHA-256 (exit 2 on any mismatch)."""
    from pipeline.data import DATASET_NAMES, dataset_status, resolve_data_dir, verify_dataset

    if dataset is None:
        present = {row["dataset"] for row in dataset_status(data_dir) if row["path"]}
        names = [name for name in DATASET_NAMES if name in present]
    else:
        names = [dataset]
    root = resolve_data_dir(data_dir)
    mismatches = []
    table = Table(
        title="SHA-256 of the decompressed files",
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
        pad_edge=False,
    )
    table.add_column("file", overflow="fold")
    table.add_column("sha256", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for name in names:
        for row in verify_dataset(name, data_dir):
            shown = _under(row["file"], root)
            if not row["ok"]:
                mismatches.append((shown, row))
            # Abbreviated as git does; a mismatch gets both hashes whole below the table.
            table.add_row(
                shown,
                row["actual"][:16] + "…",
                "[green]ok[/green]" if row["ok"] else "[red]MISMATCH[/red]",
            )
    out.print(table)
    for shown, row in mismatches:
        out.print(f"{shown}\n  expected {row['expected']}\n  actual   {row['actual']}")
    if mismatches:
        raise PipelineError(f"{len(mismatches)} file(s) do not match their canonical checksum")


def _under(path: str, root: Path) -> str:
    """``path`` relative to ``root`` when it lies there, else as given; escaped for Rich markup
    (a folder named ``[old]`` would otherwise vanish as a style tag)."""
    return escape(str(Path(path).relative_to(root)) if Path(path).is_relative_to(root) else path)


# ----------------------------------------------------------------------------- entry point


def _skip_collection_at_exit() -> None:
    """Exit without Python's last garbage collections over every object Prefect and MLflow made.

    Runs as the last exit handler, after every library's own: it only stops the collector from
    walking millions of live objects (measured here: 1.2-1.5 s after a pipeline run, 0.07 s
    with this). Nothing is skipped that Python promises to run at exit.
    """
    import gc

    gc.freeze()


_exit_hook_installed = False


def _install_exit_hook() -> None:
    global _exit_hook_installed
    if not _exit_hook_installed:
        import atexit

        # Exit handlers run last-registered first: this one, registered before any library
        # registers its own, runs after all of them.
        atexit.register(_skip_collection_at_exit)
        _exit_hook_installed = True


def _quiet_libraries() -> None:
    """Progress bars and the summary table tell the story; library chatter goes to warnings.

    Prefect still sends every log line to its API (the UI shows them); only its console handler
    is raised to WARNING. Both can be overridden from the environment.
    """
    import logging

    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if "MLFLOW_LOGGING_LEVEL" not in os.environ:
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        os.environ["MLFLOW_LOGGING_LEVEL"] = "WARNING"


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _exception_types(name: str) -> tuple[type[BaseException], ...]:
    """``name`` from click and from the copy of click that recent typer releases vendor."""
    import importlib

    found = []
    for module in ("click.exceptions", "typer._click.exceptions", "typer.exceptions", "typer"):
        try:
            candidate = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if isinstance(candidate, type) and candidate not in found:
            found.append(candidate)
    return tuple(found)


_EXIT = _exception_types("Exit")
_ABORT = _exception_types("Abort")
_USAGE_ERRORS = _exception_types("ClickException")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: run the app and turn every failure into an exit code."""
    debug = os.environ.get("MLP_PIPELINE_DEBUG", "") not in {"", "0"}
    _install_exit_hook()
    _quiet_libraries()
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        # Outside standalone mode, typer turns Ctrl-C / SIGTERM into a returned exit code (130).
        code = app(args=argv, standalone_mode=False, prog_name="mlp-pipeline")
        if isinstance(code, int) and code != 0:
            if code == 130:
                err.print("error: interrupted")
            sys.exit(code)
    except _EXIT as exc:
        sys.exit(exc.exit_code)
    except _ABORT:
        err.print("error: interrupted")
        sys.exit(130)
    except _USAGE_ERRORS as exc:  # unknown option, bad value, missing argument
        if type(exc).__name__ == "NoArgsIsHelpError":
            sys.exit(0)  # the help was printed: asking for it is not an error
        err.print(f"error: {_one_line(exc.format_message())}", markup=False)
        sys.exit(2)
    except (PipelineError, MLPError) as exc:
        if debug:
            raise
        err.print(f"error: {_one_line(str(exc))}", markup=False)
        sys.exit(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        err.print("error: interrupted")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 -- the last line of defence of a CLI
        if debug:
            raise
        err.print(
            f"unexpected error: {type(exc).__name__}: {exc} "
            "(set MLP_PIPELINE_DEBUG=1 for a traceback)",
            markup=False,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
