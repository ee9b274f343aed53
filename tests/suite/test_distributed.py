"""DDP and FSDP2 on CPU with 2 forked processes (gloo): parity across ranks and checkpoint round trips."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from suite.adapters import LoRA, adapter_state_dict
from suite.strategies import FSDP2Strategy
from tests.toy import ToyData, ToyViT


class RankProbe(L.Callback):
    """Writes, per rank: the adapter weights after training, the per-step losses, and whether
    gradients exist exactly for the trainable parameters."""

    def __init__(self, out: Path) -> None:
        self.out, self.losses, self.grad_ok = out, [], True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_after_backward(self, trainer, pl_module) -> None:
        for p in pl_module.parameters():
            self.grad_ok &= (p.grad is not None) == p.requires_grad

    def on_train_end(self, trainer, pl_module) -> None:
        state = {}
        for k, v in adapter_state_dict(pl_module.backbone).items():
            state[k] = v.full_tensor() if hasattr(v, "full_tensor") else v.detach().clone()
        torch.save(state, self.out / f"adapters_rank{trainer.global_rank}.pt")
        (self.out / f"log_rank{trainer.global_rank}.json").write_text(
            json.dumps({"losses": self.losses, "grad_ok": self.grad_ok})
        )


def _fit(tmp_path: Path, strategy, epochs: int = 4) -> tuple[L.Trainer, ToyViT]:
    L.seed_everything(0)
    model = ToyViT(adapter=LoRA(r=4, alpha=8, targets=["qkv"]), optimizer=lambda p: torch.optim.AdamW(p, lr=5e-3))
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=epochs, default_root_dir=tmp_path,
        enable_progress_bar=False, logger=False, enable_model_summary=False, callbacks=[RankProbe(tmp_path)],
    )
    trainer.fit(model, ToyData(n=64, batch_size=8))
    return trainer, model


def _per_rank(tmp_path: Path) -> tuple[list[dict], list[dict]]:
    states = [torch.load(tmp_path / f"adapters_rank{r}.pt", weights_only=True) for r in (0, 1)]
    logs = [json.loads((tmp_path / f"log_rank{r}.json").read_text()) for r in (0, 1)]
    return states, logs


def _assert_parity_and_learning(states: list[dict], logs: list[dict]) -> None:
    assert states[0].keys() == states[1].keys() and states[0]
    for k in states[0]:  # gradients are all-reduced, so the replicas must stay identical
        torch.testing.assert_close(states[0][k], states[1][k], rtol=0, atol=0)
    for log in logs:
        assert log["grad_ok"], "gradients must exist for trainable parameters only"
        first, last = sum(log["losses"][:3]) / 3, sum(log["losses"][-3:]) / 3
        assert last < first, f"loss did not go down: {log['losses']}"


def test_ddp_two_processes_keep_adapters_identical_and_learn(tmp_path: Path) -> None:
    _fit(tmp_path, "ddp_fork")
    _assert_parity_and_learning(*_per_rank(tmp_path))


def test_fsdp2_trains_shards_and_reloads_its_checkpoint(tmp_path: Path) -> None:
    trainer, _ = _fit(tmp_path, FSDP2Strategy(start_method="fork"), epochs=3)
    states, logs = _per_rank(tmp_path)
    _assert_parity_and_learning(states, logs)
    fitted_val = float(trainer.callback_metrics["val/loss"])

    ckpt = tmp_path / "checkpoints"
    (path,) = [p for p in ckpt.iterdir() if p.name != "last.ckpt"] or [ckpt / "last.ckpt"]
    assert path.is_dir(), "FSDP2 writes a sharded checkpoint folder"
    meta = torch.load(path / "meta.pt", weights_only=True)
    assert meta["suite"]["frozen_keys_dropped"] > 0

    # a fresh model (rebuilt frozen weights) + the sharded trainable state gives the same metrics
    L.seed_everything(0)
    fresh = ToyViT(adapter=LoRA(r=4, alpha=8, targets=["qkv"]))
    t2 = L.Trainer(accelerator="cpu", devices=2, strategy=FSDP2Strategy(start_method="fork"), logger=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    (res,) = t2.validate(fresh, ToyData(n=64, batch_size=8), ckpt_path=str(path))
    assert res["val/loss"] == pytest.approx(fitted_val, rel=1e-5)
