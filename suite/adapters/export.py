"""Export the LoRA family in the Hugging Face PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``).

``peft.PeftModel.from_pretrained(base, path)`` then reproduces our outputs (tested to atol 1e-5
against PEFT 0.21). Module names are relative to the ``model`` passed in, so load into the same
kind of object (e.g. export ``module.backbone`` and load into a fresh backbone).

How each method maps onto a plain PEFT ``LoraConfig``:

- Every layer's factors are written as ``s * B_full @ A_full`` (:meth:`LowRankDelta.factors`),
  with a per-layer ``rank_pattern`` (the exported rank) and ``alpha_pattern`` (``alpha' = s * r'``,
  or ``s * sqrt(r')`` when every layer uses rsLoRA), so mixed ranks, scalings and stacked specs
  export exactly.
- q/k/v-selective LoRA on ``S`` slices of rank ``r`` becomes one rank-``S*r`` LoRA whose ``B`` is
  block-structured: the columns of slice ``i`` are zero outside that slice's rows. The product is
  the same matrix, so PEFT computes the same output.
- DoRA: ``use_dora=True`` plus ``lora_magnitude_vector``; DoRA and non-DoRA layers cannot be mixed.
- MiCA is LoRA-shaped: written with ``init_lora_weights="mica"`` when every layer is a Linear or
  Embedding (PEFT 0.21 implements MiCA there and keeps ``B`` frozen; the values come from the
  file, not a new SVD), else as plain LoRA weights.
- CG-LoRA with ``shift``: ``s (B A - B0 A0)`` is the rank-``2r`` LoRA ``[B, -B0] [A; A0]``; the
  base weights stay untouched (PEFT's own LoRA-GA instead rewrites them).
- ``nn.MultiheadAttention``: PEFT's ``MultiheadAttention`` LoRA (``lora_A/B`` on ``in_proj`` plus
  ``base_layer.out_proj.lora_A/B``); both share one rank there, so the smaller pair is zero-padded.
  Known PEFT bug (0.21.2; fix proposed in huggingface/peft PR 3774): its MultiheadAttention
  ``merge()``, used by every unmerged forward, adds the ``out_proj`` delta twice. We write the
  correct tensors; PEFT's per-layer deltas equal ours, but its forward uses ``W_out + 2 dW_out``.
- Conv2d: PEFT's LoRA conv ignores dilation and ``padding_mode``, so such convs are refused.

FourierMoE (token-routed spectral experts) has no PEFT LoRA form; exporting it raises.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .base import AdapterLayer, adapter_layers
from .core import _RECORD, _saved_modules
from .lora import LoRAConv2d, LoRAEmbedding, LoRALayer, LoRAMultiheadAttention

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def export_peft(model: nn.Module, path: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write ``model``'s LoRA-family adapters (and ``modules_to_save``) as a PEFT LoRA adapter folder."""
    if not getattr(model, _RECORD, None):
        raise ValueError("the model has no injected adapters to export; call suite.adapters.inject first")
    layers = list(adapter_layers(model))
    refused = [f"{n} ({l.spec.method})" for n, l in layers if not l.spec.peft_exportable or not isinstance(l, (LoRALayer, LoRAMultiheadAttention))]
    if refused:
        raise ValueError(
            "PEFT's LoRA format cannot represent these adapter layers: " + ", ".join(refused[:8])
            + ". Only the LoRA family (LoRA, rsLoRA, DoRA, q/k/v-selective, MiCA, CG-LoRA) exports; "
            "use suite.adapters.save_adapters for the others."
        )
    dora = {bool(l.spec.dora) for _, l in layers}
    if len(dora) > 1:
        raise ValueError("PEFT applies DoRA to all layers of an adapter or none; this model mixes DoRA and plain LoRA layers")
    rslora = all(l.spec.rslora for _, l in layers)
    state: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for name, layer in layers:
        rank, scaling = _export_layer(name, layer, state)
        key = re.escape(name)
        rank_pattern[key] = rank
        alpha_pattern[key] = scaling * (rank**0.5 if rslora else rank)
    saved = _saved_modules(model)
    for name in saved:
        for k, v in model.get_submodule(name).state_dict().items():
            state[f"{_PREFIX}{name}.{k}"] = v
    first = next(iter(rank_pattern))
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": rank_pattern[first],
        "lora_alpha": alpha_pattern[first],
        "lora_dropout": max(float(l.spec.dropout) for _, l in layers),
        "target_modules": "(?:" + "|".join(re.escape(n) for n, _ in layers) + ")",
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": rslora,
        "use_dora": dora.pop(),
        "init_lora_weights": "mica" if all(_peft_mica(l) for _, l in layers) else True,
        "modules_to_save": saved or None,
        "bias": "none",
        "fan_in_fan_out": False,
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path / PEFT_WEIGHTS), metadata={"format": "pt"})
    (path / PEFT_CONFIG).write_text(json.dumps(config, indent=2))
    return path


@torch.no_grad()
def _export_layer(name: str, layer: AdapterLayer, state: dict[str, torch.Tensor]) -> tuple[int, float]:
    """Add one layer's tensors under PEFT's key names; return (exported rank, scaling)."""
    p = f"{_PREFIX}{name}."
    if isinstance(layer, LoRAMultiheadAttention):
        (B_in, A_in), (B_out, A_out) = layer.lora_in.factors(), layer.lora_out.factors()
        rank = max(A_in.shape[0], A_out.shape[0])
        for prefix, B, A in ((p, B_in, A_in), (p + "base_layer.out_proj.", B_out, A_out)):
            state[prefix + "lora_A.weight"] = _pad_rows(A, rank)
            state[prefix + "lora_B.weight"] = _pad_rows(B.T, rank).T
        return rank, layer.lora_in.scaling
    B, A = layer.lora.factors()
    rank = A.shape[0]
    if isinstance(layer, LoRAEmbedding):
        state[p + "lora_embedding_A"] = A
        state[p + "lora_embedding_B"] = B
    elif isinstance(layer, LoRAConv2d):
        conv = layer.base_layer
        if tuple(conv.dilation) != (1, 1) or conv.padding_mode != "zeros":
            raise ValueError(
                f"{name!r}: PEFT's LoRA conv ignores dilation={conv.dilation} / padding_mode={conv.padding_mode!r}, so it "
                "would not reproduce this adapter; exclude the layer or use save_adapters"
            )
        state[p + "lora_A.weight"] = A.view(rank, *conv.weight.shape[1:])
        state[p + "lora_B.weight"] = B[:, :, None, None]
    else:
        state[p + "lora_A.weight"] = A
        state[p + "lora_B.weight"] = B
    if layer.spec.dora:
        m = layer.magnitude
        state[p + "lora_magnitude_vector"] = m.view(1, -1, 1, 1) if isinstance(layer, LoRAConv2d) else m
    return rank, layer.lora.scaling


def _peft_mica(layer: AdapterLayer) -> bool:
    """PEFT 0.21 implements MiCA on Linear and Embedding only; elsewhere the weights alone carry it."""
    return layer.spec.init_scheme == "mica" and isinstance(layer, LoRALayer) and not isinstance(layer, LoRAConv2d)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if t.shape[0] < rows else t
