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
import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
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

    def __init__(self, precision_reason: str | None = None) -> None:
        """``precision_reason``: why the run trains in its precision (the CLI sets it)."""
        self.precision_reason = precision_reason
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
            "precision_reason": self.precision_reason or "as configured",
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
    ``teacher <- m * teacher + (1 - m) * student`` over the tensors that train.

    Only what the student trains has a teacher copy: its trainable parameters and the buffers of
    the modules that own them (e.g. a trained BatchNorm's running statistics). Frozen tensors are
    identical in teacher and student by definition, so the teacher runs the student's own modules
    with its copies swapped in (``torch.func.functional_call``), in eval mode and without
    gradients. So there is no ``deepcopy`` of the student (FSDP2 modules refuse one), the copy
    costs the memory of the trained tensors only, and a checkpoint holds only those.

    The copies start as the student's tensors when fitting starts (the pretrained or ``init_from``
    weights) and are this callback's state, which Lightning saves in checkpoints and restores on
    resume, together with the step of the last update (so gradient accumulation across a resume
    updates exactly as an uninterrupted run) and the momentum (a different configured momentum
    is used, with a warning). ``pl_module.<attribute>`` is a callable view of the teacher (not a
    submodule: it adds nothing to the model's parameters, ``state_dict`` or inference cost).
    ``momentum=0`` makes the teacher a copy of the student after every step; ``momentum=1`` keeps
    it at its initial weights.
    """

    def __init__(self, student: str = "backbone", attribute: str = "ema_teacher", momentum: float = 0.999) -> None:
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMATeacher momentum must be in [0, 1], got {momentum}")
        self.student, self.attribute, self.momentum = student, attribute, momentum
        self.tensors: dict[str, torch.Tensor] | None = None
        self.teacher: TeacherView | None = None
        self._pending: dict[str, Any] | None = None
        self._last_step = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(student=self.student, attribute=self.attribute)

    def _student(self, pl_module: L.LightningModule) -> nn.Module:
        try:
            return pl_module.get_submodule(self.student)
        except AttributeError:
            raise AttributeError(f"EMATeacher: {type(pl_module).__name__} has no submodule {self.student!r} to follow") from None

    @staticmethod
    def trained_tensors(student: nn.Module) -> dict[str, torch.Tensor]:
        """The student's trainable parameters and the buffers of the modules that own them, by name."""
        out: dict[str, torch.Tensor] = {}
        for prefix, mod in student.named_modules():
            own = [(n, p) for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            dot = f"{prefix}." if prefix else ""
            out.update((dot + n, p) for n, p in own)
            out.update((dot + n, b) for n, b in mod.named_buffers(recurse=False) if b is not None)
        return out

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        student = self._student(pl_module)
        live = self.trained_tensors(student)
        if not live:
            raise ValueError(f"EMATeacher: {type(pl_module).__name__}.{self.student} has no trainable tensors to follow")
        self.tensors = {k: v.detach().clone() for k, v in live.items()}
        if self._pending is not None:  # resumed: the checkpoint's teacher replaces the fresh copy
            saved = self._pending["teacher"]
            if set(saved) != set(self.tensors):
                missing, unexpected = sorted(set(self.tensors) - set(saved)), sorted(set(saved) - set(self.tensors))
                raise ValueError(f"EMATeacher: the checkpoint's teacher does not fit the student: missing {missing[:8]}, unexpected {unexpected[:8]}")
            with torch.no_grad():
                for k, v in saved.items():
                    self.tensors[k].copy_(v)
            self._pending = None
        self.teacher = TeacherView(student, self.tensors)
        object.__setattr__(pl_module, self.attribute, self.teacher)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning restored the loops, so a resumed run sees its real global step here
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step != self._last_step:  # skip batches that only accumulated gradients
            self._last_step = trainer.global_step
            self.update(self._student(pl_module))

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """One EMA step towards ``student``; integer buffers are copied unless ``momentum == 1``."""
        if self.tensors is None:
            raise RuntimeError("EMATeacher.update called before the teacher was created (on_fit_start)")
        live = self.trained_tensors(student)
        for name, t in self.tensors.items():
            s = live[name]
            if t.is_floating_point():
                t.lerp_(s.to(t.dtype), 1.0 - self.momentum)  # exact at weights 0 and 1
            elif self.momentum < 1.0:
                t.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        teacher = self.tensors if self.tensors is not None else (self._pending or {}).get("teacher")
        return {"momentum": self.momentum, "last_step": self._last_step, "teacher": teacher}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("teacher") is None:
            return
        saved = state_dict.get("momentum")
        if saved is not None and saved != self.momentum:
            rank_zero_warn(f"EMATeacher: the checkpoint's teacher was built with momentum {saved}; continuing with the configured {self.momentum}")
        self._pending = state_dict
        self._last_step = int(state_dict.get("last_step", -1))


class TeacherView:
    """The EMA teacher as a callable: the student's modules with the teacher's tensors swapped in."""

    def __init__(self, student: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        self.student, self.tensors = student, tensors

    training = False

    @torch.no_grad()
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        modes = [(m, m.training) for m in self.student.modules()]
        self.student.eval()
        try:
            return torch.func.functional_call(self.student, self.tensors, args, kwargs, strict=False)
        finally:
            for m, mode in modes:
                m.training = mode

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The teacher's full state: the student's frozen tensors with the teacher's copies over them."""
        return {**{k: v.detach() for k, v in self.student.state_dict().items()}, **self.tensors}
