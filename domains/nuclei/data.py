"""Nuclei data: HoVer-Net targets, augmentation and the DataModule over PanNuke, CoNSeP, generated tiles and image folders.

The readers live in ``formats.py`` (PanNuke folds, HoVer-Net ``.mat``, CoNSeP, image folders; one
error type, :class:`~domains.nuclei.formats.NucleiFormatError`), the augmentations and stain
normalisation below, the generator in ``synth.py``. The generated default is written
in the PanNuke layout (plus ``groups.npy``, slide ids, and ``magnification.txt``), so the PanNuke
reader serves both.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from skimage.color import rgb_from_hed
from skimage.segmentation import find_boundaries
from torch.utils.data import DataLoader, Dataset

from suite.checkpoint import ResumableDataLoader
from suite.data import EpochSeededSampler, SuiteDataModule, cached, generated_dir, split_by_group

from .formats import (  # noqa: F401  (re-exported: the readers' public home is formats.py)
    CONSEP_CONVENTIONS,
    NucleiFormatError,
    PanNukeFold,
    image_folder,
    pannuke_maps,
    read_consep,
    read_hovernet_mat,
    read_pannuke_fold,
    read_rgb,
)
from .synth import CLASS_NAMES, generate_pannuke

GENERATOR_VERSION = 3  # bump when synth.py or calibration.json change, so stale caches are not reused
#: objective magnification of the real sources (PanNuke and CoNSeP are 40x scans)
SOURCE_MAGNIFICATION = {"pannuke": 40, "consep": 40}


def tile_image(image: np.ndarray, inst: np.ndarray, types: np.ndarray, size: int = 256) -> list[tuple[np.ndarray, ...]]:
    """Cut an image into ``size`` tiles covering it (the last row/column overlaps the one before)."""
    from skimage.segmentation import relabel_sequential

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


def hover_maps(inst_map: np.ndarray) -> np.ndarray:
    """(2, H, W) horizontal/vertical distances to each nucleus' centroid, in [-1, 1] (MONAI)."""
    from monai.transforms import ComputeHoVerMaps

    return np.asarray(ComputeHoVerMaps()(inst_map[None].astype(np.int64)), dtype=np.float32)


class EpochTaggedSampler(EpochSeededSampler):
    """:class:`~suite.data.EpochSeededSampler`'s order, each index tagged with its epoch (``epoch * n + i``).

    :class:`NucleiTiles` seeds a tile's augmentation draws from (seed, epoch, tile), so a run
    resumed inside an epoch (``ResumableDataLoader`` skips indices without loading them) and runs
    with any number of workers or ranks augment every tile exactly as an uninterrupted run does.
    """

    def __iter__(self) -> Iterator[int]:
        base = self.epoch * self.n
        return (base + i for i in super().__iter__())


class NucleiTiles(Dataset):
    """Tiles with HoVer-Net targets: image, inst/type maps, hv maps, instance contours, tissue, magnification.

    Training tiles (``augment``) get a flip / rotation, a zoom-in and the photometric set of
    ``data.py``, drawn from torch's RNG seeded by (``seed``, epoch, tile) for an index
    ``epoch * len + tile`` (:class:`EpochTaggedSampler`); other splits can be stain-normalised
    (``normalizer``).
    """

    def __init__(self, images: Callable[[int], np.ndarray], maps: Callable[[int], tuple[np.ndarray, np.ndarray]],
                 tissues: np.ndarray, ids: list[str], augment: bool = False, cache: bool = True, magnification: int = 40,
                 augmentation: AugmentConfig | None = None, normalizer: Callable[[np.ndarray], np.ndarray] | None = None,
                 seed: int = 0) -> None:
        self.images, self.maps, self.tissues, self.ids, self.augment = images, maps, tissues, ids, augment
        self.cache, self.magnification, self.normalizer, self.seed = cache, magnification, normalizer, seed
        self.config = augmentation or AugmentConfig()
        self.photometric = Photometric(self.config) if augment else None
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

    def __getitem__(self, index: int) -> dict[str, Any]:
        epoch, i = divmod(int(index), len(self))
        inst, types, hv = self.targets(i)
        image = np.array(self.images(i), dtype=np.uint8)  # a writable copy (memory-mapped files are read-only)
        if self.augment:
            with torch.random.fork_rng(devices=[]):  # the global RNG is left as it was
                torch.manual_seed(int(np.random.SeedSequence([self.seed, epoch, i]).generate_state(1)[0]))
                inst, types, hv, image = self._augment(inst, types, hv, image)
        elif self.normalizer is not None:
            image = self.normalizer(image)
        boundary = find_boundaries(inst, mode="inner")
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float(),
            "inst_map": torch.from_numpy(inst.astype(np.int64)),
            "type_map": torch.from_numpy(types.astype(np.int64)),
            "hv": torch.from_numpy(hv.copy()),
            "boundary": torch.from_numpy(boundary.astype(np.float32)),
            "tissue": int(self.tissues[i]),
            "magnification": self.magnification,
            "index": i,
        }

    def _augment(self, inst: np.ndarray, types: np.ndarray, hv: np.ndarray, image: np.ndarray) -> tuple[np.ndarray, ...]:
        inst, types, hv, image = dihedral(int(torch.randint(8, ())), inst, types, hv, image)
        c = self.config
        if c.p_zoom > 0 and torch.rand(()) < c.p_zoom:
            u = float(torch.rand(()))
            s = float(np.exp(np.log(c.zoom[0]) + (np.log(c.zoom[1]) - np.log(c.zoom[0])) * u))
            image, inst, types = zoom(image, inst, types, s, *torch.rand(2).tolist())
            hv = hover_maps(inst)
        return inst, types, hv, self.photometric(image)


class ImageFolderTiles(Dataset):
    """Plain RGB tiles of any size from a folder (no labels), for ``predict``."""

    def __init__(self, files: list[Path], magnification: int = 40,
                 normalizer: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        self.files, self.magnification, self.normalizer = files, magnification, normalizer
        self.ids = [f.name for f in files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        original = read_rgb(self.files[i])
        image = self.normalizer(original) if self.normalizer is not None else original
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float(),
            "display": torch.from_numpy(np.ascontiguousarray(original)),
            "name": self.files[i].stem,
            "magnification": self.magnification,
            "index": i,
        }


# --------------------------------------------------------------------------------------------
class NucleiData(SuiteDataModule):
    """Nuclei tiles from the generator (default), PanNuke folds or CoNSeP; ``predict_path`` adds an image folder.

    Args:
        source: ``generated``, ``pannuke`` or ``consep``.
        path: for real data, split name -> folder, e.g. ``{train: "Fold 1", val: "Fold 2",
            test: "Fold 3"}`` (PanNuke) or ``{train: CoNSeP/Train, test: CoNSeP/Test}``. A missing
            ``val`` is carved out of ``train`` by group (CoNSeP: source image); a missing
            ``test`` reuses ``val``.
        predict_path: a folder of plain H&E ``.png`` / ``.jpg`` / ``.tif`` tiles (any size, no
            labels): ``predict`` segments these instead of the test split.
        magnification: objective magnification of the data (40 or 20); chooses the model's
            post-processing. Default: what the source declares (PanNuke, CoNSeP and the generated
            tiles: 40); a ``predict_path`` folder is taken to be 40x unless this says otherwise.
        n_tiles, tiles_per_slide, generator_seed: size and seed of the generated set (a
            slide is a split group: its tiles share tissue, stain vectors and magnification).
        fractions: train/val/test shares of generated slides (or of train groups for ``val``).
        augment: flips/rotations, zoom and stain / colour / blur / JPEG / noise augmentation of
            training tiles; ``augmentation`` sets their magnitudes (``augment.AugmentConfig`` fields).
        stain_normalize: ``macenko`` normalises validation, test and prediction tiles to the
            generator's stain reference (``calibration.json``); ``null`` leaves them as they are.
        consep_classes: ``hovernet`` (4 classes, HoVer-Net's merging; default) or ``pannuke``
            (PanNuke's five; see ``formats.CONSEP_CONVENTIONS``); ``consep_types`` replaces the
            chosen convention's type mapping.
        split_seed: seed of the group split (fixed while ``seed`` varies the batch order).
        cache_targets: keep each tile's HoVer targets in memory after first use (~1 MB per
            tile; turn off for full PanNuke folds on small machines).
    """

    def __init__(
        self,
        source: str = "generated",
        path: dict[str, str] | None = None,
        predict_path: str | None = None,
        magnification: int | None = None,
        n_tiles: int = 128,
        tiles_per_slide: int = 4,
        tile_size: int = 256,
        generator_seed: int = 0,
        fractions: dict[str, float] | None = None,
        augment: bool = True,
        augmentation: dict[str, Any] | None = None,
        stain_normalize: str | None = None,
        consep_classes: str = "hovernet",
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
        self.source, self.path, self.predict_path = source, dict(path or {}), predict_path
        if source != "generated" and not {"train", "val"} & set(self.path):
            raise ValueError(f"data.path needs a 'train' folder (val is split off from it) or a 'val' folder, got {sorted(self.path)}")
        if magnification is not None and magnification not in (20, 40):
            raise ValueError(f"magnification must be 20 or 40 (objective), got {magnification}")
        if stain_normalize not in (None, "macenko"):
            raise ValueError(f"stain_normalize must be null or 'macenko', got {stain_normalize!r}")
        if consep_classes not in CONSEP_CONVENTIONS:
            raise ValueError(f"consep_classes must be one of {sorted(CONSEP_CONVENTIONS)}, got {consep_classes!r}")
        self.magnification = magnification
        self.n_tiles, self.tiles_per_slide, self.tile_size = n_tiles, tiles_per_slide, tile_size
        self.generator_seed, self.augment = generator_seed, augment
        self.augmentation = AugmentConfig(**(augmentation or {}))
        self.stain_normalize, self.consep_classes, self.consep_types = stain_normalize, consep_classes, consep_types
        self.split_seed, self.cache_targets = split_seed, cache_targets
        self.fractions = fractions or {"train": 0.7, "val": 0.15, "test": 0.15}
        self.class_names: tuple[str, ...] = CONSEP_CONVENTIONS[consep_classes][0] if source == "consep" else CLASS_NAMES
        self.tissue_names: list[str] = []

    @property
    def num_types(self) -> int:
        """Nucleus classes of the source (PanNuke and generated: 5; CoNSeP: 4 by HoVer-Net's merging)."""
        return len(self.class_names)

    def generated_root(self) -> Path:
        name = f"pannuke_v{GENERATOR_VERSION}_n{self.n_tiles}_k{self.tiles_per_slide}_s{self.tile_size}_seed{self.generator_seed}"
        build = lambda tmp: generate_pannuke(tmp, self.n_tiles, self.tiles_per_slide, self.tile_size, self.generator_seed)  # noqa: E731
        return cached(generated_dir("nuclei") / name, build)

    def normalizer(self) -> Callable[[np.ndarray], np.ndarray] | None:
        """The test-time stain normaliser (``stain_normalize``), or None."""
        if self.stain_normalize is None:
            return None
        from .calibration import load_calibration

        ref = load_calibration()["macenko_reference"]
        return MacenkoNormalizer(ref["target_he"], ref["max_cref"])

    def _tissue_ids(self, names: np.ndarray) -> np.ndarray:
        for n in names:
            if n not in self.tissue_names:
                self.tissue_names.append(str(n))
        return np.array([self.tissue_names.index(n) for n in names], dtype=np.int64)

    def _add(self, name: str, ds: Dataset) -> None:
        self.splits[name] = ds
        self.record_split(name, ds.ids)

    def _pannuke_split(self, fold: PanNukeFold, idx: np.ndarray, name: str) -> None:
        self._add(name, NucleiTiles(
            images=lambda i: fold.image(int(idx[i])),
            maps=lambda i: fold.maps(int(idx[i])),
            tissues=self._tissue_ids(fold.types[idx]),
            ids=[f"{fold.root.name}:{j}" for j in idx],
            augment=self.augment and name == "train",
            cache=self.cache_targets,
            seed=self.seed,
            magnification=self.magnification or fold.magnification,
            augmentation=self.augmentation,
            normalizer=None if name == "train" else self.normalizer(),
        ))

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if self.source == "generated":
            fold = read_pannuke_fold(self.generated_root())
            for name, idx in split_by_group(fold.groups, self.fractions, self.split_seed).items():
                self._pannuke_split(fold, idx, name)
        elif self.source == "pannuke":
            folds = {name: read_pannuke_fold(p) for name, p in self.path.items()}
            for fold in folds.values():
                fold.magnification = SOURCE_MAGNIFICATION["pannuke"]
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
            self._add("test", self.splits["val"])
        if self.predict_path is not None:
            self._add("predict", ImageFolderTiles(image_folder(self.predict_path), self.magnification or 40, self.normalizer()))

    def _val_fractions(self) -> dict[str, float]:
        val = self.fractions.get("val", 0.15)
        return {"train": 1 - val, "val": val}

    def _setup_consep(self) -> None:
        def tiles_of(folder: str) -> tuple[list, np.ndarray]:
            tiles, groups = [], []
            for g, img in enumerate(read_consep(folder, self.consep_classes, self.consep_types)):
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
            self._add(name, NucleiTiles(
                images=lambda i, t=tiles: t[i][1],
                maps=lambda i, t=tiles: (t[i][2], t[i][3]),
                tissues=self._tissue_ids(np.array(["CoNSeP"] * len(tiles))),
                ids=[f"{t[0]}:{k}" for k, t in enumerate(tiles)],
                augment=self.augment and name == "train",
                cache=self.cache_targets,
                seed=self.seed,
                magnification=self.magnification or SOURCE_MAGNIFICATION["consep"],
                augmentation=self.augmentation,
                normalizer=None if name == "train" else self.normalizer(),
            ))

    def train_dataloader(self) -> DataLoader:
        """Shuffled as every suite training loader (resumable inside an epoch), indices tagged with their epoch."""
        ds = self._split("train")
        return ResumableDataLoader(ds, batch_size=self.batch_size, sampler=EpochTaggedSampler(len(ds), self.seed),
                                   num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def predict_dataloader(self) -> DataLoader:
        if "predict" in self.splits:  # tiles of any size: one per batch
            return self.loader("predict", batch_size=1, collate_fn=_collate_folder)
        return self.loader("test")


def _collate_folder(items: list[dict[str, Any]]) -> dict[str, Any]:
    """One folder tile as a batch of one (names stay strings)."""
    (item,) = items
    return {"image": item["image"][None], "display": item["display"][None], "name": [item["name"]],
            "magnification": torch.tensor([item["magnification"]]), "index": torch.tensor([item["index"]])}


# --------------------------------------------------------------------------------------------------
# Augmentations that carry a model across stains, scanners and magnifications, and stain normalisation.
#
# Training tiles (``NucleiData(augment=True)``) go through, in this order:
#
# 1. one of the 8 flips / rotations (exact, HoVer maps transformed algebraically: :func:`dihedral`);
# 2. a zoom-in around the 40x nucleus size (crop a ``1/s`` window, resize back; labels by nearest
#    neighbour, HoVer maps recomputed). Only ``s >= 1``: shrinking a tile would need invented
#    tissue around it. Smaller-than-typical nuclei come from the generator, which draws each
#    slide's magnification around the calibrated 40x size (``synth.py``);
# 3. HED stain jitter (Tellez et al., "Whole-slide mitosis detection in H&E breast histology using
#    PHH3 as a reference to train distilled stain-invariant convolutional networks", IEEE TMI
#    2018): each stain's concentration scaled by U(1 - h, 1 + h) and shifted by U(-h, h) in
#    Ruifrok-Johnston HED space. Neither MONAI nor torchvision has it; it is five lines of
#    Beer-Lambert algebra here (exact identity at h = 0, tested);
# 4. torchvision's ``ColorJitter`` (brightness, contrast, saturation, hue), ``GaussianBlur`` (focus)
#    and ``JPEG`` (scanner compression), and additive Gaussian sensor noise, as HoVer-Net and
#    CellViT train (their blur / noise / colour sets, magnitudes in :class:`AugmentConfig`).
#
# Test-time stain normalisation: :class:`MacenkoNormalizer`, MONAI's ``NormalizeHEStains`` with
# the stain order fixed (see there).


#: Ruifrok-Johnston optical-density directions: rows haematoxylin, eosin, DAB (skimage.color)
HED_FROM_OD = np.linalg.inv(rgb_from_hed)


@dataclass
class AugmentConfig:
    """Magnitudes of the training augmentations (0 or p = 0 switches one off)."""

    zoom: tuple[float, float] = (1.0, 1.3)  # zoom-in factor range (log-uniform)
    p_zoom: float = 0.5
    hed: float = 0.08  # Tellez's sigma for scale and shift (0.05 "light", 0.2 "strong")
    brightness: float = 0.15
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.03
    blur_sigma: tuple[float, float] = (0.3, 1.5)
    p_blur: float = 0.3
    jpeg_quality: tuple[int, int] = (40, 95)
    p_jpeg: float = 0.3
    noise: float = 3.0  # std of additive Gaussian noise, in 0-255 grey levels
    p_noise: float = 0.3


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


def zoom(image: np.ndarray, inst: np.ndarray, types: np.ndarray, scale: float, top: float, left: float) -> tuple[np.ndarray, ...]:
    """Crop a ``1/scale`` window at relative position (top, left) in [0, 1] and resize it back to the tile.

    The image is resized bilinearly, the label maps by nearest neighbour (ids stay ids).
    """
    h, w = inst.shape
    ch, cw = max(1, round(h / scale)), max(1, round(w / scale))
    r0, c0 = round(top * (h - ch)), round(left * (w - cw))
    crop = lambda a: a[r0 : r0 + ch, c0 : c0 + cw]  # noqa: E731
    img = torch.from_numpy(np.ascontiguousarray(crop(image))).permute(2, 0, 1)[None].float()
    img = F.interpolate(img, size=(h, w), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    labels = torch.from_numpy(np.stack([crop(inst), crop(types)]).astype(np.int64))[None].float()
    labels = F.interpolate(labels, size=(h, w), mode="nearest")[0].long().numpy()
    return img.round().clamp(0, 255).byte().numpy(), labels[0].astype(inst.dtype), labels[1].astype(types.dtype)


def hed_jitter(image: np.ndarray, alpha: Sequence[float], beta: Sequence[float]) -> np.ndarray:
    """Scale (``alpha``) and shift (``beta``) the H, E, D concentrations of a uint8 RGB tile (Beer-Lambert, I0 = 256)."""
    od = -np.log10((image.astype(np.float64) + 1) / 256)
    conc = od @ HED_FROM_OD
    conc = conc * np.asarray(alpha) + np.asarray(beta)
    rgb = 256 * 10 ** (-(conc @ rgb_from_hed)) - 1
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


class Photometric:
    """Stain, colour, focus, compression and noise augmentation of one uint8 RGB tile (torch's RNG)."""

    def __init__(self, config: AugmentConfig | None = None) -> None:
        from torchvision.transforms import v2

        self.c = c = config or AugmentConfig()
        self.colour = v2.ColorJitter(brightness=c.brightness, contrast=c.contrast, saturation=c.saturation, hue=c.hue)
        self.blur = v2.GaussianBlur(kernel_size=7, sigma=c.blur_sigma)
        self.jpeg = v2.JPEG(quality=list(c.jpeg_quality))

    def _u(self, lo: float, hi: float, n: int = 1) -> np.ndarray:
        return (lo + (hi - lo) * torch.rand(n, dtype=torch.float64)).numpy()

    def __call__(self, image: np.ndarray) -> np.ndarray:
        c = self.c
        if c.hed > 0:
            image = hed_jitter(image, self._u(1 - c.hed, 1 + c.hed, 3), self._u(-c.hed, c.hed, 3))
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        x = self.colour(x)
        if torch.rand(()) < c.p_blur:
            x = self.blur(x)
        if torch.rand(()) < c.p_jpeg:
            x = self.jpeg(x)
        if c.noise > 0 and torch.rand(()) < c.p_noise:
            x = (x.float() + c.noise * torch.randn(x.shape)).round().clamp(0, 255).byte()
        return x.permute(1, 2, 0).numpy()


class MacenkoNormalizer:
    """Macenko stain normalisation to a reference stain matrix, through MONAI's ``NormalizeHEStains``.

    MONAI 1.6.1's ``ExtractHEStains`` puts the vector with the lower red/blue ratio first, reading
    optical-density vectors as if they were colours; in optical density haematoxylin has the
    higher ratio (Ruifrok-Johnston: 0.65 / 0.29 against eosin's 0.07 / 0.11), so on real H&E its
    "haematoxylin" column is the one that is *not* concentrated in nuclei (measured on the
    benchmark's real tiles), so normalisation swaps the stains. Fixed here as in Macenko's
    reference code (mitkovetta/staining-normalization, schaugf/HEnorm_python): haematoxylin is
    the vector with the larger red optical density (Ruifrok-Johnston: 0.65 vs 0.07).

    Args:
        target_he: reference stain matrix, rows haematoxylin and eosin unit OD vectors (2, 3).
        max_cref: reference 99th-percentile concentrations of H and E.
    """

    def __init__(self, target_he: Sequence[Sequence[float]], max_cref: Sequence[float], tli: float = 240) -> None:
        from monai.apps.pathology.transforms.stain.array import ExtractHEStains, NormalizeHEStains

        class _Ordered(ExtractHEStains):
            def __call__(self, image: np.ndarray) -> np.ndarray:
                return order_stains(super().__call__(image))

        self.norm = NormalizeHEStains(tli=tli, target_he=np.asarray(target_he, np.float64).T, max_cref=max_cref)
        self.norm.stain_extractor = _Ordered(tli=tli, max_cref=max_cref)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        try:
            return self.norm(np.ascontiguousarray(image))
        except ValueError:  # a tile of blank glass has no stain to estimate: leave it as it is
            return image


def order_stains(he: np.ndarray) -> np.ndarray:
    """Columns (H, E) of a (3, 2) Macenko stain matrix, haematoxylin = larger red optical density."""
    return he if he[0, 0] >= he[0, 1] else he[:, ::-1].copy()


def macenko_stains(image: np.ndarray, tli: float = 240) -> np.ndarray:
    """(2, 3) unit OD vectors (haematoxylin, eosin) of an RGB tile by Macenko's method (MONAI, order fixed)."""
    from monai.apps.pathology.transforms.stain.array import ExtractHEStains

    he = order_stains(ExtractHEStains(tli=tli)(np.ascontiguousarray(image))).T.astype(np.float64)
    he = np.abs(he)  # eigenvector signs are arbitrary; OD vectors are non-negative
    return he / np.linalg.norm(he, axis=1, keepdims=True)
