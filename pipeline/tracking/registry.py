"""The model registry: a version per pipeline run, and the ``champion`` alias on the best one.

Accuracies are only compared on one test set (tag ``test_set``, a digest of its pixels and
labels). A champion scored on another one (another dataset, a ``limit_test`` subset) is scored on
this version's test set first, from its weights file, as MLflow's champion/challenger guide does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.tracking.model import MODEL_NAME, accuracy, load_network
from pipeline.tracking.store import one_line, store_lock

CHAMPION = "champion"


@dataclass(frozen=True)
class Registration:
    """A registered version, and whether it became the champion (and why, or why not)."""

    name: str
    version: str
    champion: bool
    note: str = ""


def register(
    client: Any,
    tracking_uri: str,
    name: str,
    run: Any,
    tags: dict[str, str],
    test_set: Callable[[], tuple[np.ndarray, np.ndarray] | None],
    description: str = "",
    model: Any = None,
) -> Registration:
    """Register the ``model`` of ``run`` (once) and give it the alias if it beats the champion.

    ``model``: the run's logged model (None: a model logged as the run's artifacts, before
    models were logged models). ``tags`` go on the version and must hold ``test_accuracy`` and
    ``test_set``; so does ``description``. ``test_set`` returns this version's test images and
    labels, for scoring a champion tested elsewhere (None when they cannot be loaded).
    """
    # One registration at a time per local store: choosing the champion reads the current one,
    # then moves the alias; two pipelines at once could both see no champion.
    with store_lock(tracking_uri):
        version = _version_of(client, name, run, model)
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        if description:
            client.update_model_version(name, version, description=description)
        champion, note = _challenge(client, tracking_uri, name, version, tags, test_set)
    return Registration(name, version, champion, note)


def _version_of(client: Any, name: str, run: Any, model: Any) -> str:
    """The version registered from ``run`` (its logged ``model``), created if there is none yet."""
    from mlflow.exceptions import MlflowException

    found = [v for v in client.search_model_versions(f"run_id = '{run.info.run_id}'")
             if v.name == name]  # fmt: skip
    if found:
        version = str(found[0].version)
    else:
        try:
            client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        if model is None:  # logged before models were logged models: the run's artifacts
            source, model_id = f"{run.info.artifact_uri}/{MODEL_NAME}", None
        else:  # where its files are: MLflow resolves a models:/ source on its global URI
            source, model_id = model.artifact_location, model.model_id
        version = str(client.create_model_version(name, source, run_id=run.info.run_id,
                                                  model_id=model_id).version)  # fmt: skip
    if model is not None:
        _link(client, model, name, version)
    return version


def _link(client: Any, model: Any, name: str, version: str) -> None:
    """List the version on its logged model's page, as ``mlflow.register_model`` does."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    versions = json.loads(model.tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    entry = {"name": name, "version": version}
    if entry not in versions:
        tags = {MLFLOW_MODEL_VERSIONS: json.dumps([*versions, entry])}
        client.set_logged_model_tags(model.model_id, tags)


def _challenge(client, tracking_uri, name, version, tags, test_set) -> tuple[bool, str]:
    ours = float(tags["test_accuracy"])
    if not math.isfinite(ours):
        return False, "not compared: its test accuracy is not finite"
    # Asked, not inferred from an error: a timeout or a locked store says nothing about it.
    if CHAMPION not in client.get_registered_model(name).aliases:
        client.set_registered_model_alias(name, CHAMPION, version)
        return True, ""
    current = client.get_model_version_by_alias(name, CHAMPION)
    if str(current.version) == version:  # an earlier publish moved the alias, then failed
        return True, current.tags.get("champion_comparison", "")
    recorded = _finite(current.tags.get("test_accuracy"))
    if current.tags.get("test_set") == tags["test_set"] and recorded is not None:
        theirs, measured = recorded, f"{recorded:.4f}"
    else:  # another test set, or a figure that is missing or was edited into nonsense
        try:
            images_labels = test_set()
            if images_labels is None:
                raise ValueError("this run's test set cannot be loaded here")
            uri = f"models:/{name}/{current.version}"
            network, normalizer, _ = load_network(uri, tracking_uri)
            theirs = accuracy(network, normalizer, *images_labels)
        except Exception as exc:  # noqa: BLE001 -- it stays champion, and the note says why
            note = (
                f"champion stays version {current.version}: it could not be scored on this "
                f"test set ({one_line(exc)})"
            )
            client.set_model_version_tag(name, version, "champion_comparison", note)
            return False, note
        measured = f"{theirs:.4f} on this test set"
    if math.isnan(theirs) or ours > theirs:
        champion, note = True, f"beats version {current.version}, {measured}"
    else:
        champion, note = False, f"champion stays version {current.version}, {measured}"
    # The note first, the alias last: a publish that fails in between compares again.
    client.set_model_version_tag(name, version, "champion_comparison", note)
    if champion:
        client.set_registered_model_alias(name, CHAMPION, version)
    return champion, note


def _finite(text: str | None) -> float | None:
    """A tag's finite number, or None."""
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
