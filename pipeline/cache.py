"""Cache keys for fold results, so a re-run skips the (lambda, fold) trainings already done."""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError

# Settings that cannot change a fold's result: where it runs and where it is recorded.
_IRRELEVANT_SECTIONS = ("execution", "tracking")


def package_version() -> str:
    try:
        return metadata.version("mlp-pipeline")
    except metadata.PackageNotFoundError:
        return "unknown"


def fold_cache_key(config: PipelineConfig, fingerprint: str, l2_lambda: float, fold: int) -> str:
    """A key from the dataset fingerprint, the result-relevant config, lambda, fold and seed.

    The CV grid (``cv.lambdas``) is left out: adding a lambda must not invalidate the folds of
    the others. The package version is in, so a new engine never reuses old results.
    """
    settings = config.model_dump(mode="json", exclude=set(_IRRELEVANT_SECTIONS))
    settings["cv"].pop("lambdas")
    settings["training"].pop("final_epochs")  # the final model's only; it is not cached
    # The fingerprint identifies the data; where the files live and how they came don't matter.
    settings["data"].pop("data_dir")
    settings["data"].pop("download")
    payload = {
        "dataset": fingerprint,
        "settings": settings,
        "l2_lambda": float(l2_lambda).hex(),
        "fold": fold,
        "version": package_version(),
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return f"fold-{digest[:32]}"


def check_cache_dir(cache_dir: str | Path) -> Path:
    """Check that the pipeline's own folder (``execution.cache_dir``) can be made and written.

    Prefect writes each fold's result there as it finishes; a folder it cannot use would only
    show as errors after the trainings, with nothing cached. Nothing is created here (a run
    that fails on bad input leaves no trace). Returns the absolute folder.

    Raises
    ------
    ConfigError
        One line when a file stands in the way or the folder is not writable.
    """
    folder = Path(cache_dir).resolve()  # as the fold task's result storage resolves it
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == folder else f" ({existing} is a file)"
        raise ConfigError(f"execution.cache_dir {cache_dir} is not a folder{where}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"execution.cache_dir {cache_dir} is not writable ({existing})")
    return folder
