"""EMATeacher: closed-form EMA updates, the m=0 / m=1 limits, and checkpoint/resume of the teacher."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from suite.callbacks import EMATeacher


class Regressor(L.LightningModule):
    """A student with a parameter, a BatchNorm (float + integer buffers) and a plain SGD step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.backbone(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Recorder(L.Callback):
    """Snapshots of the student after each optimiser step (runs before EMATeacher's update)."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states.append({k: v.clone() for k, v in pl_module.backbone.state_dict().items()})


def _loader(n: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g)), batch_size=4)


def _fit(model, callbacks, tmp_path, max_epochs=1, ckpt_path=None, **kw) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=max_epochs, callbacks=callbacks, default_root_dir=tmp_path, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kw,
    )
    trainer.fit(model, _loader(), ckpt_path=ckpt_path)
    return trainer


def _assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_momentum_zero_teacher_equals_student(tmp_path):
    model, ema = Regressor(), EMATeacher(momentum=0.0)
    _fit(model, [ema], tmp_path)
    _assert_state_equal(ema.teacher.state_dict(), model.backbone.state_dict())  # exact, buffers included


def test_momentum_one_teacher_stays_at_initial_weights(tmp_path):
    model, ema = Regressor(), EMATeacher(momentum=1.0)
    initial = copy.deepcopy(model.backbone.state_dict())
    _fit(model, [ema], tmp_path)
    _assert_state_equal(ema.teacher.state_dict(), initial)
    assert not torch.equal(model.backbone[0].weight, initial["0.weight"])  # the student did move


def test_intermediate_momentum_matches_closed_form(tmp_path):
    m = 0.7
    model, rec, ema = Regressor(), Recorder(), EMATeacher(momentum=m)
    expected = copy.deepcopy(model.backbone.state_dict())
    _fit(model, [rec, ema], tmp_path)
    assert len(rec.states) == 4
    for s in rec.states:  # t_k = m t_{k-1} + (1 - m) s_k ; the integer step counter is copied
        expected = {k: m * v + (1 - m) * s[k] if v.is_floating_point() else s[k].clone() for k, v in expected.items()}
    got = ema.teacher.state_dict()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6)


def test_teacher_is_frozen_and_outside_the_model(tmp_path):
    model, ema = Regressor(), EMATeacher(momentum=0.5)
    _fit(model, [ema], tmp_path)
    assert model.ema_teacher is ema.teacher
    assert not any(t.requires_grad for t in ema.tensors.values())
    assert not ema.teacher.training
    assert all(k.startswith("backbone.") for k in model.state_dict())  # no teacher keys in the model
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in model.backbone.parameters())
    # the teacher's forward is the student's network in eval mode with the teacher's tensors
    reference = copy.deepcopy(model.backbone).eval()
    reference.load_state_dict(ema.teacher.state_dict())
    x = torch.randn(5, 4)
    model.train()
    torch.testing.assert_close(ema.teacher(x), reference(x), rtol=0, atol=0)
    assert model.backbone.training  # the student's mode is restored after the teacher ran


class PartlyFrozen(Regressor):
    """A frozen first block (with its own BatchNorm) under a trained second one."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.backbone[:2].requires_grad_(False)


def test_teacher_copies_and_saves_only_the_trained_tensors(tmp_path):
    model, ema = PartlyFrozen(), EMATeacher(momentum=0.5)
    trainer = _fit(model, [ema], tmp_path)
    assert set(ema.tensors) == {"2.weight", "2.bias", "3.weight", "3.bias", "3.running_mean", "3.running_var", "3.num_batches_tracked"}
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    saved = torch.load(tmp_path / "m.ckpt", weights_only=True)["callbacks"][ema.state_key]["teacher"]
    assert set(saved) == set(ema.tensors)  # the frozen block is not saved twice
    full = ema.teacher.state_dict()
    assert torch.equal(full["0.weight"], model.backbone[0].weight)  # frozen: shared with the student


def test_resume_with_gradient_accumulation_updates_as_an_uninterrupted_run(tmp_path):
    """The first batch after a resume only accumulates; it must not add an EMA update."""
    kw = {"accumulate_grad_batches": 3}
    full_model, full_ema = Regressor(), EMATeacher(momentum=0.6)
    calls = []
    original = full_ema.update
    full_ema.update = lambda st: (calls.append(1), original(st))
    _fit(full_model, [full_ema], tmp_path / "a", max_epochs=2, **kw)

    model, ema = Regressor(), EMATeacher(momentum=0.6)
    trainer = _fit(model, [ema], tmp_path / "b", max_epochs=1, **kw)
    trainer.save_checkpoint(tmp_path / "b.ckpt")
    resumed_model, resumed_ema = Regressor(), EMATeacher(momentum=0.6)
    resumed_calls = []
    original_r = resumed_ema.update
    resumed_ema.update = lambda st: (resumed_calls.append(1), original_r(st))
    _fit(resumed_model, [resumed_ema], tmp_path / "c", max_epochs=2, ckpt_path=tmp_path / "b.ckpt", **kw)
    assert len(resumed_calls) == len(calls) // 2  # the second epoch's updates only
    for k, v in full_ema.tensors.items():
        torch.testing.assert_close(resumed_ema.tensors[k], v, rtol=0, atol=1e-7)


def test_a_different_configured_momentum_is_used_with_a_warning(tmp_path):
    model, ema = Regressor(), EMATeacher(momentum=0.6)
    trainer = _fit(model, [ema], tmp_path / "b", max_epochs=1)
    trainer.save_checkpoint(tmp_path / "b.ckpt")
    other = EMATeacher(momentum=0.9)
    with pytest.warns(UserWarning, match="momentum 0.6; continuing with the configured 0.9"):
        _fit(Regressor(), [other], tmp_path / "c", max_epochs=2, ckpt_path=tmp_path / "b.ckpt")
    assert other.momentum == 0.9


def test_gradient_accumulation_updates_once_per_optimiser_step(tmp_path):
    model, ema = Regressor(), EMATeacher(momentum=0.5)
    calls = []
    original = ema.update
    ema.update = lambda student: (calls.append(1), original(student))
    _fit(model, [ema], tmp_path, accumulate_grad_batches=2)
    assert len(calls) == 2  # 4 batches, 2 optimiser steps


def test_teacher_survives_checkpoint_and_resume(tmp_path):
    full_model, full_ema = Regressor(), EMATeacher(momentum=0.6)
    _fit(full_model, [full_ema], tmp_path / "a", max_epochs=2)

    model, ema = Regressor(), EMATeacher(momentum=0.6)
    trainer = _fit(model, [ema], tmp_path / "b", max_epochs=1)
    trainer.save_checkpoint(tmp_path / "b.ckpt")
    saved = torch.load(tmp_path / "b.ckpt", weights_only=True)["callbacks"][ema.state_key]["teacher"]
    _assert_state_equal(saved, ema.tensors)

    resumed_model, resumed_ema = Regressor(), EMATeacher(momentum=0.6)
    _fit(resumed_model, [resumed_ema], tmp_path / "c", max_epochs=2, ckpt_path=tmp_path / "b.ckpt")
    for k, v in full_ema.teacher.state_dict().items():
        torch.testing.assert_close(resumed_ema.teacher.state_dict()[k], v, rtol=0, atol=1e-7)


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="momentum"):
        EMATeacher(momentum=1.5)
    with pytest.raises(AttributeError, match="no submodule 'encoder'"):
        EMATeacher(student="encoder").on_fit_start(L.Trainer(logger=False), Regressor())
