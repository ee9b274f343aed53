"""DDP and FSDP2 on CPU with 2 forked processes (gloo): parity across ranks and with one process on the
same global batch, and checkpoint round trips."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from torch.utils.data import DataLoader

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


class GlobalOrderData(ToyData):
    """One process drawing the global order that a DDP run splits across its ranks.

    For training, Lightning wraps the sampler in ``DistributedSamplerWrapper(shuffle=True,
    seed=PL_GLOBAL_SEED)``: it permutes the sampler's (seed, epoch) order by ``randperm(n,
    seed + epoch)`` and gives rank r the items r, r + R, ... of the result. With one replica the
    same wrapper yields that whole permuted order, so step s of batch 2b holds exactly the items
    of step s of the two ranks' batches b.
    """

    def train_dataloader(self) -> DataLoader:
        dl = super().train_dataloader()
        order = DistributedSamplerWrapper(dl.sampler, num_replicas=1, rank=0, shuffle=True,
                                          seed=int(os.environ.get("PL_GLOBAL_SEED", 0)))
        return DataLoader(dl.dataset, batch_size=dl.batch_size, sampler=order)


def _fit(tmp_path: Path, strategy, epochs: int = 4, devices: int = 2, batch_size: int = 8,
         data: type[ToyData] = ToyData) -> tuple[L.Trainer, ToyViT]:
    L.seed_everything(0)
    model = ToyViT(adapter=LoRA(r=4, alpha=8, targets=["qkv"]), optimizer=lambda p: torch.optim.AdamW(p, lr=5e-3))
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_epochs=epochs, default_root_dir=tmp_path,
        enable_progress_bar=False, logger=False, enable_model_summary=False, callbacks=[RankProbe(tmp_path)],
        precision="32-true",
    )
    trainer.fit(model, data(n=64, batch_size=batch_size))
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


def test_ddp_two_processes_keep_adapters_identical_learn_and_equal_one_process_on_the_global_batch(tmp_path: Path) -> None:
    """2 ranks x batch 8 against 1 process x batch 16 on the same data and steps.

    Step s of the single process holds the 16 items of step s of the two ranks (GlobalOrderData);
    DDP averages the two ranks' mean-loss gradients, which is the gradient of the mean over the
    16. Only the order of float sums differs (gloo all-reduce, batch reductions), hence the
    tolerances, 10x what was measured: losses rtol 1e-6 (measured 1.1e-7), adapter weights
    atol 2e-6 after 12 AdamW steps (measured 2.2e-7 on weights up to 0.17). On the plain
    sampler order instead of the global one the losses differ by up to 0.27.
    """
    (tmp_path / "ddp").mkdir()
    _fit(tmp_path / "ddp", "ddp_fork")
    states, logs = _per_rank(tmp_path / "ddp")
    _assert_parity_and_learning(states, logs)

    (tmp_path / "one").mkdir()
    _fit(tmp_path / "one", "auto", devices=1, batch_size=16, data=GlobalOrderData)
    single = torch.load(tmp_path / "one" / "adapters_rank0.pt", weights_only=True)
    one_log = json.loads((tmp_path / "one" / "log_rank0.json").read_text())
    assert single.keys() == states[0].keys()
    assert len(one_log["losses"]) == len(logs[0]["losses"]) == 4 * 3  # same number of steps
    # the single process's loss is the mean of the two ranks' losses at every step
    both = [(a + b) / 2 for a, b in zip(logs[0]["losses"], logs[1]["losses"])]
    torch.testing.assert_close(torch.tensor(one_log["losses"]), torch.tensor(both), rtol=1e-6, atol=0)
    for k in single:
        assert single[k].abs().max() > 0
        torch.testing.assert_close(states[0][k], single[k], rtol=0, atol=2e-6)


def test_fsdp2_trains_shards_and_reloads_its_checkpoint(tmp_path: Path) -> None:
    trainer, _ = _fit(tmp_path, FSDP2Strategy(start_method="fork"), epochs=3)
    states, logs = _per_rank(tmp_path)
    _assert_parity_and_learning(states, logs)
    fitted_val = float(trainer.callback_metrics["val/loss"])

    ckpt = tmp_path / "checkpoints"
    # written 3 times (last.ckpt) into temporary folders swapped into place: none is left behind
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith(".")) == []
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
