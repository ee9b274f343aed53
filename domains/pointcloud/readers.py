"""Readers for the standard point-cloud classification datasets, in their distributed layouts.

- ModelNet40 / ModelNet10 meshes (``ModelNet40/<class>/{train,test}/<class>_0001.off``),
  surface-sampled (area-weighted) to N points and unit-sphere normalised.
- ModelNet40 HDF5 (``modelnet40_ply_hdf5_2048``: ``ply_data_{train,test}<i>.h5`` with ``data``
  (n, 2048, 3) and ``label`` (n, 1), plus ``shape_names.txt``), values as PointNet's
  ``provider.load_h5`` reads them.
- ``modelnet40_normal_resampled`` (``modelnet{40,10}_shape_names.txt``,
  ``modelnet{40,10}_{train,test}.txt`` listing ids such as ``airplane_0001``, and
  ``<class>/<id>.txt`` holding one ``x,y,z,nx,ny,nz`` line per point), as PointNet++'s
  ``ModelNetDataLoader`` (and Point-BERT's / Point-MAE's copy of it) reads them: parsed as
  float64, cast to float32, farthest-point-sampled, then ``pc_normalize``.
- ScanObjectNN HDF5 (``main_split/training_objectdataset_augmentedrot_scale75.h5`` and the
  other variants, with ``data`` (n, 2048, 3) and ``label`` (n,)), values as Point-BERT's /
  Point-MAE's ``ScanObjectNN`` dataset reads them.

Class lists are built once per dataset (from the official shape-names file where the layout has
one, else from every class folder), never per split, so a class missing from one split cannot
shift the labels of the other.

Every reader either returns the values the official loader returns (see each function) or raises
:class:`PointCloudFormatError` (a :class:`suite.data.DataFormatError`) naming the file, the field
and the expected form: library errors
(h5py, numpy parsing, UTF-8 decoding) are caught and re-raised as it, and NaN / inf coordinates
are refused rather than passed on. A missing file or folder is a ``FileNotFoundError``.
The .off parser and sampling are ~60 lines of numpy rather than a trimesh dependency: trimesh
is not needed anywhere else, and ModelNet's known header defect (``OFF490 518 0`` on one line)
has to be handled by hand anyway.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from suite.backbones.point import farthest_point_sample, gather_points
from suite.data import DataFormatError

from .synth import normalize_unit_sphere, sample_surface

#: bump when a reader's output for the same files changes, so cached clouds are rebuilt
READER_VERSION = 2

#: ScanObjectNN's 15 categories in label order (from the dataset's release)
SCANOBJECTNN_CLASSES = [
    "bag", "bin", "box", "cabinet", "chair", "desk", "display", "door",
    "shelf", "table", "bed", "pillow", "sink", "sofa", "toilet",
]


class PointCloudFormatError(DataFormatError):
    """A point-cloud file that is not in its format's expected form (the suite's
    :class:`~suite.data.DataFormatError`, a ``ValueError``).

    ``path`` is the file, ``field`` the part of it at fault (an HDF5 dataset, a line, a header
    count), ``expected`` the form the reader needs and ``got`` what it found; the message states
    them all: ``<path>: field '<field>': expected <expected>, got <got>``.
    """

    def __init__(self, path: str | Path, field: str, expected: str, got: Any = None) -> None:
        super().__init__(path, field, f"expected {expected}" + ("" if got is None else f", got {got}"))
        self.expected, self.got = expected, got


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
    prepares its inputs (pointnet2's FPS, which starts at point 0); clouds that already have ``n``
    points are returned unchanged."""
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
    """Non-blank lines, ``rstrip``ped and split at universal newlines, as the official loaders'
    ``[line.rstrip() for line in open(path)]`` reads them (blank lines, which break those, skipped)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise PointCloudFormatError(path, f"byte {e.start}", "UTF-8 text, one name per line") from None
    return [ln.rstrip() for ln in re.split(r"\r\n|\r|\n", text) if ln.strip()]


def _read_shape_names(path: Path) -> list[str]:
    """The official class list of a dataset: one distinct name per line, label = line number."""
    names = _read_lines(path)
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup or not names:
        raise PointCloudFormatError(path, "names", "one distinct class name per line", f"repeated {dup}" if dup else "no names")
    return names


def _check_finite(path: Path, field: str, points: np.ndarray) -> None:
    bad = ~np.isfinite(points)
    if bad.any():
        where = np.argwhere(bad)[0].tolist()
        raise PointCloudFormatError(path, field, "finite coordinates", f"{points[tuple(where)]} at index {where}")


def _check_labels(path: Path, labels: np.ndarray, n_classes: int) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise PointCloudFormatError(path, "label", f"class indices 0..{n_classes - 1}", f"labels span {labels.min()}..{labels.max()}")


def _enough_points(path: Path, field: str, n_points: int, num_points: int) -> None:
    if n_points < num_points:
        raise PointCloudFormatError(path, field, f"at least num_points={num_points} points per cloud", n_points)


# --- ModelNet .off meshes -----------------------------------------------------------------------------
def read_off(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Vertices ``(V, 3)`` float64 and triangles ``(F, 3)`` of an ASCII OFF file; polygons are
    fan-triangulated (``k i1 .. ik`` -> ``(i1, ij, ij+1)``).

    Handles ModelNet's defect where the counts follow ``OFF`` on the first line (``OFF490 518 0``).
    Strict where the format is: a vertex line is exactly 3 finite numbers, a face line exactly
    ``k`` and ``k`` integer indices below the vertex count, and the file holds exactly the lines
    its header promises (comments after ``#`` and blank lines aside).
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise PointCloudFormatError(path, f"byte {e.start}", "an ASCII OFF file") from None
    lines = [t for t in (ln.split("#", 1)[0].split() for ln in text.splitlines()) if t]
    if not lines or not lines[0][0].startswith("OFF"):
        raise PointCloudFormatError(path, "first line", "'OFF' (optionally followed by the counts)", lines[0] if lines else "an empty file")
    head = lines[0][0][3:]
    counts, body = ([head] if head else []) + lines[0][1:], lines[1:]
    if not counts and body:
        counts, body = body[0], body[1:]
    try:
        n_v, n_f, *_ = [int(c) for c in counts]  # n_edges, if present, is unused (ModelNet writes 0)
        if len(counts) > 3 or n_v < 3 or n_f < 1:
            raise ValueError
    except ValueError:  # also fewer than two counts
        raise PointCloudFormatError(path, "header counts", "'n_vertices n_faces [n_edges]' integers, at least 3 vertices and 1 face", counts) from None
    if len(body) != n_v + n_f:
        raise PointCloudFormatError(path, "data lines", f"{n_v} vertex + {n_f} face lines as the header promises", len(body))
    try:
        if any(len(ln) != 3 for ln in body[:n_v]):
            raise ValueError
        verts = np.array([[float(x) for x in ln] for ln in body[:n_v]], dtype=np.float64).reshape(n_v, 3)
    except ValueError:
        bad = next(i for i, ln in enumerate(body[:n_v]) if len(ln) != 3 or not all(_is_float(x) for x in ln))
        raise PointCloudFormatError(path, f"vertex {bad}", "3 numbers 'x y z'", " ".join(body[bad])) from None
    _check_finite(path, "vertices", verts)
    faces = []
    for i, ln in enumerate(body[n_v:]):
        try:
            idx = [int(x) for x in ln]
            k = idx[0]
            if k < 3 or len(idx) != k + 1 or min(idx[1:]) < 0 or max(idx[1:]) >= n_v:
                raise ValueError
        except ValueError:
            raise PointCloudFormatError(path, f"face {i}", f"integers 'k i1 .. ik' with k >= 3 indices below {n_v}", " ".join(ln)) from None
        faces += [(idx[1], idx[j], idx[j + 1]) for j in range(2, k)]
    return verts, np.asarray(faces, dtype=np.int64).reshape(-1, 3)


def _is_float(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def modelnet_classes(root: Path) -> list[str]:
    """Class folders of a ModelNet mesh root (``<class>/train`` or ``<class>/test``), sorted: the
    same list for both splits, as PointNet++'s ``OFFDataLoader`` lists every class folder."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and ((p / "train").is_dir() or (p / "test").is_dir())) if root.is_dir() else []


def read_modelnet_off(root: str | Path, split: str, num_points: int, seed: int = 0) -> PointSet:
    """``root/<class>/<split>/*.off`` -> clouds sampled on each mesh surface, then ``pc_normalize``d.

    Labels index :func:`modelnet_classes` (every class of the root, whichever split has it).
    Cloud ``i`` draws its points from ``default_rng([seed, i])``.
    """
    root = Path(root)
    classes = modelnet_classes(root)
    if not classes:
        raise FileNotFoundError(f"{root}: expected ModelNet folders <class>/{{train,test}}/*.off, found none")
    points, labels, ids = [], [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name / split).glob("*.off")):
            rng = np.random.default_rng([seed, len(ids)])
            v, tri = read_off(f)
            try:
                points.append(normalize_unit_sphere(sample_surface(v, tri, num_points, rng)).astype(np.float32))
            except ValueError as e:  # no surface area, or every sample at one point
                raise PointCloudFormatError(f, "faces", "a mesh with a surface to sample", str(e)) from None
            labels.append(label)
            ids.append(f.stem)
    if not points:
        raise FileNotFoundError(f"{root}: no {split} meshes (<class>/{split}/*.off)")
    return PointSet(np.stack(points), np.asarray(labels, np.int64), classes, ids)


# --- ModelNet40 HDF5 / ScanObjectNN HDF5 ----------------------------------------------------------------
def _read_h5_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``data`` (n, P, 3) as float32 and ``label`` (n,) or (n, 1) as int64, as the official loaders
    read them (``np.array(f['data']).astype(np.float32)``), checked: a channels-first (n, 3, P) or
    a 6-channel array is refused rather than read as something else."""
    import h5py

    expected = "an HDF5 file with datasets 'data' (n, P, 3) float and 'label' (n,) or (n, 1) integer"
    try:
        with h5py.File(path, "r") as f:
            for key in ("data", "label"):
                if not isinstance(f.get(key), h5py.Dataset):
                    raise PointCloudFormatError(path, key, expected, f"keys {sorted(f.keys())}")
            data, label = np.asarray(f["data"][()]), np.asarray(f["label"][()])
    except PointCloudFormatError:
        raise
    except Exception as e:  # truncated or corrupted file: h5py / HDF5 raise OSError, KeyError, RuntimeError, ...
        raise PointCloudFormatError(path, "file", expected, f"{type(e).__name__}: {e}") from None
    if data.dtype.kind not in "fiu" or data.ndim != 3 or data.shape[-1] != 3 or not len(data):
        raise PointCloudFormatError(path, "data", "a non-empty (n, P, 3) array of numbers", f"{data.dtype} {data.shape}")
    if label.dtype.kind not in "iu":
        raise PointCloudFormatError(path, "label", "integer class indices", label.dtype)
    if label.shape not in ((len(data),), (len(data), 1)):
        raise PointCloudFormatError(path, "label", f"shape ({len(data)},) or ({len(data)}, 1)", label.shape)
    xyz = data.astype(np.float32)
    _check_finite(path, "data", xyz)
    return xyz, label.reshape(-1).astype(np.int64)


def read_modelnet_h5(root: str | Path, split: str, num_points: int) -> PointSet:
    """``root/ply_data_<split><i>.h5`` (+ ``shape_names.txt``) of ``modelnet40_ply_hdf5_2048``:
    the clouds as stored (PointNet's release is already unit-sphere normalised), then FPS."""
    root = Path(root)
    files = sorted(root.glob(f"ply_data_{split}*.h5"), key=lambda p: (len(p.name), p.name))
    if not files:
        raise FileNotFoundError(f"{root}: expected ply_data_{split}0.h5 ... (modelnet40_ply_hdf5_2048 layout)")
    names = _read_shape_names(root / "shape_names.txt")
    points, labels, ids = [], [], []
    for f in files:
        data, label = _read_h5_arrays(f)
        _check_labels(f, label, len(names))
        _enough_points(f, "data", data.shape[1], num_points)
        points.append(downsample(data, num_points))
        labels.append(label)
        ids += [f"{f.stem}:{i}" for i in range(len(data))]
    return PointSet(np.concatenate(points), np.concatenate(labels), names, ids)


def read_scanobjectnn_h5(path: str | Path, num_points: int) -> PointSet:
    """One ScanObjectNN file (``data`` (n, 2048, 3), ``label`` (n,)), e.g. the PB_T50_RS split.

    In ``main_split/``, ``training_objectdataset_augmentedrot_scale75.h5`` is PB_T50_RS and
    ``training_objectdataset.h5`` is OBJ_BG; OBJ_ONLY is ``main_split_nobg/training_objectdataset.h5``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ScanObjectNN file {path} not found (e.g. main_split/test_objectdataset_augmentedrot_scale75.h5)")
    data, label = _read_h5_arrays(path)
    _check_labels(path, label, len(SCANOBJECTNN_CLASSES))
    _enough_points(path, "data", data.shape[1], num_points)
    ids = [f"{path.stem}:{i}" for i in range(len(data))]
    return PointSet(downsample(data, num_points), label, list(SCANOBJECTNN_CLASSES), ids)


# --- modelnet40_normal_resampled txt ----------------------------------------------------------------
def read_txt_cloud(path: Path) -> np.ndarray:
    """One ``x,y,z,nx,ny,nz`` file as float32 ``(P, 6)``: ``np.loadtxt(delimiter=',')`` then
    ``astype(np.float32)``, as PointNet++ reads it; the xyz columns must be finite (the normals
    are not used and not checked)."""
    try:
        with warnings.catch_warnings():  # an empty file and float32 overflow are refused just below
            warnings.simplefilter("ignore")
            arr = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2).astype(np.float32)
    except ValueError as e:  # a short or long line, a non-number, bad UTF-8: numpy names no file
        raise PointCloudFormatError(path, "lines", "6 comma-separated numbers 'x,y,z,nx,ny,nz' per line", str(e)) from None
    if arr.shape[1] != 6 or not len(arr):
        raise PointCloudFormatError(path, "lines", "6 comma-separated numbers 'x,y,z,nx,ny,nz' per line", f"{arr.shape[1]} columns, {len(arr)} lines")
    _check_finite(path, "xyz", arr[:, :3])
    return arr


def read_modelnet_txt(root: str | Path, split: str, num_points: int, num_category: int = 40) -> PointSet:
    """``modelnet40_normal_resampled``: ids from ``modelnet{40,10}_<split>.txt``, labels from
    ``modelnet{40,10}_shape_names.txt``; each cloud farthest-point-sampled to ``num_points``
    and then ``pc_normalize``d (PointNet++'s ``uniform`` order); normals are dropped."""
    if num_category not in (10, 40):
        raise ValueError(f"num_category must be 10 (ModelNet10) or 40 (ModelNet40), got {num_category}")
    root = Path(root)
    shape_names = root / f"modelnet{num_category}_shape_names.txt"
    names = _read_shape_names(shape_names)
    index = {n: i for i, n in enumerate(names)}
    listing = root / f"modelnet{num_category}_{split}.txt"
    ids = _read_lines(listing)
    points, labels = [], []
    for shape_id in ids:
        match = re.fullmatch(r"(.+)_\d+", shape_id)  # the official loaders take the class as the part before the last '_'
        cls = match.group(1) if match else None
        if cls not in index:
            raise PointCloudFormatError(listing, f"id {shape_id!r}", f"'<class>_<number>' with <class> listed in {shape_names}")
        f = root / cls / f"{shape_id}.txt"
        if not f.is_file():
            raise PointCloudFormatError(listing, f"id {shape_id!r}", f"a cloud file {f}, which does not exist")
        arr = read_txt_cloud(f)
        _enough_points(f, "lines", len(arr), num_points)
        xyz = downsample(arr[None, :, :3], num_points)[0]  # files may differ in length
        try:
            points.append(normalize_unit_sphere(xyz).astype(np.float32))
        except ValueError as e:
            raise PointCloudFormatError(f, "xyz", "a cloud with some extent", str(e)) from None
        labels.append(index[cls])
    if not points:
        raise PointCloudFormatError(listing, "ids", "at least one shape id")
    return PointSet(np.stack(points), np.asarray(labels, np.int64), names, ids)
