"""K-fold splits and per-(candidate, fold) seeds.

Folds are recomputed from the labels and a few small values wherever they are needed, so the
parallel tasks receive a fold *number*, never index arrays.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from pipeline.errors import ConfigError


def make_folds(
    y: np.ndarray, n_folds: int, *, shuffle: bool, stratify: bool, seed: int
) -> list[np.ndarray]:
    """Split sample indices into ``n_folds`` validation folds.

    Parameters
    ----------
    y : ndarray of shape (n_samples,)
        Integer class labels.
    n_folds : int
        Number of folds (>= 2).
    shuffle : bool
        Shuffle before splitting. Without shuffling and stratification the folds are contiguous
        blocks, the homework's protocol.
    stratify : bool
        Give every fold the same class proportions (as scikit-learn's ``StratifiedKFold``).
    seed : int
        Seeds the shuffle.

    Returns
    -------
    list of ndarray
        Validation indices of each fold, sorted; together they cover every sample exactly once.
    """
    y = np.asarray(y)
    n_samples = y.shape[0]
    if n_folds < 2:
        raise ConfigError(f"cv.folds must be at least 2 (got {n_folds})")
    if n_folds > n_samples:
        raise ConfigError(f"cv.folds={n_folds} is more than the {n_samples} training samples")
    rng = np.random.default_rng(seed)
    if not stratify:
        order = rng.permutation(n_samples) if shuffle else np.arange(n_samples)
        return [np.sort(part) for part in np.array_split(order, n_folds)]

    classes, counts = np.unique(y, return_counts=True)
    if n_folds > counts.min():
        rarest = classes[counts.argmin()]
        raise ConfigError(
            f"cv.folds={n_folds} is more than class {rarest} has samples ({counts.min()}): "
            "use fewer folds, more data, or cv.stratify=false"
        )
    # Deal each class's samples round-robin over the folds, continuing where the previous class
    # stopped, so fold sizes differ by at most one and class proportions by at most one sample.
    assignment = np.empty(n_samples, dtype=np.int64)
    offset = 0
    for label in classes:
        members = np.flatnonzero(y == label)
        if shuffle:
            members = rng.permutation(members)
        assignment[members] = (offset + np.arange(members.size)) % n_folds
        offset = (offset + members.size) % n_folds
    return [np.flatnonzero(assignment == fold) for fold in range(n_folds)]


def train_indices(folds: list[np.ndarray], fold: int) -> np.ndarray:
    """Indices of every sample outside validation fold ``fold``."""
    return np.sort(np.concatenate([part for i, part in enumerate(folds) if i != fold]))


def fold_seed(
    seed: int, l2_lambda: float, fold: int, settings: Mapping[str, Any] | None = None
) -> int:
    """A seed derived from (seed, the candidate's values, fold) only, never from execution order.

    Every runner (sequential, threads, processes, Dask) therefore trains bit-identical networks,
    and adding a candidate to a search changes no other candidate's seeds. ``settings``: the
    candidate's searched values besides lambda (none: the seed of a search over lambda alone).
    ``fold=-1`` is the final model trained on all the training data.
    """
    if fold < -1:
        raise ValueError(f"fold must be >= -1 (got {fold})")
    lam_bits = struct.unpack("<2I", struct.pack("<d", float(l2_lambda)))
    words: list[int] = []
    if settings:
        text = json.dumps(dict(settings), sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha256(text.encode()).digest()[:16]
        words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    sequence = np.random.SeedSequence([seed, fold + 1, *lam_bits, *words])
    return int(sequence.generate_state(1, dtype=np.uint32)[0])
