"""Precision that follows the hardware, and frozen weights stored in bf16.

Where the CPU has native bf16 matrix units (AMX-BF16 or AVX512-BF16, read from
``torch.cpu.get_capabilities()``, not guessed from the model name) or the GPU supports bf16, a
run whose config leaves ``trainer.precision`` unset trains in ``bf16-mixed``; elsewhere in
``32-true``, and the run says so once. The choice and its reason go into ``run.json``. An explicit
``--trainer.precision`` always wins.

Under ``bf16-mixed`` the frozen base weights (Linear / Conv / Embedding weights and biases that
no adapter owns) are stored in bf16, halving their memory as PEFT users get by loading with
``torch_dtype=torch.bfloat16``; adapters, heads and optimiser state stay fp32 (autocast casts
them for the matmuls). Checkpoints are unaffected: frozen weights are never saved.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import torch
from torch import nn

BF16_MIXED, FP32 = "bf16-mixed", "32-true"
LOW_PRECISION = (torch.bfloat16, torch.float16)
#: layers whose frozen weights are worth storing in bf16 (the big matrices, attention in-projections
#: included; norms are tiny and stay fp32)
_CAST_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.MultiheadAttention)


def cpu_bf16_units() -> list[str]:
    """The CPU's native bf16 matrix units by name (``amx_bf16``, ``avx512_bf16``); empty if none."""
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):  # an older torch or an unknown CPU: no detection, no claim
        return []
    return [unit for unit in ("amx_bf16", "avx512_bf16") if caps.get(unit)]


def cpu_description() -> str:
    """The CPU as benchmark tables and ``run.json`` name it: model, logical cores, native bf16 units.

    Timings and even last-bit fp32 results differ between CPU kinds (an Intel CPU with AMX-BF16
    and an AMD Zen 4 one with AVX512-BF16 only), so a measurement says which one it ran on.
    """
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:  # not Linux
        pass
    units = cpu_bf16_units()
    return f"{name}, {os.cpu_count()} logical cores, bf16 units: {', '.join(units) if units else 'none'}"


def choose_precision(accelerator: Any = "auto") -> tuple[str, str]:
    """``(precision, reason)`` for a run that did not ask for one."""
    name = str(accelerator or "auto").lower()
    wants_gpu = name in ("gpu", "cuda") or (name == "auto" and torch.cuda.is_available())
    if wants_gpu and torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return BF16_MIXED, f"GPU {torch.cuda.get_device_name(0)} supports bf16"
        return FP32, f"GPU {torch.cuda.get_device_name(0)} has no native bf16: fp32"
    units = cpu_bf16_units()
    if units:
        return BF16_MIXED, f"CPU has native bf16 matrix units ({', '.join(units)})"
    return FP32, "CPU has no native bf16 (no AMX-BF16 or AVX512-BF16): fp32, which is faster there"


def is_bf16(precision: Any) -> bool:
    return str(precision).startswith("bf16")


def frozen_weights(module: nn.Module, names: set[str] | None = None) -> list[tuple[str, nn.Parameter]]:
    """Frozen weights and biases of Linear / Conv / Embedding / attention layers, by name (within ``names``, the
    frozen base parameters a module reports, so frozen adapter parts stay as they are)."""
    from suite.quant import is_nf4  # 4-bit weights are already smaller than bf16: leave them

    out = []
    for name, mod in module.named_modules():
        if isinstance(mod, _CAST_TYPES):
            for pname, p in mod.named_parameters(recurse=False):
                full = f"{name}.{pname}" if name else pname
                if not p.requires_grad and p.is_floating_point() and not is_nf4(p) and (names is None or full in names):
                    out.append((full, p))
    return out


@torch.no_grad()
def store_frozen(module: nn.Module, dtype: torch.dtype, names: set[str] | None = None) -> int:
    """Store ``module``'s frozen Linear/Conv/Embedding weights in ``dtype`` (in place); return how many."""
    n = 0
    for _, p in frozen_weights(module, names):
        if p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += 1
    return n


def explicit_attention_on_cpu_bf16(module: nn.Module, precision: Any, device_type: str) -> int:
    """timm attention layers as explicit products under bf16 on a CPU, ``F.scaled_dot_product_attention`` elsewhere.

    Measured here (``benchmarks/results/adapters.md``, torch 2.14.1, 2 threads): the CPU SDPA
    kernel is slower in bf16 than in fp32 and takes half of a bf16 ViT-S LoRA step, while timm's
    explicit ``q @ k^T``, softmax, ``@ v`` path (``fused_attn = False``) runs on the matrix units:
    the step takes 0.65x the SDPA one. On an AMD Zen 4 CPU (AVX512-BF16, no AMX), one thread, a
    full bf16 training step: 0.65x for food_cl's 6-block ViT-Tiny at 32 px, 0.85x for ViT-S at
    224 px. The switch is timm's own per-layer flag, so weights and
    checkpoints are untouched; another precision or device gets each layer's own setting back.
    Returns how many layers this call switched to explicit products.
    """
    explicit = is_bf16(precision) and device_type == "cpu"
    n = 0
    for layer in module.modules():
        if not hasattr(layer, "fused_attn"):
            continue
        if not hasattr(layer, "_suite_fused_attn"):
            layer._suite_fused_attn = layer.fused_attn  # timm's choice at build time
        wanted = False if explicit else layer._suite_fused_attn
        if layer.fused_attn != wanted:
            layer.fused_attn = wanted
            if explicit:
                n += 1
    return n
