"""Nuclei data: PanNuke and CoNSeP readers, HoVer-Net targets and the DataModule.

Formats read exactly as published:

* PanNuke folds (Gamper et al. 2019/2020): ``images.npy`` (N, 256, 256, 3), ``masks.npy``
  (N, 256, 256, 6), ``types.npy`` (N,) tissue names. Mask channels 0-4 hold the instance ids of
  neoplastic, inflammatory, connective/soft-tissue, dead and epithelial nuclei; channel 5 is the
  background (1 where no nucleus). Files may sit anywhere below the fold folder (the official
  zips nest them as ``images/fold1/images.npy`` and ``masks/fold1/masks.npy``); they are
  memory-mapped, so an 8 GB float64 ``masks.npy`` is not read into memory.
* CoNSeP / HoVer-Net labels (Graham et al. 2019): ``Images/<name>.png`` next to
  ``Labels/<name>.mat`` holding ``inst_map`` (H, W), ``type_map`` (H, W), ``inst_type`` (N, 1)
  and ``inst_centroid`` (N, 2). Classes are mapped onto PanNuke's five (see ``CONSEP_TO_PANNUKE``)
  and images are cut into tiles grouped by source image.

The generated default is written in the PanNuke layout (plus ``groups.npy``, slide ids), so the
PanNuke reader serves both.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.io import loadmat
from skimage.segmentation import find_boundaries, relabel_sequential
from torch.utils.data import Dataset

from suite.data import SuiteDataModule, cached, generated_dir, split_by_group

from .synth import CLASS_NAMES, generate_pannuke

#: CoNSeP types (1 other, 2 inflammatory, 3 healthy epithelial, 4 dysplastic/malignant epithelial,
#: 5 fibroblast, 6 muscle, 7 endothelial) -> PanNuke classes (1 neoplastic, 2 inflammatory,
#: 3 connective, 4 dead, 5 epithelial). CoNSeP's "other" holds necrotic and unclassifiable nuclei;
#: "dead" is the nearest PanNuke class. Override with ``NucleiData(consep_types=...)``.
CONSEP_TO_PANNUKE = {1: 4, 2: 2, 3: 5, 4: 1, 5: 3, 6: 3, 7: 3}

GENERATOR_VERSION = 1  # bump when synth.py changes, so stale caches are not reused


# --------------------------------------------------------------------------------------------
# readers
@dataclass
class PanNukeFold:
    """One PanNuke fold, memory-mapped: ``images`` (N, H, W, 3), ``masks`` (N, H, W, 6), ``types`` (N,)."""

    root: Path
    images: np.ndarray
    masks: np.ndarray
    types: np.ndarray
    groups: np.ndarray | None = None  # slide ids where known (generated data); PanNuke has none

    def __len__(self) -> int:
        return len(self.images)

    def maps(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(inst_map, type_map) of tile ``i``; see :func:`pannuke_maps`."""
        return pannuke_maps(np.asarray(self.masks[i]))


def _find_one(root: Path, name: str) -> Path:
    hits = sorted(root.rglob(name))
    if len(hits) != 1:
        raise FileNotFoundError(
            f"PanNuke fold {root}: expected exactly one {name} below it, found {len(hits)} {[str(h) for h in hits[:4]]}"
        )
    return hits[0]


def read_pannuke_fold(root: str | Path) -> PanNukeFold:
    """Open a PanNuke fold folder (official nested layout or the three files side by side)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"PanNuke fold folder {root} not found")
    paths = {n: _find_one(root, f"{n}.npy") for n in ("images", "masks", "types")}
    images = np.load(paths["images"], mmap_mode="r")
    masks = np.load(paths["masks"], mmap_mode="r")
    try:
        types = np.load(paths["types"], allow_pickle=False)  # never unpickle a data file
    except ValueError as err:
        raise ValueError(f"{paths['types']}: expected a numpy string array of tissue names (N,), not pickled objects") from err
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{paths['images']}: expected images of shape (N, H, W, 3), got {images.shape}")
    if masks.ndim != 4 or masks.shape[-1] != 6:
        raise ValueError(
            f"{paths['masks']}: expected masks of shape (N, H, W, 6) (channels: neoplastic, inflammatory, "
            f"connective, dead, epithelial, background), got {masks.shape}"
        )
    if masks.shape[:3] != images.shape[:3] or types.shape != (len(images),):
        raise ValueError(
            f"PanNuke fold {root}: images {images.shape}, masks {masks.shape} and types {types.shape} disagree on N, H, W"
        )
    for name, arr in (("images", images), ("masks", masks)):
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise ValueError(f"{paths[name]}: expected a numeric array, got dtype {arr.dtype}")
    groups_file = paths["images"].parent / "groups.npy"
    groups = np.load(groups_file) if groups_file.is_file() else None
    return PanNukeFold(root, images, masks, types.astype(str), groups)


def pannuke_maps(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PanNuke (H, W, 6) mask -> (inst_map, type_map), ids 1..n, types 1..5 (0 background).

    Ids are renumbered per channel, so ids repeated across channels stay distinct. Where two
    class channels claim a pixel, the later channel wins, as in PanNuke's own ``binarize``.
    """
    inst = np.zeros(mask.shape[:2], np.int32)
    types = np.zeros(mask.shape[:2], np.int32)
    offset = 0
    for c in range(5):
        ids = np.rint(mask[..., c]).astype(np.int64)
        relabelled, _, _ = relabel_sequential(ids)
        on = relabelled > 0
        inst[on] = relabelled[on] + offset
        types[on] = c + 1
        offset += int(relabelled.max())
    inst, _, _ = relabel_sequential(inst)  # ids fully overwritten by a later channel leave gaps
    return inst.astype(np.int32), types


@dataclass
class ConsepImage:
    """One CoNSeP image: RGB uint8, instance map and per-pixel PanNuke class (after mapping)."""

    name: str
    image: np.ndarray
    inst_map: np.ndarray
    type_map: np.ndarray


def read_consep(root: str | Path, type_mapping: dict[int, int] | None = None) -> list[ConsepImage]:
    """Read ``root/Images/*.png`` + ``root/Labels/*.mat`` (HoVer-Net's CoNSeP / Kumar layout).

    Each instance takes the class of ``inst_type`` (one class per nucleus, as HoVer-Net defines
    it), mapped by ``type_mapping`` (default :data:`CONSEP_TO_PANNUKE`).
    """
    from PIL import Image

    root = Path(root)
    mapping = CONSEP_TO_PANNUKE if type_mapping is None else {int(k): int(v) for k, v in type_mapping.items()}
    pngs = sorted((root / "Images").glob("*.png"))
    if not pngs:
        raise FileNotFoundError(f"no PNG images in {root / 'Images'} (expected CoNSeP layout Images/*.png + Labels/*.mat)")
    out = []
    for png in pngs:
        mat_file = root / "Labels" / f"{png.stem}.mat"
        if not mat_file.is_file():
            raise FileNotFoundError(f"{png}: label file {mat_file} not found")
        mat = loadmat(mat_file)
        for key in ("inst_map", "type_map", "inst_type"):
            if key not in mat:
                raise ValueError(f"{mat_file}: field '{key}' missing (expected inst_map, type_map, inst_type, inst_centroid)")
        image = np.asarray(Image.open(png).convert("RGB"))
        inst = np.rint(mat["inst_map"]).astype(np.int32)
        if inst.shape != image.shape[:2]:
            raise ValueError(f"{mat_file}: inst_map shape {inst.shape} differs from image {png} shape {image.shape[:2]}")
        inst_type = np.asarray(mat["inst_type"]).reshape(-1).astype(int)
        ids = np.unique(inst[inst > 0])
        if len(ids) and ids.max() > len(inst_type):
            raise ValueError(f"{mat_file}: inst_map has id {ids.max()} but inst_type lists only {len(inst_type)} nuclei")
        unknown = sorted(set(inst_type[ids - 1].tolist()) - set(mapping))
        if unknown:
            raise ValueError(f"{mat_file}: inst_type values {unknown} have no class mapping (mapping: {mapping})")
        lut = np.zeros(len(inst_type) + 1, np.int32)
        lut[1:] = [mapping.get(t, 0) for t in inst_type]
        out.append(ConsepImage(png.stem, image, inst, lut[inst]))
    return out


def tile_image(image: np.ndarray, inst: np.ndarray, types: np.ndarray, size: int = 256) -> list[tuple[np.ndarray, ...]]:
    """Cut an image into ``size`` tiles covering it (the last row/column overlaps the one before)."""
    h, w = inst.shape
    if h < size or w < size:
        raise ValueError(f"image of {h}x{w} px is smaller than the {size}-px tile size")
    starts = lambda n: sorted({*range(0, n - size + 1, size), n - size})  # noqa: E731
    tiles = []
    for r in starts(h):
        for c in starts(w):
            t_inst = relabel_sequential(inst[r : r + size, c : c + size])[0].astype(np.int32)
            tiles.append((image[r : r + size, c : c + size], t_inst, types[r : r + size, c : c + size]))
    return tiles


# --------------------------------------------------------------------------------------------
# HoVer-Net targets and augmentation
def hover_maps(inst_map: np.ndarray) -> np.ndarray:
    """(2, H, W) horizontal/vertical distances to each nucleus' centroid, in [-1, 1] (MONAI)."""
    from monai.transforms import ComputeHoVerMaps

    return np.asarray(ComputeHoVerMaps()(inst_map[None].astype(np.int64)), dtype=np.float32)


def dihedral(k: int, inst: np.ndarray, types: np.ndarray, hv: np.ndarray, image: np.ndarray) -> tuple[np.ndarray, ...]:
    """Apply one of the 8 flips/rotations (``k`` in 0..7) to a tile and its targets.

    The HoVer maps are transformed algebraically rather than recomputed: a left-right flip
    negates the horizontal map, an up-down flip the vertical one, a transpose swaps them. This
    is exact because both maps are normalised per side of the centroid (tested).
    """
    if k & 1:  # transpose
        inst, types, image = inst.T, types.T, image.transpose(1, 0, 2)
        hv = hv[::-1].transpose(0, 2, 1)
    if k & 2:  # left-right
        inst, types, image = inst[:, ::-1], types[:, ::-1], image[:, ::-1]
        hv = hv[:, :, ::-1] * np.array([-1, 1], np.float32)[:, None, None]
    if k & 4:  # up-down
        inst, types, image = inst[::-1], types[::-1], image[::-1]
        hv = hv[:, ::-1] * np.array([1, -1], np.float32)[:, None, None]
    return tuple(np.ascontiguousarray(a) for a in (inst, types, hv, image))


class NucleiTiles(Dataset):
    """Tiles with HoVer-Net targets: image, inst/type maps, hv maps, instance contours, tissue."""

    def __init__(self, images: Any, maps: Any, tissues: np.ndarray, ids: list[str], augment: bool = False,
                 cache: bool = True) -> None:
        self.images, self.maps, self.tissues, self.ids, self.augment = images, maps, tissues, ids, augment
        self.cache = cache
        self._targets: dict[int, tuple[np.ndarray, ...]] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def targets(self, i: int) -> tuple[np.ndarray, ...]:
        """(inst_map, type_map, hv) of tile ``i``; kept after first use when ``cache`` (~1 MB per tile)."""
        if i in self._targets:
            return self._targets[i]
        inst, types = self.maps(i)
        out = (inst, types, hover_maps(inst))  # MONAI's h/v maps cost ~10 ms per tile
        if self.cache:
            self._targets[i] = out
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        inst, types, hv = self.targets(i)
        image = np.array(self.images(i), dtype=np.uint8)  # a writable copy (memory-mapped files are read-only)
        if self.augment:  # torch's RNG: seeded by seed_everything and per worker by Lightning
            k = int(torch.randint(8, ()))
            inst, types, hv, image = dihedral(k, inst, types, hv, image)
        boundary = find_boundaries(inst, mode="inner")
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float(),
            "inst_map": torch.from_numpy(inst.astype(np.int64)),
            "type_map": torch.from_numpy(types.astype(np.int64)),
            "hv": torch.from_numpy(hv.copy()),
            "boundary": torch.from_numpy(boundary.astype(np.float32)),
            "tissue": int(self.tissues[i]),
            "index": i,
        }


# --------------------------------------------------------------------------------------------
class NucleiData(SuiteDataModule):
    """Nuclei tiles from the generator (default), PanNuke folds or CoNSeP.

    Args:
        source: ``generated``, ``pannuke`` or ``consep``.
        path: for real data, split name -> folder, e.g. ``{train: "Fold 1", val: "Fold 2",
            test: "Fold 3"}`` (PanNuke) or ``{train: CoNSeP/Train, test: CoNSeP/Test}``. A missing
            ``val`` is carved out of ``train`` by group (CoNSeP: source image); a missing
            ``test`` reuses ``val``.
        n_tiles, tiles_per_slide, generator_seed: size and seed of the generated set (a
            slide is a split group: its tiles share tissue and stain vectors).
        fractions: train/val/test shares of generated slides (or of train groups for ``val``).
        augment: random flips/rotations of training tiles.
        split_seed: seed of the group split (fixed while ``seed`` varies the batch order).
        cache_targets: keep each tile's HoVer targets in memory after first use (~1 MB per
            tile; turn off for full PanNuke folds on small machines).
    """

    def __init__(
        self,
        source: str = "generated",
        path: dict[str, str] | None = None,
        n_tiles: int = 128,
        tiles_per_slide: int = 4,
        tile_size: int = 256,
        generator_seed: int = 0,
        fractions: dict[str, float] | None = None,
        augment: bool = True,
        consep_types: dict[int, int] | None = None,
        split_seed: int = 0,
        cache_targets: bool = True,
        batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        if source not in ("generated", "pannuke", "consep"):
            raise ValueError(f"source must be 'generated', 'pannuke' or 'consep', got {source!r}")
        if source != "generated" and not path:
            raise ValueError(f"source={source!r} needs `path`: split name -> folder, e.g. {{train: ..., val: ...}}")
        self.source, self.path = source, dict(path or {})
        if source != "generated" and not {"train", "val"} & set(self.path):
            raise ValueError(f"data.path needs a 'train' folder (val is split off from it) or a 'val' folder, got {sorted(self.path)}")
        self.n_tiles, self.tiles_per_slide, self.tile_size = n_tiles, tiles_per_slide, tile_size
        self.generator_seed, self.augment, self.consep_types = generator_seed, augment, consep_types
        self.split_seed, self.cache_targets = split_seed, cache_targets
        self.fractions = fractions or {"train": 0.7, "val": 0.15, "test": 0.15}
        self.class_names = CLASS_NAMES
        self.tissue_names: list[str] = []

    def generated_root(self) -> Path:
        name = f"pannuke_v{GENERATOR_VERSION}_n{self.n_tiles}_k{self.tiles_per_slide}_s{self.tile_size}_seed{self.generator_seed}"
        build = lambda tmp: generate_pannuke(tmp, self.n_tiles, self.tiles_per_slide, self.tile_size, self.generator_seed)  # noqa: E731
        return cached(generated_dir("nuclei") / name, build)

    def _tissue_ids(self, names: np.ndarray) -> np.ndarray:
        for n in names:
            if n not in self.tissue_names:
                self.tissue_names.append(str(n))
        return np.array([self.tissue_names.index(n) for n in names], dtype=np.int64)

    def _pannuke_split(self, fold: PanNukeFold, idx: np.ndarray, name: str) -> None:
        tissues = self._tissue_ids(fold.types[idx])
        ds = NucleiTiles(
            images=lambda i: fold.images[idx[i]],
            maps=lambda i: fold.maps(idx[i]),
            tissues=tissues,
            ids=[f"{fold.root.name}:{j}" for j in idx],
            augment=self.augment and name == "train",
            cache=self.cache_targets,
        )
        self.splits[name] = ds
        self.record_split(name, ds.ids)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if self.source == "generated":
            fold = read_pannuke_fold(self.generated_root())
            for name, idx in split_by_group(fold.groups, self.fractions, self.split_seed).items():
                self._pannuke_split(fold, idx, name)
        elif self.source == "pannuke":
            folds = {name: read_pannuke_fold(p) for name, p in self.path.items()}
            if "val" not in folds:
                idx = split_by_group(np.arange(len(folds["train"])), self._val_fractions(), self.split_seed)
                self._pannuke_split(folds["train"], idx["train"], "train")
                self._pannuke_split(folds["train"], idx["val"], "val")
            for name, fold in folds.items():
                if name not in self.splits:
                    self._pannuke_split(fold, np.arange(len(fold)), name)
        else:
            self._setup_consep()
        if "test" not in self.splits:
            warnings.warn(f"data.path has no 'test' split ({sorted(self.path)}): `test` scores the validation split",
                          stacklevel=2)
            self.splits["test"] = self.splits["val"]
            self.record_split("test", self.splits["val"].ids)

    def _val_fractions(self) -> dict[str, float]:
        val = self.fractions.get("val", 0.15)
        return {"train": 1 - val, "val": val}

    def _setup_consep(self) -> None:
        def tiles_of(folder: str) -> tuple[list, np.ndarray]:
            tiles, groups = [], []
            for g, img in enumerate(read_consep(folder, self.consep_types)):
                for t in tile_image(img.image, img.inst_map, img.type_map, self.tile_size):
                    tiles.append((img.name, *t))
                    groups.append(g)
            return tiles, np.array(groups)

        parts = {name: tiles_of(folder) for name, folder in self.path.items()}
        if "val" not in parts:
            tiles, groups = parts["train"]
            idx = split_by_group(groups, self._val_fractions(), self.split_seed)
            parts = {**parts, **{n: ([tiles[i] for i in ix], groups[ix]) for n, ix in idx.items()}}
        for name, (tiles, _) in parts.items():
            ds = NucleiTiles(
                images=lambda i, t=tiles: t[i][1],
                maps=lambda i, t=tiles: (t[i][2], t[i][3]),
                tissues=self._tissue_ids(np.array(["CoNSeP"] * len(tiles))),
                ids=[f"{t[0]}:{k}" for k, t in enumerate(tiles)],
                augment=self.augment and name == "train",
                cache=self.cache_targets,
            )
            self.splits[name] = ds
            self.record_split(name, ds.ids)

