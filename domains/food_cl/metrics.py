"""Class-incremental metrics (A_T, mean and weighted mean accuracy over tasks, forgetting, head/medium/tail),
what ``test`` reports and draws from them, and ``predict``'s output (sections below).

Conventions: accuracies are fractions in [0, 1]. ``acc_t[t]`` is the top-1 accuracy on the test
images of every class seen after task t (the reference's ``top1`` curve). The accuracy matrix
``acc[t, j]`` is the accuracy on task j's classes after task t (NaN for j > t). Counting is done
by torchmetrics' confusion matrix, which the plots reuse.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor
from torchmetrics.functional.classification import multiclass_confusion_matrix

from suite.plots import pyplot

#: training images per class above which a class is "head" (many-shot) and below which it is
#: "tail" (few-shot): the thresholds of Liu et al., CVPR 2019 (ImageNet-LT), used for Food-101-LT
MANY_SHOT = 100
FEW_SHOT = 20


def confusion(preds: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """(C, C) counts, rows = true class, columns = predicted class."""
    return multiclass_confusion_matrix(preds, targets, num_classes=num_classes)


def _group_accuracy(cm: Tensor, classes: Tensor | np.ndarray) -> float:
    classes = torch.as_tensor(classes, dtype=torch.long)
    n = cm[classes].sum()
    return float(cm[classes, classes].sum() / n) if n > 0 else float("nan")


def seen_accuracy(cm: Tensor, seen: int) -> float:
    """Top-1 accuracy over the test images of classes 0..seen-1 (A_t after the task that reaches ``seen``)."""
    return _group_accuracy(cm, torch.arange(seen))


def task_accuracies(cm: Tensor, task_of_class: Sequence[int] | np.ndarray, num_tasks: int | None = None) -> np.ndarray:
    """Accuracy on each task's classes (one row of the accuracy matrix); NaN for tasks without test images."""
    task_of_class = np.asarray(task_of_class)
    num_tasks = int(task_of_class.max()) + 1 if num_tasks is None else num_tasks
    return np.array([_group_accuracy(cm, np.flatnonzero(task_of_class == j)) for j in range(num_tasks)])


def last_accuracy(acc_t: Sequence[float]) -> float:
    """A_T: accuracy on all classes after the last task."""
    return float(acc_t[-1])


def average_accuracy(acc_t: Sequence[float]) -> float:
    """Mean of A_t over the tasks (average incremental accuracy, Rebuffi et al. 2017)."""
    return float(np.mean(acc_t))


def weighted_average_accuracy(acc_t: Sequence[float], classes_per_task: Sequence[int]) -> float:
    """DIME's weighted mean: sum_t w_t A_t / sum_t w_t with w_t = (classes seen at t) / (C t / T).

    A step that has seen more classes than a balanced stream would have by then counts more, so
    a large first task does not dominate as it does in the plain mean. C and T cover the tasks
    given (the reference's ``weighted_avg_normalized``).
    """
    if len(acc_t) != len(classes_per_task):
        raise ValueError(f"{len(acc_t)} accuracies for {len(classes_per_task)} tasks")
    big_t, total = len(acc_t), float(sum(classes_per_task))
    t = np.arange(1, big_t + 1)
    w = np.cumsum(classes_per_task) / (total * t / big_t)
    return float((w * np.asarray(acc_t)).sum() / w.sum())


def forgetting(acc: np.ndarray, include_last: bool = False) -> float:
    """Average forgetting (Chaudhry et al., ECCV 2018) of the tasks before the last.

    f_j = max_{j <= l <= T-2} acc[l, j] - acc[T-1, j]; can be negative (backward transfer).
    ``include_last=True`` reproduces the reference, whose maximum also runs over the last row (so
    f_j >= 0).
    """
    acc = np.asarray(acc, dtype=float)
    big_t = acc.shape[0]
    if acc.shape != (big_t, big_t):
        raise ValueError(f"accuracy matrix must be (T, T), got {acc.shape}")
    if big_t < 2:
        return float("nan")
    stop = big_t if include_last else big_t - 1
    f = [np.nanmax(acc[j:stop, j]) - acc[-1, j] for j in range(big_t - 1)]
    return float(np.mean(f))


def shot_groups(train_counts: Sequence[int] | np.ndarray, many: int = MANY_SHOT, few: int = FEW_SHOT) -> dict[str, np.ndarray]:
    """Class ids of the head (> ``many`` training images), medium and tail (< ``few``) groups."""
    counts = np.asarray(train_counts)
    return {"head": np.flatnonzero(counts > many), "medium": np.flatnonzero((counts >= few) & (counts <= many)),
            "tail": np.flatnonzero(counts < few)}


def shot_accuracy(cm: Tensor, train_counts: Sequence[int] | np.ndarray, many: int = MANY_SHOT,
                  few: int = FEW_SHOT) -> dict[str, float]:
    """Mean per-class accuracy of the head / medium / tail classes (classes with test images; NaN if a group is empty)."""
    support = cm.sum(1)
    per_class = cm.diagonal().double() / support.clamp_min(1)
    out = {}
    for name, ids in shot_groups(train_counts, many, few).items():
        ids = torch.as_tensor(ids, dtype=torch.long)
        ids = ids[support[ids] > 0]
        out[name] = float(per_class[ids].mean()) if len(ids) else float("nan")
    return out


def summarize(acc_t: Sequence[float], acc: np.ndarray, classes_per_task: Sequence[int]) -> dict[str, float]:
    """A_T, the mean and weighted mean of A_t, and forgetting, as one dict (fractions)."""
    return {
        "A_T": last_accuracy(acc_t),
        "A_mean": average_accuracy(acc_t),
        "A_weighted": weighted_average_accuracy(acc_t, classes_per_task),
        "forgetting": forgetting(acc),
    }


# --------------------------------------------------------------------------------------------------
# What ``test`` reports and draws: accuracy after every task, the accuracy matrix, forgetting,
# head / medium / tail accuracy and the confusion between tasks.
#
# The model hands in one confusion matrix per learned task t (the stage after task t on the test
# images of the classes seen by then, rebuilt from the checkpoint chain), so the last stage's test
# alone gives the whole curve A_1..A_T. Written into the run folder:
#
# * ``evaluation.json``: every number below, NaN as null;
# * ``accuracy_per_task.png``: A_t after each task (with the classes seen) and the accuracy matrix
#   acc[t, j] (task j's classes after task t), where forgetting shows as fading columns;
# * ``confusion_tasks.png``: after the last task, which task's classes the test images of each task
#   are predicted as (row-normalised): the pull of large tasks on small ones.


def task_confusion(cm: Tensor | np.ndarray, task_of_class: Sequence[int] | np.ndarray, num_tasks: int) -> np.ndarray:
    """(T, T) image counts: rows = the true class's task, columns = the predicted class's task."""
    cm = np.asarray(cm, dtype=np.int64)
    onehot = np.eye(num_tasks, dtype=np.int64)[np.asarray(task_of_class)]  # (C, T)
    return onehot.T @ cm @ onehot


def evaluation_report(confusions: list[Tensor], row_tasks: list[int], classes_per_task: Sequence[int],
                      task_of_class: Sequence[int] | np.ndarray, train_counts: Sequence[int] | np.ndarray) -> dict[str, Any]:
    """Numbers of one test: ``confusions[r]`` is the stage after task ``row_tasks[r]`` on the classes seen then.

    ``classes_per_task`` is the stream the model learned (``[C]`` for joint training);
    ``task_of_class`` the protocol's task of each class, which the per-task columns follow.
    """
    offsets = np.concatenate([[0], np.cumsum(classes_per_task)])
    num_tasks = int(np.max(task_of_class)) + 1
    seen = [int(offsets[t + 1]) for t in row_tasks]
    acc_t = [seen_accuracy(cm, s) for cm, s in zip(confusions, seen)]
    matrix = np.stack([task_accuracies(cm, task_of_class, num_tasks) for cm in confusions])
    k = len(row_tasks)
    square = k > 1 and row_tasks == list(range(k)) and len(classes_per_task) == num_tasks
    last = confusions[-1]
    shots = shot_accuracy(last, train_counts)
    per_class = (last.diagonal().double() / last.sum(1).clamp_min(1)).numpy()
    scalars = {"acc": acc_t[-1], "acc_mean": float(np.mean(acc_t)),
               "acc_weighted": weighted_average_accuracy(acc_t, list(classes_per_task)[:k]) if len(classes_per_task) >= k else acc_t[-1],
               "forgetting": forgetting(matrix[:, :k]) if square else float("nan"),
               **{f"acc_{g}": v for g, v in shots.items()},
               **{f"acc_task{j}": float(matrix[-1, j]) for j in range(num_tasks) if not math.isnan(matrix[-1, j])}}
    return {"scalars": scalars, "row_tasks": list(row_tasks), "seen": seen, "acc_t": acc_t, "acc_matrix": matrix.tolist(),
            "classes_per_task": list(map(int, classes_per_task)), "task_of_class": list(map(int, task_of_class)),
            "train_counts": list(map(int, train_counts)), "per_class_acc": per_class.tolist(), "confusion": last.tolist(),
            "task_confusion": task_confusion(last, task_of_class, num_tasks).tolist()}


def _plain(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_evaluation(report: dict[str, Any], root: str | Path, class_names: Sequence[str] | None = None) -> Path:
    """``evaluation.json``, ``accuracy_per_task.png`` and ``confusion_tasks.png`` in ``root``; returns the JSON's path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out = dict(report, class_names=list(class_names) if class_names is not None else None)
    path = root / "evaluation.json"
    path.write_text(json.dumps(_plain(out), indent=1))
    plot_accuracy(report, root / "accuracy_per_task.png")
    plot_task_confusion(report, root / "confusion_tasks.png")
    return path


def plot_accuracy(report: dict[str, Any], path: Path, label: str = "DIME") -> None:
    """A_t after each task, and the accuracy matrix."""
    plt = pyplot()

    tasks, acc = report["row_tasks"], np.array(report["acc_t"]) * 100
    matrix = np.array(report["acc_matrix"], dtype=float) * 100
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1.1, 1]})
    ax.plot(range(len(tasks)), acc, marker="o", label=label)
    ax.set_xticks(range(len(tasks)), [f"{t}\n({s} cls)" for t, s in zip(tasks, report["seen"])])
    ax.set_xlabel("after task (classes seen)")
    ax.set_ylabel("top-1 accuracy on seen classes (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"A_t (A_T {acc[-1]:.1f} %, mean {acc.mean():.1f} %)")
    ax.grid(alpha=0.3)
    im = bx.imshow(np.ma.masked_invalid(matrix), vmin=0, vmax=100, cmap="viridis", aspect="auto")
    for (r, c), v in np.ndenumerate(matrix):
        if not np.isnan(v):
            bx.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=8, color="white" if v < 60 else "black")
    sizes = np.bincount(report["task_of_class"])
    bx.set_xticks(range(matrix.shape[1]), [f"{j}\n({n})" for j, n in enumerate(sizes)])
    bx.set_yticks(range(len(tasks)), [str(t) for t in tasks])
    bx.set_xlabel("accuracy on task j's classes (classes)")
    bx.set_ylabel("after task t")
    bx.set_title("accuracy matrix acc[t, j] (%)")
    fig.colorbar(im, ax=bx, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_task_confusion(report: dict[str, Any], path: Path) -> None:
    """Row-normalised confusion between tasks after the last task."""
    plt = pyplot()

    counts = np.array(report["task_confusion"], dtype=float)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1) * 100
    sizes = np.bincount(report["task_of_class"])
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    im = ax.imshow(share, vmin=0, vmax=100, cmap="Blues")
    for (r, c), v in np.ndenumerate(share):
        if counts[r].sum() > 0:
            ax.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=8, color="white" if v > 60 else "black")
    labels = [f"{j} ({n})" for j, n in enumerate(sizes)]
    ax.set_xticks(range(len(sizes)), labels)
    ax.set_yticks(range(len(sizes)), labels)
    ax.set_xlabel("predicted class's task (classes)")
    ax.set_ylabel("true class's task")
    ax.set_title("test images by task after the last task (%)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# ``predict`` output: one CSV row per image with the task each class came from, and a PNG of samples.


COLUMNS = ["id", "label", "label_name", "label_task", "pred", "pred_name", "pred_task", "confidence", "correct"]


class FoodPredictionWriter(BasePredictionWriter):
    """Write ``<default_root_dir>/predictions/predictions.csv`` and ``predictions.png``.

    A row holds the image (its path under the data root), the true and the predicted class (id,
    name, and the task of the protocol that class belongs to), the predicted probability and
    whether it is right; the PNG shows ``n_plot`` images spread over the set with their predictions.
    """

    def __init__(self, n_plot: int = 24) -> None:
        super().__init__(write_interval="epoch")
        self.n_plot = n_plot

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Sequence[Any],
                           batch_indices: Any) -> None:
        if not trainer.is_global_zero or not predictions:
            return
        outs = predictions[0] if isinstance(predictions[0], list) else predictions
        cols = {k: torch.cat([o[k] for o in outs]).cpu().numpy() for k in ("index", "label", "pred", "confidence")}
        dm = trainer.datamodule
        split = dm.splits["predict" if "predict" in dm.splits else "test"]
        names, task_of = list(dm.class_names), np.asarray(dm.task_of_class)
        out = Path(trainer.default_root_dir) / "predictions"
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "predictions.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(COLUMNS)
            for i, y, p, c in zip(cols["index"], cols["label"], cols["pred"], cols["confidence"]):
                w.writerow([split.ids[i], int(y), names[y], int(task_of[y]), int(p), names[p], int(task_of[p]), f"{float(c):.4f}", int(y == p)])
        show = np.unique(np.linspace(0, len(cols["index"]) - 1, min(self.n_plot, len(cols["index"]))).astype(int))
        plot_samples([split.images.path(int(cols["index"][i])) for i in show], cols["label"][show], cols["pred"][show],
                     names, task_of, out / "predictions.png")


def plot_samples(paths: Sequence[Path], labels: np.ndarray, preds: np.ndarray, names: Sequence[str],
                 task_of: np.ndarray, path: Path) -> None:
    """A grid of images titled with the predicted class and its task (red: wrong, with the truth)."""
    plt = pyplot()
    from PIL import Image

    cols = min(6, len(paths))
    rows = -(-len(paths) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, p, y, y_hat in zip(axes.flat, paths, labels, preds):
        with Image.open(p) as im:
            ax.imshow(np.asarray(im.convert("RGB")))
        title = f"{names[y_hat][:18]}\n(task {task_of[y_hat]})"
        if y != y_hat:
            title += f"\ntrue {names[y][:14]} (t{task_of[y]})"
        ax.set_title(title, fontsize=7, color="black" if y == y_hat else "red")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
