"""CG-LoRA: Curvature-Guided LoRA (Zheng & Proutiere, arXiv 2603.29824).

A data-dependent initialisation. For each adapted Linear ``y = W x``, calibration batches give
(K-FAC, Martens & Grosse 2015; the "expand" convention for token sequences, Eschenhagen et al.
2023, arXiv 2311.00636):

    G = mean over batches of sum_t d_t x_t^T              (the gradient dL/dW, d = dL/dy)
    A = E_tokens[x x^T]                                   (input factor)
    S = (1/N_examples) sum_t dd_t dd_t^T, dd = n_rows * d  (output factor, per-example gradients;
                                                           the loss is taken as a mean over the
                                                           leading batch dimension)

The K-FAC Newton step is ``-S^-1 G A^-1``. Its best rank-r approximation in the curvature norm
``||S^1/2 X A^1/2||_F`` is ``-S^-1/2 [S^-1/2 G A^-1/2]_r A^-1/2`` (SVD of the whitened
gradient), split evenly between the factors:

    B = -c S^-1/2 U_r Sigma_r^1/2,   A = c Sigma_r^1/2 V_r^T A^-1/2,   c = sqrt(step / s)

so ``s B A`` is ``step`` times the rank-r curvature-whitened Newton step. Un-whitening skews
the split (``B`` scales with ``S^-1/2``, ``A`` with ``A^-1/2``, often by orders of magnitude), so
each rank-one component ``b_j a_j^T`` is rebalanced to ``||b_j|| = ||a_j||`` (same product). Damping adds
``lambda = damping * mean eigenvalue`` (= trace / dim) to each factor. Because this empirical-
Fisher step scales like ``1 / |gradient|``, a trust region (``max_update``, relative to ``||W||_F``)
bounds it; both factors shrink equally, the direction is unchanged.

Cheaper exact form: any square-root factor gives the same ``B`` and ``A``. With Cholesky
``S + lambda I = L L^T`` (``L = S^1/2 Q``, ``Q`` orthogonal), ``L^-1 G L_A^-T = Q^T (S^-1/2 G A^-1/2)
Q_A`` has the same singular values and rotated singular vectors, and un-whitening with ``L^-T``
undoes the rotation. So we use two Cholesky factorisations and triangular solves instead of two
eigendecompositions (about 10x fewer flops), all in fp32 and deterministic.

``shift=True`` keeps the function unchanged at the start, as LoRA-GA does, but without touching
the frozen ``W`` (checkpoints hold only adapter state and the frozen weights are fingerprinted):
the initial ``B0, A0`` are stored as persistent buffers and the layer computes
``W x + s (B A - B0 A0) x``; merge and ``export_peft`` (as a rank-2r LoRA ``[B, -B0] [A; A0]``)
stay exact. ``shift=False`` (the paper's best variant) starts from the Newton step itself.

With ``qkv`` (fused projections) each adapted slice gets its own ``G_i`` and ``S_i``; ``A`` is shared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from .base import AdapterLayer, require_linear
from .lora import LoRA, LoRALinear


@dataclass
class CGLoRA(LoRA):
    """LoRA initialised from calibration data as a rank-r curvature-whitened Newton step.

    Args (beyond :class:`LoRA`):
        shift: subtract the initial update so the model starts unchanged (see module docstring).
        damping: relative damping, ``lambda = damping * trace(F) / dim`` for each K-FAC factor F.
        step: multiplies the Newton step (1.0 = a full damped Newton step per layer).
        max_update: trust region: if ``||s B A||_F > max_update * ||W||_F`` both factors shrink
            (equally) to meet it; ``None`` keeps the raw step. Recorded in ``calibration_info``.
        calibration_batches: how many batches ``init_adapters`` reads.
        factor_tokens: at most this many tokens per batch (evenly strided) estimate A and S; the
            gradient G always uses every token. ``None`` uses all tokens.
    """

    shift: bool = False
    damping: float = 0.1
    step: float = 1.0
    # The empirical-Fisher Newton step grows like 1 / |gradient| (S ~ |d|^2, G ~ |d|): on a random
    # test ViT it was 0.5-1.5 x ||W|| for cross-entropy and ~3000 x ||W|| for a small-gradient
    # loss. A trust region keeps the initial update to 1 % of the weight it adapts.
    max_update: float | None = 0.01
    calibration_batches: int = 8
    factor_tokens: int | None = None

    method: ClassVar[str] = "cg_lora"
    needs_calibration: ClassVar[bool] = True
    init_scheme: ClassVar[str] = "zeros"
    # shift is not among them: it adds the A0/B0 buffers the forward reads
    start_fields: ClassVar[frozenset[str]] = LoRA.start_fields | {"damping", "step", "max_update", "calibration_batches", "factor_tokens"}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dora:
            raise ValueError("CGLoRA.dora must be False: the initialisation defines B and A only")
        if self.damping <= 0:
            raise ValueError(f"CGLoRA.damping must be > 0 (relative to the mean eigenvalue), got {self.damping}")
        if self.max_update is not None and self.max_update <= 0:
            raise ValueError(f"CGLoRA.max_update must be > 0 or None, got {self.max_update}")
        if self.step <= 0:
            raise ValueError(f"CGLoRA.step must be > 0, got {self.step}")
        if self.calibration_batches < 1:
            raise ValueError(f"CGLoRA.calibration_batches must be >= 1, got {self.calibration_batches}")
        if self.factor_tokens is not None and self.factor_tokens < 1:
            raise ValueError(f"CGLoRA.factor_tokens must be >= 1 or None, got {self.factor_tokens}")

    def wrap(self, name: str, layer: nn.Module) -> AdapterLayer:
        return CGLoRALinear(require_linear(self, name, layer), self, name)


class CGLoRALinear(LoRALinear):
    """LoRA on a Linear whose ``A``, ``B`` come from :func:`suite.adapters.init_adapters`.

    Until then both factors are zero (the layer computes the base function). The persistent
    ``initialised`` buffer travels with checkpoints and saved adapters.
    """

    def __init__(self, base_layer: nn.Linear, spec: CGLoRA, name: str = "") -> None:
        super().__init__(base_layer, spec, name)
        limit = min(self.lora.chunk, self.lora.d_in)
        if spec.r > limit:
            raise ValueError(f"CGLoRA on {name!r}: r={spec.r} exceeds min(out, in)={limit} of the (slice of the) weight")
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool, device=base_layer.weight.device))
        self._calib: dict[str, Any] | None = None
        #: after calibration: ||s B A|| / ||W|| of the raw step, and whether the trust region clipped it
        self.calibration_info: dict[str, float | bool] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._calib is None:
            return super().forward(x)
        out = self.base_layer(x)  # the factors are still zero: the base function is the whole output
        if not out.requires_grad:
            out.requires_grad_()  # a leaf when nothing upstream trains; the loss gradient still reaches it
        self._calib["records"].append((x.detach(), out))
        return out

    # --- calibration --------------------------------------------------------------------------
    def begin_calibration(self) -> None:
        lr, dev = self.lora, self.base_layer.weight.device
        f32 = dict(dtype=torch.float32, device=dev)
        s = len(lr.slices)
        self._calib = {
            "records": [],
            "G": torch.zeros(s, lr.chunk, lr.d_in, **f32),
            "A": torch.zeros(lr.d_in, lr.d_in, **f32),
            "S": torch.zeros(s, lr.chunk, lr.chunk, **f32),
            "counts": torch.zeros(2, dtype=torch.float64, device=dev),  # tokens, examples
        }

    def calibration_outputs(self) -> list[torch.Tensor]:
        return [y for _, y in self._calib["records"]]

    @torch.no_grad()
    def accumulate_calibration(self, grads: list[torch.Tensor | None]) -> None:
        c, lr = self._calib, self.lora
        for (x, _), d in zip(c["records"], grads):
            if d is None:
                continue
            rows = x.shape[0] if x.dim() > 1 else 1
            x2 = x.reshape(-1, lr.d_in).float()
            d2 = d.reshape(-1, lr.d_out).float()
            n = x2.shape[0]
            stride = 1 if self.spec.factor_tokens is None else max(1, math.ceil(n / self.spec.factor_tokens))
            xs, ds = x2[::stride], d2[::stride]
            w = n / xs.shape[0]  # keep the sums unbiased when tokens are subsampled
            c["A"].addmm_(xs.T, xs, alpha=w)
            for i, sl in enumerate(lr.slices):  # row slices are views: no copies of the gradients
                cols = slice(sl * lr.chunk, (sl + 1) * lr.chunk)
                c["G"][i].addmm_(d2[:, cols].T, x2)
                c["S"][i].addmm_(ds[:, cols].T, ds[:, cols], alpha=w * rows**2)  # per-example gradients rows * d
            c["counts"] += torch.tensor([n, rows], dtype=torch.float64, device=c["counts"].device)
        c["records"].clear()

    @torch.no_grad()
    def finish_calibration(self, n_batches: int) -> None:
        c, lr, spec = self._calib, self.lora, self.spec
        nb = torch.tensor([float(n_batches)], dtype=torch.float64, device=c["counts"].device)
        if dist.is_available() and dist.is_initialized():  # every rank must start from the same adapter
            for t in (c["G"], c["A"], c["S"], c["counts"], nb):
                dist.all_reduce(t)
        tokens, examples = c["counts"].tolist()
        if tokens == 0:
            raise RuntimeError(f"CG-LoRA layer {self.name!r} got no loss gradient during calibration: does the loss depend on it?")
        A = c["A"] / tokens
        S = c["S"] / examples
        G = c["G"] / float(nb.item())
        L_A = _damped_cholesky(A, spec.damping, f"{self.name} (input factor A)")
        coef = math.sqrt(spec.step / lr.scaling)
        r = spec.r
        Bs, As = [], []
        for i in range(len(lr.slices)):
            L_S = _damped_cholesky(S[i], spec.damping, f"{self.name} (output factor S)")
            white = torch.linalg.solve_triangular(L_S, G[i], upper=False)  # L_S^-1 G
            white = torch.linalg.solve_triangular(L_A.T, white, upper=True, left=False)  # ... L_A^-T
            U, sig, Vh = torch.linalg.svd(white, full_matrices=False)
            root = sig[:r].sqrt()
            b = -coef * torch.linalg.solve_triangular(L_S.T, U[:, :r] * root, upper=True)  # L_S^-T U sqrt(sig)
            a = coef * torch.linalg.solve_triangular(L_A, root[:, None] * Vh[:r], upper=False, left=False)
            # un-whitening unbalances the pair (B grows with S^-1/2, A with A^-1/2); rescale each
            # rank-one component b_j a_j^T so ||b_j|| = ||a_j||: same product, well-conditioned factors
            bal = (a.norm(dim=1) / b.norm(dim=0).clamp_min(1e-30)).sqrt()
            Bs.append(b * bal)
            As.append(a / bal[:, None])
        B, A = torch.stack(Bs), torch.cat(As)
        # slices write disjoint rows, so the squared norms add
        norm = lr.scaling * torch.stack([(B[i] @ A[i * r : (i + 1) * r]).norm() for i in range(len(Bs))]).norm()
        w_norm = self.base_layer.weight.detach().float().norm()
        ratio = float(norm / w_norm) if w_norm > 0 else float("inf")
        clipped = spec.max_update is not None and w_norm > 0 and ratio > spec.max_update
        if clipped:
            shrink = math.sqrt(spec.max_update / ratio)
            B, A = B * shrink, A * shrink
        self.calibration_info = {"update_to_weight": ratio, "clipped": bool(clipped)}
        lr.set_factors(B, A)
        self.initialised.fill_(True)

    def end_calibration(self) -> None:
        self._calib = None


def _damped_cholesky(F: torch.Tensor, damping: float, what: str) -> torch.Tensor:
    """Cholesky factor of ``F + damping * mean_eig(F) * I`` (fp32), with a clear error if it fails."""
    lam = damping * torch.trace(F) / F.shape[0]
    if not lam > 0:
        raise RuntimeError(f"CG-LoRA {what}: the K-FAC factor is zero (no signal in the calibration batches)")
    L, info = torch.linalg.cholesky_ex(F + lam * torch.eye(F.shape[0], dtype=F.dtype, device=F.device))
    if info.item() != 0:
        raise RuntimeError(f"CG-LoRA {what}: damped factor is not positive definite; raise CGLoRA.damping")
    return L
