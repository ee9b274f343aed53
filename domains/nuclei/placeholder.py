"""Minimal nuclear-pixel segmentation with a small SAM image encoder and LoRA.

Stands in for the full nuclei domain (MALA / HMF / BGMR, HoVer-Net heads) until it lands:
it exercises the same CLI, adapter and checkpoint path on generated disc images.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT
from torch import nn
from torch.utils.data import TensorDataset

from suite.adapters import AdapterSpec
from suite.data import SuiteDataModule, split_by_group
from suite.module import AdaptedModule


class DiscData(SuiteDataModule):
    def __init__(self, n: int = 48, size: int = 64, batch_size: int = 4, seed: int = 0) -> None:
        super().__init__(batch_size=batch_size, seed=seed)
        self.n, self.size = n, size

    def setup(self, stage: str | None = None) -> None:
        g = torch.Generator().manual_seed(7)
        yy, xx = torch.meshgrid(torch.arange(self.size), torch.arange(self.size), indexing="ij")
        imgs, masks = [], []
        for _ in range(self.n):
            mask = torch.zeros(self.size, self.size)
            for _ in range(6):
                cy, cx = torch.randint(0, self.size, (2,), generator=g)
                r = 3 + 4 * torch.rand(1, generator=g)
                mask = torch.maximum(mask, (((yy - cy) ** 2 + (xx - cx) ** 2) < r**2).float())
            img = 0.9 - 0.5 * mask[None].repeat(3, 1, 1) + 0.05 * torch.randn(3, self.size, self.size, generator=g)
            imgs.append(img)
            masks.append(mask)
        x, y = torch.stack(imgs), torch.stack(masks)
        for name, ids in split_by_group(torch.arange(self.n).numpy(), {"train": 0.75, "val": 0.25}, self.seed).items():
            self.splits[name] = TensorDataset(x[ids], y[ids])
            self.record_split(name, ids)
        self.splits["test"] = self.splits["val"]


class PlaceholderNuclei(AdaptedModule):
    def __init__(self, img_size: int = 64, embed_dim: int = 96, depth: int = 2, adapter: AdapterSpec | None = None, **kw) -> None:
        super().__init__(adapter=adapter, **kw)
        with self.seeded():
            self.backbone = ImageEncoderViT(
                img_size=img_size, patch_size=8, embed_dim=embed_dim, depth=depth, num_heads=3,
                out_chans=32, window_size=4, global_attn_indexes=(depth - 1,),
                norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True,
            )
        self.head = nn.Conv2d(32, 1, 1)
        self.adapt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.head(self.backbone(x)), size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]

    def compute_losses(self, batch):
        x, y = batch
        logits = self(x)
        prob = logits.sigmoid()
        dice = (2 * (prob * y).sum() + 1) / (prob.sum() + y.sum() + 1)
        return {"loss": F.binary_cross_entropy_with_logits(logits, y) + 1 - dice, "dice": dice}
