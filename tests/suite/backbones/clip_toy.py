"""A toy (image, caption) set a tiny CLIP learns in seconds: coloured shapes on noise, "a red circle"."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from suite.data import SuiteDataModule

COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.25, 0.95), "yellow": (0.95, 0.9, 0.1)}
SHAPES = ("circle", "square", "triangle")


def draw(shape: str, rgb: tuple[float, float, float], size: int, rng: np.random.Generator) -> np.ndarray:
    """One (3, size, size) image in [0, 1]: a shape of random centre and radius on dim noise."""
    yy, xx = np.mgrid[:size, :size] / size
    cy, cx = rng.uniform(0.35, 0.65, 2)
    r = rng.uniform(0.18, 0.3)
    if shape == "circle":
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    elif shape == "square":
        inside = (abs(yy - cy) < r * 0.85) & (abs(xx - cx) < r * 0.85)
    else:  # upward triangle: below the apex, within widening sides
        inside = (yy > cy - r) & (yy < cy + r) & (abs(xx - cx) < (yy - (cy - r)) / 2)
    img = rng.uniform(0.0, 0.25, (3, size, size))
    colour = np.clip(np.array(rgb) + rng.normal(0, 0.05, 3), 0, 1)
    img[:, inside] = colour[:, None]
    return img.astype(np.float32)


class ShapePairs(Dataset):
    def __init__(self, n: int, size: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        names = [(c, s) for c in COLOURS for s in SHAPES]
        picks = rng.integers(0, len(names), n)
        self.images = torch.from_numpy(np.stack([draw(names[i][1], COLOURS[names[i][0]], size, rng) for i in picks]))
        self.texts = [f"a {names[i][0]} {names[i][1]}" for i in picks]

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "text": self.texts[i]}


class ShapePairsData(SuiteDataModule):
    """Train / val splits of :class:`ShapePairs` from different seeds (val pairs are never trained on)."""

    def __init__(self, n_train: int = 512, n_val: int = 96, image_size: int = 32, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n_train, self.n_val, self.image_size = n_train, n_val, image_size

    def setup(self, stage: str | None = None) -> None:
        for name, n, offset in (("train", self.n_train, 0), ("val", self.n_val, 1)):
            self.splits[name] = ShapePairs(n, self.image_size, self.seed * 2 + offset)
            self.record_split(name, [f"{name}-{i}" for i in range(n)])
