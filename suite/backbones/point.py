"""Point-MAE / Point-BERT-style point-cloud encoder in pure PyTorch.

A cloud is cut into patches (farthest point sampling picks ``num_group`` centres, each takes its
``group_size`` nearest neighbours), every patch is embedded by a mini-PointNet, and a standard
transformer runs over the patch tokens plus a class token. The features are
``[cls, max over patches]`` as in Point-MAE's fine-tuning model.

Module and parameter names follow Point-MAE's ``PointTransformer`` (``encoder.first_conv``,
``blocks.blocks.0.attn.qkv``, ``norm``, ``cls_token`` ...), so a user's Point-MAE or Point-BERT
checkpoint loads by renaming prefixes only (:func:`load_point_mae`).

The reference repositories need compiled CUDA extensions (pointnet2_ops for FPS, knn_cuda,
chamfer_dist) whose builds fail on most machines; FPS and kNN here are a few tensor ops each,
fast enough for the 1-2 k points per cloud these models use, and run on CPU.

References: Pang et al., "Masked Autoencoders for Point Cloud Self-supervised Learning"
(Point-MAE, ECCV 2022); Yu et al., "Point-BERT" (CVPR 2022).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import Tensor, nn


@dataclass
class PointEncoderConfig:
    """Encoder shape. Defaults are Point-MAE's (ViT-S width on 64 patches of 32 points)."""

    trans_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    num_group: int = 64  # patches per cloud (FPS centres)
    group_size: int = 32  # points per patch (kNN)
    embed_hidden: tuple[int, int] = (128, 256)  # mini-PointNet widths of Point-MAE's Encoder
    encoder_dims: int | None = None  # Point-BERT: 256 + a reduce_dim Linear; None: = trans_dim (Point-MAE)
    mlp_ratio: float = 4.0
    qkv_bias: bool = False  # Point-MAE's attention has no qkv bias
    drop_path_rate: float = 0.0
    num_prompts: int = 0  # VPT-style prompt tokens (a baseline); 0 for Point-MAE

    @classmethod
    def coerce(cls, value: "PointEncoderConfig | dict[str, Any] | None") -> "PointEncoderConfig":
        """Accept a config, the dict stored in checkpoint hyperparameters, or None (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        d = dict(value)
        if "embed_hidden" in d:
            d["embed_hidden"] = tuple(d["embed_hidden"])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["embed_hidden"] = list(d["embed_hidden"])
        return d


# --- grouping -------------------------------------------------------------------------------------
def farthest_point_sample(xyz: Tensor, n: int) -> Tensor:
    """Indices ``(B, n)`` of farthest point sampling, starting at point 0 like pointnet2's kernel."""
    b, num, _ = xyz.shape
    if n > num:
        raise ValueError(f"cannot pick {n} centres from a cloud of {num} points")
    idx = torch.empty(b, n, dtype=torch.long, device=xyz.device)
    dist = torch.full((b, num), float("inf"), device=xyz.device, dtype=xyz.dtype)
    farthest = torch.zeros(b, dtype=torch.long, device=xyz.device)
    rows = torch.arange(b, device=xyz.device)
    for i in range(n):
        idx[:, i] = farthest
        centre = xyz[rows, farthest].unsqueeze(1)
        dist = torch.minimum(dist, (xyz - centre).pow(2).sum(-1))
        farthest = dist.argmax(-1)
    return idx


def knn_indices(xyz: Tensor, centres: Tensor, k: int) -> Tensor:
    """Indices ``(B, G, k)`` of the ``k`` points of ``xyz`` nearest each centre, nearest first."""
    d = torch.cdist(centres, xyz, compute_mode="donot_use_mm_for_euclid_dist")
    return d.topk(k, dim=-1, largest=False).indices


def gather_points(xyz: Tensor, idx: Tensor) -> Tensor:
    """``xyz[b, idx[b, ...]]`` for a batch: ``(B, N, 3)`` x ``(B, *S)`` -> ``(B, *S, 3)``."""
    b = xyz.shape[0]
    flat = idx.reshape(b, -1)
    out = torch.gather(xyz, 1, flat.unsqueeze(-1).expand(-1, -1, xyz.shape[-1]))
    return out.reshape(*idx.shape, xyz.shape[-1])


class Group(nn.Module):
    """FPS centres + kNN patches; patches are returned relative to their centre."""

    def __init__(self, num_group: int, group_size: int) -> None:
        super().__init__()
        self.num_group, self.group_size = num_group, group_size

    def forward(self, xyz: Tensor) -> tuple[Tensor, Tensor]:
        if xyz.ndim != 3 or xyz.shape[-1] != 3:
            raise ValueError(f"expected points of shape (B, N, 3), got {tuple(xyz.shape)}")
        if xyz.shape[1] < self.group_size:
            raise ValueError(f"clouds have {xyz.shape[1]} points, fewer than group_size={self.group_size}")
        centre = gather_points(xyz, farthest_point_sample(xyz, self.num_group))  # (B, G, 3)
        neighbourhood = gather_points(xyz, knn_indices(xyz, centre, self.group_size))  # (B, G, k, 3)
        return neighbourhood - centre.unsqueeze(2), centre


# --- patch embedding and transformer (Point-MAE names) ---------------------------------------------
class PatchEmbed(nn.Module):
    """Mini-PointNet: shared MLP, max-pool, concat the pooled feature back, MLP, max-pool."""

    def __init__(self, out_dim: int, hidden: tuple[int, int] = (128, 256)) -> None:
        super().__init__()
        h1, h2 = hidden
        self.first_conv = nn.Sequential(nn.Conv1d(3, h1, 1), nn.BatchNorm1d(h1), nn.ReLU(inplace=True), nn.Conv1d(h1, h2, 1))
        self.second_conv = nn.Sequential(
            nn.Conv1d(2 * h2, 2 * h2, 1), nn.BatchNorm1d(2 * h2), nn.ReLU(inplace=True), nn.Conv1d(2 * h2, out_dim, 1)
        )

    def forward(self, patches: Tensor) -> Tensor:
        b, g, k, _ = patches.shape
        f = _pointwise(self.first_conv, patches.reshape(b * g * k, 3)).reshape(b * g, k, -1)
        f = torch.cat([f.amax(1, keepdim=True).expand(-1, k, -1), f], dim=-1).reshape(b * g * k, -1)
        f = _pointwise(self.second_conv, f).reshape(b * g, k, -1).amax(1)
        return f.reshape(b, g, -1)


def _pointwise(layers: nn.Sequential, x: Tensor) -> Tensor:
    """Run kernel-1 Conv1d / BatchNorm1d / ReLU layers on ``(points, channels)`` rows.

    The same maths as the official ``(B, C, N)`` layout (BatchNorm statistics over all points),
    keeping the Conv1d parameters (and so the checkpoint keys) but ~25 % faster on CPU.
    """
    for m in layers:
        x = F.linear(x, m.weight.squeeze(-1), m.bias) if isinstance(m, nn.Conv1d) else m(x)
    return x


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"trans_dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v, as Point-MAE
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class TransformerEncoder(nn.Module):
    """Blocks that re-add the positional embedding before every block, as Point-MAE does."""

    def __init__(self, cfg: PointEncoderConfig) -> None:
        super().__init__()
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.ModuleList(Block(cfg.trans_dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, r) for r in rates)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x + pos)
        return x


class PointEncoder(nn.Module):
    """Patch tokens -> transformer -> ``[cls, max-pool]`` features of width ``2 * trans_dim``."""

    def __init__(self, cfg: PointEncoderConfig | dict[str, Any] | None = None) -> None:
        super().__init__()
        cfg = PointEncoderConfig.coerce(cfg)
        self.cfg = cfg
        c = cfg.trans_dim
        self.group_divider = Group(cfg.num_group, cfg.group_size)
        self.encoder = PatchEmbed(cfg.encoder_dims or c, cfg.embed_hidden)
        self.reduce_dim = nn.Linear(cfg.encoder_dims, c) if cfg.encoder_dims else nn.Identity()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, c))
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, c))
        self.blocks = TransformerEncoder(cfg)
        self.norm = nn.LayerNorm(c)
        if cfg.num_prompts:
            self.prompt_tokens = nn.Parameter(torch.zeros(1, cfg.num_prompts, c))
        self.apply(_init_weights)
        for p in [self.cls_token, self.cls_pos] + ([self.prompt_tokens] if cfg.num_prompts else []):
            trunc_normal_(p, std=0.02)

    @property
    def num_features(self) -> int:
        return 2 * self.cfg.trans_dim

    @property
    def depth(self) -> int:
        return len(self.blocks.blocks)

    def prune(self, n_blocks: int) -> None:
        """Drop the top ``n_blocks`` transformer blocks (MCFT's pruning variant)."""
        if not 0 <= n_blocks < self.depth:
            raise ValueError(f"can prune 0..{self.depth - 1} of {self.depth} blocks, got {n_blocks}")
        if n_blocks:
            self.blocks.blocks = self.blocks.blocks[: self.depth - n_blocks]

    def tokens(self, patches: Tensor, centre: Tensor, visible: Tensor | None = None) -> Tensor:
        """Normed tokens ``(B, 1 + P + G', C)``: cls, prompts, then the (visible) patch tokens."""
        b = patches.shape[0]
        if visible is not None:  # MAE masking keeps the same number of patches in every cloud;
            # embedding only those (Point-MAE embeds all, then drops) saves ~60 % of the embedding
            patches, centre = patches[visible].reshape(b, -1, *patches.shape[2:]), centre[visible].reshape(b, -1, 3)
        x = self.reduce_dim(self.encoder(patches))
        pos = self.pos_embed(centre)
        lead = [self.cls_token.expand(b, -1, -1)]
        lead_pos = [self.cls_pos.expand(b, -1, -1)]
        if self.cfg.num_prompts:
            lead.append(self.prompt_tokens.expand(b, -1, -1))
            lead_pos.append(torch.zeros_like(lead[-1]))
        x = self.blocks(torch.cat(lead + [x], 1), torch.cat(lead_pos + [pos], 1))
        return self.norm(x)

    def forward(self, points: Tensor) -> Tensor:
        x = self.tokens(*self.group_divider(points))
        return torch.cat([x[:, 0], x[:, 1 + self.cfg.num_prompts :].amax(1)], dim=-1)


def _init_weights(m: nn.Module) -> None:
    """Point-MAE's initialisation: truncated normal (std 0.02) weights, zero biases, unit LayerNorm."""
    if isinstance(m, (nn.Linear, nn.Conv1d)):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# --- checkpoints ------------------------------------------------------------------------------------
#: prefixes under which the official repositories keep the encoder, in order of preference:
#: Point-MAE pretraining (``MAE_encoder``), Point-BERT (``transformer_q``), ReCon/ACT-style wrappers
#: (``base_model``); a fine-tuned Point-MAE checkpoint keeps the encoder at the top level. A suite
#: Lightning checkpoint keeps it under ``state_dict`` -> ``backbone``.
ENCODER_PREFIXES = ("MAE_encoder.", "transformer_q.", "base_model.", "backbone.")
#: parameters a pretraining checkpoint does not have (Point-MAE pretrains without a class token)
OPTIONAL_KEYS = ("cls_token", "cls_pos", "prompt_tokens")


@dataclass
class LoadReport:
    """What :func:`load_point_mae` did: keys left at their initial values and keys not used."""

    source: str
    missing: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def encoder_state_from_checkpoint(raw: dict[str, Any], path: str | Path = "<checkpoint>") -> dict[str, Tensor]:
    """Extract the encoder's state dict from an official Point-MAE / Point-BERT checkpoint dict.

    Accepts ``{"base_model": sd}`` (the official ``save_checkpoint`` layout), ``{"model": sd}``,
    ``{"state_dict": sd}`` (a Lightning checkpoint) or a bare state dict; strips DataParallel's
    ``module.`` and the first encoder prefix present (``MAE_encoder.``, ``transformer_q.``,
    ``base_model.``, ``backbone.``).
    """
    state = raw
    for key in ("base_model", "model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"{path}: expected a Point-MAE checkpoint (a dict with 'base_model' -> state dict of tensors, "
            "or a bare state dict); found no tensor state dict"
        )
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    for prefix in ENCODER_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def load_point_mae(encoder: PointEncoder, path: str | Path) -> LoadReport:
    """Load a user's Point-MAE / Point-BERT checkpoint (``weights_only=True``) into ``encoder``.

    Keys outside the encoder (decoder, ``mask_token``, ``cls_head_finetune``, dVAE) are ignored
    and reported; a missing or mis-shaped encoder weight is an error naming the config field to
    change, because silently keeping random weights would fake a "pretrained" model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Point-MAE checkpoint {path} not found")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    return load_encoder_state(encoder, encoder_state_from_checkpoint(raw, path), str(path))


def load_encoder_state(encoder: PointEncoder, state: dict[str, Tensor], source: str) -> LoadReport:
    """Copy ``state`` (encoder key layout) into ``encoder`` with the checks of :func:`load_point_mae`."""
    own = encoder.state_dict()
    ignored = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state)
    required = [k for k in missing if k not in OPTIONAL_KEYS and not k.endswith("num_batches_tracked")]
    misshaped = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    extra_blocks = sorted({k.split(".")[2] for k in ignored if k.startswith("blocks.blocks.")}, key=int)
    if required or misshaped or extra_blocks:
        raise RuntimeError(
            f"{source} does not fit PointEncoder({encoder.cfg}):\n"
            f"  missing ({len(required)}): {required[:8]}\n  mis-shaped: {misshaped[:8]}\n"
            f"  blocks beyond depth {encoder.depth}: {extra_blocks}\n"
            "Set trans_dim / depth / num_heads / embed_hidden / encoder_dims to the checkpoint's values "
            "(Point-MAE: 384 / 12 / 6 / [128, 256] / null)."
        )
    encoder.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return LoadReport(source, missing, ignored)
