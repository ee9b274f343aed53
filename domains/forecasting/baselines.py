"""Cheap baselines trained from scratch in the same pipeline (same data, loss and metrics).

* :class:`DLinear` (Zeng et al., AAAI 2023): moving-average trend / remainder decomposition and
  one linear map over time for each, shared by all channels. No RevIN, as in the reference.
* :class:`PatchTST` (Nie et al., ICLR 2023), small: RevIN, patches 16/8, a learned position
  table, a 3-layer transformer encoder, flatten + linear head, all trained. The reference's
  ETTh1 setting is d_model 16, 4 heads, d_ff 128, dropout 0.3 (``PatchTST/42``).
  Deviation: LayerNorm (``nn.TransformerEncoderLayer``) instead of the reference's BatchNorm.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .model import ForecastModule, num_patches, patchify


def _no_adapter(model: str, kwargs: dict[str, Any]) -> None:
    if kwargs.get("adapter") is not None:
        raise ValueError(f"{model} trains from scratch and takes no adapter: set model.init_args.adapter: null")


class DLinear(ForecastModule):
    """Trend = moving average (kernel 25, edges replicated); forecast = Linear(trend) + Linear(rest)."""

    def __init__(self, lookback: int = 336, horizon: int = 96, kernel_size: int = 25, revin: bool = False, **kwargs: Any) -> None:
        _no_adapter("DLinear", kwargs)
        super().__init__(lookback=lookback, horizon=horizon, revin=revin, **kwargs)
        if kernel_size % 2 == 0:
            raise ValueError(f"DLinear kernel_size must be odd so the average is centred, got {kernel_size}")
        self.kernel_size = kernel_size
        self.trend = nn.Linear(lookback, horizon)
        self.seasonal = nn.Linear(lookback, horizon)
        for layer in (self.trend, self.seasonal):  # the reference initialises both to a plain average
            nn.init.constant_(layer.weight, 1.0 / lookback)
        self.load_init_from()

    def forecast(self, x: torch.Tensor) -> torch.Tensor:
        series = x.permute(0, 2, 1)  # [B, C, L]
        pad = (self.kernel_size - 1) // 2
        trend = F.avg_pool1d(F.pad(series, (pad, pad), mode="replicate"), self.kernel_size, stride=1)
        y = self.trend(trend) + self.seasonal(series - trend)
        return y.permute(0, 2, 1)


class PatchTST(ForecastModule):
    """Small channel-independent patch transformer trained from scratch."""

    def __init__(
        self,
        lookback: int = 336,
        horizon: int = 96,
        patch_len: int = 16,
        stride: int = 8,
        d_model: int = 16,
        n_heads: int = 4,
        n_layers: int = 3,
        d_ff: int = 128,
        dropout: float = 0.3,
        **kwargs: Any,
    ) -> None:
        _no_adapter("PatchTST", kwargs)
        super().__init__(lookback=lookback, horizon=horizon, **kwargs)
        self.patch_len, self.stride = patch_len, stride
        n = num_patches(lookback, patch_len, stride)
        self.patch_embed = nn.Linear(patch_len, d_model)
        self.patch_pos = nn.Parameter(torch.empty(n, d_model).uniform_(-0.02, 0.02))  # reference: learned, U(-0.02, 0.02)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, d_ff, dropout, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(n * d_model, horizon)
        self.load_init_from()

    def forecast(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        series = x.permute(0, 2, 1).reshape(b * c, -1)
        h = self.drop(self.patch_embed(patchify(series, self.patch_len, self.stride)) + self.patch_pos)
        y = self.head(self.encoder(h).flatten(1))
        return y.reshape(b, c, -1).permute(0, 2, 1)
