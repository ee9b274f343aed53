"""The official point-cloud loaders' logic, transcribed for the reader tests ("the same values").

- ``modelnet_txt``: PointNet++'s ``data_utils/ModelNetDataLoader.py`` (yanx27/Pointnet_Pointnet2_pytorch;
  Point-BERT's and Point-MAE's ``datasets/ModelNetDataset.py`` are copies of it) with
  ``uniform=True`` and ``use_normals=False``: class list from ``modelnet{N}_shape_names.txt``,
  ids from ``modelnet{N}_{split}.txt``, ``np.loadtxt(delimiter=',').astype(np.float32)``,
  ``farthest_point_sample`` to ``npoints``, then ``pc_normalize`` of the xyz columns.
  Two changes: blank lines of the list files are skipped (see ``modelnet_txt``), and the FPS starts at point 0 (as pointnet2_ops' CUDA kernel, which Point-MAE's runner
  uses, does) instead of ``np.random.randint(0, N)``, so the result is deterministic.
- ``h5``: Point-BERT's / Point-MAE's ``datasets/ScanObjectNNDataset.py`` (``np.array(h5['data'])
  .astype(np.float32)``, ``np.array(h5['label']).astype(int)``), which is also what PointNet's
  ``provider.load_h5`` returns for ``modelnet40_ply_hdf5_2048`` up to the dtype.
- ``off``: the OFF grammar as a token stream (Geomview's definition; PointNet++'s
  ``OFFDataLoader.read_off`` reads the same tokens but splits on single spaces and rejects
  ModelNet's ``OFF<nv> <nf> 0`` first line), fan triangulation, and ``OFFDataLoader``'s class
  list: every class folder, sorted.

Written independently of ``domains.pointcloud.readers``; only numpy and h5py.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np


def pc_normalize(pc: np.ndarray) -> np.ndarray:
    centroid = np.mean(pc, axis=0)
    pc = pc - centroid
    m = np.max(np.sqrt(np.sum(pc**2, axis=1)))
    return pc / m


def farthest_point_sample(point: np.ndarray, npoint: int) -> np.ndarray:
    n = point.shape[0]
    xyz = point[:, :3]
    centroids = np.zeros((npoint,))
    distance = np.ones((n,)) * 1e10
    farthest = 0  # official: np.random.randint(0, N)
    for i in range(npoint):
        centroids[i] = farthest
        dist = np.sum((xyz - xyz[farthest, :]) ** 2, -1)
        mask = dist < distance
        distance[mask] = dist[mask]
        farthest = np.argmax(distance, -1)
    return point[centroids.astype(np.int32)]


def modelnet_txt(root: str | Path, split: str, npoints: int, num_category: int = 40) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(points (M, npoints, 3), labels (M,), class names) as ModelNetDataLoader serves them."""
    root = str(root)
    # official: every line, blank ones included (fixed: a blank line in a listing names the file
    # '<root>/.txt' and crashes the loader; one in the shape-names file adds a class '')
    cat = [line.rstrip() for line in open(os.path.join(root, f"modelnet{num_category}_shape_names.txt")) if line.strip()]
    classes = dict(zip(cat, range(len(cat))))
    shape_ids = [line.rstrip() for line in open(os.path.join(root, f"modelnet{num_category}_{split}.txt")) if line.strip()]
    shape_names = ["_".join(x.split("_")[0:-1]) for x in shape_ids]
    points, labels = [], []
    for name, sid in zip(shape_names, shape_ids):
        point_set = np.loadtxt(os.path.join(root, name, sid) + ".txt", delimiter=",").astype(np.float32)
        point_set = farthest_point_sample(point_set, npoints)
        point_set[:, 0:3] = pc_normalize(point_set[:, 0:3])
        points.append(point_set[:, 0:3])
        labels.append(classes[name])
    return np.stack(points), np.asarray(labels), cat


def h5(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(points, labels) of one ScanObjectNN / ModelNet40 HDF5 file as the official datasets hold them."""
    f = h5py.File(path, "r")
    points = np.array(f["data"]).astype(np.float32)
    labels = np.array(f["label"]).astype(int)
    f.close()
    return points, labels


def off(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(vertices (V, 3) float64, triangles (F, 3)) of an ASCII OFF file, read as a token stream."""
    tokens = [t for line in Path(path).read_text().splitlines() for t in line.split("#")[0].split()]
    head = tokens.pop(0)
    assert head.startswith("OFF"), head
    if head != "OFF":  # ModelNet: 'OFF490 518 0'
        tokens.insert(0, head[3:])
    n_v, n_f = int(tokens[0]), int(tokens[1])
    pos = 3
    verts = np.array([float(t) for t in tokens[pos : pos + 3 * n_v]], dtype=np.float64).reshape(n_v, 3)
    pos += 3 * n_v
    tris = []
    for _ in range(n_f):
        k = int(tokens[pos])
        idx = [int(t) for t in tokens[pos + 1 : pos + 1 + k]]
        assert len(idx) == k
        pos += 1 + k
        tris += [(idx[0], idx[j], idx[j + 1]) for j in range(1, k - 1)]
    return verts, np.asarray(tris, dtype=np.int64).reshape(-1, 3)


def off_classes(root: str | Path) -> list[str]:
    root = Path(root)
    return [d for d in sorted(os.listdir(root)) if os.path.isdir(root / d)]
