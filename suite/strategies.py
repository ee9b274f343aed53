"""FSDP2 for frozen-backbone fine-tuning, on GPUs and (for tests and laptops) on CPU with gloo.

Lightning's ``strategy="fsdp"`` is FSDP1 and refuses a CPU accelerator. FSDP2 (``fully_shard``)
comes through Lightning's ``ModelParallelStrategy``; :class:`suite.module.AdaptedModule`
implements ``configure_model`` so every adapter layer becomes its own unit (see
``AdaptedModule.fsdp_units``). This subclass only adds the choice of process launcher, so the
strategy also runs inside a notebook or pytest (``start_method="fork"``), and makes the sharded
checkpoint folder appear atomically (:meth:`FSDP2Strategy.save_checkpoint`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher


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
