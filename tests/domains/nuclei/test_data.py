"""Nuclei data: PanNuke / CoNSeP readers on files written in exactly their formats, the generator,
HoVer targets under augmentation, and the group split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.io import loadmat, savemat
from skimage.color import rgb2hed, rgb_from_hed

from domains.nuclei.data import (
    CONSEP_CONVENTIONS,
    AugmentConfig,
    MacenkoNormalizer,
    NucleiData,
    NucleiFormatError,
    NucleiTiles,
    Photometric,
    dihedral,
    hed_jitter,
    hover_maps,
    macenko_stains,
    order_stains,
    pannuke_maps,
    read_consep,
    read_pannuke_fold,
    tile_image,
    zoom,
)
from domains.nuclei.synth import CLASS_NAMES, generate_pannuke


def _write_pannuke_fold(root, n=3, size=32):
    """The official zip layout: images/fold1/{images,types}.npy and masks/fold1/masks.npy, float64."""
    images = np.random.default_rng(0).uniform(0, 255, (n, size, size, 3))
    masks = np.zeros((n, size, size, 6))
    # tile 0: id 3 in the inflammatory channel (1), id 3 again in the epithelial channel (4):
    # PanNuke ids are per image but nothing stops two channels reusing one
    masks[0, 2:6, 2:6, 1] = 3
    masks[0, 10:14, 10:14, 4] = 3
    masks[0, 20:25, 3:9, 0] = 7  # a neoplastic nucleus
    masks[..., 5] = (masks[..., :5].sum(-1) == 0).astype(float)  # channel 5: background
    (root / "images" / "fold1").mkdir(parents=True)
    (root / "masks" / "fold1").mkdir(parents=True)
    np.save(root / "images" / "fold1" / "images.npy", images)
    np.save(root / "images" / "fold1" / "types.npy", np.array(["Breast", "Colon", "Breast"][:n]))
    np.save(root / "masks" / "fold1" / "masks.npy", masks)
    return images, masks


def test_pannuke_reader_official_layout(tmp_path):
    root = tmp_path / "Fold 1"
    images, masks = _write_pannuke_fold(root)
    fold = read_pannuke_fold(root)
    assert len(fold) == 3 and list(fold.types) == ["Breast", "Colon", "Breast"]
    np.testing.assert_array_equal(np.asarray(fold.images[1]), images[1])
    inst, types = fold.maps(0)
    # three distinct nuclei although two share id 3 in the file
    assert len(np.unique(inst[inst > 0])) == 3
    # channel semantics: 0 neoplastic -> 1, 1 inflammatory -> 2, 4 epithelial -> 5
    assert np.all(types[20:25, 3:9] == 1) and CLASS_NAMES[0] == "neoplastic"
    assert np.all(types[2:6, 2:6] == 2) and CLASS_NAMES[1] == "inflammatory"
    assert np.all(types[10:14, 10:14] == 5) and CLASS_NAMES[4] == "epithelial"
    assert np.array_equal(types == 0, masks[0, ..., 5] == 1)  # background channel agrees
    assert fold.groups is None


def test_pannuke_reader_rejects_wrong_channels(tmp_path):
    root = tmp_path / "fold"
    root.mkdir()
    np.save(root / "images.npy", np.zeros((2, 8, 8, 3)))
    np.save(root / "masks.npy", np.zeros((2, 8, 8, 5)))
    np.save(root / "types.npy", np.array(["Breast", "Colon"]))
    with pytest.raises(ValueError, match=r"masks\.npy.*\(N, H, W, 6\)"):
        read_pannuke_fold(root)
    (root / "masks.npy").unlink()
    with pytest.raises(FileNotFoundError, match="masks.npy"):
        read_pannuke_fold(root)
    np.save(root / "masks.npy", np.zeros((2, 8, 8, 6)))
    np.save(root / "types.npy", np.array(["Breast", None], dtype=object))  # would need unpickling
    with pytest.raises(ValueError, match=r"types\.npy.*string array"):
        read_pannuke_fold(root)


def test_pannuke_maps_later_channel_wins_like_pannuke():
    mask = np.zeros((6, 6, 6))
    mask[0:3, 0:3, 0] = 1  # neoplastic
    mask[2:4, 2:4, 2] = 1  # connective, overlapping the neoplastic one at (2, 2)
    inst, types = pannuke_maps(mask)
    assert types[2, 2] == 3 and types[0, 0] == 1 and inst[2, 2] != inst[0, 0]


def _write_consep(root, size=40):
    from PIL import Image

    (root / "Images").mkdir(parents=True)
    (root / "Labels").mkdir()
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[..., :3] = np.random.default_rng(1).integers(0, 255, (size, size, 3))
    rgba[..., 3] = 255  # CoNSeP's PNGs carry an alpha channel
    Image.fromarray(rgba).save(root / "Images" / "train_1.png")
    inst = np.zeros((size, size))
    inst[2:8, 2:8] = 1  # type 2: inflammatory
    inst[30:36, 30:38] = 2  # type 4: malignant epithelial -> neoplastic
    inst[12:16, 20:30] = 3  # type 6: muscle -> connective
    inst_type = np.array([[2.0], [4.0], [6.0]])
    type_map = np.zeros((size, size))
    for i, t in enumerate(inst_type[:, 0], start=1):
        type_map[inst == i] = t
    centroid = np.array([[4.5, 4.5], [33.5, 32.5], [24.5, 13.5]])  # (x, y) as HoVer-Net writes them
    savemat(root / "Labels" / "train_1.mat", {"inst_map": inst, "type_map": type_map, "inst_type": inst_type,
                                              "inst_centroid": centroid})
    return rgba


def test_consep_reader_hovernet_convention_by_default(tmp_path):
    rgba = _write_consep(tmp_path / "Train")
    (img,) = read_consep(tmp_path / "Train")
    assert img.name == "train_1" and img.image.shape == (40, 40, 3)
    np.testing.assert_array_equal(img.image, rgba[..., :3])
    # HoVer-Net's merging: 2 inflammatory -> 2, 4 malignant epithelial -> 3 epithelial, 6 muscle -> 4 spindle-shaped
    assert CONSEP_CONVENTIONS["hovernet"][0] == ("other", "inflammatory", "epithelial", "spindle-shaped")
    assert img.type_map[4, 4] == 2 and img.type_map[33, 33] == 3 and img.type_map[14, 25] == 4
    assert set(np.unique(img.inst_map)) == {0, 1, 2, 3}
    tiles = tile_image(img.image, img.inst_map, img.type_map, size=32)
    assert len(tiles) == 4  # starts 0 and 8 in each direction cover 40 px
    assert all(t[1].max() == len(np.unique(t[1])) - 1 for t in tiles)  # relabelled 1..n per tile


def test_consep_reader_pannuke_convention_is_explicit(tmp_path):
    _write_consep(tmp_path / "Train")
    (img,) = read_consep(tmp_path / "Train", convention="pannuke")
    # malignant epithelial -> neoplastic (1), inflammatory (2), muscle -> connective (3)
    assert img.type_map[4, 4] == 2 and img.type_map[33, 33] == 1 and img.type_map[14, 25] == 3
    (custom,) = read_consep(tmp_path / "Train", mapping={2: 1, 4: 2, 6: 3, 1: 4, 3: 4, 5: 3, 7: 3})
    assert custom.type_map[4, 4] == 1 and custom.type_map[33, 33] == 2
    with pytest.raises(ValueError, match="convention must be one of"):
        read_consep(tmp_path / "Train", convention="lizard")


def test_consep_classes_come_from_type_map_with_a_warning_naming_file_and_ids(tmp_path):
    _write_consep(tmp_path / "Train")
    mat = loadmat(tmp_path / "Train" / "Labels" / "train_1.mat")
    mat["inst_type"] = np.array([[2.0], [3.0], [6.0]])  # id 2 listed as healthy epithelial, type_map says 4
    savemat(tmp_path / "Train" / "Labels" / "train_1.mat", {k: v for k, v in mat.items() if not k.startswith("__")})
    with pytest.warns(UserWarning, match=r"train_1\.mat: inst_type disagrees .*instance ids \[2\]"):
        (img,) = read_consep(tmp_path / "Train", convention="pannuke")
    assert img.type_map[33, 33] == 1  # type_map's 4 (malignant) -> neoplastic, not inst_type's 3 -> epithelial


def test_consep_reader_errors(tmp_path):
    _write_consep(tmp_path / "Train")
    savemat(tmp_path / "Train" / "Labels" / "train_1.mat", {"inst_map": np.zeros((40, 40))})
    with pytest.raises(NucleiFormatError, match=r"train_1\.mat: field 'type_map'"):
        read_consep(tmp_path / "Train")
    inst = np.zeros((40, 40))
    inst[2:8, 2:8] = 1
    savemat(tmp_path / "Train" / "Labels" / "train_1.mat", {"inst_map": inst, "type_map": inst * 9})
    with pytest.raises(NucleiFormatError, match=r"train_1\.mat: field 'type_map': expected CoNSeP types"):
        read_consep(tmp_path / "Train")
    with pytest.raises(FileNotFoundError, match="Images"):
        read_consep(tmp_path / "nowhere")


def test_consep_datamodule_has_four_classes(tmp_path):
    _write_consep(tmp_path / "Train", size=40)
    dm = NucleiData(source="consep", path={"train": str(tmp_path / "Train"), "test": str(tmp_path / "Train")},
                    tile_size=32, fractions={"train": 0.5, "val": 0.5})
    assert dm.num_types == 4 and dm.class_names[3] == "spindle-shaped"
    assert NucleiData().num_types == 5


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    generate_pannuke(root, n_tiles=8, tiles_per_slide=4, size=256, seed=3)
    return root


def test_generator_is_seeded_and_in_pannuke_layout(generated, tmp_path):
    fold = read_pannuke_fold(generated)
    assert fold.images.shape == (8, 256, 256, 3) and fold.masks.shape == (8, 256, 256, 6)
    assert list(fold.groups) == [0, 0, 0, 0, 1, 1, 1, 1]
    m = np.asarray(fold.masks)
    # every nucleus pixel in exactly one class channel, channel 5 = background
    assert np.all((m[..., :5] > 0).sum(-1) == 1 - m[..., 5])
    generate_pannuke(tmp_path, n_tiles=2, tiles_per_slide=4, size=256, seed=3)  # same tiles again
    np.testing.assert_array_equal(np.load(tmp_path / "images.npy"), np.asarray(fold.images[:2]))


def test_generator_morphology_and_stain_physics(generated):
    from skimage.color import rgb2hed
    from skimage.measure import regionprops

    fold = read_pannuke_fold(generated)
    area = {c: [] for c in range(1, 6)}
    elong = {c: [] for c in range(1, 6)}
    touching = 0
    h_in, h_out = [], []
    for i in range(len(fold)):
        inst, types = fold.maps(i)
        for r in regionprops(inst):
            c = int(types[r.coords[0][0], r.coords[0][1]])
            area[c].append(r.area)
            elong[c].append(r.axis_major_length / max(r.axis_minor_length, 1))
        # two different nuclei 4-adjacent: touching or overlapping nuclei exist
        touching += int(np.sum((inst[:, 1:] != inst[:, :-1]) & (inst[:, 1:] > 0) & (inst[:, :-1] > 0)))
        hed = rgb2hed(np.asarray(fold.images[i]))[..., 0]
        h_in.append(hed[inst > 0].mean())
        h_out.append(hed[inst == 0].mean())
    med = {c: np.median(v) for c, v in area.items() if v}
    assert med[2] < med[5] < med[1]  # inflammatory < epithelial < neoplastic
    assert np.median(elong[3]) > 2.0 > np.median(elong[2])  # spindle fibroblasts, round lymphocytes
    assert touching > 0
    # Beer-Lambert + Ruifrok-Johnston: colour deconvolution finds haematoxylin in nuclei
    assert np.mean(h_in) > np.mean(h_out) + 0.03


def test_quantile_field_reproduces_the_given_quantiles():
    from domains.nuclei.synth import _quantile_field

    z = np.random.default_rng(0).standard_normal(200_000)
    q = np.array([0.04, 0.19, 0.43])  # the real background's 5 / 50 / 95 % (calibration.json): a long upper tail
    out = _quantile_field(z, q)
    # z is Gaussian, so its 5 / 50 / 95 % points (-1.645, 0, 1.645) land on q; sampling error ~0.003
    np.testing.assert_allclose(np.percentile(out, [5, 50, 95]), q, atol=0.005)
    assert out.min() >= 0  # concentrations are not negative


def test_background_haematoxylin_has_the_real_upper_tail():
    """Outside nuclei and glass, the generated haematoxylin's 95 % / 50 % ratio is the calibrated real one.

    Version 2 drew the median right and the tail short (ratio 1.84 against the real 2.28), so no dark,
    nucleus-free tissue existed in training, and on real H&E the model marked dark cytoplasm as nuclei."""
    from domains.nuclei.synth import _background, calibrated_stats

    st = calibrated_stats()
    qh = st.background_h
    rng = np.random.default_rng(1)
    ratios = []
    for _ in range(12):
        _, haem, glass = _background(rng, 256, rng.uniform(0, np.pi), st, 1.0)
        tissue = haem[~glass]
        ratios.append(np.percentile(tissue, 95) / np.percentile(tissue, 50))
    assert np.median(ratios) == pytest.approx(qh[2] / qh[1], rel=0.1)


def test_hover_maps_follow_dihedral_transforms():
    inst = np.zeros((24, 24), np.int32)
    inst[2:9, 3:15] = 1
    inst[12:22, 5:11] = 2
    inst[14:18, 11:20] = 3
    types = (inst > 0).astype(np.int32)
    hv = hover_maps(inst)
    image = np.zeros((24, 24, 3), np.uint8)
    for k in range(8):
        i2, t2, hv2, _ = dihedral(k, inst, types, hv, image)
        np.testing.assert_allclose(hv2, hover_maps(i2), atol=1e-5, err_msg=f"transform {k}")


def test_datamodule_splits_by_slide(tmp_path, monkeypatch):
    monkeypatch.setenv("SUITE_DATA_DIR", str(tmp_path))
    dm = NucleiData(n_tiles=12, tiles_per_slide=2, tile_size=64, batch_size=2,
                    fractions={"train": 0.5, "val": 0.25, "test": 0.25})
    dm.setup("fit")
    assert (tmp_path / "generated" / "nuclei").is_dir()
    fold = read_pannuke_fold(dm.generated_root())
    slides = {n: {int(fold.groups[int(i.split(":")[1])]) for i in dm.splits[n].ids} for n in ("train", "val", "test")}
    assert not (slides["train"] & slides["val"]) and not (slides["train"] & slides["test"])
    assert set(dm.split_hashes) == {"train", "val", "test"} and len(set(dm.split_hashes.values())) == 3
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 64, 64) and batch["hv"].shape == (2, 2, 64, 64)
    assert batch["hv"].abs().max() <= 1.0 and set(batch["boundary"].unique().tolist()) <= {0.0, 1.0}


def test_datamodule_real_source_needs_a_train_or_val_folder():
    with pytest.raises(ValueError, match=r"data\.path needs a 'train' folder.*\['test'\]"):
        NucleiData(source="pannuke", path={"test": "Fold 3"})


# --------------------------------------------------------------------------------------------------
# Augmentations and stain normalisation: closed forms on Beer-Lambert images, identities, label consistency.


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
