"""Masked-autoencoder pretraining of the point encoder (Point-MAE) and the cached foundation model.

Patches of a cloud are masked at random (60 %, Point-MAE's ratio); the encoder sees the visible
patches, a transformer decoder (Point-MAE's: 4 blocks, 6 heads) fills in mask tokens placed at
the masked centres, and a linear layer predicts each masked patch's ``group_size`` points, scored
by the Chamfer distance to the true patch. Training clouds are scaled and translated per axis
first, as Point-MAE's pretraining does (``PointcloudScaleAndTranslate``), and the learning rate
follows Point-MAE's warm-up + cosine schedule (``warmup_cosine``). No pretrained point
weights can be downloaded here, so this stage makes the "foundation model" that fine-tuning
starts from, on procedural classes that no few-shot episode uses (``pretrain.yaml``).

``domains/pointcloud.yaml`` declares this stage (``pretrain.yaml``) as its ``foundation``
prerequisite: ``python -m suite fit --config domains/pointcloud.yaml`` runs it once per encoder
shape (and pretraining config) and caches it (``suite.prerequisites``), so the fine-tuning YAML
works on a fresh machine on its own.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from suite.backbones.point import PointEncoder, PointEncoderConfig, TransformerEncoder
from suite.module import AdaptedModule

#: Point-MAE's ``PointcloudScaleAndTranslate``: per-cloud, per-axis scale in [2/3, 3/2] and shift in [-0.2, 0.2]
SCALE, SHIFT = (2.0 / 3.0, 3.0 / 2.0), 0.2


def scale_and_translate(points: Tensor, generator: torch.Generator) -> Tensor:
    """``points * s + t`` with ``s ~ U(SCALE)^3`` and ``t ~ U(-SHIFT, SHIFT)^3`` drawn per cloud of
    ``(B, N, 3)`` from ``generator`` (on the CPU, so a seed gives the same draw on every device)."""
    b = points.shape[0]
    scale = torch.empty(b, 1, 3).uniform_(*SCALE, generator=generator)
    shift = torch.empty(b, 1, 3).uniform_(-SHIFT, SHIFT, generator=generator)
    return points * scale.to(points) + shift.to(points)


def chamfer_distance(pred: Tensor, target: Tensor) -> Tensor:
    """Symmetric squared-L2 Chamfer distance, averaged over the batch: ``(B, P, 3)``, ``(B, Q, 3)``.

    ``mean_p min_q |p - q|^2 + mean_q min_p |p - q|^2`` (Point-MAE's ``ChamferDistanceL2``).
    Written in torch because pytorch3d and chamferdist need compiled CUDA/C++ ops; a dense
    ``(P, Q)`` distance matrix is cheap at patch sizes of 16-64 points.
    """
    d = (pred.unsqueeze(2) - target.unsqueeze(1)).pow(2).sum(-1)  # (B, P, Q)
    return d.amin(2).mean(1).mean() + d.amin(1).mean(1).mean()


def warmup_cosine(step: int, total: int, warmup: float, peak: float, floor: float = 1e-6) -> float:
    """Point-MAE's learning rate at ``step`` of ``total``: timm's ``CosineLRScheduler`` as Point-MAE
    builds it (``t_initial = total``, ``warmup_t = warmup * total``, ``warmup_lr_init = lr_min = 1e-6``,
    no warm-up prefix): linear from ``floor`` towards ``peak`` during the warm-up, then the cosine
    ``floor + (peak - floor) (1 + cos(pi step / total)) / 2`` of the whole run, ``floor`` at the end."""
    n_warm = int(round(warmup * total))
    if step < n_warm:
        return floor + (peak - floor) * step / n_warm
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(step, total) / total))


def random_patch_mask(b: int, g: int, ratio: float, generator: torch.Generator | None = None, device: Any = None) -> Tensor:
    """Boolean ``(B, G)``, True = masked; exactly ``int(ratio * G)`` patches masked in every cloud."""
    n_mask = int(ratio * g)
    if not 0 < n_mask < g:
        raise ValueError(f"mask_ratio={ratio} masks {n_mask} of {g} patches; it must leave some visible and mask some")
    order = torch.rand(b, g, generator=generator).argsort(1)
    return (order < n_mask).to(device)


class PointMAEPretrain(AdaptedModule):
    """Point-MAE: encoder on visible patches, decoder + linear head reconstruct masked patches.

    Args:
        encoder: encoder shape (shared with the fine-tuning module, which loads ``backbone.*``).
        mask_ratio: fraction of patches masked (Point-MAE: 0.6).
        decoder_depth, decoder_heads: Point-MAE's decoder has 4 blocks of 6 heads (at width 384;
            here 6 heads of 16 channels at width 96).
        augment: scale and translate every training cloud (Point-MAE's pretraining augmentation),
            drawn from a generator seeded by ``aug_seed`` and the global step, so a resumed run
            repeats an uninterrupted one.
        lr_schedule: ``cosine``: Point-MAE's schedule (:func:`warmup_cosine`), a linear warm-up from
            1e-6 over the first ``warmup`` fraction of the steps (Point-MAE: 10 of 300 epochs) and a
            cosine decay to 1e-6, per step over the fit's steps; ``constant``: the optimizer's rate.
            Ignored when a ``scheduler`` is given.
    """

    def __init__(
        self,
        encoder: PointEncoderConfig | None = None,
        mask_ratio: float = 0.6,
        decoder_depth: int = 4,
        decoder_heads: int = 6,
        augment: bool = True,
        aug_seed: int = 0,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        warmup: float = 10 / 300,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {lr_schedule!r}")
        self.lr_schedule, self.warmup = lr_schedule, warmup
        cfg = PointEncoderConfig.coerce(encoder)
        self.hparams["encoder"] = cfg.to_dict()  # plain dict: checkpoints load with weights_only
        self.mask_ratio, self.augment, self.aug_seed = mask_ratio, augment, aug_seed
        c = cfg.trans_dim
        with self.seeded():
            self.backbone = PointEncoder(cfg)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, c))
            self.decoder_pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, c))
            self.decoder = TransformerEncoder(replace(cfg, depth=decoder_depth, num_heads=decoder_heads, drop_path_rate=0.0))
            self.decoder_norm = nn.LayerNorm(c)
            self.increase_dim = nn.Linear(c, 3 * cfg.group_size)
            nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.group_size = cfg.group_size
        # everything trains from scratch; the random init is seeded so a rebuild matches

    def reconstruct(self, points: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        """Masked patches (true and predicted, relative to their centres) for a batch of clouds."""
        patches, centre = self.backbone.group_divider(points)
        b, g = centre.shape[:2]
        if mask is None:
            gen = torch.Generator().manual_seed(int(self.global_step) + 7919 * int(self.current_epoch))
            mask = random_patch_mask(b, g, self.mask_ratio, gen, points.device)
        x_vis = self.backbone.tokens(patches, centre, visible=~mask)[:, 1 + self.backbone.cfg.num_prompts :]
        c = x_vis.shape[-1]
        pos_vis = self.decoder_pos_embed(centre[~mask]).reshape(b, -1, c)
        pos_mask = self.decoder_pos_embed(centre[mask]).reshape(b, -1, c)
        n_mask = pos_mask.shape[1]
        x = torch.cat([x_vis, self.mask_token.expand(b, n_mask, -1)], 1)
        x = self.decoder_norm(self.decoder(x, torch.cat([pos_vis, pos_mask], 1))[:, -n_mask:])
        pred = self.increase_dim(x).reshape(b * n_mask, self.group_size, 3)
        return {"pred": pred, "target": patches[mask].reshape(b * n_mask, self.group_size, 3), "mask": mask}

    def configure_optimizers(self) -> Any:
        out = super().configure_optimizers()
        if self.scheduler_factory is not None or self.lr_schedule == "constant":
            return out
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        peak = [g["lr"] for g in out.param_groups]
        schedule = [lambda step, p=p: warmup_cosine(step, total, self.warmup, p) / p for p in peak]
        return {"optimizer": out, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(out, schedule), "interval": "step"}}

    def compute_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        points = batch["points"]
        if self.training and self.augment:
            points = scale_and_translate(points, torch.Generator().manual_seed(self.aug_seed * 1_000_003 + int(self.global_step)))
        out = self.reconstruct(points)
        return {"loss": chamfer_distance(out["pred"], out["target"])}
