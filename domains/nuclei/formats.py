"""Nuclei file formats, read as their official tools write them; anything else is a :class:`NucleiFormatError`.

* **PanNuke folds** (Gamper et al. 2019/2020): ``images.npy`` (N, 256, 256, 3), ``masks.npy``
  (N, 256, 256, 6), ``types.npy`` (N,) tissue names. Mask channels 0-4 hold the instance ids of
  neoplastic, inflammatory, connective/soft-tissue, dead and epithelial nuclei; channel 5 is the
  background (1 where no nucleus). Files may sit anywhere below the fold folder (the official
  zips nest them as ``images/fold1/images.npy`` and ``masks/fold1/masks.npy``); they are
  memory-mapped, so an 8 GB float64 ``masks.npy`` is not read into memory. Values are checked
  per tile as it is read (finite, images in 0-255, masks non-negative integers); a fold whose
  float images lie in [0, 1] is rescaled to 0-255 with a warning.
* **HoVer-Net ``.mat`` labels** (CoNSeP, Kumar; Graham et al. 2019): ``inst_map`` (H, W),
  ``type_map`` (H, W), ``inst_type`` (N, 1), ``inst_centroid`` (N, 2). The class of a nucleus is
  the majority of its ``type_map`` pixels, as HoVer-Net's loaders use the per-pixel map; where
  ``inst_type`` says otherwise a warning names the file and the instance ids.
* **CoNSeP folders**: ``Images/<name>.png`` next to ``Labels/<name>.mat``. Classes follow
  HoVer-Net's 4-class convention by default (:data:`CONSEP_CONVENTIONS`).
* **Image folders** (prediction): plain RGB ``.png`` / ``.jpg`` / ``.jpeg`` / ``.tif`` tiles of
  any size, no labels.

Every reader either returns the documented values or raises :class:`NucleiFormatError` (the
suite's ``DataFormatError``, a ``ValueError``) whose message names the file, the field and the
expected form.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from skimage.segmentation import relabel_sequential

from suite.data import DataFormatError

#: PanNuke's nucleus classes, in the order of masks.npy channels 0-4 (channel 5: background)
PANNUKE_CLASSES = ("neoplastic", "inflammatory", "connective", "dead", "epithelial")

#: CoNSeP's types: 1 other, 2 inflammatory, 3 healthy epithelial, 4 dysplastic/malignant
#: epithelial, 5 fibroblast, 6 muscle, 7 endothelial. Conventions map them to training classes:
#:
#: * ``hovernet`` (default): HoVer-Net's paper and loader (``dataset.py``, CoNSeP): 3 + 4 ->
#:   epithelial, 5 + 6 + 7 -> spindle-shaped, "other" and inflammatory kept: 4 classes.
#: * ``pannuke``: onto PanNuke's five, our mapping (no published one exists): malignant
#:   epithelial -> neoplastic, healthy epithelial -> epithelial, fibroblast / muscle /
#:   endothelial -> connective, inflammatory -> inflammatory, and "other" (necrotic, mitotic and
#:   unclassifiable nuclei) -> dead, the nearest PanNuke class.
CONSEP_CONVENTIONS: dict[str, tuple[tuple[str, ...], dict[int, int]]] = {
    "hovernet": (("other", "inflammatory", "epithelial", "spindle-shaped"), {1: 1, 2: 2, 3: 3, 4: 3, 5: 4, 6: 4, 7: 4}),
    "pannuke": (PANNUKE_CLASSES, {1: 4, 2: 2, 3: 5, 4: 1, 5: 3, 6: 3, 7: 3}),
}

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


class NucleiFormatError(DataFormatError):
    """A nuclei data file not in its documented form; the message names the file, the field and the expected form."""


def _fail(file: Any, field: str, expected: str, got: str) -> NucleiFormatError:
    return NucleiFormatError(file, field, f"expected {expected}, got {got}")


def _integral_map(arr: Any, file: Any, field: str, ndim: int = 2) -> np.ndarray:
    """A label map as int64, refusing NaN / inf, negatives, fractions, wrong rank or non-numeric dtypes."""
    a = np.asarray(arr)
    expected = f"a {ndim}-D array of non-negative integers"
    if a.ndim != ndim:
        raise _fail(file, field, expected, f"shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating) or a.dtype == bool):
        raise _fail(file, field, expected, f"dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise _fail(file, field, expected, f"{int((~np.isfinite(a)).sum())} NaN / inf values")
        if (a != np.rint(a)).any():
            raise _fail(file, field, expected, "fractional values")
        if a.size and a.max() > np.iinfo(np.int32).max:
            raise _fail(file, field, expected, f"values up to {a.max():g}")
    if a.size and a.min() < 0:
        raise _fail(file, field, expected, f"negative values (min {a.min()})")
    return a.astype(np.int64)


# --------------------------------------------------------------------------------------------
# PanNuke
def load_npy(path: Path, field: str, expected: str, mmap: bool = True) -> np.ndarray:
    """``np.load`` that never unpickles and turns every failure (truncation, bad header) into our error."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as err:  # numpy raises ValueError, OSError, EOFError, UnicodeDecodeError, ... by damage
        raise _fail(path, field, expected, f"an unreadable .npy ({type(err).__name__}: {err})") from err


def _find_one(root: Path, name: str) -> Path:
    hits = sorted(root.rglob(name))
    if len(hits) != 1:
        raise FileNotFoundError(
            f"PanNuke fold {root}: expected exactly one {name} below it, found {len(hits)} {[str(h) for h in hits[:4]]}"
        )
    return hits[0]


@dataclass
class PanNukeFold:
    """One PanNuke fold, memory-mapped; :meth:`image` and :meth:`maps` check each tile as it is read."""

    root: Path
    paths: dict[str, Path]
    images: np.ndarray  # raw, as stored; read tiles through image(i)
    masks: np.ndarray
    types: np.ndarray
    groups: np.ndarray | None = None  # slide ids where known (generated data); PanNuke has none
    image_scale: float = 1.0  # 255 for a fold stored in [0, 1]
    magnification: int = 40

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> np.ndarray:
        """Tile ``i`` as uint8 (H, W, 3), 0-255."""
        a = np.asarray(self.images[i])
        if np.issubdtype(a.dtype, np.floating):
            if not np.isfinite(a).all():
                raise _fail(self.paths["images"], f"tile {i}", "finite RGB values in 0-255", "NaN / inf values")
            a = a * self.image_scale
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo < 0 or hi > 255.5:
            raise _fail(self.paths["images"], f"tile {i}", "RGB values in 0-255" + (" (fold scaled from [0, 1])" if self.image_scale != 1 else ""),
                        f"values in [{lo:g}, {hi:g}]")
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)

    def maps(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(inst_map, type_map) of tile ``i``; see :func:`pannuke_maps`."""
        mask = _integral_map(self.masks[i], self.paths["masks"], f"tile {i}", ndim=3)
        return pannuke_maps(mask)


def read_pannuke_fold(root: str | Path) -> PanNukeFold:
    """Open a PanNuke fold folder (official nested layout or the three files side by side)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"PanNuke fold folder {root} not found")
    paths = {n: _find_one(root, f"{n}.npy") for n in ("images", "masks", "types")}
    images = load_npy(paths["images"], "images", "a numeric (N, H, W, 3) array of RGB tiles")
    masks = load_npy(paths["masks"], "masks", "a numeric (N, H, W, 6) array of instance ids")
    types = load_npy(paths["types"], "types", "a string array (N,) of tissue names", mmap=False)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise _fail(paths["images"], "images", "shape (N, H, W, 3)", f"shape {images.shape}")
    if masks.ndim != 4 or masks.shape[-1] != 6:
        raise _fail(paths["masks"], "masks", "shape (N, H, W, 6) (channels: neoplastic, inflammatory, connective, dead, "
                    "epithelial, background)", f"shape {masks.shape}")
    for name, arr in (("images", images), ("masks", masks)):
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise _fail(paths[name], name, "an integer or float32/float64 array", f"dtype {arr.dtype}")
    if types.dtype.kind not in "US" or types.ndim != 1:
        raise _fail(paths["types"], "types", "a string array (N,) of tissue names", f"dtype {types.dtype}, shape {types.shape}")
    if masks.shape[:3] != images.shape[:3] or types.shape != (len(images),):
        raise NucleiFormatError(root, None, f"PanNuke fold: images {images.shape} ({paths['images']}), masks "
                                f"{masks.shape} ({paths['masks']}) and types {types.shape} ({paths['types']}) must agree on N, H, W")
    groups = None
    groups_file = paths["images"].parent / "groups.npy"
    if groups_file.is_file():
        groups = load_npy(groups_file, "groups", "an integer array (N,) of slide ids", mmap=False)
        if groups.shape != (len(images),) or not np.issubdtype(groups.dtype, np.integer):
            raise _fail(groups_file, "groups", f"an integer array of shape ({len(images)},)", f"{groups.dtype} {groups.shape}")
    fold = PanNukeFold(root, paths, images, masks, types.astype(str), groups, image_scale=_image_scale(images, paths["images"]))
    meta = paths["images"].parent / "magnification.txt"  # written by the generator; PanNuke is 40x
    if meta.is_file():
        text = meta.read_text().strip()
        if not text.isdigit():
            raise _fail(meta, "magnification", "an integer objective magnification such as 40", repr(text[:40]))
        fold.magnification = int(text)
    return fold


def _image_scale(images: np.ndarray, path: Path) -> float:
    """255 when a float fold is stored in [0, 1] (checked on up to 8 tiles spread over the fold), else 1."""
    if not np.issubdtype(images.dtype, np.floating) or not len(images):
        return 1.0
    sample = np.unique(np.linspace(0, len(images) - 1, min(8, len(images))).astype(int))
    maxima = [float(np.nanmax(np.asarray(images[i]))) if np.isfinite(images[i]).any() else 0.0 for i in sample]
    if all(m <= 1.0 for m in maxima) and any(m > 0 for m in maxima):
        warnings.warn(f"{path}: float images lie in [0, 1]; rescaled to 0-255 (PanNuke's are 0-255)", stacklevel=3)
        return 255.0
    return 1.0


def pannuke_maps(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PanNuke (H, W, 6) mask -> (inst_map, type_map), ids 1..n, types 1..5 (0 background).

    Ids are renumbered per channel, so ids repeated across channels stay distinct. Where two
    class channels claim a pixel, the later channel wins, as in PanNuke's own ``binarize``.
    """
    inst = np.zeros(mask.shape[:2], np.int64)
    types = np.zeros(mask.shape[:2], np.int32)
    offset = 0
    for c in range(5):
        relabelled, _, _ = relabel_sequential(np.asarray(mask[..., c]).astype(np.int64))
        on = relabelled > 0
        inst[on] = relabelled[on] + offset
        types[on] = c + 1
        offset += int(relabelled.max())
    inst, _, _ = relabel_sequential(inst)  # ids fully overwritten by a later channel leave gaps
    return inst.astype(np.int32), types


# --------------------------------------------------------------------------------------------
# HoVer-Net .mat labels and CoNSeP folders
def read_hovernet_mat(file: str | Path | IO[bytes], name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(inst_map int32, type_map int32) of a HoVer-Net ``.mat``; classes are the majority of ``type_map`` per nucleus.

    ``type_map`` is the per-pixel truth HoVer-Net trains on; each nucleus takes its majority
    non-zero class (so a ragged type outline cannot split a nucleus into two classes). Where
    ``inst_type`` disagrees, a warning names the file and the instance ids. ``inst_type`` is
    indexed by id (HoVer-Net: ids 1..N) or, for maps with gaps in the ids and one row per
    nucleus, by rank of id.
    """
    from scipy.io import loadmat

    label = name or str(file)
    try:
        mat = loadmat(file)
    except Exception as err:  # scipy raises ValueError, TypeError, OSError, MatReadError, ... by damage
        raise _fail(label, "file", "a MATLAB .mat with inst_map and type_map", f"an unreadable file ({type(err).__name__}: {err})") from err
    for key in ("inst_map", "type_map"):
        if key not in mat:
            raise _fail(label, key, "inst_map (H, W) and type_map (H, W) (HoVer-Net layout)",
                        f"fields {sorted(k for k in mat if not k.startswith('__'))}")
    inst = _integral_map(mat["inst_map"], label, "inst_map")
    types = _integral_map(mat["type_map"], label, "type_map")
    if types.shape != inst.shape:
        raise _fail(label, "type_map", f"the shape of inst_map {inst.shape}", f"shape {types.shape}")
    ids = np.unique(inst[inst > 0])
    votes = np.zeros((int(ids.max()) + 1 if len(ids) else 1, int(types.max()) + 1 if types.size else 1), np.int64)
    np.add.at(votes, (inst[inst > 0], types[inst > 0]), 1)
    votes[:, 0] = np.where(votes[:, 1:].sum(1) > 0, -1, votes[:, 0])  # background votes only when nothing else
    majority = votes.argmax(1)
    untyped = [int(i) for i in ids if majority[i] == 0]
    if untyped:
        raise _fail(label, "type_map", "a class > 0 on the pixels of every nucleus", f"only 0 under instance ids {untyped[:10]}")
    if "inst_type" in mat:
        _check_inst_type(mat["inst_type"], ids, majority, label)
    lut = np.zeros(len(votes), np.int32)
    lut[ids] = majority[ids]
    return inst.astype(np.int32), lut[inst]


def _check_inst_type(inst_type: Any, ids: np.ndarray, majority: np.ndarray, label: str) -> None:
    listed = np.asarray(inst_type)
    if listed.size and not np.issubdtype(listed.dtype, np.number):
        raise _fail(label, "inst_type", "a numeric (N, 1) array", f"dtype {listed.dtype}")
    listed = listed.reshape(-1)
    if len(ids) and len(listed) >= ids.max():
        stated = listed[ids - 1]
    elif len(listed) == len(ids):
        stated = listed
    else:
        warnings.warn(f"{label}: inst_type lists {len(listed)} nuclei for {len(ids)} instances (max id "
                      f"{ids.max() if len(ids) else 0}); classes come from type_map alone", stacklevel=3)
        return
    bad = [int(i) for i, s in zip(ids, stated) if not np.isfinite(s) or int(s) != majority[i]]
    if bad:
        warnings.warn(f"{label}: inst_type disagrees with the majority of type_map for instance ids {bad[:20]}"
                      f"{' ...' if len(bad) > 20 else ''} ({len(bad)} of {len(ids)}); type_map is used", stacklevel=3)


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as uint8 RGB (H, W, 3); alpha is dropped, 16-bit and greyscale are refused."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode not in ("RGB", "RGBA", "P"):
                raise _fail(path, "pixels", "an 8-bit RGB(A) image", f"PIL mode {mode}")
            return np.array(im.convert("RGB"))  # a writable copy (torch refuses read-only buffers)
    except NucleiFormatError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:  # truncated / corrupt files
        raise _fail(path, "pixels", "a readable PNG / JPEG / TIFF image", f"{type(err).__name__}: {err}") from err


@dataclass
class ConsepImage:
    """One CoNSeP image: RGB uint8, instance map and per-pixel class (after the convention's mapping)."""

    name: str
    image: np.ndarray
    inst_map: np.ndarray
    type_map: np.ndarray


def read_consep(root: str | Path, convention: str = "hovernet", mapping: dict[int, int] | None = None) -> list[ConsepImage]:
    """Read ``root/Images/*.png`` + ``root/Labels/*.mat`` (HoVer-Net's CoNSeP / Kumar layout).

    ``convention`` picks the class merging of :data:`CONSEP_CONVENTIONS`; ``mapping`` (CoNSeP
    type -> class index of that convention) replaces its mapping.
    """
    if convention not in CONSEP_CONVENTIONS:
        raise ValueError(f"CoNSeP convention must be one of {sorted(CONSEP_CONVENTIONS)}, got {convention!r}")
    names, default = CONSEP_CONVENTIONS[convention]
    lut_map = default if mapping is None else {int(k): int(v) for k, v in mapping.items()}
    if any(not 1 <= v <= len(names) for v in lut_map.values()):
        raise ValueError(f"CoNSeP mapping {lut_map} must send types to classes 1..{len(names)} of {names}")
    root = Path(root)
    pngs = sorted((root / "Images").glob("*.png"))
    if not pngs:
        raise FileNotFoundError(f"no PNG images in {root / 'Images'} (expected CoNSeP layout Images/*.png + Labels/*.mat)")
    out = []
    for png in pngs:
        mat_file = root / "Labels" / f"{png.stem}.mat"
        if not mat_file.is_file():
            raise FileNotFoundError(f"{png}: label file {mat_file} not found")
        image = read_rgb(png)
        inst, types = read_hovernet_mat(mat_file)
        if inst.shape != image.shape[:2]:
            raise _fail(mat_file, "inst_map", f"the shape of image {png} {image.shape[:2]}", f"shape {inst.shape}")
        unknown = sorted(set(np.unique(types[types > 0]).tolist()) - set(lut_map))
        if unknown:
            raise _fail(mat_file, "type_map", f"CoNSeP types {sorted(lut_map)} (convention {convention!r})", f"types {unknown}")
        lut = np.zeros(int(types.max()) + 1, np.int32)
        for k, v in lut_map.items():
            if k < len(lut):
                lut[k] = v
        out.append(ConsepImage(png.stem, image, inst, lut[types]))
    return out


def image_folder(root: str | Path) -> list[Path]:
    """The image files of a prediction folder (sorted; sub-folders are not searched)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"prediction folder {root} not found")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} images in {root}")
    return files
