"""Data helpers every domain shares: group-aware seeded splits, split hashes, the generated-data
cache and a sampler whose order depends only on (seed, epoch), so resumed runs see the same batches.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from suite.checkpoint import ResumableDataLoader

class DataFormatError(ValueError):
    """A data file that does not hold what its format promises. Every reader raises this (or a
    subclass) instead of a library's traceback; the message names the file, the field and the
    expected form, e.g. ``data/fold1/masks.npy: field 'inst_map' holds NaN; expected integer ids >= 0``."""

    def __init__(self, path: str | Path, field: str | None, problem: str) -> None:
        where = f"{path}: field {field!r}" if field else f"{path}"
        super().__init__(f"{where}: {problem}")
        self.path, self.field = str(path), field


#: Root of generated datasets; override with the SUITE_DATA_DIR environment variable.
DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def data_dir() -> Path:
    return Path(os.environ.get("SUITE_DATA_DIR", DEFAULT_DATA_DIR))


def generated_dir(name: str) -> Path:
    """``data/generated/<name>``: the git-ignored cache that generators write to once."""
    path = data_dir() / "generated" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def cached(path: str | Path, build: Callable[[Path], None]) -> Path:
    """Return ``path``, building it first with ``build(tmp_path)`` if it does not exist.

    The build writes to a temporary sibling (a file or a folder) that is renamed into place, so an
    interrupted generator never leaves a half-written cache that later runs would trust; the
    temporary is removed if the build fails. When several processes (DDP ranks) build the same
    cache at once, the first rename wins and the others keep it.
    """
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        build(tmp)
        try:
            os.replace(tmp, path)
        except OSError:  # a folder cannot replace a non-empty one: another process finished first
            if not path.exists():
                raise
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    return path


def split_by_group(
    groups: Sequence[Any] | np.ndarray,
    fractions: Mapping[str, float],
    seed: int,
) -> dict[str, np.ndarray]:
    """Split item indices so that every group (patient, slide, dialogue) lands in one split only.

    Groups are shuffled with ``seed`` and assigned to splits in order until each split's share of
    *items* reaches its fraction. Returns sorted index arrays keyed like ``fractions``.
    """
    total = sum(fractions.values())
    if not np.isclose(total, 1.0):
        raise ValueError(f"split fractions must sum to 1, got {dict(fractions)} (sum {total})")
    groups = np.asarray(groups)
    uniq, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    if len(uniq) < len(fractions):
        raise ValueError(f"{len(uniq)} groups cannot fill {len(fractions)} splits {list(fractions)}")
    order = np.random.default_rng(seed).permutation(len(uniq))
    names = list(fractions)
    bounds = np.cumsum([fractions[n] for n in names]) * len(groups)
    assignment = np.empty(len(uniq), dtype=np.int64)
    split, filled, taken = 0, 0, 0
    for rank, g in enumerate(order):
        # advance (one split per group, so none is skipped) once this split holds its share,
        # or when the groups left are just enough to give every later split one
        later = len(names) - 1 - split
        if later and taken and (filled >= bounds[split] - 1e-9 or len(order) - rank <= later):
            split, taken = split + 1, 0
        assignment[g] = split
        filled += counts[g]
        taken += 1
    item_split = assignment[inverse]
    return {n: np.flatnonzero(item_split == i) for i, n in enumerate(names)}


def split_hash(ids: Sequence[Any] | np.ndarray) -> str:
    """A short, order-independent fingerprint of the items in a split (sha256 of sorted ids)."""
    items = sorted(str(i) for i in np.asarray(ids).tolist())
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def file_hash(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (first 16 hex digits), to record exactly which data a run read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


class EpochSeededSampler(Sampler[int]):
    """A shuffling sampler whose order is a function of ``(seed, epoch)`` only.

    Lightning calls ``set_epoch`` every epoch, so a run resumed from a checkpoint draws the same
    batches as an uninterrupted one (inside an epoch too, with
    :class:`suite.checkpoint.ResumableDataLoader`, which :meth:`SuiteDataModule.loader` uses).
    Under DDP, Lightning wraps every training sampler in a ``DistributedSamplerWrapper`` seeded by
    the global seed, which reshuffles this order before giving each rank its share: runs stay
    deterministic and resume exactly, but 2 ranks see another order than 1 process does.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class SuiteDataModule(L.LightningDataModule):
    """Base DataModule: batch size, workers, seeded loaders and the split hashes a run records.

    Subclasses fill ``self.splits`` (name -> Dataset) in ``setup`` and call
    :meth:`record_split` for each split with the ids of its items.
    """

    def __init__(self, batch_size: int = 8, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.splits: dict[str, Dataset] = {}
        self.split_hashes: dict[str, str] = {}
        self.split_sizes: dict[str, int] = {}

    def record_split(self, name: str, ids: Sequence[Any] | np.ndarray) -> None:
        self.split_hashes[name] = split_hash(ids)
        self.split_sizes[name] = len(ids)

    def _split(self, name: str) -> Dataset:
        if name not in self.splits:
            raise RuntimeError(f"{type(self).__name__} has no {name!r} split (have {sorted(self.splits)}); was setup() run?")
        return self.splits[name]

    def loader(self, name: str, shuffle: bool = False, collate_fn: Callable | None = None, **kwargs: Any) -> DataLoader:
        ds = self._split(name)
        sampler = EpochSeededSampler(len(ds), self.seed, shuffle=True) if shuffle else None
        # a shuffled (training) loader resumes inside an epoch at the batch it had reached
        cls = ResumableDataLoader if shuffle else DataLoader
        return cls(
            ds,
            batch_size=kwargs.pop("batch_size", self.batch_size),
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_fn,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.loader("predict" if "predict" in self.splits else "test")
