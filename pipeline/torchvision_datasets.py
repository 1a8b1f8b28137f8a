"""torchvision's MNIST-family datasets (KMNIST, QMNIST, EMNIST), with the ``torchvision`` extra.

torchvision's own dataset classes fetch the files (its downloader, its URLs, its MD5s) into the
torchvision layout ``<data dir>/<Class>/raw/`` and read them; the arrays then go through the
pipeline like the built-in datasets: a fingerprint of their content, read-only, memoized by
:func:`pipeline.data.load_dataset`. Base URLs of mirrors, when given, replace torchvision's
(the file names stay torchvision's).

EMNIST is stored transposed; its images are turned upright here, as the EMNIST paper shows them.
Labels are torchvision's: EMNIST ``letters`` counts 1..26 (class 0, ``N/A``, is never used).
QMNIST's test split is torchvision's ``test``: all 60,000 QMNIST test images, the 10,000 that
reconstruct MNIST's test set among them (accuracies are not comparable with MNIST's).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import URLError

import numpy as np

from pipeline.errors import DataError

EXTRA_HINT = "pip install 'mlp-pipeline[torchvision]'"
EMNIST_SPLITS = ("digits", "mnist", "letters", "balanced", "bymerge", "byclass")


@dataclass(frozen=True)
class TorchvisionSpec:
    """One dataset: the torchvision class (also its folder under the data folder) and split."""

    name: str
    class_name: str
    split: str | None = None  # EMNIST's


SPECS: dict[str, TorchvisionSpec] = {
    "kmnist": TorchvisionSpec("kmnist", "KMNIST"),
    "qmnist": TorchvisionSpec("qmnist", "QMNIST"),
    **{
        f"emnist-{split}": TorchvisionSpec(f"emnist-{split}", "EMNIST", split)
        for split in EMNIST_SPLITS
    },
}
NAMES = tuple(SPECS)
#: The folders torchvision downloads into, by dataset (EMNIST's splits share one).
FOLDERS = {"kmnist": "KMNIST", "qmnist": "QMNIST", "emnist-*": "EMNIST"}


def mirror_folder(name: str) -> str:
    """What ``{dataset}`` stands for in a mirror's URL: ``kmnist``, ``qmnist`` or ``emnist``."""
    return SPECS[name].class_name.lower()


def raw_folder(name: str, root: Path) -> Path:
    """Where torchvision keeps ``name``'s files under the data folder ``root``."""
    return root / SPECS[name].class_name / "raw"


def _torchvision_datasets() -> Any:
    try:
        import torchvision.datasets
    except ImportError:
        raise DataError(
            f"the torchvision datasets ({', '.join(NAMES)}) need torchvision: {EXTRA_HINT}"
        ) from None
    except Exception as exc:  # e.g. RuntimeError "operator torchvision::nms does not exist"
        raise DataError(
            f"torchvision is installed but does not load ({' '.join(str(exc).split())}): its "
            "wheel needs the torch build it was made for; on a CPU-only machine install both "
            "from PyTorch's CPU index"
        ) from None
    return torchvision.datasets


def _mirrored(cls: type, base: str) -> type:
    """``cls`` fetching its files from ``base`` instead of torchvision's URLs.

    A subclass of the same name, since torchvision names the folder after the class; only the
    public class attributes holding the URLs change.
    """
    if hasattr(cls, "splits"):  # EMNIST: one archive
        attrs: dict[str, Any] = {"url": base + os.path.basename(cls.url)}
    elif isinstance(cls.resources, dict):  # QMNIST: full URLs per subset
        attrs = {
            "resources": {
                subset: [(base + os.path.basename(url), md5) for url, md5 in files]
                for subset, files in cls.resources.items()
            }
        }
    else:  # MNIST-style: file names tried on each mirror
        attrs = {"mirrors": [base]}
    return type(cls.__name__, (cls,), attrs)


def _refuse_pickles(folder: Path) -> None:
    # torchvision reads a legacy processed/*.pt with torch.load (a pickle) before the raw files.
    processed = folder.parent / "processed"
    if any(processed.glob("*.pt")):
        raise DataError(
            f"{processed}: holds torch-pickled files of an old torchvision, which mlp-pipeline "
            "does not load; delete that folder (the raw files next to it are enough)"
        )


def _open(
    spec: TorchvisionSpec, root: Path, train: bool, download: bool, bases: Sequence[str]
) -> Any:
    datasets = _torchvision_datasets()
    cls = getattr(datasets, spec.class_name)
    kwargs = {"split": spec.split} if spec.split else {}
    folder = raw_folder(spec.name, root)
    # torchvision downloads only what is missing: with files there, a failure is in reading them.
    present = folder.is_dir() and any(folder.iterdir())
    tried: list[str] = []
    for mirrored in [_mirrored(cls, base) for base in bases if download] or [cls]:
        try:
            # torchvision prints its download messages: keep stdout for the pipeline's own.
            with contextlib.redirect_stdout(sys.stderr):
                return mirrored(str(root), train=train, download=download, **kwargs)
        # torchvision checks a file's format with assert statements.
        except (RuntimeError, URLError, OSError, ValueError, TypeError, AssertionError) as exc:
            tried.append(" ".join(str(exc).split()) or type(exc).__name__)
    if present:
        raise DataError(f"{spec.name}: torchvision cannot read {folder}/ ({'; '.join(tried)})")
    if not download:
        raise DataError(
            f"{spec.name} is not in {folder}/. To fix: put torchvision's files there, or allow "
            "downloads (data.download = true)"
        )
    raise DataError(
        f"{spec.name} could not be downloaded by torchvision ({'; '.join(tried)}). To fix: put "
        f"torchvision's files in {folder}/, or set MLP_PIPELINE_MIRRORS to a mirror of them"
    )


def _arrays(spec: TorchvisionSpec, dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    images = dataset.data.numpy()
    labels = dataset.targets.numpy()
    if labels.ndim == 2:  # QMNIST: one row of details per image, the class first
        labels = labels[:, 0]
    if spec.class_name == "EMNIST":
        images = images.transpose(0, 2, 1)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise DataError(
            f"{spec.name}: expected uint8 28x28 images, got {images.dtype} {images.shape}"
        )
    n_classes = len(dataset.classes)
    if len(labels) != len(images) or (
        len(labels) and not 0 <= labels.min() <= labels.max() < n_classes
    ):
        raise DataError(
            f"{spec.name}: labels do not match its {len(images)} images and {n_classes} classes"
        )
    return np.ascontiguousarray(images.reshape(len(images), -1)), labels.astype(np.uint8)


def load(
    name: str,
    root: Path,
    *,
    download: bool,
    mirrors: Sequence[str] = (),
    test_only: bool = False,
) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """Read ``name`` with torchvision (downloading it first if allowed and missing).

    Parameters
    ----------
    name : one of :data:`NAMES`
    root : Path
        The data folder; the files live in ``<root>/<Class>/raw/``.
    download : bool
        Let torchvision fetch missing files.
    mirrors : sequence of str
        Base URLs (ending in ``/``) to fetch from instead of torchvision's, tried in order.
    test_only : bool
        Read the test split only (the training arrays come back empty).

    Returns
    -------
    arrays : dict
        ``X_train``, ``y_train``, ``X_test``, ``y_test`` as uint8 arrays (images flattened to 784).
    class_names : tuple of str
    """
    spec = SPECS[name]
    _refuse_pickles(raw_folder(name, root))
    test = _open(spec, root, False, download, mirrors)
    X_test, y_test = _arrays(spec, test)
    if test_only:
        X_train, y_train = X_test[:0], y_test[:0]
    else:
        X_train, y_train = _arrays(spec, _open(spec, root, True, download, mirrors))
    arrays = {"X_train": X_train, "y_train": y_train, "X_test": X_test, "y_test": y_test}
    return arrays, tuple(str(c) for c in test.classes)


def verify(name: str, root: Path) -> list[dict[str, Any]]:
    """MD5 of each file torchvision downloaded for ``name`` against torchvision's own.

    Returns rows ``file``, ``expected``, ``actual`` and ``ok``, as
    :func:`pipeline.data.verify_dataset` does.
    """
    datasets = _torchvision_datasets()
    cls = getattr(datasets, SPECS[name].class_name)
    if hasattr(cls, "splits"):
        expected = [(os.path.basename(cls.url), cls.md5)]
    elif isinstance(cls.resources, dict):
        expected = [
            (os.path.basename(url), md5)
            for url, md5 in cls.resources["train"] + cls.resources["test"]
        ]
    else:
        expected = list(cls.resources)
    folder = raw_folder(name, root)
    rows = []
    for filename, md5 in expected:
        path = folder / filename
        if not path.is_file():
            raise DataError(f"{path}: not found (torchvision keeps its downloads there)")
        actual = datasets.utils.calculate_md5(path)
        rows.append({"file": str(path), "expected": md5, "actual": actual, "ok": actual == md5})
    return rows
