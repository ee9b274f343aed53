"""``predict`` output: every answer with its patient's group fields (JSONL, so anyone can re-audit the
numbers), and a fairness report (markdown + a per-group bar plot with bootstrap CIs).

    <default_root_dir>/predictions/answers.jsonl   one record per question (RadiologyVLM._records)
    <default_root_dir>/predictions/fairness.md     metrics.summary_markdown, overall and on the bias finding
    <default_root_dir>/predictions/fairness.png    closed accuracy per group with 95 % CIs
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter

from suite.strategies import every_rank

from .metrics import fairness_summary, summary_markdown


def read_answers(path: str | Path) -> list[dict[str, Any]]:
    """The records of an ``answers.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_report(records: Sequence[Mapping[str, Any]], attributes: Sequence[str], out_dir: str | Path,
                 focus: str | None = None, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Write answers.jsonl, fairness.md and fairness.png; return ``{"all": summary[, focus: summary]}``.

    ``focus``: a question topic (e.g. the planted bias finding) summarised on its own as well.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = sorted(records, key=lambda r: str(r["id"]))
    with open(out / "answers.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    summaries = {"all": fairness_summary(records, attributes, n_boot=n_boot, seed=seed)}
    subset = [r for r in records if r.get("topic") == focus] if focus else []
    if any(r["question_type"] == "closed" for r in subset):
        summaries[focus] = fairness_summary(subset, attributes, n_boot=n_boot, seed=seed)
    lines = ["# Fairness report", "", f"{len(records)} answers (`answers.jsonl`); closed accuracy, open token F1, "
             "per-group values with patient-level bootstrap 95 % CIs.", "", "## All questions", "",
             summary_markdown(summaries["all"], attributes)]
    if focus in summaries:
        lines += [f"## Questions about {focus} (the finding the training split confounds with a group)", "",
                  summary_markdown(summaries[focus], attributes)]
    (out / "fairness.md").write_text("\n".join(lines))
    plot_groups(summaries, attributes, out / "fairness.png")
    return summaries


def plot_groups(summaries: Mapping[str, Mapping[str, Any]], attributes: Sequence[str], path: str | Path) -> None:
    """One row per summary (all questions, the focus topic), one panel per attribute: closed accuracy
    per group with its 95 % CI, the overall accuracy as a dashed line, the max gap in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attrs = [a for a in attributes if any(a in s for s in summaries.values())]
    rows = list(summaries)
    fig, axes = plt.subplots(len(rows), len(attrs), figsize=(3.4 * len(attrs), 2.8 * len(rows)), squeeze=False)
    for i, name in enumerate(rows):
        s = summaries[name]
        for j, a in enumerate(attrs):
            ax = axes[i, j]
            if a not in s:
                ax.set_axis_off()
                continue
            groups = list(s[a]["closed_acc"])
            acc = np.array([s[a]["closed_acc"][g] for g in groups])
            ci = np.array([s[a]["closed_acc_ci"][g] for g in groups], dtype=float)
            err = np.abs(np.stack([acc - ci[:, 0], ci[:, 1] - acc]))
            ax.bar(groups, acc, yerr=np.nan_to_num(err), capsize=4, color=plt.get_cmap("tab10")(j), alpha=0.8)
            ax.axhline(s["closed_acc"], color="k", ls="--", lw=1)
            ax.set_ylim(0, 1)
            ax.set_title(f"{'all questions' if name == 'all' else name}: {a}\nmax gap {s[a]['gap']:.2f}", fontsize=9)
            if j == 0:
                ax.set_ylabel("closed accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


class AnswerWriter(BasePredictionWriter):
    """Writes the predict outputs (module docstring) from every rank's answer records."""

    def __init__(self, n_boot: int = 1000) -> None:
        super().__init__(write_interval="epoch")
        self.n_boot = n_boot

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Sequence[Any],
                           batch_indices: Any) -> None:
        batches = predictions[0] if predictions and isinstance(predictions[0], list) and predictions[0] \
            and isinstance(predictions[0][0], list) else predictions
        records = [r for batch in batches for r in batch]
        records = [r for part in every_rank(records) for r in part]
        if not trainer.is_global_zero or not records:
            return
        dm = trainer.datamodule
        synth = getattr(dm, "synth", None)
        focus = synth.bias_finding if synth is not None and getattr(dm, "source", "") == "generated" else None
        attributes = list(getattr(pl_module, "attribute_classes", None) or records[0]["groups"])
        write_report(records, attributes, Path(trainer.default_root_dir) / "predictions", focus, self.n_boot)
