"""``python -m suite``: one LightningCLI for every domain.

    python -m suite fit --config domains/nuclei.yaml
    python -m suite fit --config domains/nuclei.yaml --config configs/trainer/ddp.yaml --config configs/adapters/mica.yaml
    python -m suite test --config domains/nuclei.yaml --ckpt_path last

Beyond Lightning's defaults, every run gets a checkpoint callback that keeps ``last.ckpt`` in
``<default_root_dir>/checkpoints`` (so ``--ckpt_path last`` finds it across runs), a CSV logger in
``<default_root_dir>/logs/version_N`` and a :class:`~suite.callbacks.RunRecord` there.
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from suite.callbacks import RunRecord


class SuiteCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 1})
        parser.add_lightning_class_args(RunRecord, "run_record")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
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


    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError) as err:  # a value its type allows but the class refuses
            # jsonargparse's own error path: usage and message, exit 2 (JSONARGPARSE_DEBUG=1 raises instead)
            self.parser.error(f"the config parsed, but building its classes failed: {err}", ex=err)


def main(args: Any = None, run: bool = True) -> SuiteCLI:
    return SuiteCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        # a misspelt option must fail, not silently match a longer one by prefix
        parser_kwargs={"allow_abbrev": False, **{sub: {"allow_abbrev": False} for sub in ("fit", "validate", "test", "predict")}},
        args=args,
        run=run,
    )
