"""No run lost to a kill: atomic checkpoint files and folders, exact mid-epoch resume (also after a
real ``kill -9``), and the CLI's checkpoint errors (a checkpoint of another config, ``best``
without a monitor)."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

import suite.checkpoint as checkpoint_module
from suite.adapters import LoRA, adapter_state_dict
from suite.checkpoint import PARTIAL_SUFFIX, AtomicCheckpointIO, ResumableDataLoader, SuiteTrainer, replace_folder
from suite.cli import main
from tests.interrupt import AugmentedToyData, ResumableToyData
from tests.suite.test_cli import TOY
from tests.toy import ToyViT

ROOT = Path(__file__).resolve().parents[2]


def _model() -> ToyViT:
    return ToyViT(adapter=LoRA(r=4, alpha=8, targets=["qkv"]), optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))


def _trainer(root: Path, callbacks: list, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, default_root_dir=root, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, precision="32-true", callbacks=callbacks, **kw)


# --- atomic files and folders -------------------------------------------------------------
class HalfWriteFails(AtomicCheckpointIO):
    """Writes half of the serialised checkpoint, then fails like a full disk, at its ``fail_at``-th write."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at, self.written = fail_at, []

    def write(self, checkpoint, f) -> None:
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        data = buf.getvalue()
        if len(self.written) + 1 == self.fail_at:
            f.write(data[: len(data) // 2])
            f.flush()
            self.half = data[: len(data) // 2]
            raise OSError(errno.ENOSPC, "No space left on device (injected half-way through the write)")
        f.write(data)
        self.written.append(data)


def test_a_write_failing_half_way_leaves_the_previous_last_ckpt_loadable_with_its_values(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "checkpoints"
    plugin = HalfWriteFails(fail_at=2)
    L.seed_everything(0)
    model = _model()
    every_step = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=1)
    with pytest.raises(OSError, match="injected half-way"):
        _trainer(tmp_path, [every_step], max_steps=3, plugins=[plugin]).fit(model, ResumableToyData())

    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt"], "the temporary file is removed on error"
    with pytest.raises(Exception):  # what a write in place would have left: not a checkpoint
        torch.load(io.BytesIO(plugin.half), weights_only=True)
    loaded = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    first = torch.load(io.BytesIO(plugin.written[0]), weights_only=True)
    assert loaded["global_step"] == 1
    assert loaded["state_dict"].keys() == first["state_dict"].keys() and loaded["state_dict"]
    for k, v in first["state_dict"].items():
        assert torch.equal(loaded["state_dict"][k], v), k
    # the model moved on (step 2 ran before its save failed): the file holds step 1's values, not the model's
    now = {f"backbone.{k}": v for k, v in adapter_state_dict(model.backbone).items()}
    assert any(not torch.equal(now[k], loaded["state_dict"][k]) for k in now)


def test_replace_folder_swaps_a_finished_folder_in_by_exchange_or_by_two_renames(tmp_path: Path, monkeypatch) -> None:
    def folder(path: Path, **files: str) -> Path:
        path.mkdir()
        for name, text in files.items():
            (path / name).write_text(text)
        return path

    for exchange in (True, False):
        if not exchange:
            monkeypatch.setattr(checkpoint_module, "_exchange", lambda a, b: False)  # a platform without renameat2
        root = tmp_path / f"exchange_{exchange}"
        root.mkdir()
        dest = folder(root / "last.ckpt", **{"__0_0.distcp": "old shard", "meta.pt": "old"})
        replace_folder(folder(root / ".last.ckpt.ab12.partial", **{"__0_0.distcp": "new shard"}), dest)
        assert {p.name: p.read_text() for p in dest.iterdir()} == {"__0_0.distcp": "new shard"}
        assert [p.name for p in root.iterdir()] == ["last.ckpt"], "the old folder is deleted, nothing left aside"
    # a single-file checkpoint of the same name gives way to a folder
    (tmp_path / "one.ckpt").write_bytes(b"file")
    replace_folder(folder(tmp_path / "shards", x="y"), tmp_path / "one.ckpt")
    assert (tmp_path / "one.ckpt" / "x").read_text() == "y" and not (tmp_path / "shards").exists()


def test_a_run_killed_mid_write_leaves_a_partial_file_that_the_next_write_removes(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)
    stale = tmp_path / f".last.ckpt.dead{PARTIAL_SUFFIX}"
    stale.write_bytes(b"half")  # what kill -9 leaves behind
    assert ModelCheckpoint(dirpath=tmp_path)._find_last_checkpoints(None) == {str(path)}, "never a --ckpt_path last candidate"
    AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    assert not stale.exists() and torch.load(path, weights_only=True) == {"step": 2}
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask()), "the usual permissions, not mkstemp's 0600"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- resuming inside an epoch -------------------------------------------------------------
class Seen(L.Callback):
    """The training batches, in order, with the global step they were used at."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append((trainer.global_step, batch[0].clone()))


class Crash(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 5:
            raise RuntimeError("crash after the step-4 checkpoint")


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_resuming_from_a_mid_epoch_checkpoint_continues_at_the_next_batch(tmp_path: Path) -> None:
    """6 steps per epoch, 2 epochs, a checkpoint every 2 steps and a crash at step 5: the resumed
    run trains on batches 5..12 of the uninterrupted run, and ends with the same adapters."""

    def fit(root: Path, *extra: L.Callback, ckpt_path: Path | None = None) -> tuple[ToyViT, Seen]:
        L.seed_everything(0)
        model, seen = _model(), Seen()
        every_2 = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=-1, every_n_train_steps=2)
        _trainer(root, [seen, every_2, *extra], max_epochs=2).fit(model, ResumableToyData(n=64), ckpt_path=ckpt_path)
        return model, seen

    straight, seen_straight = fit(tmp_path / "straight")
    with pytest.raises(RuntimeError, match="crash after"):
        fit(tmp_path / "crashed", Crash())
    ckpt = torch.load(tmp_path / "crashed" / "last.ckpt", weights_only=True)
    assert (ckpt["global_step"], ckpt["epoch"]) == (4, 0)  # mid-epoch: 4 of 6 batches
    assert [s["batches_yielded"] for s in ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]] == [4]
    resumed, seen_resumed = fit(tmp_path / "crashed", ckpt_path=tmp_path / "crashed" / "last.ckpt")

    later = [(s, b) for s, b in seen_straight.batches if s >= 4]
    assert [s for s, _ in seen_resumed.batches] == [s for s, _ in later] == list(range(4, 12))
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(seen_resumed.batches, later))
    a, b = adapter_state_dict(straight), adapter_state_dict(resumed)
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)  # same arithmetic, same order: bit-equal
    assert torch.equal(resumed.head.weight, straight.head.weight)


def test_resumable_loader_skips_indices_only_for_the_first_pass_after_a_restore() -> None:
    data = list(range(10))
    loader = ResumableDataLoader(data, batch_size=3)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    assert state["batches_yielded"] == 2
    fresh = ResumableDataLoader(data, batch_size=3)
    fresh.load_state_dict(state)
    assert [b.tolist() for b in fresh] == [[6, 7, 8], [9]]
    assert len(fresh) == 4 and [b.tolist() for b in fresh][0] == [0, 1, 2]  # the next epoch is whole
    done = ResumableDataLoader(data, batch_size=3)
    done.load_state_dict({"batches_yielded": 4})  # saved after the epoch's last batch
    assert len(list(done)) == 4


class CrashAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"crash at step {self.step}")


class ScheduledToyViT(ToyViT):
    """A schedule as long as the fit: ``configure_optimizers`` asks for ``estimated_stepping_batches``,
    so Lightning builds the training loader before a resumed run's loop state is loaded."""

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.param_groups(), lr=3e-3)
        total = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {
            "scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / (total + 1)), "interval": "step"}}


def _fit_random(root: Path, every: int, *extra: L.Callback, ckpt_path: Path | None = None, scheduled: bool = False,
                trainer_class: type[L.Trainer] = SuiteTrainer) -> tuple[ToyViT, Seen]:
    """ToyViT with LoRA dropout (torch's global generator) on AugmentedToyData (torch, numpy and
    Python draws per item), 6 steps per epoch, 2 epochs, a checkpoint every ``every`` steps."""
    L.seed_everything(0)
    model = (ScheduledToyViT if scheduled else ToyViT)(adapter=LoRA(r=4, alpha=8, targets=["qkv"], dropout=0.3),
                                                       optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    ckpt, seen = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=-1, every_n_train_steps=every), Seen()
    trainer_class(accelerator="cpu", devices=1, default_root_dir=root, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, precision="32-true", callbacks=[seen, ckpt, *extra], max_epochs=2,
                  ).fit(model, AugmentedToyData(n=64), ckpt_path=ckpt_path)
    return model, seen


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.parametrize("every, crash", [(4, 5), (6, 7)], ids=["inside-an-epoch", "at-an-epoch-end"])
def test_a_resumed_run_continues_the_random_draws_of_dropout_and_augmentation(tmp_path: Path, every: int, crash: int) -> None:
    """The checkpoint carries the global random states, so a resumed run draws the same dropout
    masks and augmentations as the uninterrupted one and ends bit-equal (tolerance 0). Without the
    saved states the same resume ends elsewhere, so the comparison can fail."""
    straight = adapter_state_dict(_fit_random(tmp_path / "straight", every)[0])
    with pytest.raises(RuntimeError, match="crash at"):
        _fit_random(tmp_path / "crashed", every, CrashAt(crash))
    last = tmp_path / "crashed" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)  # the states are plain tensors and tuples
    assert ckpt["global_step"] == every
    (loader_state,) = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    (states,) = loader_state["random"]  # one process: one rank's states
    assert set(states["now"]) >= {"torch", "numpy", "python"} and states["iter"].dtype == torch.uint8
    resumed = adapter_state_dict(_fit_random(tmp_path / "crashed", every, ckpt_path=last)[0])
    assert straight.keys() == resumed.keys() and straight
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=0)

    del loader_state["random"]  # a checkpoint without them: dropout and augmentation draw afresh
    torch.save(ckpt, tmp_path / "without-rng.ckpt")
    blind = adapter_state_dict(_fit_random(tmp_path / "blind", every, ckpt_path=tmp_path / "without-rng.ckpt")[0])
    assert any(not torch.equal(blind[k], straight[k]) for k in straight)


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_a_model_whose_schedule_counts_the_batches_resumes_at_the_next_batch_under_suite_trainer(tmp_path: Path) -> None:
    """``estimated_stepping_batches`` in ``configure_optimizers`` makes Lightning build the training
    loader before the restore and then skip its saved state: under ``L.Trainer`` the resumed run
    starts the epoch over. SuiteTrainer (the CLI's) continues at step 4's batch and ends bit-equal."""
    model, seen = _fit_random(tmp_path / "straight", 4, scheduled=True)
    with pytest.raises(RuntimeError, match="crash at"):
        _fit_random(tmp_path / "crashed", 4, CrashAt(5), scheduled=True)
    last = tmp_path / "crashed" / "last.ckpt"
    later = [b for s, b in seen.batches if s >= 4]
    for trainer_class, same in ((L.Trainer, False), (SuiteTrainer, True)):
        resumed, seen_resumed = _fit_random(tmp_path / trainer_class.__name__, 4, ckpt_path=last, scheduled=True,
                                            trainer_class=trainer_class)
        assert [s for s, _ in seen_resumed.batches] == list(range(4, 12))
        assert torch.equal(seen_resumed.batches[0][1], later[0]) is same, trainer_class.__name__
        a, b = adapter_state_dict(model), adapter_state_dict(resumed)
        assert all(torch.equal(a[k], b[k]) for k in a) is same, trainer_class.__name__


def test_a_resume_on_another_number_of_ranks_warns_and_takes_rank_r_mod_n_states() -> None:
    import warnings

    from suite.checkpoint import rng_states

    saved = [{"now": rng_states(), "iter": None}, {"now": rng_states(), "iter": torch.get_rng_state()}]
    loader = ResumableDataLoader(list(range(10)), batch_size=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader.load_state_dict({"batches_yielded": 1, "random": saved})
    assert any("2 rank(s) and this run has 1" in str(w.message) for w in caught)
    assert loader._restore["rng"] is saved[0]["now"] and loader._restore["iter_rng"] is None


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path: Path) -> None:
    import random

    import numpy as np

    from suite.checkpoint import rng_states, set_rng_states

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.save(rng_states(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


# --- the CLI ------------------------------------------------------------------------------
def _toy(root: Path) -> dict:
    cfg = json.loads(json.dumps(TOY))
    cfg["trainer"]["default_root_dir"] = str(root)
    cfg["trainer"]["precision"] = "32-true"
    return cfg


def _write_config(tmp_path: Path, root: Path, name: str = "toy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(_toy(root)))
    return path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A toy fit (2 epochs, monitoring val/loss): its config and run folder."""
    tmp = tmp_path_factory.mktemp("fitted")
    cfg = _write_config(tmp, tmp / "run")
    main(["fit", "--config", str(cfg), "--trainer.max_epochs", "2", "--checkpoint.monitor", "val/loss"])
    return cfg, tmp / "run"


def test_every_cli_run_writes_through_atomic_checkpoint_io_unless_given_another(tmp_path: Path, capsys) -> None:
    cfg = _write_config(tmp_path, tmp_path / "run")
    cli = main(["--config", str(cfg)], run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    with_env = main(["--config", str(cfg), "--trainer.plugins", "lightning.pytorch.plugins.environments.LightningEnvironment"], run=False)
    assert type(with_env.trainer.strategy.checkpoint_io) is AtomicCheckpointIO  # other plugins: ours is added
    own = main(["--config", str(cfg), "--trainer.plugins", "lightning.fabric.plugins.TorchCheckpointIO"], run=False)
    assert type(own.trainer.strategy.checkpoint_io) is TorchCheckpointIO  # the user's CheckpointIO is kept
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(cfg), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["plugins"] == [{"class_path": "suite.checkpoint.AtomicCheckpointIO"}]


def test_a_checkpoint_of_another_backbone_or_config_is_a_usage_error_listing_the_keys(fitted, capsys) -> None:
    cfg, run = fitted
    last = str(run / "checkpoints" / "last.ckpt")
    for args, needles in [
        (["--model.init_args.adapter.init_args.r", "8"],  # another adapter config
         ["mis-shaped keys", "backbone.blocks.0.attn.qkv.lora.A: saved (4, 64), model (8, 64)"]),
        (["--model.init_args.model_name", "test_vit2"],  # another backbone (8 blocks, not 6)
         ["missing keys (4): backbone.blocks.6.attn.qkv.lora.A", "backbone.blocks.7.attn.qkv.lora.B"]),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(["test", "--config", str(cfg), *args, "--ckpt_path", last])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "usage:" in err and f"error: test --ckpt_path {last}: the checkpoint does not fit" in err
        assert all(n in err for n in needles), err
        assert "Traceback" not in err


def test_ckpt_path_best_without_a_monitor_fails_before_any_work_naming_the_fix(fitted, tmp_path: Path, capsys) -> None:
    cfg, run = fitted
    fresh = _write_config(tmp_path, tmp_path / "run")
    with pytest.raises(SystemExit) as exit_:
        main(["test", "--config", str(fresh), "--ckpt_path", "best"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--ckpt_path best needs a monitored metric" in err and "--checkpoint.monitor val/loss" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists(), "nothing was built or written"

    # with the monitor, `best` is the best checkpoint the fit recorded in last.ckpt
    states = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    (best,) = [s["best_model_path"] for k, s in states.items() if k.startswith("ModelCheckpoint")]
    cli = main(["test", "--config", str(cfg), "--ckpt_path", "best", "--checkpoint.monitor", "val/loss"])
    assert cli.trainer.ckpt_path == best and Path(best).name.startswith("epoch=")
    assert "test/loss" in cli.trainer.callback_metrics


# --- a real kill -9 -----------------------------------------------------------------------
@pytest.mark.slow
def test_kill_9_while_last_ckpt_is_written_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    """``python -m suite fit`` (2 epochs of 6 steps, a checkpoint every 4 steps, fp32) is killed
    with SIGKILL while it writes last.ckpt at step 8, half of the bytes on disk. The previous
    last.ckpt (step 4, mid-epoch) loads, ``--ckpt_path last`` resumes from it, and the final
    adapters and head equal an uninterrupted run's bit for bit."""
    marker = tmp_path / "inside_save"
    killed_root, straight_root = tmp_path / "killed", tmp_path / "straight"
    cfg = _toy(killed_root)
    cfg["data"] = {"class_path": "tests.interrupt.ResumableToyData", "init_args": {"n": 64}}  # 48 train: 6 steps
    cfg["trainer"]["max_epochs"] = 2
    cfg["checkpoint"] = {"every_n_train_steps": 4}
    plain, killed = tmp_path / "plain.yaml", tmp_path / "killed.yaml"
    plain.write_text(yaml.safe_dump(cfg))
    cfg["trainer"]["callbacks"] = [{"class_path": "tests.interrupt.StopInsideSave",
                                    "init_args": {"marker": str(marker), "target": "last.ckpt", "nth": 2}}]
    killed.write_text(yaml.safe_dump(cfg))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "suite", "fit", "--config", str(killed)], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, f"the run ended before the save:\n{(tmp_path / 'killed.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the run never reached the second last.ckpt write"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    folder = killed_root / "checkpoints"
    partial = Path(marker.read_text().split()[1])
    assert partial.parent == folder and partial.name.startswith(".last.ckpt.") and partial.stat().st_size > 0
    with pytest.raises(Exception):
        torch.load(partial, weights_only=True)  # half a checkpoint: had it been last.ckpt, the run was lost
    previous = torch.load(folder / "last.ckpt", weights_only=True)
    assert (previous["global_step"], previous["epoch"]) == (4, 0)
    assert [s["batches_yielded"] for s in previous["loops"]["fit_loop"]["state_dict"]["combined_loader"]] == [4]

    resumed = main(["fit", "--config", str(plain), "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 12
    assert not list(folder.glob(f"*{PARTIAL_SUFFIX}")), "the next write of last.ckpt removes the stale partial"
    main(["fit", "--config", str(plain), "--trainer.default_root_dir", str(straight_root)])

    a = torch.load(straight_root / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(folder / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and any(".lora." in k for k in a) and "head.weight" in a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
