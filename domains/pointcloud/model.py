"""MCFT (and ``predict``'s writer, at the end): momentum-consistency fine-tuning of a pretrained point
encoder (Paul, Patterson and Bouguila, "An Adapter-free Fine-tuning Approach for Tuning 3D Foundation
Models", arXiv 2603.23730).

Few labelled clouds are too few to fine-tune a whole foundation model (it overfits and drifts
from its pretrained features) and adapters add inference cost. MCFT instead

1. trains only the top ``train_blocks`` (K) transformer blocks, the final norm and the head; the
   patch embedding and lower blocks stay frozen at their pretrained values;
2. keeps an EMA teacher of the encoder, initialised from the pretrained weights with momentum
   ``momentum`` (m), and adds ``consistency_weight`` (lambda) * (1 - cos(student(view 1),
   stopgrad(teacher(view 2)))) to the cross-entropy, so the trained blocks stay close to
   task-agnostic features (features standardised per dimension with the batch's statistics
   before the cosine; see ``compute_losses``);
3. optionally (semi-supervised) applies the consistency to unlabelled clouds as well, with
   pseudo-labels from the teacher where its confidence exceeds ``pseudo_label_threshold``;
4. optionally (pruning) drops the top ``prune_blocks`` (L) blocks before fine-tuning.

The teacher lives in :class:`suite.callbacks.EMATeacher` (returned by ``configure_callbacks``),
not in the model, so the deployed classifier is exactly encoder + linear head: the same
parameter count and latency as the original model. Baselines are the same module with other
settings: full fine-tuning (``train_blocks: -1``, lambda 0), linear probe (``train_blocks: 0``,
lambda 0), LoRA (``adapter: LoRA``), prompt tuning (``encoder.num_prompts > 0``).

Reference-code fix: a frozen BatchNorm (in the patch embedding) still updates its running
statistics in train mode, so "frozen" layers drift; frozen BatchNorms are kept in eval mode.
"""

from __future__ import annotations

import contextlib
import csv
from pathlib import Path
from typing import Any, Literal, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from suite.adapters import AdapterSpec, parameter_report
from suite.backbones.point import LoadReport, PointEncoder, PointEncoderConfig, load_encoder_state, load_point_mae
from suite.callbacks import EMATeacher
from suite.module import AdaptedModule, read_checkpoint
from suite.plots import pyplot
from suite.strategies import assign_

from .pretrain import scale_and_translate

#: small per-point jitter (std, clip) so the two views differ locally as well as globally
JITTER = (0.01, 0.05)


def linear_head(num_features: int, num_classes: int) -> nn.Sequential:
    """A linear classifier on standardised features (BatchNorm without affine parameters), MAE's
    linear-probe head: pretrained features here vary by ~1-5 % around a large common offset (the
    MAE-pretrained class token barely varies at all), which a plain linear layer cannot use in
    the tens of steps a few-shot run has."""
    return nn.Sequential(nn.BatchNorm1d(num_features, affine=False), nn.Linear(num_features, num_classes))


class PointCloudClassifier(AdaptedModule):
    """Point encoder + linear head, fine-tuned by MCFT or by one of the baselines.

    Args:
        num_classes: classes of the task (N of an N-way episode); linked from the data.
        encoder: encoder shape; must match the pretrained checkpoint.
        init_from: (an AdaptedModule argument) a checkpoint of the pretraining stage (or of an
            earlier fine-tuning stage), a Point-MAE / Point-BERT checkpoint, or ``None`` (random
            encoder: training from scratch). ``domains/pointcloud.yaml`` gives ``foundation``, a
            prerequisite: the cached pretraining run of ``pretrain.yaml`` for this encoder shape,
            run once first when absent (``suite.prerequisites``).
        train_blocks: K, top blocks that train; 0 = none (linear probe / LoRA), -1 = the whole
            encoder including the patch embedding (full fine-tuning).
        momentum: m of the EMA teacher (1 keeps the teacher at the pretrained weights). 0.99 is
            Mean Teacher's ramp-up value: over a 20-step episode the teacher moves 18 % of the way
            to the student; ``EMATeacher``'s own default, 0.999 (MoCo's, for 10^4+ steps), would
            move it 2 %. MCFT's value is not given in what we could read of the paper.
        consistency_weight: lambda; 0 switches the teacher off.
        prune_blocks: L, top blocks removed before fine-tuning.
        pseudo_label_threshold: semi-supervised only: teacher confidence above which an
            unlabelled cloud also gets a cross-entropy term on its pseudo-label (None: off).
        head_lr: learning rate of the (randomly initialised) head and prompt tokens; the encoder
            uses the optimizer's. Few-shot runs are tens of steps, too few for a new head at an
            encoder learning rate. None: one learning rate for everything.
        head_init: ``prototypes`` starts the head as the nearest-class-mean classifier of the
            support set (see :meth:`init_head_from_prototypes`); ``random`` from its seeded init.
        aug_seed: seeds the per-step augmentations, so a resumed run repeats an uninterrupted one.
    """

    def __init__(
        self,
        num_classes: int = 5,
        encoder: PointEncoderConfig | None = None,
        train_blocks: int = 2,
        momentum: float = 0.99,
        consistency_weight: float = 1.0,
        prune_blocks: int = 0,
        pseudo_label_threshold: float | None = None,
        head_lr: float | None = None,
        head_init: Literal["prototypes", "random"] = "prototypes",
        aug_seed: int = 0,
        adapter: AdapterSpec | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(adapter=adapter, **kwargs)
        cfg = PointEncoderConfig.coerce(encoder)
        self.hparams["encoder"] = cfg.to_dict()  # plain dict: checkpoints load with weights_only
        if pseudo_label_threshold is not None and not 0 < pseudo_label_threshold < 1:
            raise ValueError(f"pseudo_label_threshold must be in (0, 1) or null, got {pseudo_label_threshold}")
        self.num_classes, self.train_blocks, self.momentum = num_classes, train_blocks, momentum
        self.consistency_weight, self.pseudo_label_threshold, self.aug_seed = consistency_weight, pseudo_label_threshold, aug_seed
        if head_init not in ("prototypes", "random"):
            raise ValueError(f"head_init must be 'prototypes' or 'random', got {head_init!r}")
        self.head_lr, self.head_init = head_lr, head_init
        with self.seeded():
            self.backbone = PointEncoder(cfg)
            self.head = linear_head(self.backbone.num_features, num_classes)
        self.load_report: LoadReport | None = None
        self.load_init_from()  # the pretrained encoder, before pruning and adapting
        self.backbone.prune(prune_blocks)
        self.adapt()  # injects `adapter` if any; freezes the rest of the backbone
        self._unfreeze(train_blocks)
        self.report = parameter_report(self, self.method)
        self._freeze_batchnorm_statistics()
        self.val_acc, self.test_acc = MulticlassAccuracy(num_classes, average="micro"), MulticlassAccuracy(num_classes, average="micro")

    # --- building -------------------------------------------------------------------------------
    def load_checkpoint_file(self, path: Path) -> AdaptedModule | None:
        """A suite stage checkpoint goes through the shared lifecycle; a Point-MAE / Point-BERT
        ``.pth`` (or a Lightning checkpoint written outside the CLI) loads its encoder directly."""
        ckpt = read_checkpoint(path)  # a file, or the sharded folder of an FSDP2 stage
        if isinstance(ckpt, dict) and "_class_path" in (ckpt.get("hyper_parameters") or {}):
            return super().load_checkpoint_file(path)
        self.load_report = load_point_mae(self.backbone, path)  # keeps the encoder's keys (backbone.* in a stage checkpoint)
        return None

    def extend_from(self, earlier: AdaptedModule) -> None:
        """Only the earlier stage's encoder is taken (its decoder or head is another task's)."""
        self.load_report = load_encoder_state(self.backbone, earlier.backbone.state_dict(), f"init_from {self.init_from}")

    def _unfreeze(self, k: int) -> None:
        blocks = self.backbone.blocks.blocks
        if k == -1:
            self.backbone.requires_grad_(True)
        elif 0 <= k <= len(blocks):
            for block in blocks[len(blocks) - k :]:
                block.requires_grad_(True)
            self.backbone.norm.requires_grad_(k > 0)
        else:
            raise ValueError(f"train_blocks must be -1 (all) or 0..{len(blocks)} (the encoder has {len(blocks)} blocks), got {k}")
        if self.backbone.cfg.num_prompts:
            self.backbone.prompt_tokens.requires_grad_(True)

    @property
    def method(self) -> str:
        if self.adapter is not None:
            return self.adapter.method
        if self.backbone.cfg.num_prompts:
            return "prompt tuning"
        if self.train_blocks == -1:
            return "full fine-tuning"
        if self.train_blocks == 0:
            return "linear probe"
        return f"MCFT (top {self.train_blocks} blocks, lambda {self.consistency_weight}, m {self.momentum})"

    def param_groups(self) -> list[Any]:
        if self.head_lr is None:
            return super().param_groups()
        fresh = list(self.head.parameters()) + ([self.backbone.prompt_tokens] if self.backbone.cfg.num_prompts else [])
        ids = {id(p) for p in fresh}
        rest = [p for p in self.trainable_parameters() if id(p) not in ids]
        return ([{"params": rest}] if rest else []) + [{"params": fresh, "lr": self.head_lr}]

    def train(self, mode: bool = True) -> "PointCloudClassifier":
        super().train(mode)
        self._freeze_batchnorm_statistics()
        return self

    def on_train_epoch_start(self) -> None:
        self._freeze_batchnorm_statistics()  # Lightning does not call train() itself; be sure

    def _freeze_batchnorm_statistics(self) -> None:
        """Frozen BatchNorms (all parameters frozen) keep their pretrained running statistics."""
        for m in self.modules():
            params = list(m.parameters())
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and params and not any(p.requires_grad for p in params):
                m.eval()

    def configure_callbacks(self) -> list[L.Callback]:
        callbacks: list[L.Callback] = [CloudPredictionWriter()]
        if self.consistency_weight > 0:
            callbacks.append(EMATeacher(student="backbone", attribute="ema_teacher", momentum=self.momentum))
        return callbacks

    def on_fit_start(self) -> None:
        super().on_fit_start()
        dm = self.trainer.datamodule
        if self.head_init == "prototypes" and self.trainer.ckpt_path is None and dm is not None:  # not on resume
            # the whole labelled set, unshuffled and identical on every rank (no DistributedSampler)
            self.init_head_from_prototypes(dm.loader("train") if hasattr(dm, "loader") else dm.train_dataloader())

    #: under FSDP2 the prototype features (computed in on_fit_start, outside a step) gather the
    #: parameters as a step does
    fsdp_methods = ("prototype_features",)

    @torch.no_grad()
    def prototype_features(self, loader: Any) -> tuple[Tensor, Tensor]:
        """Encoder features (eval mode, no augmentation) and labels of every labelled cloud in ``loader``."""
        mode = self.training
        self.eval()
        feats, labels = [], []
        # the run's precision (autocast under bf16-mixed, where frozen weights may be stored in bf16):
        # Lightning applies it to the step methods only, not to this fit-start hook
        precision = self._trainer.precision_plugin.forward_context() if self._trainer is not None else contextlib.nullcontext()
        with precision:
            for batch in loader:
                batch = batch["labelled"] if "labelled" in batch else batch
                feats.append(self.backbone(batch["points"].to(self.device)).float())
                labels.append(batch["label"].to(self.device))
        self.train(mode)
        return torch.cat(feats), torch.cat(labels)

    @torch.no_grad()
    def init_head_from_prototypes(self, loader: Any) -> None:
        """Make the head the nearest-class-mean classifier of the labelled clouds (no augmentation).

        The head's BatchNorm gets the features' mean and variance; class ``c`` gets weight
        ``mu_c / T`` and bias ``-|mu_c|^2 / (2 T)`` for the mean ``mu_c`` of its standardised
        features, so the arg-max logit is the nearest class mean (Euclidean); ``T = sqrt(dim)``
        keeps the initial logits O(1) for the cross-entropy. Fine-tuning then starts from what a
        linear probe would converge towards (LP-FT, Kumar et al., ICLR 2022) instead of from a
        random head whose first gradients distort the pretrained features.
        """
        f, y = self.prototype_features(loader)
        self.fsdp_reshard()  # FSDP2: the head is written shard by shard (assign_), not into a gathered copy
        absent = sorted(set(range(self.num_classes)) - set(y.tolist()))
        if absent:
            raise ValueError(f"head_init=prototypes: classes {absent} have no labelled cloud in the training set")
        norm, linear = self.head
        norm.running_mean.copy_(f.mean(0))
        norm.running_var.copy_(f.var(0, unbiased=False))
        z = (f - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps)
        protos = torch.stack([z[y == c].mean(0) for c in range(self.num_classes)])
        temperature = z.shape[1] ** 0.5
        assign_(linear.weight, protos / temperature)
        assign_(linear.bias, -protos.pow(2).sum(1) / (2 * temperature))

    # --- forward and losses ------------------------------------------------------------------------
    def forward(self, points: Tensor) -> Tensor:
        return self.head(self.backbone(points))

    def augment(self, points: Tensor, g: torch.Generator) -> Tensor:
        """Point-MAE's fine-tuning augmentation (per-axis scale and shift) plus a small jitter."""
        moved = scale_and_translate(points, g)
        jitter = (torch.randn(points.shape, generator=g) * JITTER[0]).clamp(-JITTER[1], JITTER[1])
        return moved + jitter.to(points)

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        labelled, unlabelled = (batch["labelled"], batch["unlabelled"]) if "labelled" in batch else (batch, None)
        if not self.training:
            return {"loss": F.cross_entropy(self(labelled["points"]), labelled["label"])}
        g = torch.Generator().manual_seed(self.aug_seed * 1_000_003 + int(self.global_step))
        feats = self.backbone(self.augment(labelled["points"], g))
        n_lab, clouds = len(feats), labelled["points"]
        if unlabelled is not None and self.consistency_weight > 0:
            feats = torch.cat([feats, self.backbone(self.augment(unlabelled["points"], g))])
            clouds = torch.cat([clouds, unlabelled["points"]])
        logits = self.head(feats)  # one batch through the head's BatchNorm
        losses = {"ce": F.cross_entropy(logits[:n_lab], labelled["label"])}
        loss = losses["ce"]
        if self.consistency_weight > 0:
            teacher = getattr(self, "ema_teacher", None)
            if teacher is None:
                raise RuntimeError("consistency_weight > 0 needs the EMATeacher callback (added by configure_callbacks when fitting)")
            with torch.no_grad():
                target = teacher(self.augment(clouds, g))
            # compared after standardising both with the student batch's statistics (as the head sees
            # them): raw features share a large common offset, which makes the raw cosine ~0.999
            # whatever the clouds, and the constraint toothless
            mu, sigma = feats.detach().mean(0), feats.detach().std(0) + 1e-6
            losses["consistency"] = (1 - F.cosine_similarity((feats - mu) / sigma, (target - mu) / sigma, dim=-1)).mean()
            loss = loss + self.consistency_weight * losses["consistency"]
            if len(feats) > n_lab and self.pseudo_label_threshold is not None:
                conf, pseudo = self._predict_frozen_head(target[n_lab:]).softmax(-1).max(-1)
                keep = conf >= self.pseudo_label_threshold
                losses["pseudo_frac"] = keep.float().mean()
                if keep.any():
                    losses["pseudo_ce"] = F.cross_entropy(logits[n_lab:][keep], pseudo[keep])
                    loss = loss + losses["pseudo_ce"]
        losses["loss"] = loss
        return losses

    @torch.no_grad()
    def _predict_frozen_head(self, feats: Tensor) -> Tensor:
        """The head in eval mode (running statistics, nothing updated): pseudo-labels for the teacher."""
        mode = self.head.training
        self.head.eval()
        try:
            return self.head(feats)
        finally:
            self.head.train(mode)

    # --- evaluation and prediction -------------------------------------------------------------------
    def _evaluate(self, batch: dict[str, Tensor], split: str, metric: MulticlassAccuracy) -> None:
        logits = self(batch["points"])
        metric.update(logits, batch["label"])
        bs = len(logits)
        self.log(f"{split}/loss", F.cross_entropy(logits, batch["label"]), sync_dist=True, batch_size=bs)
        self.log(f"{split}/acc", metric, prog_bar=split == "val", batch_size=bs)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        prob = self(batch["points"]).softmax(-1)
        return {"index": batch["index"], "label": batch["label"], "prob": prob, "points": batch["points"]}

    def on_fit_end(self) -> None:
        m = self.trainer.callback_metrics
        acc = f"{float(m['val/acc']):.4f}" if "val/acc" in m else "n/a"
        rank_zero_info(
            f"\n| method | trainable / total params | val acc |\n|---|---|---|\n"
            f"| {self.method} | {self.report.trainable:,} / {self.report.total:,} | {acc} |"
        )


# --------------------------------------------------------------------------------------------------
# ``predict`` output: one CSV row per cloud and a PNG of sample clouds coloured by prediction.


class CloudPredictionWriter(BasePredictionWriter):
    """Write ``<default_root_dir>/predictions/predictions.csv`` and ``predictions.png``.

    The CSV holds the cloud id, true label (-1 if unknown), predicted class and its probability;
    the PNG shows up to ``n_plot`` clouds spread evenly over the set, each coloured by its
    predicted class.
    """

    def __init__(self, n_plot: int = 12) -> None:
        super().__init__(write_interval="epoch")
        self.n_plot = n_plot

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Sequence[Any], batch_indices: Any) -> None:
        if not trainer.is_global_zero or not predictions:
            return
        outs = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        prob = torch.cat([o["prob"] for o in outs]).float().cpu()
        label = torch.cat([o["label"] for o in outs]).cpu().numpy()
        index = torch.cat([o["index"] for o in outs]).cpu().numpy()
        points = torch.cat([o["points"] for o in outs]).cpu().numpy()
        conf, pred = prob.max(-1)
        dm = trainer.datamodule
        names = list(getattr(dm, "class_names", []) or [str(i) for i in range(prob.shape[1])])
        split = "predict" if "predict" in getattr(dm, "splits", {}) else "test"
        ids = getattr(dm, "ids", {}).get(split) or [str(i) for i in index]
        out = Path(trainer.default_root_dir) / "predictions"
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "predictions.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "label", "label_name", "pred", "pred_name", "confidence"])
            for i in range(len(pred)):
                lab = int(label[i])
                w.writerow([ids[i], lab, names[lab] if lab >= 0 else "", int(pred[i]), names[int(pred[i])], f"{float(conf[i]):.4f}"])
        show = np.unique(np.linspace(0, len(points) - 1, min(self.n_plot, len(points))).astype(int))  # spread over classes
        plot_clouds(points[show], pred.numpy()[show], label[show], names, out / "predictions.png")


def plot_clouds(points: np.ndarray, pred: np.ndarray, label: np.ndarray, names: list[str], path: Path) -> None:
    """A grid of 3-D scatter plots, every cloud in the colour of its predicted class."""
    plt = pyplot()

    cols = min(4, len(points))
    rows = -(-len(points) // cols)
    fig = plt.figure(figsize=(3 * cols, 3 * rows))
    cmap = plt.get_cmap("tab20")
    for i, (p, y_hat, y) in enumerate(zip(points, pred, label)):
        ax = fig.add_subplot(rows, cols, i + 1, projection="3d")
        ax.scatter(p[:, 0], p[:, 1], p[:, 2], s=2, color=cmap(int(y_hat) % 20))
        truth = f" (true {names[int(y)]})" if y >= 0 else ""
        ax.set_title(f"{names[int(y_hat)]}{truth}", fontsize=8, color="black" if y < 0 or y == y_hat else "red")
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
