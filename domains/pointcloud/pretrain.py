"""Masked-autoencoder pretraining of the point encoder (Point-MAE) and the cached foundation model.

Patches of a cloud are masked at random (60 %, Point-MAE's ratio); the encoder sees the visible
patches, a light transformer decoder fills in mask tokens placed at the masked centres, and a
linear layer predicts each masked patch's ``group_size`` points, scored by the Chamfer distance
to the true patch. No pretrained point weights can be downloaded here, so this stage makes the
"foundation model" that fine-tuning starts from.

``domains/pointcloud.yaml`` declares this stage (``pretrain.yaml``) as its ``foundation``
prerequisite: ``python -m suite fit --config domains/pointcloud.yaml`` runs it once per encoder
shape (and pretraining config) and caches it (``suite.prerequisites``), so the fine-tuning YAML
works on a fresh machine on its own.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from suite.backbones.point import PointEncoder, PointEncoderConfig, TransformerEncoder
from suite.module import AdaptedModule


def chamfer_distance(pred: Tensor, target: Tensor) -> Tensor:
    """Symmetric squared-L2 Chamfer distance, averaged over the batch: ``(B, P, 3)``, ``(B, Q, 3)``.

    ``mean_p min_q |p - q|^2 + mean_q min_p |p - q|^2`` (Point-MAE's ``ChamferDistanceL2``).
    Written in torch because pytorch3d and chamferdist need compiled CUDA/C++ ops; a dense
    ``(P, Q)`` distance matrix is cheap at patch sizes of 16-64 points.
    """
    d = (pred.unsqueeze(2) - target.unsqueeze(1)).pow(2).sum(-1)  # (B, P, Q)
    return d.amin(2).mean(1).mean() + d.amin(1).mean(1).mean()


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
        decoder_depth, decoder_heads: Point-MAE uses a 4-block, 6-head decoder at width 384.
    """

    def __init__(
        self,
        encoder: PointEncoderConfig | None = None,
        mask_ratio: float = 0.6,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        cfg = PointEncoderConfig.coerce(encoder)
        self.hparams["encoder"] = cfg.to_dict()  # plain dict: checkpoints load with weights_only
        self.mask_ratio = mask_ratio
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

    def compute_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out = self.reconstruct(batch["points"])
        return {"loss": chamfer_distance(out["pred"], out["target"])}
