"""Adapter merges after each task: DIME's spectral merge and the baselines' averaging and TIES.

Every function is pure: it takes adapter stacks as ``{name: tensor}`` dicts (the form
``adapters.adapter_stack`` returns) and returns a new dict, so the model can keep the merged
stack in buffers and checkpoints carry it.

**DIME** (class-count aware spectral merging with rank-wise threshold modulation), per tensor.
Reshape both tensors to matrices as stored (a Linear weight is (out, in); a bias is (1, n)),
take the joint SVD X = [M_dst | M_src] = U S V^T and split V^T's columns into V_dst^T, V_src^T
(so M_dst = U S V_dst^T and M_src = U S V_src^T). The reference blends the dst part of V^T toward
the src part, w_dst V_dst^T + w_src V_src^T (w_dst + w_src = 1), scales the move of direction k
by rho_k (rho_head for the first round(rho_frac * r) of the r directions, at least 1 and at most
r - 1; rho_tail for the rest) and rebuilds U S (.). What it computes is exactly

    M = M_dst + w_src * sum_k rho_k s_k u_k (v_src,k - v_dst,k)^T
      = M_dst + w_src * (rho_head P_head + rho_tail (I - P_head)) (M_src - M_dst),

with P_head = U_head U_head^T the projector onto the dominant left-singular directions of X:
the difference between the adapters moves the anchor by w_src * rho_head inside the joint
matrix's dominant subspace (0.2: the dominant knowledge stays) and by w_src * rho_tail outside
it (0.9: small tasks still leave their mark). With rho_head = rho_tail = rho it is the linear
interpolation M_dst + rho w_src (M_src - M_dst). The anchor (dst) is the side with more classes:
the merged stack when C_old > C_new, else the new adapter. We compute the second form from
M_dst itself (the reference rebuilds M_dst from U S V_dst^T, which only adds round-off), in
float64.

**Fixed reference bug: inverted class-count weights.** The reference always uses
w_src = C_new / (C_old + C_new), also when the new adapter is the anchor and the merged stack is
the src, so whenever the new task has at least as many classes as all earlier ones, the new task
gets the old classes' share and vice versa (with rho = 1 the result would be
C_old/C * M_new + C_new/C * M_old). ``weights="own"`` (default) gives the src its own share
(C_old / C when the merged stack is the src); ``weights="reference"`` keeps the reference's
behaviour for comparison. Both agree when the merged stack is the anchor (C_old > C_new).
"""

from __future__ import annotations

from typing import Literal, Mapping, Sequence

import torch
from torch import Tensor

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
