"""The shared adapter layer: one contract (``base.py``), one method per file.

    from suite.adapters import LoRA, inject, merge, unmerge, save_adapters, load_adapters
    report = inject(model, LoRA(r=8, alpha=16, targets=["qkv", "proj"]))
"""

from __future__ import annotations

from .base import AdapterLayer, AdapterSpec, adapter_layers, matches_any, name_matches
from .lora import LoRA, LoRALinear
from .core import (
    AdapterLoadError,
    AdapterReport,
    adapter_state_dict,
    inject,
    load_adapters,
    merge,
    parameter_report,
    save_adapters,
    spec_from_dict,
    unmerge,
)

__all__ = [
    "AdapterLayer",
    "AdapterLoadError",
    "AdapterReport",
    "AdapterSpec",
    "LoRA",
    "LoRALinear",
    "adapter_layers",
    "adapter_state_dict",
    "inject",
    "load_adapters",
    "matches_any",
    "merge",
    "name_matches",
    "parameter_report",
    "save_adapters",
    "spec_from_dict",
    "unmerge",
]
