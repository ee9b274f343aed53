"""``python -m suite``: one LightningCLI for every domain.

    python -m suite fit --config domains/nuclei.yaml
    python -m suite fit --config domains/nuclei.yaml --config configs/trainer/ddp.yaml --config configs/adapters/mica.yaml
    python -m suite test --config domains/nuclei.yaml --ckpt_path last

Beyond Lightning's defaults, every run gets a checkpoint callback that keeps ``last.ckpt`` in
``<default_root_dir>/checkpoints`` (so ``--ckpt_path last`` finds it across runs), a CSV logger in
``<default_root_dir>/logs/version_N`` and a :class:`~suite.callbacks.RunRecord` there. Checkpoint
files are written atomically (:class:`~suite.checkpoint.AtomicCheckpointIO`, unless the config
names another ``CheckpointIO`` plugin), so a kill leaves the previous ``last.ckpt`` loadable.
``--ckpt_path best`` is the monitored best that ``last.ckpt`` records. With ``--ckpt_path`` the
model is the one the config describes (not rebuilt from the checkpoint's hyperparameters), and a
checkpoint that does not fit it is a usage error listing the keys. A config may also hold, at
top level:

* ``prerequisites``: fits that must have run before the model is built (cached; see
  :mod:`suite.prerequisites`);
* ``stages``: a sequence of fits of this same config (see :mod:`suite.stages`); a bare ``fit``
  runs them all, ``test`` / ``predict`` / ``validate`` run on the last one.

Values that data and model share are set once, in the data section, and linked into the model
(:data:`LINKED_ARGUMENTS`, :data:`LINKED_ATTRIBUTES`).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Optional

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from suite.callbacks import RunRecord
from suite.checkpoint import AtomicCheckpointIO, SuiteTrainer
from suite.module import CheckpointMismatchError
from suite.precision import choose_precision
from suite.prerequisites import Prerequisite

#: ``data.init_args.X -> model.init_args.X`` at parse time; skipped when either class lacks X
LINKED_ARGUMENTS = ("lookback", "horizon", "grid", "threshold_mev", "num_tasks", "task")
#: ``model.init_args.Y`` <- the instantiated data module's attribute Y; skipped when either lacks Y
LINKED_ATTRIBUTES = ("num_classes", "num_types", "classes_per_task", "attribute_classes", "num_groups")


class _Parsed(Exception):
    """Raised by :func:`parse_only` with the resolved config, before any class is built."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__("parsed")
        self.config = config


class SuiteCLI(LightningCLI):
    #: when set (by :func:`parse_only`), stop after parsing and report the resolved config
    parse_only: bool = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        given = kwargs.get("args")
        self.argv = list(given) if isinstance(given, (list, tuple)) else sys.argv[1:]
        self.stage_results: dict[str, Any] | None = None
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 1})
        # shown by --print_config; kept (appended) when a config names other plugins but no CheckpointIO
        parser.set_defaults({"trainer.plugins": [{"class_path": _ATOMIC_IO}]})
        parser.add_lightning_class_args(RunRecord, "run_record")
        parser.add_argument("--prerequisites", type=Optional[list[Prerequisite]], default=None,
                            help="fits to run (once, cached) before the model is built; see suite.prerequisites")
        parser.add_argument("--stages", type=Optional[list[dict]], default=None,
                            help="a sequence of fits of this config; see suite.stages")
        for name in LINKED_ARGUMENTS:
            parser.link_arguments(f"data.init_args.{name}", f"model.init_args.{name}")
        for name in LINKED_ATTRIBUTES:  # skipped by jsonargparse when the data module has no such attribute
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.parse_only:
            raise _Parsed(config.clone().as_dict())
        if config.get("stages") and self.subcommand is not None:
            from suite.stages import plan_config_stages, run_config_stages

            try:  # a stage list that cannot run is a usage error, before any fit
                plan_config_stages(self.subcommand, self.argv, config)
            except (ValueError, FileNotFoundError) as err:
                self.parser.error(f"stages: {err}", ex=err)
            self.stage_results = run_config_stages(self.subcommand, self.argv, config)
            return
        if str(config.get("ckpt_path")) == "best":  # before any work (prerequisites are fits)
            self._resolve_best(config)
        from suite.prerequisites import resolve

        resolve(config)
        _with_atomic_checkpoint_io(config.trainer)
        if config.get("ckpt_path"):
            self._rebuild_what_was_trained(config)
        if config.trainer.precision is None:  # follow the hardware (suite.precision); an explicit value wins
            config.trainer.precision, reason = choose_precision(config.trainer.accelerator)
            config.run_record.precision_reason = f"{config.trainer.precision}: {reason}"
            rank_zero_info(f"precision {config.run_record.precision_reason} (force one with --trainer.precision)")
        else:
            config.run_record.precision_reason = f"{config.trainer.precision}: set in the config or on the command line"
        root = config.trainer.default_root_dir or os.getcwd()
        if config.get("weights_only", False) is None:
            config.weights_only = True  # --ckpt_path files load without unpickling arbitrary objects
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = os.path.join(root, "checkpoints")
        if config.trainer.logger in (None, True):
            config.trainer.logger = Namespace(
                class_path="lightning.pytorch.loggers.CSVLogger",
                init_args=Namespace(save_dir=root, name="logs"),
            )

    def _parse_ckpt_path(self) -> None:
        """Build the model the config describes, and check the checkpoint against it.

        LightningCLI's own version replaces the config's model arguments by the checkpoint's
        hyperparameters, which silently drops model arguments given on the command line and turns
        a checkpoint of another domain into that domain's model, run on this config's data. Here
        the checkpoint must fit the configured model; AdaptedModule.on_load_checkpoint lists the
        keys that do not (a usage error, see :meth:`_run_subcommand`).
        """

    def _resolve_best(self, config: Namespace) -> None:
        """``--ckpt_path best``: the best checkpoint for ``checkpoint.monitor``, as ``last.ckpt`` records it.

        Lightning knows the best checkpoint only inside the process that fitted, so a later
        ``test --ckpt_path best`` would always fail there; the fit's ModelCheckpoint state,
        saved in ``last.ckpt``, names it. No monitor: a usage error naming the fix.
        """
        import torch

        monitor = config.checkpoint.monitor
        if monitor is None:
            self.parser.error(
                "--ckpt_path best needs a monitored metric to rank checkpoints, and checkpoint.monitor is not set: "
                "fit with --checkpoint.monitor val/loss (--checkpoint.mode max for a score such as accuracy) and "
                "pass the same --checkpoint.monitor here; or use --ckpt_path last or a checkpoint file"
            )
        root = config.trainer.default_root_dir or os.getcwd()
        folder = config.checkpoint.dirpath or os.path.join(root, "checkpoints")
        last = os.path.join(folder, "last.ckpt")
        if not os.path.isfile(last):
            self.parser.error(f"--ckpt_path best: {last} not found; fit first (with --checkpoint.monitor {monitor})")
        states = torch.load(last, map_location="cpu", weights_only=True).get("callbacks", {})
        best = next((s.get("best_model_path") for key, s in states.items()
                     if key.startswith("ModelCheckpoint") and s.get("monitor") == monitor and s.get("best_model_path")), None)
        if best and not os.path.exists(best):  # the run folder was moved: look next to last.ckpt
            best = os.path.join(folder, os.path.basename(best))
        if not best or not os.path.exists(best):
            self.parser.error(f"--ckpt_path best: {last} records no best checkpoint for monitor {monitor!r}; "
                              f"was it fitted with --checkpoint.monitor {monitor}? Use --ckpt_path last or a file")
        rank_zero_info(f"--ckpt_path best: {best} (best {monitor} recorded in {last})")
        config.ckpt_path = best

    def _rebuild_what_was_trained(self, config: Namespace) -> None:
        """Arguments whose meaning depends on the machine (``backbone: auto``) take the value they
        had when the checkpoint was trained (AdaptedModule.record_resolved), saying so."""
        import torch

        ckpt = str(config.ckpt_path)
        root = config.trainer.default_root_dir or os.getcwd()
        path = os.path.join(config.checkpoint.dirpath or os.path.join(root, "checkpoints"), "last.ckpt") if ckpt == "last" else ckpt
        from suite.strategies import is_sharded_checkpoint

        if is_sharded_checkpoint(path) and os.path.isfile(os.path.join(path, "meta.pt")):
            path = os.path.join(path, "meta.pt")  # an FSDP2 folder: the suite's record is in its metadata file
        if not os.path.isfile(path):
            return  # Lightning reports a missing checkpoint itself
        saved = torch.load(path, map_location="cpu", weights_only=True).get("suite", {}).get("resolved", {})
        for name, r in saved.items():
            key = f"model.init_args.{name}"
            if config.get(key) == r["given"]:
                config[key] = r["resolved"]
                rank_zero_info(f"model.{name}: {r['given']!r} meant {r['resolved']!r} when {path} was trained; rebuilding that")

    def instantiate_classes(self) -> None:
        if self.stage_results is not None:  # the stages ran their own fits; the last one stands for this run
            last = self.stage_results["last_cli"]  # None when every stage had already finished
            self.trainer, self.model, self.datamodule = (last.trainer, last.model, last.datamodule) if last else (None, None, None)
            return
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError) as err:  # a value its type allows but the class refuses
            # jsonargparse's own error path: usage and message, exit 2 (JSONARGPARSE_DEBUG=1 raises instead)
            self.parser.error(f"the config parsed, but building its classes failed: {err}", ex=err)

    def _read_sharded_checkpoints(self, subcommand: str) -> None:
        """A sharded FSDP2 checkpoint folder loads into a run without FSDP2 (1 process, DDP):
        test / predict / validate read it whole (suite.strategies.ShardedCheckpointReader). A fit
        cannot resume from it there (FSDP2 keeps optimiser states by parameter name): a usage error."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        from suite.strategies import ShardedCheckpointReader, is_sharded_checkpoint

        strategy = self.trainer.strategy
        if isinstance(strategy, ModelParallelStrategy):
            return
        ckpt = self.config[subcommand].get("ckpt_path")
        if subcommand == "fit" and ckpt is not None and is_sharded_checkpoint(ckpt):
            self.parser.error(f"fit --ckpt_path {ckpt}: a sharded FSDP2 checkpoint resumes under FSDP2 only (any number of "
                              "devices): add --config configs/trainer/fsdp.yaml; test / predict / validate read it on one process")
        if not isinstance(strategy.checkpoint_io, ShardedCheckpointReader):
            strategy.checkpoint_io = ShardedCheckpointReader(strategy.checkpoint_io)

    def _run_subcommand(self, subcommand: str) -> None:
        if self.stage_results is not None:
            return
        self._read_sharded_checkpoints(subcommand)
        try:
            super()._run_subcommand(subcommand)
        except CheckpointMismatchError as err:  # a checkpoint of another domain, backbone or config
            ckpt = self.config[subcommand].get("ckpt_path")
            self.parser.error(f"{subcommand} --ckpt_path {ckpt}: {err}", ex=err)


_ATOMIC_IO = f"{AtomicCheckpointIO.__module__}.{AtomicCheckpointIO.__name__}"


def _is_checkpoint_io(plugin: Any) -> bool:
    from lightning.fabric.plugins import CheckpointIO

    if isinstance(plugin, CheckpointIO):
        return True
    path = plugin.get("class_path") if isinstance(plugin, (Namespace, dict)) else None
    if not isinstance(path, str) or "." not in path:
        return False  # a precision or environment name
    module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), name, None)
    return isinstance(cls, type) and issubclass(cls, CheckpointIO)


def _with_atomic_checkpoint_io(trainer: Namespace) -> None:
    """Every run writes checkpoints through AtomicCheckpointIO unless its plugins name another CheckpointIO."""
    plugins = trainer.plugins
    given = [] if plugins is None else list(plugins) if isinstance(plugins, list) else [plugins]
    if not any(_is_checkpoint_io(p) for p in given):
        trainer.plugins = [*given, Namespace(class_path=_ATOMIC_IO, init_args=Namespace())]


def main(args: Any = None, run: bool = True) -> SuiteCLI:
    """``python -m suite``: parse ``args`` (default ``sys.argv``), build the classes and run the subcommand."""
    return _cli(SuiteCLI, args, run)


def _cli(cli_class: type[SuiteCLI], args: Any, run: bool) -> SuiteCLI:
    return cli_class(
        L.LightningModule,
        L.LightningDataModule,
        trainer_class=SuiteTrainer,  # resumes a model whose schedule counts the training batches
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        # a misspelt option must fail, not silently match a longer one by prefix
        parser_kwargs={"allow_abbrev": False, **{sub: {"allow_abbrev": False} for sub in ("fit", "validate", "test", "predict")}},
        args=args,
        run=run,
    )


class _ParseOnlyCLI(SuiteCLI):
    parse_only = True


def parse_only(args: list[str]) -> dict[str, Any]:
    """The resolved config of ``args`` (a subcommand and its options) as a dict, building no class."""
    try:
        _cli(_ParseOnlyCLI, args, run=True)
    except _Parsed as parsed:
        return parsed.config
    raise RuntimeError("parse_only: the CLI did not stop after parsing")
