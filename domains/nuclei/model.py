"""SAM with cooperative fine-grained refinement for nuclei instance segmentation and classification.

After "Adapting SAM to Nuclei Instance Segmentation and Classification via Cooperative
Fine-Grained Refinement" (arXiv 2603.28027):

    tile (3, 256, 256) ──> frozen SAM image encoder, MALA after every block (adapters.py)
        block outputs + neck ──> HMF: FiLM-modulated levels, learned level weights ──> (dim, 16, 16)
        ──> decoder: x2 upsampling stages with skip features of a light conv stem on the tile
            (by default down to 128 px; the output maps are upsampled to the tile)
        ──> HoVer-Net heads: nuclear pixel (2), h/v distance (2), type (C + 1)
        ──> BGMR: boundary head (1) at the decoder's resolution, supervised by instance contours
            max-pooled to that grid, refines the nuclear-pixel logits (and, optionally, the
            watershed border). Supervising a half-resolution map with 1-px contours at full
            resolution (bilinear upsampling in between) cost bPQ and doubled the spread over
            seeds; see benchmarks/results/nuclei.md
        ──> MONAI HoVer-Net watershed ──> instance map + class per nucleus (postprocess.py)

Each of MALA (``adapter``), HMF (``hmf``) and BGMR (``bgmr``) is a YAML switch; ``adapter`` also
takes ``suite.adapters.LoRA`` or ``null`` (frozen encoder, heads only). The SAM encoder is called
part by part (``Sam.forward`` runs under ``no_grad``). Losses: MONAI's ``HoVerNetLoss`` (NP: CE +
Dice, HV: MSE + gradient MSE on nuclei, NC: CE + Dice) plus Dice + BCE on the boundary map.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from segment_anything.modeling.common import LayerNorm2d

from suite.adapters import AdapterSpec
from suite.backbones.sam import PIXEL_MEAN, PIXEL_STD, SamEncoderConfig, sam_image_encoder
from suite.module import AdaptedModule

from .metrics import NucleiMetrics
from .postprocess import PostProcessConfig, hovernet_instances, instance_types
from .synth import CLASS_NAMES


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class HMF(nn.Module):
    """Hierarchical modulated fusion: project each encoder level, FiLM it, mix with learned weights.

    FiLM (Perez et al. 2018) scales and shifts every level's channels with (1 + gamma, beta)
    predicted from the pooled deepest level, so global context decides which local channels
    matter; softmax level weights then fuse the levels. gamma, beta start at 0 and the weights
    uniform.
    """

    def __init__(self, level_dims: list[int], dim: int, context_dim: int) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Sequential(nn.Conv2d(c, dim, 1), LayerNorm2d(dim)) for c in level_dims)
        self.film = nn.Linear(context_dim, 2 * dim * len(level_dims))
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.level_logits = nn.Parameter(torch.zeros(len(level_dims)))

    def forward(self, levels: list[Tensor], context: Tensor) -> Tensor:
        gamma, beta = self.film(context).view(context.shape[0], len(levels), 2, -1, 1, 1).unbind(2)
        weights = torch.softmax(self.level_logits, 0)
        return sum(w * ((1 + gamma[:, i]) * p(f) + beta[:, i]) for i, (w, p, f) in enumerate(zip(weights, self.proj, levels)))


class Decoder(nn.Module):
    """x2 upsampling stages from the token grid down to ``output_stride``, with stem skips.

    A frozen ViT with 16-px patches cannot place a 10-px nucleus edge; a trainable stem (3x3
    convolutions on the tile, strides 1 or 2, then 2 and 4) supplies the edges, as in CellViT /
    UNETR decoders. Widths are small because the finest stages dominate the CPU cost (a 256-px
    stage alone is ~0.6 GFLOP per tile forward).
    """

    SKIPS = {1: 8, 2: 16, 4: 32}  # stride -> stem channels
    WIDTHS = {8: 48, 4: 32, 2: 24, 1: 16}  # stride -> stage output channels

    def __init__(self, dim: int, patch_size: int, output_stride: int = 1) -> None:
        super().__init__()
        self.stem = nn.ModuleDict()
        cin, prev = 3, 1
        for stride, c in self.SKIPS.items():
            if stride >= output_stride:
                self.stem[str(stride)] = conv_bn(cin, c, stride // prev)
                cin, prev = c, stride
        self.stages = nn.ModuleList()
        stride, c = patch_size, dim
        while stride > output_stride:
            stride //= 2
            self.stages.append(conv_bn(c + self.SKIPS.get(stride, 0), self.WIDTHS.get(stride, dim)))
            c = self.WIDTHS.get(stride, dim)
        self.out_channels = c

    def forward(self, tokens: Tensor, image: Tensor) -> Tensor:
        skips, h = {}, image
        for stride, layer in self.stem.items():
            h = layer(h)
            skips[int(stride)] = h
        x = tokens
        for stage in self.stages:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            skip = skips.get(image.shape[-1] // x.shape[-1])
            x = stage(x if skip is None else torch.cat([x, skip], 1))
        return x


class NucleiSAM(AdaptedModule):
    """SAM encoder + MALA / HMF / BGMR + HoVer-Net heads, trained on tiles from :class:`NucleiData`.

    Args:
        checkpoint: official SAM checkpoint (``sam_vit_b_01ec64.pth``, ...) or ``null`` for a
            small random encoder shaped by ``encoder``.
        encoder: :class:`~suite.backbones.sam.SamEncoderConfig` fields for the random encoder.
        img_size: tile size (position embeddings are sized / interpolated to it).
        num_types: nucleus classes (PanNuke: 5).
        decoder_dim: channels of the fused token map entering the decoder.
        output_stride: 1 decodes to full resolution; 2 stops at half resolution and upsamples
            the output maps bilinearly (about half the decoder cost).
        hmf: fuse all encoder levels (HMF) instead of the neck output alone.
        hmf_levels: encoder blocks fused by HMF (default: the global-attention blocks, or all
            blocks of a small encoder), always plus the neck.
        bgmr: boundary head + refinement of the nuclear-pixel logits.
        boundary_weight: weight of the boundary loss.
        loss_weights: ``HoVerNetLoss`` weights (``lambda_hv_mse``, ``lambda_hv_mse_grad``,
            ``lambda_np_ce``, ``lambda_np_dice``, ``lambda_nc_ce``, ``lambda_nc_dice``).
        postprocess: :class:`~domains.nuclei.postprocess.PostProcessConfig` fields.
        match_radius: centroid pairing radius (px) for detection / classification F1.
        one_cycle: warm up then anneal the learning rate over the run (OneCycleLR, peak = the
            optimiser's lr) when no ``scheduler`` is given; short CPU runs converge much further.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        encoder: dict[str, Any] | None = None,
        img_size: int = 256,
        num_types: int = 5,
        decoder_dim: int = 64,
        output_stride: int = 1,
        hmf: bool = True,
        hmf_levels: list[int] | None = None,
        bgmr: bool = True,
        boundary_weight: float = 1.0,
        loss_weights: dict[str, float] | None = None,
        postprocess: dict[str, Any] | None = None,
        match_radius: float = 12.0,
        one_cycle: bool = True,
        adapter: AdapterSpec | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(adapter=adapter, **kwargs)
        if checkpoint is not None and encoder:
            raise ValueError(f"model.init_args.encoder shapes the random encoder; the shape of checkpoint {checkpoint} "
                             "is read off its tensors: set one of the two")
        with self.seeded():
            config = SamEncoderConfig(img_size=img_size, **(encoder or {})) if checkpoint is None else None
            self.backbone, self.encoder_config = sam_image_encoder(checkpoint, config, img_size)
        ec = self.encoder_config
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)
        if hmf:
            small = ec.depth <= 4
            self.hmf_levels = list(hmf_levels or (range(ec.depth) if small else ec.global_attn_indexes))
            self.hmf = HMF([ec.embed_dim] * len(self.hmf_levels) + [ec.out_chans], decoder_dim, ec.out_chans)
        else:
            self.hmf_levels, self.hmf = [], None
            self.neck_proj = nn.Sequential(nn.Conv2d(ec.out_chans, decoder_dim, 1), LayerNorm2d(decoder_dim))
        self.decoder = Decoder(decoder_dim, ec.patch_size, output_stride)
        c = self.decoder.out_channels
        # HoVer-Net branches as 1x1 heads on shared decoder features (HoVer-Net and CellViT use
        # one decoder per branch; three full-resolution decoders would triple the CPU cost)
        self.np_head, self.hv_head, self.tp_head = nn.Conv2d(c, 2, 1), nn.Conv2d(c, 2, 1), nn.Conv2d(c, num_types + 1, 1)
        if bgmr:
            self.boundary_head = nn.Conv2d(c, 1, 1)
            # refinement sees coarse logits, boundary probability and features; its last layer
            # is zero-initialised so it starts as "no correction"
            self.refine = nn.Sequential(nn.Conv2d(c + 3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 2, 1))
            nn.init.zeros_(self.refine[-1].weight)
            nn.init.zeros_(self.refine[-1].bias)
        from monai.apps.pathology.losses import HoVerNetLoss
        from monai.losses import DiceCELoss

        self.hovernet_loss = HoVerNetLoss(**(loss_weights or {}))
        self.boundary_loss = DiceCELoss(sigmoid=True)
        self.num_types, self.use_bgmr, self.boundary_weight = num_types, bgmr, boundary_weight
        self.post_config = PostProcessConfig(**(postprocess or {}))
        self.val_metrics = NucleiMetrics(num_types, match_radius)
        self.test_metrics = NucleiMetrics(num_types, match_radius)
        self.last_val: dict[str, float] = {}
        self.one_cycle = one_cycle
        self.adapt()

    # --- forward --------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """SAM encoder part by part (patch embedding, blocks, neck), fused to (B, dim, h, w)."""
        enc = self.backbone
        t = enc.patch_embed(x)
        if enc.pos_embed is not None:
            t = t + enc.pos_embed
        levels = []
        for i, block in enumerate(enc.blocks):
            t = block(t)
            if i in self.hmf_levels:
                levels.append(t.permute(0, 3, 1, 2))
        neck = enc.neck(t.permute(0, 3, 1, 2))
        if self.hmf is None:
            return self.neck_proj(neck)
        return self.hmf(levels + [neck], neck.mean(dim=(2, 3)))

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        """Raw 0-255 RGB (B, 3, H, W) -> logits: np (2), hv (2), nc (C + 1) at (H, W); boundary (1) at
        the decoder's resolution if BGMR."""
        x = (image - self.pixel_mean) / self.pixel_std
        feats = self.decoder(self.encode(x), x)
        out = {"nucleus_prediction": self.np_head(feats), "horizontal_vertical": self.hv_head(feats),
               "type_prediction": self.tp_head(feats)}
        if self.use_bgmr:
            boundary = self.boundary_head(feats)
            coarse = out["nucleus_prediction"]
            out["nucleus_prediction"] = coarse + self.refine(torch.cat([coarse, boundary.sigmoid(), feats], 1))
            out["boundary"] = boundary
        if feats.shape[-1] != image.shape[-1]:  # output_stride 2: HoVer-Net maps are upsampled to the tile;
            # the boundary map stays at decoder resolution, where a 1-px contour can be represented
            out = {k: v if k == "boundary" else F.interpolate(v, size=image.shape[-2:], mode="bilinear", align_corners=False)
                   for k, v in out.items()}
        return out

    # --- training -------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        config = super().configure_optimizers()
        if not self.one_cycle or self.scheduler_factory is not None:
            return config
        # the step count is known only to the trainer, so the schedule is built here
        sched = torch.optim.lr_scheduler.OneCycleLR(
            config, max_lr=[g["lr"] for g in config.param_groups], total_steps=int(self.trainer.estimated_stepping_batches),
            pct_start=0.15,
        )
        return {"optimizer": config, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def compute_losses(self, batch: dict[str, Tensor], out: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        out = self(batch["image"]) if out is None else out
        target = {
            "nucleus_prediction": F.one_hot((batch["inst_map"] > 0).long(), 2).permute(0, 3, 1, 2).float(),
            "horizontal_vertical": batch["hv"],
            "type_prediction": F.one_hot(batch["type_map"], self.num_types + 1).permute(0, 3, 1, 2).float(),
        }
        losses = {"hovernet": self.hovernet_loss({k: out[k] for k in target}, target)}
        if self.use_bgmr:  # contours pooled to the boundary map's resolution (a cell is on it if any pixel is)
            stride = batch["boundary"].shape[-1] // out["boundary"].shape[-1]
            losses["boundary"] = self.boundary_loss(out["boundary"], F.max_pool2d(batch["boundary"][:, None], stride))
        losses["loss"] = losses["hovernet"] + self.boundary_weight * losses.get("boundary", 0.0)
        return losses

    # --- inference: watershed + metrics ---------------------------------------------------
    @torch.no_grad()
    def predict_instances(self, out: dict[str, Tensor]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per tile (inst_map, type_map) from the network outputs (MONAI HoVer-Net watershed)."""
        results = []
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # MONAI's small filters run 10x slower multi-threaded on a busy CPU
        try:
            for b in range(out["nucleus_prediction"].shape[0]):
                boundary = None
                if self.use_bgmr and self.post_config.use_boundary:
                    size = out["nucleus_prediction"].shape[-2:]
                    up = F.interpolate(out["boundary"][b : b + 1].float(), size=size, mode="bilinear", align_corners=False)
                    boundary = up[0, 0].sigmoid().cpu().numpy()
                inst = hovernet_instances(out["nucleus_prediction"][b].float().cpu().numpy(),
                                          out["horizontal_vertical"][b].float().cpu().numpy(), boundary, self.post_config)
                results.append((inst, instance_types(inst, out["type_prediction"][b].float().cpu().numpy())))
        finally:
            torch.set_num_threads(threads)
        return results

    def _evaluate(self, batch: dict[str, Tensor], metrics: NucleiMetrics, stage: str) -> None:
        out = self(batch["image"])
        losses = self.compute_losses(batch, out)
        for k, v in losses.items():
            self.log(f"{stage}/{k}", v, batch_size=len(batch["image"]), sync_dist=True)
        for b, (inst, types) in enumerate(self.predict_instances(out)):
            metrics.update(batch["inst_map"][b].cpu().numpy(), batch["type_map"][b].cpu().numpy(), inst, types,
                           int(batch["tissue"][b]))

    def _log_metrics(self, metrics: NucleiMetrics, stage: str) -> dict[str, float]:
        values = metrics.compute()
        metrics.reset()
        names = {f"PQ/{i + 1}": f"PQ/{n}" for i, n in enumerate(CLASS_NAMES[: self.num_types])}
        names |= {f"F1c/{i + 1}": f"F1c/{n}" for i, n in enumerate(CLASS_NAMES[: self.num_types])}
        values = {names.get(k, k): v for k, v in values.items()}
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, prog_bar=False)
        return values

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self) -> None:
        self.last_val = self._log_metrics(self.val_metrics, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")

    def on_fit_end(self) -> None:
        if self.last_val:
            rank_zero_info(metrics_table(self.last_val, f"validation after epoch {self.current_epoch}"))

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> list[dict[str, Any]]:
        preds = self.predict_instances(self(batch["image"]))
        return [{"index": int(batch["index"][b]), "image": batch["image"][b].byte().permute(1, 2, 0).cpu().numpy(),
                 "inst_map": inst, "type_map": types} for b, (inst, types) in enumerate(preds)]


def metrics_table(values: dict[str, float], title: str) -> str:
    """A small fixed-width table of the headline metrics (printed at the end of fit)."""
    keys = ["bPQ", "mPQ", "AJI", "Dice", "F1d"] + [k for k in values if k.startswith(("PQ/", "F1c/"))]
    lines = [f"Nuclei metrics ({title})", "-" * 34]
    lines += [f"{k:<24}{values[k]:>10.4f}" for k in keys if k in values]
    return "\n".join(lines)
