"""Nuclei segmentation and classification metrics: Dice, AJI, PQ (bPQ / mPQ), detection and type F1.

Conventions (what PanNuke, HoVer-Net and their successors report):

* **PQ** per image (Kirillov et al. 2019): a prediction and a ground-truth nucleus match when
  IoU > 0.5 (unique by construction); PQ = sum of matched IoU / (TP + FP/2 + FN/2).
* **bPQ**: PQ of all nuclei regardless of class, per image. **mPQ**: per image, the PQ of each
  class (nuclei of that class only, in truth and prediction), averaged over the classes present
  in the ground truth. Following PanNuke's evaluation (Gamper et al. 2020, ``compute_stats``):
  a class absent from an image's ground truth is skipped for that image even if predicted
  (NaN, then nanmean); an image without nuclei is skipped for bPQ; image scores are averaged
  per tissue type and the tissue means averaged. ``PQ/<class>`` is the nanmean over all images.
  PanNuke's code needs contiguous instance ids (``remap_label``); the contingency table here
  does not.
* **AJI** (Kumar et al. 2017): each true nucleus is paired with the prediction of highest IoU
  (a prediction may serve several); AJI = sum of their intersections / (sum of their unions +
  area of unused predictions). Per image, then averaged.
* **Dice**: binary nuclear-pixel Dice per image (torchmetrics), then averaged.
* **F1d / F1c** (HoVer-Net, Graham et al. 2019): centroids pair within ``match_radius`` px
  (12 px at 40x) by optimal assignment; F1d = 2TP / (2TP + FP + FN) over the dataset. For class
  t, among pairs where truth or prediction is t: F1c = 2TP_t / (2TP_t + 2FP_t + 2FN_t + FP_d,t +
  FN_d,t), with FP_d,t / FN_d,t the unpaired predictions / truths of class t (HoVer-Net's
  weights 2, 2, 1, 1; its true negatives are filtered out before they are counted, so they are
  omitted). HoVer-Net assigns pairs first and drops those beyond the radius afterwards, which can
  cost valid pairs; here distances beyond the radius are excluded before the assignment.

torchmetrics' ``PanopticQuality`` is the reference the PQ here is tested against; it is not used
directly because its per-segment loops take ~0.7 s per 256-px tile with 50 nuclei (a
contingency table takes milliseconds), and it scores a class missing from both maps as 0
rather than skipping it as PanNuke does.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment
from torchmetrics import Metric
from torchmetrics.functional.segmentation import dice_score
from torchmetrics.utilities import dim_zero_cat


def contingency(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intersections (T, P) between true ids 1..T and predicted ids 1..P, and their areas."""
    t_ids, t = np.unique(true, return_inverse=True)
    p_ids, p = np.unique(pred, return_inverse=True)
    t_bg, p_bg = int(t_ids[0] == 0), int(p_ids[0] == 0)
    table = np.bincount(t.ravel() * len(p_ids) + p.ravel(), minlength=len(t_ids) * len(p_ids))
    table = table.reshape(len(t_ids), len(p_ids))
    areas_t, areas_p = table.sum(1)[t_bg:], table.sum(0)[p_bg:]
    return table[t_bg:, p_bg:], areas_t, areas_p


def iou_matrix(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    inter, at, ap = contingency(true, pred)
    union = at[:, None] + ap[None, :] - inter
    return inter / np.maximum(union, 1), inter, at, ap


def panoptic_quality(true: np.ndarray, pred: np.ndarray) -> tuple[float, float, float]:
    """(PQ, DQ, SQ) of two instance maps; NaN when both are empty."""
    iou, _, at, ap = iou_matrix(true, pred)
    matched = iou > 0.5  # IoU > 0.5 makes the matching unique
    tp = int(matched.sum())
    fp, fn = len(ap) - tp, len(at) - tp
    if tp + fp + fn == 0:
        return float("nan"), float("nan"), float("nan")
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(iou[matched].sum() / tp) if tp else 0.0
    return dq * sq, dq, sq


def instance_classes(inst: np.ndarray, types: np.ndarray) -> dict[int, int]:
    """Class of each nucleus: the majority of its pixels' classes."""
    ids = np.unique(inst[inst > 0])
    if not len(ids):
        return {}
    votes = np.zeros((int(ids.max()) + 1, int(types.max()) + 1), np.int64)
    np.add.at(votes, (inst[inst > 0], types[inst > 0]), 1)
    return {int(i): int(votes[i].argmax()) for i in ids}


def _of_class(inst: np.ndarray, classes: dict[int, int], c: int) -> np.ndarray:
    keep = np.zeros(int(inst.max()) + 1, bool)
    keep[[i for i, k in classes.items() if k == c]] = True
    return np.where(keep[inst], inst, 0)


def class_pq(true: np.ndarray, true_types: np.ndarray, pred: np.ndarray, pred_types: np.ndarray, num_classes: int) -> np.ndarray:
    """PQ per class 1..C for one image; NaN where the class is absent from the ground truth."""
    tc, pc = instance_classes(true, true_types), instance_classes(pred, pred_types)
    out = np.full(num_classes, np.nan)
    for c in range(1, num_classes + 1):
        t = _of_class(true, tc, c)
        if t.any():
            out[c - 1] = panoptic_quality(t, _of_class(pred, pc, c))[0]
    return out


def aji(true: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard Index of one image; NaN when both maps are empty."""
    iou, inter, at, ap = iou_matrix(true, pred)
    if not len(at) and not len(ap):
        return float("nan")
    if not len(ap):
        return 0.0
    best = iou.argmax(1)
    hit = iou[np.arange(len(at)), best] > 0
    i_sum = inter[np.arange(len(at)), best][hit].sum()
    u_sum = (at + ap[best] - inter[np.arange(len(at)), best])[hit].sum() + at[~hit].sum()
    unused = np.ones(len(ap), bool)
    unused[best[hit]] = False
    return float(i_sum / (u_sum + ap[unused].sum()))


def dice(true: np.ndarray, pred: np.ndarray) -> float:
    """Binary nuclear-pixel Dice; NaN when both maps are empty."""
    t, p = true > 0, pred > 0
    if not t.any() and not p.any():
        return float("nan")
    score = dice_score(torch.from_numpy(p[None]).long(), torch.from_numpy(t[None]).long(), num_classes=2,
                       include_background=False, input_format="index")
    return float(score.item())


def centroids(inst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, (n, 2) row/col centroids) of the nuclei in an instance map."""
    ids = np.unique(inst[inst > 0])
    if not len(ids):
        return ids, np.zeros((0, 2))
    return ids, np.array(ndi.center_of_mass(np.ones_like(inst), inst, ids)).reshape(-1, 2)


def pair_centroids(a: np.ndarray, b: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Optimal one-to-one pairing of points within ``radius``; returns index arrays into a and b."""
    if not len(a) or not len(b):
        return np.zeros(0, int), np.zeros(0, int)
    d = np.linalg.norm(a[:, None] - b[None], axis=-1)
    cost = np.where(d <= radius, d, 1e6)  # pairs beyond the radius cannot displace valid ones
    i, j = linear_sum_assignment(cost)
    ok = d[i, j] <= radius
    return i[ok], j[ok]


class NucleiMetrics(Metric):
    """Accumulates per-image PQ/AJI/Dice and dataset-level F1 counts; :meth:`compute` applies the conventions above.

    ``update`` takes numpy instance and type maps of one image plus its tissue index; states are
    concatenated / summed across processes by torchmetrics under DDP.
    """

    full_state_update = False

    def __init__(self, num_classes: int = 5, match_radius: float = 12.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes, self.match_radius = num_classes, match_radius
        # per image: tissue, bPQ, AJI, Dice, PQ of class 1..C
        self.add_state("rows", default=[], dist_reduce_fx="cat")
        # det TP, FP, FN; then per class: TP_t, FP_t, FN_t, FP_d,t, FN_d,t
        self.add_state("counts", default=torch.zeros(3 + 5 * num_classes, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, true: np.ndarray, true_types: np.ndarray, pred: np.ndarray, pred_types: np.ndarray, tissue: int) -> None:
        true, pred = np.asarray(true), np.asarray(pred)
        bpq = panoptic_quality(true, pred)[0] if true.any() else float("nan")  # PanNuke: skip empty truth
        row = [float(tissue), bpq, aji(true, pred), dice(true, pred)]
        row += class_pq(true, true_types, pred, pred_types, self.num_classes).tolist()
        self.rows.append(torch.tensor([row], dtype=torch.float64))
        self.counts += torch.from_numpy(self._f1_counts(true, true_types, pred, pred_types))

    def _f1_counts(self, true, true_types, pred, pred_types) -> np.ndarray:
        t_ids, t_xy = centroids(true)
        p_ids, p_xy = centroids(pred)
        i, j = pair_centroids(t_xy, p_xy, self.match_radius)
        tc, pc = instance_classes(true, true_types), instance_classes(pred, pred_types)
        t_cls = np.array([tc[k] for k in t_ids], int)
        p_cls = np.array([pc[k] for k in p_ids], int)
        unpaired_t = np.setdiff1d(np.arange(len(t_ids)), i)
        unpaired_p = np.setdiff1d(np.arange(len(p_ids)), j)
        out = np.zeros(3 + 5 * self.num_classes)
        out[:3] = len(i), len(unpaired_p), len(unpaired_t)
        pt, pp = t_cls[i], p_cls[j]
        for c in range(1, self.num_classes + 1):
            out[3 + 5 * (c - 1) : 3 + 5 * c] = (
                ((pt == c) & (pp == c)).sum(),
                ((pt != c) & (pp == c)).sum(),
                ((pt == c) & (pp != c)).sum(),
                (p_cls[unpaired_p] == c).sum(),
                (t_cls[unpaired_t] == c).sum(),
            )
        return out

    def compute(self) -> dict[str, float]:
        empty = isinstance(self.rows, list) and not self.rows
        rows = np.zeros((0, 4 + self.num_classes)) if empty else dim_zero_cat(self.rows).numpy()
        tissue, bpq, aji_, dice_, pq = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3], rows[:, 4:]
        with warnings.catch_warnings():  # nanmean of all-NaN slices is NaN, the documented answer
            warnings.simplefilter("ignore", RuntimeWarning)
            img_mpq = np.nanmean(pq, axis=1) if len(pq) else np.zeros(0)
            per_tissue = lambda v: np.nanmean([np.nanmean(v[tissue == t]) for t in np.unique(tissue)])  # noqa: E731
            out = {"bPQ": per_tissue(bpq), "mPQ": per_tissue(img_mpq), "AJI": np.nanmean(aji_), "Dice": np.nanmean(dice_)}
            for c in range(self.num_classes):
                out[f"PQ/{c + 1}"] = np.nanmean(pq[:, c])
        n = self.counts.numpy()
        out["F1d"] = 2 * n[0] / max(2 * n[0] + n[1] + n[2], 1)
        for c in range(self.num_classes):
            tp, fp, fn, fpd, fnd = n[3 + 5 * c : 8 + 5 * c]
            out[f"F1c/{c + 1}"] = 2 * tp / max(2 * tp + 2 * fp + 2 * fn + fpd + fnd, 1)
        return {k: float(v) for k, v in out.items()}

