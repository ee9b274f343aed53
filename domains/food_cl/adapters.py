"""DIME's pieces around a frozen ViT: a parallel FFN adapter per block, cosine heads, Balanced Softmax.

**AdaptFormer adapter** (Chen et al., NeurIPS 2022, as DIME configures it: ``ffn_option=parallel``,
``ffn_adapter_init_option=lora``, ``ffn_adapter_scalar=0.1``, ``ffn_num=64``, dropout 0.1, no
adapter LayerNorm). Beside each block's MLP:

    mlp'(x) = mlp(x) + 0.1 * W_up dropout(ReLU(W_down x + b_down)) + 0.1 * b_up

W_down (d -> 64) is Kaiming-uniform initialised like ``nn.Linear`` (a = sqrt(5)); W_up, b_down and
b_up start at zero, so an injected model starts exactly as the frozen one.

Each adapted layer holds two adapters with the same shapes: the *trained* one (parameters, a
fresh stack per task) and the *merged* one (persistent buffers, so checkpoints carry it; zero
until a merge writes it). ``branch`` selects which one the forward pass adds ("trained", "merged"
or "none", the bare backbone). :func:`adapter_stack` / :func:`load_adapter_stack` move a whole
stack between the two as ``{"<layer>.down.weight": tensor, ...}`` dicts, the form ``merge.py`` takes.

Deviation from the reference: it feeds the adapter the block's residual stream before ``norm2``;
wrapping timm's ``mlp`` feeds it ``norm2(x)``, the shared LayerNorm of the AdaptFormer paper's
equation, so the suite's ``inject`` places it on any timm ViT. (The sum then passes timm's
``ls2`` / ``drop_path2``, identities in the ViTs DIME uses.)
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from suite.adapters import AdapterLayer, AdapterSpec, adapter_layers

Branch = Literal["trained", "merged", "none"]
#: the tensors of one adapter, in the order of its forward pass
ADAPTER_KEYS = ("down.weight", "down.bias", "up.weight", "up.bias")


@dataclass
class AdaptFormer(AdapterSpec):
    """A parallel bottleneck adapter beside every MLP matched by ``targets`` (timm: ``blocks.<i>.mlp``).

    Args:
        bottleneck: hidden width (DIME's ``ffn_num``).
        dropout: on the hidden activation, in training only.
        scale: multiplier of the adapter's output (DIME's ``ffn_adapter_scalar``).
    """

    targets: list[str] = field(default_factory=lambda: [r"blocks\.\d+\.mlp"])
    bottleneck: int = 64
    dropout: float = 0.1
    scale: float = 0.1

    method: ClassVar[str] = "adaptformer"

    def __post_init__(self) -> None:
        if self.bottleneck < 1 or not 0 <= self.dropout < 1:
            raise ValueError(f"AdaptFormer needs bottleneck >= 1 and 0 <= dropout < 1, got {self.bottleneck}, {self.dropout}")

    def wrap(self, name: str, layer: nn.Module) -> AdapterLayer:
        fc1, fc2 = getattr(layer, "fc1", None), getattr(layer, "fc2", None)
        if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)):
            raise TypeError(
                f"AdaptFormer wraps a transformer MLP with Linear fc1/fc2 (timm's Mlp); {name!r} is a {type(layer).__name__}. "
                r"Use targets like 'blocks\.\d+\.mlp'."
            )
        return ParallelAdapter(layer, self, fc1.in_features, fc2.out_features)


class ParallelAdapter(AdapterLayer):
    """A frozen MLP plus a trained and a merged bottleneck adapter (see the module docstring)."""

    def __init__(self, base_layer: nn.Module, spec: AdaptFormer, in_features: int, out_features: int) -> None:
        super().__init__(base_layer, spec)
        self.down = nn.Linear(in_features, spec.bottleneck)
        self.up = nn.Linear(spec.bottleneck, out_features)
        for key, p in self.trained_tensors().items():
            self.register_buffer("merged_" + key.replace(".", "_"), torch.zeros_like(p.detach()))
        self.branch: Branch = "trained"
        self.reset_trained()

    @torch.no_grad()
    def reset_trained(self, generator: torch.Generator | None = None) -> None:
        """A fresh adapter: Kaiming-uniform W_down (as nn.Linear, a = sqrt(5)), zero W_up and biases."""
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)
        for t in (self.down.bias, self.up.weight, self.up.bias):
            t.zero_()

    def trained_tensors(self) -> dict[str, Tensor]:
        return {"down.weight": self.down.weight, "down.bias": self.down.bias,
                "up.weight": self.up.weight, "up.bias": self.up.bias}

    def merged_tensors(self) -> dict[str, Tensor]:
        return {key: getattr(self, "merged_" + key.replace(".", "_")) for key in ADAPTER_KEYS}

    def tensors(self, branch: Literal["trained", "merged"]) -> dict[str, Tensor]:
        return self.trained_tensors() if branch == "trained" else self.merged_tensors()

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if self.branch == "none":
            return y
        w = self.tensors(self.branch)
        h = F.relu(F.linear(x, w["down.weight"], w["down.bias"]))
        h = F.dropout(h, self.spec.dropout, self.training and self.branch == "trained")
        return y + self.spec.scale * F.linear(h, w["up.weight"], w["up.bias"])

    def extra_repr(self) -> str:
        return f"bottleneck={self.spec.bottleneck}, scale={self.spec.scale}, branch={self.branch}"


def parallel_adapters(model: nn.Module) -> list[tuple[str, ParallelAdapter]]:
    """(name, layer) of every :class:`ParallelAdapter` in ``model``, in module order."""
    return [(n, m) for n, m in adapter_layers(model) if isinstance(m, ParallelAdapter)]


def adapter_stack(model: nn.Module, branch: Literal["trained", "merged"] = "trained") -> dict[str, Tensor]:
    """Detached copies of one adapter stack, keyed ``"<layer>.<down|up>.<weight|bias>"``."""
    layers = parallel_adapters(model)
    if not layers:
        raise ValueError("the model has no AdaptFormer adapters; inject(model, AdaptFormer()) first")
    return {f"{name}.{k}": _full(t).detach().clone() for name, layer in layers for k, t in layer.tensors(branch).items()}


def _full(t: Tensor) -> Tensor:
    """The whole tensor of a parameter that FSDP2 shards (a DTensor); any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@torch.no_grad()
def load_adapter_stack(model: nn.Module, stack: dict[str, Tensor], branch: Literal["trained", "merged"]) -> None:
    """Write a stack (from :func:`adapter_stack` or a merge) into ``branch``; keys and shapes must match."""
    own = {f"{name}.{k}": t for name, layer in parallel_adapters(model) for k, t in layer.tensors(branch).items()}
    missing, unexpected = sorted(set(own) - set(stack)), sorted(set(stack) - set(own))
    misshaped = sorted(f"{k}: given {tuple(stack[k].shape)}, model {tuple(own[k].shape)}"
                       for k in set(own) & set(stack) if stack[k].shape != own[k].shape)
    if missing or unexpected or misshaped:
        raise ValueError(f"adapter stack does not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}, "
                         f"mis-shaped {misshaped[:4]}")
    for k, t in own.items():
        value = stack[k].to(device=t.device, dtype=t.dtype)
        if hasattr(t, "device_mesh"):  # a parameter sharded by FSDP2: copy in this rank's shard
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(value, t.device_mesh, t.placements)
        t.copy_(value)


def set_branch(model: nn.Module, branch: Branch) -> None:
    """Make every adapter layer of ``model`` add the ``branch`` adapter (or none)."""
    for _, layer in parallel_adapters(model):
        layer.branch = branch


@contextmanager
def using_branch(model: nn.Module, branch: Branch) -> Iterator[None]:
    """Temporarily :func:`set_branch` (e.g. merged adapters while computing prototypes)."""
    before = [(layer, layer.branch) for _, layer in parallel_adapters(model)]
    set_branch(model, branch)
    try:
        yield
    finally:
        for layer, b in before:
            layer.branch = b


@torch.no_grad()
def reset_trained(model: nn.Module, seed: int | None = None) -> None:
    """A fresh trained stack for a new task (seeded, so every task can start from the same draw)."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    for _, layer in parallel_adapters(model):
        layer.reset_trained(generator)


# ------------------------------------------------------------------------------------------------
class CosineClassifier(nn.Module):
    """logits = s * cos(x, w_c), with a learnable scale s (the reference's ``CosineLinear``, sigma = 1 at start)."""

    def __init__(self, in_features: int, num_classes: int, scale: float = 1.0, learn_scale: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.uniform_(self.weight, -1 / math.sqrt(in_features), 1 / math.sqrt(in_features))
        # shape (1,), not a scalar: FSDP2's fully_shard refuses 0-d parameters
        if learn_scale:
            self.scale = nn.Parameter(torch.tensor([float(scale)]))
        else:  # a buffer, so a checkpoint (which drops frozen parameters) still holds it
            self.register_buffer("scale", torch.tensor([float(scale)]))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1))


class PrototypeClassifier(nn.Module):
    """A cosine classifier over every class whose weights are class-mean features (persistent buffers).

    Classes without a prototype yet get -inf logits, so predictions range over the seen classes.
    ``scale`` multiplies the cosines (1 in the reference, where it is copied from the untrained
    global head; it changes losses, not predictions).
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.register_buffer("prototypes", torch.zeros(num_classes, in_features))
        self.register_buffer("filled", torch.zeros(num_classes, dtype=torch.bool))

    @torch.no_grad()
    def write(self, features: Tensor, labels: Tensor) -> list[int]:
        """Set the prototype of every class present in ``labels`` to its mean feature; returns those classes."""
        classes = torch.unique(labels)
        for c in classes.tolist():
            self.prototypes[c] = features[labels == c].mean(0).to(self.prototypes)
            self.filled[c] = True
        return classes.tolist()

    def forward(self, x: Tensor) -> Tensor:
        logits = self.scale * F.linear(F.normalize(x, dim=-1), F.normalize(self.prototypes, dim=-1))
        return logits.masked_fill(~self.filled, float("-inf"))


def balanced_softmax_loss(logits: Tensor, targets: Tensor, class_counts: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of logits + log n_c (Ren et al., Balanced Meta-Softmax, NeurIPS 2020).

    Adding the log prior during training makes the unshifted logits estimate a balanced posterior,
    so frequent classes stop winning by count alone. Counts below 1 are clamped to 1, as the
    reference does. (No library ships it: torch, torchmetrics and timm have plain or
    label-smoothed cross-entropy only.)
    """
    if class_counts.shape != logits.shape[-1:]:
        raise ValueError(f"class_counts has shape {tuple(class_counts.shape)}, expected ({logits.shape[-1]},) for these logits")
    prior = class_counts.to(logits).clamp_min(1).log()
    return F.cross_entropy(logits + prior, targets, reduction=reduction)
