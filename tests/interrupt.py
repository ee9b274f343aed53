"""Test-only pieces for stopping a ``python -m suite fit`` at a known moment and killing it.

- :class:`StopInsideSave`: during the ``nth`` write of a checkpoint file named ``target`` it
  writes half the bytes into the temporary file, creates ``marker`` and sleeps, so the test can
  ``kill -9`` the process while the checkpoint is half written. It also checks that the run
  writes through :class:`suite.checkpoint.AtomicCheckpointIO` (the CLI's default).
- :class:`ResumableToyData`: ``tests.toy.ToyData`` whose training loader resumes inside an epoch
  (:class:`suite.checkpoint.ResumableDataLoader`), for the mid-epoch resume tests.
- :class:`AugmentedToyData`: the same with a random augmentation that draws from torch's,
  numpy's and Python's global generators, for the tests that resume random draws.
"""

from __future__ import annotations

import io
import os
import random
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from suite.checkpoint import AtomicCheckpointIO, ResumableDataLoader
from tests.toy import ToyData


class StopInsideSave(L.Callback):
    def __init__(self, marker: str, target: str = "last.ckpt", nth: int = 2, sleep_s: float = 300.0) -> None:
        self.marker, self.target, self.nth, self.sleep_s = Path(marker), target, nth, sleep_s
        self.count = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        ckpt_io = trainer.strategy.checkpoint_io
        ckpt_io = getattr(ckpt_io, "inner", ckpt_io)  # suite.strategies.ShardedCheckpointReader writes through its inner one
        if not isinstance(ckpt_io, AtomicCheckpointIO):
            raise TypeError(f"expected the run to write through AtomicCheckpointIO, got {type(ckpt_io).__name__}")
        save, write = ckpt_io.save_checkpoint, ckpt_io.write
        current: dict[str, str] = {}

        def save_checkpoint(checkpoint, path, storage_options=None):
            current["name"] = Path(path).name
            return save(checkpoint, path, storage_options)

        def slow_write(checkpoint, f):
            if current.get("name") == self.target:
                self.count += 1
                if self.count == self.nth:
                    buf = io.BytesIO()
                    torch.save(checkpoint, buf)
                    data = buf.getvalue()
                    f.write(data[: len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                    self.marker.write_text(f"{os.getpid()} {f.name}")
                    time.sleep(self.sleep_s)  # killed here
            write(checkpoint, f)

        ckpt_io.save_checkpoint, ckpt_io.write = save_checkpoint, slow_write


def resumable(loader: DataLoader) -> ResumableDataLoader:
    """The same loader (dataset, batch size, sampler, workers, collate) as a ResumableDataLoader."""
    if isinstance(loader, ResumableDataLoader):
        return loader
    return ResumableDataLoader(loader.dataset, batch_size=loader.batch_size, sampler=loader.sampler,
                               num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                               persistent_workers=loader.persistent_workers)


class ResumableToyData(ToyData):
    def train_dataloader(self) -> DataLoader:
        return resumable(super().train_dataloader())


class _Augmented(Dataset):
    """Noise (torch), a brightness factor (numpy) and a horizontal flip (Python's random) per item."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        x = x * float(np.random.uniform(0.8, 1.2)) + 0.05 * torch.randn_like(x)
        return (x.flip(-1) if random.random() < 0.5 else x), y


class AugmentedToyData(ResumableToyData):
    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.splits["train"] = _Augmented(self.splits["train"])
