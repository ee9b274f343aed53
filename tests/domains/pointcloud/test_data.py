"""Point-cloud data: real-format readers on files written in each format, surface sampling,
the procedural corpus and its cache, occlusion, and the N-way K-shot episode sampler."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from scipy.spatial import cKDTree

from domains.pointcloud import readers
from domains.pointcloud.data import FEW_SHOT_SETTINGS, PointCloudData, few_shot_episodes, sample_episode
from domains.pointcloud.synth import FEW_SHOT_CLASSES, PRETRAIN_CLASSES, make_corpus, occlude, sample_surface, triangle_areas

CUBE_V = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], float)
CUBE_QUADS = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]


def write_off(path, verts, faces, modelnet_header: bool = False) -> None:
    """An OFF file; ``modelnet_header`` reproduces ModelNet's 'OFF<nv> <nf> 0' first line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    head = f"OFF{len(verts)} {len(faces)} 0\n" if modelnet_header else f"OFF\n# written by the test\n{len(verts)} {len(faces)} 0\n"
    body = "".join(" ".join(f"{c:.6f}" for c in v) + "\n" for v in verts)
    body += "".join(f"{len(f)} " + " ".join(map(str, f)) + "\n" for f in faces)
    path.write_text(head + body)


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SUITE_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


# --- .off meshes and surface sampling ---------------------------------------------------------------
@pytest.mark.parametrize("modelnet_header", [False, True])
def test_read_off_triangulates_quads_and_handles_modelnet_header(tmp_path, modelnet_header):
    write_off(tmp_path / "cube.off", CUBE_V, CUBE_QUADS, modelnet_header)
    v, f = readers.read_off(tmp_path / "cube.off")
    np.testing.assert_allclose(v, CUBE_V, atol=1e-6)
    assert f.shape == (12, 3)
    assert triangle_areas(v, f).sum() == pytest.approx(6.0)  # the unit cube's surface


def test_read_off_errors_name_the_file_and_problem(tmp_path):
    (tmp_path / "bad.off").write_text("PLY\n1 0 0\n")
    with pytest.raises(ValueError, match=r"bad.off.*OFF"):
        readers.read_off(tmp_path / "bad.off")
    (tmp_path / "short.off").write_text("OFF\n8 12 0\n0 0 0\n")
    with pytest.raises(readers.PointCloudFormatError, match=r"short.off: field 'data lines': expected 8 vertex \+ 12 face lines"):
        readers.read_off(tmp_path / "short.off")
    (tmp_path / "index.off").write_text("OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 7\n")
    with pytest.raises(readers.PointCloudFormatError, match=r"index.off: field 'face 0': .*indices below 3"):
        readers.read_off(tmp_path / "index.off")


def test_sampling_is_area_weighted_and_on_the_surface():
    # two disjoint triangles with areas 1/2 and 3/2: a quarter of the points on the first
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 5], [3, 0, 5], [0, 1, 5]], float)
    f = np.array([[0, 1, 2], [3, 4, 5]])
    n = 40_000
    p = sample_surface(v, f, n, np.random.default_rng(0))
    first = p[:, 2] < 2.5
    assert abs(first.mean() - 0.25) < 5 * np.sqrt(0.25 * 0.75 / n)  # 5 binomial standard deviations
    np.testing.assert_allclose(np.sort(np.unique(np.round(p[:, 2], 5))), [0, 5], atol=1e-5)
    inside = (p[:, 0] >= -1e-6) & (p[:, 1] >= -1e-6) & (p[:, 0] / np.where(first, 1, 3) + p[:, 1] <= 1 + 1e-5)
    assert inside.all()
    # uniform within a triangle: the mean is the centroid (standard error ~ 0.24 / sqrt(n))
    np.testing.assert_allclose(p[first, :2].mean(0), [1 / 3, 1 / 3], atol=0.01)


def test_modelnet_off_reader(tmp_path):
    tet = (np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], float), [(0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3)])
    write_off(tmp_path / "ModelNet" / "chair" / "train" / "chair_0001.off", CUBE_V * 3, CUBE_QUADS, True)
    write_off(tmp_path / "ModelNet" / "chair" / "train" / "chair_0002.off", *tet)
    write_off(tmp_path / "ModelNet" / "airplane" / "train" / "airplane_0001.off", *tet)
    write_off(tmp_path / "ModelNet" / "airplane" / "test" / "airplane_0002.off", *tet)
    s = readers.read_modelnet_off(tmp_path / "ModelNet", "train", 64)
    assert s.class_names == ["airplane", "chair"]
    assert s.points.shape == (3, 64, 3) and s.points.dtype == np.float32
    assert s.labels.tolist() == [0, 1, 1] and s.ids == ["airplane_0001", "chair_0001", "chair_0002"]
    np.testing.assert_allclose(np.linalg.norm(s.points, axis=-1).max(1), 1.0, atol=1e-5)  # unit sphere
    np.testing.assert_allclose(s.points.mean(1), 0.0, atol=1e-5)
    # the cube's points lie on its faces: one coordinate at a bounding-box side
    cube = s.points[1]
    centre, half = (cube.max(0) + cube.min(0)) / 2, (cube.max(0) - cube.min(0)) / 2
    assert (np.abs(np.abs(cube - centre) - half).min(1) < 1e-4).all()


def test_modelnet_off_cache_follows_the_sampling_seed(tmp_path, data_dir):
    for i in (1, 2):
        write_off(tmp_path / "ModelNet" / "chair" / "train" / f"chair_000{i}.off", CUBE_V * i, CUBE_QUADS)
    root = str(tmp_path / "ModelNet")
    pools = {seed: PointCloudData(source="modelnet_off", root=root, num_points=32, seed=seed).pool("train") for seed in (0, 1, 0)}
    assert len(list(data_dir.glob("generated/pointcloud/modelnet_off-*.npz"))) == 2  # one cache per seed
    np.testing.assert_array_equal(pools[0].points, readers.read_modelnet_off(root, "train", 32, seed=0).points)
    assert not np.allclose(pools[0].points, pools[1].points)  # seed 1 is not served seed 0's cached clouds


# --- HDF5 and txt layouts -------------------------------------------------------------------------
def _cloud_batch(n: int, p: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, p, 3)).astype(np.float32)


def test_modelnet_h5_reader(tmp_path):
    root = tmp_path / "modelnet40_ply_hdf5_2048"
    root.mkdir()
    (root / "shape_names.txt").write_text("airplane\nbathtub\nbed\n")
    clouds = [_cloud_batch(3, 64, 0), _cloud_batch(2, 64, 1)]
    for i, (data, label) in enumerate(zip(clouds, [[[0], [1], [2]], [[2], [0]]])):
        with h5py.File(root / f"ply_data_train{i}.h5", "w") as f:
            f["data"] = data
            f["label"] = np.asarray(label, np.uint8)
            f["normal"] = np.zeros_like(data)
    s = readers.read_modelnet_h5(root, "train", 16)
    assert s.points.shape == (5, 16, 3) and s.labels.tolist() == [0, 1, 2, 2, 0]
    assert s.class_names == ["airplane", "bathtub", "bed"] and s.ids[3] == "ply_data_train1:0"
    for got, src in zip(s.points, np.concatenate(clouds)):  # FPS picks points of the cloud itself
        assert cKDTree(src).query(got)[0].max() < 1e-6
    with h5py.File(root / "ply_data_test0.h5", "w") as f:
        f["data"] = _cloud_batch(2, 64, 2)
    with pytest.raises(readers.PointCloudFormatError, match=r"ply_data_test0.h5: field 'label': expected an HDF5 file"):
        readers.read_modelnet_h5(root, "test", 16)


def test_modelnet_txt_reader(tmp_path):
    root = tmp_path / "modelnet40_normal_resampled"
    (root / "airplane").mkdir(parents=True)
    (root / "night_stand").mkdir()
    (root / "modelnet40_shape_names.txt").write_text("airplane\nnight_stand\n")
    (root / "modelnet40_train.txt").write_text("airplane_0001\nnight_stand_0003\n")
    xyz = {"airplane_0001": _cloud_batch(1, 40, 3)[0], "night_stand_0003": _cloud_batch(1, 48, 4)[0]}
    for sid, pts in xyz.items():
        normals = np.tile([[0.0, 0.0, 1.0]], (len(pts), 1))
        np.savetxt(root / sid.rsplit("_", 1)[0] / f"{sid}.txt", np.hstack([pts, normals]), fmt="%.6f", delimiter=",")
    s = readers.read_modelnet_txt(root, "train", 32)
    assert s.labels.tolist() == [0, 1] and s.ids == ["airplane_0001", "night_stand_0003"]
    assert s.points.shape == (2, 32, 3)
    # pc_normalize'd after sampling (values pinned against PointNet++'s loader in test_readers.py)
    np.testing.assert_allclose(s.points.mean(1), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(s.points, axis=-1).max(1), 1.0, atol=1e-6)
    np.savetxt(root / "airplane" / "airplane_0001.txt", np.ones((40, 3)), delimiter=",")
    with pytest.raises(readers.PointCloudFormatError, match=r"airplane_0001.txt: field 'lines': expected 6 comma-separated numbers"):
        readers.read_modelnet_txt(root, "train", 32)


def test_scanobjectnn_h5_reader(tmp_path):
    path = tmp_path / "training_objectdataset_augmentedrot_scale75.h5"
    with h5py.File(path, "w") as f:
        f["data"] = _cloud_batch(4, 64, 5)
        f["label"] = np.array([0, 14, 3, 3], np.int64)
        f["mask"] = np.zeros((4, 64), np.int64)
    s = readers.read_scanobjectnn_h5(path, 32)
    assert s.points.shape == (4, 32, 3) and s.labels.tolist() == [0, 14, 3, 3]
    assert s.class_names[14] == "toilet" and len(s.class_names) == 15
    with h5py.File(path, "w") as f:
        f["data"] = _cloud_batch(1, 64, 5)
        f["label"] = np.array([15])
    with pytest.raises(readers.PointCloudFormatError, match="field 'label': expected class indices 0..14, got labels span 15..15"):
        readers.read_scanobjectnn_h5(path, 32)


def test_datamodule_reads_a_real_source_into_an_episode(tmp_path, data_dir):
    (tmp_path / "scan").mkdir()
    for split, n in (("training", 6), ("test", 6)):
        with h5py.File(tmp_path / "scan" / f"{split}_objectdataset.h5", "w") as f:
            f["data"] = _cloud_batch(n, 64, 7)
            f["label"] = np.array([0, 0, 1, 1, 2, 2])
    dm = PointCloudData(source="scanobjectnn_h5", root=str(tmp_path / "scan"), h5_suffix="", num_points=32,
                        n_way=2, k_shot=1, n_query=1, n_val=1, unlabelled=2, batch_size=2)
    dm.setup("fit")
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 2, "test": 2, "val": 2, "unlabelled": 2}
    assert len(list(data_dir.glob("generated/pointcloud/scanobjectnn_h5-*.npz"))) == 2  # cached once per split
    batch = next(iter(dm.train_dataloader()["unlabelled"]))
    assert batch["points"].shape == (2, 32, 3) and (batch["label"] == -1).all()
    with pytest.raises(ValueError, match="data.root"):
        PointCloudData(source="modelnet_h5")


# --- procedural corpus ----------------------------------------------------------------------------
def test_procedural_corpus_is_seeded_normalised_and_cached(data_dir):
    a, la = make_corpus(2, 128, seed=3)
    b, _ = make_corpus(2, 128, seed=3)
    c, _ = make_corpus(2, 128, seed=4)
    assert np.array_equal(a, b) and not np.allclose(a, c)
    assert a.shape == (2 * len(FEW_SHOT_CLASSES), 128, 3) and la.tolist() == np.repeat(np.arange(len(FEW_SHOT_CLASSES)), 2).tolist()
    radius = np.linalg.norm(a, axis=-1).max(1)
    assert (radius > 0.95).all() and (radius < 1.05).all()  # unit sphere + 0.005 jitter
    dm = PointCloudData(num_points=64, train_per_class=3, test_per_class=2)
    first = dm.pool("train")
    (cache,) = (data_dir / "generated" / "pointcloud").glob("clean-train-3x64-*.npz")
    mtime = cache.stat().st_mtime_ns
    assert np.array_equal(dm.pool("train").points, first.points) and cache.stat().st_mtime_ns == mtime


def test_pretraining_corpus_has_no_few_shot_class(data_dir):
    """Point-MAE pretrains on one corpus and is tested few-shot on classes it never reconstructed:
    the default pretraining pool draws only the pretraining-only classes; episodes only the others."""
    assert not set(PRETRAIN_CLASSES) & set(FEW_SHOT_CLASSES)
    pre = PointCloudData(purpose="pretrain", num_points=64, pretrain_per_class=2)
    pool = pre.pool("pretrain")
    assert pool.class_names == list(PRETRAIN_CLASSES) and np.bincount(pool.labels).tolist() == [2] * len(PRETRAIN_CLASSES)
    episode = PointCloudData(num_points=64, train_per_class=12, test_per_class=4, n_way=10, k_shot=2, n_query=2, n_val=1)
    episode.setup("fit")
    assert len(episode.class_names) == 10 and set(episode.class_names) <= set(FEW_SHOT_CLASSES)
    # a cloud is the same whichever subset it is drawn with, and the pretraining sets differ only by their classes
    both = PointCloudData(purpose="pretrain", num_points=64, pretrain_per_class=2, pretrain_classes="all").pool("pretrain")
    np.testing.assert_array_equal(both.points[: len(pool.points)], pool.points)
    assert both.class_names[len(PRETRAIN_CLASSES):] == list(FEW_SHOT_CLASSES)
    few = PointCloudData(purpose="pretrain", num_points=64, pretrain_per_class=2, pretrain_classes="few_shot").pool("pretrain")
    np.testing.assert_array_equal(both.points[len(pool.points):], few.points)
    assert len(list((data_dir / "generated" / "pointcloud").glob("clean-pretrain-2x64-*.npz"))) == 3  # one cache each
    with pytest.raises(ValueError, match="pretrain_classes"):
        PointCloudData(purpose="pretrain", pretrain_classes="shapenet")


@pytest.mark.parametrize("name", list(PRETRAIN_CLASSES))
def test_pretraining_classes_build_finite_object_sized_meshes(name):
    v, f = PRETRAIN_CLASSES[name](np.random.default_rng(0))
    assert np.isfinite(v).all() and f.min() >= 0 and f.max() < len(v)
    assert triangle_areas(v, f).sum() > 0.01 and 0.1 < np.ptp(v, axis=0).max() < 3.0  # a real object's size, metres


def test_occlusion_keeps_one_side_of_a_sphere():
    rng = np.random.default_rng(0)
    sphere = rng.normal(size=(4000, 3))
    sphere /= np.linalg.norm(sphere, axis=1, keepdims=True)
    kept = occlude(sphere, rng, distance=3.0)
    # from 3 radii away a camera sees the cap p.c > 1/3: a third of the sphere's area
    assert abs(len(kept) / len(sphere) - 1 / 3) < 0.05
    towards_camera = kept.mean(0) / np.linalg.norm(kept.mean(0))
    assert (kept @ towards_camera > 0.2).all()


def test_scan_variant_differs_from_clean():
    clean, _ = make_corpus(1, 256, seed=0, variant="clean")
    scan, _ = make_corpus(1, 256, seed=0, variant="scan")
    assert scan.shape == clean.shape and not np.allclose(scan, clean)
    with pytest.raises(ValueError, match="variant"):
        make_corpus(1, 16, seed=0, variant="lidar")


# --- few-shot episodes -----------------------------------------------------------------------------
@pytest.mark.parametrize("setting", list(FEW_SHOT_SETTINGS))
def test_episode_sampler(setting):
    train_labels, test_labels = np.repeat(np.arange(15), 60), np.repeat(np.arange(15), 40)
    n_way, k_shot = FEW_SHOT_SETTINGS[setting]
    eps = few_shot_episodes(setting, train_labels, test_labels, n_episodes=10, n_query=20, n_val=10, n_unlabelled=50)
    assert len(eps) == 10
    for ep in eps:
        assert len(set(ep.classes)) == n_way
        assert np.array_equal(np.bincount(train_labels[ep.support], minlength=15)[ep.classes], [k_shot] * n_way)
        assert np.array_equal(np.bincount(test_labels[ep.query], minlength=15)[ep.classes], [20] * n_way)
        assert set(test_labels[ep.val]) <= set(ep.classes) and len(ep.val) == 10 * n_way
        assert not set(ep.query) & set(ep.val) and not set(ep.support) & set(ep.unlabelled)
        assert len(ep.unlabelled) == 50 and set(train_labels[ep.unlabelled]) <= set(ep.classes)
    assert len({tuple(ep.support) for ep in eps}) == 10  # episodes differ
    again = few_shot_episodes(setting, train_labels, test_labels, n_episodes=10, n_query=20, n_val=10, n_unlabelled=50)
    assert all(np.array_equal(a.support, b.support) and np.array_equal(a.query, b.query) for a, b in zip(eps, again))


def test_episode_sampler_explains_too_little_data():
    with pytest.raises(ValueError, match="only 3 qualify"):
        sample_episode(np.repeat(np.arange(3), 20), np.repeat(np.arange(3), 30), n_way=5, k_shot=10, episode=0)
    with pytest.raises(ValueError, match="unknown few-shot setting"):
        few_shot_episodes("3w1s", np.zeros(3, int), np.zeros(3, int))
