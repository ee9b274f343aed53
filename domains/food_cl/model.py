"""DIME: class-incremental food recognition under dual imbalance with merged adapters (and, at the end,
the supervised pretraining of the backbone that DIME keeps frozen).

Zhang et al., "Dual-Imbalance Continual Learning for Real-World Food Recognition" (CVPR 2026;
reference code xiaoyanzhang1/DIME on LAMDA-PILOT). One fit per task (the suite's stages run the
sequence, each starting from the previous task's checkpoint):

1. **Train** a fresh AdaptFormer stack (``adapters.py``: one parallel FFN adapter per block of
   the frozen timm ViT) with a task-local cosine head over the task's classes only, by Balanced
   Softmax (logits + log n_c, for the long tail inside the task); SGD, momentum 0.9, lr 0.07,
   weight decay 5e-4, cosine schedule to 0 over the fit's epochs (the reference: 20 epochs of
   batch 16; our budget is in ``domains/food_cl.yaml``).
2. **Merge** it into the running stack at the end of the last epoch (``adapters.py``): DIME's
   class-count-weighted joint-SVD merge with rank-wise rho (0.6 / 0.2 / 0.9), or a baseline.
3. **Prototypes**: the mean feature of each of the task's classes under the merged stack is
   written into the global cosine classifier (optionally every seen class's, with old data).

The merge and the prototypes are written in ``on_train_epoch_end`` of the last epoch, which
Lightning runs before ``ModelCheckpoint`` saves ``last.ckpt``, so the checkpoint holds them (in
persistent buffers). The next task's :meth:`FoodDIME.extend_from` takes them from the rebuilt
earlier stage. Prediction uses the merged stack and the prototypes.

Baselines are settings of the same module (YAMLs in ``domains/food_cl/``): sequential fine-tuning
(``adapters: continue``, ``merge: replace``), prototype-only SimpleCIL (``adapter: null``), plain
averaging (``merge: average``), TIES (``merge: ties``), joint training (data ``mode: joint``).

Reference bugs fixed (each behaviour kept as an option):

* inverted class-count weights when the new task is the merge anchor (``merge_weights``; see
  ``adapters.py``);
* old prototypes never refreshed after later merges change the features (``prototypes: refresh``);
* a one-class task gives Balanced Softmax a single logit: its loss is 0 and its adapter never
  trains, yet the reference merges that untrained adapter (``one_class``). Here such a task
  trains nothing, skips the merge and only writes its prototype.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassConfusionMatrix

from suite.adapters import AdapterSpec
from suite.module import AdaptedModule, CheckpointMismatchError

from .adapters import (
    CosineClassifier,
    PrototypeClassifier,
    Weights,
    adapter_stack,
    average_merge,
    balanced_softmax_loss,
    build_vit,
    dime_merge,
    load_adapter_stack,
    load_backbone_state,
    read_state_dict,
    reset_trained,
    ties_merge,
    using_branch,
)
from .metrics import FoodPredictionWriter

Merge = Literal["dime", "average", "ties", "replace"]
STATE_BUFFERS = ("tasks_learned", "merged_classes", "merged_count", "train_counts")


def dime_sgd(params: Any) -> torch.optim.Optimizer:
    """The reference optimiser: SGD, momentum 0.9, lr 0.07, weight decay 5e-4."""
    return torch.optim.SGD(params, lr=0.07, momentum=0.9, weight_decay=5e-4)


class FoodDIME(AdaptedModule):
    """Frozen ViT + AdaptFormer stacks merged task by task + a prototype cosine classifier.

    Args:
        num_classes, classes_per_task, task: the stream and the task this fit learns (linked
            from the data; ``classes_per_task`` is ``[C]`` for joint training).
        backbone, img_size, backbone_kwargs: the timm ViT (:func:`~domains.food_cl.adapters.build_vit`);
            ``img_size`` must equal the data's ``image_size``.
        init_from: (an AdaptedModule argument) the previous task's checkpoint; for the first task
            the pretrained backbone: the ``foundation`` prerequisite (a cached pretraining run), a
            suite checkpoint, or a timm ViT state dict / safetensors file (e.g.
            ``vit_base_patch16_224.augreg_in21k``).
        adapter: the AdaptFormer spec; ``null``: no adapter, prototypes of the frozen backbone
            (SimpleCIL).
        adapters: ``fresh`` (DIME: a new stack per task) or ``continue`` (sequential fine-tuning
            of one stack).
        fresh_init: ``shared``: every task's stack starts from the same seeded draw (a common
            origin, as merging assumes); ``per_task``: a new draw per task, as the reference.
        merge: ``dime``, ``average`` (running mean of the task stacks), ``ties`` (TIES over the
            task stacks, relative to the shared init) or ``replace`` (the new stack only).
        merge_weights: ``own`` (the fix) or ``reference`` (inverted when the new task is the anchor).
        rho_frac, rho_head, rho_tail: DIME's rank-wise threshold modulation.
        ties_density: entries kept by TIES's trim step.
        prototypes: ``current`` (the task's classes only: the reference, exemplar-free) or
            ``refresh`` (every seen class, with the old training images, after each merge).
        one_class: ``skip`` (a one-class task writes its prototype only) or ``train`` (the reference).
        prototype_scale: cosine logit scale of the prototype classifier (predictions do not
            depend on it; it sets the test loss and the confidences).
        adapter_seed: seeds the fresh stacks and task heads.
        before_first_task: a fit that only reads the pretrained backbone into this model and saves
            it: the stage every task stage follows (see ``domains/food_cl.yaml``).
    """

    def __init__(
        self,
        num_classes: int = 50,
        task: int = 0,
        classes_per_task: list[int] | None = None,
        backbone: str = "vit_tiny_patch16_224",
        img_size: int = 32,
        backbone_kwargs: dict[str, Any] | None = None,
        adapters: Literal["fresh", "continue"] = "fresh",
        fresh_init: Literal["shared", "per_task"] = "shared",
        merge: Merge = "dime",
        merge_weights: Weights = "own",
        rho_frac: float = 0.6,
        rho_head: float = 0.2,
        rho_tail: float = 0.9,
        ties_density: float = 0.2,
        prototypes: Literal["current", "refresh"] = "current",
        one_class: Literal["skip", "train"] = "skip",
        prototype_scale: float = 16.0,
        adapter_seed: int = 0,
        before_first_task: bool = False,
        adapter: AdapterSpec | None = None,
        optimizer: OptimizerCallable = dime_sgd,
        **kwargs: Any,
    ) -> None:
        super().__init__(adapter=adapter, optimizer=optimizer, **kwargs)
        self.classes_per_task = [int(n) for n in (classes_per_task or [num_classes])]
        if sum(self.classes_per_task) != num_classes or min(self.classes_per_task) < 1:
            raise ValueError(f"classes_per_task {self.classes_per_task} must be positive and sum to num_classes={num_classes}")
        if not 0 <= task < len(self.classes_per_task):
            raise ValueError(f"task {task} is not one of the stream's {len(self.classes_per_task)} tasks")
        for name, value, allowed in (("adapters", adapters, ("fresh", "continue")), ("fresh_init", fresh_init, ("shared", "per_task")),
                                     ("merge", merge, ("dime", "average", "ties", "replace")),
                                     ("prototypes", prototypes, ("current", "refresh")), ("one_class", one_class, ("skip", "train"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        self.num_classes, self.task, self.img_size = num_classes, task, img_size
        self.adapters, self.fresh_init, self.merge, self.merge_weights = adapters, fresh_init, merge, merge_weights
        self.rho = dict(rho_frac=rho_frac, rho_head=rho_head, rho_tail=rho_tail)
        self.ties_density, self.prototypes, self.one_class = ties_density, prototypes, one_class
        self.adapter_seed, self.before_first_task = adapter_seed, before_first_task
        offset = sum(self.classes_per_task[:task])
        self.task_classes = range(offset, offset + self.classes_per_task[task])
        with self.seeded():
            self.backbone = build_vit(backbone, img_size, **(backbone_kwargs or {}))
        dim = self.backbone.num_features
        with self.seeded(self._stack_seed()):
            self.task_head = CosineClassifier(dim, len(self.task_classes))  # task-local, trained with the stack
        self.classifier = PrototypeClassifier(dim, num_classes, prototype_scale)
        self.register_buffer("tasks_learned", torch.tensor(0))  # tasks merged and prototyped so far
        self.register_buffer("merged_classes", torch.tensor(0))  # classes the merged stack was trained on
        self.register_buffer("merged_count", torch.tensor(0))  # task stacks merged into it
        self.register_buffer("train_counts", torch.zeros(num_classes, dtype=torch.long))  # images per learned class
        self.register_buffer("task_counts", torch.ones(len(self.task_classes)), persistent=False)  # Balanced Softmax priors
        self.adapt()
        if self.adapter is not None:
            reset_trained(self.backbone, self._stack_seed())
        self.history: list[dict[str, Any]] = []  # the earlier stages' states, rebuilt with them (for test rows and TIES)
        self.val_acc = MeanMetric()
        self.load_init_from()

    # --- the stream -------------------------------------------------------------------------------
    def _stack_seed(self) -> int:
        return self.adapter_seed if self.fresh_init == "shared" else self.adapter_seed + 1000 * (self.task + 1)

    @property
    def seen(self) -> int:
        """Classes learned once this task is done."""
        return self.task_classes.stop

    @property
    def trains_adapter(self) -> bool:
        """Whether this fit trains an adapter stack (not SimpleCIL, the start stage or a skipped one-class task)."""
        skip = len(self.task_classes) < 2 and self.one_class == "skip"
        return self.adapter is not None and not self.before_first_task and not skip

    # --- starting points --------------------------------------------------------------------------
    def load_checkpoint_file(self, path: Any) -> AdaptedModule | None:
        """A suite checkpoint (an earlier task, or the pretraining run) goes through the lifecycle; any
        other file is read as a timm ViT state dict / safetensors file for the frozen backbone."""
        if path.suffix != ".safetensors":
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(ckpt, dict) and "state_dict" in ckpt and "hyper_parameters" in ckpt:  # a Lightning checkpoint
                return super().load_checkpoint_file(path)
        ignored = load_backbone_state(self.backbone, read_state_dict(path), f"init_from {path}")
        rank_zero_info(f"backbone read from {path}" + (f" (classifier keys ignored: {', '.join(ignored[:4])})" if ignored else ""))
        return None

    def extend_from(self, earlier: AdaptedModule) -> None:
        """A pretraining stage gives its backbone only; an earlier task gives the backbone, the merged
        stack, the prototypes and the counters (and its trained stack when ``adapters: continue``)."""
        source = f"init_from {self.init_from}"
        load_backbone_state(self.backbone, earlier.backbone.state_dict(), source)
        if not isinstance(earlier, FoodDIME):
            return
        if (earlier.num_classes, earlier.classes_per_task) != (self.num_classes, self.classes_per_task):
            raise CheckpointMismatchError(f"{source} learned the stream {earlier.classes_per_task} of {earlier.num_classes} classes; "
                                          f"this model's is {self.classes_per_task} (same data and protocol_seed expected)")
        if (earlier.adapter is None) != (self.adapter is None):
            raise CheckpointMismatchError(f"{source} was trained {'without' if earlier.adapter is None else 'with'} adapters; this model "
                                          f"{'has none' if self.adapter is None else 'has them'}")
        if int(earlier.tasks_learned) != self.task:
            raise CheckpointMismatchError(f"{source} has learned {int(earlier.tasks_learned)} tasks; task {self.task} starts from the "
                                          f"stage that learned task {self.task - 1} (or the start stage for task 0)")
        with torch.no_grad():
            if self.adapter is not None:
                load_adapter_stack(self.backbone, adapter_stack(earlier.backbone, "merged"), "merged")
                if self.adapters == "continue":  # carried through stages that trained nothing, too
                    load_adapter_stack(self.backbone, adapter_stack(earlier.backbone, "trained"), "trained")
            self.classifier.load_state_dict(earlier.classifier.state_dict())
            for name in STATE_BUFFERS:
                getattr(self, name).copy_(getattr(earlier, name))
        learned_own = not earlier.before_first_task and int(earlier.tasks_learned) == earlier.task + 1
        self.history = [*earlier.history, *([earlier.snapshot()] if learned_own else [])]

    def snapshot(self) -> dict[str, Any]:
        """This stage's learned state: what a test row and TIES need of it later."""
        has = self.adapter is not None
        return {"task": self.task, "seen": self.seen, "prototypes": self.classifier.prototypes.clone(),
                "filled": self.classifier.filled.clone(),
                "merged": adapter_stack(self.backbone, "merged") if has else None,
                "trained": adapter_stack(self.backbone, "trained") if self.trains_adapter else None}

    @contextmanager
    def state(self, row: dict[str, Any]) -> Iterator[None]:
        """Temporarily put an earlier stage's merged stack and prototypes in place (test rows)."""
        current = self.snapshot()
        try:
            self._put(row)
            yield
        finally:
            self._put(current)

    @torch.no_grad()
    def _put(self, row: dict[str, Any]) -> None:
        self.classifier.prototypes.copy_(row["prototypes"])
        self.classifier.filled.copy_(row["filled"])
        if row["merged"] is not None:
            load_adapter_stack(self.backbone, row["merged"], "merged")

    # --- training: the task's stack and head --------------------------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        dm = self.trainer.datamodule
        if list(getattr(dm, "classes_per_task", self.classes_per_task)) != self.classes_per_task or getattr(dm, "task", 0) != self.task:
            raise ValueError(f"the data's stream ({dm.classes_per_task}, task {dm.task}) differs from the model's "
                             f"({self.classes_per_task}, task {self.task}): set them in the data section only (they are linked)")
        if getattr(dm, "image_size", self.img_size) != self.img_size:
            raise ValueError(f"data.init_args.image_size ({dm.image_size}) != model.init_args.img_size ({self.img_size})")
        self.task_counts = torch.as_tensor(dm.task_class_counts, dtype=torch.float32, device=self.device)
        cb = self.trainer.checkpoint_callback
        if self.trains_adapter and cb is not None and hasattr(cb, "_should_save_on_train_epoch_end") and not cb._should_save_on_train_epoch_end(self.trainer):
            raise ValueError("the merge and prototypes are written at the end of the last training epoch: the checkpoint must be "
                             "saved then too (set checkpoint.save_on_train_epoch_end: true)")

    def on_train_start(self) -> None:
        if not self.trains_adapter:  # nothing to train: finish now; ModelCheckpoint saves at on_train_end
            if not self.before_first_task:
                self.finish_task(self.trainer.datamodule)
            why = "start stage" if self.before_first_task else "no adapter (prototypes only)" if self.adapter is None else "one-class task"
            rank_zero_info(f"task {self.task}: {why}: no training")
            self.trainer.should_stop = True

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        local = batch["label"] - self.task_classes.start
        if bool(((local < 0) | (local >= len(self.task_classes))).any()):
            raise ValueError(f"a batch holds labels outside task {self.task}'s classes {self.task_classes}")
        with using_branch(self.backbone, "trained"):
            logits = self.task_head(self.backbone(batch["image"]))
        return {"loss": balanced_softmax_loss(logits, local, self.task_counts),
                "acc": (logits.argmax(-1) == local).float().mean()}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        keep = (batch["label"] >= self.task_classes.start) & (batch["label"] < self.seen)
        if keep.any():  # the task head knows the task's classes only
            losses = self.compute_losses({"image": batch["image"][keep], "label": batch["label"][keep]})
            self.val_acc.update(losses["acc"], weight=int(keep.sum()))
            self.log("val/loss", losses["loss"], batch_size=int(keep.sum()))
            self.log("val/task_acc", self.val_acc, prog_bar=True)

    def on_train_epoch_end(self) -> None:
        t = self.trainer
        by_epochs = t.max_epochs is not None and t.max_epochs > 0 and self.current_epoch + 1 >= t.max_epochs
        by_steps = t.max_steps is not None and t.max_steps > 0 and self.global_step >= t.max_steps
        if self.trains_adapter and (t.should_stop or by_epochs or by_steps):
            self.finish_task(t.datamodule)

    def configure_optimizers(self) -> Any:
        if self.scheduler_factory is not None:
            return super().configure_optimizers()
        optimizer = self.optimizer_factory(self.param_groups())
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else None
        span, interval = (epochs, "epoch") if epochs else (int(self.trainer.estimated_stepping_batches), "step")
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, span), eta_min=0.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    # --- the end of a task: merge, prototypes ---------------------------------------------------
    @torch.no_grad()
    def finish_task(self, dm: Any) -> None:
        """Merge the trained stack (if any) and write the prototypes; once per task."""
        if int(self.tasks_learned) != self.task:
            return
        if self.trains_adapter:
            self._merge()
        self.write_prototypes(dm)
        counts = torch.as_tensor(dm.task_class_counts, dtype=torch.long, device=self.train_counts.device)
        self.train_counts[self.task_classes.start : self.seen] = counts
        self.tasks_learned.fill_(self.task + 1)

    def _merge(self) -> None:
        new, merged = adapter_stack(self.backbone, "trained"), adapter_stack(self.backbone, "merged")
        n_old, n_new = int(self.merged_classes), len(self.task_classes)
        if self.merge == "replace" or int(self.merged_count) == 0:
            out = new
        elif self.merge == "dime":
            out = dime_merge(merged, new, n_old, n_new, weights=self.merge_weights, **self.rho)
        elif self.merge == "average":
            out = average_merge(merged, new, int(self.merged_count), 1)
        else:
            stacks = [row["trained"] for row in self.history if row["trained"] is not None] + [new]
            out = ties_merge(stacks, base=self._init_stack() if self.fresh_init == "shared" else None, density=self.ties_density)
        load_adapter_stack(self.backbone, out, "merged")
        self.merged_classes += n_new
        self.merged_count += 1

    def _init_stack(self) -> dict[str, Tensor]:
        """The shared starting stack (the origin of every task's stack, TIES's base)."""
        current = adapter_stack(self.backbone, "trained")
        reset_trained(self.backbone, self._stack_seed())
        base = adapter_stack(self.backbone, "trained")
        load_adapter_stack(self.backbone, current, "trained")
        return base

    def write_prototypes(self, dm: Any) -> None:
        """Class means of the task's (or, with ``prototypes: refresh``, every seen) class under the merged stack."""
        loader = dm.prototype_dataloader(range(self.task + 1) if self.prototypes == "refresh" else None)
        feats, labels = [], []
        mode = self.training
        self.eval()
        with self._precision(), using_branch(self.backbone, "merged"):
            for batch in loader:
                feats.append(self.backbone(batch["image"].to(self.device)).float())
                labels.append(batch["label"].to(self.device))
        self.train(mode)
        written = self.classifier.write(torch.cat(feats), torch.cat(labels))
        expected = list(range(0 if self.prototypes == "refresh" else self.task_classes.start, self.seen))
        if written != expected:
            raise ValueError(f"task {self.task}: prototypes written for classes {written}, expected {expected} (a class without training images?)")

    def _precision(self) -> Any:
        return self._trainer.precision_plugin.forward_context() if self._trainer is not None else nullcontext()

    # --- inference: merged stack + prototypes ------------------------------------------------------
    def forward(self, images: Tensor) -> Tensor:
        """Logits over every class (-inf for classes not learned yet)."""
        with using_branch(self.backbone, "merged"):
            return self.classifier(self.backbone(images))

    def on_test_epoch_start(self) -> None:
        self._rows = [*self.history, self.snapshot()]  # A_t of every stage so far, from the rebuilt chain
        self._confusions = [MulticlassConfusionMatrix(self.num_classes).to(self.device) for _ in self._rows]

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images, labels = batch["image"], batch["label"]
        for i, (row, confusion) in enumerate(zip(self._rows, self._confusions)):
            keep = labels < row["seen"]
            if not keep.any():
                continue
            with self.state(row) if i < len(self._rows) - 1 else nullcontext():
                logits = self(images[keep]).float()
            confusion.update(logits.argmax(-1), labels[keep])
            if i == len(self._rows) - 1:
                self.log("test/loss", F.cross_entropy(logits, labels[keep]), batch_size=int(keep.sum()))

    def on_test_epoch_end(self) -> None:
        from .metrics import evaluation_report, write_evaluation

        dm = self.trainer.datamodule
        report = evaluation_report([c.compute().cpu() for c in self._confusions], [row["task"] for row in self._rows],
                                   self.classes_per_task, dm.task_of_class, self.train_counts.cpu().numpy())
        for key, value in report["scalars"].items():
            self.log(f"test/{key}", value)
        if self.trainer.is_global_zero:
            write_evaluation(report, self.trainer.default_root_dir, getattr(dm, "class_names", None))

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        prob = self(batch["image"]).float().softmax(-1)
        confidence, pred = prob.max(-1)
        return {"index": batch["index"], "label": batch["label"], "pred": pred, "confidence": confidence}

    def configure_callbacks(self) -> list[Any]:
        return [FoodPredictionWriter()]

    def on_fit_end(self) -> None:
        learned = int(self.tasks_learned)
        rank_zero_info(f"task {self.task}: classes {self.task_classes.start}..{self.seen - 1} | tasks learned {learned} | "
                       f"merged stack covers {int(self.merged_classes)} classes of {int(self.merged_count)} task stacks")


# --------------------------------------------------------------------------------------------------
# Supervised pretraining of the food ViT on the pretraining dishes: the backbone DIME keeps frozen.
#
# DIME starts from a ViT pretrained on ImageNet-21k, whose features already separate foods; no ViT
# weights can be downloaded here, so the default backbone is pretrained once, as a cached suite
# prerequisite (``domains/food_cl.yaml`` declares it; ``domains/food_cl/pretrain.yaml`` is the fit),
# on generated dishes whose recipes come from another random stream than the continual classes
# (data ``mode: pretrain``), so no continual class is ever seen before its task.
#
# The whole ViT trains with a linear head: cross-entropy with label smoothing, AdamW and a
# per-step cosine schedule with linear warm-up (the DeiT recipe, shortened). The head is dropped
# afterwards: the continual model takes only the backbone (``FoodDIME.extend_from``).


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps`` to the base learning rate, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class FoodViTPretrain(AdaptedModule):
    """A timm ViT + linear head trained on every pretraining class.

    Args:
        num_classes: pretraining classes (linked from the data).
        backbone, img_size, backbone_kwargs: the ViT (see :func:`~domains.food_cl.adapters.build_vit`);
            must equal the continual model's (``domains/food_cl.yaml`` links them).
        label_smoothing: of the cross-entropy (DeiT: 0.1).
        warmup_fraction: share of the steps spent warming the learning rate up.
    """

    adapter_note = "pretraining trains the whole ViT (no adapter); the continual model adds AdaptFormer adapters"

    def __init__(
        self,
        num_classes: int = 32,
        backbone: str = "vit_tiny_patch16_224",
        img_size: int = 32,
        backbone_kwargs: dict[str, Any] | None = None,
        label_smoothing: float = 0.1,
        warmup_fraction: float = 0.05,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_classes, self.img_size = num_classes, img_size
        self.label_smoothing, self.warmup_fraction = label_smoothing, warmup_fraction
        with self.seeded():
            self.backbone = build_vit(backbone, img_size, **(backbone_kwargs or {}))
            self.head = nn.Linear(self.backbone.num_features, num_classes)
        self.val_acc = MeanMetric()
        self.load_init_from()

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        logits = self(batch["image"])
        return {"loss": F.cross_entropy(logits, batch["label"], label_smoothing=self.label_smoothing if self.training else 0.0),
                "acc": (logits.argmax(-1) == batch["label"]).float().mean()}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        losses = self.compute_losses(batch)
        self.val_acc.update(losses["acc"], weight=len(batch["label"]))
        self.log("val/loss", losses["loss"], batch_size=len(batch["label"]))
        self.log("val/acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> Any:
        if self.scheduler_factory is not None:
            return super().configure_optimizers()
        optimizer = self.optimizer_factory(self.param_groups())
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = warmup_cosine(optimizer, total, max(1, round(self.warmup_fraction * total)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
