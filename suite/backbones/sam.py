"""SAM image encoder (``segment_anything.modeling.ImageEncoderViT``) at tile resolution.

Two ways to build it:

* a small random configuration (the default: embed 192, depth 4, 256 px tiles), so a domain runs
  with no download;
* an official checkpoint (``sam_vit_b_01ec64.pth``, ``sam_vit_l_0b3195.pth``,
  ``sam_vit_h_4b8939.pth``) or any state dict in the same key layout (``image_encoder.*``).
  The architecture is read off the tensor shapes, the file is opened with
  ``torch.load(weights_only=True)``, and the 1024-px position embeddings (absolute, and the
  relative ones of the global-attention blocks) are interpolated to the tile size, so a 256-px
  tile runs on a 16 x 16 token grid instead of being upsampled to 1024 px (16x the compute).

Only the image encoder is built: ``Sam.forward`` runs under ``torch.no_grad`` and cannot be
fine-tuned, so domains call the encoder's parts directly.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: official SAM encoders (segment_anything/build_sam.py); window 14, patch 16, neck 256 for all
SAM_VARIANTS: dict[str, dict[str, Any]] = {
    "vit_b": {"embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": (2, 5, 8, 11)},
    "vit_l": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "global_attn_indexes": (5, 11, 17, 23)},
    "vit_h": {"embed_dim": 1280, "depth": 32, "num_heads": 16, "global_attn_indexes": (7, 15, 23, 31)},
}
_OFFICIAL_SHARED = {"patch_size": 16, "window_size": 14, "out_chans": 256, "mlp_ratio": 4.0}

#: SAM's input normalisation (ImageNet statistics on 0-255 pixels), part of the pretrained model
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass
class SamEncoderConfig:
    """Shape of an ``ImageEncoderViT``. Defaults: a small encoder for 256-px CPU runs."""

    img_size: int = 256  # the tile size the encoder runs at (position embeddings are sized to it)
    patch_size: int = 16
    embed_dim: int = 192
    depth: int = 4
    num_heads: int = 3
    mlp_ratio: float = 4.0
    out_chans: int = 64  # neck width
    window_size: int = 8  # windowed attention on an 16x16 grid: 4 windows of 8x8 tokens
    global_attn_indexes: tuple[int, ...] = field(default_factory=lambda: (1, 3))

    @classmethod
    def variant(cls, name: str, img_size: int = 256) -> "SamEncoderConfig":
        """The official ``vit_b`` / ``vit_l`` / ``vit_h`` shape at ``img_size``."""
        if name not in SAM_VARIANTS:
            raise ValueError(f"unknown SAM variant {name!r}; known: {sorted(SAM_VARIANTS)}")
        return cls(img_size=img_size, **_OFFICIAL_SHARED, **SAM_VARIANTS[name])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["global_attn_indexes"] = list(self.global_attn_indexes)
        return d


def build_sam_encoder(config: SamEncoderConfig | None = None) -> nn.Module:
    """A randomly initialised ``ImageEncoderViT`` of the given shape (SAM's own builder settings)."""
    from segment_anything.modeling import ImageEncoderViT  # heavy optional import, only when used

    c = config or SamEncoderConfig()
    if c.img_size % c.patch_size:
        raise ValueError(f"img_size {c.img_size} must be a multiple of patch_size {c.patch_size}")
    return ImageEncoderViT(
        img_size=c.img_size,
        patch_size=c.patch_size,
        embed_dim=c.embed_dim,
        depth=c.depth,
        num_heads=c.num_heads,
        mlp_ratio=c.mlp_ratio,
        out_chans=c.out_chans,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=c.window_size,
        global_attn_indexes=tuple(c.global_attn_indexes),
    )


def read_sam_encoder_state(path: str | Path) -> dict[str, Tensor]:
    """The ``image_encoder.*`` tensors of a SAM checkpoint, prefix removed (``weights_only=True``).

    Accepts the official files (a flat state dict of the whole ``Sam``), the same dict wrapped
    under ``"model"`` or ``"state_dict"``, or an encoder-only state dict (``patch_embed.*``, ...).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SAM checkpoint {path} not found (expected e.g. sam_vit_b_01ec64.pth)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    encoder = {k[len("image_encoder."):]: v for k, v in state.items() if k.startswith("image_encoder.")}
    if not encoder and "patch_embed.proj.weight" in state:
        encoder = dict(state)
    if "patch_embed.proj.weight" not in encoder:
        raise ValueError(
            f"{path}: no SAM image-encoder weights found; expected keys 'image_encoder.patch_embed.proj.weight', "
            f"'image_encoder.blocks.0.attn.qkv.weight', ... (official layout). First keys: {list(state)[:5]}"
        )
    return encoder


def config_from_state(state: dict[str, Tensor], img_size: int = 256) -> SamEncoderConfig:
    """Read the encoder shape off the tensors (works for vit_b/l/h and any smaller SAM encoder)."""
    w = state["patch_embed.proj.weight"]
    embed_dim, patch = int(w.shape[0]), int(w.shape[-1])
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    if not blocks or blocks != list(range(len(blocks))):
        raise ValueError(f"SAM encoder state: blocks must be numbered 0..N-1, found {blocks[:8]}...")
    if "blocks.0.attn.rel_pos_h" not in state:
        raise ValueError("SAM encoder state has no relative position tables (attn.rel_pos_h); official SAM encoders use them")
    head_dim = int(state["blocks.0.attn.rel_pos_h"].shape[1])
    pretrain_grid = int(state["pos_embed"].shape[1]) if "pos_embed" in state else img_size // patch
    lengths = [int(state[f"blocks.{i}.attn.rel_pos_h"].shape[0]) for i in blocks]
    global_idx = tuple(i for i, n in zip(blocks, lengths) if n == 2 * pretrain_grid - 1)
    windowed = {n for i, n in zip(blocks, lengths) if i not in global_idx}
    if len(windowed) > 1:
        raise ValueError(f"SAM encoder state: windowed blocks disagree on the window size (rel_pos lengths {sorted(windowed)})")
    window = (windowed.pop() + 1) // 2 if windowed else 0
    return SamEncoderConfig(
        img_size=img_size,
        patch_size=patch,
        embed_dim=embed_dim,
        depth=len(blocks),
        num_heads=embed_dim // head_dim,
        mlp_ratio=state["blocks.0.mlp.lin1.weight"].shape[0] / embed_dim,
        out_chans=int(state["neck.0.weight"].shape[0]),
        window_size=window,
        global_attn_indexes=global_idx,
    )


def resize_position_embeddings(state: dict[str, Tensor], config: SamEncoderConfig) -> dict[str, Tensor]:
    """Interpolate the absolute grid and the global blocks' relative tables to ``config.img_size``.

    The absolute embedding (1, G, G, C) is resized bicubically with antialiasing (a 4x reduction
    from 64 to 16 tokens would otherwise alias); the relative tables (2G-1, head_dim) linearly,
    which is what segment_anything's ``get_rel_pos`` itself does when sizes differ.
    """
    out = dict(state)
    grid = config.img_size // config.patch_size
    if "pos_embed" in out and out["pos_embed"].shape[1] != grid:
        pe = out["pos_embed"].permute(0, 3, 1, 2).float()
        pe = F.interpolate(pe, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
        out["pos_embed"] = pe.permute(0, 2, 3, 1).to(state["pos_embed"].dtype)
    for i in config.global_attn_indexes:
        for axis in ("h", "w"):
            key = f"blocks.{i}.attn.rel_pos_{axis}"
            table = out[key]
            if table.shape[0] != 2 * grid - 1:
                t = F.interpolate(table.float().t()[None], size=2 * grid - 1, mode="linear", align_corners=False)
                out[key] = t[0].t().to(table.dtype)
    return out


def sam_image_encoder(
    checkpoint: str | Path | None = None,
    config: SamEncoderConfig | None = None,
    img_size: int = 256,
) -> tuple[nn.Module, SamEncoderConfig]:
    """Build the encoder: from ``checkpoint`` (shape inferred, embeddings resized) or ``config``.

    Returns the module and the configuration it was built with.
    """
    if checkpoint is not None and config is not None:
        raise ValueError(f"give a SAM checkpoint or an encoder config, not both: the shape of {checkpoint} is read off its tensors")
    if checkpoint is None:
        config = config or SamEncoderConfig(img_size=img_size)
        return build_sam_encoder(config), config
    state = read_sam_encoder_state(checkpoint)
    config = config_from_state(state, img_size=img_size)
    model = build_sam_encoder(config)
    result = model.load_state_dict(resize_position_embeddings(state, config), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{checkpoint}: image-encoder weights do not fit the inferred {config}:\n"
            f"  missing: {result.missing_keys[:10]}\n  unexpected: {result.unexpected_keys[:10]}"
        )
    return model, config
