"""Saving, loading, presets through the CLI, and the Lightning lifecycle (calibration at fit start,
resume without re-initialising, auxiliary losses logged)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

import suite.adapters
from suite.adapters import (
    AdapterLoadError,
    CGLoRA,
    FourierMoE,
    LoRA,
    adapter_layers,
    inject,
    load_adapters,
    save_adapters,
)
from tests.toy import ToyData, ToyViT

pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated in v4.49.0")  # jsonargparse, via LightningCLI

PRESETS = sorted(p.name for p in (Path(__file__).parents[3] / "configs" / "adapters").glob("*.yaml"))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_load_reports_every_mismatch(tmp_path):
    a = _mlp()
    inject(a, LoRA(r=2, targets=["0", "2"]))
    save_adapters(a, tmp_path)
    b = _mlp()
    inject(b, LoRA(r=3, targets=["0"]))
    with pytest.raises(AdapterLoadError) as err:
        load_adapters(b, tmp_path)
    msg = str(err.value)
    assert "mis-shaped (2): 0.lora.A: saved (2, 8), model (3, 8), 0.lora.B: saved (1, 16, 2), model (1, 16, 3)" in msg
    assert "unexpected (2): 2.lora.A, 2.lora.B" in msg
    with pytest.raises(FileNotFoundError, match="expected a folder written by suite.adapters.save_adapters"):
        load_adapters(_mlp(), tmp_path / "nowhere")
    cfg = tmp_path / "adapters.json"
    good = cfg.read_text()
    cfg.write_text(good.replace('"suite.adapters.lora.LoRA"', '"suite.adapters.lora.NotAMethod"'))
    with pytest.raises(AdapterLoadError, match=r"adapters.json: field 'adapters\[0\].spec': adapter class_path 'suite.adapters.lora.NotAMethod' is not an AdapterSpec"):
        load_adapters(_mlp(), tmp_path)
    cfg.write_text(good.replace('"suite.adapters.lora.LoRA"', '"no_such_package.LoRA"'))
    with pytest.raises(AdapterLoadError, match=r"field 'adapters\[0\].spec': adapter class_path 'no_such_package.LoRA': cannot import"):
        load_adapters(_mlp(), tmp_path)


def test_a_domain_method_loads_by_import_path_alone(tmp_path):
    """adapters.json names the spec by class_path: a domain's method (MALA) is found without importing
    its module first, in a fresh interpreter."""
    import subprocess
    import sys

    from domains.nuclei.adapters import MALA

    spec_cfg = MALA(r=4, targets=["0"]).to_config()
    assert spec_cfg["class_path"] == "domains.nuclei.adapters.MALA"
    (tmp_path / "spec.json").write_text(json.dumps(spec_cfg))
    code = (
        "import json, sys; from suite.adapters.core import spec_from_config; "
        "assert 'domains.nuclei.adapters' not in sys.modules; "
        "spec = spec_from_config(json.load(open(sys.argv[1]))); print(type(spec).__module__, spec.r)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "spec.json")], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["domains.nuclei.adapters", "4"]


def test_saved_state_holds_only_adapters(tmp_path):
    from safetensors.torch import load_file

    m = _mlp()
    inject(m, CGLoRA(r=2, shift=True, targets=["0"], modules_to_save=["2"]))
    save_adapters(m, tmp_path)
    keys = set(load_file(str(tmp_path / "adapters.safetensors")))
    assert keys == {"0.lora.A", "0.lora.B", "0.lora.A0", "0.lora.B0", "0.initialised", "2.weight", "2.bias"}


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_keep_the_domain_targets(preset, tmp_path):
    """A preset composed after a domain YAML swaps the method but keeps targets/exclude/modules_to_save."""
    from suite.cli import main

    domain = tmp_path / "domain.yaml"
    domain.write_text(
        "model:\n  class_path: tests.toy.ToyViT\n  init_args:\n    adapter:\n      class_path: suite.adapters.LoRA\n"
        "      init_args: {targets: [qkv], exclude: [blocks.0.attn.qkv], modules_to_save: [head], r: 4, dora: true}\n"
        f"data:\n  class_path: tests.toy.ToyData\ntrainer: {{max_epochs: 1, logger: false, default_root_dir: {tmp_path}}}\n"
    )
    preset_path = Path(__file__).parents[3] / "configs" / "adapters" / preset
    cli = main(args=["--config", str(domain), "--config", str(preset_path)], run=False)
    spec = cli.model.adapter
    assert (spec.targets, spec.exclude, spec.modules_to_save) == (["qkv"], ["blocks.0.attn.qkv"], ["head"])
    assert type(spec).__name__ == {"mica.yaml": "MiCA", "cg_lora.yaml": "CGLoRA", "fourier_moe.yaml": "FourierMoE"}.get(preset, "LoRA")
    assert getattr(spec, "dora", False) == (preset == "dora.yaml"), "presets set every method field"
    adapted = [n for n, _ in adapter_layers(cli.model.backbone)]
    assert adapted == [f"blocks.{i}.attn.qkv" for i in range(1, 6)]


def _fit(model, root, steps, ckpt_path=None):
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root, limit_val_batches=0,
    )
    trainer.fit(model, ToyData(n=32, batch_size=8), ckpt_path=ckpt_path)
    return trainer


def test_calibration_at_fit_start_and_resume_without_reinit(tmp_path, monkeypatch):
    calls = []
    real = suite.adapters.init_adapters
    monkeypatch.setattr(suite.adapters, "init_adapters", lambda *a, **k: calls.append(real(*a, **k)) or calls[-1])
    spec = CGLoRA(r=2, shift=True, calibration_batches=2, targets=["qkv"], modules_to_save=["head"])
    first = ToyViT(adapter=spec)
    trainer = _fit(first, tmp_path, steps=2)
    assert calls[0] == [f"backbone.blocks.{i}.attn.qkv" for i in range(6)]
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert saved["backbone.blocks.0.attn.qkv.initialised"].item() is True

    resumed = ToyViT(adapter=spec)
    _fit(resumed, tmp_path, steps=3, ckpt_path=ckpt)
    assert len(calls) == 1, "weights restored before on_fit_start: nothing re-initialised, no calibration data read"
    # the shift buffers are the first run's, not a recalibration of the resumed weights
    assert torch.equal(resumed.backbone.blocks[0].attn.qkv.lora.B0, saved["backbone.blocks.0.attn.qkv.lora.B0"])


def test_router_balance_loss_is_logged(tmp_path):
    model = ToyViT(adapter=FourierMoE(experts=2, top_k=1, rows=4, cols=4, targets=["qkv"]))
    trainer = _fit(model, tmp_path, steps=2)
    aux = trainer.logged_metrics["train/aux"]
    assert torch.isfinite(aux) and aux >= 6.0 - 1e-4, "sum over 6 layers of Switch losses (each >= 1)"


def test_loading_into_adapters_with_other_hyperparameters_fails(tmp_path):
    """Same tensor shapes, different scaling: loading would silently compute another function."""
    a = _mlp()
    inject(a, LoRA(r=2, alpha=4, targets=["0"]))
    save_adapters(a, tmp_path)
    b = _mlp()
    inject(b, LoRA(r=2, alpha=8, rslora=True, dropout=0.1, targets=["0"]))
    with pytest.raises(AdapterLoadError, match=r"adapters.json: field 'adapters\[0\].spec.init_args' does not match the model's "
                       r"adapter: alpha: saved 4(\.0)?, model 8(\.0)?; rslora: saved False, model True$"):
        load_adapters(b, tmp_path)
    c = _mlp()
    inject(c, LoRA(r=2, alpha=4, dropout=0.1, init="gaussian", targets=["0"]))  # training-only and start-only fields
    load_adapters(c, tmp_path)
    torch.testing.assert_close(c.eval()(torch.ones(3, 8)), a.eval()(torch.ones(3, 8)))
