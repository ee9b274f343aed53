"""Supervised pretraining of the food ViT on the pretraining dishes: the backbone DIME keeps frozen.

DIME starts from a ViT pretrained on ImageNet-21k, whose features already separate foods; no ViT
weights can be downloaded here, so the default backbone is pretrained once, as a cached suite
prerequisite (``domains/food_cl.yaml`` declares it; ``domains/food_cl/pretrain.yaml`` is the fit),
on generated dishes whose recipes come from another random stream than the continual classes
(data ``mode: pretrain``), so no continual class is ever seen before its task.

The whole ViT trains with a linear head: cross-entropy with label smoothing, AdamW and a
per-step cosine schedule with linear warm-up (the DeiT recipe, shortened). The head is dropped
afterwards: the continual model takes only the backbone (``FoodDIME.extend_from``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from suite.module import AdaptedModule

from .backbone import build_vit


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps`` to the base learning rate, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class FoodViTPretrain(AdaptedModule):
    """A timm ViT + linear head trained on every pretraining class.

    Args:
        num_classes: pretraining classes (linked from the data).
        backbone, img_size, backbone_kwargs: the ViT (see :func:`~domains.food_cl.backbone.build_vit`);
            must equal the continual model's (``domains/food_cl.yaml`` links them).
        label_smoothing: of the cross-entropy (DeiT: 0.1).
        warmup_fraction: share of the steps spent warming the learning rate up.
    """

    adapter_note = "pretraining trains the whole ViT (no adapter); the continual model adds AdaptFormer adapters"

    def __init__(
        self,
        num_classes: int = 32,
        backbone: str = "vit_tiny_patch16_224",
        img_size: int = 32,
        backbone_kwargs: dict[str, Any] | None = None,
        label_smoothing: float = 0.1,
        warmup_fraction: float = 0.05,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_classes, self.img_size = num_classes, img_size
        self.label_smoothing, self.warmup_fraction = label_smoothing, warmup_fraction
        with self.seeded():
            self.backbone = build_vit(backbone, img_size, **(backbone_kwargs or {}))
            self.head = nn.Linear(self.backbone.num_features, num_classes)
        self.val_acc = MeanMetric()
        self.load_init_from()

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        logits = self(batch["image"])
        return {"loss": F.cross_entropy(logits, batch["label"], label_smoothing=self.label_smoothing if self.training else 0.0),
                "acc": (logits.argmax(-1) == batch["label"]).float().mean()}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        losses = self.compute_losses(batch)
        self.val_acc.update(losses["acc"], weight=len(batch["label"]))
        self.log("val/loss", losses["loss"], batch_size=len(batch["label"]))
        self.log("val/acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> Any:
        if self.scheduler_factory is not None:
            return super().configure_optimizers()
        optimizer = self.optimizer_factory(self.param_groups())
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = warmup_cosine(optimizer, total, max(1, round(self.warmup_fraction * total)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
