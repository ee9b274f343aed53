"""What people look at: class-coloured contour overlays with a legend (PNG), instance/type maps (.npy), counts (CSV)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from skimage.morphology import dilation, disk
from skimage.segmentation import find_boundaries

from .metrics import instance_classes
from .synth import CLASS_NAMES

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
