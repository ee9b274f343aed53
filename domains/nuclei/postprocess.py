"""From network outputs to nuclei and overlays: HoVer-Net watershed (MONAI), the classical baseline, ``predict``'s writer.

The HoVer-Net chain is MONAI's, step by step (``monai.apps.pathology.transforms.post``):
foreground mask from the nuclear-pixel branch, instance border from Sobel gradients of the h/v
maps, smoothed distance map, markers (certain foreground minus border, opened), marker-controlled
watershed, plus one fix: mask components left without a marker are kept as nuclei instead of
being dropped. The steps are composed here instead of calling ``HoVerNetInstanceMapPostProcessing``
for one reason: with BGMR the predicted boundary probability joins the HoVer border (their
maximum) before markers and basins are computed. Each nucleus then takes the majority class of
its pixels (MONAI ``GenerateInstanceType``: background votes are ignored where possible).
"""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from scipy import ndimage as ndi
from skimage.color import rgb2hed
from skimage.feature import peak_local_max
from skimage.filters import gaussian, threshold_otsu
from skimage.measure import regionprops
from skimage.morphology import dilation, disk, remove_small_objects
from skimage.segmentation import find_boundaries, watershed

from .metrics import instance_classes
from .synth import CLASS_NAMES


@dataclass
class PostProcessConfig:
    """HoVer-Net post-processing knobs (defaults: HoVer-Net's for 40x, via MONAI's transforms)."""

    min_object_size: int = 10  # px; smaller blobs are noise
    sobel_kernel_size: int = 21  # HoVer-Net's Sobel size on the h/v maps
    marker_threshold: float = 0.4  # border values above this are "uncertain", not marker
    marker_radius: int = 2  # opening of the markers (disk radius, px)
    use_boundary: bool = False  # BGMR: join the boundary probability to the HoVer border (see README)


#: post-processing by objective magnification: HoVer-Net's settings for its 40x data (CoNSeP,
#: PanNuke: Sobel 21, markers below 0.4), CellViT's for 20x (Sobel 11, markers below 0.5)
BY_MAGNIFICATION = {
    40: PostProcessConfig(sobel_kernel_size=21, marker_threshold=0.4),
    20: PostProcessConfig(sobel_kernel_size=11, marker_threshold=0.5),
}


def config_for(magnification: int, overrides: dict[str, Any] | None = None) -> PostProcessConfig:
    """The post-processing for data at ``magnification`` (40 or 20), with explicit ``overrides`` on top."""
    if magnification not in BY_MAGNIFICATION:
        raise ValueError(f"no post-processing for {magnification}x data: use one of {sorted(BY_MAGNIFICATION)} "
                         "(data.init_args.magnification)")
    return replace(BY_MAGNIFICATION[magnification], **(overrides or {}))


#: the settings ``choose_postprocess`` searches; HoVer-Net's 40x and CellViT's 20x settings are on it
SEARCH_GRID: dict[str, tuple[Any, ...]] = {
    "sobel_kernel_size": (11, 21),
    "marker_threshold": (0.4, 0.45, 0.5, 0.55),
    "marker_radius": (2, 3, 4),
}


def choose_postprocess(
    outputs: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]],
    truths: list[np.ndarray],
    grid: dict[str, tuple[Any, ...]] | None = None,
    base: PostProcessConfig | None = None,
) -> tuple[dict[str, Any], list[tuple[dict[str, Any], float]]]:
    """Watershed settings chosen on held-out tiles by grid search, as StarDist's ``optimize_thresholds`` does.

    ``outputs`` holds one (NP logits (2, H, W), h/v maps (2, H, W), boundary prob (H, W) or None) per
    validation tile, ``truths`` its instance map. Every combination of ``grid`` (default
    :data:`SEARCH_GRID`) over ``base`` is scored by bPQ (mean over tiles with nuclei). Returns the
    best settings (first in grid order on a tie) and every (settings, bPQ), to go into
    ``model.init_args.postprocess``. The search is ours: MONAI's HoVer-Net chain has no tuner.
    """
    from itertools import product

    from .metrics import panoptic_quality

    if len(outputs) != len(truths) or not truths:
        raise ValueError(f"choose_postprocess needs one truth per output tile, got {len(outputs)} outputs and {len(truths)} truths")
    grid = grid or SEARCH_GRID
    unknown = set(grid) - set(PostProcessConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"grid fields {sorted(unknown)} are not PostProcessConfig fields "
                         f"({sorted(PostProcessConfig.__dataclass_fields__)})")
    scored = [i for i, t in enumerate(truths) if t.any()]  # PanNuke's bPQ skips tiles without nuclei
    results = []
    for values in product(*grid.values()):
        settings = dict(zip(grid, values))
        config = replace(base or PostProcessConfig(), **settings)
        pq = []
        for i in scored:
            np_logits, hv, boundary = outputs[i]
            inst = hovernet_instances(np_logits, hv, boundary if config.use_boundary else None, config)
            pq.append(panoptic_quality(truths[i], inst)[0])
        results.append((settings, float(np.mean(pq))))
    best = max(results, key=lambda r: r[1])  # max keeps the first of equal scores
    return best[0], results


def hovernet_instances(
    np_logits: np.ndarray,
    hv: np.ndarray,
    boundary: np.ndarray | None = None,
    config: PostProcessConfig | None = None,
) -> np.ndarray:
    """Instance map (H, W) int32 from NP logits (2, H, W), h/v maps (2, H, W) and boundary prob (H, W)."""
    c = config or PostProcessConfig()
    # validation under bf16-mixed calls this inside autocast, where MONAI's torch steps (distance
    # map smoothing) would come back in bf16, which numpy cannot hold: the chain runs in fp32
    with warnings.catch_warnings(), torch.autocast("cpu", enabled=False):
        # MONAI passes scikit-image 0.26's deprecated `min_size` internally
        warnings.filterwarnings("ignore", message="Parameter `min_size` is deprecated", category=FutureWarning)
        return _hovernet_instances(np_logits, hv, boundary, c)


def _hovernet_instances(np_logits: np.ndarray, hv: np.ndarray, boundary: np.ndarray | None, c: PostProcessConfig) -> np.ndarray:
    from monai.apps.pathology.transforms.post.array import (
        GenerateDistanceMap,
        GenerateInstanceBorder,
        GenerateWatershedMarkers,
        GenerateWatershedMask,
        Watershed,
    )

    mask = np.asarray(GenerateWatershedMask(activation="softmax", min_object_size=c.min_object_size)(np_logits))
    if not mask.any():
        return np.zeros(mask.shape[1:], np.int32)
    if np.ptp(hv[0]) == 0 or np.ptp(hv[1]) == 0:  # untrained h/v head: MONAI rejects flat maps
        return ndi.label(mask[0])[0].astype(np.int32)
    border = np.asarray(GenerateInstanceBorder(kernel_size=c.sobel_kernel_size)(mask, hv))
    if boundary is not None:  # BGMR: the boundary head marks contours the h/v gradients miss
        border = np.maximum(border, boundary[None] * mask).astype(np.float32)
    distance = GenerateDistanceMap()(mask, border)
    markers = GenerateWatershedMarkers(
        threshold=c.marker_threshold, radius=c.marker_radius, min_object_size=c.min_object_size
    )(mask, border)
    inst = np.asarray(Watershed()(np.asarray(distance), mask, np.asarray(markers)))[0].astype(np.int32)
    # HoVer-Net's watershed floods only mask components that hold a marker; a nucleus whose whole
    # area is "uncertain" border vanishes (Dice drops with it). Such components are kept whole.
    orphans, n = ndi.label(mask[0].astype(bool) & (inst == 0))
    return np.where(orphans > 0, orphans + inst.max(), inst).astype(np.int32) if n else inst


def instance_types(inst: np.ndarray, type_logits: np.ndarray) -> np.ndarray:
    """Per-pixel type map where every nucleus carries its majority class (MONAI GenerateInstanceType)."""
    from monai.apps.pathology.transforms.post.array import GenerateInstanceType

    pixel_types = type_logits.argmax(0)[None]
    out = np.zeros(inst.shape, np.int32)
    vote = GenerateInstanceType()
    with torch.autocast("cpu", enabled=False):  # fp32 under bf16-mixed, as in hovernet_instances
        for region in regionprops(inst):
            r0, c0, r1, c1 = region.bbox
            cls, _ = vote(pixel_types, inst[None], np.array([[r0, r1, c0, c1]]), region.label)
            out[inst == region.label] = cls
    return out


def otsu_watershed(image: np.ndarray, min_object_size: int = 10, min_distance: int = 4) -> np.ndarray:
    """Classical baseline: Otsu threshold on haematoxylin, distance-transform watershed.

    Colour deconvolution (Ruifrok-Johnston, ``rgb2hed``) isolates haematoxylin; Otsu splits
    nuclei from background; peaks of the distance transform seed a watershed that cuts touching
    nuclei. No training, no classes.
    """
    haem = gaussian(rgb2hed(image)[..., 0], sigma=1.0)
    fg = haem > threshold_otsu(haem)
    fg = ndi.binary_fill_holes(remove_small_objects(fg, max_size=min_object_size))
    distance = gaussian(ndi.distance_transform_edt(fg), sigma=1.0)
    components = ndi.label(fg)[0]
    peaks = peak_local_max(distance, min_distance=min_distance, labels=components, exclude_border=False)
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-distance, markers, mask=fg).astype(np.int32)


# --------------------------------------------------------------------------------------------------
# What people look at: class-coloured contour overlays with a legend (PNG), instance/type maps (.npy), counts (CSV).


#: contour colour per class (0: unclassified), PanNuke-paper style: red, green, blue, yellow, orange
CLASS_COLOURS = np.array(
    [[255, 255, 255], [255, 0, 0], [0, 220, 0], [0, 80, 255], [255, 230, 0], [255, 120, 0]], dtype=np.uint8
)
LEGEND_HEIGHT = 18


def overlay(image: np.ndarray, inst_map: np.ndarray, type_map: np.ndarray) -> np.ndarray:
    """RGB tile with each nucleus' inner contour drawn in its class colour (2 px wide on tiles above 512 px)."""
    out = np.array(image, dtype=np.uint8, copy=True)
    edge = find_boundaries(inst_map, mode="inner")
    if max(inst_map.shape) > 512:  # a 1-px line vanishes when a large tile is viewed whole
        edge = dilation(edge, disk(1)) & (inst_map > 0)
    out[edge] = CLASS_COLOURS[np.clip(type_map[edge], 0, len(CLASS_COLOURS) - 1)]
    return out


def counts(inst_map: np.ndarray, type_map: np.ndarray, num_types: int) -> list[int]:
    """Nuclei per class 1..num_types (each nucleus carries one class in ``type_map``)."""
    classes = list(instance_classes(inst_map, type_map).values())
    return [classes.count(c) for c in range(1, num_types + 1)]


def with_legend(image: np.ndarray, names: Sequence[str], numbers: Sequence[int]) -> np.ndarray:
    """The overlay above a strip naming each class in its colour, with its count."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = image.shape[:2]
    canvas = Image.new("RGB", (w, h + LEGEND_HEIGHT), (30, 30, 30))
    canvas.paste(Image.fromarray(image), (0, 0))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    x = 4
    for c, (name, n) in enumerate(zip(names, numbers), start=1):
        colour = tuple(int(v) for v in CLASS_COLOURS[min(c, len(CLASS_COLOURS) - 1)])
        draw.rectangle([x, h + 5, x + 8, h + 13], fill=colour)
        label = f"{name} {n}"
        draw.text((x + 11, h + 3), label, fill=(235, 235, 235), font=font)
        x += 11 + int(draw.textlength(label, font=font)) + 8
    return np.asarray(canvas)


class PredictionWriter(BasePredictionWriter):
    """Writes ``<tile>_overlay.png`` (contours + legend), ``<tile>_inst.npy``, ``<tile>_type.npy`` per tile,
    and ``counts.csv`` (nuclei per class per tile) and ``classes.txt`` (colour key).

    Args:
        output_dir: target folder; default ``<trainer.default_root_dir>/predictions``.
        legend: draw the class strip under each overlay.
    """

    def __init__(self, output_dir: str | None = None, legend: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.output_dir, self.legend = output_dir, legend

    def write_on_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any, batch_indices: Sequence[int] | None,
        batch: Any, batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        from PIL import Image

        folder = Path(self.output_dir or Path(trainer.default_root_dir) / "predictions")
        folder.mkdir(parents=True, exist_ok=True)
        names = tuple(getattr(pl_module, "class_names", CLASS_NAMES))
        table = folder / "counts.csv"
        new_table = batch_idx == 0 or not table.exists()
        with table.open("w" if new_table else "a", newline="") as f:
            writer = csv.writer(f)
            if new_table:
                writer.writerow(["tile", "nuclei", *names])
            for tile in prediction:
                stem = tile["name"]
                numbers = counts(tile["inst_map"], tile["type_map"], len(names))
                picture = overlay(tile["image"], tile["inst_map"], tile["type_map"])
                if self.legend:
                    picture = with_legend(picture, names, numbers)
                Image.fromarray(picture).save(folder / f"{stem}_overlay.png")
                np.save(folder / f"{stem}_inst.npy", tile["inst_map"])
                np.save(folder / f"{stem}_type.npy", tile["type_map"])
                writer.writerow([stem, sum(numbers), *numbers])
        (folder / "classes.txt").write_text("".join(f"{i + 1} {n} rgb{tuple(CLASS_COLOURS[min(i + 1, 5)].tolist())}\n"
                                                    for i, n in enumerate(names)))
