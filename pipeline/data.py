"""Datasets: find, verify, download and load MNIST, Fashion-MNIST and the bundled sample, and
with the ``torchvision`` extra KMNIST, QMNIST and EMNIST (:mod:`pipeline.torchvision_datasets`).

Files are looked up under a data folder (:func:`resolve_data_dir`) in either layout::

    <dir>/mnist/train-images-idx3-ubyte[.gz]          (flat; also fashion-mnist/)
    <dir>/MNIST/raw/train-images-idx3-ubyte[.gz]      (torchvision; also FashionMNIST/raw/)

and verified against the SHA-256 of the canonical *decompressed* files, so any copy works however
it was compressed. Loaded datasets are memoized per process and their arrays are read-only.

Bad parameters raise :class:`ConfigError`; missing, unreadable or wrong files :class:`DataError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import torchvision_datasets
from pipeline.download import DownloadFailed, download_file, make_progress
from pipeline.errors import ConfigError, DataError
from pipeline.idx import is_gzip_file, read_idx, read_idx_file, require_regular_file
from pipeline.normalize import Normalizer

__all__ = [
    "DATASET_NAMES",
    "DATA_DIR_ENV",
    "MIRRORS_ENV",
    "Dataset",
    "DatasetRef",
    "Normalizer",
    "clear_cache",
    "dataset_status",
    "download_dataset",
    "load_dataset",
    "read_idx",
    "resolve_data_dir",
    "stratified_indices",
    "verify_dataset",
]

DATA_DIR_ENV = "MLP_PIPELINE_DATA_DIR"
MIRRORS_ENV = "MLP_PIPELINE_MIRRORS"
SAMPLE_NAME = "mnist-sample"
DATASET_NAMES = ("mnist", "fashion-mnist", *torchvision_datasets.NAMES, SAMPLE_NAME)

#: File roles, in the order they enter the fingerprint.
ROLES = ("train_images", "train_labels", "test_images", "test_labels")
FILE_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
N_CLASSES = 10
IMAGE_SHAPE = (28, 28)


@dataclass(frozen=True)
class DatasetSpec:
    """What we know about one downloadable dataset."""

    name: str
    flat_dir: str
    torchvision_dir: str
    sha256: dict[str, str]  # role -> SHA-256 of the decompressed canonical file
    mirrors: tuple[str, ...]  # base URLs; the file URL is base + filename + ".gz"
    class_names: tuple[str, ...]
    n_train: int = 60000
    n_test: int = 10000

    def shape(self, role: str) -> tuple[int, ...]:
        """The shape of the canonical file ``role``: (n, 28, 28) images or (n,) labels."""
        n = self.n_train if role.startswith("train") else self.n_test
        return (n, *IMAGE_SHAPE) if role.endswith("images") else (n,)


SPECS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        flat_dir="mnist",
        torchvision_dir="MNIST",
        sha256={
            "train_images": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train_labels": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "test_images": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "test_labels": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",  # torchvision's primary mirror
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        class_names=tuple(str(d) for d in range(10)),
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        flat_dir="fashion-mnist",
        torchvision_dir="FashionMNIST",
        sha256={
            "train_images": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train_labels": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "test_images": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "test_labels": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        mirrors=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",  # Zalando's S3
            "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
        class_names=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
    ),
}


# --------------------------------------------------------------------------- references


@dataclass(frozen=True)
class DatasetRef:
    """A small, picklable, JSON-able handle to a dataset (send this to workers, not arrays).

    ``load_dataset(ref.name, ref.data_dir)`` gets the full dataset back; :meth:`load` also
    re-applies the limits and checks the fingerprint.
    """

    name: str
    data_dir: str | None
    fingerprint: str
    limit_train: int | None = None
    limit_test: int | None = None
    seed: int = 0

    def load(self, *, download: bool = False) -> Dataset:
        """Load (memoized) the dataset this ref points to, limits included."""
        ds = load_dataset(self.name, self.data_dir, download=download)
        ds = ds.limit(self.limit_train, self.limit_test, seed=self.seed)
        if ds.fingerprint != self.fingerprint:
            raise DataError(
                f"{self.name} under {self.data_dir}: fingerprint {ds.fingerprint} does not match "
                f"the reference {self.fingerprint} (the files changed?)"
            )
        return ds

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "data_dir": self.data_dir,
            "fingerprint": self.fingerprint,
            "limit_train": self.limit_train,
            "limit_test": self.limit_test,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetRef:
        return cls(**data)


# --------------------------------------------------------------------------- datasets


@dataclass(frozen=True, repr=False, eq=False)
class Dataset:
    """A loaded dataset; all arrays are read-only (they may be shared through the cache).

    Attributes
    ----------
    name : str
    X_train : np.ndarray, shape (n_train, 784), uint8
    y_train : np.ndarray, shape (n_train,), uint8, values 0..9
    X_test : np.ndarray, shape (n_test, 784), uint8
    y_test : np.ndarray, shape (n_test,), uint8
    fingerprint : str
        SHA-256 (hex) identifying the content: the name and the four file hashes, plus the
        limits for a subset.
    data_dir : str or None
        The folder it was loaded from (None for the bundled sample).
    class_names : tuple of str
    """

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    fingerprint: str
    data_dir: str | None = None
    class_names: tuple[str, ...] = tuple(str(d) for d in range(10))
    limit_train: int | None = None
    limit_test: int | None = None
    seed: int = 0
    _subsets: dict = field(default_factory=dict, compare=False)

    @property
    def ref(self) -> DatasetRef:
        return DatasetRef(
            self.name, self.data_dir, self.fingerprint, self.limit_train, self.limit_test, self.seed
        )

    @property
    def n_features(self) -> int:
        return self.X_train.shape[1]

    @property
    def n_classes(self) -> int:
        """The model's outputs: one per class name (10 but for EMNIST's wider splits)."""
        return len(self.class_names)

    def summary(self) -> dict[str, Any]:
        """What a run record says about its data: name, fingerprint, folder and sizes."""
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "source": self.data_dir or "bundled with the package",
            "data_dir": self.data_dir,
            "n_train": int(self.y_train.shape[0]),
            "n_test": int(self.y_test.shape[0]),
            "n_classes": self.n_classes,
        }

    def limit(self, limit_train: int | None, limit_test: int | None, seed: int = 0) -> Dataset:
        """A stratified, deterministic subset (class proportions kept, original order kept).

        Parameters
        ----------
        limit_train, limit_test : int or None
            Maximum number of train / test samples; None (or a value >= the size) keeps all.
        seed : int
            Chooses which samples of each class are kept.

        Returns
        -------
        Dataset
            ``self`` if nothing is cut; otherwise a new dataset whose fingerprint includes the
            limits and seed. Memoized per (limits, seed).
        """
        if self.limit_train is not None or self.limit_test is not None:
            raise ConfigError(f"{self.name} is already a subset; limit the full dataset instead")
        lt = _check_limit(limit_train, len(self.y_train), "limit_train")
        ls = _check_limit(limit_test, len(self.y_test), "limit_test")
        if lt is None and ls is None:
            return self
        key = (lt, ls, seed)
        if key not in self._subsets:
            tr = slice(None) if lt is None else stratified_indices(self.y_train, lt, seed)
            te = slice(None) if ls is None else stratified_indices(self.y_test, ls, seed)
            tag = f"{self.fingerprint}\nlimit_train={lt}\nlimit_test={ls}\nseed={seed}"
            self._subsets[key] = Dataset(
                name=self.name,
                X_train=_readonly(self.X_train[tr]),
                y_train=_readonly(self.y_train[tr]),
                X_test=_readonly(self.X_test[te]),
                y_test=_readonly(self.y_test[te]),
                fingerprint=hashlib.sha256(tag.encode()).hexdigest(),
                data_dir=self.data_dir,
                class_names=self.class_names,
                limit_train=lt,
                limit_test=ls,
                seed=seed,
            )
        return self._subsets[key]

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={self.X_train.shape}, test={self.X_test.shape}, "
            f"fingerprint={self.fingerprint[:12]}...)"
        )


def stratified_indices(y: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``n`` samples of ``y`` keeping each class's share.

    Class quotas are ``n * count_c / len(y)`` rounded down, the remainder going to the classes
    with the largest fractional parts (ties: lower class first); within a class the samples are
    drawn with ``np.random.default_rng(seed)``.

    Parameters
    ----------
    y : np.ndarray, shape (n_samples,)
        Integer labels.
    n : int
        Number of samples to keep, 0 <= n <= len(y).
    seed : int

    Returns
    -------
    np.ndarray, shape (n,), int64, increasing
    """
    y = np.asarray(y)
    if not 0 <= n <= len(y):
        raise ConfigError(f"cannot draw {n} samples from {len(y)}")
    classes, counts = np.unique(y, return_counts=True)
    exact = counts * n / len(y) if len(y) else counts * 0.0
    quota = np.floor(exact).astype(np.int64)
    remainder = n - int(quota.sum())
    order = np.lexsort((np.arange(len(classes)), -(exact - quota)))
    quota[order[:remainder]] += 1
    rng = np.random.default_rng(seed)
    chosen = [
        rng.permutation(np.flatnonzero(y == c))[:q] for c, q in zip(classes, quota, strict=True)
    ]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def _check_limit(value: int | None, size: int, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ConfigError(f"{name} must be a positive integer or None, got {value!r}")
    return None if value >= size else int(value)


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


# --------------------------------------------------------------------------- locating files


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The data folder: ``data_dir`` if given, else ``$MLP_PIPELINE_DATA_DIR``, else ``./data``.

    Returned absolute and without ``..`` (so it stays valid in worker processes with another
    working directory, and reads as users expect); symbolic links are kept.
    """
    chosen = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV) or "data"
    return Path(os.path.abspath(Path(chosen).expanduser()))


def _spec(name: str) -> DatasetSpec:
    if name not in SPECS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    return SPECS[name]


def _candidates(spec: DatasetSpec, root: Path, role: str) -> list[tuple[Path, str]]:
    """Where a file may be, in order of preference: flat before torchvision, raw before .gz."""
    fname = FILE_NAMES[role]
    flat, tv = root / spec.flat_dir, root / spec.torchvision_dir / "raw"
    return [
        (flat / fname, "flat"),
        (flat / f"{fname}.gz", "flat"),
        (tv / fname, "torchvision"),
        (tv / f"{fname}.gz", "torchvision"),
    ]


def _find(spec: DatasetSpec, root: Path, role: str) -> tuple[Path, str] | None:
    for path, layout in _candidates(spec, root, role):
        # exists() rather than is_file(): a directory in the way gets a clear error when read.
        try:
            if path.exists():
                return path, layout
        except OSError as exc:  # e.g. a parent folder without search permission
            raise DataError(f"{path}: cannot access ({exc.strerror})") from None
    return None


def _remedies(spec: DatasetSpec, root: Path) -> str:
    files = ", ".join(FILE_NAMES[r] for r in ROLES)
    return (
        f"To fix: put the four {spec.name} files ({files}; .gz or raw) in "
        f"{root / spec.flat_dir}/ (or {root / spec.torchvision_dir / 'raw'}/), "
        f"or point the environment variable {DATA_DIR_ENV} or the --data-dir option at a folder "
        f"that has them, or use --dataset {SAMPLE_NAME} (bundled, works offline)."
    )


def mirror_bases(dataset: str, mirrors: Sequence[str] | None = None) -> list[str]:
    """Base URLs, each ending in ``/``: the argument, else ``$MLP_PIPELINE_MIRRORS``
    (comma-separated), else none. ``{dataset}`` in a base URL is replaced by ``dataset``."""
    if mirrors is None:
        mirrors = [m.strip() for m in os.environ.get(MIRRORS_ENV, "").split(",") if m.strip()]
    bases = [m.replace("{dataset}", dataset) for m in mirrors]
    return [b + ("" if b.endswith("/") else "/") for b in bases]


def _mirror_urls(spec: DatasetSpec, filename: str, mirrors: Sequence[str] | None) -> list[str]:
    """The file's URL on each mirror (:func:`mirror_bases`, else the built-in list)."""
    if mirrors is None:
        mirrors = mirror_bases(spec.flat_dir) or spec.mirrors
    return [base + filename + ".gz" for base in mirror_bases(spec.flat_dir, mirrors)]


# --------------------------------------------------------------------------- download


def download_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    roles: Sequence[str] = ROLES,
    mirrors: Sequence[str] | None = None,
    progress: bool = True,
    timeout: float = 30.0,
) -> dict[str, Path]:
    """Download the missing files of ``name`` into ``<data_dir>/<name>/`` (flat layout).

    Each file is written to a temporary file, checked against the canonical SHA-256 of its
    decompressed content and renamed into place; a bad or failed download moves on to the next
    mirror. Files already present are left alone (and not verified here).

    Parameters
    ----------
    name : {"mnist", "fashion-mnist"}
    data_dir : str, Path or None
        See :func:`resolve_data_dir`.
    roles : sequence of str
        Which files (``ROLES``): all four by default, the test pair for an evaluation.
    mirrors : sequence of str, optional
        Base URLs; default ``$MLP_PIPELINE_MIRRORS`` or the built-in public mirrors.
    progress : bool
        Show a rich progress bar on stderr.
    timeout : float
        Socket timeout per request, in seconds.

    Returns
    -------
    dict
        role -> path of every file (found or downloaded).

    Raises
    ------
    DataError
        If a file cannot be obtained from any mirror; the message lists the mirrors tried and
        the remedies (where to put the files, the env var, --data-dir, the bundled sample).
    """
    if name == SAMPLE_NAME:
        raise DataError(f"{SAMPLE_NAME} is bundled with the package; nothing to download")
    spec = _spec(name)
    root = resolve_data_dir(data_dir)
    found: dict[str, Path] = {}
    for role in roles:
        hit = _find(spec, root, role)
        if hit is not None:
            found[role] = hit[0]
    missing = [role for role in roles if role not in found]
    if not missing:
        return found
    target = root / spec.flat_dir
    # The outermost folder this call creates: removed again if nothing could be downloaded.
    created = next(
        (folder for folder in (*reversed(target.parents), target) if not folder.exists()), None
    )
    with make_progress(progress) as bar:
        for role in missing:
            fname = FILE_NAMES[role]
            try:
                found[role] = download_file(
                    _mirror_urls(spec, fname, mirrors),
                    target,
                    fname,
                    spec.sha256[role],
                    progress=bar,
                    timeout=timeout,
                    expected_shape=spec.shape(role),
                )
            except DownloadFailed as exc:
                if created is not None:  # do not leave empty folders behind when offline
                    for folder in (target, *target.parents):
                        with contextlib.suppress(OSError):
                            folder.rmdir()  # fails (and stops nothing) if not empty
                        if folder == created:
                            break
                raise DataError(
                    f"{spec.name}: {fname} not found under {root} and {exc}\n"
                    f"{_remedies(spec, root)}"
                ) from None
    return found


# --------------------------------------------------------------------------- loading

_CACHE: dict[tuple, Dataset] = {}


def clear_cache() -> None:
    """Forget every memoized dataset (tests; or to free memory)."""
    _CACHE.clear()


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    download: bool = True,
    *,
    progress: bool = True,
) -> Dataset:
    """Load a dataset, verified and memoized.

    Parameters
    ----------
    name : {"mnist", "fashion-mnist", "mnist-sample"}
        ``mnist-sample`` is bundled (5,000 train / 1,000 test drawn from MNIST) and ignores
        ``data_dir`` and ``download``.
    data_dir : str, Path or None
        See :func:`resolve_data_dir`.
    download : bool
        Fetch missing files from the public mirrors (see :func:`download_dataset`).
    progress : bool
        Show a progress bar while downloading.

    Returns
    -------
    Dataset
        ``X_train`` (60000, 784) uint8, ``y_train`` (60000,) uint8, ``X_test`` (10000, 784),
        ``y_test`` (10000,) for the full datasets; read-only arrays.

    Raises
    ------
    DataError
        Missing (and not downloadable), unreadable, corrupt or non-canonical files.
    """
    if name == SAMPLE_NAME:
        return _load_sample()
    if name in torchvision_datasets.NAMES:
        return _load_torchvision(name, resolve_data_dir(data_dir), download)
    spec = _spec(name)
    root = resolve_data_dir(data_dir)
    if download:
        paths = download_dataset(name, root, progress=progress)
    else:
        paths = _require_files(spec, root)
    key = (name, str(root), tuple(_stat_key(paths[role]) for role in ROLES))
    if key not in _CACHE:
        _CACHE[key] = _read_verified(spec, root, paths)
    return _CACHE[key]


def _require_files(spec: DatasetSpec, root: Path, roles: Sequence[str] = ROLES) -> dict[str, Path]:
    paths, missing = {}, []
    for role in roles:
        hit = _find(spec, root, role)
        if hit is None:
            missing.append(FILE_NAMES[role])
        else:
            paths[role] = hit[0]
    if missing:
        raise DataError(
            f"{spec.name}: {', '.join(missing)} not found under {root} "
            f"(looked in {root / spec.flat_dir}/ and {root / spec.torchvision_dir / 'raw'}/).\n"
            f"{_remedies(spec, root)}"
        )
    return paths


def _stat_key(path: Path) -> tuple[str, int, int]:
    try:
        st = path.stat()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror})") from None
    return str(path.resolve()), st.st_mtime_ns, st.st_size


def _read_pair(spec: DatasetSpec, split: str, paths: dict[str, Path]) -> tuple[Any, Any]:
    """Read and cross-check the images/labels pair of ``split`` (shapes, dtype, counts, labels).

    A header declaring more than the canonical file holds is refused before it is read.
    """
    images_path, labels_path = paths[f"{split}_images"], paths[f"{split}_labels"]
    images = read_idx_file(images_path, expected_shape=spec.shape(f"{split}_images"))
    labels = read_idx_file(labels_path, expected_shape=spec.shape(f"{split}_labels"))
    X, y = images.array, labels.array
    if X.ndim != 3 or X.shape[1:] != IMAGE_SHAPE or X.dtype != np.uint8:
        raise DataError(
            f"{images_path}: expected uint8 images of shape (n, 28, 28), got {X.dtype} {X.shape}"
        )
    if y.ndim != 1 or y.dtype != np.uint8:
        raise DataError(
            f"{labels_path}: expected uint8 labels of shape (n,), got {y.dtype} {y.shape}"
        )
    if len(X) != len(y):
        raise DataError(
            f"{labels_path}: {len(y)} labels but {images_path} has {len(X)} images (count mismatch)"
        )
    if len(y) and int(y.max()) >= N_CLASSES:
        bad = int(np.flatnonzero(y >= N_CLASSES)[0])
        raise DataError(
            f"{labels_path}: label {int(y[bad])} at index {bad} is out of range "
            f"[0, {N_CLASSES - 1}]"
        )
    return images, labels


def _read_verified(spec: DatasetSpec, root: Path, paths: dict[str, Path]) -> Dataset:
    files = {}
    for split in ("train", "test"):
        files[f"{split}_images"], files[f"{split}_labels"] = _read_pair(spec, split, paths)
    _check_checksums(spec, paths, files)
    return Dataset(
        name=spec.name,
        X_train=_readonly(files["train_images"].array.reshape(-1, 784)),
        y_train=files["train_labels"].array,
        X_test=_readonly(files["test_images"].array.reshape(-1, 784)),
        y_test=files["test_labels"].array,
        fingerprint=_fingerprint(spec.name, [spec.sha256[r] for r in ROLES]),
        data_dir=str(root),
        class_names=spec.class_names,
    )


def _check_checksums(spec: DatasetSpec, paths: dict[str, Path], files: dict[str, Any]) -> None:
    for role, file in files.items():
        expected, actual = spec.sha256[role], file.sha256
        if actual != expected:
            raise DataError(
                f"{paths[role]}: checksum mismatch for the {spec.name} file {FILE_NAMES[role]}: "
                f"expected SHA-256 {expected} (of the decompressed content), got {actual}. "
                "Delete the file to download it again, or replace it with the original."
            )


TEST_ROLES = ("test_images", "test_labels")


def load_test_set(
    name: str,
    data_dir: str | Path | None = None,
    download: bool = True,
    *,
    limit_test: int | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """The test images and labels of a dataset, verified, without its training files.

    For scoring a model that was trained elsewhere. ``limit_test`` takes the same stratified
    subset as ``load_dataset(...).limit(None, limit_test)``, the subset a run with that limit
    was evaluated on.

    Returns
    -------
    X_test : np.ndarray, shape (n_test, 784), uint8
    y_test : np.ndarray, shape (n_test,), uint8
    """
    if name == SAMPLE_NAME:
        dataset = _load_sample()
        X, y = dataset.X_test, dataset.y_test
    elif name in torchvision_datasets.NAMES:
        arrays, _ = _torchvision_arrays(name, resolve_data_dir(data_dir), download, test_only=True)
        X, y = _readonly(arrays["X_test"]), _readonly(arrays["y_test"])
    else:
        spec = _spec(name)
        root = resolve_data_dir(data_dir)
        if download:
            paths = download_dataset(name, root, roles=TEST_ROLES, progress=progress)
        else:
            paths = _require_files(spec, root, TEST_ROLES)
        images, labels = _read_pair(spec, "test", paths)
        _check_checksums(spec, paths, {"test_images": images, "test_labels": labels})
        X, y = _readonly(images.array.reshape(-1, 784)), labels.array
    limit = _check_limit(limit_test, len(y), "limit_test")
    if limit is None:
        return X, y
    kept = stratified_indices(y, limit, 0)  # Dataset.limit's default seed
    return _readonly(X[kept]), _readonly(y[kept])


def _torchvision_arrays(
    name: str, root: Path, download: bool, test_only: bool = False
) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    mirrors = mirror_bases(torchvision_datasets.mirror_folder(name))
    return torchvision_datasets.load(
        name, root, download=download, mirrors=mirrors, test_only=test_only
    )


def _load_torchvision(name: str, root: Path, download: bool) -> Dataset:
    def key() -> tuple:
        folder = torchvision_datasets.raw_folder(name, root)
        files = sorted(folder.iterdir()) if folder.is_dir() else []
        return (name, str(root), tuple(_stat_key(path) for path in files))

    if key() not in _CACHE:
        arrays, class_names = _torchvision_arrays(name, root, download)
        _CACHE[key()] = Dataset(  # the key of the files as read (a download adds some)
            name=name,
            fingerprint=_fingerprint(name, [array_sha256(arrays[k]) for k in SAMPLE_ARRAYS]),
            data_dir=str(root),
            class_names=class_names,
            **{k: _readonly(a) for k, a in arrays.items()},
        )
    return _CACHE[key()]


def _fingerprint(name: str, hashes: Sequence[str]) -> str:
    return hashlib.sha256("\n".join([name, *hashes]).encode()).hexdigest()


# --------------------------------------------------------------------------- bundled sample

SAMPLE_ARRAYS = ("X_train", "y_train", "X_test", "y_test")


def _sample_files() -> tuple[Any, Any]:
    base = resources.files("pipeline") / "_data"
    return base / f"{SAMPLE_NAME}.npz", base / f"{SAMPLE_NAME}.json"


def array_sha256(a: np.ndarray) -> str:
    """SHA-256 of an array's C-order bytes (what the sample's JSON records)."""
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def fingerprint_test_set(images: np.ndarray, labels: np.ndarray) -> str:
    """One digest of a test set's pixels and labels: the same digest, comparable accuracies."""
    return hashlib.sha256(f"{array_sha256(images)}\n{array_sha256(labels)}".encode()).hexdigest()


def _load_sample() -> Dataset:
    npz, meta = _sample_files()
    key = (SAMPLE_NAME, str(npz))
    if key not in _CACHE:
        _CACHE[key] = read_sample(npz, meta)
    return _CACHE[key]


def read_sample(npz_path: Any, json_path: Any) -> Dataset:
    """Load a sample ``.npz`` and check each array against the hashes in its ``.json``.

    Parameters are paths or :mod:`importlib.resources` traversables.
    """
    try:
        for file in (npz_path, json_path):
            if isinstance(file, Path):  # not a package resource: may be anything
                require_regular_file(file, DataError, "cannot read the sample")
        meta = json.loads(json_path.read_text())
        expected = meta["sha256"]
        with np.load(io.BytesIO(npz_path.read_bytes()), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in SAMPLE_ARRAYS}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{npz_path}: cannot read the bundled sample ({exc!r})") from None
    for k in SAMPLE_ARRAYS:
        actual = array_sha256(arrays[k])
        if actual != expected.get(k):
            raise DataError(
                f"{npz_path}: array {k} does not match {json_path} "
                f"(expected SHA-256 {expected.get(k)}, got {actual}); reinstall the package "
                "or regenerate it with scripts/make_mnist_sample.py"
            )
        _readonly(arrays[k])
    return Dataset(
        name=SAMPLE_NAME,
        fingerprint=_fingerprint(SAMPLE_NAME, [expected[k] for k in SAMPLE_ARRAYS]),
        data_dir=None,
        class_names=SPECS["mnist"].class_names,
        **arrays,
    )


# --------------------------------------------------------------------------- CLI helpers


def dataset_status(data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Which dataset files are present (for ``mlp-pipeline data info``); reads 2 bytes per file.

    A directory, FIFO, socket or device where a file is expected is a :class:`DataError`
    (checked before anything opens it: reading a FIFO would block forever).

    Returns
    -------
    list of dict
        One row per (dataset, role) with keys ``dataset``, ``role``, ``file`` (canonical
        name), ``path`` (str or None), ``layout`` ("flat", "torchvision", "bundled" or None),
        ``compressed`` (bool, from the content; None if missing) and ``size`` (bytes or None).
    """
    root = resolve_data_dir(data_dir)
    rows = []
    for spec in SPECS.values():
        for role in ROLES:
            hit = _find(spec, root, role)
            path, layout = hit if hit else (None, None)
            size = None if path is None else _regular_size(path)
            rows.append(
                {
                    "dataset": spec.name,
                    "role": role,
                    "file": FILE_NAMES[role],
                    "path": None if path is None else str(path),
                    "layout": layout,
                    "compressed": None if path is None else is_gzip_file(path),
                    "size": size,
                }
            )
    for label, class_name in torchvision_datasets.FOLDERS.items():
        folder = root / class_name / "raw"
        files = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
        rows.append(
            {
                "dataset": label,
                "role": "torchvision",
                "file": f"{class_name}/raw/",
                "path": str(folder) if files else None,
                "layout": "torchvision" if files else None,
                "compressed": None,
                "size": sum(p.stat().st_size for p in files) if files else None,
            }
        )
    npz, _ = _sample_files()
    rows.append(
        {
            "dataset": SAMPLE_NAME,
            "role": "bundle",
            "file": npz.name,
            "path": str(npz),
            "layout": "bundled",
            "compressed": True,
            "size": len(npz.read_bytes()) if npz.is_file() else None,
        }
    )
    return rows


def _regular_size(path: Path) -> int:
    try:
        return require_regular_file(path, DataError, "cannot read the IDX file").st_size
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror})") from None


def verify_dataset(name: str, data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Check every file of ``name`` against its canonical hash (``mlp-pipeline data verify``).

    A checksum mismatch is reported (``ok`` False), not raised.

    Returns
    -------
    list of dict
        One row per file: ``file`` (path, or ``npz:array`` for the sample), ``expected``,
        ``actual`` (SHA-256 hex) and ``ok``.

    Raises
    ------
    DataError
        Unknown dataset, missing file, or a file that cannot be read as IDX.
    """
    if name == SAMPLE_NAME:
        npz, meta = _sample_files()
        try:
            expected = json.loads(meta.read_text())["sha256"]
            with np.load(io.BytesIO(npz.read_bytes()), allow_pickle=False) as data:
                actual = {k: array_sha256(data[k]) for k in SAMPLE_ARRAYS}
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"{npz}: cannot read the bundled sample ({exc!r})") from None
        return [
            {
                "file": f"{npz}:{k}",
                "expected": expected.get(k),
                "actual": actual[k],
                "ok": actual[k] == expected.get(k),
            }
            for k in SAMPLE_ARRAYS
        ]
    if name in torchvision_datasets.NAMES:
        return torchvision_datasets.verify(name, resolve_data_dir(data_dir))
    spec = _spec(name)
    paths = _require_files(spec, resolve_data_dir(data_dir))
    rows = []
    for role in ROLES:
        actual = read_idx_file(paths[role], expected_shape=spec.shape(role)).sha256
        expected = spec.sha256[role]
        rows.append(
            {
                "file": str(paths[role]),
                "expected": expected,
                "actual": actual,
                "ok": actual == expected,
            }
        )
    return rows
