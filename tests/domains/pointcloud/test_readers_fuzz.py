"""Fuzzing every point-cloud reader: truncate, flip bytes, inject NaN / inf, change dtype, shape
and keys. Property: the reader returns exactly what the official loader's logic returns on the
same (mutated) file, with finite coordinates, or raises PointCloudFormatError naming the file;
never another exception, never NaN. Each test runs in about a second (derandomised, no example
database, so runs are reproducible and write nothing into the checkout)."""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from domains.pointcloud import readers
from domains.pointcloud.readers import PointCloudFormatError
from tests.domains.pointcloud import reference_loaders as ref
from tests.domains.pointcloud.test_data import CUBE_QUADS, CUBE_V, write_off
from tests.domains.pointcloud.test_readers import write_resampled

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
#: tokens that break a number or a face index in some way
BAD_TOKENS = ["nan", "inf", "-inf", "1e400", "1e39", "NaN", "0x1F", "1.5.2", "--1", "", "2.5", "-1", "99", "1,0", "3e", "+7"]


def _mutate_text(raw: bytes, data: st.DataObject) -> bytes:
    """One text-level mutation: truncate, flip a byte, replace a token, drop or duplicate a line."""
    kind = data.draw(st.sampled_from(["truncate", "flip", "token", "drop_line", "dup_line"]), label="mutation")
    if kind == "truncate":
        return raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]
    if kind == "flip":
        b = bytearray(raw)
        b[data.draw(st.integers(0, len(b) - 1), label="offset")] ^= data.draw(st.integers(1, 255), label="xor")
        return bytes(b)
    if kind == "token":
        spans = [m.span() for m in re.finditer(rb"[^\s,]+", raw)]
        start, stop = spans[data.draw(st.integers(0, len(spans) - 1), label="token")]
        return raw[:start] + data.draw(st.sampled_from(BAD_TOKENS), label="with").encode() + raw[stop:]
    lines = raw.split(b"\n")
    i = data.draw(st.integers(0, len(lines) - 1), label="line")
    return b"\n".join(lines[:i] + lines[i + 1 :] if kind == "drop_line" else lines[: i + 1] + lines[i:])


def _refused(err: PointCloudFormatError, *paths: Path) -> None:
    event("refused")  # --hypothesis-show-statistics shows how many examples loaded and how many were refused
    assert any(str(p) in str(err) for p in paths) and "expected" in str(err), str(err)


# --- .off ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("modelnet_header", [False, True])
@FUZZ
@given(data=st.data())
def test_fuzz_off(tmp_path, modelnet_header, data):
    path = tmp_path / "chair_0001.off"
    write_off(path, CUBE_V * [1.0, 2.0, 0.5] + 0.25, CUBE_QUADS, modelnet_header)
    path.write_bytes(_mutate_text(path.read_bytes(), data))
    try:
        verts, tris = readers.read_off(path)
    except PointCloudFormatError as e:
        return _refused(e, path)
    event("loaded")
    v_ref, t_ref = ref.off(path)  # loaded by us, so the reference must read it too, to the same values
    np.testing.assert_array_equal(verts, v_ref)
    np.testing.assert_array_equal(tris, t_ref)
    assert np.isfinite(verts).all() and tris.min() >= 0 and tris.max() < len(verts)


# --- modelnet40_normal_resampled txt ----------------------------------------------------------------------
@pytest.mark.parametrize("target", ["cloud", "listing", "shape_names"])
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning", "ignore:loadtxt. input contained no data:UserWarning")
@FUZZ
@given(data=st.data())
def test_fuzz_txt(tmp_path, target, data):
    root = tmp_path / "modelnet40_normal_resampled"
    if not root.is_dir():
        write_resampled(root, {"airplane": (1, 0), "chair": (1, 0)}, n_points=24)
    path = {"cloud": root / "chair" / "chair_0002.txt", "listing": root / "modelnet40_train.txt",
            "shape_names": root / "modelnet40_shape_names.txt"}[target]
    original = path.read_bytes()
    path.write_bytes(_mutate_text(original, data))
    try:
        try:
            ours = readers.read_modelnet_txt(root, "train", 16)
        except PointCloudFormatError as e:
            return _refused(e, path)
        event("loaded")
        points, labels, names = ref.modelnet_txt(root, "train", 16)
        assert ours.class_names == names and ours.labels.tolist() == labels.tolist()
        np.testing.assert_allclose(ours.points, points, rtol=0, atol=2e-7)
        assert np.isfinite(ours.points).all()
    finally:
        path.write_bytes(original)


# --- HDF5: ScanObjectNN and modelnet40_ply_hdf5_2048 ---------------------------------------------------------
def _h5_mutation(data: st.DataObject) -> tuple:
    kind = data.draw(st.sampled_from(["truncate", "flip", "nonfinite", "data_dtype", "label_dtype", "shape", "keys"]), label="mutation")
    if kind in ("truncate", "flip"):
        return (kind, data.draw(st.floats(0, 1, exclude_max=True), label="at"), data.draw(st.integers(1, 255), label="xor"))
    if kind == "nonfinite":
        return (kind, data.draw(st.tuples(st.integers(0, 3), st.integers(0, 31), st.integers(0, 2)), label="where"),
                data.draw(st.sampled_from([np.nan, np.inf, -np.inf]), label="value"))
    choices = {
        "data_dtype": ["f2", "f8", "i2", "u1", "i8", "?", "S4", "c8"],
        "label_dtype": ["i1", "u1", "i4", "u8", "f4", "f8", "?", "S2"],
        "shape": ["flat", "two", "normals", "channels_first", "label_2d", "label_n1", "label_short", "empty"],
        "keys": ["rename_data", "rename_label", "drop_label", "group_data", "extra"],
    }[kind]
    return (kind, data.draw(st.sampled_from(choices), label="how"))


def _write_mutated_h5(path: Path, clouds: np.ndarray, labels: np.ndarray, mutation: tuple) -> None:
    kind, how = mutation[0], mutation[1]
    d, lab, extra = clouds.copy(), labels.copy(), {}
    if kind == "nonfinite":
        d[mutation[1]] = mutation[2]
    elif kind == "data_dtype":
        d = d.astype(how) if how != "S4" else d.astype("U8").astype("S4")
    elif kind == "label_dtype":
        lab = lab.astype(how) if how != "S2" else lab.astype("S2")
    elif kind == "shape":
        d = {"flat": d.reshape(len(d), -1), "two": d[..., :2], "normals": np.concatenate([d, -d], -1),
             "channels_first": d.transpose(0, 2, 1), "empty": d[:0]}.get(how, d)
        lab = {"label_2d": np.stack([lab, lab], 1), "label_n1": lab[:, None], "label_short": lab[:-1], "empty": lab[:0]}.get(how, lab)
    names = {"data": "data", "label": "label"}
    if kind == "keys" and how.startswith("rename"):
        names[how.split("_")[1]] = "points" if how == "rename_data" else "labels"
    with h5py.File(path, "w") as f:
        if not (kind == "keys" and how == "group_data"):
            f[names["data"]] = d
        else:
            f.create_group("data")["points"] = d
        if not (kind == "keys" and how == "drop_label"):
            f[names["label"]] = lab
        if kind == "keys" and how == "extra":
            f["mask"], f["normal"] = np.zeros(d.shape[:2], np.int64), np.zeros_like(d)
    if kind in ("truncate", "flip"):
        raw = bytearray(path.read_bytes())
        at = int(mutation[1] * len(raw))
        if kind == "truncate":
            raw = raw[:at]
        else:
            raw[at] ^= mutation[2]
        path.write_bytes(bytes(raw))


@pytest.mark.parametrize("layout", ["scanobjectnn", "modelnet40_h5"])
@FUZZ
@given(data=st.data())
def test_fuzz_h5(tmp_path, layout, data):
    clouds = np.random.default_rng(3).normal(size=(4, 32, 3)).astype(np.float32)
    labels = np.array([0, 2, 1, 2], np.int64)
    mutation = _h5_mutation(data)
    if layout == "scanobjectnn":
        path = tmp_path / "training_objectdataset.h5"
        read = lambda: readers.read_scanobjectnn_h5(path, 32)  # noqa: E731
    else:
        (tmp_path / "shape_names.txt").write_text("airplane\nbathtub\nbed\n")
        path = tmp_path / "ply_data_train0.h5"
        read = lambda: readers.read_modelnet_h5(tmp_path, "train", 32)  # noqa: E731
    _write_mutated_h5(path, clouds, labels, mutation)
    try:
        ours = read()
    except PointCloudFormatError as e:
        return _refused(e, path)
    event("loaded")
    points, labs = ref.h5(path)
    np.testing.assert_array_equal(ours.points, points)  # the stored values, xyz, as float32
    assert ours.labels.tolist() == labs.reshape(-1).tolist() and np.isfinite(ours.points).all()
