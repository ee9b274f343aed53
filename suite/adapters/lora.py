"""LoRA (Hu et al., 2021, arXiv 2106.09685) with rank-stabilised scaling (rsLoRA, Kalajdzievski,
2023, arXiv 2312.03732).

``y = W x + s * B A dropout(x)`` with ``s = alpha / r`` (or ``alpha / sqrt(r)`` when ``rslora``).
``A`` starts Kaiming-uniform and ``B`` at zero, as in Hugging Face PEFT, so an injected model
computes exactly what the base model computes.

Fused projections: timm and SAM compute q, k and v with one ``qkv`` Linear. ``qkv=("q", "v")``
adapts only those row slices, each with its own rank-``r`` pair, which is what the original
LoRA paper did to ``W_q`` and ``W_v``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLayer, AdapterSpec

_QKV_INDEX = {"q": 0, "k": 1, "v": 2}


@dataclass
class LoRA(AdapterSpec):
    """Low-rank update ``s * B A`` on Linear layers.

    Args:
        r: rank of the update.
        alpha: scale numerator; ``s = alpha / r`` (``alpha / sqrt(r)`` with ``rslora``).
        dropout: dropout on the adapter input only.
        rslora: rank-stabilised scaling.
        qkv: for a fused ``qkv`` Linear (out = 3 * dim), the slices to adapt, e.g. ``["q", "v"]``.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    qkv: list[str] | None = None

    method: ClassVar[str] = "lora"
    peft_exportable: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if self.qkv is not None:
            bad = [s for s in self.qkv if s not in _QKV_INDEX]
            if bad or not self.qkv:
                raise ValueError(f"LoRA qkv must be a non-empty subset of ['q', 'k', 'v'], got {self.qkv}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def wrap(self, name: str, layer: nn.Module) -> AdapterLayer:
        if isinstance(layer, nn.Linear):
            return LoRALinear(layer, self)
        raise TypeError(
            f"LoRA cannot adapt {name!r} of type {type(layer).__name__}; "
            "supported: nn.Linear. Narrow `targets` or add it to `exclude`."
        )


class LoRALinear(AdapterLayer):
    """LoRA on an ``nn.Linear``, optionally restricted to q/k/v row slices of a fused projection.

    ``lora_A`` is ``(S*r, in)`` and ``lora_B`` is ``(S, out/S_all, r)`` for ``S`` adapted
    slices; without ``qkv`` there is one slice spanning all output rows.
    """

    def __init__(self, base_layer: nn.Linear, spec: LoRA) -> None:
        super().__init__(base_layer, spec)
        d_out, d_in = base_layer.weight.shape
        if spec.qkv is None:
            self.slices = [0]
            self.n_chunks = 1
        else:
            if d_out % 3:
                raise ValueError(f"qkv-selective LoRA needs a fused projection with 3*dim outputs, got {d_out}")
            self.slices = sorted(_QKV_INDEX[s] for s in spec.qkv)
            self.n_chunks = 3
        self.chunk = d_out // self.n_chunks
        s, r = len(self.slices), spec.r
        w = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(s * r, d_in, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(s, self.chunk, r, dtype=w.dtype, device=w.device))
        for i in range(s):  # PEFT's init, per slice: kaiming_uniform(a=sqrt(5)) on A, zeros on B
            nn.init.kaiming_uniform_(self.lora_A[i * r : (i + 1) * r], a=math.sqrt(5))
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.scaling = spec.scaling

    def delta_weight(self) -> torch.Tensor:
        r = self.spec.r
        a = self.lora_A.view(len(self.slices), r, -1)
        pieces = torch.bmm(self.lora_B, a) * self.scaling  # (S, chunk, in)
        if self.n_chunks == 1:
            return pieces[0]
        delta = pieces.new_zeros(self.n_chunks, self.chunk, a.shape[-1])
        delta[self.slices] = pieces
        return delta.flatten(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        h = F.linear(self.dropout(x), self.lora_A)
        if self.n_chunks == 1:
            return out + F.linear(h, self.lora_B[0]) * self.scaling
        h = h.unflatten(-1, (len(self.slices), self.spec.r))  # (..., S, r)
        y = torch.einsum("...sr,sdr->...sd", h, self.lora_B) * self.scaling
        full = y.new_zeros(*y.shape[:-2], self.n_chunks, self.chunk)
        full[..., self.slices, :] = y
        return out + full.flatten(-2)
