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

from suite.precision import cpu_description

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
            "cpu": cpu_description(),
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

    Under FSDP2 the copies are sharded like the parameters they follow (each rank keeps its
    shards: 1 / world size of the trained tensors), checkpoints hold the full tensors, and the
    teacher runs by putting its shards into the sharded parameters for the length of its
    forward (:meth:`TeacherView.__call__`): ``functional_call``'s swap would be overwritten by
    FSDP2's gather, so the teacher would silently run the student's weights.
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
        live = _sharded_trained_tensors(pl_module, student)
        if not live:
            raise ValueError(f"EMATeacher: {type(pl_module).__name__}.{self.student} has no trainable tensors to follow")
        self.tensors = {k: v.detach().clone() for k, v in live.items()}
        self._take_pending()
        self.teacher = TeacherView(student, self.tensors, root=pl_module)
        object.__setattr__(pl_module, self.attribute, self.teacher)

    def _take_pending(self) -> None:
        """A resumed run: the checkpoint's teacher replaces the fresh copy."""
        from suite.strategies import assign_

        if self._pending is None or self.tensors is None:
            return
        saved = self._pending["teacher"]
        if set(saved) != set(self.tensors):
            missing, unexpected = sorted(set(self.tensors) - set(saved)), sorted(set(saved) - set(self.tensors))
            raise ValueError(f"EMATeacher: the checkpoint's teacher does not fit the student: missing {missing[:8]}, unexpected {unexpected[:8]}")
        for k, v in saved.items():
            assign_(self.tensors[k], v)  # under FSDP2 each rank takes its shard of the saved full tensor
        self._pending = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # FSDP2 (Lightning's ModelParallelStrategy) restores callback state after on_fit_start,
        # the other strategies before it: here the checkpoint's teacher is in place either way
        self._take_pending()
        # after Lightning restored the loops, so a resumed run sees its real global step here
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step != self._last_step:  # skip batches that only accumulated gradients
            self._last_step = trainer.global_step
            _sharded_trained_tensors(pl_module, self._student(pl_module))  # under FSDP2: the sharded parameters in place
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
        from suite.strategies import full_tensor

        # under FSDP2 the full tensors (gathered on every rank: Lightning asks every rank for
        # callback state), so a checkpoint's teacher loads into any world size
        teacher = ({k: full_tensor(v) for k, v in self.tensors.items()} if self.tensors is not None
                   else (self._pending or {}).get("teacher"))
        return {"momentum": self.momentum, "last_step": self._last_step, "teacher": teacher}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("teacher") is None:
            return
        saved = state_dict.get("momentum")
        if saved is not None and saved != self.momentum:
            rank_zero_warn(f"EMATeacher: the checkpoint's teacher was built with momentum {saved}; continuing with the configured {self.momentum}")
        self._pending = state_dict
        self._last_step = int(state_dict.get("last_step", -1))


def _sharded_trained_tensors(root: nn.Module, student: nn.Module) -> dict[str, torch.Tensor]:
    """:meth:`EMATeacher.trained_tensors`, with every FSDP2 unit of ``root`` resharded first, so
    the tensors are the sharded parameters (DTensors) and not a gathered copy."""
    from suite.strategies import force_reshard, fsdp_units_of

    for unit in fsdp_units_of(root):
        force_reshard(unit)
    return EMATeacher.trained_tensors(student)


class TeacherView:
    """The EMA teacher as a callable: the student's modules with the teacher's tensors swapped in.

    ``root``: the module the student belongs to (the LightningModule), where FSDP2 units are found.
    """

    def __init__(self, student: nn.Module, tensors: dict[str, torch.Tensor], root: nn.Module | None = None) -> None:
        self.student, self.tensors, self.root = student, tensors, student if root is None else root

    training = False

    @torch.no_grad()
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from suite.strategies import fsdp_units_of

        modes = [(m, m.training) for m in self.student.modules()]
        self.student.eval()
        try:
            units = fsdp_units_of(self.root)
            if units:
                return self._sharded_call(units, args, kwargs)
            return torch.func.functional_call(self.student, self.tensors, args, kwargs, strict=False)
        finally:
            for m, mode in modes:
                m.training = mode

    def _sharded_call(self, units: list[nn.Module], args: tuple, kwargs: dict) -> Any:
        """FSDP2: every unit resharded, the teacher's shards copied into the sharded parameters (and
        its buffers into the buffers), the units that hold the student gathered, the forward run,
        then everything resharded, the student's values put back and the units that were
        gathered before (a root inside its step) gathered again, so the student's step goes on
        with its own weights. The swap costs one copy of the trained tensors' shards."""
        from suite.strategies import force_reshard, is_gathered, untracked_forwards

        gathered = [u for u in units if is_gathered(u)]
        live = _sharded_trained_tensors(self.root, self.student)
        own = {k: live[k].detach().clone() for k in self.tensors}
        # units whose parameters the student's forward reads without running their own forward
        # hooks (the root, or any unit the student lives in); the units inside it gather themselves
        holders = [u for u in units if any(m is self.student for m in u.modules())]
        try:
            for k, t in self.tensors.items():
                live[k].copy_(t)
            for u in holders:
                u.unshard()
            with untracked_forwards(units):
                return self.student(*args, **kwargs)
        finally:
            for u in units:
                force_reshard(u)
            for k, t in own.items():
                live[k].copy_(t)
            for u in gathered:
                u.unshard()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The teacher's full state: the student's frozen tensors with the teacher's copies over them."""
        return {**{k: v.detach() for k, v in self.student.state_dict().items()}, **self.tensors}
