"""SAM with cooperative fine-grained refinement for nuclei instance segmentation and classification.

After "Adapting SAM to Nuclei Instance Segmentation and Classification via Cooperative
Fine-Grained Refinement" (arXiv 2603.28027):

    tile (3, 256, 256) ──> frozen SAM image encoder, MALA after every block (adapters.py)
        block outputs + neck ──> HMF: FiLM-modulated levels, learned level weights ──> (dim, 16, 16)
        ──> decoder: x2 upsampling stages with skip features of a light conv stem on the tile
            (CellViT / UNETR style; by default down to 128 px, the output maps upsampled to the tile)
        ──> HoVer-Net heads: nuclear pixel (2), h/v distance (2), type (C + 1)
        ──> BGMR: multi-context boundary branch (dilated convolutions, below) at the decoder's
            resolution, supervised by instance contours max-pooled to that grid, refines the
            nuclear-pixel logits (and, optionally, the watershed border). Supervising a
            half-resolution map with 1-px contours at full resolution (bilinear upsampling in
            between) cost bPQ and doubled the spread over seeds; see benchmarks/results/nuclei.md
        ──> MONAI HoVer-Net watershed, set by the data's magnification ──> instances + classes

Each of MALA (``adapter``), HMF (``hmf``), BGMR (``bgmr``) and the conv stem (``stem``) is a YAML
switch; ``adapter`` also takes ``suite.adapters.LoRA`` or ``null`` (frozen encoder, heads only).
Tiles larger than ``img_size`` (a folder of H&E tiles in ``predict``) go through MONAI's
Gaussian-weighted sliding window and one watershed over the stitched maps. The SAM encoder is called
part by part (``Sam.forward`` runs under ``no_grad``). Losses: MONAI's ``HoVerNetLoss`` (NP: CE +
Dice, HV: MSE + gradient MSE on nuclei, NC: CE + Dice) plus Dice + BCE on the boundary map.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from segment_anything.modeling.common import LayerNorm2d
from torch import Tensor, nn

from suite.adapters import AdapterSpec
from suite.backbones.sam import PIXEL_MEAN, PIXEL_STD, SamEncoderConfig, sam_image_encoder
from suite.module import AdaptedModule

from .metrics import NucleiMetrics
from .postprocess import PostProcessConfig, config_for, hovernet_instances, instance_types
from .synth import CLASS_NAMES


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
        stem: conv stem on the tile feeding the decoder's skips; ``false`` decodes SAM's features only.
        bgmr: multi-context boundary branch + refinement of the nuclear-pixel logits.
        boundary_weight: weight of the boundary loss.
        loss_weights: ``HoVerNetLoss`` weights (``lambda_hv_mse``, ``lambda_hv_mse_grad``,
            ``lambda_np_ce``, ``lambda_np_dice``, ``lambda_nc_ce``, ``lambda_nc_dice``).
        postprocess: :class:`~domains.nuclei.postprocess.PostProcessConfig` fields that override
            the data's magnification default (40x: HoVer-Net's Sobel 21 / markers 0.4; 20x:
            CellViT's 11 / 0.5; each batch says its magnification).
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
        stem: bool = True,
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
        self.decoder = Decoder(decoder_dim, ec.patch_size, output_stride, stem=stem)
        c = self.decoder.out_channels
        # HoVer-Net branches as 1x1 heads on shared decoder features (HoVer-Net and CellViT use
        # one decoder per branch; three full-resolution decoders would triple the CPU cost)
        self.np_head, self.hv_head, self.tp_head = nn.Conv2d(c, 2, 1), nn.Conv2d(c, 2, 1), nn.Conv2d(c, num_types + 1, 1)
        if bgmr:
            self.boundary_head = BoundaryBranch(c)
            # refinement sees coarse logits, boundary probability and features; its last layer
            # is zero-initialised so it starts as "no correction"
            self.refine = nn.Sequential(nn.Conv2d(c + 3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 2, 1))
            nn.init.zeros_(self.refine[-1].weight)
            nn.init.zeros_(self.refine[-1].bias)
        from monai.apps.pathology.losses import HoVerNetLoss
        from monai.losses import DiceCELoss

        self.hovernet_loss = HoVerNetLoss(**(loss_weights or {}))
        self.boundary_loss = DiceCELoss(sigmoid=True)
        self.num_types, self.use_bgmr, self.boundary_weight, self.img_size = num_types, bgmr, boundary_weight, img_size
        self.post_overrides = dict(postprocess or {})
        config_for(40, self.post_overrides)  # a misspelt field fails here, not at the first validation
        self.class_names: tuple[str, ...] = tuple(CLASS_NAMES[:num_types]) if num_types <= len(CLASS_NAMES) else \
            tuple(f"class {i + 1}" for i in range(num_types))
        self.val_metrics = NucleiMetrics(num_types, match_radius)
        self.test_metrics = NucleiMetrics(num_types, match_radius)
        self.last_val: dict[str, float] = {}
        self.one_cycle = one_cycle
        self.adapt()
        self.load_init_from()  # start from an earlier stage's checkpoint when init_from is given

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
    def setup(self, stage: str) -> None:
        """Take the class names of the data; refuse a data module with another number of classes."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        num = getattr(dm, "num_types", None)
        if num is not None and num != self.num_types:
            raise ValueError(f"the data has {num} nucleus classes ({', '.join(dm.class_names)}) but the model was built "
                             f"for {self.num_types}: pass --model.init_args.num_types {num}")
        if num is not None:
            self.class_names = tuple(dm.class_names)

    def post_config(self, magnification: int) -> PostProcessConfig:
        """Watershed settings for data at ``magnification``, with the YAML's ``postprocess`` on top."""
        return config_for(int(magnification), self.post_overrides)

    @torch.no_grad()
    def predict_instances(self, out: dict[str, Tensor], magnification: Any = 40) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per tile (inst_map, type_map) from the network outputs (MONAI HoVer-Net watershed)."""
        n = out["nucleus_prediction"].shape[0]
        mags = magnification.tolist() if isinstance(magnification, Tensor) else [magnification] * n
        results = []
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # MONAI's small filters run 10x slower multi-threaded on a busy CPU
        try:  # MONAI's watershed chain runs torch filters on the CPU: under bf16 autocast they return bf16
            with torch.autocast("cpu", enabled=False):
                for b in range(n):
                    config, boundary = self.post_config(mags[b]), None
                    if self.use_bgmr and config.use_boundary:
                        size = out["nucleus_prediction"].shape[-2:]
                        up = F.interpolate(out["boundary"][b : b + 1].float(), size=size, mode="bilinear", align_corners=False)
                        boundary = up[0, 0].sigmoid().cpu().numpy()
                    inst = hovernet_instances(out["nucleus_prediction"][b].float().cpu().numpy(),
                                              out["horizontal_vertical"][b].float().cpu().numpy(), boundary, config)
                    results.append((inst, instance_types(inst, out["type_prediction"][b].float().cpu().numpy())))
        finally:
            torch.set_num_threads(threads)
        return results

    def infer(self, image: Tensor) -> dict[str, Tensor]:
        """Network outputs for tiles of the training size, or of any size through MONAI's sliding window
        (``img_size`` windows, 1/4 overlap, Gaussian-weighted blending; smaller images are padded)."""
        if tuple(image.shape[-2:]) == (self.img_size, self.img_size):
            return self(image)
        from monai.inferers import sliding_window_inference

        def full_size(x: Tensor) -> dict[str, Tensor]:  # every map at the window's size, for the stitching
            return {k: F.interpolate(v, size=x.shape[-2:], mode="bilinear", align_corners=False) if k == "boundary" else v
                    for k, v in self(x).items()}

        return sliding_window_inference(image, (self.img_size, self.img_size), sw_batch_size=4, predictor=full_size,
                                        overlap=0.25, mode="gaussian", padding_mode="reflect")

    def _evaluate(self, batch: dict[str, Tensor], metrics: NucleiMetrics, stage: str) -> None:
        out = self(batch["image"])
        losses = self.compute_losses(batch, out)
        for k, v in losses.items():
            self.log(f"{stage}/{k}", v, batch_size=len(batch["image"]), sync_dist=True)
        for b, (inst, types) in enumerate(self.predict_instances(out, batch.get("magnification", 40))):
            metrics.update(batch["inst_map"][b].cpu().numpy(), batch["type_map"][b].cpu().numpy(), inst, types,
                           int(batch["tissue"][b]))

    def _log_metrics(self, metrics: NucleiMetrics, stage: str) -> dict[str, float]:
        values = metrics.compute()
        metrics.reset()
        names = {f"PQ/{i + 1}": f"PQ/{n}" for i, n in enumerate(self.class_names)}
        names |= {f"F1c/{i + 1}": f"F1c/{n}" for i, n in enumerate(self.class_names)}
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

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Instances and classes per tile, with the image to draw them on (the original, not the normalised one)."""
        preds = self.predict_instances(self.infer(batch["image"]), batch.get("magnification", 40))
        shown = batch["display"] if "display" in batch else batch["image"].permute(0, 2, 3, 1)
        names = batch.get("name") or [f"tile{int(i):05d}" for i in batch["index"]]
        return [{"name": names[b], "image": shown[b].byte().cpu().numpy(), "inst_map": inst, "type_map": types}
                for b, (inst, types) in enumerate(preds)]


def metrics_table(values: dict[str, float], title: str) -> str:
    """A small fixed-width table of the headline metrics (printed at the end of fit)."""
    keys = ["bPQ", "mPQ", "AJI", "Dice", "F1d"] + [k for k in values if k.startswith(("PQ/", "F1c/"))]
    lines = [f"Nuclei metrics ({title})", "-" * 34]
    lines += [f"{k:<24}{values[k]:>10.4f}" for k in keys if k in values]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The trainable parts between the frozen SAM encoder and the HoVer-Net heads: HMF, the decoder and BGMR's boundary branch.


def conv_bn(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, dilation, dilation=dilation, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


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
    """x2 upsampling stages from the token grid down to ``output_stride``, with optional stem skips.

    A frozen ViT with 16-px patches cannot place a 10-px nucleus edge; a trainable stem (3x3
    convolutions on the tile, strides 1 or 2, then 2 and 4) supplies the edges, as in CellViT /
    UNETR decoders (a deviation from the paper, which refines SAM's features alone; ``stem=False``
    decodes SAM's features only). Widths are small because the finest stages dominate the CPU
    cost (a 256-px stage alone is ~0.6 GFLOP per tile forward).
    """

    SKIPS = {1: 8, 2: 16, 4: 32}  # stride -> stem channels
    WIDTHS = {8: 48, 4: 32, 2: 24, 1: 16}  # stride -> stage output channels

    def __init__(self, dim: int, patch_size: int, output_stride: int = 1, stem: bool = True) -> None:
        super().__init__()
        self.stem = nn.ModuleDict()
        skips = self.SKIPS if stem else {}
        cin, prev = 3, 1
        for stride, c in skips.items():
            if stride >= output_stride:
                self.stem[str(stride)] = conv_bn(cin, c, stride // prev)
                cin, prev = c, stride
        self.stages = nn.ModuleList()
        stride, c = patch_size, dim
        while stride > output_stride:
            stride //= 2
            skip = skips.get(stride, 0) if str(stride) in self.stem else 0
            self.stages.append(conv_bn(c + skip, self.WIDTHS.get(stride, dim)))
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


class BoundaryBranch(nn.Module):
    """BGMR's boundary cue from several contexts: parallel 3x3 convolutions at dilations 1, 2, 4 (receptive
    fields 3, 5, 9 px at the decoder's resolution) on the decoder features, fused by a 1x1 convolution.

    The paper describes multi-context boundary cues without layer sizes; dilated branches (as in
    ASPP, Chen et al. 2017) see a nucleus' edge together with its neighbour's at one resolution.
    """

    def __init__(self, channels: int, width: int = 8, dilations: tuple[int, ...] = (1, 2, 4)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(conv_bn(channels, width, dilation=d) for d in dilations)
        self.fuse = nn.Conv2d(width * len(dilations), 1, 1)

    def forward(self, feats: Tensor) -> Tensor:
        return self.fuse(torch.cat([b(feats) for b in self.branches], 1))
