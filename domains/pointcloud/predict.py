"""``predict`` output: one CSV row per cloud and a PNG of sample clouds coloured by prediction."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
