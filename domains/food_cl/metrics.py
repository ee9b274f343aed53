"""Class-incremental metrics: A_T, mean and weighted mean accuracy over tasks, forgetting, head/medium/tail.

Conventions: accuracies are fractions in [0, 1]. ``acc_t[t]`` is the top-1 accuracy on the test
images of every class seen after task t (the reference's ``top1`` curve). The accuracy matrix
``acc[t, j]`` is the accuracy on task j's classes after task t (NaN for j > t). Counting is done
by torchmetrics' confusion matrix, which the plots reuse.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torchmetrics.functional.classification import multiclass_confusion_matrix

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
