"""Random distortions of training images, applied batch by batch inside the training loop.

:class:`Augmenter` is the batch transform :func:`mlp.fit` calls on every training batch (never on
validation or test data): an optional left-right mirror of half the images (for garments, not
digits), a random affine map per image (rotation, zoom, shift) and an elastic
distortion (Simard, Steinkraus & Platt 2003, "Best practices for convolutional neural networks
applied to visual document analysis": a random displacement field in [-1, 1], smoothed by a
Gaussian of ``elastic_sigma`` pixels, scaled by ``elastic_alpha``), resampled by bilinear
interpolation. Everything is vectorized over the batch: one matrix product smooths every field,
four gathers interpolate every pixel.

Conventions (those of ``scipy.ndimage``): pixel ``(row, column)`` of a ``side x side`` image sits
at integer coordinates, the centre of rotation and scaling is ``((side - 1) / 2, (side - 1) / 2)``;
the content moves as ``p -> zoom R (p - c) + c + shift`` (``R`` turns it counter-clockwise as
displayed), so every output pixel ``p`` reads the input at ``A (p - c - shift) + c +
displacement`` with ``A = R^-1 / zoom`` (the inverse map): a shift of ``(+1, 0)`` moves the
content one row down, after turning and zooming it. Outside the image the input is the
background (a raw 0 pixel, normalized), with ``scipy.ndimage``'s ``"grid-constant"`` semantics:
interpolation runs smoothly into the background rather than cutting off at the border.

Pixels must be normalized by one affine map shared by all pixels (``scale`` or ``standardize``),
which commutes with interpolation: distorting normalized images equals normalizing distorted ones.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.config import AugmentConfig


class Augmenter:
    """A batch transform for :func:`mlp.fit`: ``augmenter(X, rng)`` returns distorted copies.

    A mini-batch (up to :attr:`CHUNK` rows) gets all its random draws at once.

    Parameters
    ----------
    distortions : AugmentConfig
        How strongly to distort (rotation, zoom, shift, elastic field; their ``strength``).
    side : int
        Images are ``side x side``, flattened row by row (``n_features == side**2``).
    background : float
        The value of an empty pixel in the normalized data (what enters from outside).
    dtype : numpy dtype
        The dtype of the batches (the network's).
    """

    CHUNK = 1024  # rows: 68 MB of temporaries at most (measured with tracemalloc)

    def __init__(
        self, distortions: AugmentConfig, side: int, background: float, dtype: np.dtype | str
    ) -> None:
        self.distortions = distortions.scaled()
        self.side = side
        self.background = float(background)
        self.dtype = np.dtype(dtype)
        centred = np.arange(side, dtype=self.dtype) - (side - 1) / 2
        self._rows, self._cols = np.meshgrid(centred, centred, indexing="ij")
        self._smoothing = _gaussian_matrix(side, distortions.elastic_sigma, self.dtype)

    def __call__(self, X: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Distorted copies of the images in ``X`` (shape ``(n, side**2)``); ``X`` is unchanged.

        Worked through in chunks of :attr:`CHUNK` rows: the temporaries (coordinates, weights,
        indices, fields) take about 20 times a batch's own size, so a full-batch training of
        60,000 images would otherwise need gigabytes more.
        """
        if X.shape[0] <= self.CHUNK:  # a mini-batch: no copy into an output buffer
            return self.resample(X, *self.source_coordinates(X.shape[0], rng))
        out = np.empty(X.shape, dtype=self.dtype)
        for start in range(0, X.shape[0], self.CHUNK):
            chunk = X[start : start + self.CHUNK]
            rows, cols = self.source_coordinates(chunk.shape[0], rng)
            out[start : start + chunk.shape[0]] = self.resample(chunk, rows, cols)
        return out

    def source_coordinates(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """For ``n`` random distortions, where each output pixel reads the input.

        Returns ``(rows, cols)``, each of shape ``(n, side, side)``.
        """
        d = self.distortions
        angle = rng.uniform(-d.degrees, d.degrees, n)
        zoom = rng.uniform(1 - d.zoom, 1 + d.zoom, n)
        shift = rng.uniform(-d.shift, d.shift, (n, 2))
        rows, cols = self.affine_coordinates(angle, zoom, shift)
        if d.flip:
            # Mirror first, then distort: a mirrored image reads column side - 1 - c for c.
            mirrored = rng.random(n) < 0.5
            cols[mirrored] = (self.side - 1) - cols[mirrored]
        if d.elastic_alpha:
            field = rng.uniform(-1, 1, (2, n, self.side, self.side)).astype(self.dtype)
            # Separable Gaussian smoothing of every field at once: G @ field @ G.T.
            field = self._smoothing @ field @ self._smoothing.T
            field *= d.elastic_alpha
            rows += field[0]
            cols += field[1]
        return rows, cols

    def affine_coordinates(
        self, degrees: np.ndarray, zoom: np.ndarray, shift: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Where each output pixel reads the input, for given affine maps.

        ``degrees`` and ``zoom`` have shape ``(n,)``, ``shift`` ``(n, 2)`` (rows, columns): the
        content turns by ``degrees`` (counter-clockwise as displayed), grows by ``zoom`` about
        the centre, then moves by ``shift`` pixels (+rows: down, +columns: right).
        """
        dtype, centre = self.dtype, (self.side - 1) / 2
        angle = np.deg2rad(np.asarray(degrees, dtype=np.float64))
        zoom = np.asarray(zoom, dtype=np.float64)
        shift = np.asarray(shift, dtype=np.float64)
        # The content moves as p -> zoom R (p - c) + c + shift, so an output pixel p reads the
        # input at A (p - c - shift) + c, A = R^-1 / zoom: rotate back, divide by the zoom.
        cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
        row_shift = cos * shift[:, 0] + sin * shift[:, 1]  # A @ shift
        col_shift = -sin * shift[:, 0] + cos * shift[:, 1]

        def per_image(values: np.ndarray) -> np.ndarray:
            return values.astype(dtype)[:, None, None]

        rows = per_image(cos) * self._rows + per_image(sin) * self._cols
        cols = per_image(-sin) * self._rows + per_image(cos) * self._cols
        rows += per_image(centre - row_shift)
        cols += per_image(centre - col_shift)
        return rows, cols

    def resample(self, X: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Bilinear interpolation of each image of ``X`` at its ``(rows, cols)`` coordinates."""
        n, side = X.shape[0], self.side
        # A ring of background before the image and two after it: every coordinate, clipped
        # into [0, side + 1], has its four neighbours inside, and beyond the image reads only
        # background.
        padded_side = side + 3
        padded = np.full((n, padded_side, padded_side), self.background, dtype=self.dtype)
        padded[:, 1 : side + 1, 1 : side + 1] = X.reshape(n, side, side)
        rows = np.clip(rows + 1, 0, side + 1)
        cols = np.clip(cols + 1, 0, side + 1)
        row_floor, col_floor = np.floor(rows), np.floor(cols)
        row_weight, col_weight = rows - row_floor, cols - col_floor  # in the batch's dtype
        row0, col0 = row_floor.astype(np.intp), col_floor.astype(np.intp)
        corner = (np.arange(n) * padded_side**2)[:, None, None] + row0 * padded_side + col0
        flat = padded.reshape(-1)
        upper_left, upper_right = flat[corner], flat[corner + 1]
        lower_left, lower_right = flat[corner + padded_side], flat[corner + padded_side + 1]
        upper = upper_left + (upper_right - upper_left) * col_weight
        lower = lower_left + (lower_right - lower_left) * col_weight
        return (upper + (lower - upper) * row_weight).reshape(n, side * side)


def _gaussian_matrix(side: int, sigma: float, dtype: np.dtype) -> np.ndarray:
    """``G`` with ``G @ f`` = ``scipy.ndimage.gaussian_filter1d(f, sigma, mode="constant")``.

    Truncated at 4 sigma as scipy does; zero outside the image.
    """
    offsets = np.subtract.outer(np.arange(side), np.arange(side))
    radius = int(4 * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    matrix = np.where(np.abs(offsets) <= radius, taps[np.clip(offsets + radius, 0, 2 * radius)], 0)
    return matrix.astype(dtype)


def image_side(n_features: int) -> int | None:
    """The side of square images with ``n_features`` pixels, or None if not a square."""
    side = math.isqrt(n_features)
    return side if side * side == n_features else None
