"""What people look at: class-coloured contour overlays (PNG) and the instance/type maps (.npy)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from skimage.segmentation import find_boundaries

from .synth import CLASS_NAMES

#: contour colour per class (0: unclassified), PanNuke-paper style
CLASS_COLOURS = np.array(
    [[255, 255, 255], [255, 0, 0], [0, 220, 0], [0, 80, 255], [255, 230, 0], [255, 120, 0]], dtype=np.uint8
)


def overlay(image: np.ndarray, inst_map: np.ndarray, type_map: np.ndarray) -> np.ndarray:
    """RGB tile with each nucleus' inner contour drawn in its class colour."""
    out = np.array(image, dtype=np.uint8, copy=True)
    edge = find_boundaries(inst_map, mode="inner")
    out[edge] = CLASS_COLOURS[np.clip(type_map[edge], 0, len(CLASS_COLOURS) - 1)]
    return out


class PredictionWriter(BasePredictionWriter):
    """Writes ``<tile>_overlay.png``, ``<tile>_inst.npy`` and ``<tile>_type.npy`` per predicted tile.

    Args:
        output_dir: target folder; default ``<trainer.default_root_dir>/predictions``.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir

    def write_on_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any, batch_indices: Sequence[int] | None,
        batch: Any, batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        from PIL import Image

        folder = Path(self.output_dir or Path(trainer.default_root_dir) / "predictions")
        folder.mkdir(parents=True, exist_ok=True)
        for tile in prediction:
            stem = f"tile{tile['index']:05d}"
            Image.fromarray(overlay(tile["image"], tile["inst_map"], tile["type_map"])).save(folder / f"{stem}_overlay.png")
            np.save(folder / f"{stem}_inst.npy", tile["inst_map"])
            np.save(folder / f"{stem}_type.npy", tile["type_map"])
        legend = folder / "classes.txt"
        if not legend.exists():
            legend.write_text("".join(f"{i + 1} {n} rgb{tuple(CLASS_COLOURS[i + 1].tolist())}\n" for i, n in enumerate(CLASS_NAMES)))
