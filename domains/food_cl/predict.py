"""``predict`` output: one CSV row per image with the task each class came from, and a PNG of samples."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
