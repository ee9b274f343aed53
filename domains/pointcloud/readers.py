"""Readers for the standard point-cloud classification datasets, in their distributed layouts.

- ModelNet40 / ModelNet10 meshes (``ModelNet40/<class>/{train,test}/<class>_0001.off``),
  surface-sampled (area-weighted) to N points.
- ModelNet40 HDF5 (``modelnet40_ply_hdf5_2048``: ``ply_data_{train,test}<i>.h5`` with ``data``
  (n, 2048, 3) and ``label`` (n, 1), plus ``shape_names.txt``).
- ``modelnet40_normal_resampled`` (``modelnet40_shape_names.txt``, ``modelnet40_{train,test}.txt``
  listing ids such as ``airplane_0001``, and ``<class>/<id>.txt`` holding one
  ``x,y,z,nx,ny,nz`` line per point); ``modelnet10_*`` lists select ModelNet10.
- ScanObjectNN HDF5 (e.g. ``main_split/training_objectdataset_augmentedrot_scale75.h5`` with
  ``data`` (n, 2048, 3) and ``label`` (n,)).

Every reader returns a :class:`PointSet` and names the file, field and expected form on bad input.
The .off parser and sampling are ~40 lines of numpy rather than a trimesh dependency: trimesh
is not needed anywhere else, and ModelNet's known header defect (``OFF490 518 0`` on one line)
has to be handled by hand anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from suite.backbones.point import farthest_point_sample, gather_points

from .shapes import normalize_unit_sphere, sample_surface

#: ScanObjectNN's 15 categories in label order (from the dataset's release)
SCANOBJECTNN_CLASSES = [
    "bag", "bin", "box", "cabinet", "chair", "desk", "display", "door",
    "shelf", "table", "bed", "pillow", "sink", "sofa", "toilet",
]


@dataclass
class PointSet:
    """Clouds ``(M, N, 3)`` float32, integer labels ``(M,)``, class names and per-cloud ids."""

    points: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    ids: list[str]

    def __post_init__(self) -> None:
        if self.points.ndim != 3 or self.points.shape[-1] != 3:
            raise ValueError(f"points must be (M, N, 3), got {self.points.shape}")
        if len(self.labels) != len(self.points) or len(self.ids) != len(self.points):
            raise ValueError(f"{len(self.points)} clouds but {len(self.labels)} labels and {len(self.ids)} ids")


# --- helpers ------------------------------------------------------------------------------------------
def downsample(points: np.ndarray, n: int, chunk: int = 256) -> np.ndarray:
    """Farthest-point-sample every cloud of ``(M, P, 3)`` to ``(M, n, 3)`` (P >= n), as Point-MAE
    prepares its inputs; clouds that already have ``n`` points are returned unchanged."""
    if points.shape[1] == n:
        return points.astype(np.float32)
    if points.shape[1] < n:
        raise ValueError(f"clouds have {points.shape[1]} points, fewer than the num_points={n} requested")
    out = []
    for i in range(0, len(points), chunk):
        xyz = torch.from_numpy(np.ascontiguousarray(points[i : i + chunk], dtype=np.float32))
        out.append(gather_points(xyz, farthest_point_sample(xyz, n)).numpy())
    return np.concatenate(out)


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


# --- ModelNet .off meshes -----------------------------------------------------------------------------
def read_off(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Vertices ``(V, 3)`` and triangles ``(F, 3)`` of an OFF file; polygons are fan-triangulated.

    Handles ModelNet's defect where the counts follow ``OFF`` on the first line (``OFF490 518 0``).
    """
    path = Path(path)
    tokens_lines = [ln.split("#", 1)[0].split() for ln in path.read_text().splitlines()]
    lines = [t for t in tokens_lines if t]
    if not lines or not lines[0][0].startswith("OFF"):
        raise ValueError(f"{path}: first line must start with 'OFF', got {lines[0] if lines else 'an empty file'}")
    head = lines[0][0][3:]
    counts = ([head] if head else []) + lines[0][1:]
    body = lines[1:]
    if not counts:
        counts, body = body[0], body[1:]
    try:
        n_v, n_f = int(counts[0]), int(counts[1])
    except (IndexError, ValueError):
        raise ValueError(f"{path}: expected 'n_vertices n_faces n_edges' after OFF, got {counts}") from None
    if len(body) < n_v + n_f:
        raise ValueError(f"{path}: header promises {n_v} vertices and {n_f} faces but the file has {len(body)} data lines")
    try:
        verts = np.array([[float(x) for x in ln[:3]] for ln in body[:n_v]], dtype=np.float64)
    except ValueError as e:
        raise ValueError(f"{path}: vertex lines must be 'x y z' numbers ({e})") from None
    faces = []
    for i, ln in enumerate(body[n_v : n_v + n_f]):
        k = int(ln[0])
        idx = [int(x) for x in ln[1 : 1 + k]]
        if k < 3 or len(idx) != k or max(idx) >= n_v or min(idx) < 0:
            raise ValueError(f"{path}: face {i} '{' '.join(ln)}' must be 'k i1 .. ik' with k >= 3 indices below {n_v}")
        faces += [(idx[0], idx[j], idx[j + 1]) for j in range(1, k - 1)]
    if verts.shape != (n_v, 3):
        raise ValueError(f"{path}: vertex lines must hold 3 coordinates")
    return verts, np.asarray(faces, dtype=np.int64).reshape(-1, 3)


def read_modelnet_off(root: str | Path, split: str, num_points: int, seed: int = 0) -> PointSet:
    """``root/<class>/<split>/*.off`` -> clouds sampled on each mesh surface, unit-sphere normalised."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and (p / split).is_dir()) if root.is_dir() else []
    if not classes:
        raise FileNotFoundError(f"{root}: expected ModelNet folders <class>/{split}/*.off, found none")
    points, labels, ids = [], [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name / split).glob("*.off")):
            rng = np.random.default_rng([seed, len(ids)])
            v, tri = read_off(f)
            points.append(normalize_unit_sphere(sample_surface(v, tri, num_points, rng)))
            labels.append(label)
            ids.append(f.stem)
    return PointSet(np.stack(points).astype(np.float32), np.asarray(labels, np.int64), classes, ids)


# --- ModelNet40 HDF5 / ScanObjectNN HDF5 ----------------------------------------------------------------
def _read_h5_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import h5py

    with h5py.File(path, "r") as f:
        missing = [k for k in ("data", "label") if k not in f]
        if missing:
            raise KeyError(f"{path}: missing dataset(s) {missing}; expected 'data' (n, P, 3) and 'label' (n,) or (n, 1)")
        data, label = np.asarray(f["data"][:]), np.asarray(f["label"][:])
    if data.ndim != 3 or data.shape[-1] < 3:
        raise ValueError(f"{path}: 'data' must be (n, P, 3+) float, got shape {data.shape}")
    label = label.reshape(len(label), -1)
    if label.shape != (len(data), 1):
        raise ValueError(f"{path}: 'label' must be (n,) or (n, 1) with n = {len(data)}, got {label.shape}")
    return data[..., :3].astype(np.float32), label[:, 0].astype(np.int64)


def _check_labels(path: Path, labels: np.ndarray, n_classes: int) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"{path}: labels span {labels.min()}..{labels.max()}, expected 0..{n_classes - 1}")


def read_modelnet_h5(root: str | Path, split: str, num_points: int) -> PointSet:
    """``root/ply_data_<split><i>.h5`` (+ ``shape_names.txt``) of ``modelnet40_ply_hdf5_2048``."""
    root = Path(root)
    files = sorted(root.glob(f"ply_data_{split}*.h5"), key=lambda p: (len(p.name), p.name))
    if not files:
        raise FileNotFoundError(f"{root}: expected ply_data_{split}0.h5 ... (modelnet40_ply_hdf5_2048 layout)")
    names = _read_lines(root / "shape_names.txt")
    points, labels, ids = [], [], []
    for f in files:
        data, label = _read_h5_arrays(f)
        _check_labels(f, label, len(names))
        points.append(data)
        labels.append(label)
        ids += [f"{f.stem}:{i}" for i in range(len(data))]
    return PointSet(downsample(np.concatenate(points), num_points), np.concatenate(labels), names, ids)


def read_scanobjectnn_h5(path: str | Path, num_points: int) -> PointSet:
    """One ScanObjectNN file (``data`` (n, 2048, 3), ``label`` (n,)), e.g. the PB_T50_RS split."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ScanObjectNN file {path} not found (e.g. main_split/test_objectdataset_augmentedrot_scale75.h5)")
    data, label = _read_h5_arrays(path)
    _check_labels(path, label, len(SCANOBJECTNN_CLASSES))
    ids = [f"{path.stem}:{i}" for i in range(len(data))]
    return PointSet(downsample(data, num_points), label, list(SCANOBJECTNN_CLASSES), ids)


# --- modelnet40_normal_resampled txt ----------------------------------------------------------------
def read_modelnet_txt(root: str | Path, split: str, num_points: int, num_category: int = 40) -> PointSet:
    """``modelnet40_normal_resampled``: ids from ``modelnet{40,10}_<split>.txt``; normals are dropped."""
    root = Path(root)
    names = _read_lines(root / f"modelnet{num_category}_shape_names.txt")
    index = {n: i for i, n in enumerate(names)}
    ids = _read_lines(root / f"modelnet{num_category}_{split}.txt")
    points, labels = [], []
    for shape_id in ids:
        cls = shape_id.rsplit("_", 1)[0]
        if cls not in index:
            raise ValueError(f"{root / f'modelnet{num_category}_{split}.txt'}: id {shape_id!r} names no class in the shape_names file")
        f = root / cls / f"{shape_id}.txt"
        if not f.is_file():
            raise FileNotFoundError(f"{f} listed in modelnet{num_category}_{split}.txt but not found")
        arr = np.loadtxt(f, delimiter=",", dtype=np.float32, ndmin=2)
        if arr.shape[1] != 6:
            raise ValueError(f"{f}: expected 'x,y,z,nx,ny,nz' per line (6 columns), got {arr.shape[1]}")
        if len(arr) < num_points:
            raise ValueError(f"{f}: {len(arr)} points, fewer than num_points={num_points}")
        points.append(downsample(arr[None, :, :3], num_points)[0])  # files may differ in length
        labels.append(index[cls])
    return PointSet(np.stack(points), np.asarray(labels, np.int64), names, ids)
