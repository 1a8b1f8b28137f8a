"""Fetch one IDX file from a list of mirrors: temp file, checksum check, atomic rename.

The caller (:mod:`pipeline.data`) knows the datasets; this module only knows URLs, a destination
and the expected SHA-256 of the *decompressed* content.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from pipeline.errors import DataError
from pipeline.idx import GZIP_MAGIC, read_idx_file

USER_AGENT = "mlp-pipeline dataset downloader"
_CHUNK = 1 << 16


class DownloadFailed(DataError):
    """Every mirror failed for one file; ``failures`` lists ``(url, reason)``."""

    def __init__(self, filename: str, failures: list[tuple[str, str]]) -> None:
        self.filename = filename
        self.failures = failures
        lines = "\n".join(f"  - {url}: {reason}" for url, reason in failures)
        super().__init__(f"could not download {filename} from any mirror:\n{lines}")


def make_progress(enabled: bool = True) -> Progress:
    """A rich progress bar for downloads (on stderr); ``enabled=False`` makes it silent."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def download_file(
    urls: Sequence[str],
    dest_dir: Path,
    filename: str,
    expected_sha256: str,
    *,
    progress: Progress | None = None,
    timeout: float = 30.0,
    expected_shape: tuple[int, ...] | None = None,
) -> Path:
    """Download ``filename`` from the first mirror that serves the right content.

    Parameters
    ----------
    urls : sequence of str
        Full URLs to try in order.
    dest_dir : Path
        Folder to write into (created if needed).
    filename : str
        Canonical name without ``.gz`` (e.g. ``train-images-idx3-ubyte``); the saved file gets
        ``.gz`` if the served content is gzip-compressed.
    expected_sha256 : str
        SHA-256 of the decompressed content; a download that does not match is discarded and
        the next mirror is tried.
    progress : rich Progress, optional
        Bar to report to; None downloads silently.
    timeout : float
        Socket timeout in seconds per mirror.
    expected_shape : tuple of int, optional
        The content's shape: a header declaring more is refused before it is read.

    Returns
    -------
    Path
        The verified file, renamed atomically into place.

    Raises
    ------
    DownloadFailed
        If no mirror delivered a verified file (the message lists each URL and its problem).
    """
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{dest_dir}: cannot create the data folder ({exc.strerror})") from None
    failures: list[tuple[str, str]] = []
    for url in urls:
        fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=f".{filename}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                _fetch(url, out, progress=progress, timeout=timeout, label=filename)
            reason = _check(tmp, expected_sha256, expected_shape)
            if reason is None:
                final = dest_dir / (filename + (".gz" if _is_gzip(tmp) else ""))
                os.replace(tmp, final)
                return final
            failures.append((url, reason))
        except (OSError, http.client.HTTPException, ValueError) as exc:
            # URLError/HTTPError/timeouts are OSErrors; ValueError covers malformed URLs.
            failures.append((url, _describe(exc)))
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    raise DownloadFailed(filename, failures)


def _fetch(url: str, out, *, progress: Progress | None, timeout: float, label: str) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        task = None
        if progress is not None:
            task = progress.add_task(label, total=response.length)
        while chunk := response.read(_CHUNK):
            out.write(chunk)
            if task is not None:
                progress.advance(task, len(chunk))


def _check(
    path: Path, expected_sha256: str, expected_shape: tuple[int, ...] | None = None
) -> str | None:
    """Why the downloaded file is unusable, or None if it is the canonical content."""
    try:
        actual = read_idx_file(path, expected_shape=expected_shape).sha256
    except DataError as exc:
        return f"downloaded file is not a valid IDX file ({str(exc).removeprefix(f'{path}: ')})"
    if actual != expected_sha256:
        return f"checksum mismatch (expected {expected_sha256}, got {actual})"
    return None


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return str(exc)  # "HTTP Error 404: Not Found"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)  # the underlying socket error, e.g. "[Errno 111] Connection refused"
    return f"{type(exc).__name__}: {exc}"
