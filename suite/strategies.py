"""FSDP2 for frozen-backbone fine-tuning, on GPUs and (for tests and laptops) on CPU with gloo.

Lightning's ``strategy="fsdp"`` is FSDP1 and refuses a CPU accelerator. FSDP2 (``fully_shard``)
comes through Lightning's ``ModelParallelStrategy``; :class:`suite.module.AdaptedModule`
implements ``configure_model`` so every adapter layer becomes its own unit (see
``AdaptedModule.fsdp_units``). This subclass only adds the choice of process launcher, so the
strategy also runs inside a notebook or pytest (``start_method="fork"``).
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
            can reload it) instead of gathering one file on rank 0.
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
