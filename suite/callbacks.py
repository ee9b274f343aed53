"""Callbacks shared by every domain."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

#: distributions whose versions every run records
RECORDED_PACKAGES = (
    "suite", "torch", "torchvision", "lightning", "torchmetrics", "timm", "segment-anything", "monai",
    "open_clip_torch", "transformers", "peft", "jsonargparse", "safetensors", "numpy", "scipy",
    "scikit-image", "pandas", "h5py",
)


def package_versions(names: tuple[str, ...] = RECORDED_PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        res = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return res.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class RunRecord(L.Callback):
    """Write ``run.json`` to the run's log folder: seed, split hashes, package versions, parameters.

    With the ``config.yaml`` that LightningCLI saves beside it, this is enough to rerun a result.
    """

    filename = "run.json"

    def __init__(self) -> None:
        self.record: dict[str, Any] = {}

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        report = getattr(pl_module, "report", None)
        self.record = {
            "stage": stage,
            "seed": int(os.environ["PL_GLOBAL_SEED"]) if "PL_GLOBAL_SEED" in os.environ else None,
            "split_hashes": dict(getattr(dm, "split_hashes", {}) or {}),
            "split_sizes": dict(getattr(dm, "split_sizes", {}) or {}),
            "parameters": None if report is None else {
                "total": report.total, "trainable": report.trainable, "percent": report.percent,
                "method": report.method, "adapted_layers": len(report.adapted),
            },
            "packages": package_versions(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "git_commit": _git_commit(),
            "command": sys.argv,
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "precision": str(trainer.precision),
        }
        # trainer.log_dir broadcasts from rank 0, so every rank must ask for it
        log_dir = trainer.log_dir
        if log_dir is not None:
            self._dump(Path(log_dir))

    @rank_zero_only
    def _dump(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / self.filename).write_text(json.dumps(self.record, indent=2, default=str))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, "fit")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._write(trainer, pl_module, "validate")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, "test")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, "predict")
