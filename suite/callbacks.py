"""Callbacks shared by every domain."""

from __future__ import annotations

import copy
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

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


class EMATeacher(L.Callback):
    """A momentum (EMA) teacher of ``pl_module.<student>``: after every optimiser step
    ``teacher <- m * teacher + (1 - m) * student`` over parameters and floating-point buffers.

    The teacher is copied from the student when fitting starts (so it begins as the pretrained or
    ``init_from`` weights), stays frozen and in eval mode, and is handed to the module as the plain
    attribute ``pl_module.<attribute>``: not a submodule, so it adds nothing to the model's
    parameters, checkpoint ``state_dict`` or inference cost. Its weights are this callback's state,
    which Lightning saves in checkpoints and restores on resume. ``momentum=0`` makes the teacher
    a copy of the student after every step; ``momentum=1`` keeps it at its initial weights.
    """

    def __init__(self, student: str = "backbone", attribute: str = "ema_teacher", momentum: float = 0.999) -> None:
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMATeacher momentum must be in [0, 1], got {momentum}")
        self.student, self.attribute, self.momentum = student, attribute, momentum
        self.teacher: nn.Module | None = None
        self._pending: dict[str, torch.Tensor] | None = None
        self._last_step = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(student=self.student, attribute=self.attribute)

    def _student(self, pl_module: L.LightningModule) -> nn.Module:
        try:
            return pl_module.get_submodule(self.student)
        except AttributeError:
            raise AttributeError(f"EMATeacher: {type(pl_module).__name__} has no submodule {self.student!r} to follow") from None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.teacher = copy.deepcopy(self._student(pl_module)).requires_grad_(False).eval()
        if self._pending is not None:  # resumed: the checkpoint's teacher replaces the fresh copy
            self.teacher.load_state_dict(self._pending)
            self._pending = None
        object.__setattr__(pl_module, self.attribute, self.teacher)
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step != self._last_step:  # skip batches that only accumulated gradients
            self._last_step = trainer.global_step
            self.update(self._student(pl_module))

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """One EMA step towards ``student``; integer buffers are copied unless ``momentum == 1``."""
        if self.teacher is None:
            raise RuntimeError("EMATeacher.update called before the teacher was created (on_fit_start)")
        s_state = student.state_dict()
        for name, t in self.teacher.state_dict().items():
            s = s_state[name]
            if t.is_floating_point():
                t.lerp_(s.to(t.dtype), 1.0 - self.momentum)  # exact at weights 0 and 1
            elif self.momentum < 1.0:
                t.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        teacher = self.teacher.state_dict() if self.teacher is not None else self._pending
        return {"momentum": self.momentum, "teacher": teacher}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("teacher") is None:
            return
        self._pending = state_dict["teacher"]
        if self.teacher is not None:
            self.teacher.load_state_dict(self._pending)
            self._pending = None
