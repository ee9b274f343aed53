"""FSDP2 for frozen-backbone fine-tuning, on GPUs and (for tests and laptops) on CPU with gloo.

Lightning's ``strategy="fsdp"`` is FSDP1 and refuses a CPU accelerator. FSDP2 (``fully_shard``)
comes through Lightning's ``ModelParallelStrategy``; :class:`suite.module.AdaptedModule`
implements ``configure_model`` so every adapter layer becomes its own unit (see
``AdaptedModule.fsdp_units``). This subclass only adds the choice of process launcher, so the
strategy also runs inside a notebook or pytest (``start_method="fork"``), and makes the sharded
checkpoint folder appear atomically (:meth:`FSDP2Strategy.save_checkpoint`).
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.fabric.plugins import CheckpointIO
from torch import nn


class _ForkLauncherWithoutWeights(_MultiProcessingLauncher):
    """Fork launcher that does not ship final weights back to the parent process.

    Sharded parameters (DTensor) cannot be re-materialised through Lightning's weights hand-back;
    the checkpoint written by the run is the supported way to get them.
    """

    def _recover_results_in_main_process(self, worker_output: Any, trainer: Any) -> None:
        super()._recover_results_in_main_process(worker_output._replace(weights_path=None), trainer)

    def _collect_rank_zero_results(self, trainer: Any, results: Any) -> Any:
        out = super()._collect_rank_zero_results(trainer, results)
        if out is not None and out.weights_path is not None:
            shutil.rmtree(Path(out.weights_path).parent, ignore_errors=True)
            out = out._replace(weights_path=None)
        return out


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel (FSDP2) over all devices.

    Args:
        start_method: ``"popen"`` re-runs the script per rank (the usual launcher, also under
            torchrun / SLURM); ``"fork"`` forks the current process (pytest, notebooks, CPU).
        save_distributed_checkpoint: write a sharded checkpoint folder (fast, any world size
            can reload it) instead of gathering one file on rank 0 (written by the CheckpointIO
            plugin, atomically under ``python -m suite``).
    """

    def __init__(
        self,
        start_method: Literal["popen", "fork"] = "popen",
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            **kwargs,
        )
        self.start_method = start_method

    def setup_environment(self) -> None:
        # one process per device, data parallel across all of them (not only across nodes)
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Write the sharded folder next to its place, then swap it in, so a kill never leaves a mix.

        Lightning writes the shards (torch.distributed.checkpoint, every rank) into the existing
        folder, so a kill mid-write leaves old and new shards side by side. Here every rank writes
        into a fresh temporary folder in the same parent, a barrier waits for all of them, and
        rank 0 fsyncs the files and puts the folder in place (:func:`suite.checkpoint.replace_folder`:
        an atomic exchange on Linux; elsewhere two renames, between which a kill leaves both
        complete folders under temporary names). Needs the checkpoint folder on a filesystem every
        rank shares, as torch.distributed.checkpoint itself does.
        """
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        from suite.checkpoint import partial_path, remove_stale_partials, replace_folder

        path = Path(self.broadcast(str(filepath)))
        name = None
        if self.global_rank == 0:
            remove_stale_partials(path)  # left by a run killed while writing this checkpoint
            name = str(partial_path(path))
        tmp = Path(self.broadcast(name))  # one temporary folder for all ranks, named by rank 0
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("sharded checkpoint written")
        failed = None
        if self.global_rank == 0:
            try:
                replace_folder(tmp, path)
            except Exception as err:  # raised after the barrier, so the other ranks are not left waiting
                failed = err
        self.barrier("sharded checkpoint in place")
        if failed is not None:
            raise failed

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a sharded checkpoint that holds trainable state only.

        Lightning asks the checkpoint for every key of the model, frozen base weights included,
        and fails because AdaptedModule does not save them. Here only the keys the checkpoint
        holds are requested; the rest keep the values they were rebuilt with.
        """
        import torch
        from lightning.fabric.strategies.fsdp import _METADATA_FILENAME, _is_sharded_checkpoint
        from torch.distributed.checkpoint import FileSystemReader, load
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(checkpoint_path))
        if not _is_sharded_checkpoint(path):
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        saved = set(FileSystemReader(path).read_metadata().state_dict_metadata)
        model_state = {k: v for k, v in get_model_state_dict(self.model).items() if f"state_dict.{k}" in saved}
        load({"state_dict": model_state}, checkpoint_id=path)
        set_model_state_dict(self.model, model_state, options=StateDictOptions(strict=False))
        for idx, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{idx}"
            optim_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            load(optim_state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=optim_state[key])
        metadata = torch.load(path / _METADATA_FILENAME, weights_only=True if weights_only is None else weights_only)
        # the loaded keys, so the module's on_load_checkpoint can check them
        metadata["state_dict"] = model_state
        return metadata

    def _configure_launcher(self) -> None:
        if self.start_method == "fork" and not self.cluster_environment.creates_processes_externally:
            self._launcher = _ForkLauncherWithoutWeights(self, start_method="fork")
        else:
            super()._configure_launcher()


# --- ranks ---------------------------------------------------------------------------------------
def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of ranks) of the default process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def every_rank(obj: Any) -> list[Any]:
    """``obj`` of every rank, by rank (``[obj]`` in one process). A collective: every rank calls it."""
    import torch.distributed as dist

    _, world = rank_and_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


# --- FSDP2 helpers for code that runs the model outside a unit's forward ------------------------
def fsdp_units_of(module: nn.Module) -> list[nn.Module]:
    """The FSDP2 units (``fully_shard`` modules) in ``module``, itself included; [] without FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def is_gathered(unit: nn.Module) -> bool:
    """Whether an FSDP2 unit's parameters are currently gathered (unsharded)."""
    return any(group.is_unsharded for group in unit._get_fsdp_state()._fsdp_param_groups)


def force_reshard(unit: nn.Module) -> None:
    """Reshard an FSDP2 unit, even inside its own forward.

    ``FSDPModule.reshard`` does nothing while a unit that keeps its parameters after forward
    (FSDP2's root, for the backward that follows) is inside its forward; code that swaps
    other values into the sharded parameters (the EMA teacher) must free the gathered copy
    first, or the next gather would be skipped and the old values used. The autograd graph of
    a forward in progress stays valid: the next gather refills the same storage, as FSDP2's
    own reshard-after-forward does.
    """
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    for group in unit._get_fsdp_state()._fsdp_param_groups:
        if group._all_gather_result is not None:
            # a prefetched gather nobody waited for (backward prefetches the unit that ran
            # forward before, which may never run backward): it holds the values of when it was
            # issued, and the next unshard would hand those out instead of gathering anew
            group.wait_for_unshard()
        with group.use_training_state(TrainingState.IDLE):
            group.reshard()


@contextlib.contextmanager
def untracked_forwards(units: list[nn.Module]) -> Iterator[None]:
    """Forwards inside (a no-grad teacher through the student's units) are left out of FSDP2's
    record of the forward order, from which its backward picks the unit to prefetch next; the
    step's own backward then prefetches the units it needs, as without them."""
    groups = [g for u in units for g in u._get_fsdp_state()._fsdp_param_groups]
    orders = {id(g.comm_ctx): (g.comm_ctx.post_forward_order, len(g.comm_ctx.post_forward_order)) for g in groups}
    indices = [(g._post_forward_indices, len(g._post_forward_indices)) for g in groups]
    try:
        yield
    finally:
        for order, n in orders.values():
            del order[n:]
        for index, n in indices:
            del index[n:]


@torch.no_grad()
def assign_(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target.copy_(value)`` where FSDP2 may have sharded ``target`` (a DTensor) and ``value`` is
    the full tensor, the same on every rank: each rank keeps its own shard. Call it while the
    parameters are sharded (``AdaptedModule.fsdp_reshard``): a write to a gathered copy is lost."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor) and not isinstance(value, DTensor):
        value = distribute_tensor(value.detach().to(target.device, target.dtype), target.device_mesh, target.placements,
                                  src_data_rank=None)
    target.copy_(value)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective: every rank must call it); others as they are."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


# --- interchange: a sharded checkpoint in a run without FSDP2 ----------------------------------
def is_sharded_checkpoint(path: Any) -> bool:
    """Whether ``path`` is a sharded (torch.distributed.checkpoint) folder, as FSDP2 runs write."""
    from lightning.fabric.strategies.fsdp import _is_sharded_checkpoint

    return _is_sharded_checkpoint(Path(path))


def consolidate_checkpoint(folder: Any) -> dict[str, Any]:
    """A sharded FSDP2 checkpoint folder as the checkpoint dict a 1-process run would have saved.

    The model's tensors are read whole from the shards (any world size wrote them;
    ``torch.distributed.checkpoint``'s own no-process-group reader), the rest (hyperparameters,
    loops, callbacks, the suite's fingerprint) from the folder's ``meta.pt`` with
    ``weights_only=True``. Optimiser states are left out: FSDP2 stores them by parameter name,
    not in the layout of a plain optimiser, so the result serves ``test`` / ``predict`` /
    ``validate``, ``save_adapters`` and the PEFT export; resuming a fit from a sharded folder
    needs FSDP2 (any world size).
    """
    from lightning.fabric.strategies.fsdp import _METADATA_FILENAME
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    folder = Path(folder)
    if not is_sharded_checkpoint(folder):
        raise FileNotFoundError(f"{folder}: not a sharded checkpoint folder (expected the .metadata file FSDP2 writes)")
    meta = folder / _METADATA_FILENAME
    if not meta.is_file():
        raise FileNotFoundError(f"{folder}: {_METADATA_FILENAME} missing: expected a Lightning FSDP2 checkpoint folder")
    loaded: dict[str, Any] = {}
    _load_state_dict(loaded, storage_reader=FileSystemReader(folder), planner=_EmptyStateDictLoadPlanner(keys={"state_dict"}),
                     no_dist=True)
    checkpoint = torch.load(meta, map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = loaded["state_dict"]
    return checkpoint


class ShardedCheckpointReader(CheckpointIO):
    """A CheckpointIO that also reads sharded FSDP2 folders (:func:`consolidate_checkpoint`), so a
    1-process (or DDP) ``test`` / ``predict`` / ``validate`` takes the checkpoint an FSDP2 fit
    wrote. Everything else goes to the wrapped CheckpointIO."""

    def __init__(self, inner: CheckpointIO) -> None:
        self.inner = inner

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        if is_sharded_checkpoint(path):
            return consolidate_checkpoint(path)
        return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()
