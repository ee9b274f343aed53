"""Nuclei readers on damaged files: the documented values or one NucleiFormatError naming the file.

Each reader is fuzzed with hypothesis (truncate, flip bytes, inject NaN / inf, change dtype, shape
and keys). The property: the reader returns what the format's own loader (numpy, scipy, PIL)
reads from the damaged file, converted as documented, or raises NucleiFormatError whose message
names the file; it never lets a library error escape and never accepts values it would misuse.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.io import loadmat, savemat

from domains.nuclei.formats import NucleiFormatError, pannuke_maps, read_hovernet_mat, read_pannuke_fold, read_rgb

# derandomized: the same 30 examples on every run, so CI cannot turn red by the draw of the day
FUZZ = settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _fold(root, images=None, masks=None, types=None):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    if images is None:
        images = rng.integers(0, 256, (2, 12, 12, 3)).astype(np.uint8)
    if masks is None:
        masks = np.zeros((2, 12, 12, 6))
        masks[0, 1:4, 1:4, 0], masks[0, 6:9, 6:10, 2], masks[1, 2:7, 3:5, 4] = 4, 2, 9
        masks[..., 5] = masks[..., :5].sum(-1) == 0
    np.save(root / "images.npy", images)
    np.save(root / "masks.npy", masks)
    np.save(root / "types.npy", np.array(["Breast", "Colon"]) if types is None else types)
    return images, masks


def _read_all(root):
    """Everything the DataModule reads from a fold: every checked tile and its maps."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fold = read_pannuke_fold(root)
        return fold, [(fold.image(i), *fold.maps(i)) for i in range(len(fold))]


def _expected(root):
    """What numpy itself reads from the (possibly damaged) files, converted as documented; None if invalid."""
    try:
        images = np.load(root / "images.npy", allow_pickle=False)
        masks = np.load(root / "masks.npy", allow_pickle=False)
        types = np.load(root / "types.npy", allow_pickle=False)
    except Exception:
        return None
    if images.ndim != 4 or images.shape[-1] != 3 or masks.ndim != 4 or masks.shape[-1] != 6:
        return None
    if types.dtype.kind not in "US" or types.shape != (len(images),) or masks.shape[:3] != images.shape[:3]:
        return None
    if not (np.issubdtype(images.dtype, np.number) and np.issubdtype(masks.dtype, np.number)):
        return None
    if np.iscomplexobj(images) or np.iscomplexobj(masks) or not np.isfinite(images).all() or not np.isfinite(masks).all():
        return None
    if images.min() < 0 or images.max() > 255 or masks.min() < 0 or (masks != np.rint(masks)).any():
        return None
    if masks.max() > np.iinfo(np.int32).max:  # documented: instance ids fit int32 (a flipped exponent byte)
        return None
    return [(np.rint(images[i]).astype(np.uint8), *pannuke_maps(masks[i].astype(np.int64))) for i in range(len(images))]


def _check_property(root, damaged):
    expected = _expected(root)
    try:
        _, got = _read_all(root)
    except NucleiFormatError as err:
        assert damaged.name in str(err) or str(root) in str(err), str(err)
        return "error"
    assert expected is not None, "a file numpy cannot read as the documented form was accepted"
    for (gi, ginst, gtype), (ei, einst, etype) in zip(got, expected):
        np.testing.assert_array_equal(gi, ei)
        np.testing.assert_array_equal(ginst, einst)
        np.testing.assert_array_equal(gtype, etype)
    return "loaded"


@FUZZ
@given(which=st.sampled_from(["images", "masks", "types"]), cut=st.floats(0.0, 0.999))
def test_pannuke_truncated_file_is_our_error(tmp_path_factory, which, cut):
    root = tmp_path_factory.mktemp("fold")
    _fold(root)
    path = root / f"{which}.npy"
    data = path.read_bytes()
    path.write_bytes(data[: int(cut * len(data))])
    with pytest.raises(NucleiFormatError, match=f"{which}.npy"):
        _read_all(root)


def _damage(path: Path, mode: str, pos: float, flip: int) -> None:
    """Truncate the file at fraction ``pos`` of its bytes, or XOR the byte there with ``flip``."""
    data = bytearray(path.read_bytes())
    if mode == "truncate":
        data = data[: int(pos * len(data))]
    else:
        data[int(pos * len(data))] ^= flip
    path.write_bytes(bytes(data))


@FUZZ
@given(which=st.sampled_from(["images", "masks", "types"]), pos=st.floats(0.0, 0.999), flip=st.integers(1, 255))
def test_pannuke_flipped_byte_loads_what_numpy_reads_or_is_our_error(tmp_path_factory, which, pos, flip):
    root = tmp_path_factory.mktemp("fold")
    _fold(root)
    path = root / f"{which}.npy"
    _damage(path, "flip", pos, flip)
    _check_property(root, path)


@FUZZ
@given(value=st.sampled_from([np.nan, np.inf, -np.inf, -1.0, 2.5]), tile=st.integers(0, 1), r=st.integers(0, 11),
       c=st.integers(0, 11), ch=st.integers(0, 5))
def test_pannuke_bad_mask_values_are_refused_naming_file_and_tile(tmp_path_factory, value, tile, r, c, ch):
    root = tmp_path_factory.mktemp("fold")
    masks = np.zeros((2, 12, 12, 6))
    masks[..., 5] = 1
    masks[tile, r, c, ch] = value
    _fold(root, masks=masks)
    with pytest.raises(NucleiFormatError, match=rf"masks\.npy: field 'tile {tile}'"):
        _read_all(root)


@pytest.mark.parametrize(
    "change, which",
    [
        (lambda im, m: (im.astype(np.complex64), m), "images"),
        (lambda im, m: (im, m.astype(np.complex128)), "masks"),
        (lambda im, m: (im.astype("U3"), m), "images"),
        (lambda im, m: (im[..., :2], m), "images"),
        (lambda im, m: (im, m[..., :5]), "masks"),
        (lambda im, m: (im[:1], m), "images"),
        (lambda im, m: (im.astype(np.int16) + 300, m), "images"),
        (lambda im, m: (np.where(np.arange(12)[:, None, None] == 3, np.nan, im.astype(np.float32)), m), "images"),
    ],
)
def test_pannuke_wrong_dtype_shape_or_range_is_our_error(tmp_path, change, which):
    images, masks = _fold(tmp_path / "ok")
    im, m = change(images, masks)
    _fold(tmp_path / "bad", images=im, masks=m)
    with pytest.raises(NucleiFormatError, match=rf"(images|masks|types)\.npy"):
        _read_all(tmp_path / "bad")


def test_pannuke_images_in_unit_range_are_rescaled_with_a_warning(tmp_path):
    images, _ = _fold(tmp_path / "ok")
    _fold(tmp_path / "unit", images=images.astype(np.float32) / 255)
    with pytest.warns(UserWarning, match=r"images\.npy: float images lie in \[0, 1\]; rescaled"):
        fold = read_pannuke_fold(tmp_path / "unit")
    np.testing.assert_array_equal(fold.image(1), images[1])  # 8-bit values survive the round trip exactly


def test_pannuke_pickled_types_are_refused(tmp_path):
    _fold(tmp_path, types=np.array(["Breast", None], dtype=object))
    with pytest.raises(NucleiFormatError, match=r"types\.npy"):
        read_pannuke_fold(tmp_path)


# --------------------------------------------------------------------------------------------
def _mat(path, **override):
    inst = np.zeros((10, 12))
    inst[1:4, 1:5], inst[6:9, 2:6], inst[5:9, 8:11] = 1, 2, 3
    type_map = np.where(inst == 1, 2, np.where(inst == 2, 4, np.where(inst == 3, 5, 0))).astype(float)
    fields = {"inst_map": inst, "type_map": type_map, "inst_type": np.array([[2.0], [4.0], [5.0]]),
              "inst_centroid": np.array([[3.0, 2.0], [3.5, 7.0], [9.0, 7.0]])}
    fields.update(override)
    savemat(path, {k: v for k, v in fields.items() if v is not None})
    return inst, type_map


def test_hovernet_mat_reads_type_map_majority():
    buf = io.BytesIO()
    _mat(buf)
    buf.seek(0)
    inst, types = read_hovernet_mat(buf, name="x.mat")
    assert inst.dtype == np.int32 and set(np.unique(inst)) == {0, 1, 2, 3}
    assert types[2, 2] == 2 and types[7, 3] == 4 and types[6, 9] == 5 and types[0, 0] == 0


def _expected_mat(path):
    """What scipy reads from the (damaged) file, converted as documented; None where the form is wrong."""
    try:
        mat = loadmat(path)
        inst, tmap = np.asarray(mat["inst_map"]), np.asarray(mat["type_map"])
    except Exception:
        return None
    for a in (inst, tmap):
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a) or not np.isfinite(a).all():
            return None
        if a.min() < 0 or (a != np.rint(a)).any() or a.max() > 2**31:
            return None
    if inst.shape != tmap.shape:
        return None
    out = np.zeros(inst.shape, np.int32)
    for i in np.unique(inst[inst > 0]):
        votes = np.bincount(tmap[inst == i].astype(np.int64))
        if len(votes) < 2 or votes[1:].sum() == 0:
            return None
        out[inst == i] = votes[1:].argmax() + 1
    return inst.astype(np.int32), out


@FUZZ
@given(mode=st.sampled_from(["truncate", "flip"]), pos=st.floats(0.0, 0.999), flip=st.integers(1, 255))
def test_hovernet_mat_damaged_file(tmp_path_factory, mode, pos, flip):
    path = tmp_path_factory.mktemp("mat") / "img_1.mat"
    _mat(path)
    _damage(path, mode, pos, flip)
    expected = _expected_mat(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a flipped inst_type value is a warning, not an error
            inst, types = read_hovernet_mat(path)
    except NucleiFormatError as err:
        assert "img_1.mat" in str(err)
        return
    assert expected is not None, "a .mat scipy cannot read in the documented form was accepted"
    np.testing.assert_array_equal(inst, expected[0])
    np.testing.assert_array_equal(types, expected[1])


@FUZZ
@given(field=st.sampled_from(["inst_map", "type_map"]), value=st.sampled_from([np.nan, np.inf, -3.0, 1.5]),
       r=st.integers(0, 9), c=st.integers(0, 11))
def test_hovernet_mat_bad_values_name_file_and_field(tmp_path_factory, field, value, r, c):
    path = tmp_path_factory.mktemp("mat") / "img_2.mat"
    inst, tmap = _mat(path)
    arr = (inst if field == "inst_map" else tmap).copy()
    arr[r, c] = value
    _mat(path, **{field: arr})
    with pytest.raises(NucleiFormatError, match=rf"img_2\.mat: field '{field}'"):
        read_hovernet_mat(path)


@pytest.mark.parametrize(
    "override, field",
    [
        ({"inst_map": None}, "inst_map"),
        ({"type_map": None}, "type_map"),
        ({"inst_map": np.zeros((10, 12, 2))}, "inst_map"),
        ({"type_map": np.zeros((9, 12))}, "type_map"),
        ({"inst_map": np.array(["abc"])}, "inst_map"),
        ({"type_map": np.zeros((10, 12))}, "type_map"),  # nuclei without a class
    ],
)
def test_hovernet_mat_missing_or_malformed_fields(tmp_path, override, field):
    path = tmp_path / "img_3.mat"
    _mat(path, **override)
    with pytest.raises(NucleiFormatError, match=rf"img_3\.mat: .*{field}"):
        read_hovernet_mat(path)


def test_hovernet_mat_warns_where_inst_type_disagrees(tmp_path):
    path = tmp_path / "img_4.mat"
    _mat(path, inst_type=np.array([[2.0], [3.0], [1.0]]))  # ids 2 and 3 disagree with type_map (4, 5)
    with pytest.warns(UserWarning, match=r"img_4\.mat: inst_type disagrees .* instance ids \[2, 3\]"):
        _, types = read_hovernet_mat(path)
    assert types[7, 3] == 4  # type_map wins


def test_hovernet_mat_with_gaps_in_ids_indexes_inst_type_by_rank(tmp_path):
    """cellseg-models-pytorch writes ids with gaps (15, 50, 180, ...) and one inst_type row per nucleus."""
    inst = np.zeros((8, 8))
    inst[0:3, 0:3], inst[5:8, 5:8] = 15, 180
    tmap = np.where(inst == 15, 2, np.where(inst == 180, 3, 0)).astype(float)
    path = tmp_path / "gaps.mat"
    savemat(path, {"inst_map": inst, "type_map": tmap, "inst_type": np.array([[2], [3]])})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # consistent: no warning
        out, types = read_hovernet_mat(path)
    assert set(np.unique(out)) == {0, 15, 180} and types[1, 1] == 2 and types[6, 6] == 3


# --------------------------------------------------------------------------------------------
@FUZZ
@given(suffix=st.sampled_from([".png", ".jpg"]), mode=st.sampled_from(["truncate", "flip"]), pos=st.floats(0.0, 0.999),
       flip=st.integers(1, 255))
def test_image_reader_damaged_file(tmp_path_factory, suffix, mode, pos, flip):
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / f"tile{suffix}"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3)).astype(np.uint8)).save(path)
    _damage(path, mode, pos, flip)
    try:
        with Image.open(path) as im:
            expected = np.asarray(im.convert("RGB")) if im.mode in ("RGB", "RGBA", "P") else None
    except Exception:
        expected = None
    try:
        got = read_rgb(path)
    except NucleiFormatError as err:
        assert f"tile{suffix}" in str(err)
        return
    assert expected is not None and got.dtype == np.uint8 and got.ndim == 3 and got.shape[-1] == 3
    np.testing.assert_array_equal(got, expected)


def test_image_reader_refuses_16_bit_and_grey(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "grey.png")
    for name in ("deep.png", "grey.png"):
        with pytest.raises(NucleiFormatError, match=rf"{name}: field 'pixels': expected an 8-bit RGB"):
            read_rgb(tmp_path / name)
