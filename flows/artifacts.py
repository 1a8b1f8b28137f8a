"""What a flow run shows in the Prefect UI's Artifacts tab (Prefect's ``prefect.artifacts``).

A progress artifact that moves as the sweep's trainings finish, the CV table, and a markdown
summary: the chosen candidate, the test accuracy, the model version and where the MLflow run is.
An artifact that cannot be made is a warning in the flow's log, never a failed run: the results
are already in the run record and MLflow. Once the API did not answer (a transport error or a
timeout, after Prefect's own retries), none is tried again.
"""

from __future__ import annotations

import math
from typing import Any

import httpx
from prefect import get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from pipeline.search import L2_KEY, candidate_id, label
from pipeline.selection import candidate_of


class FlowArtifacts:
    """The artifacts of one flow run. Once the Prefect API did not answer (its server gone, or
    hung: a transport error or a timeout), the rest are skipped, with one warning: each would
    cost seconds of Prefect's client retries, for decoration. An artifact the server refuses
    (an HTTP error status) is skipped alone."""

    def __init__(self) -> None:
        self.api_lost = False
        self.progress_id: Any = None
        self.total = self.done = 0

    def _quietly(self, make: Any, *args: Any, **kwargs: Any) -> Any:
        if self.api_lost:
            return None
        try:
            return make(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 -- decoration: the results are recorded elsewhere
            self.api_lost = isinstance(exc, httpx.TransportError)
            skipped = "; no other artifact is tried in this run" if self.api_lost else ""
            reason = " ".join(str(exc).split()) or type(exc).__name__
            get_run_logger().warning("Prefect artifact not made: %s%s", reason, skipped)
            return None

    def sweep_started(self, total: int) -> None:
        """The ``cv-progress`` artifact: the share of the sweep's trainings done, in percent."""
        self.total, self.done = max(total, 1), 0
        description = f"cross-validation: {total} trainings"
        self.progress_id = self._quietly(
            create_progress_artifact, 0.0, key="cv-progress", description=description
        )

    def training_finished(self) -> None:
        self.done += 1
        if self.progress_id is not None:
            percent = 100.0 * self.done / self.total
            self._quietly(update_progress_artifact, self.progress_id, percent)

    def cv_table(self, table: Any, description: str) -> None:
        """The CV table (``cv-table``): one row per candidate, JSON-safe values (NaN as empty)."""
        per_fold = ("val_accuracy_fold", "val_loss_fold")  # in the MLflow run's cv_results.csv
        rows = [
            {key: _cell(value) for key, value in row.items() if not key.startswith(per_fold)}
            for row in table.to_dict(orient="records")
        ]
        self._quietly(create_table_artifact, rows, key="cv-table", description=description)

    def run_summary(
        self, summary: dict[str, Any], flow: str, dataset: str, ui_command: str
    ) -> None:
        """The run in a few lines (``run-summary``): what was chosen, its score, where it is."""
        markdown = _summary_markdown(summary, flow, dataset, ui_command)
        about = f"{flow} on {dataset}"
        self._quietly(create_markdown_artifact, markdown, key="run-summary", description=about)


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 6)
    if isinstance(value, list):
        return "-".join(map(str, value))
    return value


def _summary_markdown(summary: dict[str, Any], flow: str, dataset: str, ui_command: str) -> str:
    best, published = summary["best"], summary["published"]
    settings = [key for key in best if key != L2_KEY]
    chosen = next(
        (row for row in summary["cv_table"]
         if candidate_id(candidate_of(row, settings)) == candidate_id(best)),
        {},
    )  # fmt: skip
    lines = [
        f"## {flow} on {dataset}",
        "",
        "| | |",
        "|---|---|",
        f"| chosen | `{label(best)}` |",
        f"| CV accuracy | {chosen.get('mean_val_accuracy', math.nan):.4f} "
        f"± {chosen.get('std_val_accuracy', math.nan):.4f} |",
    ]
    if "test_accuracy" in summary:
        lines.append(f"| test accuracy | {summary['test_accuracy']:.4f} |")
    registration = published.registration
    if registration is not None:
        status = "champion" if registration.champion else "not the champion"
        lines.append(f"| model | `{registration.name}` version {registration.version} ({status}) |")
    lines.append(f"| MLflow run | `{published.run_id}` |")
    lines.append(
        f"| trainings | {summary['trained_folds']} run, {summary['cached_folds']} from the cache, "
        f"{summary['wall_seconds']:.0f} s |"
    )
    if ui_command.startswith(("http://", "https://")):
        lines += ["", f"[Open the MLflow tracking server]({ui_command})"]
    else:
        lines += ["", "Open the MLflow UI:", "", f"```\n{ui_command}\n```"]
    return "\n".join(lines)
