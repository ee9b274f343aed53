"""Checkpoints that survive a kill: atomic files and folders, and the position inside an epoch.

* :class:`AtomicCheckpointIO` writes every checkpoint file of a ``python -m suite`` run (the CLI
  installs it): the bytes go to a temporary file in the checkpoint's own folder, are fsynced, and
  the file is renamed over the old one with :func:`os.replace`, so a kill at any moment leaves
  either the previous ``last.ckpt`` or the new one, never a truncated file.
* :func:`replace_folder` does the same for a folder (FSDP2's sharded checkpoints, see
  :meth:`suite.strategies.FSDP2Strategy.save_checkpoint`): on Linux one ``renameat2`` swap.
* :class:`ResumableDataLoader` counts the batches it has handed out in the current epoch and says
  so in the checkpoint, so a run resumed from a checkpoint written mid-epoch continues at the next
  batch. A plain ``DataLoader`` is restarted from the epoch's first batch by Lightning, which then
  trains on the first batches twice and never on the last ones (Lightning warns about this).
  It also carries the global random states (:func:`rng_states`: torch, CUDA, numpy, Python), so
  dropout and random augmentation continue the draws of the run that wrote the checkpoint;
  Lightning saves none of them.
* :class:`SuiteTrainer` (the CLI's trainer) applies that state also where Lightning skips it: for a
  model that asks for ``estimated_stepping_batches`` (a schedule's length) in ``configure_optimizers``.

Why not Lightning's own write: ``TorchCheckpointIO`` goes through an fsspec transaction, which
writes a temporary file in the system temp folder and moves it into place. Where that folder is on
another filesystem (a tmpfs ``/tmp``, checkpoints on a mounted volume) the move is a copy into
the open ``last.ckpt``, so a kill during it leaves a truncated checkpoint; nothing is fsynced.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import itertools
import os
import random
import secrets
import shutil
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional

import lightning as L
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.loops.fit_loop import _FitLoop as _LightningFitLoop
from torch.utils.data import DataLoader

#: suffix of a file or folder still being written; never matches Lightning's ``last*.ckpt`` search
PARTIAL_SUFFIX = ".partial"


def partial_path(path: Path) -> Path:
    """A fresh temporary name next to ``path`` (same folder, so the final rename stays on one filesystem)."""
    return path.parent / f".{path.name}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}"


def _fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_partials(path: Path) -> None:
    """Temporary copies of ``path`` left by a process that was killed while writing it."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*{PARTIAL_SUFFIX}"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()


def atomic_write(path: _PATH, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a temporary file next to ``path``, fsync it and rename it to ``path``.

    On any error (or a kill) before the rename, ``path`` keeps its previous content; an error
    removes the temporary file, a kill leaves it (removed by the next write of ``path``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    tmp = partial_path(path)
    try:
        with open(tmp, "xb") as f:  # mode 0o666 & ~umask, like any file this process writes
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_folder(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic (see :func:`atomic_write`).

    Remote paths (``s3://`` and the like) keep fsspec's own transaction, which for object stores
    is an atomic upload already. Loading and removal are Lightning's.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options (got {storage_options!r})")
        fs = get_filesystem(path)
        if not isinstance(fs, LocalFileSystem):
            return super().save_checkpoint(checkpoint, path)
        atomic_write(LocalFileSystem._strip_protocol(str(path)), lambda f: self.write(checkpoint, f))

    def write(self, checkpoint: dict[str, Any], f: IO[bytes]) -> None:
        """Serialise ``checkpoint`` into the open temporary file ``f``."""
        torch.save(checkpoint, f)


# --- folders ------------------------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # this filesystem or kernel cannot exchange
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def replace_folder(tmp: _PATH, path: _PATH) -> None:
    """Put the finished folder ``tmp`` at ``path``, replacing what was there.

    ``path`` absent or a file: one rename (after removing the file). ``path`` a folder: an atomic
    exchange where the OS offers one (Linux), then the old folder is deleted. Elsewhere the old
    folder is renamed aside first (``.<name>.<hex>.old``), so a kill between the two renames
    leaves no ``path`` but both complete folders next to it: nothing is lost, and the ``.old`` one
    (never deleted automatically) is renamed back by hand. Every file is fsynced before the swap.
    """
    tmp, path = Path(tmp), Path(path)
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_folder(tmp)
    if path.is_dir():
        if not _exchange(tmp, path):
            aside = path.parent / f".{path.name}.{secrets.token_hex(4)}.old"
            os.rename(path, aside)
            os.rename(tmp, path)
            tmp = aside
        shutil.rmtree(tmp)  # now the old checkpoint
    else:
        if path.exists():
            path.unlink()  # a single-file checkpoint of the same name is being replaced by shards
        os.rename(tmp, path)
    _fsync_folder(path.parent)


# --- the global random states -------------------------------------------------------------
def rng_states() -> dict[str, Any]:
    """The global random states (torch CPU and, once initialised, CUDA; numpy; Python's ``random``)
    as tensors, tuples and numbers only, so ``torch.load(..., weights_only=True)`` reads them back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Put back what :func:`rng_states` returned (CUDA only where this process has initialised it)."""
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))  # a loaded checkpoint may hold a list
    if "cuda" in states and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.set_rng_state_all(states["cuda"])


# --- the position inside an epoch ---------------------------------------------------------
class _Skipping:
    """An index sampler whose next pass (only) starts after its first ``n`` items (indices only:
    nothing is loaded). One pass only, because a persistent-workers iterator keeps it for later epochs."""

    def __init__(self, sampler: Any, n: int) -> None:
        self.sampler, self.n = sampler, n

    def __iter__(self) -> Iterator[Any]:
        n, self.n = self.n, 0
        return itertools.islice(iter(self.sampler), n, None)

    def __len__(self) -> int:
        return len(self.sampler)  # Lightning counts the epoch's batches from the start


class _Counting:
    """The loader's iterator, counting what it hands out into ``loader._yielded``."""

    def __init__(self, it: Iterator[Any], loader: "ResumableDataLoader", start: int) -> None:
        self.it, self.loader = it, loader
        loader._yielded = start

    def __iter__(self) -> "_Counting":
        return self

    def __next__(self) -> Any:
        batch = next(self.it)
        self.loader._yielded += 1
        return batch

    def __len__(self) -> int:
        return len(self.it)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that resumes inside an epoch (Lightning's ``state_dict`` protocol).

    The checkpoint records how many batches of the current epoch were handed out; after a
    restore the next epoch pass skips that many batches of the sampler's order (indices only).
    Exact when that order is a function of the epoch (``suite.data.EpochSeededSampler``), also
    under DDP, where Lightning wraps it per rank and the count is per rank. A checkpoint written
    after an epoch's last batch resumes at the next epoch's first batch.

    The checkpoint also records the global random states (:func:`rng_states`) at the moment it
    was written and torch's state when the epoch's iterator was built (from which the iterator
    draws its worker base seed). After a restore the first pass puts the saved states back, just
    before its iterator is built, which is where the uninterrupted run stood when it fetched the
    next batch: Lightning builds the resumed run's iterator after its sanity check, so the draws
    made by the sanity check and by ``setup`` do not count. Where the uninterrupted run would not
    have built an iterator here (inside an epoch; persistent workers) the new one draws its base
    seed from the saved epoch state instead of the global state, so the global draws line up and
    the workers get the seeds they had. Bit-identical continuation therefore holds for
    ``num_workers=0``; with workers, each worker restarts its own generator from its seed, so
    augmentation inside workers continues differently. Under DDP / FSDP2 the checkpoint holds every
    rank's states (gathered while saving) and each rank restores its own; resumed on another number
    of ranks, rank r takes rank r % n's (with a warning: such a run cannot repeat the saved one).
    """

    _yielded: int = 0  # batches handed out in the current pass
    _resume_at: int = 0  # batches the next pass skips (set by load_state_dict)
    _skip: int = 0  # read by _index_sampler while an iterator is being built
    _iter_rng: Optional[torch.Tensor] = None  # torch's global state when the current iterator was built
    _restore: Optional[dict[str, Any]] = None  # saved states the next pass puts back (set by load_state_dict)

    @property
    def _index_sampler(self) -> Any:
        sampler = super()._index_sampler
        return _Skipping(sampler, self._skip) if self._skip else sampler

    def __iter__(self) -> _Counting:
        start, self._resume_at = self._resume_at, 0
        restore, self._restore = self._restore, None
        if start and self._iterator is not None:  # persistent workers: the iterator is reset, not rebuilt
            self._iterator._index_sampler = _Skipping(DataLoader._index_sampler.fget(self), start)
        builds = self._iterator is None or not (self.persistent_workers and self.num_workers > 0)
        own = self.generator
        if restore is not None:
            set_rng_states(restore["rng"])
            if builds and own is None and restore.get("iter_rng") is not None and (start or self.persistent_workers):
                # the uninterrupted run built its iterator earlier, from the state saved then
                self.generator = torch.Generator()
                self.generator.set_state(restore["iter_rng"])
        if builds:  # the state the new iterator draws its base seed from (None: the user's own generator)
            if self.generator is not own:
                self._iter_rng = restore["iter_rng"]
            else:
                self._iter_rng = torch.get_rng_state() if own is None else None
        self._skip = start
        try:
            it = super().__iter__()
        finally:
            self._skip = 0
            self.generator = own
        return _Counting(it, self, start)

    def state_dict(self) -> dict[str, Any]:
        # every rank's states: their draws part where their batches differ in shape (dropout on
        # sequences of other lengths). Lightning calls this on every rank while saving a checkpoint.
        from suite.strategies import every_rank

        mine = {"now": rng_states(), "iter": self._iter_rng}
        return {"batches_yielded": self._yielded, "random": every_rank(mine)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = int(state.get("batches_yielded", 0))
        self._resume_at = n if 0 < n < len(self) else 0
        self._restore = None
        saved = state.get("random")  # absent from a checkpoint written before they were saved
        if saved:
            from suite.strategies import rank_and_world

            rank, world = rank_and_world()
            if len(saved) != world:
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(f"the checkpoint holds the random states of {len(saved)} rank(s) and this run has {world}: "
                               f"rank r continues rank r % {len(saved)}'s draws, so the run does not repeat the saved one")
            mine = saved[rank % len(saved)]
            self._restore = {"rng": mine["now"], "iter_rng": mine["iter"]}


class _FitLoop(_LightningFitLoop):
    def setup_data(self) -> None:
        built_early = self._combined_loader is not None
        super().setup_data()
        if built_early and self.restarting and self._combined_loader_states_to_load:
            self._load_combined_loader_states()  # what Lightning skips for a loader that exists already
            iter(self._data_fetcher)  # a new iterator, built from the loaded state


class SuiteTrainer(L.Trainer):
    """Lightning's ``Trainer``, except that a resumed fit applies the training loader's saved
    state even when the loader was built before the restore.

    Lightning builds (and starts iterating) the training loader early when a model's
    ``configure_optimizers`` asks for ``estimated_stepping_batches`` (a schedule's length). In a
    resumed fit that happens before the checkpoint's loop state is loaded, and for a loader that
    exists already Lightning never loads it, so the saved position inside the epoch and the random
    states (:class:`ResumableDataLoader`) are dropped: the resumed run restarts the epoch at its
    first batch with fresh draws. Here the state is loaded when the fit starts and the loader's
    iterator is built again. A fit that does not resume runs exactly as under ``L.Trainer`` (the
    same loader, the same random draws), so fixed-seed results do not move.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        epoch_loop = self.fit_loop.epoch_loop
        self.fit_loop = _FitLoop(self, min_epochs=self.fit_loop.min_epochs, max_epochs=self.fit_loop.max_epochs)
        self.fit_loop.epoch_loop = epoch_loop
