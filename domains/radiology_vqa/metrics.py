"""Fairness metrics of VQA answers (and ``predict``'s answer file and report, below): per-group closed
accuracy and open token F1, worst-group accuracy, max gap, equity-scaled accuracy, demographic-parity and equalised-odds differences,
seeded (patient-cluster) bootstrap CIs and per-group expected calibration error.

Conventions:

* Answers are normalised as in the SQuAD v1.1 evaluation (lower case, punctuation and the
  articles a / an / the removed, whitespace collapsed). Open answers score the SQuAD token F1.
  A closed answer is correct when the first word of the normalised prediction is the yes / no of
  the reference (generated answers often go on: "yes, there is ..."), and otherwise when the two
  normalised strings are equal.
* Per-group values skip items of unknown group (''). Max gap = best - worst group. Equity-scaled
  accuracy (Luo et al. 2024, FairCLIP / Harvard-FairVLMed): acc / (1 + sum_g |acc - acc_g|).
* Demographic-parity difference = max_g - min_g of P(answer yes | g); equalised-odds difference
  = the larger of the between-group ranges of the true- and false-positive rates (fairlearn's
  definitions; fairlearn is not a dependency). Per-group rates come from torchmetrics'
  ``binary_groups_stat_rates``; a group without positives (negatives) has no TPR (FPR) and is
  left out of that range (torchmetrics would count it as 0). torchmetrics' ``binary_fairness``
  supplies the demographic-parity ratio (min / max positive rate).
* Bootstrap: percentile intervals over ``n_boot`` resamples of patients (items of one patient are
  correlated), seeded.
* ECE: torchmetrics' ``binary_calibration_error`` (L1, equal-width bins) of P(yes) per group.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torchmetrics.functional.classification import binary_calibration_error, binary_fairness, binary_groups_stat_rates

from suite.plots import pyplot
from suite.strategies import every_rank


def normalize_answer(s: str) -> str:
    s = "".join(ch for ch in str(s).lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD v1.1 token F1 of two answers (1 when both normalise to nothing)."""
    p, r = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def closed_correct(prediction: str, reference: str) -> bool:
    p, r = normalize_answer(prediction), normalize_answer(reference)
    if r in ("yes", "no"):
        return (p.split() or [""])[0] == r
    return p == r


def says_yes(prediction: str) -> bool:
    return (normalize_answer(prediction).split() or [""])[0] == "yes"


def per_group(values: Sequence[float], groups: Sequence[str]) -> dict[str, float]:
    """Mean of ``values`` per group name (sorted), skipping unknown ('')."""
    v, g = np.asarray(values, dtype=float), np.asarray(groups, dtype=object)
    return {name: float(v[g == name].mean()) for name in sorted(set(g.tolist()) - {""})}


def worst_group(per: Mapping[str, float]) -> float:
    return min(per.values())


def max_gap(per: Mapping[str, float]) -> float:
    return max(per.values()) - min(per.values())


def equity_scaled(overall: float, per: Mapping[str, float]) -> float:
    """acc / (1 + sum_g |acc - acc_g|)."""
    return overall / (1.0 + sum(abs(overall - v) for v in per.values()))


def _group_index(groups: Sequence[str]) -> tuple[np.ndarray, list[str], np.ndarray]:
    g = np.asarray(groups, dtype=object)
    names = sorted(set(g.tolist()) - {""})
    known = g != ""
    return np.array([names.index(x) for x in g[known]], dtype=np.int64), names, known


def group_rates(pred: Sequence[int], target: Sequence[int], groups: Sequence[str]) -> dict[str, dict[str, float]]:
    """Positive rate, TPR and FPR per group (NaN where a group has no positives / negatives)."""
    idx, names, known = _group_index(groups)
    p = torch.as_tensor(np.asarray(pred)[known], dtype=torch.long)
    t = torch.as_tensor(np.asarray(target)[known], dtype=torch.long)
    rates = binary_groups_stat_rates(p, t, torch.as_tensor(idx), num_groups=len(names))
    out = {}
    for k, name in enumerate(names):
        tp, fp, tn, fn = (float(x) for x in rates[f"group_{k}"])
        out[name] = {"positive_rate": tp + fp, "tpr": tp / (tp + fn) if tp + fn > 0 else float("nan"),
                     "fpr": fp / (fp + tn) if fp + tn > 0 else float("nan")}
    return out


def _spread(values: list[float]) -> float:
    v = [x for x in values if not np.isnan(x)]
    return max(v) - min(v) if len(v) > 1 else float("nan")


def demographic_parity_difference(pred: Sequence[int], groups: Sequence[str]) -> float:
    rates = group_rates(pred, pred, groups)
    return _spread([r["positive_rate"] for r in rates.values()])


def equalized_odds_difference(pred: Sequence[int], target: Sequence[int], groups: Sequence[str]) -> float:
    """The larger of the TPR and FPR ranges over groups (NaN when neither range is defined)."""
    rates = group_rates(pred, target, groups).values()
    spreads = [v for v in (_spread([r["tpr"] for r in rates]), _spread([r["fpr"] for r in rates])) if not np.isnan(v)]
    return max(spreads) if spreads else float("nan")


def demographic_parity_ratio(pred: Sequence[int], groups: Sequence[str]) -> float:
    """min / max positive rate over groups (torchmetrics ``binary_fairness``)."""
    idx, names, known = _group_index(groups)
    out = binary_fairness(torch.as_tensor(np.asarray(pred)[known]).long(), None, torch.as_tensor(idx),
                          task="demographic_parity")
    return float(next(iter(out.values())))


def bootstrap_ci(stat: Callable[[np.ndarray], float], n: int, clusters: Sequence[Any] | None = None, n_boot: int = 1000,
                 alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of ``stat(indices)`` over resamples of items, or of whole clusters
    (patients) when ``clusters`` is given; resamples where the statistic is NaN are skipped."""
    rng = np.random.default_rng(seed)
    if clusters is None:
        members = [np.array([i]) for i in range(n)]
    else:
        _, inv = np.unique(np.asarray(clusters, dtype=object).astype(str), return_inverse=True)
        members = [np.flatnonzero(inv == c) for c in range(inv.max() + 1)]
    values = []
    for _ in range(n_boot):
        pick = rng.integers(len(members), size=len(members))
        values.append(stat(np.concatenate([members[c] for c in pick])))
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if not len(values):
        return float("nan"), float("nan")
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def per_group_ece(prob_yes: Sequence[float], target: Sequence[int], groups: Sequence[str], n_bins: int = 10) -> dict[str, float]:
    """L1 expected calibration error of P(yes) per group (torchmetrics)."""
    p, t, g = np.asarray(prob_yes, dtype=float), np.asarray(target), np.asarray(groups, dtype=object)
    return {name: float(binary_calibration_error(torch.as_tensor(p[g == name]), torch.as_tensor(t[g == name]).long(),
                                                 n_bins=n_bins, norm="l1"))
            for name in sorted(set(g.tolist()) - {""})}


def fairness_summary(records: Sequence[Mapping[str, Any]], attributes: Sequence[str], n_boot: int = 1000, seed: int = 0) -> dict:
    """Every metric above from answer records ``{question_type, prediction, answer, groups: {attr:
    name}, patient_id[, p_yes]}`` (``p_yes``: the model's P(yes) for yes/no questions, for ECE)."""
    closed = [r for r in records if r["question_type"] == "closed"]
    opened = [r for r in records if r["question_type"] == "open"]
    acc = np.array([closed_correct(r["prediction"], r["answer"]) for r in closed], dtype=float)
    f1 = np.array([token_f1(r["prediction"], r["answer"]) for r in opened], dtype=float)
    yesno = [i for i, r in enumerate(closed) if normalize_answer(r["answer"]) in ("yes", "no")]
    pred_yes = np.array([says_yes(closed[i]["prediction"]) for i in yesno], dtype=int)
    true_yes = np.array([normalize_answer(closed[i]["answer"]) == "yes" for i in yesno], dtype=int)
    patients = [r["patient_id"] for r in closed]
    out: dict[str, Any] = {"n_closed": len(closed), "n_open": len(opened),
                           "closed_acc": float(acc.mean()) if len(acc) else float("nan"),
                           "open_f1": float(f1.mean()) if len(f1) else float("nan"),
                           "closed_acc_ci": bootstrap_ci(lambda ix: acc[ix].mean(), len(acc), patients, n_boot, seed=seed)
                           if len(acc) else (float("nan"),) * 2}
    for a in attributes:
        g_closed = np.array([r["groups"].get(a, "") for r in closed], dtype=object)
        per = per_group(acc, g_closed)
        if not per:
            continue
        block: dict[str, Any] = {"closed_acc": per, "worst": worst_group(per), "gap": max_gap(per),
                                 "equity_scaled_acc": equity_scaled(out["closed_acc"], per)}
        block["closed_acc_ci"] = {name: bootstrap_ci(lambda ix, g=g_closed, name=name: _mean_in(acc[ix], g[ix], name),
                                                     len(acc), patients, n_boot, seed=seed) for name in per}
        block["gap_ci"] = bootstrap_ci(lambda ix, g=g_closed: _gap_of(acc[ix], g[ix]), len(acc), patients, n_boot, seed=seed)
        if opened:
            block["open_f1"] = per_group(f1, [r["groups"].get(a, "") for r in opened])
        if yesno:
            g_yn = g_closed[yesno]
            block["dp_diff"] = demographic_parity_difference(pred_yes, g_yn)
            block["dp_ratio"] = demographic_parity_ratio(pred_yes, g_yn)
            block["eo_diff"] = equalized_odds_difference(pred_yes, true_yes, g_yn)
            if all("p_yes" in closed[i] for i in yesno):
                block["ece"] = per_group_ece([closed[i]["p_yes"] for i in yesno], true_yes, g_yn)
        out[a] = block
    return out


def _mean_in(values: np.ndarray, groups: np.ndarray, name: str) -> float:
    inside = groups == name
    return float(values[inside].mean()) if inside.any() else float("nan")


def _gap_of(values: np.ndarray, groups: np.ndarray) -> float:
    per = per_group(values, groups)
    return max_gap(per) if len(per) > 1 else float("nan")


def summary_markdown(summary: Mapping[str, Any], attributes: Sequence[str]) -> str:
    """The summary as markdown tables: overall, then per attribute its groups with 95 % CIs."""
    lo, hi = summary["closed_acc_ci"]
    lines = [f"closed accuracy {summary['closed_acc']:.3f} (95 % CI {lo:.3f}-{hi:.3f}, n={summary['n_closed']}); "
             f"open token F1 {summary['open_f1']:.3f} (n={summary['n_open']})", ""]
    for a in attributes:
        if a not in summary:
            continue
        b = summary[a]
        lines += [f"### {a}", "", "| group | closed acc | 95 % CI | open F1 | ECE |", "|---|---|---|---|---|"]
        for name, v in b["closed_acc"].items():
            lo, hi = b["closed_acc_ci"][name]
            f1 = b.get("open_f1", {}).get(name, float("nan"))
            ece = b.get("ece", {}).get(name, float("nan"))
            lines.append(f"| {name} | {v:.3f} | {lo:.3f}-{hi:.3f} | {f1:.3f} | {ece:.3f} |")
        lo, hi = b["gap_ci"]
        lines += ["", f"worst group {b['worst']:.3f}, max gap {b['gap']:.3f} (95 % CI {lo:.3f}-{hi:.3f}), "
                  f"equity-scaled accuracy {b['equity_scaled_acc']:.3f}, DP difference {b.get('dp_diff', float('nan')):.3f}, "
                  f"EO difference {b.get('eo_diff', float('nan')):.3f}", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# ``predict`` output: every answer with its patient's group fields (JSONL, so anyone can re-audit the
# numbers), and a fairness report (markdown + a per-group bar plot with bootstrap CIs).
#
#     <default_root_dir>/predictions/answers.jsonl   one record per question (RadiologyVLM._records)
#     <default_root_dir>/predictions/fairness.md     metrics.summary_markdown, overall and on the bias finding
#     <default_root_dir>/predictions/fairness.png    closed accuracy per group with 95 % CIs


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
    plt = pyplot()

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
