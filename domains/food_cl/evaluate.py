"""What ``test`` reports and draws: accuracy after every task, the accuracy matrix, forgetting,
head / medium / tail accuracy and the confusion between tasks.

The model hands in one confusion matrix per learned task t (the stage after task t on the test
images of the classes seen by then, rebuilt from the checkpoint chain), so the last stage's test
alone gives the whole curve A_1..A_T. Written into the run folder:

* ``evaluation.json``: every number below, NaN as null;
* ``accuracy_per_task.png``: A_t after each task (with the classes seen) and the accuracy matrix
  acc[t, j] (task j's classes after task t), where forgetting shows as fading columns;
* ``confusion_tasks.png``: after the last task, which task's classes the test images of each task
  are predicted as (row-normalised): the pull of large tasks on small ones.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch import Tensor

from .metrics import forgetting, seen_accuracy, shot_accuracy, task_accuracies, weighted_average_accuracy


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
