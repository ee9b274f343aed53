"""The point-cloud readers against the official loaders' logic (tests/domains/pointcloud/reference_loaders.py)
on files written in each layout: same values, the class list built once per dataset, ModelNet10
through the DataModule, and the bad inputs that used to escape as library errors or pass silently."""

from __future__ import annotations

import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from domains.pointcloud import readers
from domains.pointcloud.data import PointCloudData
from domains.pointcloud.readers import PointCloudFormatError
from suite.data import DataFormatError
from tests.domains.pointcloud import reference_loaders as ref
from tests.domains.pointcloud.test_data import CUBE_QUADS, CUBE_V, write_off

MODELNET10 = ["bathtub", "chair", "night_stand"]
MODELNET40 = ["airplane", "bathtub", "chair", "night_stand"]


def write_txt_cloud(path: Path, n: int, seed: int) -> np.ndarray:
    """A ``x,y,z,nx,ny,nz`` file like modelnet40_normal_resampled's (off-centre, not unit scale)."""
    rng = np.random.default_rng(seed)
    xyz = rng.normal(size=(n, 3)) * [0.6, 0.3, 0.2] + [0.4, -0.2, 0.15]  # ModelNet's raw offsets reach ~0.15
    normals = rng.normal(size=(n, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savetxt(path, np.hstack([xyz, normals]), fmt="%.6f", delimiter=",")
    return xyz


def write_resampled(root: Path, per_class: dict[str, tuple[int, int]], n_points: int = 120) -> Path:
    """A modelnet40_normal_resampled root with ModelNet40 and ModelNet10 lists over ``per_class``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "modelnet40_shape_names.txt").write_text("\n".join(MODELNET40) + "\n")
    (root / "modelnet10_shape_names.txt").write_text("\n".join(MODELNET10) + "\n")
    lists: dict[str, list[str]] = {"train": [], "test": []}
    for c, (n_train, n_test) in per_class.items():
        for split, n in (("train", n_train), ("test", n_test)):
            for i in range(n):
                sid = f"{c}_{len(lists[split]) + 1:04d}"
                write_txt_cloud(root / c / f"{sid}.txt", n_points + 7 * i, seed=zlib.crc32(f"{c}/{split}/{i}".encode()))
                lists[split].append(sid)
    for split, ids in lists.items():
        (root / f"modelnet40_{split}.txt").write_text("\n".join(ids) + "\n")
        (root / f"modelnet10_{split}.txt").write_text("\n".join(i for i in ids if i.rsplit("_", 1)[0] in MODELNET10) + "\n")
    return root


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SUITE_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


# --- same values as the official loaders ----------------------------------------------------------
@pytest.mark.parametrize("num_category", [40, 10])
def test_txt_clouds_equal_pointnet2_loader(tmp_path, num_category):
    root = write_resampled(tmp_path / "modelnet40_normal_resampled", {"airplane": (2, 1), "chair": (2, 1), "night_stand": (1, 1)})
    ours = readers.read_modelnet_txt(root, "train", 48, num_category)
    points, labels, names = ref.modelnet_txt(root, "train", 48, num_category)
    assert ours.class_names == names and ours.labels.tolist() == labels.tolist()
    np.testing.assert_allclose(ours.points, points, rtol=0, atol=2e-7)  # float32 round-off of the same operations
    # pc_normalize: centred on the centroid and in the unit sphere (before it, the max norm was 1.06 on real files)
    np.testing.assert_allclose(ours.points.mean(1), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(ours.points, axis=-1).max(1), 1.0, atol=1e-6)


def test_modelnet10_is_reachable_from_the_datamodule(tmp_path, data_dir):
    root = write_resampled(tmp_path / "mn", {"airplane": (3, 2), "bathtub": (3, 2), "chair": (3, 2), "night_stand": (3, 2)})
    dm10 = PointCloudData(source="modelnet_txt", root=str(root), num_category=10, num_points=32, n_way=None, k_shot=None, batch_size=4)
    dm10.setup("fit")
    assert dm10.class_names == MODELNET10 and dm10.num_classes == 3
    assert sorted(set(dm10.splits["test"].labels.tolist())) == [0, 1, 2]  # bathtub, chair, night_stand; no airplane
    assert len(dm10.splits["test"]) == 6
    dm40 = PointCloudData(source="modelnet_txt", root=str(root), num_points=32, n_way=None, k_shot=None)
    dm40.setup("fit")
    assert dm40.class_names == MODELNET40 and len(dm40.splits["test"]) == 8
    assert len(list((data_dir / "generated" / "pointcloud").glob("modelnet_txt-*.npz"))) == 4  # one cache per (split, N)
    with pytest.raises(ValueError, match="num_category must be 10 or 40"):
        PointCloudData(source="modelnet_txt", root=str(root), num_category=15)


@pytest.mark.parametrize("layout", ["scanobjectnn", "modelnet40_h5"])
def test_h5_clouds_equal_the_official_loaders(tmp_path, layout):
    rng = np.random.default_rng(0)
    if layout == "scanobjectnn":
        path = tmp_path / "test_objectdataset_augmentedrot_scale75.h5"
        with h5py.File(path, "w") as f:
            f["data"] = rng.normal(size=(5, 64, 3)).astype(np.float32)
            f["label"] = np.array([0, 3, 14, 3, 7], np.int64)
            f["mask"] = np.zeros((5, 64), np.int64)
        ours, files = readers.read_scanobjectnn_h5(path, 64), [path]
    else:
        root = tmp_path / "modelnet40_ply_hdf5_2048"
        root.mkdir()
        (root / "shape_names.txt").write_text("\n".join(MODELNET40) + "\n")
        files = [root / f"ply_data_test{i}.h5" for i in range(2)]
        for i, f_path in enumerate(files):
            with h5py.File(f_path, "w") as f:  # PointNet's release: float32 data, uint8 labels (n, 1), normals beside
                f["data"] = rng.normal(size=(3 + i, 64, 3)).astype(np.float64 if i else np.float32)
                f["label"] = rng.integers(0, 4, (3 + i, 1)).astype(np.uint8)
                f["normal"] = np.zeros((3 + i, 64, 3), np.float32)
        ours = readers.read_modelnet_h5(root, "test", 64)
    expected = [ref.h5(f) for f in files]
    np.testing.assert_array_equal(ours.points, np.concatenate([p for p, _ in expected]))  # exactly the stored values
    assert ours.labels.tolist() == np.concatenate([lab.reshape(-1) for _, lab in expected]).tolist()
    # farthest point sampling to 32 picks what pointnet2's FPS (start at point 0) picks
    small = readers.read_scanobjectnn_h5(files[0], 32) if layout == "scanobjectnn" else readers.read_modelnet_h5(files[0].parent, "test", 32)
    np.testing.assert_array_equal(small.points[0], ref.farthest_point_sample(expected[0][0][0], 32))


def test_off_meshes_equal_the_token_reader_and_classes_are_listed_once(tmp_path):
    root = tmp_path / "ModelNet40"
    tet = (np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], float), [(0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3)])
    write_off(root / "bathtub" / "train" / "bathtub_0001.off", CUBE_V, CUBE_QUADS, modelnet_header=True)  # no bathtub in test
    write_off(root / "chair" / "train" / "chair_0001.off", *tet)
    write_off(root / "chair" / "test" / "chair_0002.off", CUBE_V * 2, CUBE_QUADS)
    write_off(root / "table" / "test" / "table_0001.off", *tet)  # no table in train
    for f in root.glob("*/*/*.off"):
        v, tri = readers.read_off(f)
        v_ref, tri_ref = ref.off(f)
        np.testing.assert_array_equal(v, v_ref)
        np.testing.assert_array_equal(tri, tri_ref)
    train, test = readers.read_modelnet_off(root, "train", 32), readers.read_modelnet_off(root, "test", 32)
    assert train.class_names == test.class_names == ref.off_classes(root) == ["bathtub", "chair", "table"]
    assert train.labels.tolist() == [0, 1] and test.labels.tolist() == [1, 2]  # chair is 1 in both splits


def test_datamodule_refuses_splits_with_different_class_lists(tmp_path, data_dir):
    root = write_resampled(tmp_path / "mn", {"airplane": (2, 2), "chair": (2, 2)})
    PointCloudData(source="modelnet_txt", root=str(root), num_points=32, n_way=None, k_shot=None).setup("fit")  # fine
    off_root = tmp_path / "ModelNet10"
    write_off(off_root / "chair" / "train" / "chair_0001.off", CUBE_V, CUBE_QUADS)
    write_off(off_root / "chair" / "test" / "chair_0002.off", CUBE_V, CUBE_QUADS)
    with pytest.raises(ValueError, match=r"num_category=10 but .* has 1 classes"):
        PointCloudData(source="modelnet_off", root=str(off_root), num_category=10, num_points=16, n_way=None, k_shot=None).setup("fit")


# --- bad input: our error, naming the file, the field and the expected form -----------------------------
def _raises(path: Path, field: str, call) -> PointCloudFormatError:
    with pytest.raises(PointCloudFormatError) as info:
        call()
    err = info.value
    assert isinstance(err, DataFormatError) and Path(err.path) == path and field in err.field
    assert str(err).startswith(f"{path}: field ") and "expected" in str(err)
    return err


def test_off_bad_input(tmp_path):
    body = "OFF\n4 2 0\n0 0 0\n1 0 0\n0 1 0\n0 0 1\n"
    cases = {
        "face_token.off": (body + "3 0 1 2\n3 0 1 3.0\n", "face 1"),   # a non-integer face token
        "nan_vertex.off": (body.replace("0 1 0", "0 nan 0") + "3 0 1 2\n3 0 1 3\n", "vertices"),
        "inf_vertex.off": (body.replace("0 1 0", "0 inf 0") + "3 0 1 2\n3 0 1 3\n", "vertices"),
        "short_vertex.off": (body.replace("1 0 0", "1 0") + "3 0 1 2\n3 0 1 3\n", "vertex 1"),
        "bad_count.off": ("OFF\n4 two 0\n", "header counts"),
        "flat.off": (body.replace("0 0 1", "2 0 0") + "3 0 1 3\n3 0 1 3\n", "faces"),  # collinear: no area to sample
    }
    for name, (text, field) in cases.items():
        path = tmp_path / "ModelNet" / "thing" / "train" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if name == "flat.off":
            _raises(path, field, lambda: readers.read_modelnet_off(tmp_path / "ModelNet", "train", 8))
        else:
            _raises(path, field, lambda p=path: readers.read_off(p))
        path.unlink()
    binary = tmp_path / "binary.off"
    binary.write_bytes(b"OFF\n3 1 0\n\xff\xfe 0 0\n")
    _raises(binary, "byte", lambda: readers.read_off(binary))


def test_txt_bad_input(tmp_path):
    root = write_resampled(tmp_path / "mn", {"airplane": (1, 0)})
    cloud = root / "airplane" / "airplane_0001.txt"
    good = cloud.read_text()
    lines = good.splitlines()
    for text, field in (
        ("\n".join(lines[:-1] + [lines[-1][: lines[-1].rfind(",")]]) + "\n", "lines"),  # a truncated last line
        ("\n".join(lines[:5] + ["nan,0.1,0.2,0,0,1"] + lines[6:]) + "\n", "xyz"),     # a NaN cloud
        ("\n".join(lines[:5] + ["0.1,-inf,0.2,0,0,1"] + lines[6:]) + "\n", "xyz"),
        ("\n".join(lines[:5] + ["0.1;0.2;0.3;0;0;1"] + lines[6:]) + "\n", "lines"),     # another delimiter
        ("", "lines"),
    ):
        cloud.write_text(text)
        _raises(cloud, field, lambda: readers.read_modelnet_txt(root, "train", 16))
    cloud.write_text("\n".join(lines[:10]) + "\n")  # 10 points, fewer than asked for
    err = _raises(cloud, "lines", lambda: readers.read_modelnet_txt(root, "train", 16))
    assert "num_points=16" in str(err)
    cloud.write_text(good)
    (root / "modelnet40_train.txt").write_text("airplane_0001\nspaceship_0001\n")
    _raises(root / "modelnet40_train.txt", "spaceship_0001", lambda: readers.read_modelnet_txt(root, "train", 16))


def test_h5_bad_input(tmp_path):
    path = tmp_path / "training_objectdataset.h5"

    def write(data=None, label=None, **extra) -> None:
        with h5py.File(path, "w") as f:
            if data is not None:
                f["data"] = data
            if label is not None:
                f["label"] = label
            for k, v in extra.items():
                f[k] = v

    clouds, labels = np.random.default_rng(1).normal(size=(3, 32, 3)).astype(np.float32), np.array([0, 1, 2])
    for data, label, field in (
        (np.where(np.arange(32)[None, :, None] == 7, np.nan, clouds), labels, "data"),  # NaN clouds
        (np.where(np.arange(32)[None, :, None] == 7, np.inf, clouds), labels, "data"),
        (clouds[..., :2], labels, "data"),                                            # (n, P, 2)
        (clouds.astype(bool), labels, "data"),
        (clouds, labels.astype(np.float32) + 0.5, "label"),                           # fractional labels
        (clouds, labels[:2], "label"),
        (clouds, None, "label"),                                                      # a missing key
    ):
        write(data, label)
        _raises(path, field, lambda: readers.read_scanobjectnn_h5(path, 16))
    write(clouds, labels)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])                                              # a truncated file
    err = _raises(path, "file", lambda: readers.read_scanobjectnn_h5(path, 16))
    assert "HDF5" in str(err)
    root = tmp_path / "modelnet40_ply_hdf5_2048"
    root.mkdir()
    (root / "shape_names.txt").write_text("a\nb\nc\n")
    with h5py.File(root / "ply_data_train0.h5", "w") as f:
        f["data"], f["label"] = np.where(np.arange(32)[None, :, None] == 3, np.nan, clouds), labels[:, None]
    _raises(root / "ply_data_train0.h5", "data", lambda: readers.read_modelnet_h5(root, "train", 16))
