"""A tiny, domain-free image classifier used by the foundation tests: a timm ViT with adapters."""

from __future__ import annotations

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from suite.adapters import AdapterSpec
from suite.data import SuiteDataModule, split_by_group
from suite.module import AdaptedModule


class ToyData(SuiteDataModule):
    """Noisy images whose class is the quadrant holding a bright square; groups of 4 images."""

    def __init__(self, n: int = 64, img_size: int = 32, num_classes: int = 4, batch_size: int = 8, seed: int = 0) -> None:
        super().__init__(batch_size=batch_size, seed=seed)
        self.n, self.img_size, self.num_classes = n, img_size, num_classes

    def setup(self, stage: str | None = None) -> None:
        g = torch.Generator().manual_seed(1234)
        x = 0.1 * torch.randn(self.n, 3, self.img_size, self.img_size, generator=g)
        y = torch.arange(self.n) % self.num_classes
        h = self.img_size // 2
        for i in range(self.n):
            r, c = divmod(int(y[i]), 2)
            x[i, :, r * h : r * h + h // 2, c * h : c * h + h // 2] += 1.0
        groups = np.arange(self.n) // 4
        idx = split_by_group(groups, {"train": 0.75, "val": 0.25}, seed=self.seed)
        for name, ids in idx.items():
            self.splits[name] = TensorDataset(x[ids], y[ids])
            self.record_split(name, ids)
        self.splits["test"] = self.splits["val"]


class ToyViT(AdaptedModule):
    def __init__(
        self,
        model_name: str = "test_vit",
        img_size: int = 32,
        num_classes: int = 4,
        adapter: AdapterSpec | None = None,
        nan_at_step: int = -1,
        **kwargs,
    ) -> None:
        super().__init__(adapter=adapter, **kwargs)
        with self.seeded():
            self.backbone = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=img_size)
        self.head = nn.Linear(self.backbone.num_features, num_classes)
        self.nan_at_step = nan_at_step
        self.adapt()
        self.load_init_from()  # a later stage starts from an earlier one (e.g. its trained head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def compute_losses(self, batch):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.global_step == self.nan_at_step:
            loss = loss * float("nan")
        return {"loss": loss}
