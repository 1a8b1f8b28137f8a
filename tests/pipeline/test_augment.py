"""The training-batch distortions: geometry against scipy.ndimage, the engine hook, the config."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from mlp import MLP, fit
from pipeline.augment import Augmenter, image_side
from pipeline.config import AugmentConfig, PipelineConfig, preset
from pipeline.data import load_dataset
from pipeline.errors import ConfigError
from pipeline.record import fold_key
from pipeline.search import L2_KEY
from pipeline.training import augmenter_for, fold_data, train_fold

SIDE = 28
CENTRE = (SIDE - 1) / 2


def _augmenter(background: float = 0.0, dtype: str = "float64", **distortions) -> Augmenter:
    return Augmenter(AugmentConfig(**distortions), SIDE, background, dtype)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, SIDE * SIDE))


def _reference_affine(image, degrees, zoom, shift, background):
    """scipy.ndimage.affine_transform of one image: output o reads input M o + offset, for
    content that turns and grows about the centre, then moves by ``shift``."""
    angle = np.deg2rad(degrees)
    matrix = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]]) / zoom
    centre = np.array([CENTRE, CENTRE])
    offset = centre - matrix @ (centre + np.asarray(shift))
    return ndimage.affine_transform(
        image.reshape(SIDE, SIDE), matrix, offset, order=1, mode="grid-constant", cval=background
    ).reshape(-1)


# ----------------------------------------------------------------------------- geometry


def test_a_known_shift_moves_a_known_pixel():
    image = np.zeros((1, SIDE * SIDE))
    image[0, 10 * SIDE + 12] = 1.0
    aug = _augmenter(shift=3)
    rows, cols = aug.affine_coordinates(np.zeros(1), np.ones(1), np.array([[2.0, -3.0]]))
    moved = aug.resample(image, rows, cols).reshape(SIDE, SIDE)
    assert moved[12, 9] == pytest.approx(1.0), "2 rows down, 3 columns left"
    assert moved.sum() == pytest.approx(1.0), "an integer shift moves one pixel, nothing else"


@pytest.mark.parametrize(
    ("degrees", "zoom", "shift", "source", "target"),
    [(90.0, 1.0, (0.0, 3.0), (13, 20), (7, 16)),  # turned to (7, 13), then 3 columns right
     (0.0, 3.0, (0.0, 0.0), (13, 17), (12, 24)),  # 3x farther from the centre (13.5, 13.5)
     (180.0, 1.0, (-2.0, 1.0), (3, 5), (22, 23)),  # to (24, 22), then up 2 and right 1
     (-90.0, 1.0, (1.0, -2.0), (3, 5), (6, 22))],  # clockwise to (5, 24), down 1, left 2
)  # fmt: skip
def test_a_known_pixel_lands_where_the_map_says(degrees, zoom, shift, source, target):
    # Worked out by hand from "turn counter-clockwise as displayed, zoom about the centre,
    # then shift".
    image = _images(1)[0]
    aug = _augmenter(degrees=180)
    rows, cols = aug.affine_coordinates(np.array([degrees]), np.array([zoom]), np.array([shift]))
    moved = aug.resample(image[None], rows, cols).reshape(SIDE, SIDE)
    assert (rows[0][target], cols[0][target]) == pytest.approx(source, abs=1e-9)
    assert moved[target] == pytest.approx(image.reshape(SIDE, SIDE)[source], abs=1e-12)


def test_a_quarter_turn_is_numpys_rot90():
    image = _images(1)
    aug = _augmenter(degrees=90)
    rows, cols = aug.affine_coordinates(np.array([90.0]), np.ones(1), np.zeros((1, 2)))
    turned = aug.resample(image, rows, cols).reshape(SIDE, SIDE)
    np.testing.assert_allclose(turned, np.rot90(image.reshape(SIDE, SIDE)), atol=1e-12)


@pytest.mark.parametrize(
    ("degrees", "zoom", "shift"),
    [(0.0, 1.0, (0.0, 0.0)), (17.0, 1.0, (0.0, 0.0)), (-8.0, 1.15, (1.5, -2.25)),
     (33.0, 0.8, (-4.0, 3.5)), (0.0, 1.0, (40.0, 0.0))],
)  # fmt: skip
def test_affine_maps_match_scipy_ndimage(degrees, zoom, shift):
    # The background is a normalized 0 pixel (negative for standardized data).
    image, background = _images(1)[0], -0.42
    aug = _augmenter(background=background, degrees=45)
    rows, cols = aug.affine_coordinates(np.array([degrees]), np.array([zoom]), np.array([shift]))
    ours = aug.resample(image[None], rows, cols)[0]
    reference = _reference_affine(image, degrees, zoom, shift, background)
    np.testing.assert_allclose(ours, reference, atol=1e-9)


def test_random_distortions_match_scipy_at_the_same_coordinates():
    images = _images(6)
    aug = _augmenter(background=0.3, degrees=15, zoom=0.1, shift=2, elastic_alpha=20)
    rows, cols = aug.source_coordinates(6, np.random.default_rng(1))
    ours = aug.resample(images, rows, cols)
    for k in range(6):
        reference = ndimage.map_coordinates(
            images[k].reshape(SIDE, SIDE), [rows[k], cols[k]], order=1, mode="grid-constant",
            cval=0.3,
        )  # fmt: skip
        np.testing.assert_allclose(ours[k], reference.reshape(-1), atol=1e-9)


def test_the_elastic_field_is_scipys_gaussian_filter_scaled_by_alpha():
    alpha, sigma = 12.0, 3.0
    aug = _augmenter(elastic_alpha=alpha, elastic_sigma=sigma)
    rows, cols = aug.source_coordinates(3, np.random.default_rng(5))
    # The same draws again: no affine part, so the field follows three zero-width draws.
    rng = np.random.default_rng(5)
    rng.uniform(0, 0, 3), rng.uniform(1, 1, 3), rng.uniform(0, 0, (3, 2))
    noise = rng.uniform(-1, 1, (2, 3, SIDE, SIDE))
    smoothed = ndimage.gaussian_filter(noise, sigma=(0, 0, sigma, sigma), mode="constant")
    grid_rows, grid_cols = np.meshgrid(np.arange(SIDE), np.arange(SIDE), indexing="ij")
    np.testing.assert_allclose(rows - grid_rows, alpha * smoothed[0], atol=1e-9)
    np.testing.assert_allclose(cols - grid_cols, alpha * smoothed[1], atol=1e-9)


def test_no_distortion_is_the_identity_and_the_input_is_left_alone():
    images = _images(4)
    before = images.copy()
    out = _augmenter(shift=0.0)(images, np.random.default_rng(0))
    np.testing.assert_allclose(out, images, atol=1e-12)
    assert out is not images
    np.testing.assert_array_equal(images, before)


def test_flip_mirrors_about_half_of_the_images_left_right_and_nothing_else():
    images = _images(400)
    out = _augmenter(flip=True)(images, np.random.default_rng(0))
    mirrored = images.reshape(-1, SIDE, SIDE)[:, :, ::-1].reshape(len(images), -1)
    is_mirror = np.isclose(out, mirrored, atol=1e-12).all(axis=1)
    is_same = np.isclose(out, images, atol=1e-12).all(axis=1)
    assert (is_mirror ^ is_same).all(), "each image is either mirrored or left as it was"
    assert 160 < is_mirror.sum() < 240, "with probability 1/2"


def test_flipped_and_shifted_content_lands_near_the_mirrored_column():
    image = np.zeros((1, SIDE * SIDE))
    image[0, 10 * SIDE + 4] = 1.0  # row 10, column 4: mirrored to column 23
    aug = _augmenter(flip=True, shift=1)
    columns = []
    for seed in range(40):
        out = aug(image, np.random.default_rng(seed)).reshape(SIDE, SIDE)
        columns.append((out.sum(axis=0) * np.arange(SIDE)).sum() / out.sum())
    columns = np.array(columns)
    assert ((np.abs(columns - 4) <= 1) | (np.abs(columns - 23) <= 1)).all()
    assert (columns > 20).any() and (columns < 7).any()


def test_strength_scales_every_magnitude_and_zero_turns_everything_off():
    images = _images(6)
    strong = dict(degrees=10, zoom=0.1, shift=2, elastic_alpha=8, elastic_sigma=3)
    half = _augmenter(strength=0.5, **strong)(images, np.random.default_rng(5))
    halved = _augmenter(degrees=5, zoom=0.05, shift=1, elastic_alpha=4, elastic_sigma=3)
    np.testing.assert_allclose(half, halved(images, np.random.default_rng(5)), atol=1e-12)
    off = AugmentConfig(strength=0, flip=True, **strong)
    assert not off.enabled and AugmentConfig(flip=True).enabled
    with pytest.raises(ValueError, match="zoom"):
        AugmentConfig(zoom=0.5, strength=2)


def test_a_shift_off_the_image_leaves_only_background():
    out = _augmenter(background=-0.42, shift=60)(_images(50), np.random.default_rng(0))
    far = np.abs(out - -0.42).max(axis=1) < 1e-12
    assert far.sum() > 20, "most shifts beyond 28 pixels leave nothing of the digit"


def test_a_large_batch_is_distorted_in_chunks_with_the_same_draws():
    images = _images(7)
    whole = _augmenter(degrees=10, zoom=0.1, elastic_alpha=8)
    chunker = _augmenter(degrees=10, zoom=0.1, elastic_alpha=8)
    chunker.CHUNK = 3  # chunks of 3, 3 and 1 rows
    chunked = chunker(images, np.random.default_rng(9))
    rng = np.random.default_rng(9)
    expected = np.concatenate([whole(images[i : i + 3], rng) for i in (0, 3, 6)])
    np.testing.assert_array_equal(chunked, expected)


def test_float32_batches_stay_float32():
    aug = _augmenter(dtype="float32", degrees=10, elastic_alpha=8)
    out = aug(_images(3).astype(np.float32), np.random.default_rng(0))
    assert out.dtype == np.float32 and out.shape == (3, SIDE * SIDE)


def test_the_same_stream_gives_the_same_distortions():
    aug = _augmenter(degrees=10, zoom=0.1, shift=2, elastic_alpha=8)
    a = aug(_images(5), np.random.default_rng(3))
    b = aug(_images(5), np.random.default_rng(3))
    c = aug(_images(5), np.random.default_rng(4))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_image_side():
    assert image_side(784) == 28 and image_side(1) == 1 and image_side(783) is None


# ----------------------------------------------------------------------------- the engine hook


def _engine_data(n=300, features=16, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, features)).astype(np.float32)
    return X, (X[:, 0] > 0).astype(np.int64)


def _net(features=16):
    return MLP(n_features=features, hidden_sizes=[8], n_classes=2, seed=0)


def test_fit_calls_augment_on_training_batches_only():
    X, y = _engine_data()
    X_val, y_val = _engine_data(n=90, seed=1)
    X_before, X_val_before = X.copy(), X_val.copy()
    seen = []

    def destroy(batch, rng):
        seen.append(batch.shape[0])
        return np.zeros_like(batch)  # the network learns nothing of the inputs

    net = _net()
    history = fit(net, X, y, epochs=2, batch_size=64, augment=destroy, X_val=X_val, y_val=y_val)
    assert seen == [64, 64, 64, 64, 44] * 2, "every training batch, once per epoch"
    np.testing.assert_array_equal(X, X_before)
    np.testing.assert_array_equal(X_val, X_val_before)
    # Validation scores the untouched X_val with the trained network.
    accuracy = float(np.mean(net.predict(X_val) == y_val))
    assert history.records[-1]["val_accuracy"] == pytest.approx(accuracy)


def test_full_batch_training_augments_a_copy_of_the_whole_set():
    X, y = _engine_data()
    X_before = X.copy()
    seen = []

    def shift_all(batch, rng):
        seen.append(batch.shape[0])
        return batch + 1.0

    fit(_net(), X, y, epochs=2, optimizer="gd", batch_size=None, augment=shift_all)
    assert seen == [300, 300]
    np.testing.assert_array_equal(X, X_before)


def test_an_identity_augment_trains_exactly_as_without_one():
    # The augmentation stream is spawned last: shuffling and dropout stay those of the seed.
    X, y = _engine_data()
    plain, augmented = _net(), _net()
    fit(plain, X, y, epochs=3, batch_size=32, dropout=0.3, seed=7)
    fit(augmented, X, y, epochs=3, batch_size=32, dropout=0.3, seed=7,
        augment=lambda batch, rng: batch.copy())  # fmt: skip
    for a, b in zip(plain.params, augmented.params, strict=True):
        np.testing.assert_array_equal(a, b)


def test_augment_gets_its_own_seeded_stream_and_continues_across_calls():
    X, y = _engine_data()

    def jitter(batch, rng):
        return batch + rng.normal(0, 0.1, batch.shape).astype(batch.dtype)

    straight, again, split = _net(), _net(), _net()
    fit(straight, X, y, epochs=4, batch_size=32, seed=3, augment=jitter)
    fit(again, X, y, epochs=4, batch_size=32, seed=3, augment=jitter)
    first = fit(split, X, y, epochs=4, batch_size=32, seed=3, augment=jitter, stop_epoch=2)
    fit(split, X, y, epochs=4, batch_size=32, seed=3, augment=jitter, state=first.state)
    for a, b, c in zip(straight.params, again.params, split.params, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize(
    ("augment", "message"),
    [("shift", "augment must be callable"),
     (lambda batch, rng: batch[:, :3], r"augment must return an array of shape \(64, 16\)"),
     (lambda batch, rng: batch.tolist(), "augment must return an array"),
     (lambda batch, rng: batch.astype(np.complex64), "augment must return real numbers"),
     (lambda batch, rng: batch.astype(object), "augment must return real numbers")],
)  # fmt: skip
def test_a_bad_augment_is_refused(augment, message):
    from mlp import MLPError

    X, y = _engine_data()
    with pytest.raises(MLPError, match=message):
        fit(_net(), X, y, epochs=1, batch_size=64, augment=augment)


# ----------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def sample_dataset():
    """The bundled sample, cut to 1000 training and 200 test images to stay fast."""
    return load_dataset("mnist-sample").limit(1000, 200)


def _sample_config(**augment) -> PipelineConfig:
    return preset("quick").replace(
        {
            "training.epochs": 2,
            "execution.runner": "sequential",
            **{f"augment.{k}": v for k, v in augment.items()},
        }  # fmt: skip
    )


def test_augmentation_off_by_default_and_in_the_fold_key_only_when_on():
    plain = preset("default")
    assert not plain.augment.enabled
    on = plain.replace({"augment.shift": 2})
    candidate = {L2_KEY: 1e-3}
    key = fold_key(plain, "f", candidate, 0)
    assert fold_key(plain.replace({"augment.elastic_sigma": 6}), "f", candidate, 0) == key, (
        "a setting of an unused augmentation changes no result"
    )
    assert fold_key(on, "f", candidate, 0) != key
    assert fold_key(on.replace({"augment.shift": 3}), "f", candidate, 0) != fold_key(
        on, "f", candidate, 0
    )
    off = on.replace({"augment.strength": 0})
    assert fold_key(off, "f", candidate, 0) == key, "strength 0 is no augmentation"


def test_the_background_is_a_normalized_empty_pixel(sample_dataset):
    config = _sample_config(shift=2)
    for normalization in ("scale", "standardize"):
        config = config.replace({"data.normalization": normalization})
        X_train, _, _, _, normalizer = fold_data(sample_dataset, config, 0)
        aug = augmenter_for(config, normalizer, X_train.shape[1])
        empty = normalizer.transform(np.zeros((1, 784), np.uint8), dtype="float64")[0, 0]
        assert aug.background == pytest.approx(empty)
        assert aug.dtype == np.float32
        # MNIST's corner pixel is always empty: the background is what the data has there.
        assert X_train[:, 0].min() == pytest.approx(empty, abs=1e-6)
    assert augmenter_for(preset("quick"), normalizer, 784) is None


def test_a_fold_trains_with_augmentation_and_validates_on_clean_data(sample_dataset):
    candidate = {L2_KEY: 1e-3}
    plain = train_fold(_sample_config(), sample_dataset, candidate, 0)
    augmented = train_fold(_sample_config(degrees=10, shift=2), sample_dataset, candidate, 0)
    again = train_fold(_sample_config(degrees=10, shift=2), sample_dataset, candidate, 0)
    assert augmented.seed == plain.seed, "the seed comes from the candidate and fold"
    assert augmented.history["train_loss"] != plain.history["train_loss"]
    assert augmented.history == {**again.history, "seconds": augmented.history["seconds"],
                                 "wall_time": augmented.history["wall_time"]}  # fmt: skip
    assert 0.5 < augmented.val_accuracy <= 1


def test_standardize_pixel_is_refused_with_augmentation():
    with pytest.raises(ConfigError, match="augment needs data.normalization scale or standardize"):
        preset("default").replace({"augment.degrees": 5, "data.normalization": "standardize-pixel"})
    with pytest.raises(ConfigError, match="augment needs"):
        preset("default").replace(
            {"search.space": {"augment.shift": [0, 2]}, "data.normalization": "standardize-pixel"}
        )


@pytest.mark.parametrize(
    ("key", "value"),
    [("augment.degrees", -1), ("augment.degrees", 181), ("augment.zoom", 1),
     ("augment.shift", -0.5), ("augment.elastic_alpha", -1), ("augment.elastic_sigma", 0),
     ("augment.flip", "sometimes")],
)  # fmt: skip
def test_out_of_range_distortions_are_refused(key, value):
    with pytest.raises(ConfigError, match=key.split(".")[1]):
        preset("default").replace({key: value})


def test_augment_settings_can_be_searched():
    config = preset("quick").replace({"search.space": {"augment.degrees": [0, 10]}})
    from pipeline.search import candidates

    assert sorted(c["augment.degrees"] for c in candidates(config)) == [0, 0, 10, 10]
