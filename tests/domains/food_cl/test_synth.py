"""The food generator: seeded and order-independent, pools disjoint, the Food-101 layout, calibrated statistics."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from domains.food_cl.calibrate import spectral_slope
from domains.food_cl.readers import read_food101, read_image_folder
from domains.food_cl.synth import (
    _image_rng,
    colour_stats,
    generate_food101,
    generate_pretrain,
    long_tail_sizes,
    make_dishes,
    power_law,
    render,
    render_batch,
)

SMALL = dict(n_classes=4, size=16, train_max=6, train_min=2, n_val=1, n_test=2)


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generation_is_seeded(tmp_path):
    generate_food101(tmp_path / "a", seed=0, **SMALL)
    generate_food101(tmp_path / "b", seed=0, **SMALL)
    generate_food101(tmp_path / "c", seed=1, **SMALL)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b  # same seed: byte-identical images, lists and recipes
    assert a["meta/classes.txt"] != c["meta/classes.txt"] or a["recipes.json"] != c["recipes.json"]


def test_an_image_does_not_depend_on_its_batch():
    dish = make_dishes(3)[2]
    rngs = lambda: [_image_rng(0, "continual", 2, "train", i) for i in range(5)]  # noqa: E731
    batch = render_batch(dish, rngs(), 24)
    alone = render(dish, _image_rng(0, "continual", 2, "train", 3), 24)
    assert batch.shape == (5, 24, 24, 3) and batch.dtype == np.uint8
    assert np.abs(batch[3].astype(int) - alone).max() <= 1  # same stream; batched FFTs may round differently
    assert not np.array_equal(batch[0], batch[1])  # servings differ (pose, light, jitter)
    assert batch.std() > 10  # an image, not a flat colour


def test_pretraining_pool_is_disjoint(tmp_path):
    cont, pre = make_dishes(40, pool="continual"), make_dishes(40, pool="pretrain")
    assert not {d.name for d in cont} & {d.name for d in pre}
    recipe = lambda d: tuple(v for k, v in dataclasses.asdict(d).items() if k != "name")  # noqa: E731
    assert not {recipe(d) for d in cont} & {recipe(d) for d in pre}
    assert len({recipe(d) for d in cont}) == 40
    assert make_dishes(3, pool="pretrain") == pre[:3]  # a recipe does not depend on how many are drawn
    generate_food101(tmp_path / "food", **SMALL)
    generate_pretrain(tmp_path / "pre", n_classes=3, size=16, n_train=2, n_val=1)
    food = read_food101(tmp_path / "food")
    train, val = read_image_folder(tmp_path / "pre" / "train"), read_image_folder(tmp_path / "pre" / "val")
    assert not set(train.classes) & set(food["train"].classes)
    assert train.counts().tolist() == [2, 2, 2] and val.classes == train.classes


def test_food101_layout_and_long_tail(tmp_path):
    generate_food101(tmp_path, n_classes=5, size=16, train_max=9, train_min=3, n_val=2, n_test=3, seed=4)
    splits = read_food101(tmp_path)  # the Food-101 reader reads the generated set as it is
    assert set(splits) == {"train", "val", "test"}
    expected = long_tail_sizes(5, 9, 3, seed=4)
    assert splits["train"].counts().tolist() == expected.tolist()
    assert splits["test"].counts().tolist() == [3] * 5 and splits["val"].counts().tolist() == [2] * 5
    assert (tmp_path / "meta" / "labels.txt").read_text().count("\n") == 5


def test_long_tail_sizes_formula():
    sizes = long_tail_sizes(5, 200, 5, seed=0)
    # 200 * (5/200)^(rank/4) for ranks 0..4 = 200, 79.5, 31.6, 12.6, 5
    assert sorted(sizes.tolist()) == [5, 13, 32, 80, 200]
    with pytest.raises(ValueError, match="n_min <= n_max"):
        long_tail_sizes(3, 2, 5)


def test_colour_statistics_and_texture_law():
    stats = colour_stats()
    kinds = {s.kind for s in stats.values()}
    assert kinds == {"food", "ceramic", "table"} and sum(s.kind == "food" for s in stats.values()) >= 8
    for s in stats.values():
        cov = np.array(s.lab_cov)
        assert np.allclose(cov, cov.T) and np.linalg.eigvalsh(cov).min() > 0  # a covariance matrix
        assert 0 <= s.lab_mean[0] <= 100
    # the generator's textures follow the fitted law: the calibration's estimator recovers beta
    rng = np.random.default_rng(0)
    for beta in (1.0, 2.5):
        est = np.mean([spectral_slope(power_law(rng.standard_normal((64, 64)), beta)) for _ in range(8)])
        assert est == pytest.approx(beta, abs=0.3)


def _corners(images: np.ndarray) -> np.ndarray:
    """(n, 32, 3) pixels of the top-left and bottom-right 4 x 4 corners: the table or backdrop."""
    images = images.astype(float)
    n = len(images)
    return np.concatenate([images[:, :4, :4].reshape(n, -1, 3), images[:, -4:, -4:].reshape(n, -1, 3)], 1)


def test_studio_setting_is_another_photographic_domain(tmp_path):
    """Pretraining dishes are studio shots (light grey backdrop), continual ones restaurant photos
    (saturated wooden tables), from the same random draws."""
    dish = make_dishes(1, 0, "pretrain")[0]
    rngs = lambda: [_image_rng(0, "pretrain", 0, "train", i) for i in range(8)]  # noqa: E731
    studio, restaurant = render_batch(dish, rngs(), 32, "studio"), render_batch(dish, rngs(), 32, "restaurant")
    np.testing.assert_array_equal(studio, render_batch(dish, rngs(), 32, "studio"))  # seeded
    s, r = _corners(studio), _corners(restaurant)
    saturation = lambda px: float((px.max(-1) - px.min(-1)).mean())  # noqa: E731
    assert saturation(s) < 50 < 80 < saturation(r)  # grey backdrop vs wood
    assert s.mean() > 140 > r.mean()  # a bright backdrop vs a darker table
    with pytest.raises(ValueError, match="setting must be 'restaurant' or 'studio'"):
        render_batch(dish, rngs(), 32, "kitchen")
    # generate_pretrain photographs in the studio by default
    generate_pretrain(tmp_path / "pre", n_classes=1, size=16, n_train=2, n_val=1, seed=0)
    first = next(iter(sorted((tmp_path / "pre" / "train").iterdir()))).name
    from PIL import Image

    written = np.asarray(Image.open(tmp_path / "pre" / "train" / first / "00000.jpg").convert("RGB"))
    error = {setting: np.abs(written.astype(int) - render_batch(dish, [_image_rng(0, "pretrain", 0, "train", 0)], 16, setting)[0]).mean()
             for setting in ("studio", "restaurant")}
    assert error["studio"] < 8 and error["studio"] < error["restaurant"] / 3  # the studio image, up to 16-px JPEG
