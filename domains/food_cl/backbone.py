"""The frozen timm ViT of the food domain and the checkpoints it loads.

:func:`build_vit` makes a timm ``VisionTransformer`` without classifier (``num_classes=0``): its
output is the class token after the final LayerNorm, the feature DIME's prototypes and cosine
heads use. The default is CPU-sized (``vit_tiny_patch16_224`` with 32-px inputs, 8-px patches and
6 blocks, see ``domains/food_cl.yaml``); DIME's own backbone is
``timm.create_model("vit_base_patch16_224.augreg_in21k")``, reachable with ``backbone_kwargs: {}``
and ``img_size: 224``.

:func:`read_state_dict` reads a user's checkpoint without unpickling (safetensors, or
``torch.load(weights_only=True)``), unwrapping the usual nesting (``state_dict`` / ``model`` /
``module`` / ``backbone.`` prefixes); :func:`load_backbone_state` loads it into a backbone whose
MLPs may carry adapters (``blocks.0.mlp.fc1.weight`` is the adapted layer's
``blocks.0.mlp.base_layer.fc1.weight``). A classifier head in the file (``head.*``, e.g. the
21,843 in21k classes) is ignored and reported; any other missing, unexpected or mis-shaped key is a
:class:`suite.module.CheckpointMismatchError` that lists them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from suite.module import CheckpointMismatchError

#: keys of a timm ViT checkpoint that belong to its classifier, not to the feature extractor
HEAD_PREFIXES = ("head.", "head_dist.")
_NESTING = ("state_dict", "model", "module", "model_ema")
_PREFIXES = ("module.", "model.", "backbone.", "encoder.")


def build_vit(name: str = "vit_tiny_patch16_224", img_size: int = 32, **kwargs: Any) -> nn.Module:
    """A randomly initialised timm ViT feature extractor (no classifier); ``kwargs`` override the
    named configuration (``patch_size``, ``depth``, ``embed_dim``, ``num_heads``, ...)."""
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size, **kwargs)
    if not hasattr(model, "blocks") or not hasattr(model, "num_features"):
        raise ValueError(f"backbone {name!r} is not a timm VisionTransformer (no .blocks / .num_features); DIME adapts ViT blocks")
    return model


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a checkpoint file (``.safetensors`` or a torch file read with ``weights_only``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    elif path.suffix == ".npz":
        raise CheckpointMismatchError(f"{path}: JAX .npz checkpoints are not read here; load it once with "
                                      "timm.create_model(..., pretrained_cfg_overlay=dict(file=...)) and save its state_dict")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in _NESTING:  # {"state_dict": {...}} and similar wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict) and not isinstance(state.get(key), Tensor):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointMismatchError(f"{path}: expected a state dict of tensors (a timm ViT's state_dict or safetensors file)")
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _unwrapped(key: str) -> str:
    return key.replace(".base_layer.", ".")


#: tensors an AdaptFormer layer adds beside the MLP it wraps (trained and merged adapters)
_ADAPTER_TENSOR = re.compile(r"\.(down|up)\.(weight|bias)$|\.merged_(down|up)_(weight|bias)$")


def load_backbone_state(backbone: nn.Module, state: dict[str, Tensor], source: str) -> list[str]:
    """Load ``state`` (a plain or adapted ViT's keys) into ``backbone``'s base weights; returns the ignored head keys.

    Only base weights move: adapter tensors (trained and merged) are neither expected in ``state``
    nor taken from it.
    """
    own_state = backbone.state_dict()
    own = {_unwrapped(k): k for k in own_state if not _ADAPTER_TENSOR.search(k)}
    theirs = {_unwrapped(k): v for k, v in state.items() if not _ADAPTER_TENSOR.search(k)}
    ignored = sorted(k for k in theirs if k.startswith(HEAD_PREFIXES) and k not in own)
    unexpected = sorted(k for k in theirs if k not in own and k not in ignored)
    missing = sorted(k for k in own if k not in theirs)
    misshaped = sorted(f"{k}: checkpoint {tuple(theirs[k].shape)}, model {tuple(own_state[own[k]].shape)}"
                       for k in own if k in theirs and theirs[k].shape != own_state[own[k]].shape)
    if missing or unexpected or misshaped:
        lines = [f"{source} does not fit this backbone (set backbone, img_size and backbone_kwargs to the checkpoint's "
                 "architecture: a vit_base_patch16_224 checkpoint needs backbone_kwargs {} and img_size 224)"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if keys:
                lines.append(f"  {label} keys ({len(keys)}): " + ", ".join(keys[:12]) + (" ..." if len(keys) > 12 else ""))
        raise CheckpointMismatchError("\n".join(lines))
    with torch.no_grad():
        for k, target in own.items():
            own_state[target].copy_(theirs[k].to(own_state[target].dtype))
    return ignored
