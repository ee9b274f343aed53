"""Precision follows the hardware; frozen weights in bf16; merges round once and unmerge exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from suite import precision
from suite.adapters import LoRA, adapter_layers, inject, merge, unmerge
from suite.cli import main
from suite.module import NonFiniteLossError
from tests.suite.test_lifecycle import QUIET, _toy

NO_BF16 = {"amx_bf16": False, "avx512_bf16": False, "avx512_f": True}


def _run_json(root: Path) -> dict:
    return json.loads(next((root / "logs").glob("version_*/run.json")).read_text())


def test_the_choice_follows_the_cpu_units(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True, "avx512_bf16": True})
    assert precision.choose_precision("cpu") == ("bf16-mixed", "CPU has native bf16 matrix units (amx_bf16, avx512_bf16)")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: NO_BF16)
    choice, reason = precision.choose_precision("auto")
    assert choice == "32-true" and "no native bf16" in reason


def test_runs_record_the_choice_and_a_user_can_force_either(tmp_path: Path, monkeypatch) -> None:
    cfg = _toy(tmp_path)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True, "avx512_bf16": False})
    cli = main(["fit", "--config", str(cfg), "--trainer.default_root_dir", str(tmp_path / "auto"), *QUIET])
    assert str(cli.trainer.precision) == "bf16-mixed"
    record = _run_json(tmp_path / "auto")
    assert record["precision"] == "bf16-mixed" and "amx_bf16" in record["precision_reason"]
    assert record["cpu"] == precision.cpu_description() and record["cpu"].endswith("bf16 units: amx_bf16")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: NO_BF16)  # the detection forced off
    cli = main(["fit", "--config", str(cfg), "--trainer.default_root_dir", str(tmp_path / "off"), *QUIET])
    assert str(cli.trainer.precision) == "32-true" and "no native bf16" in _run_json(tmp_path / "off")["precision_reason"]
    cli = main(["fit", "--config", str(cfg), "--trainer.default_root_dir", str(tmp_path / "forced"), *QUIET,
                "--trainer.precision", "bf16-mixed"])
    assert str(cli.trainer.precision) == "bf16-mixed"
    assert _run_json(tmp_path / "forced")["precision_reason"] == "bf16-mixed: set in the config or on the command line"


def test_bf16_training_stores_the_frozen_base_in_bf16_and_keeps_the_rest_fp32(tmp_path: Path) -> None:
    cfg = _toy(tmp_path)
    cli = main(["fit", "--config", str(cfg), "--trainer.default_root_dir", str(tmp_path / "a"), *QUIET, "--trainer.precision", "bf16-mixed"])
    model = cli.model
    qkv = model.backbone.blocks[0].attn.qkv
    assert qkv.base_layer.weight.dtype == torch.bfloat16 and qkv.lora.A.dtype == torch.float32
    assert model.head.weight.dtype == torch.float32 and model.backbone.norm.weight.dtype == torch.float32
    assert not any(b.attn.fused_attn for b in model.backbone.blocks)  # explicit attention under bf16 on CPU
    states = cli.trainer.optimizers[0].state.values()
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)
    ckpt = torch.load(cli.trainer.checkpoint_callback.last_model_path, weights_only=True)
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values())  # trainable state only, in fp32
    assert not any(k.endswith("base_layer.weight") for k in ckpt["state_dict"])
    # the checkpoint's fingerprint is the base as built: a fresh fp32 run tests from it
    out = main(["test", "--config", str(cfg), "--trainer.default_root_dir", str(tmp_path / "a"), *QUIET,
                "--trainer.precision", "32-true", "--ckpt_path", "last"])
    assert "test/loss" in out.trainer.callback_metrics


def test_timm_attention_is_explicit_under_cpu_bf16_only_and_computes_the_same() -> None:
    """bf16 on CPU switches timm's attention to explicit products; fp32, or bf16 on another device,
    gets timm's own setting back. Under autocast both paths agree to bf16 rounding (stated
    tolerance: 3e-2 absolute on unit-scale outputs, ~4 bf16 ulps)."""
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8, depth=2).eval()
    original = [b.attn.fused_attn for b in vit.blocks]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused = vit(x).float()
        assert precision.explicit_attention_on_cpu_bf16(vit, "bf16-mixed", "cpu") == 2
        assert not any(b.attn.fused_attn for b in vit.blocks)
        explicit = vit(x).float()
    torch.testing.assert_close(explicit, fused, atol=3e-2, rtol=0)
    assert precision.explicit_attention_on_cpu_bf16(vit, "32-true", "cpu") == 0
    assert [b.attn.fused_attn for b in vit.blocks] == original
    precision.explicit_attention_on_cpu_bf16(vit, "bf16-mixed", "cuda")  # a GPU's SDPA kernels are fast in bf16
    assert [b.attn.fused_attn for b in vit.blocks] == original


def test_the_nan_stop_still_fires_under_autocast(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError, match="global step 1"):
        main(["fit", "--config", str(_toy(tmp_path)), "--trainer.default_root_dir", str(tmp_path), *QUIET,
              "--trainer.precision", "bf16-mixed", "--model.init_args.nan_at_step", "1"])


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(64, 48)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)


@pytest.mark.parametrize("spec", [LoRA(r=4, alpha=32, targets=["lin", "mha"]), LoRA(r=4, alpha=32, dora=True, targets=["lin"])],
                         ids=["lora+mha", "dora"])
def test_merge_rounds_once_and_unmerge_restores_bf16_weights_bit_for_bit(spec) -> None:
    model = Mixed()
    inject(model, spec)
    for _, layer in adapter_layers(model):
        for name, p in layer.named_parameters():
            if "lora" in name:
                nn.init.normal_(p.data, 0, 0.5)
    precision.store_frozen(model, torch.bfloat16)
    lin = model.lin
    w0 = lin.base_layer.weight.detach().clone()
    mha0 = {k: v.detach().clone() for k, v in model.mha.base_layer.named_parameters()} if "mha" in spec.targets else {}
    delta = lin.delta_weight().detach().float()
    merge(model)
    # W + delta is formed in fp32 and rounded once (DoRA: its own closed form, also rounded once)
    if not spec.dora:
        assert torch.equal(lin.base_layer.weight, (w0.float() + delta).to(torch.bfloat16))
    unmerge(model)
    assert torch.equal(lin.base_layer.weight, w0)
    for k, v in mha0.items():
        assert torch.equal(model.mha.base_layer.get_parameter(k), v), k
    # the naive bf16 update does not come back: the reason the original is kept
    naive = w0.clone()
    naive += delta.to(torch.bfloat16)
    naive -= delta.to(torch.bfloat16)
    assert not torch.equal(naive, w0)
