"""The trainable parts between the frozen SAM encoder and the HoVer-Net heads: HMF, the decoder and BGMR's boundary branch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import Tensor, nn


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
