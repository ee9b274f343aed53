"""The shared adapter layer: one contract (``base.py``), one method per file.

    from suite.adapters import LoRA, inject, merge, unmerge, save_adapters, load_adapters, export_peft
    report = inject(model, LoRA(r=8, alpha=16, targets=["qkv", "proj"]))

Methods: :class:`LoRA` (rsLoRA, DoRA, q/k/v-selective; Linear, Conv2d, Embedding,
MultiheadAttention), :class:`MiCA`, :class:`CGLoRA` (needs :func:`init_adapters` with
calibration batches), :class:`FourierMoE`, and mixtures of experts (:class:`MixtureOfExperts`,
:class:`MoE`) with learned or label-masked routers and experts added later. See ``suite/adapters/README.md`` for the math.
"""

from __future__ import annotations

from .base import ALL_LINEAR, AdapterLayer, AdapterSpec, adapter_layers, matches_any, name_matches
from .lora import LoRA, LoRAConv2d, LoRAEmbedding, LoRALayer, LoRALinear, LoRAMultiheadAttention, LowRankDelta
from .mica import MiCA
from .curvature import CGLoRA, CGLoRALinear
from .fourier_moe import FourierMoE, FourierMoELinear
from .moe import FeedForward, LowRankExpert, MixtureOfExperts, MoE, MoELinear, route_labels, switch_balance_loss
from .core import (
    AdapterLoadError,
    AdapterReport,
    adapter_state_dict,
    init_adapters,
    inject,
    load_adapters,
    merge,
    parameter_report,
    save_adapters,
    spec_from_config,
    spec_to_config,
    unmerge,
)
from .export import export_peft

__all__ = [
    "ALL_LINEAR",
    "AdapterLayer",
    "AdapterLoadError",
    "AdapterReport",
    "AdapterSpec",
    "CGLoRA",
    "CGLoRALinear",
    "FourierMoE",
    "FeedForward",
    "FourierMoELinear",
    "LoRA",
    "LoRAConv2d",
    "LoRAEmbedding",
    "LoRALayer",
    "LoRALinear",
    "LoRAMultiheadAttention",
    "LowRankDelta",
    "LowRankExpert",
    "MiCA",
    "MixtureOfExperts",
    "MoE",
    "MoELinear",
    "adapter_layers",
    "adapter_state_dict",
    "export_peft",
    "init_adapters",
    "inject",
    "load_adapters",
    "matches_any",
    "merge",
    "name_matches",
    "parameter_report",
    "route_labels",
    "save_adapters",
    "spec_from_config",
    "spec_to_config",
    "switch_balance_loss",
    "unmerge",
]
