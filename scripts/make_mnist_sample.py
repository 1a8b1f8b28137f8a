"""Derive the bundled ``mnist-sample`` from the full MNIST files, reproducibly.

5,000 training images drawn stratified from MNIST train and 1,000 test images drawn stratified
from MNIST test (:func:`pipeline.data.stratified_indices`, fixed seed), written to
``pipeline/_data/mnist-sample.npz`` with a JSON sidecar recording the source hashes, seed,
counts and the SHA-256 of every array. The .npz is written with fixed zip timestamps, so the
same inputs give a byte-identical file (for a given zlib).

Usage::

    python scripts/make_mnist_sample.py [--data-dir ../shared/data] [--out pipeline/_data]
"""

from __future__ import annotations

import argparse
import json
import zipfile
from pathlib import Path

import numpy as np

from pipeline.data import (
    ROLES,
    SAMPLE_ARRAYS,
    SAMPLE_NAME,
    SPECS,
    array_sha256,
    load_dataset,
    stratified_indices,
)

SEED = 0
N_TRAIN = 5_000
N_TEST = 1_000
REPO = Path(__file__).resolve().parents[1]


def build_sample(data_dir: str | Path | None, seed: int = SEED) -> dict[str, np.ndarray]:
    """The four sample arrays: X_* (n, 784) uint8, y_* (n,) uint8."""
    mnist = load_dataset("mnist", data_dir, download=False, progress=False)
    tr = stratified_indices(mnist.y_train, N_TRAIN, seed)
    te = stratified_indices(mnist.y_test, N_TEST, seed)
    return {
        "X_train": np.ascontiguousarray(mnist.X_train[tr]),
        "y_train": np.ascontiguousarray(mnist.y_train[tr]),
        "X_test": np.ascontiguousarray(mnist.X_test[te]),
        "y_test": np.ascontiguousarray(mnist.y_test[te]),
    }


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` but with a fixed timestamp, so reruns give identical bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in SAMPLE_ARRAYS:
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, arrays[key], allow_pickle=False)


def write_sample(out_dir: Path, arrays: dict[str, np.ndarray], seed: int = SEED) -> Path:
    """Write ``<out_dir>/mnist-sample.npz`` and its ``.json``; returns the .npz path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    npz = out_dir / f"{SAMPLE_NAME}.npz"
    write_npz(npz, arrays)
    meta = {
        "name": SAMPLE_NAME,
        "source": "MNIST (Y. LeCun, C. Cortes, C. J. C. Burges), CC BY-SA 3.0",
        "source_sha256": {role: SPECS["mnist"].sha256[role] for role in ROLES},
        "method": "pipeline.data.stratified_indices(y, n, seed), indices kept in file order",
        "seed": seed,
        "counts": {"train": int(len(arrays["y_train"])), "test": int(len(arrays["y_test"]))},
        "class_counts": {
            "train": np.bincount(arrays["y_train"], minlength=10).tolist(),
            "test": np.bincount(arrays["y_test"], minlength=10).tolist(),
        },
        "shapes": {k: list(arrays[k].shape) for k in SAMPLE_ARRAYS},
        "dtypes": {k: str(arrays[k].dtype) for k in SAMPLE_ARRAYS},
        "sha256": {k: array_sha256(arrays[k]) for k in SAMPLE_ARRAYS},
    }
    (out_dir / f"{SAMPLE_NAME}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return npz


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", default=str(REPO / "pipeline" / "_data"))
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    npz = write_sample(Path(args.out), build_sample(args.data_dir, args.seed), args.seed)
    print(f"wrote {npz} ({npz.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
