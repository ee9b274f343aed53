"""Augmentations and stain normalisation: closed forms on Beer-Lambert images, identities, label consistency."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.color import rgb2hed, rgb_from_hed

from domains.nuclei.augment import (
    AugmentConfig,
    MacenkoNormalizer,
    Photometric,
    hed_jitter,
    macenko_stains,
    order_stains,
    zoom,
)
from domains.nuclei.data import NucleiTiles, hover_maps

H_OD, E_OD = rgb_from_hed[0], rgb_from_hed[1]


def _beer_lambert(stains: np.ndarray, seed: int = 0, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """An H&E-like tile: blobs of haematoxylin on an eosin background, imaged with I0 = 240 (log10 OD)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    h = np.zeros((size, size))
    for _ in range(12):
        r, c = rng.uniform(0, size, 2)
        h += 1.2 * np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * rng.uniform(2, 5) ** 2))
    # eosin where haematoxylin is weak: both stains have near-pure pixels, which Macenko's extreme angles need
    e = (0.25 + 0.15 * rng.random((size, size))) * np.clip(1 - h / 0.5, 0, 1)
    conc = np.stack([h, e], -1)
    rgb = 240 * 10 ** (-(conc @ stains))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), conc


def test_hed_jitter_is_identity_without_jitter_and_scales_haematoxylin_alone():
    image, _ = _beer_lambert(np.stack([H_OD, E_OD]) / np.linalg.norm([H_OD, E_OD], axis=1, keepdims=True))
    same = hed_jitter(image, [1, 1, 1], [0, 0, 0])
    assert np.abs(same.astype(int) - image).max() <= 1  # one grey level of rounding
    darker = hed_jitter(image, [1.5, 1, 1], [0, 0, 0])
    before, after = rgb2hed(image), rgb2hed(darker)
    nuclei = before[..., 0] > np.percentile(before[..., 0], 90)
    # skimage's HED deconvolution (natural log, same Ruifrok-Johnston matrix) sees H x1.5 and E unchanged
    assert np.median(after[..., 0][nuclei] / before[..., 0][nuclei]) == pytest.approx(1.5, rel=0.05)
    assert np.median(np.abs(after[..., 1] - before[..., 1])) < 0.01


def test_zoom_crops_and_resizes_labels_by_nearest_neighbour():
    inst = np.zeros((32, 32), np.int32)
    inst[0:8, 0:8], inst[10:14, 20:30] = 1, 2
    types = (inst > 0).astype(np.int32) * 3
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    img1, inst1, types1 = zoom(image, inst, types, 1.0, 0.3, 0.7)
    np.testing.assert_array_equal(inst1, inst)
    assert np.abs(img1.astype(int) - image).max() <= 1
    img2, inst2, types2 = zoom(image, inst, types, 2.0, 0.0, 0.0)  # the top-left 16x16, doubled
    np.testing.assert_array_equal(inst2, np.kron(inst[:16, :16], np.ones((2, 2), np.int32)))
    assert set(np.unique(inst2)) == {0, 1} and np.all(types2[inst2 > 0] == 3)  # nucleus 2 lies outside the crop


def test_photometric_is_seeded_and_identity_when_switched_off():
    image, _ = _beer_lambert(np.stack([H_OD, E_OD]))
    off = AugmentConfig(hed=0, brightness=0, contrast=0, saturation=0, hue=0, p_blur=0, p_jpeg=0, p_noise=0)
    np.testing.assert_array_equal(Photometric(off)(image), image)
    on = AugmentConfig(p_blur=1, p_jpeg=1, p_noise=1)
    torch.manual_seed(3)
    a = Photometric(on)(image)
    torch.manual_seed(3)
    b = Photometric(on)(image)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.uint8 and a.shape == image.shape and np.abs(a.astype(int) - image).mean() > 1


def test_augmented_tiles_keep_hover_maps_consistent_with_the_zoomed_instances():
    inst = np.zeros((48, 48), np.int32)
    for i, (r, c) in enumerate([(10, 10), (12, 30), (35, 20), (30, 40)], start=1):
        inst[r - 5 : r + 5, c - 6 : c + 6] = i
    types = np.where(inst > 0, 2, 0)
    image = np.random.default_rng(1).integers(0, 256, (48, 48, 3)).astype(np.uint8)
    ds = NucleiTiles(lambda i: image, lambda i: (inst, types), np.zeros(1, int), ["t"], augment=True,
                     augmentation=AugmentConfig(zoom=(1.5, 1.5), p_zoom=1.0))
    torch.manual_seed(0)
    item = ds[0]
    got = item["inst_map"].numpy()
    assert not np.array_equal(np.sort(np.bincount(got.ravel())), np.sort(np.bincount(inst.ravel())))  # it was zoomed
    np.testing.assert_allclose(item["hv"].numpy(), hover_maps(got.astype(np.int32)), atol=1e-5)
    assert set(np.unique(item["type_map"].numpy()[got > 0])) == {2}


def test_macenko_normalisation_recovers_the_reference_staining():
    """Closed form: the same concentrations imaged with stain matrix B, normalised to A, give A's image."""
    a = np.stack([H_OD, E_OD]) / np.linalg.norm([H_OD, E_OD], axis=1, keepdims=True)
    b = np.stack([[0.55, 0.75, 0.37], [0.25, 0.85, 0.46]])
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    ref, _ = _beer_lambert(a)
    src, _ = _beer_lambert(b)
    # the reference stains are the rendering ones; their maxima in MONAI's convention (natural log, I0 = 240)
    od = -np.log((ref.reshape(-1, 3).astype(float) + 1).clip(max=240) / 240)
    max_c = np.percentile(np.linalg.lstsq(a.T, od.T, rcond=None)[0], 99, axis=1)
    out = MacenkoNormalizer(a, max_c)(src)
    assert np.abs(src.astype(float) - ref).mean() > 15.0  # grey levels before normalisation
    assert np.abs(out.astype(float) - ref).mean() < 3.0  # and after
    # Macenko's extreme angles find the rendering vectors of the source, haematoxylin first
    angles = np.degrees(np.arccos(np.clip(np.sum(macenko_stains(src) * b, 1), -1, 1)))
    assert angles.max() < 2.0


def test_stain_order_puts_haematoxylin_first():
    he = np.stack([E_OD, H_OD], 1)  # (3, 2) columns E, H: the order MONAI 1.6 returns on H&E
    np.testing.assert_array_equal(order_stains(he), np.stack([H_OD, E_OD], 1))
    np.testing.assert_array_equal(order_stains(np.stack([H_OD, E_OD], 1)), np.stack([H_OD, E_OD], 1))


def test_augmentation_is_a_function_of_seed_epoch_and_tile_so_a_resumed_epoch_sees_the_same_batches():
    """ResumableDataLoader skips indices without loading them: the draws must not depend on what came before."""
    from domains.nuclei.data import EpochTaggedSampler
    from suite.checkpoint import ResumableDataLoader

    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (6, 32, 32, 3)).astype(np.uint8)
    inst = np.zeros((32, 32), np.int32)
    inst[4:12, 5:14], inst[18:28, 16:25] = 1, 2
    ds = NucleiTiles(lambda i: images[i], lambda i: (inst, np.where(inst > 0, 1, 0)), np.zeros(6, int),
                     [str(i) for i in range(6)], augment=True, seed=7)
    torch.manual_seed(0)
    first = ds[8]["image"]
    state = torch.get_rng_state()
    torch.manual_seed(123)
    torch.testing.assert_close(ds[8]["image"], first)  # whatever the global RNG holds
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(123).get_state())  # and it is left alone
    assert ds[8]["index"] == 2 and not torch.equal(ds[2]["image"], first)  # epoch 1 of tile 2 is not epoch 0's

    def loader() -> ResumableDataLoader:
        out = ResumableDataLoader(ds, batch_size=2, sampler=EpochTaggedSampler(len(ds), seed=7))
        out.sampler.set_epoch(1)
        return out

    straight = [b["image"] for b in loader()]
    resumed = loader()
    resumed.load_state_dict({"batches_yielded": 1})
    torch.set_rng_state(state)
    rest = [b["image"] for b in resumed]
    assert len(rest) == 2
    for a, b in zip(straight[1:], rest):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
