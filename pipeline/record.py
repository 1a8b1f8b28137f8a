"""The run record: each execution's results as plain files, the source of truth MLflow mirrors.

One folder per execution under ``<execution.cache_dir>/runs/``, written only by the flow process::

    run.json                 what ran: flow, config, dataset, Prefect flow run, status, summary
    folds/lambda=<l2>[-<candidate id>]-fold=<k>.json   one FoldResult per (candidate, fold)
    started/<the same name>  when that training started (MLflow shows its run from then)
    cv.json                  the CV table and the chosen candidate
    final-progress.json      the final model's history so far, while it trains
    final.json               the final model: history, test evaluation, checksums of its files
    final/weights.npz, final/normalizer.json
    *.png                    the figures

and the fold cache, shared by executions: ``<execution.cache_dir>/folds/<key>.json``, keyed by
the dataset fingerprint, the candidate's result-relevant config, the fold and the seed.

Every file is written atomically (a temporary file, then a rename). JSON files are envelopes
carrying the SHA-256 of their content; binary files are listed with theirs in the JSON written
after them. Nothing is pickled. A file whose checksum does not match is reported and never
trusted: a corrupt fold-cache entry is trained again. The checksums detect damage and careless
edits; they do not authenticate (someone who can write the folder can rewrite them too), so
every field read back is also checked for its type and range (a resealed file holding the
string "0.99" or a NaN where a number belongs is refused like a damaged one). Only regular
files are read (a FIFO would block the reader), and a write that fails (a full disk, a
read-only folder) is one :class:`RecordError` naming the file, with nothing partial left.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import logging
import math
import os
import re
import secrets
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError, PipelineError
from pipeline.idx import open_regular_file
from pipeline.results import Evaluation, FoldResult

logger = logging.getLogger(__name__)

RUNS = "runs"
FOLD_CACHE = "folds"
FORMAT = 1  # bumped when a file's layout changes: older files are then not trusted
STATUSES = ("RUNNING", "FINISHED", "FAILED", "KILLED")  # MLflow's run statuses


class RecordError(PipelineError):
    """A record file is missing, unreadable, or does not match its checksum."""


# ------------------------------------------------------------------------------------ files
@contextlib.contextmanager
def _writing(path: Path, *, exact: bool = False) -> Iterator[None]:
    """An ``OSError`` in the block (a full disk, a read-only folder) as one :class:`RecordError`.

    It names ``path`` (if ``exact``; else the file the error names, if any) and the reason.
    """
    try:
        yield
    except OSError as exc:
        named = exc.filename if isinstance(exc.filename, str) and not exact else path
        raise RecordError(f"cannot write {named}: {exc.strerror or exc}") from None


def write_bytes(path: Path, content: bytes) -> None:
    """Write ``content`` to ``path`` atomically: readers see the old file or the new one.

    Raises
    ------
    RecordError
        The folder cannot be made or written, or the disk is full: ``"cannot write <path>:
        <reason>"``. The old file, if any, is kept and no temporary file is left.
    """
    with _writing(path, exact=True):  # not the temporary's name: it means nothing to a user
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(content)
            os.replace(partial, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
            raise


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def write_json(path: Path, kind: str, data: Any) -> None:
    """Write ``data`` in an envelope naming its ``kind`` and carrying its SHA-256."""
    envelope = {
        "kind": kind,
        "format": FORMAT,
        "sha256": hashlib.sha256(_canonical(data)).hexdigest(),
        "data": data,
    }
    write_bytes(path, (json.dumps(envelope, indent=1) + "\n").encode())


def read_json(path: Path, kind: str) -> Any:
    """The data of an envelope written by :func:`write_json`, checked.

    Raises
    ------
    RecordError
        The file is missing or unreadable, not of this ``kind`` and format, or its checksum
        does not match its content.
    """
    try:
        with open_regular_file(path, RecordError, "unreadable record file") as handle:
            envelope = json.loads(handle.read())
        found = (envelope["kind"], envelope["format"])
        data, checksum = envelope["data"], envelope["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RecordError(f"{path}: unreadable record file ({exc})") from None
    if found != (kind, FORMAT):
        raise RecordError(f"{path}: a {found[0]!r} file of format {found[1]}, not {kind!r}")
    if hashlib.sha256(_canonical(data)).hexdigest() != checksum:
        raise RecordError(f"{path}: content does not match its checksum (edited or damaged)")
    return data


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open_regular_file(path, RecordError, "cannot read the record file") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_files(folder: Path, checksums: dict[str, str]) -> None:
    """Raise :class:`RecordError` unless every listed file has its recorded SHA-256."""
    for name, expected in checksums.items():
        path = folder / name
        if not path.is_file() or file_sha256(path) != expected:
            raise RecordError(f"{path}: missing or does not match its checksum")


def check_cache_dir(cache_dir: str | Path) -> Path:
    """Check that ``execution.cache_dir`` can be made and written; returns it absolute.

    Nothing is created here, so a run that fails on bad input leaves no trace.

    Raises
    ------
    ConfigError
        One line when a file stands in the way or the folder is not writable.
    """
    folder = Path(cache_dir).resolve()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == folder else f" ({existing} is a file)"
        raise ConfigError(f"execution.cache_dir {cache_dir} is not a folder{where}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"execution.cache_dir {cache_dir} is not writable ({existing})")
    return folder


def package_version() -> str:
    try:
        return metadata.version("mlp-pipeline")
    except metadata.PackageNotFoundError:
        return "unknown"


def git_commit() -> str | None:
    """The commit of the code that runs, when it is a git checkout that tracks this file."""
    here = Path(__file__).resolve()

    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                                  check=False, cwd=here.parent)  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    return git("rev-parse", "HEAD") or None if git("ls-files", here.name) else None


# ------------------------------------------------------------------------------ fold cache
def fold_key(
    config: PipelineConfig,
    fingerprint: str,
    candidate: dict[str, Any],
    fold: int,
    budget: int | None = None,
) -> str:
    """A key from the dataset fingerprint, the candidate's result-relevant config, fold and seed.

    Left out: where the run happens and is recorded (``execution``, ``tracking``), the search
    and the choice (adding a candidate keeps the others' folds), the final model's epochs, and
    where the data files live. The candidate's searched settings besides lambda are in (they
    seed its trainings), and ``budget``, the epochs of a halving rung below
    ``training.epochs``. A search over lambda alone keeps the keys it always had. The package
    version is in: a new engine never reuses old results.
    """
    from pipeline.search import L2_KEY, candidate_config, other_settings

    resolved = candidate_config(config, candidate)
    # Augmentation off leaves the section out: keys from before it existed stay valid.
    unused = set() if resolved.augment.enabled else {"augment"}
    settings = resolved.model_dump(
        mode="json", exclude={"execution", "tracking", "search", *unused}
    )
    for section, key in (
        ("cv", "l2_lambdas"),
        ("cv", "selection"),
        ("training", "final_epochs"),
        ("training", "l2_lambda"),
        ("data", "data_dir"),
        ("data", "download"),
    ):
        settings[section].pop(key)  # fmt: skip
    payload: dict[str, Any] = {
        "dataset": fingerprint,
        "settings": settings,
        "l2_lambda": float(candidate[L2_KEY]).hex(),
        "fold": fold,
        "version": package_version(),
    }
    if searched := other_settings(candidate):
        payload["searched"] = searched
    if budget is not None and budget < resolved.training.epochs:
        payload["budget"] = budget
    return "fold-" + hashlib.sha256(_canonical(payload)).hexdigest()[:32]


def _fold_from(data: Any, path: Path) -> FoldResult:
    """A :class:`FoldResult` from a fold file's data, every field checked (:func:`_checked`)."""
    diverged = isinstance(data, dict) and data.get("diverged") is True
    fields = {**_FOLD_FIELDS, **(_DIVERGED_METRICS if diverged else _METRICS)}
    # settings and budget: fold files written before searches over more than lambda lack them.
    checked = _checked(data, path, "a fold result", fields, exact=True,
                       optional=("settings", "budget"))  # fmt: skip
    return FoldResult(**checked)


class FoldCache:
    """Finished fold results of every execution, by :func:`fold_key`."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.folder = Path(cache_dir).resolve() / FOLD_CACHE

    def get(self, key: str) -> FoldResult | None:
        """The cached result, or None (absent, or damaged: then it is trained again)."""
        path = self.folder / f"{key}.json"
        if not path.exists():
            return None
        try:
            return _fold_from(read_json(path, "fold"), path)
        except RecordError as exc:
            logger.warning("fold cache entry not used, trained again: %s", exc)
            return None

    def put(self, key: str, result: FoldResult) -> None:
        write_json(self.folder / f"{key}.json", "fold", asdict(result))


# ------------------------------------------------------------------------------ run record
def fold_file(result: FoldResult) -> str:
    """``lambda=<l2>-fold=<k>.json``; a candidate with other searched settings adds their id."""
    return _fold_name(result.candidate, result.fold)


def _fold_name(candidate: dict[str, Any], fold: int) -> str:
    from pipeline.search import L2_KEY, candidate_id

    name = f"lambda={float(candidate[L2_KEY])!r}"  # repr: exact, unique
    if len(candidate) > 1:
        name += f"-{candidate_id(candidate)}"
    return f"{name}-fold={fold}.json"


def _user() -> str:
    """Who runs this process (MLflow's ``mlflow.user``); "" when the system cannot say."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no LOGNAME/USER (some containers)
        return ""


def _now_ms() -> int:
    return int(time.time() * 1000)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this host)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


class RunRecord:
    """The record of one execution (see the module docstring for its files)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).resolve()

    # -- writing ------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        config: PipelineConfig,
        *,
        flow: str,
        dataset: dict[str, str],
        prefect_flow_run: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
    ) -> RunRecord:
        """A new record under ``<execution.cache_dir>/runs/``, status RUNNING.

        The record keeps ``config`` without the credentials of any URI in it.
        ``dataset`` holds the dataset's ``name`` and ``fingerprint``; ``params`` are settings
        outside the config (``train``'s L2 strength).
        """
        started = _now_ms()
        stamp = datetime.fromtimestamp(started / 1000, UTC).strftime("%Y%m%dT%H%M%SZ")
        root = Path(config.execution.cache_dir).resolve() / RUNS
        record = cls(root / f"{stamp}-{secrets.token_hex(4)}")
        # The content first, then the folder: a signal during the git calls (the slow part)
        # leaves no record folder without its run.json.
        run = {
            "id": record.folder.name,
            "flow": flow,
            "config": config.redacted(),
            "dataset": dataset,
            "prefect_flow_run": prefect_flow_run or {},
            "params": params or {},
            "package_version": package_version(),
            "git_commit": git_commit(),
            "host": socket.gethostname(),
            "user": _user(),
            "pid": os.getpid(),
            "start_time": started,
            "end_time": None,
            "status": "RUNNING",
            "error": "",
            "summary": {},
        }
        with _writing(record.folder):
            record.folder.mkdir(parents=True)
        record._write_run(run)
        return record

    def _write_run(self, run: dict[str, Any]) -> None:
        write_json(self.folder / "run.json", "run", run)

    def add_fold_start(self, candidate: dict[str, Any], fold: int, start_time: int) -> None:
        """When a (candidate, fold) training started, in epoch milliseconds; the first start
        counts (a halving survivor's later rungs continue the same training)."""
        from pipeline.search import L2_KEY, other_settings

        path = self.folder / "started" / _fold_name(candidate, fold)
        if not path.exists():
            start = {"l2_lambda": float(candidate[L2_KEY]), "settings": other_settings(candidate),
                     "fold": fold, "start_time": start_time}  # fmt: skip
            write_json(path, "fold-start", start)

    def add_fold(self, result: FoldResult) -> None:
        write_json(self.folder / "folds" / fold_file(result), "fold", asdict(result))

    def add_cv(self, table: pd.DataFrame, best: dict[str, Any]) -> None:
        """The CV table and the chosen candidate, with their figure."""
        # matplotlib loads where figures are drawn, not at import: process-pool workers import
        # this module with the flow they unpickle, and never draw.
        from pipeline import plots
        from pipeline.search import L2_KEY

        with _writing(self.folder / "cv_lambda.png"):
            figure = plots.plot_cv_search(table, best, self.folder / "cv_lambda.png")
        write_json(
            self.folder / "cv.json",
            "cv",
            {
                "table": table.to_dict(orient="records"),
                "best_l2_lambda": best[L2_KEY],
                "best": best,
                "time": _now_ms(),
                "files": {figure.name: file_sha256(figure)},
            },
        )

    def add_final_progress(self, candidate: dict[str, Any], epochs: list[dict[str, Any]]) -> None:
        """The final model's epochs so far (``fit``'s per-epoch records, with their wall time),
        while it trains: MLflow shows its curves live. ``final.json`` supersedes it."""
        from pipeline.search import L2_KEY, other_settings

        history = {key: [float(e.get(key, math.nan)) for e in epochs] for key in epochs[0]}
        write_json(
            self.folder / "final-progress.json",
            "final-progress",
            {
                "l2_lambda": float(candidate[L2_KEY]),
                "settings": other_settings(dict(candidate)),
                "history": history,
            },
        )

    def add_final(
        self,
        final: Any,
        evaluation: Evaluation,
        test_images: np.ndarray,
        test_labels: np.ndarray,
        predicted: np.ndarray,
        test_set: str,
        class_names: Sequence[str] | None = None,
    ) -> None:
        """The final model (weights, normalizer), its test evaluation and figures.

        ``final`` is a :class:`pipeline.training.FinalModel`; ``test_images`` are raw pixels,
        shape (n_test, 784); ``test_set`` the fingerprint of the test set it was scored on;
        ``class_names`` label the figures.
        """
        from pipeline import plots

        with _writing(self.folder / "final"):  # the files written by other modules
            (self.folder / "final").mkdir(exist_ok=True)
            files = [
                final.network.save(self.folder / "final" / "weights.npz"),
                self.folder / "final" / "normalizer.json",
            ]
            write_bytes(files[1], json.dumps(final.normalizer.to_dict()).encode())
            files += [
                plots.plot_training_curves(
                    final.history, self.folder / "training_curves.png", self._chosen_curves()
                ),
                plots.plot_confusion_matrix(
                    evaluation.confusion, self.folder / "confusion_matrix.png", class_names
                ),
                plots.plot_misclassified(
                    test_images,
                    test_labels,
                    predicted,
                    self.folder / "misclassified.png",
                    class_names=class_names,
                ),
            ]
        write_json(
            self.folder / "final.json",
            "final",
            {
                "l2_lambda": final.l2_lambda,
                "settings": final.settings,
                "history": final.history,
                "seconds": final.seconds,
                "evaluation": asdict(evaluation),
                "test_set": test_set,
                "time": _now_ms(),
                # A few raw test images: the logged model's input example.
                "input_example": np.asarray(test_images[:5]).tolist(),
                "files": {str(path.relative_to(self.folder)): file_sha256(path) for path in files},
            },
        )
        (self.folder / "final-progress.json").unlink(missing_ok=True)  # superseded

    def _chosen_curves(self) -> dict[str, list[float]] | None:
        """The chosen candidate's mean validation curves over its folds (None without CV)."""
        from pipeline.search import candidate_id
        from pipeline.selection import mean_curves

        cv = self.cv()
        if cv is None:
            return None
        chosen = candidate_id(cv["best"])
        return mean_curves(f for f in self.folds() if candidate_id(f.candidate) == chosen)

    def finish(self, status: str, *, error: str = "", summary: dict[str, Any] | None = None):
        """Mark the execution ended: FINISHED, FAILED or KILLED (with ``error``)."""
        if status not in STATUSES[1:]:
            raise ValueError(f"status must be one of {STATUSES[1:]}, got {status!r}")
        run = self.run()
        run.update(status=status, end_time=_now_ms(), error=error[:5000])
        run["summary"].update(summary or {})
        self._write_run(run)

    @contextlib.contextmanager
    def running(self) -> Iterator[RunRecord]:
        """Mark the record FAILED (an error) or KILLED (an interruption) if the block raises."""
        try:
            yield self
        except BaseException as exc:
            killed = not isinstance(exc, Exception)  # KeyboardInterrupt, SystemExit
            message = f"interrupted ({type(exc).__name__})" if killed else _one_line(exc)
            with contextlib.suppress(Exception):  # the original exception matters more
                if self.run()["status"] == "RUNNING":
                    self.finish("KILLED" if killed else "FAILED", error=message)
            raise

    # -- reading ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """``run.json``, checked; a RUNNING record whose process is gone reads as FAILED."""
        path = self.folder / "run.json"
        # git_commit, user: older records lack them.
        run = _checked(read_json(path, "run"), path, "a run record", _RUN_FIELDS,
                       optional=("git_commit", "user"))  # fmt: skip
        try:
            PipelineConfig.model_validate(run["config"])
        except ValueError as exc:  # ValidationError is a ValueError
            raise RecordError(f"{path}: not a run record ({' '.join(str(exc).split())})") from None
        if run["status"] not in STATUSES:
            raise RecordError(f"{path}: unknown status {run['status']!r}")
        if not re.fullmatch(r"[\w.=-]+", run["id"]):
            raise RecordError(f"{path}: not a record id: {run['id']!r}")
        if (
            run["status"] == "RUNNING"
            and run["host"] == socket.gethostname()
            and not pid_alive(run["pid"])
        ):
            run.update(status="FAILED", error="the process ended without closing the run")
        return run

    def folds(self) -> list[FoldResult]:
        """Every recorded fold result, by (lambda, the other searched values, fold)."""
        paths = sorted((self.folder / "folds").glob("*.json"))
        results = [_fold_from(read_json(path, "fold"), path) for path in paths]
        return sorted(results, key=lambda r: (r.l2_lambda, _canonical(r.settings), r.fold))

    def fold_starts(self) -> list[dict[str, Any]]:
        """Every recorded training start: ``l2_lambda``, ``settings``, ``fold``, ``start_time``."""
        paths = sorted((self.folder / "started").glob("*.json"))
        return [_checked(read_json(path, "fold-start"), path, "a training start", _START_FIELDS,
                         exact=True) for path in paths]  # fmt: skip

    def cv(self) -> dict[str, Any] | None:
        """``cv.json`` once recorded, its figure checked.

        Its ``table`` as a DataFrame, ``best`` the chosen candidate, ``chosen_row`` its row.
        """
        path = self.folder / "cv.json"
        if not path.exists():
            return None
        from pipeline.search import L2_KEY, candidate_id

        cv = _checked(read_json(path, "cv"), path, "a CV record", _CV_FIELDS, optional=("best",))
        cv.setdefault("best", {L2_KEY: cv["best_l2_lambda"]})  # records of lambda-only searches
        chosen = cv["best"]
        rows = [
            row
            for row in cv["table"]
            if row.get("candidate", candidate_id(chosen)) == candidate_id(chosen)
            and row["l2_lambda"] == chosen.get(L2_KEY) == cv["best_l2_lambda"]
        ]
        if not rows or not _real(0, 1)(rows[0].get("mean_val_accuracy")):
            raise RecordError(
                f"{path}: not a CV record (the chosen candidate {chosen!r} has no valid table row)"
            )
        check_files(self.folder, cv["files"])
        return {**cv, "table": pd.DataFrame(cv["table"]), "chosen_row": rows[0]}

    def final_progress(self) -> dict[str, Any] | None:
        """``final-progress.json`` while the final model trains (None before its first epoch)."""
        path = self.folder / "final-progress.json"
        if not path.exists():
            return None
        return _checked(read_json(path, "final-progress"), path, "a final-model progress record",
                        _PROGRESS_FIELDS, exact=True)  # fmt: skip

    def final(self) -> dict[str, Any] | None:
        """``final.json`` once the final model is recorded, its files checked."""
        path = self.folder / "final.json"
        if not path.exists():
            return None
        final = _checked(read_json(path, "final"), path, "a final-model record", _FINAL_FIELDS,
                         optional=("settings",))  # fmt: skip
        final.setdefault("settings", {})
        evaluation = _checked(final["evaluation"], path, "a test evaluation", _EVALUATION_FIELDS)
        if sum(map(sum, evaluation["confusion"])) != evaluation["n_samples"]:
            n = evaluation["n_samples"]
            raise RecordError(
                f"{path}: not a test evaluation (its confusion matrix does not count {n} samples)"
            )
        check_files(self.folder, final["files"])
        return final


# ---------------------------------------------------------------------------- field checks
# What each field read back must hold. The checksum only says a file is as written; these say
# it is what this code writes, so a resealed file with a string, a NaN, an infinity or a
# negative count where a number belongs fails here, naming the file, not later in a format
# string or a comparison far from it.
Check = Callable[[Any], bool]


def _number(value: Any) -> bool:
    """A JSON number: int or float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _real(low: float = -math.inf, high: float = math.inf, *, nan: bool = False) -> Check:
    """A finite number in [low, high] (NaN too if ``nan``: a diverged training's metrics)."""

    def check(value: Any) -> bool:
        if not _number(value):
            return False
        if math.isnan(value):
            return nan
        return math.isfinite(value) and low <= value <= high

    return check


def _count(low: int = 0) -> Check:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _type(kind: type) -> Check:
    return lambda v: type(v) is kind


def _list_of(check: Check) -> Check:
    return lambda v: isinstance(v, list) and all(map(check, v))


def _series(value: Any) -> bool:
    """Per-epoch values: numbers, NaN allowed (a metric an epoch did not compute)."""
    return isinstance(value, list) and all(map(_number, value))


def _history(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and _series(v) for k, v in value.items()
    )


def _files(value: Any) -> bool:
    """File name -> SHA-256, names relative to the record folder and inside it."""

    def inside(name: str) -> bool:
        parts = PurePosixPath(name).parts
        return bool(parts) and not PurePosixPath(name).is_absolute() and ".." not in parts

    return isinstance(value, dict) and all(
        isinstance(k, str) and inside(k) and isinstance(v, str) and len(v) == 64
        for k, v in value.items()
    )


def _setting(value: Any) -> bool:
    """A searched setting's value: a number, a string, a bool or a list of numbers."""
    return isinstance(value, str | bool) or _number(value) or _list_of(_number)(value)


def _settings(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and "." in k and _setting(v) for k, v in value.items()
    )


def _row(value: Any) -> bool:
    """A CV table row: numbers (NaN for a candidate without valid folds), a finite lambda, its
    id and searched settings (dotted keys)."""
    return (
        isinstance(value, dict)
        and all(
            isinstance(k, str) and (_setting(v) if "." in k or k == "candidate" else _number(v))
            for k, v in value.items()
        )
        and _real(0)(value.get("l2_lambda"))
    )


def _optional(check: Check) -> Check:
    return lambda v: v is None or check(v)


def _summary(value: Any) -> bool:
    return isinstance(value, dict) and _real(0)(value.get("wall_seconds", 0))


# run.json: the config is validated as one, by PipelineConfig.
_RUN_FIELDS: dict[str, Check] = {
    "id": _type(str), "flow": _type(str), "config": _type(dict), "dataset": _type(dict),
    "prefect_flow_run": _type(dict), "params": _type(dict), "package_version": _type(str),
    "git_commit": _optional(_type(str)), "host": _type(str), "user": _type(str), "pid": _count(1),
    "start_time": _count(), "end_time": _optional(_count()), "status": _type(str),
    "error": _type(str), "summary": _summary,
}  # fmt: skip
_FOLD_FIELDS: dict[str, Check] = {
    "l2_lambda": _real(0), "fold": _count(), "seed": _count(), "epochs": _count(),
    "seconds": _real(0), "history": _history, "diverged": _type(bool), "message": _type(str),
    "settings": _settings, "budget": _optional(_count(1)),
}  # fmt: skip
_METRICS: dict[str, Check] = {
    "val_accuracy": _real(0, 1), "val_loss": _real(0),
    "train_accuracy": _real(0, 1), "train_loss": _real(0),
}  # fmt: skip
_DIVERGED_METRICS = {
    "val_accuracy": _real(0, 1, nan=True), "val_loss": _real(0, nan=True),
    "train_accuracy": _real(0, 1, nan=True), "train_loss": _real(0, nan=True),
}  # fmt: skip
_CV_FIELDS: dict[str, Check] = {
    "table": lambda v: _list_of(_row)(v) and len(v) > 0, "best_l2_lambda": _real(0),
    "best": _settings, "time": _count(), "files": _files,
}  # fmt: skip
_FINAL_FIELDS: dict[str, Check] = {
    "l2_lambda": _real(0), "settings": _settings, "history": lambda v: _history(v) and "epoch" in v,
    "seconds": _real(0), "evaluation": _type(dict), "test_set": _type(str), "time": _count(),
    "files": _files, "input_example": _list_of(_list_of(_real())),
}  # fmt: skip
_START_FIELDS: dict[str, Check] = {
    "l2_lambda": _real(0), "settings": _settings, "fold": _count(), "start_time": _count(),
}  # fmt: skip
_PROGRESS_FIELDS: dict[str, Check] = {
    "l2_lambda": _real(0), "settings": _settings,
    "history": lambda v: _history(v) and "epoch" in v and "wall_time" in v and "seconds" in v,
}  # fmt: skip
_EVALUATION_FIELDS: dict[str, Check] = {
    "accuracy": _real(0, 1), "loss": _real(0), "n_samples": _count(1),
    "confusion": _list_of(_list_of(_count())),
}  # fmt: skip


def _checked(
    data: Any,
    path: Path,
    what: str,
    fields: dict[str, Check],
    *,
    exact: bool = False,
    optional: tuple[str, ...] = (),
) -> Any:
    """``data`` if it is a mapping whose ``fields`` pass their checks, else one RecordError.

    ``exact``: no other key either (the data is passed whole to a constructor); ``optional``:
    fields that may be absent (checked when present).
    """
    if not isinstance(data, dict):
        raise RecordError(f"{path}: not {what} (a {type(data).__name__}, not a mapping)")
    problems = []
    if missing := [key for key in fields if key not in data and key not in optional]:
        problems.append(f"missing {', '.join(missing)}")
    if exact and (unknown := [key for key in data if key not in fields]):
        problems.append(f"unknown {', '.join(map(repr, unknown))}")
    if wrong := [key for key, ok in fields.items() if key in data and not ok(data[key])]:
        problems.append("invalid " + ", ".join(f"{key}={_short(data[key])}" for key in wrong))
    if problems:
        raise RecordError(f"{path}: not {what} ({'; '.join(problems)})")
    return data


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]
