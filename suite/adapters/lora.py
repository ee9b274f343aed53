"""The LoRA family on Linear, Conv2d, Embedding and ``nn.MultiheadAttention``.

- LoRA (Hu et al., 2021, arXiv 2106.09685): ``W' = W + s * B A`` with ``A`` (r x in) and ``B``
  (out x r); ``A`` starts Kaiming-uniform and ``B`` at zero (as in Hugging Face PEFT), so an
  injected model computes exactly what the base computes. ``s = alpha / r``.
- rsLoRA (Kalajdzievski, 2023, arXiv 2312.03732): ``s = alpha / sqrt(r)`` (``rslora=True``), which
  keeps the update's scale independent of the rank.
- DoRA (Liu et al., 2024, arXiv 2402.09353): ``W' = m * (W + s B A) / ||W + s B A||_row`` with a
  trained magnitude ``m`` per output row (channel) that starts at ``||W||_row``. As the paper (sec.
  4.3) and PEFT do, the norm is treated as a constant in the backward pass.
- q/k/v-selective LoRA: timm and SAM compute q, k and v with one fused ``qkv`` Linear (and
  ``nn.MultiheadAttention`` with one ``in_proj_weight``). ``qkv=("q", "v")`` adapts only those row
  slices, each with its own rank-``r`` pair, which is what the LoRA paper did to ``W_q``, ``W_v``.

Every layer keeps its factors in a :class:`LowRankDelta` on a 2-D view ``(d_out, d_in)`` of the
base weight: Linear ``W``; Conv2d ``W.flatten(1)`` (``A`` is an ``r x in x kh x kw`` kernel, ``B``
a 1x1 conv, exactly PEFT's layout); Embedding ``W.T`` (``(dim, num)``, so ``A`` is ``r x num``
and ``B`` is ``dim x r``, PEFT's ``lora_embedding_A/B``). MiCA (``mica.py``) and CG-LoRA
(``curvature.py``) reuse these layers and only change how ``A`` and ``B`` start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLayer, AdapterSpec

_QKV_INDEX = {"q": 0, "k": 1, "v": 2}


@dataclass
class LoRA(AdapterSpec):
    """Low-rank update ``s * B A``.

    Args:
        r: rank of the update (per q/k/v slice when ``qkv`` is set).
        alpha: scale numerator; ``s = alpha / r`` (``alpha / sqrt(r)`` with ``rslora``).
        dropout: dropout on the adapter input only (not applied to Embedding indices, as in PEFT).
        rslora: rank-stabilised scaling.
        dora: learn a magnitude per output row/channel (DoRA); Linear and Conv2d only.
        qkv: for a fused ``qkv`` projection (out = 3 * dim), the slices to adapt, e.g. ``["q", "v"]``.
        init: how ``A`` starts on Linear, Conv2d and MultiheadAttention layers: ``"kaiming"``
            (Kaiming-uniform, PEFT's default) or ``"gaussian"`` (N(0, 1/r), PEFT's
            ``init_lora_weights="gaussian"``). ``B`` starts at zero either way; embeddings start
            with A = 0, B ~ N(0, 1) under both, as in PEFT. Methods with their own start (MiCA,
            CG-LoRA) keep ``"kaiming"`` here.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False
    qkv: list[str] | None = None
    init: str = "kaiming"

    method: ClassVar[str] = "lora"
    peft_exportable: ClassVar[bool] = True
    start_fields: ClassVar[frozenset[str]] = frozenset({"init"})
    #: how the factors start: "lora" (A Kaiming, B zero), "mica" (B minor singular vectors, frozen;
    #: A zero) or "zeros" (filled later by calibration, CG-LoRA)
    init_scheme: ClassVar[str] = "lora"

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"{type(self).__name__}.r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{type(self).__name__}.dropout must be in [0, 1), got {self.dropout}")
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"{type(self).__name__}.init must be 'kaiming' or 'gaussian', got {self.init!r}")
        if self.init != "kaiming" and self.init_scheme != "lora":
            raise ValueError(f"{type(self).__name__} starts its factors its own way; init={self.init!r} applies to LoRA only")
        if self.qkv is not None:
            self.qkv = list(self.qkv)
            bad = [s for s in self.qkv if s not in _QKV_INDEX]
            if bad or not self.qkv or len(set(self.qkv)) != len(self.qkv):
                raise ValueError(f"{type(self).__name__}.qkv must be a non-empty subset of ['q', 'k', 'v'], got {self.qkv}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def wrap(self, name: str, layer: nn.Module) -> AdapterLayer:
        if isinstance(layer, nn.Linear):
            return LoRALinear(layer, self, name)
        if self.qkv is not None and not isinstance(layer, nn.MultiheadAttention):
            raise TypeError(f"{type(self).__name__}(qkv=...) needs a fused qkv Linear or nn.MultiheadAttention; {name!r} is {type(layer).__name__}")
        if isinstance(layer, nn.Conv2d):
            return LoRAConv2d(layer, self, name)
        if isinstance(layer, nn.Embedding):
            return LoRAEmbedding(layer, self, name)
        if isinstance(layer, nn.MultiheadAttention):
            return LoRAMultiheadAttention(layer, self, name)
        raise TypeError(
            f"{type(self).__name__} cannot adapt {name!r} of type {type(layer).__name__}; supported: "
            "nn.Linear, nn.Conv2d, nn.Embedding, nn.MultiheadAttention. Narrow `targets` or add it to `exclude`."
        )


class LowRankDelta(nn.Module):
    """``s * B A`` on a 2-D weight view ``(d_out, d_in)``, optionally only on q/k/v row slices.

    ``A`` is ``(S*r, d_in)``; ``B`` is ``(S, d_out/n_chunks, r)`` for ``S`` adapted slices (one
    slice spanning all rows without ``qkv``). ``B`` is a persistent buffer when ``frozen_B`` (MiCA).
    With ``shift`` (CG-LoRA) the initial factors are kept as buffers ``A0``, ``B0`` and the delta is
    ``s * (B A - B0 A0)``, so the function starts unchanged without touching the frozen ``W``.
    """

    def __init__(
        self,
        d_out: int,
        d_in: int,
        r: int,
        scaling: float,
        like: torch.Tensor,
        qkv: list[str] | None = None,
        frozen_B: bool = False,
        shift: bool = False,
        name: str = "",
    ) -> None:
        super().__init__()
        if qkv is None:
            self.slices, self.n_chunks = [0], 1
        else:
            if d_out % 3:
                raise ValueError(f"{name!r}: qkv-selective adapters need a fused projection with 3*dim outputs, got {d_out}")
            self.slices, self.n_chunks = sorted(_QKV_INDEX[s] for s in qkv), 3
        self.d_out, self.d_in, self.r, self.scaling = d_out, d_in, r, scaling
        self.chunk = d_out // self.n_chunks
        kw = dict(dtype=like.dtype, device=like.device)
        s = len(self.slices)
        self.A = nn.Parameter(torch.zeros(s * r, d_in, **kw))
        B = torch.zeros(s, self.chunk, r, **kw)
        if frozen_B:
            self.register_buffer("B", B)
        else:
            self.B = nn.Parameter(B)
        self.shift = shift
        if shift:
            self.register_buffer("A0", torch.zeros(s * r, d_in, **kw))
            self.register_buffer("B0", torch.zeros(s, self.chunk, r, **kw))

    # --- initialisation ---------------------------------------------------------------------
    @torch.no_grad()
    def reset_lora(self, init: str = "kaiming") -> None:
        """B = 0 and A Kaiming-uniform(a=sqrt(5)) per slice (PEFT's default) or, with
        ``init="gaussian"``, N(0, 1/r) (PEFT's ``init_lora_weights="gaussian"``)."""
        if init == "gaussian":
            nn.init.normal_(self.A, std=1.0 / self.r)
        else:
            for i in range(len(self.slices)):
                nn.init.kaiming_uniform_(self.A[i * self.r : (i + 1) * self.r], a=math.sqrt(5))
        self.B.zero_()

    @torch.no_grad()
    def reset_lora_embedding(self) -> None:
        """PEFT's default for embeddings: A zero, B standard normal."""
        self.A.zero_()
        nn.init.normal_(self.B)

    @torch.no_grad()
    def reset_mica(self, weight2d: torch.Tensor, name: str = "") -> None:
        """MiCA: each slice's B = the r left singular vectors of W_slice with the smallest singular values."""
        limit = min(self.chunk, self.d_in)
        if self.r > limit:
            raise ValueError(f"MiCA on {name!r}: r={self.r} exceeds min(out, in)={limit} of the (slice of the) weight")
        for i, s in enumerate(self.slices):
            w = weight2d[s * self.chunk : (s + 1) * self.chunk].detach().float()
            u = torch.linalg.svd(w, full_matrices=False)[0]  # singular values descend: minor ones last
            self.B[i].copy_(u[:, -self.r :])
        self.A.zero_()

    @torch.no_grad()
    def set_factors(self, B: torch.Tensor, A: torch.Tensor) -> None:
        """Write ``B`` (S, chunk, r) and ``A`` (S*r, d_in) in place (optimisers keep their references)."""
        self.B.copy_(B)
        self.A.copy_(A)
        if self.shift:
            self.B0.copy_(B)
            self.A0.copy_(A)

    # --- the delta ----------------------------------------------------------------------------
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B_full, A_full)`` with ``s * B_full @ A_full`` the whole delta.

        ``B_full`` is ``(d_out, S*r')`` and block-structured for q/k/v slices (zeros outside each
        slice's rows); ``r' = 2r`` with ``shift`` (``[B, -B0]`` and ``[A; A0]``). This is also
        exactly the rank-``S*r'`` LoRA that ``export_peft`` writes.
        """
        A, B = self.A, self.B
        s = len(self.slices)
        if self.shift:
            A = torch.cat([A.view(s, self.r, -1), self.A0.view(s, self.r, -1)], dim=1).flatten(0, 1)
            B = torch.cat([B, -self.B0], dim=-1)
        if self.n_chunks == 1:
            return B[0], A
        rr = B.shape[-1]
        full = B.new_zeros(self.n_chunks, self.chunk, s, rr)
        full[self.slices, :, torch.arange(s), :] = B  # block structure: slice i only feeds rows of chunk slices[i]
        return full.reshape(self.d_out, s * rr), A

    def delta(self) -> torch.Tensor:
        B, A = self.factors()
        return (B @ A) * self.scaling

    def extra_repr(self) -> str:
        return f"d_out={self.d_out}, d_in={self.d_in}, r={self.r}, slices={self.slices}, shift={self.shift}"


class LoRALayer(AdapterLayer):
    """Shared machinery: factor creation and init, dropout, DoRA magnitude, merge/unmerge.

    Subclasses give the 2-D view of their base weight (:meth:`weight2d`), map a 2-D delta back to
    the weight's shape (:meth:`to_weight_shape`) and implement ``forward``.
    """

    supports_dora: ClassVar[bool] = False

    def __init__(self, base_layer: nn.Module, spec: LoRA, name: str = "") -> None:
        super().__init__(base_layer, spec)
        self.name = name
        w2 = self.weight2d()
        self.lora = LowRankDelta(
            *w2.shape, spec.r, spec.scaling, like=w2, qkv=spec.qkv, frozen_B=spec.init_scheme == "mica",
            shift=getattr(spec, "shift", False), name=name,
        )
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.reset()
        if spec.dora:
            if not self.supports_dora:
                raise TypeError(f"DoRA is not supported on {name!r} ({type(base_layer).__name__}); set dora=False or exclude it")
            with torch.no_grad():
                norm = (w2.float() + self.lora.delta().float()).norm(dim=1)
            self.magnitude = nn.Parameter(norm.to(w2.dtype))
        self._merge_scale: torch.Tensor | None = None

    def reset(self) -> None:
        scheme = self.spec.init_scheme
        if scheme == "lora":
            self.lora.reset_lora(self.spec.init)
        elif scheme == "mica":
            self.lora.reset_mica(self.weight2d(), self.name)
        elif scheme != "zeros":
            raise ValueError(f"unknown init scheme {scheme!r}")

    def weight2d(self) -> torch.Tensor:
        return self.base_layer.weight

    def to_weight_shape(self, delta2d: torch.Tensor) -> torch.Tensor:
        return delta2d

    def dora_scale(self) -> torch.Tensor:
        """``m / ||W + s B A||_row`` with the norm detached (DoRA sec. 4.3), one value per output row."""
        w = self.weight2d()
        norm = (w + self.lora.delta().detach().to(w.dtype)).norm(dim=1).detach()
        return self.magnitude / norm

    def delta_weight(self) -> torch.Tensor:
        delta = self.lora.delta()
        if self.spec.dora:  # W' - W with W' = scale * (W + delta)
            w = self.weight2d()
            scale = self.dora_scale()[:, None]
            delta = (scale - 1) * w + scale * delta
        return self.to_weight_shape(delta)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged or not self.spec.dora:
            return super().merge()
        w2 = self.weight2d()  # a view of base_layer.weight: writing it writes the weight
        scale = self.dora_scale()
        if w2.dtype not in (torch.float32, torch.float64):  # see AdapterLayer.merge: keep what cannot be recomputed
            self._unmerged_weight = w2.detach().clone()
        w2.copy_((scale[:, None] * (w2.float() + self.lora.delta().float())).to(w2.dtype))
        self._merge_scale = scale
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged or not self.spec.dora:
            return super().unmerge()
        w2 = self.weight2d()
        original = self.__dict__.pop("_unmerged_weight", None)
        if original is not None:
            w2.copy_(original)
        else:
            w2.copy_((w2.float() / self._merge_scale[:, None].float() - self.lora.delta().float()).to(w2.dtype))
        self._merge_scale = None
        self.merged = False

    def _merge_on_the_fly(self, x: torch.Tensor, positions: int) -> bool:
        """Inference shortcut: with no gradient to track, one product with ``W + dW`` is cheaper than
        the base product plus the adapter path once there are more output positions (tokens,
        pixels) than ``d_out * d_in / (d_out + d_in)``: building ``dW`` costs ``d_out * d_in * r``,
        the adapter path ``positions * (d_out + d_in) * r`` plus two passes over the output. Exact
        up to fp32 round-off; few-token decoding keeps the adapter path."""
        if torch.is_grad_enabled() or (self.training and not isinstance(self.dropout, nn.Identity)):
            return False
        d_out, d_in = self.lora.d_out, self.lora.d_in
        return positions * (d_out + d_in) > d_out * d_in

    def _dora_output(self, out: torch.Tensor, base_term: torch.Tensor, lora_out: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """DoRA's output ``out + (k - 1) * W x + k * s B A x`` with ``k = m / ||W + s B A||``."""
        shape = [1] * out.dim()
        shape[channel_dim] = -1
        k = self.dora_scale().view(shape)
        return out + (k - 1) * base_term + k * lora_out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.spec.r}, scaling={self.lora.scaling:.4g}, dora={self.spec.dora}"


class _FusedLoRALinear(torch.autograd.Function):
    """``y = x W^T + b + s (x A^T) B^T`` accumulated in place, with a hand-written backward.

    Autograd on the plain expression materialises ``s * (h B^T)`` and the sum (two extra passes
    over the ``tokens x d_out`` output) and, in backward, the scaled output gradient and the sum of
    the two input gradients. Here the adapter product is added into the base output buffer
    (``addmm_``), ``s`` is applied to the small ``tokens x r`` tensors, and ``dx = dy W + dh A`` is
    accumulated in place. Same saved tensors as autograd (``x``, ``h``); gradients only for inputs
    that need them.
    """

    @staticmethod
    def forward(ctx, x, W, b, A, B, s):  # type: ignore[override]
        x2 = x.reshape(-1, x.shape[-1])
        h = x2 @ A.T
        y = torch.addmm(b, x2, W.T) if b is not None else x2 @ W.T
        y.addmm_(h, B.T, alpha=s)
        ctx.save_for_backward(x2, h, W, A, B)
        ctx.s, ctx.x_shape = s, x.shape
        return y.view(*x.shape[:-1], W.shape[0])

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        x2, h, W, A, B = ctx.saved_tensors
        s, need = ctx.s, ctx.needs_input_grad
        g = gy.reshape(-1, gy.shape[-1])
        gh = (g @ B).mul_(s) if need[0] or need[3] else None
        gx = gW = gb = gA = gB = None
        if need[0]:
            gx = (g @ W).addmm_(gh, A).view(ctx.x_shape)
        if need[1]:
            gW = g.T @ x2
        if need[2]:
            gb = g.sum(0)
        if need[3]:
            gA = gh.T @ x2
        if need[4]:
            gB = (g.T @ h).mul_(s)
        return gx, gW, gb, gA, gB, None


def _plain(*tensors: torch.Tensor | None) -> bool:
    """True for ordinary dense tensors (not DTensor shards or other subclasses)."""
    return all(t is None or type(t.data) is torch.Tensor for t in tensors)


class LoRALinear(LoRALayer):
    """LoRA on an ``nn.Linear`` (``y = W x + b + s B A dropout(x)``), optionally on q/k/v slices."""

    supports_dora = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        W, b = self.base_layer.weight, self.base_layer.bias
        if self._merge_on_the_fly(x, x.numel() // x.shape[-1]):
            return F.linear(x, W + self.delta_weight().to(W.dtype), b)
        B, A = self.lora.factors()
        fusable = (
            not self.spec.dora
            and (isinstance(self.dropout, nn.Identity) or not self.training)
            and _plain(x, W, b, A, B)
        )
        if fusable and torch.is_autocast_enabled(x.device.type):
            dt = torch.get_autocast_dtype(x.device.type)
            if dt in (torch.bfloat16, torch.float16) and all(t is None or t.dtype in (dt, torch.float32) for t in (x, W, b, A, B)):
                return self._fused_autocast(x, W, b, A, B, dt)
        if fusable and x.dtype == W.dtype == A.dtype:
            return _FusedLoRALinear.apply(x, W, b, A, B, self.lora.scaling)
        out = self.base_layer(x)
        dx = self.dropout(x)
        lora_out = F.linear(F.linear(dx, A), B) * self.lora.scaling
        if not self.spec.dora:
            return out + lora_out
        # as PEFT: reuse the base output unless dropout changed the input the base term must see
        bias = self.base_layer.bias
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base_term = out - bias if bias is not None else out
        else:
            base_term = F.linear(dx, self.base_layer.weight)
        return self._dora_output(out, base_term, lora_out, channel_dim=-1)

    def _fused_autocast(
        self, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor, dt: torch.dtype
    ) -> torch.Tensor:
        """The fused path under autocast: every operand cast once to the autocast dtype (as autocast
        casts them for ``F.linear``; ``x`` once for both products instead of once per product), then
        the same products in that dtype, the adapter product accumulated into the base output. The
        casts are differentiable, so ``A`` and ``B`` get fp32 gradients as under autocast. Rounds
        fewer times than the unfused expression (no separate ``* s`` and ``+`` in bf16)."""
        cast = [t if t is None or t.dtype == dt else t.to(dt) for t in (x, W, b, A, B)]
        with torch.autocast(x.device.type, enabled=False):
            return _FusedLoRALinear.apply(*cast, self.lora.scaling)


class LoRAConv2d(LoRALayer):
    """LoRA on an ``nn.Conv2d``: ``A`` is an ``r``-channel conv with the base kernel, stride, padding
    and dilation; ``B`` a 1x1 conv. The delta kernel is ``s * (B @ A.flatten(1)).view(W.shape)``.

    Unlike PEFT (whose LoRA conv ignores the base dilation and padding mode, so its unmerged and
    merged outputs differ for dilated convs) ``A`` runs with the base layer's own settings.
    """

    supports_dora = True

    def __init__(self, base_layer: nn.Conv2d, spec: LoRA, name: str = "") -> None:
        if base_layer.groups != 1:
            raise TypeError(f"LoRA on grouped conv {name!r} (groups={base_layer.groups}) is not supported; exclude it")
        super().__init__(base_layer, spec, name)

    def weight2d(self) -> torch.Tensor:
        return self.base_layer.weight.flatten(1)

    def to_weight_shape(self, delta2d: torch.Tensor) -> torch.Tensor:
        return delta2d.view(self.base_layer.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        w = self.base_layer.weight
        if self._merge_on_the_fly(x, x.numel() // x.shape[-3] // math.prod(self.base_layer.stride)):
            return self.base_layer._conv_forward(x, w + self.delta_weight().to(w.dtype), self.base_layer.bias)
        out = self.base_layer(x)
        B, A = self.lora.factors()
        dx = self.dropout(x)
        h = self.base_layer._conv_forward(dx, A.view(A.shape[0], *w.shape[1:]), None)
        lora_out = F.conv2d(h, B[:, :, None, None]) * self.lora.scaling
        if not self.spec.dora:
            return out + lora_out
        bias = self.base_layer.bias
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base_term = out - bias.view(1, -1, 1, 1) if bias is not None else out
        else:
            base_term = self.base_layer._conv_forward(dx, w, None)
        return self._dora_output(out, base_term, lora_out, channel_dim=1)


class LoRAEmbedding(LoRALayer):
    """LoRA on an ``nn.Embedding``: ``E'[i] = E[i] + s * B A[:, i]`` (PEFT's ``lora_embedding_A/B``).

    Starts as PEFT does (A zero, B normal). ``dropout`` does not apply to token indices.
    """

    def __init__(self, base_layer: nn.Embedding, spec: LoRA, name: str = "") -> None:
        if base_layer.max_norm is not None:
            raise TypeError(f"LoRA on {name!r}: nn.Embedding(max_norm=...) renormalises weights in place; not supported")
        super().__init__(base_layer, spec, name)

    def reset(self) -> None:
        if self.spec.init_scheme == "lora":
            self.lora.reset_lora_embedding()
        else:
            super().reset()

    def weight2d(self) -> torch.Tensor:
        return self.base_layer.weight.T

    def to_weight_shape(self, delta2d: torch.Tensor) -> torch.Tensor:
        return delta2d.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        B, A = self.lora.factors()
        e = self.base_layer
        h = F.embedding(x, A.T, e.padding_idx, None, e.norm_type, e.scale_grad_by_freq, e.sparse)
        return out + F.linear(h, B) * self.lora.scaling


class LoRAMultiheadAttention(AdapterLayer):
    """LoRA on ``nn.MultiheadAttention`` (open_clip's text tower): one pair on ``in_proj_weight``
    (q/k/v-selective with ``qkv``) and one on ``out_proj``.

    ``nn.MultiheadAttention`` reads its weights directly and never calls ``out_proj.forward``, so
    wrapping ``out_proj`` would do nothing; instead the base module runs through
    ``torch.func.functional_call`` with ``W + delta`` in place of its two weights (exact, and
    differentiable; building the two ``d x 3d`` / ``d x d`` matrices costs far less than attention).
    """

    def __init__(self, base_layer: nn.MultiheadAttention, spec: LoRA, name: str = "") -> None:
        super().__init__(base_layer, spec)
        self.name = name
        if not base_layer._qkv_same_embed_dim:
            raise TypeError(f"LoRA on {name!r}: nn.MultiheadAttention with kdim/vdim != embed_dim is not supported")
        if spec.dora or spec.dropout > 0:
            raise TypeError(
                f"LoRA on nn.MultiheadAttention {name!r} supports neither DoRA nor adapter dropout; "
                "set dora=False, dropout=0, or target its MLP Linear layers instead"
            )
        if spec.init_scheme not in ("lora", "mica"):
            raise TypeError(f"{type(spec).__name__} cannot adapt nn.MultiheadAttention {name!r}; target its MLP Linear layers")
        w_in, w_out = base_layer.in_proj_weight, base_layer.out_proj.weight
        frozen = spec.init_scheme == "mica"
        self.lora_in = LowRankDelta(*w_in.shape, spec.r, spec.scaling, w_in, spec.qkv, frozen, name=name)
        self.lora_out = LowRankDelta(*w_out.shape, spec.r, spec.scaling, w_out, None, frozen, name=name + ".out_proj")
        if frozen:
            self.lora_in.reset_mica(w_in, name)
            self.lora_out.reset_mica(w_out, name + ".out_proj")
        else:
            self.lora_in.reset_lora(spec.init)
            self.lora_out.reset_lora(spec.init)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.merged:
            return self.base_layer(*args, **kwargs)
        b = self.base_layer
        weights = {}
        for key, delta in self.deltas().items():
            w = b.get_parameter(key)
            weights[key] = w + delta.to(w.dtype)
        return torch.func.functional_call(b, weights, args, kwargs)

    def deltas(self) -> dict[str, torch.Tensor]:
        """``{"in_proj_weight": ..., "out_proj.weight": ...}``: the updates merge adds."""
        return {"in_proj_weight": self.lora_in.delta(), "out_proj.weight": self.lora_out.delta()}

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self._add_deltas(1.0)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._add_deltas(-1.0)
            self.merged = False

    def _add_deltas(self, sign: float) -> None:
        """``W +/- delta`` in fp32, rounded once; a low-precision weight is kept at merge and restored
        bit for bit at unmerge (see AdapterLayer.merge)."""
        originals = self.__dict__.setdefault("_unmerged_weights", {})
        for key, delta in self.deltas().items():
            p = self.base_layer.get_parameter(key)
            if p.dtype in (torch.float32, torch.float64):
                p.add_(delta.to(p.dtype), alpha=sign)
            elif sign > 0:
                originals[key] = p.detach().clone()
                p.copy_((p.float() + delta.float()).to(p.dtype))
            else:
                p.copy_(originals.pop(key))
