"""What the benchmark scripts share."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def default_data_dir() -> str:
    """``$MLP_PIPELINE_DATA_DIR``, else ``../shared/data`` beside the repository."""
    return os.environ.get("MLP_PIPELINE_DATA_DIR", str(REPO.parent / "shared" / "data"))
