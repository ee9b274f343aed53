"""Mixtures of experts: a bank of experts (FFNs or low-rank adapters) behind a learned or a
label-masked router, to which experts can be added later without changing what is already learned.

Two routers:

- ``router="learned"``: a softmax router over all experts with top-k dispatch and the Switch
  Transformer load-balancing loss (Fedus et al., 2021, arXiv 2101.03961), read with
  :meth:`MixtureOfExperts.aux_loss`.
- ``router="label"``: every expert belongs to a label (a material in calorimetry, a task, a
  domain); a token is routed only among its own label's experts. With one expert per label the
  gate is exactly 1 and no router weights exist; with ``k`` experts per label a learned softmax
  chooses among those ``k`` (one router row per expert).

Growing the bank: :meth:`MixtureOfExperts.add_expert` appends experts cloned from an existing
one (for a label: ``clone_from="W"`` copies W's experts *and their router rows*; the FM4CAL
reference code copied the router row of the *last* expert whatever the source, which we fix)
and freezes everything that existed before. In label mode each label's tokens are gathered,
run through that label's experts only and copied back, so a label's outputs never depend on
experts added later: old outputs stay bit-identical (``torch.equal``), not just close. A learned
router over all experts cannot promise that (a new expert competes for every token); use
label routing where the guarantee matters.

:class:`MoE` is the adapter spec: ``inject(model, MoE(num_experts=4, r=8, targets=[...]))``
adds a routed bank of low-rank experts to frozen Linear layers.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import ClassVar, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLayer, AdapterSpec

Router = Literal["learned", "label"]


class FeedForward(nn.Module):
    """The transformer FFN expert: Linear -> GELU -> Linear (-> dropout)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x))))


class LowRankExpert(nn.Module):
    """An adapter expert ``up(down(x))`` of rank ``r``; ``up`` starts at zero so a new bank adds nothing."""

    def __init__(self, d_in: int, d_out: int, r: int) -> None:
        super().__init__()
        self.down = nn.Linear(d_in, r, bias=False)
        self.up = nn.Linear(r, d_out, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class MixtureOfExperts(nn.Module):
    """``y = sum_e g_e(x) expert_e(x)`` over a bank of experts with a learned or label-masked router.

    Args:
        experts: the initial experts; each maps ``(..., dim)`` to the same output shape.
        dim: input width (the router's input).
        router: ``"learned"`` (top-k over all experts) or ``"label"`` (only the token's label's experts).
        top_k: experts per token for the learned router.
        labels: label mode only: the label owning each expert (same length as ``experts``);
            every label must own the same number of experts.
    """

    def __init__(
        self,
        experts: Sequence[nn.Module],
        dim: int,
        router: Router = "learned",
        top_k: int = 1,
        labels: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if router not in ("learned", "label"):
            raise ValueError(f"router must be 'learned' or 'label', got {router!r}")
        if not experts:
            raise ValueError("a MixtureOfExperts needs at least one expert")
        self.router = router
        self.dim = dim
        self.experts = nn.ModuleList(experts)
        self.router_weight = nn.ParameterList()
        self.router_bias = nn.ParameterList()
        self._aux: torch.Tensor | None = None
        if router == "learned":
            if labels is not None:
                raise ValueError("labels are for router='label'; a learned router has none")
            if not 1 <= top_k <= len(experts):
                raise ValueError(f"top_k must be in [1, {len(experts)}], got {top_k}")
            self.top_k = top_k
            self.labels: list[str] = []
            for _ in experts:
                self._new_router_row(None)
        else:
            if labels is None or len(labels) != len(experts):
                raise ValueError(
                    f"router='label' needs `labels` naming the label of each of the {len(experts)} experts, got {labels}"
                )
            self.top_k = 1
            self.labels = [str(label) for label in labels]
            counts = {name: self.labels.count(name) for name in self.label_names}
            if len(set(counts.values())) != 1:
                raise ValueError(f"every label must own the same number of experts, got {counts}")
            if self.experts_per_label > 1:
                for _ in experts:
                    self._new_router_row(None)

    # --- labels -----------------------------------------------------------------------------
    @property
    def label_names(self) -> list[str]:
        """Labels in order of first appearance; a label's index in this list is its id."""
        return list(dict.fromkeys(self.labels))

    @property
    def experts_per_label(self) -> int:
        return self.labels.count(self.labels[0]) if self.labels else 0

    def label_experts(self, label: str) -> list[int]:
        """Indices of the experts owned by ``label``."""
        idx = [i for i, name in enumerate(self.labels) if name == label]
        if not idx:
            raise KeyError(f"unknown label {label!r}; this mixture knows {self.label_names}")
        return idx

    def label_ids(self, labels: Sequence[str] | torch.Tensor) -> torch.Tensor:
        """Label names (or ids, passed through after a range check) -> a LongTensor of label ids."""
        names = self.label_names
        if isinstance(labels, torch.Tensor):
            if labels.numel() and (labels.min() < 0 or labels.max() >= len(names)):
                raise ValueError(f"label ids must lie in [0, {len(names)}) for labels {names}, got {labels.unique().tolist()}")
            return labels.long()
        index = {name: i for i, name in enumerate(names)}
        unknown = sorted({str(lab) for lab in labels if lab not in index})
        if unknown:
            raise KeyError(f"unknown labels {unknown}; this mixture knows {names}")
        return torch.tensor([index[lab] for lab in labels], dtype=torch.long)

    # --- routing ----------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        labels: Sequence[str] | torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Route ``x`` of shape ``(B, ..., dim)``.

        ``labels`` (label mode) are one per sample (shape ``(B,)``) or one per token (``x.shape[:-1]``).
        ``mask`` (True = real token) keeps padding out of the learned router's balance statistics.
        """
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected inputs of width {self.dim}, got shape {tuple(x.shape)}")
        flat = x.reshape(-1, self.dim)
        if self.router == "label":
            if labels is None:
                raise ValueError("router='label' needs `labels` for every sample or token")
            ids = self.label_ids(labels).to(x.device)
            if ids.shape != x.shape[:-1]:
                if ids.dim() != 1 or ids.shape[0] != x.shape[0]:
                    raise ValueError(f"labels of shape {tuple(ids.shape)} fit neither the batch {x.shape[0]} nor the tokens {tuple(x.shape[:-1])}")
                ids = ids.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])
            out = self._label_forward(flat, ids.reshape(-1))
        else:
            keep = None if mask is None else mask.reshape(-1).to(torch.bool)
            out = self._learned_forward(flat, keep)
        return out.view(*x.shape[:-1], out.shape[-1])

    def _router_rows(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.stack([self.router_weight[i] for i in idx])
        b = torch.cat([self.router_bias[i] for i in idx])
        return w, b

    def _label_forward(self, flat: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # Each label's tokens are gathered, sent through that label's experts only and copied
        # back (index_copy, not a sum over all experts), so adding experts for a new label cannot
        # change a single bit of an old label's output.
        out: torch.Tensor | None = None
        for li, name in enumerate(self.label_names):
            rows = (ids == li).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            xs = flat.index_select(0, rows)
            owned = self.label_experts(name)
            if len(owned) == 1:
                ys = self.experts[owned[0]](xs)
            else:
                w, b = self._router_rows(owned)
                gate = torch.softmax(F.linear(xs, w, b), dim=-1)
                ys = sum(gate[:, j : j + 1] * self.experts[e](xs) for j, e in enumerate(owned))
            if out is None:
                out = flat.new_zeros(flat.shape[0], ys.shape[-1])
            out.index_copy_(0, rows, ys.to(out.dtype))
        if out is None:  # empty input
            out = self.experts[0](flat)
        return out

    def _learned_forward(self, flat: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        w, b = self._router_rows(list(range(len(self.experts))))
        probs = torch.softmax(F.linear(flat, w, b), dim=-1)  # (N, E)
        gate, chosen = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1:  # renormalise over the chosen experts
            gate = gate / gate.sum(-1, keepdim=True)
        out: torch.Tensor | None = None
        for e, expert in enumerate(self.experts):
            hit = chosen == e  # (N, k)
            rows = hit.any(-1).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            g = (gate * hit).sum(-1).index_select(0, rows).unsqueeze(-1)
            ys = g * expert(flat.index_select(0, rows))
            if out is None:
                out = flat.new_zeros(flat.shape[0], ys.shape[-1])
            out.index_add_(0, rows, ys.to(out.dtype))
        if out is None:
            out = self.experts[0](flat) * 0
        if self.training:
            self._aux = switch_balance_loss(probs, chosen[:, 0], keep)
        return out

    def aux_loss(self) -> torch.Tensor | None:
        """The learned router's Switch balance loss from the last training forward (``None`` otherwise)."""
        aux, self._aux = self._aux, None
        return aux

    # --- growing ------------------------------------------------------------------------------
    def _new_router_row(self, source: int | None) -> None:
        w = torch.zeros(self.dim)
        b = torch.zeros(1)
        if source is None:
            nn.init.normal_(w, std=0.02)
        else:  # the new row starts where the source expert's row is (not the last expert's)
            w.copy_(self.router_weight[source].detach())
            b.copy_(self.router_bias[source].detach())
        ref = next(self.experts.parameters(), w)
        self.router_weight.append(nn.Parameter(w.to(ref.device, ref.dtype)))
        self.router_bias.append(nn.Parameter(b.to(ref.device, ref.dtype)))

    def add_expert(
        self,
        clone_from: int | str | None = None,
        *,
        label: str | None = None,
        expert: nn.Module | None = None,
        freeze_existing: bool = True,
    ) -> list[int]:
        """Append expert(s); return their indices. Only the new experts and their router rows train.

        Label mode: ``label`` is the new label; ``clone_from`` names the label whose experts (and
        router rows) are copied, e.g. the closest material. Learned mode: ``clone_from`` is an
        expert index (its router row is copied too) or ``None`` with a fresh ``expert``.
        """
        if self.router == "label":
            if label is None:
                raise ValueError("router='label': name the new expert's `label`")
            if label in self.labels:
                raise ValueError(
                    f"label {label!r} already has experts; adding one would change its outputs. Add a new label instead."
                )
            if isinstance(clone_from, int):
                raise TypeError("router='label': clone_from names a label (e.g. the closest material), not an index")
            if clone_from is None:
                if expert is None or self.experts_per_label != 1:
                    raise ValueError("router='label': give clone_from=<label>, or a fresh `expert` when each label has one")
                sources: list[int | None] = [None]
            else:
                sources = list(self.label_experts(clone_from))
        else:
            if label is not None:
                raise ValueError("a learned router has no labels")
            if isinstance(clone_from, str):
                raise TypeError("router='learned': clone_from is an expert index")
            if clone_from is None and expert is None:
                raise ValueError("give clone_from=<expert index> or a fresh `expert`")
            if clone_from is not None and not 0 <= clone_from < len(self.experts):
                raise IndexError(f"clone_from={clone_from} is not an expert index (have {len(self.experts)})")
            sources = [clone_from]
        if freeze_existing:
            for p in self.parameters():
                p.requires_grad_(False)
        new = []
        has_rows = len(self.router_weight) > 0
        for src in sources:
            module = copy.deepcopy(self.experts[src]) if src is not None else expert
            module.requires_grad_(True)
            self.experts.append(module)
            if label is not None:
                self.labels.append(label)
            if has_rows:
                self._new_router_row(src)
            new.append(len(self.experts) - 1)
        if self.router == "learned":
            self.top_k = min(self.top_k, len(self.experts))
        return new

    def extra_repr(self) -> str:
        if self.router == "label":
            return f"router=label, labels={self.label_names}, experts_per_label={self.experts_per_label}"
        return f"router=learned, experts={len(self.experts)}, top_k={self.top_k}"


def switch_balance_loss(probs: torch.Tensor, top1: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer load balance ``E * sum_e f_e P_e`` (= 1 when perfectly balanced).

    ``f_e``: fraction of tokens whose top-1 expert is ``e``; ``P_e``: mean router probability of
    ``e``; ``keep`` (True = real token) leaves padding out of both.
    """
    n_exp = probs.shape[-1]
    if keep is not None:
        probs, top1 = probs[keep], top1[keep]
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    frac = torch.bincount(top1, minlength=n_exp).to(probs.dtype) / top1.shape[0]
    return n_exp * (frac * probs.mean(0)).sum()


# --- the adapter spec: a routed bank of low-rank experts on frozen Linear layers ---------------
@dataclass
class MoE(AdapterSpec):
    """A mixture of low-rank adapter experts added to frozen Linear layers.

    ``y = W x + sum_e g_e(x) up_e(down_e(x))``; ``up`` starts at zero so the model starts unchanged.

    Args:
        num_experts: experts per layer (learned router).
        r: rank of each expert.
        top_k: experts per token (learned router).
        router: ``"learned"`` or ``"label"``.
        labels: label mode: one label per expert; route with :func:`route_labels`.
    """

    num_experts: int = 4
    r: int = 8
    top_k: int = 1
    router: str = "learned"
    labels: list[str] | None = None

    method: ClassVar[str] = "moe"

    def __post_init__(self) -> None:
        if self.r < 1 or self.num_experts < 1:
            raise ValueError(f"MoE needs r >= 1 and num_experts >= 1, got r={self.r}, num_experts={self.num_experts}")
        if self.router == "label" and (self.labels is None or len(self.labels) != self.num_experts):
            raise ValueError(f"MoE(router='label') needs `labels` with one label per expert ({self.num_experts}), got {self.labels}")
        if self.router != "label" and self.labels is not None:
            raise ValueError(f"MoE.labels are for router='label'; router={self.router!r} would ignore labels={self.labels}")

    def wrap(self, name: str, layer: nn.Module) -> AdapterLayer:
        if isinstance(layer, nn.Linear):
            return MoELinear(layer, self)
        raise TypeError(f"MoE cannot adapt {name!r} of type {type(layer).__name__}; supported: nn.Linear")


class MoELinear(AdapterLayer):
    """A frozen Linear plus a routed bank of low-rank experts (``self.moe``).

    The balance loss is reported by ``self.moe.aux_loss()``, which AdaptedModule collects; this
    layer's own :meth:`aux_loss` stays ``None`` so the loss is not counted twice. The update
    depends on the input through the router, so there is no weight delta to merge.
    """

    def __init__(self, base_layer: nn.Linear, spec: MoE) -> None:
        super().__init__(base_layer, spec)
        d_out, d_in = base_layer.weight.shape
        w = base_layer.weight
        experts = [LowRankExpert(d_in, d_out, spec.r).to(w.device, w.dtype) for _ in range(spec.num_experts)]
        self.moe = MixtureOfExperts(experts, d_in, router=spec.router, top_k=spec.top_k, labels=spec.labels)
        self.route: Sequence[str] | torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.moe(x, labels=self.route)


def moe_layers(model: nn.Module) -> Iterator[MoELinear]:
    for m in model.modules():
        if isinstance(m, MoELinear):
            yield m


@contextlib.contextmanager
def route_labels(model: nn.Module, labels: Sequence[str] | torch.Tensor) -> Iterator[None]:
    """Within the block, every label-routed :class:`MoELinear` in ``model`` routes by ``labels``."""
    layers = list(moe_layers(model))
    old = [m.route for m in layers]
    for m in layers:
        m.route = labels
    try:
        yield
    finally:
        for m, r in zip(layers, old):
            m.route = r
