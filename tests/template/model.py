"""Template domain, model: a frozen backbone (pretrained by a prerequisite), an adapter, a head.

Everything a domain needs comes from :class:`suite.module.AdaptedModule`: build the frozen part in
``self.seeded()``, add heads, ``self.adapt()``, ``self.load_init_from()``, and write
``compute_losses``. Checkpoints, the parameter report, optimiser over trainable parameters,
bf16, NaN stop and FSDP2 come with it.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from suite.module import AdaptedModule


def mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())


class TemplatePretrain(AdaptedModule):
    """The prerequisite: train the backbone (everything trains) on the same kind of data."""

    def __init__(self, dim: int = 8, hidden: int = 32, num_classes: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        with self.seeded():
            self.backbone = mlp(dim, hidden)
            self.head = nn.Linear(hidden, num_classes)

    def compute_losses(self, batch: Any) -> dict[str, torch.Tensor]:
        x, y = batch
        return {"loss": F.cross_entropy(self.head(self.backbone(x)), y)}


class TemplateClassifier(AdaptedModule):
    """The domain's model: the pretrained backbone, frozen, with ``adapter`` injected, and a new head.

    ``init_from`` is a pretraining checkpoint (the YAML's ``backbone`` prerequisite) or an earlier
    stage of this model; :meth:`extend_from` takes only the backbone from a pretraining run.
    """

    def __init__(self, dim: int = 8, hidden: int = 32, num_classes: int = 3, output_dir: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        with self.seeded():
            self.backbone = mlp(dim, hidden)
        self.head = nn.Linear(hidden, num_classes)
        self.output_dir = output_dir
        self.adapt()
        self.load_init_from()
        self._rows: list[dict[str, Any]] = []

    def extend_from(self, earlier: AdaptedModule) -> None:
        if isinstance(earlier, TemplatePretrain):  # a pretraining run: its backbone, not its head
            state = {f"backbone.{k}": v for k, v in earlier.backbone.state_dict().items()}
            self.load_matching_state(state, f"init_from {self.init_from}", only="backbone.")
        else:  # an earlier stage of this model: everything (new adapters start fresh)
            super().extend_from(earlier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def compute_losses(self, batch: Any) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = self(x)
        return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(-1) == y).float().mean()}

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        pred = self(x).argmax(-1)
        self._rows += [{"label": int(a), "pred": int(b)} for a, b in zip(y, pred)]
        return pred

    def on_predict_epoch_end(self) -> None:
        out = Path(self.output_dir or Path(self.trainer.default_root_dir) / "predictions")
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "predictions.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["label", "pred"])
            writer.writeheader()
            writer.writerows(self._rows)
