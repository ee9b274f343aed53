"""NF4 frozen bases (QLoRA, Dettmers et al., arXiv 2305.14314): 4-bit NormalFloat weights, LoRA on top.

    report = quantize_nf4(lm)                          # every frozen nn.Linear -> NF4Linear (torchao NF4)
    inject(lm, LoRA(r=16, targets=[...]))              # LoRALinear wraps NF4Linear like any nn.Linear
    ...train...
    save_adapters(lm, "run/adapter"); export_peft(lm, "run/peft")   # adapters only, as for a dense base
    merge_quantized(lm)                                # dequantise the bases, then merge (see below)

The weights are stored the way torchtune's QLoRA stores them: ``torchao``'s ``NF4Tensor`` (blocks of
64 values on the 16 NF4 levels, 4 bits each, with double-quantised block scales: an int8 scale per
block and one float factor per group of scales). Frozen Linear weights then take
``(4 + 8/64 + ...)`` bits instead of 16: 0.26x of bf16 (``weight_bytes``). The product is
``linear_nf4``'s: dequantise, multiply, and keep only the 4-bit tensor for the backward pass.

Two steps are ours because torchao's are slow on CPU, both checked against torchao in the tests:
quantising picks each value's nearest NF4 level with one ``bucketize`` over the 15 midpoints
(torchao compares every value with all 16 levels: ~3x slower; identical codes for fp32 weights,
and for bf16 ones the truly nearest level, where torchao's bf16 comparison sometimes rounds to the
other neighbour), and dequantising looks both 4-bit codes of a byte up at once in a 256-entry table
(bit-identical to ``NF4Tensor.get_original_weight``, ~3x faster). The scales are torchao's own
double quantisation.

``NF4Linear`` is an ``nn.Linear`` subclass whose ``weight`` is the NF4 parameter, so the shared LoRA
layer adapts it unchanged. Two things LoRA does with a base weight are given a meaning here:

- ``W + delta`` (LoRA's no-gradient shortcut for long inputs) dequantises ``W`` and returns a dense
  sum: exactly the weight the NF4 forward uses, plus the delta.
- in-place ``W += delta`` or ``W.copy_(W + delta)`` (``merge``) is refused with a message: writing
  a dense result into 4-bit codes would re-quantise it (a second, silent rounding).
  :func:`merge_quantized` instead replaces each NF4 base by a dense Linear holding its dequantised
  weight and merges there; the merged model computes what the unmerged NF4 model computes, to
  float round-off (measured in the tests: <= 1e-5).

Fixed here: ``torchao``'s own ``clone`` of an NF4 tensor (used by ``copy.deepcopy``) re-quantises
the dequantised values with default block sizes (lossy, and an error for weights with fewer than
256 blocks); the clone registered here copies the 4-bit codes and scales exactly. If the NF4 path
does not run here (``torchao`` missing or an op failing), :func:`quantize_nf4` says why and leaves
the weights dense (``fallback="dense"``). bitsandbytes' CUDA NF4 is not used: torchao's tensor
runs on CPU and GPU alike. Casting a model's dtype (``model.to(torch.bfloat16)``) dequantises NF4
weights (torchao's ``to``): cast before quantising, or skip parameters for which :func:`is_nf4`.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from suite.adapters import AdapterLayer, adapter_layers, matches_any, merge

log = logging.getLogger(__name__)

#: values per NF4 block (QLoRA and torchtune use 64)
BLOCK_SIZE = 64
#: block scales per double-quantisation group (QLoRA's 256); lowered to a divisor for small weights
SCALER_BLOCK_SIZE = 256
#: the 16 NF4 levels (QLoRA appendix E, as torchao stores them)
NF4_LEVELS = (-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
              0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0)


def _torchao() -> Any:
    """The torchao NF4 module (its location moved between releases); ImportError if absent."""
    try:
        from torchao.dtypes import nf4tensor as mod  # torchao <= 0.12, as torchtune imports it
    except ImportError:
        from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor as mod  # torchao >= 0.13
    return mod


def is_nf4(t: Any) -> bool:
    """True if ``t`` is a torchao ``NF4Tensor`` (e.g. a parameter to leave alone when casting dtypes)."""
    try:
        return isinstance(t, _torchao().NF4Tensor)
    except ImportError:
        return False


def nf4_bytes(t: torch.Tensor) -> int:
    """Bytes an NF4 tensor really holds (codes, scales, scale factors, mean, the 16-level table)."""
    names, _ = t.__tensor_flatten__()
    return sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in names)


def to_nf4(weight: torch.Tensor, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """A torchao ``NF4Tensor`` of ``weight`` (2-D, size a multiple of ``block_size``), same dtype.

    Same format and scales as ``torchao``'s ``to_nf4``; the codes are the nearest NF4 levels,
    found with ``bucketize`` in fp32 (see the module docstring).
    """
    mod = _torchao()
    w = weight.detach().contiguous()
    scaler_block = _scaler_block_size(w.numel(), block_size)
    flat = w.flatten()
    n_blocks = flat.numel() // block_size
    q_scalers, q_factor, scaler_mean = mod.NF4Tensor.double_quantize_scalers(flat, block_size, scaler_block)
    levels = torch.tensor(NF4_LEVELS, device=w.device)
    absmax = flat.view(n_blocks, block_size).abs().amax(1, keepdim=True).float().clamp_min(torch.finfo(torch.float32).tiny)
    scaled = (flat.view(n_blocks, block_size).float() / absmax).flatten()  # torchao divides the same way
    codes = torch.bucketize(scaled, (levels[1:] + levels[:-1]) / 2).to(torch.uint8)
    meta = mod.SubclassTensorArgs(w.size(), w.stride(), w.storage_offset(), w.dtype, w.device, False)
    return mod.NF4Tensor(meta, block_size, n_blocks, scaler_block, q_scalers, q_factor, scaler_mean,
                         codes[::2] << 4 | codes[1::2], levels.to(w.dtype))


def nf4_state_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of an NF4 tensor's codes and scales (e.g. to fingerprint a frozen base)."""
    names, _ = t.__tensor_flatten__()
    out = []
    for n in sorted(names):
        x = getattr(t, n).detach().cpu().reshape(-1)
        dense = torch.empty(x.numel(), dtype=x.dtype).copy_(x)  # fresh unit-stride storage (size-1 views keep odd strides)
        out.append(dense.view(torch.uint8).numpy().tobytes())
    return b"".join(out)


def dequantize_nf4(t: torch.Tensor) -> torch.Tensor:
    """The dense values of an NF4 tensor (bit-identical to torchao's ``get_original_weight``), also
    for its transpose, which torchao's ``to`` would read as the untransposed data."""
    if not t.is_contiguous() and t.t().is_contiguous():
        return dequantize_nf4(t.t()).t()
    pairs = torch.stack([t.nf4.repeat_interleave(16), t.nf4.repeat(16)], 1)  # byte -> (high code, low code)
    values = pairs.index_select(0, t.quantized_data.int())
    # torchao's dequantize_scalers, in the dtype the tensor was built in (its level table's), not the
    # outer dtype: `param.data = param.data.to(bf16)` relabels an NF4 parameter without converting it
    q = t.quantized_scalers.view(-1, t.scaler_block_size)
    scales = (q / t.quantization_factor.unsqueeze(-1)).flatten().to(t.nf4.dtype) + t.scaler_mean
    return (values.view(-1, t.block_size) * scales.unsqueeze(-1)).view(t.shape)


class _LinearNF4(torch.autograd.Function):
    """``x W^T`` with ``W`` dequantised on the fly; only the 4-bit ``W`` is kept for backward (as
    torchao's ``LinearNF4``, with the faster dequantisation)."""

    @staticmethod
    def forward(ctx, x, weight):  # type: ignore[override]
        ctx.save_for_backward(weight)
        return torch.nn.functional.linear(x, dequantize_nf4(weight).to(x.dtype))

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        return grad @ dequantize_nf4(weight).to(grad.dtype), None


def linear_nf4(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _LinearNF4.apply(x, weight)


@functools.cache  # once per process
def _register_ops() -> None:
    """Teach ``NF4Tensor`` what LoRA does with a base weight, and fix its clone (see the module docstring)."""
    mod = _torchao()
    aten = torch.ops.aten
    table = mod.NF4_OPS_TABLE

    def out_of_place(func, args, kwargs=None):
        args = [dequantize_nf4(a) if isinstance(a, mod.NF4Tensor) else a for a in args]
        return func(*args, **(kwargs or {}))

    def in_place(func, args, kwargs=None):
        raise RuntimeError(
            f"{func} on an NF4 weight: writing a delta into 4-bit codes would re-quantise it. Merge with "
            "suite.quant.merge_quantized(model) (dequantises the bases, then merges), or keep the adapters unmerged."
        )

    def exact_clone(func, args, kwargs=None):
        t = args[0]
        names, _ = t.__tensor_flatten__()
        return mod.NF4Tensor(*mod.construct_nf4_args(t, {n: getattr(t, n).clone() for n in names}))

    def copy_nf4_only(func, args, kwargs=None):
        if not isinstance(args[1], mod.NF4Tensor):
            raise RuntimeError(
                "copying dense values into an NF4 weight would re-quantise them (a second, silent rounding). To merge "
                "adapters use suite.quant.merge_quantized(model); to load dense weights, load them into the dense "
                "model and quantise it with suite.quant.quantize_nf4."
            )
        return torchao_copy(func, args, kwargs)

    # torchao's clone re-quantises the dequantised values with default block sizes: lossy, and an
    # assertion error for weights of fewer than 256 blocks. deepcopy clones; copy the codes instead.
    table[aten.clone.default] = exact_clone
    # torchao's copy_ quantises a dense source; a merge that writes W + dW back (in bf16: copy_) would
    # silently round twice. NF4 -> NF4 copies (load_state_dict of a 4-bit state) stay torchao's.
    torchao_copy = table[aten.copy_.default]
    table[aten.copy_.default] = copy_nf4_only
    for op in (aten.add.Tensor, aten.sub.Tensor):
        table.setdefault(op, out_of_place)  # a later torchao that implements them keeps its own
    for op in (aten.add_.Tensor, aten.sub_.Tensor, aten.mul_.Tensor, aten.div_.Tensor):
        table.setdefault(op, in_place)


def _scaler_block_size(numel: int, block_size: int) -> int:
    """QLoRA's 256 scales per group, or the largest power-of-two divisor of the block count below it."""
    return math.gcd(numel // block_size, SCALER_BLOCK_SIZE)


class NF4Linear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight is stored as torchao NF4 and multiplied by ``linear_nf4``.

    The NF4 tensor keeps the original dtype as its compute dtype: inputs are multiplied by the
    dequantised weight in their own dtype (bf16 under autocast). The bias, if any, stays dense.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, block_size: int = BLOCK_SIZE) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a dense weight first
        if weight.dim() != 2 or weight.numel() % block_size:
            raise ValueError(f"NF4 needs a 2-D weight whose size is a multiple of {block_size}, got {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.block_size = block_size
        _register_ops()
        self.weight = nn.Parameter(to_nf4(weight, block_size), requires_grad=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = BLOCK_SIZE) -> "NF4Linear":
        return cls(linear.weight, linear.bias, block_size).train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear_nf4(x, self.weight)
        return out + self.bias.to(out.dtype) if self.bias is not None else out

    def dequantize(self) -> nn.Linear:
        """A dense ``nn.Linear`` with the weight this layer computes with (frozen, same dtype)."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            dense.weight.copy_(dequantize_nf4(self.weight))
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense.requires_grad_(False).train(self.training)

    def weight_bytes(self) -> int:
        return nf4_bytes(self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, nf4 block={self.block_size}"


@dataclass
class QuantReport:
    """What :func:`quantize_nf4` did: layers quantised, layers left dense (with why), and the memory."""

    method: str  # "nf4", or "none" when the NF4 path is unavailable here (see ``fallback_reason``)
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    bf16_bytes: int = 0  # what the quantised weights take in bf16
    stored_bytes: int = 0  # what they take now
    fallback_reason: str | None = None

    @property
    def ratio(self) -> float:
        """Stored bytes of the quantised Linear weights over their bf16 size (NF4: ~0.26)."""
        return self.stored_bytes / max(self.bf16_bytes, 1)

    def __str__(self) -> str:
        if self.method != "nf4":
            return f"quantize: none ({self.fallback_reason}); {len(self.skipped)} Linear layers left dense"
        return (
            f"nf4: {len(self.quantized)} Linear weights, {self.stored_bytes / 2**20:.2f} MiB "
            f"({self.ratio:.3f}x of bf16); {len(self.skipped)} left dense"
        )


def nf4_available(device: torch.device | str = "cpu") -> tuple[bool, str]:
    """Whether torchao's NF4 quantise / forward / backward runs on ``device``, and if not, why."""
    try:
        _register_ops()
        w = torch.randn(64, 64, device=device)
        x = torch.randn(2, 64, device=device, requires_grad=True)
        linear_nf4(x, to_nf4(w)).sum().backward()
        if x.grad is None or not torch.isfinite(x.grad).all():
            return False, "linear_nf4's backward gave no finite input gradient"
    except Exception as err:  # any failure means "no working path here"; the reason is reported
        return False, f"{type(err).__name__}: {err}"
    return True, "torchao NF4"


def quantize_nf4(
    model: nn.Module,
    exclude: Iterable[str] = (),
    block_size: int = BLOCK_SIZE,
    fallback: str = "dense",
) -> QuantReport:
    """Replace every ``nn.Linear`` of ``model`` by an :class:`NF4Linear`, in place; return the report.

    Left dense, and listed in ``report.skipped`` with the reason: layers matching ``exclude``
    (names, suffixes or regexes as adapter targets), weights shared with another module (a tied
    ``lm_head``), the projections inside ``nn.MultiheadAttention`` (read there as raw tensors),
    weights whose size is not a multiple of ``block_size``, and trainable ``modules_to_save``.
    Adapter layers may already be injected (their ``base_layer`` is quantised) but not merged.
    ``fallback="dense"`` keeps the weights dense with a warning when NF4 does not run here;
    ``"error"`` raises instead.
    """
    if fallback not in ("dense", "error"):
        raise ValueError(f"fallback must be 'dense' or 'error', got {fallback!r}")
    merged = [n for n, layer in adapter_layers(model) if layer.merged]
    if merged:
        raise ValueError(f"quantize_nf4: adapters {merged[:4]} are merged into their base weights; unmerge first")
    exclude = list(exclude)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ok, why = nf4_available(device)
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    report = QuantReport("nf4" if ok else "none", fallback_reason=None if ok else why)
    injected = any(isinstance(m, AdapterLayer) for m in model.modules())  # then trainable weights are modules_to_save
    targets = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or isinstance(mod, NF4Linear):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        reason = None
        if exclude and matches_any(name, exclude):
            reason = "excluded"
        elif isinstance(parent, nn.MultiheadAttention):
            reason = "read directly by nn.MultiheadAttention"
        elif counts[id(mod.weight)] > 1:
            reason = "weight shared with another module (tied)"
        elif mod.weight.numel() % block_size:
            reason = f"size {tuple(mod.weight.shape)} is not a multiple of the NF4 block ({block_size})"
        elif mod.weight.requires_grad and injected:
            reason = "trainable (modules_to_save)"
        if reason is not None:
            report.skipped[name] = reason
        else:
            targets.append((name, parent, child, mod))
    if not ok:
        if fallback == "error":
            raise RuntimeError(f"NF4 quantisation does not run on {device}: {why}")
        log.warning("NF4 quantisation does not run on %s (%s): the frozen Linear weights stay dense", device, why)
        report.skipped.update({name: f"NF4 unavailable: {why}" for name, *_ in targets})
        return report
    for name, parent, child, mod in targets:
        q = NF4Linear.from_linear(mod, block_size)
        setattr(parent, child, q)
        report.quantized.append(name)
        report.bf16_bytes += mod.weight.numel() * 2
        report.stored_bytes += q.weight_bytes()
    log.info("%s", report)
    return report


def dequantize(model: nn.Module) -> list[str]:
    """Replace every :class:`NF4Linear` by the dense ``nn.Linear`` it computes with; return their names."""
    names = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, NF4Linear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, mod.dequantize())
            names.append(name)
    return names


def merge_quantized(model: nn.Module) -> list[str]:
    """Dequantise the NF4 bases (in their compute dtype) and merge every adapter into them.

    The merged model computes what the unmerged NF4 model did, up to float round-off; compared with
    the original full-precision base plus the adapters it carries the NF4 rounding of the base
    (QLoRA merges into the bf16 base for the same reason). Returns the dequantised layer names.
    """
    names = dequantize(model)
    merge(model)
    return names


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the weights of every ``nn.Linear`` (NF4 ones counted at their real size)."""
    total, seen = 0, set()
    for mod in model.modules():
        if isinstance(mod, nn.Linear) and id(mod.weight) not in seen:
            seen.add(id(mod.weight))
            w = mod.weight
            total += nf4_bytes(w) if is_nf4(w) else w.numel() * w.element_size()
    return total

