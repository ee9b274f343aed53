"""FSDP2 beyond the toy fit (2 forked CPU processes, gloo): the EMA teacher on sharded parameters
and across a resume, and the interchange of a sharded checkpoint into a 1-process run."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from safetensors.torch import load_file

from suite.adapters import LoRA, adapter_state_dict, export_peft, save_adapters
from suite.callbacks import EMATeacher
from suite.strategies import FSDP2Strategy, ShardedCheckpointReader, consolidate_checkpoint, full_tensor
from tests.toy import ToyData, ToyViT


def _toy(**kw) -> ToyViT:
    return ToyViT(adapter=LoRA(r=4, alpha=8, targets=["qkv"]), optimizer=lambda p: torch.optim.AdamW(p, lr=5e-3), **kw)


def _trainer(root: Path, callbacks: list, devices: int = 2, epochs: int = 2) -> L.Trainer:
    strategy = FSDP2Strategy(start_method="fork") if devices > 1 else "auto"
    return L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=epochs, default_root_dir=root,
                     enable_progress_bar=False, logger=False, enable_model_summary=False, callbacks=callbacks,
                     precision="32-true")


class TeacherProbe(L.Callback):
    """After training, per rank: the teacher's output through the sharded model, the same teacher
    run the 1-process way (``functional_call`` on an unsharded copy of the model holding the
    gathered teacher tensors), and the student's output, on one fixed batch."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:
        ema = next(c for c in trainer.callbacks if isinstance(c, EMATeacher))
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
        sharded = pl_module.ema_teacher(x)
        full = {k: full_tensor(v).clone() for k, v in ema.tensors.items()}
        assert all(type(v) is not torch.Tensor for v in ema.tensors.values() if v.is_floating_point()), "copies are sharded"
        pl_module.unshard()  # the backbone's stem lives in the root unit: gathered as inside a step
        with torch.no_grad():
            student = pl_module.backbone(x)
        pl_module.fsdp_reshard()
        reference = _toy().backbone.eval()  # unsharded, same seeded frozen weights
        with torch.no_grad():
            single = torch.func.functional_call(reference, full, (x,), strict=False)
        torch.save({"sharded": sharded, "single": single, "student": student}, self.out / f"teacher{trainer.global_rank}.pt")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One FSDP2 fit (2 ranks, 2 epochs, an EMA teacher of momentum 0.5 and its probe) for the tests below."""
    root = tmp_path_factory.mktemp("fsdp2_fit")
    L.seed_everything(0)
    _trainer(root, [EMATeacher(student="backbone", momentum=0.5), TeacherProbe(root)]).fit(_toy(), ToyData(n=64, batch_size=8))
    return root


@pytest.mark.slow
def test_ema_teacher_under_fsdp2_runs_its_own_weights_as_one_process_would(fitted: Path) -> None:
    """The teacher's forward on sharded parameters equals the 1-process teacher (functional_call
    over the full tensors on an unsharded model) to float rounding (atol 1e-5: the same ops,
    gathered weights), and is not the student's (which moved 2 epochs of lr 5e-3 away)."""
    for rank in (0, 1):
        out = torch.load(fitted / f"teacher{rank}.pt", weights_only=True)
        torch.testing.assert_close(out["sharded"], out["single"], rtol=0, atol=1e-5)
        assert (out["sharded"] - out["student"]).abs().max() > 1e-3, "the teacher ran the student's weights"


@pytest.mark.slow
def test_ema_teacher_resumes_under_fsdp2_with_the_saved_teacher(tmp_path: Path) -> None:
    """FSDP2 restores callback state after on_fit_start; the resumed teacher is still the saved one
    (momentum 1: the teacher stays the weights it started from, so after a resume it must equal
    the teacher of the first run, not the resumed student's weights)."""
    L.seed_everything(0)
    _trainer(tmp_path / "a", [EMATeacher(student="backbone", momentum=1.0)], epochs=1).fit(_toy(), ToyData(n=64, batch_size=8))
    (ckpt,) = (tmp_path / "a" / "checkpoints").iterdir()
    L.seed_everything(0)
    _trainer(tmp_path / "b", [EMATeacher(student="backbone", momentum=1.0)]).fit(_toy(), ToyData(n=64, batch_size=8),
                                                                             ckpt_path=str(ckpt))
    # read after the last fork: tensor work in this process first would hand the forked ranks
    # an OpenMP pool they cannot use
    (resumed,) = (tmp_path / "b" / "checkpoints").iterdir()
    first, second = consolidate_checkpoint(ckpt), consolidate_checkpoint(resumed)
    key = next(k for k in first["callbacks"] if k.startswith("EMATeacher"))
    t1, t2 = first["callbacks"][key]["teacher"], second["callbacks"][key]["teacher"]
    assert t1.keys() == t2.keys() and t1
    for k in t1:
        torch.testing.assert_close(t2[k], t1[k], rtol=0, atol=0)
    moved = [k for k in t1 if not torch.equal(second["state_dict"][f"backbone.{k}"], t1[k])]
    assert moved, "the student trained on after the resume"


@pytest.mark.slow
def test_a_sharded_checkpoint_loads_into_one_process_test_and_exports_its_adapters(fitted: Path, tmp_path: Path) -> None:
    """FSDP2 fit (2 ranks) -> its sharded folder -> a 1-process ``test`` (through
    ShardedCheckpointReader, which ``python -m suite`` installs) that loads exactly the saved
    adapters and gives the test loss of the same tensors loaded by hand; then save_adapters
    and the PEFT export."""
    (folder,) = (fitted / "checkpoints").iterdir()
    assert (folder / ".metadata").is_file()
    saved = consolidate_checkpoint(folder)
    assert "optimizer_0" not in saved and saved["global_step"] == 2 * 3

    fresh = _toy()
    one = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=tmp_path / "one", plugins=[ShardedCheckpointReader(TorchCheckpointIO())])
    (res,) = one.test(fresh, ToyData(n=64, batch_size=8), ckpt_path=str(folder))
    adapters = adapter_state_dict(fresh.backbone)
    assert adapters
    for k, v in adapters.items():
        torch.testing.assert_close(v, saved["state_dict"][f"backbone.{k}"], rtol=0, atol=0)
    # the same checkpoint read the 1-process way gives the same test loss
    direct = _toy()
    direct.load_state_dict(saved["state_dict"], strict=False)
    (again,) = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False).test(direct, ToyData(n=64, batch_size=8))
    assert res["test/loss"] == pytest.approx(again["test/loss"], rel=1e-6)

    out = save_adapters(fresh.backbone, tmp_path / "adapters")
    written = load_file(str(out / "adapters.safetensors"))
    assert written.keys() == adapters.keys()
    peft = export_peft(fresh.backbone, tmp_path / "peft")
    config = json.loads((peft / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"


@pytest.mark.slow
def test_python_m_suite_tests_an_fsdp2_checkpoint_on_one_process(tmp_path: Path) -> None:
    """``fit`` under the FSDP2 preset on 2 CPU processes, then ``test --ckpt_path last`` with the
    plain 1-process config reads the sharded folder: the loss of the consolidated tensors loaded
    by hand. ``fit --ckpt_path`` on one process refuses it with the fix (a usage error)."""
    import yaml

    from suite.cli import main
    from tests.suite.test_cli import ROOT, TOY

    cfg = json.loads(json.dumps(TOY))
    cfg["trainer"]["default_root_dir"] = str(tmp_path / "run")
    toy = tmp_path / "toy.yaml"
    toy.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(toy), "--config", str(ROOT / "configs" / "trainer" / "fsdp.yaml"), "--trainer.accelerator", "cpu",
          "--trainer.devices", "2", "--trainer.precision", "32-true", "--trainer.strategy.init_args.start_method", "fork"])
    folder = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert (folder / ".metadata").is_file()
    cli = main(["test", "--config", str(toy), "--trainer.precision", "32-true", "--ckpt_path", "last"])
    assert cli.trainer.world_size == 1
    by_hand = ToyViT(adapter=LoRA(r=4, alpha=8, targets=["qkv"]))
    by_hand.load_state_dict(consolidate_checkpoint(folder)["state_dict"], strict=False)
    (again,) = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         precision="32-true").test(by_hand, cli.datamodule)
    assert float(cli.trainer.callback_metrics["test/loss"]) == pytest.approx(again["test/loss"], rel=1e-6)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(toy), "--ckpt_path", str(folder)])
    assert exit_.value.code == 2
