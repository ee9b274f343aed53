"""MALA: multi-scale adaptive local-aware adapter for ViT blocks (nuclei domain).

A frozen ViT block sees a nucleus as a handful of tokens and mixes them by global or windowed
attention; what it lacks for nuclei is local, scale-dependent texture and shape. MALA adds, after
each encoder block, a bottleneck residual branch on the token grid:

    y = block(x)
    h = W_down y                                   (C -> r channels)
    h = mean_s  DWConv_{k_s}(h; sum_j a_sj(y) K_sj)  (depthwise, kernel sizes k_s = 3, 5, 7)
    out = y + W_up GELU(h)                         (W_up zero-initialised: starts as the block)

Each depthwise kernel is a per-image mixture of ``num_bases`` basis kernels (dynamic
convolution, Chen et al., CVPR 2020): the weights a_s(y) = softmax(router(mean-pooled h) / T)
depend on the image, so stain, magnification and nucleus size select their own filters.

It is an :class:`~suite.adapters.AdapterSpec`, so ``inject`` places it and freezes the encoder,
checkpoints keep its parameters, and a YAML chooses it or LoRA. It is not a weight delta
(``merge`` is not available).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from suite.adapters import AdapterLayer, AdapterSpec


@dataclass
class MALA(AdapterSpec):
    """MALA after every block matched by ``targets`` (default: every SAM encoder block).

    Args:
        r: bottleneck channels.
        kernel_sizes: depthwise kernel size of each scale.
        num_bases: basis kernels mixed per scale (dynamic convolution).
        temperature: softmax temperature of the mixture (higher: more uniform mixtures early on).
        scale: multiplier of the adapter's residual.
    """

    targets: list[str] = field(default_factory=lambda: [r"blocks\.\d+"])
    r: int = 32
    kernel_sizes: list[int] = field(default_factory=lambda: [3, 5, 7])
    num_bases: int = 4
    temperature: float = 4.0
    scale: float = 1.0

    method: ClassVar[str] = "mala"

    def __post_init__(self) -> None:
        if self.r < 1 or self.num_bases < 1:
            raise ValueError(f"MALA needs r >= 1 and num_bases >= 1, got r={self.r}, num_bases={self.num_bases}")
        if not self.kernel_sizes or any(k < 1 or k % 2 == 0 for k in self.kernel_sizes):
            raise ValueError(f"MALA kernel_sizes must be odd and positive, got {self.kernel_sizes}")

    def wrap(self, name: str, layer: nn.Module) -> AdapterLayer:
        norm = getattr(layer, "norm1", None)
        if not isinstance(norm, nn.LayerNorm):
            raise TypeError(
                f"MALA wraps ViT blocks with a LayerNorm `norm1` (SAM/timm Block); {name!r} is a {type(layer).__name__}. "
                r"Use targets like 'blocks\.\d+'."
            )
        return MALABlock(layer, self, dim=norm.normalized_shape[0])


class DynamicDepthwiseConv(nn.Module):
    """Depthwise convolution whose kernel is a per-sample softmax mixture of basis kernels."""

    def __init__(self, channels: int, kernel_size: int, num_bases: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.bases = nn.Parameter(torch.empty(num_bases, channels, 1, kernel_size, kernel_size))
        for j in range(num_bases):  # each basis initialised like an nn.Conv2d depthwise kernel
            nn.init.kaiming_uniform_(self.bases[j], a=5**0.5)

    def forward(self, h: Tensor, mix: Tensor) -> Tensor:
        """h: (B, C, H, W); mix: (B, num_bases) mixture weights."""
        b, c, hh, ww = h.shape
        kernels = torch.einsum("bj,jcokl->bcokl", mix, self.bases).reshape(b * c, 1, self.kernel_size, self.kernel_size)
        # batch folded into groups: one grouped conv applies every sample's own kernels
        out = F.conv2d(h.reshape(1, b * c, hh, ww), kernels, padding=self.kernel_size // 2, groups=b * c)
        return out.view(b, c, hh, ww)


class MALABlock(AdapterLayer):
    """A frozen ViT block followed by the MALA residual branch (tokens as (B, H, W, C))."""

    def __init__(self, base_layer: nn.Module, spec: MALA, dim: int) -> None:
        super().__init__(base_layer, spec)
        self.down = nn.Linear(dim, spec.r)
        self.convs = nn.ModuleList(DynamicDepthwiseConv(spec.r, k, spec.num_bases) for k in spec.kernel_sizes)
        self.router = nn.Linear(spec.r, len(spec.kernel_sizes) * spec.num_bases)
        nn.init.zeros_(self.router.weight)  # uniform mixtures at the start
        nn.init.zeros_(self.router.bias)
        self.up = nn.Linear(spec.r, dim)
        nn.init.zeros_(self.up.weight)  # the adapted block starts as the frozen block
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        h = self.down(y).permute(0, 3, 1, 2)  # (B, r, H, W)
        logits = self.router(h.mean(dim=(2, 3))).view(h.shape[0], len(self.convs), -1)
        mix = torch.softmax(logits / self.spec.temperature, dim=-1)
        h = torch.stack([conv(h, mix[:, s]) for s, conv in enumerate(self.convs)]).mean(0)
        return y + self.spec.scale * self.up(F.gelu(h).permute(0, 2, 3, 1))
