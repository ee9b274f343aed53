"""The food network: the frozen timm ViT (and the checkpoints it loads), DIME's pieces around it (a parallel
FFN adapter per block, cosine heads, Balanced Softmax), and the merges of adapter stacks after each task
(sections below).

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
stack between the two as ``{"<layer>.down.weight": tensor, ...}`` dicts, the form ``adapters.py`` takes.

Deviation from the reference: it feeds the adapter the block's residual stream before ``norm2``;
wrapping timm's ``mlp`` feeds it ``norm2(x)``, the shared LayerNorm of the AdaptFormer paper's
equation, so the suite's ``inject`` places it on any timm ViT. (The sum then passes timm's
``ls2`` / ``drop_path2``, identities in the ViTs DIME uses.)
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from suite.adapters import AdapterLayer, AdapterSpec, adapter_layers
from suite.module import CheckpointMismatchError

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


# --------------------------------------------------------------------------------------------------
# The frozen timm ViT of the food domain and the checkpoints it loads.
#
# :func:`build_vit` makes a timm ``VisionTransformer`` without classifier (``num_classes=0``): its
# output is the class token after the final LayerNorm, the feature DIME's prototypes and cosine
# heads use. The default is CPU-sized (``vit_tiny_patch16_224`` with 32-px inputs, 8-px patches and
# 6 blocks, see ``domains/food_cl.yaml``); DIME's own backbone is
# ``timm.create_model("vit_base_patch16_224.augreg_in21k")``, reachable with ``backbone_kwargs: {}``
# and ``img_size: 224``.
#
# :func:`read_state_dict` reads a user's checkpoint without unpickling (safetensors, or
# ``torch.load(weights_only=True)``), unwrapping the usual nesting (``state_dict`` / ``model`` /
# ``module`` / ``backbone.`` prefixes); :func:`load_backbone_state` loads it into a backbone whose
# MLPs may carry adapters (``blocks.0.mlp.fc1.weight`` is the adapted layer's
# ``blocks.0.mlp.base_layer.fc1.weight``). A classifier head in the file (``head.*``, e.g. the
# 21,843 in21k classes) is ignored and reported; any other missing, unexpected or mis-shaped key is a
# :class:`suite.module.CheckpointMismatchError` that lists them.


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


# --------------------------------------------------------------------------------------------------
# Adapter merges after each task: DIME's spectral merge and the baselines' averaging and TIES.
#
# Every function is pure: it takes adapter stacks as ``{name: tensor}`` dicts (the form
# ``adapters.adapter_stack`` returns) and returns a new dict, so the model can keep the merged
# stack in buffers and checkpoints carry it.
#
# **DIME** (class-count aware spectral merging with rank-wise threshold modulation), per tensor.
# Reshape both tensors to matrices as stored (a Linear weight is (out, in); a bias is (1, n)),
# take the joint SVD X = [M_dst | M_src] = U S V^T and split V^T's columns into V_dst^T, V_src^T
# (so M_dst = U S V_dst^T and M_src = U S V_src^T). The reference blends the dst part of V^T toward
# the src part, w_dst V_dst^T + w_src V_src^T (w_dst + w_src = 1), scales the move of direction k
# by rho_k (rho_head for the first round(rho_frac * r) of the r directions, at least 1 and at most
# r - 1; rho_tail for the rest) and rebuilds U S (.). What it computes is exactly
#
#     M = M_dst + w_src * sum_k rho_k s_k u_k (v_src,k - v_dst,k)^T
#       = M_dst + w_src * (rho_head P_head + rho_tail (I - P_head)) (M_src - M_dst),
#
# with P_head = U_head U_head^T the projector onto the dominant left-singular directions of X:
# the difference between the adapters moves the anchor by w_src * rho_head inside the joint
# matrix's dominant subspace (0.2: the dominant knowledge stays) and by w_src * rho_tail outside
# it (0.9: small tasks still leave their mark). With rho_head = rho_tail = rho it is the linear
# interpolation M_dst + rho w_src (M_src - M_dst). The anchor (dst) is the side with more classes:
# the merged stack when C_old > C_new, else the new adapter. We compute the second form from
# M_dst itself (the reference rebuilds M_dst from U S V_dst^T, which only adds round-off), in
# float64.
#
# **Fixed reference bug: inverted class-count weights.** The reference always uses
# w_src = C_new / (C_old + C_new), also when the new adapter is the anchor and the merged stack is
# the src, so whenever the new task has at least as many classes as all earlier ones, the new task
# gets the old classes' share and vice versa (with rho = 1 the result would be
# C_old/C * M_new + C_new/C * M_old). ``weights="own"`` (default) gives the src its own share
# (C_old / C when the merged stack is the src); ``weights="reference"`` keeps the reference's
# behaviour for comparison. Both agree when the merged stack is the anchor (C_old > C_new).


Weights = Literal["own", "reference"]


def _as_matrix(t: Tensor) -> Tensor:
    """The reference's 2-D view: scalar -> (1, 1), vector -> (1, n), matrix as is, more dims -> (d0, -1)."""
    return t.reshape(1, -1) if t.dim() < 2 else t.reshape(t.shape[0], -1)


def head_rank(r: int, rho_frac: float) -> int:
    """Directions moved by rho_head: round(rho_frac * r) clamped to [1, r - 1] (all of them when r = 1)."""
    return int(max(1, min(r - 1, round(rho_frac * r))))


def spectral_merge(dst: Tensor, src: Tensor, w_src: float, rho_frac: float = 0.6, rho_head: float = 0.2,
                   rho_tail: float = 0.9) -> Tensor:
    """DIME's merge of one tensor: ``dst`` moved toward ``src`` by ``w_src`` and rank-wise rho (module docstring)."""
    if dst.shape != src.shape:
        raise ValueError(f"spectral_merge needs tensors of one shape, got {tuple(dst.shape)} and {tuple(src.shape)}")
    m_dst, m_src = _as_matrix(dst).double(), _as_matrix(src).double()
    u, s, vh = torch.linalg.svd(torch.cat([m_dst, m_src], dim=1), full_matrices=False)
    c = m_dst.shape[1]
    rho = torch.full_like(s, rho_tail)
    rho[: head_rank(len(s), rho_frac)] = rho_head
    moved = m_dst + w_src * (u * (rho * s)) @ (vh[:, c:] - vh[:, :c])
    return moved.reshape(dst.shape).to(dst.dtype)


def _check_stacks(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> None:
    if set(a) != set(b):
        raise ValueError(f"adapter stacks hold different tensors: only in the first {sorted(set(a) - set(b))[:4]}, "
                         f"only in the second {sorted(set(b) - set(a))[:4]}")
    bad = [f"{k}: {tuple(a[k].shape)} vs {tuple(b[k].shape)}" for k in a if a[k].shape != b[k].shape]
    if bad:
        raise ValueError(f"adapter stacks differ in shape: {bad[:4]}")


def dime_merge(merged: Mapping[str, Tensor], new: Mapping[str, Tensor], classes_old: int, classes_new: int, *,
               rho_frac: float = 0.6, rho_head: float = 0.2, rho_tail: float = 0.9,
               weights: Weights = "own") -> dict[str, Tensor]:
    """Merge the adapter trained on ``classes_new`` classes into the stack merged over ``classes_old``.

    The anchor is the side with more classes (the new adapter on ties, as in the reference).
    ``classes_old = 0`` (the first task) returns a copy of ``new``, as the reference does.
    ``weights``: "own" gives the moving side its own class share (the fix); "reference" always
    uses C_new / (C_old + C_new) (see the module docstring).
    """
    _check_stacks(merged, new)
    if classes_new < 1 or classes_old < 0:
        raise ValueError(f"class counts must be classes_old >= 0 and classes_new >= 1, got {classes_old}, {classes_new}")
    if not 0 <= rho_frac <= 1:
        raise ValueError(f"rho_frac must be in [0, 1], got {rho_frac}")
    if weights not in ("own", "reference"):
        raise ValueError(f"weights must be 'own' or 'reference', got {weights!r}")
    if classes_old == 0:
        return {k: v.detach().clone() for k, v in new.items()}
    total = classes_old + classes_new
    new_is_anchor = classes_old <= classes_new
    dst, src = (new, merged) if new_is_anchor else (merged, new)
    w_src = classes_new / total if weights == "reference" or not new_is_anchor else classes_old / total
    return {k: spectral_merge(dst[k], src[k], w_src, rho_frac, rho_head, rho_tail) for k in dst}


def average_merge(merged: Mapping[str, Tensor], new: Mapping[str, Tensor], count_old: float,
                  count_new: float) -> dict[str, Tensor]:
    """(count_old * merged + count_new * new) / (count_old + count_new), per tensor.

    Class-count weighting: the class counts. Plain (unweighted) averaging of all task adapters:
    ``count_old`` = tasks merged so far, ``count_new`` = 1 (a running mean). (1, 1): the two halves.
    """
    _check_stacks(merged, new)
    if count_old < 0 or count_new < 0 or count_old + count_new <= 0:
        raise ValueError(f"merge weights must be >= 0 with a positive sum, got {count_old}, {count_new}")
    a, b = count_old / (count_old + count_new), count_new / (count_old + count_new)
    return {k: a * merged[k] + b * new[k] for k in merged}


def ties_merge(adapters: Sequence[Mapping[str, Tensor]], base: Mapping[str, Tensor] | None = None, density: float = 0.2,
               scale: float = 1.0, weights: Sequence[float] | None = None) -> dict[str, Tensor]:
    """TIES-merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint mean, over whole stacks.

    Task vectors tau_i = adapter_i - base (``base`` None: zero, i.e. the model without adapters).
    1. Trim: keep the round(density * d) largest |tau_i| entries of each flattened stack, zero the rest
       (the official code keeps one more: every entry >= the (d - int(density d))-th smallest).
    2. Elect: gamma = sign(sum_i trimmed tau_i); where that sum is 0, the sign of the total of gamma.
    3. Disjoint mean: average, per entry, the trimmed tau_i whose sign is gamma (zeros do not count).
    Result: base + scale * merged tau. ``weights`` turns the mean into a weighted mean (e.g. class
    counts); the paper's is unweighted.
    """
    if not adapters:
        raise ValueError("ties_merge needs at least one adapter stack")
    if not 0 <= density <= 1:
        raise ValueError(f"density must be in [0, 1], got {density}")
    for other in adapters[1:]:
        _check_stacks(adapters[0], other)
    keys = sorted(adapters[0])
    if base is not None:
        _check_stacks(adapters[0], base)
    zero = {k: torch.zeros_like(adapters[0][k]) for k in keys} if base is None else base
    tau = torch.stack([torch.cat([(a[k] - zero[k]).double().flatten() for k in keys]) for a in adapters])
    n, d = tau.shape
    keep = round(density * d)
    trimmed = torch.zeros_like(tau)
    if keep > 0:
        idx = tau.abs().topk(keep, dim=1).indices
        trimmed.scatter_(1, idx, tau.gather(1, idx))
    gamma = trimmed.sum(0).sign()
    gamma[gamma == 0] = 1.0 if gamma.sum() >= 0 else -1.0
    agree = (trimmed.sign() == gamma) & (trimmed != 0)
    w = torch.ones(n, dtype=tau.dtype) if weights is None else torch.tensor(list(weights), dtype=tau.dtype)
    if len(w) != n:
        raise ValueError(f"ties_merge got {len(w)} weights for {n} adapter stacks")
    w = w[:, None] * agree
    merged = (w * trimmed).sum(0) / w.sum(0).clamp_min(1e-12)
    out, start = {}, 0
    for k in keys:
        size = zero[k].numel()
        out[k] = (zero[k].double() + scale * merged[start : start + size].view(zero[k].shape)).to(adapters[0][k].dtype)
        start += size
    return out
