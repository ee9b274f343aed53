"""AdaptedModule: trainable-only optimisation and checkpoints, resume parity, NaN stop."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import timm
import torch

from suite.adapters import LoRA, adapter_layers, adapter_state_dict
from suite.module import CheckpointMismatchError, NonFiniteLossError
from tests.toy import ToyData, ToyViT


def _trainer(tmp_path: Path, **kw) -> L.Trainer:
    kw.setdefault("max_epochs", 1)
    return L.Trainer(accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, **kw)


def _model(**kw) -> ToyViT:
    kw.setdefault("adapter", LoRA(r=4, alpha=8, targets=["qkv", "attn.proj"]))
    kw.setdefault("optimizer", lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.01))
    return ToyViT(**kw)


def test_optimiser_holds_only_trainable_parameters_and_frozen_weights_do_not_move(tmp_path: Path) -> None:
    model = _model()
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer = _trainer(tmp_path, max_steps=3)
    trainer.fit(model, ToyData())
    (opt,) = trainer.optimizers
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    assert frozen_before and all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if n in frozen_before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    owned = {f"{name}.{p}" for name, layer in adapter_layers(model) for p in layer.adapter_params()}
    assert owned and trainable == owned | {"head.weight", "head.bias"}
    assert model.report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < model.report.percent < 100


def test_checkpoint_of_lora_vit_small_is_under_five_percent_of_the_full_model(tmp_path: Path) -> None:
    model = ToyViT(model_name="vit_small_patch16_224", img_size=32, adapter=LoRA(r=8, alpha=16, targets=["qkv", "attn.proj"]))
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(model, ToyData(n=16, batch_size=2))
    ckpt = tmp_path / "lora.ckpt"
    trainer.save_checkpoint(ckpt)
    full = tmp_path / "full.pt"
    torch.save(model.state_dict(), full)
    ratio = ckpt.stat().st_size / full.stat().st_size
    assert ratio < 0.05, f"checkpoint is {ratio:.1%} of the full model"
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert not any(k.endswith("base_layer.weight") for k in saved)
    assert set(adapter_state_dict(model.backbone)) <= {k.removeprefix("backbone.") for k in saved}


def test_resume_from_half_way_gives_the_same_adapters_as_an_uninterrupted_run(tmp_path: Path) -> None:
    """N steps straight vs N/2 + checkpoint + resume N/2 (epoch boundary; data order is seeded by
    (seed, epoch), AdamW state and step counters come back from the checkpoint)."""
    data = lambda: ToyData(n=48, batch_size=8)  # noqa: E731 - 6 steps per epoch after the split
    L.seed_everything(0)
    straight = _model()
    _trainer(tmp_path / "a", max_epochs=4).fit(straight, data())

    L.seed_everything(0)
    first = _model()
    t1 = _trainer(tmp_path / "b", max_epochs=2)
    t1.fit(first, data())
    ckpt = tmp_path / "half.ckpt"
    t1.save_checkpoint(ckpt)
    L.seed_everything(123)  # a different process state must not matter
    resumed = _model()
    _trainer(tmp_path / "c", max_epochs=4).fit(resumed, data(), ckpt_path=ckpt)

    a, b = adapter_state_dict(straight), adapter_state_dict(resumed)
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)  # fp32 round-off
    torch.testing.assert_close(resumed.head.weight, straight.head.weight, rtol=1e-6, atol=1e-7)
    assert all(a[k].abs().sum() > 0 for k in a), "B starts at zero: every adapter tensor must have trained"


def test_non_finite_loss_stops_the_run_and_names_the_step(tmp_path: Path) -> None:
    model = _model(nan_at_step=2)
    with pytest.raises(NonFiniteLossError, match=r"global step 2 \(epoch 0, batch 2\)"):
        _trainer(tmp_path, max_steps=5).fit(model, ToyData())


def test_loading_adapters_onto_a_different_frozen_backbone_fails_clearly(tmp_path: Path) -> None:
    model = _model()
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(model, ToyData())
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    same = _model()
    _trainer(tmp_path).validate(same, ToyData(), ckpt_path=ckpt)  # rebuilt identically: loads
    other = _model(backbone_seed=1)
    with pytest.raises(RuntimeError, match="frozen backbone differs"):
        _trainer(tmp_path).validate(other, ToyData(), ckpt_path=ckpt)
    wrong = _model(adapter=LoRA(r=2, targets=["qkv"]))
    with pytest.raises(CheckpointMismatchError, match=r"mis-shaped keys \(\d+\): backbone\.blocks\.0\.attn\.qkv\.lora\.A: saved \(\d+, 64\), model \(2, 64\)"):
        _trainer(tmp_path).validate(wrong, ToyData(), ckpt_path=ckpt)


def test_heads_only_when_no_adapter_is_given() -> None:
    model = ToyViT(adapter=None)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["head.weight", "head.bias"]


def test_fit_counts_parameters_again_but_keeps_the_label_a_subclass_gave(tmp_path: Path) -> None:
    from suite.adapters import parameter_report

    model = _model(adapter=None)
    model.report = parameter_report(model, "linear probe")  # as a fine-tuning baseline labels itself
    model.head.requires_grad_(False)
    model.backbone.blocks[-1].requires_grad_(True)  # what trains changes after __init__
    _trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(model, ToyData())
    assert model.report.method == "linear probe"
    assert model.report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
