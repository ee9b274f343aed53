"""Nuclei metrics on hand-made maps with answers worked out by hand, and PQ against torchmetrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from domains.nuclei.metrics import NucleiMetrics, aji, class_pq, dice, pair_centroids, panoptic_quality


def _case() -> tuple[np.ndarray, np.ndarray]:
    """Truth: A = rows 0-2 x cols 0-2 (9 px), B = rows 10-12 x cols 10-12 (9 px).
    Prediction: A' = rows 0-2 x cols 0-1 (6 px, inside A), F = rows 10-11 x cols 0-1 (4 px, on background)."""
    true = np.zeros((16, 16), np.int32)
    true[0:3, 0:3] = 1
    true[10:13, 10:13] = 2
    pred = np.zeros((16, 16), np.int32)
    pred[0:3, 0:2] = 7  # ids need not be contiguous
    pred[10:12, 0:2] = 3
    return true, pred


def test_pq_closed_form():
    true, pred = _case()
    pq, dq, sq = panoptic_quality(true, pred)
    # A-A': IoU = 6 / 9 > 0.5 -> one TP; F is a FP; B is a FN.
    # DQ = 1 / (1 + 0.5 + 0.5) = 1/2, SQ = 2/3, PQ = 1/3
    assert dq == pytest.approx(0.5)
    assert sq == pytest.approx(2 / 3)
    assert pq == pytest.approx(1 / 3)


def test_pq_iou_exactly_half_is_not_a_match():
    true = np.zeros((4, 4), np.int32)
    true[0, 0:2] = 1
    pred = np.zeros((4, 4), np.int32)
    pred[0, 0:3] = 1  # IoU = 2 / 3 > 0.5 -> one TP, PQ = SQ = 2/3
    assert panoptic_quality(true, pred)[0] == pytest.approx(2 / 3)
    pred[0, 3] = 1  # IoU = 2 / 4 = 0.5, not > 0.5 -> one FP + one FN, PQ = 0
    assert panoptic_quality(true, pred)[0] == 0.0


def test_aji_closed_form():
    true, pred = _case()
    # A pairs with A' (I = 6, U = 9); B overlaps nothing (U += 9); F is unused (U += 4)
    assert aji(true, pred) == pytest.approx(6 / 22)


def test_aji_prediction_shared_by_two_truths():
    true = np.zeros((4, 8), np.int32)
    true[0:2, 0:4] = 1
    true[2:4, 0:4] = 2
    pred = np.zeros((4, 8), np.int32)
    pred[:, 0:4] = 5  # one prediction over both truths (an under-segmentation)
    # each truth pairs with the same prediction: I = 8 + 8, U = 16 + 16 -> 1/2 (Kumar's AJI)
    assert aji(true, pred) == pytest.approx(0.5)


def test_dice_closed_form_and_empty():
    true, pred = _case()
    # |T| = 18, |P| = 10, |T and P| = 6 -> 2 * 6 / 28
    assert dice(true, pred) == pytest.approx(12 / 28)
    empty = np.zeros((4, 4), np.int32)
    assert np.isnan(dice(empty, empty))


def test_class_pq_skips_classes_absent_from_truth():
    true, pred = _case()
    true_types = np.where(true == 1, 1, np.where(true == 2, 2, 0))  # A neoplastic, B inflammatory
    pred_types = np.where(pred == 7, 1, np.where(pred == 3, 4, 0))  # A' neoplastic, F dead
    pq = class_pq(true, true_types, pred, pred_types, num_classes=5)
    # class 1: A-A' matched alone -> PQ = IoU = 2/3; class 2: B missed -> 0;
    # class 4: only a prediction (F) -> NaN by PanNuke's convention; 3, 5 absent -> NaN
    assert pq[0] == pytest.approx(2 / 3)
    assert pq[1] == 0.0
    assert np.isnan(pq[2]) and np.isnan(pq[3]) and np.isnan(pq[4])


def test_pair_centroids_radius_excluded_before_assignment():
    a = np.array([[0.0, 0.0], [0.0, 10.0]])
    b = np.array([[0.0, 9.0], [0.0, 30.0]])
    # minimum total distance including the far pair would give (a0-b0, a1-b1: 9 + 20);
    # excluding pairs beyond 12 px first keeps the valid a1-b0 (distance 1) instead
    i, j = pair_centroids(a, b, radius=12.0)
    assert list(zip(i.tolist(), j.tolist())) == [(1, 0)]


def test_f1_closed_form():
    true, pred = _case()
    true_types = np.where(true == 1, 1, np.where(true == 2, 2, 0))
    pred_types = np.where(pred == 7, 2, np.where(pred == 3, 2, 0))  # A' called inflammatory (wrong), F inflammatory
    m = NucleiMetrics(num_classes=5)
    m.update(true, true_types, pred, pred_types, tissue=0)
    out = m.compute()
    # centroids: A (1, 1), A' (1, 0.5) -> paired; B (11, 11) and F (10.5, 0.5) are 10.5 px apart -> paired
    # too within 12 px! So detection: TP = 2, FP = FN = 0 -> F1d = 1.
    assert out["F1d"] == pytest.approx(1.0)
    # class 1 (neoplastic): pairs with truth or prediction 1: (A, A') -> truth 1, pred 2: FN_c = 1
    # F1c = 0 / (0 + 2 * 1) = 0.  class 2: pairs (A, A'): FP_c = 1, (B, F): TP = 1 -> 2 / (2 + 2) = 0.5
    assert out["F1c/1"] == 0.0
    assert out["F1c/2"] == pytest.approx(0.5)
    # bPQ: A-A' (IoU 2/3), B-F no overlap -> DQ 1/2, SQ 2/3 -> 1/3; AJI 6/22; Dice 12/28
    assert out["bPQ"] == pytest.approx(1 / 3)
    assert out["AJI"] == pytest.approx(6 / 22)
    assert out["Dice"] == pytest.approx(12 / 28)


def test_mpq_tissue_convention():
    """Two tissues: tissue 0 has images with mPQ 1.0 and 0.0, tissue 1 one image with mPQ 0.5."""

    def square(val_true: int, val_pred: int, hit: bool) -> tuple[np.ndarray, ...]:
        t = np.zeros((8, 8), np.int32)
        t[0:4, 0:4] = 1
        p = np.zeros((8, 8), np.int32)
        if hit:
            p[0:4, 0:4] = 1
        return t, np.where(t > 0, val_true, 0), p, np.where(p > 0, val_pred, 0)

    m = NucleiMetrics(num_classes=2)
    m.update(*square(1, 1, True), tissue=0)  # class 1 PQ 1 -> image mPQ 1
    m.update(*square(1, 1, False), tissue=0)  # missed -> image mPQ 0
    # tissue 1: two nuclei of classes 1 and 2, class 1 perfect, class 2 predicted as class 1
    t = np.zeros((8, 8), np.int32)
    t[0:4, 0:4], t[4:8, 4:8] = 1, 2
    tt = np.where(t == 1, 1, np.where(t == 2, 2, 0))
    pt = np.where(t > 0, 1, 0)
    m.update(t, tt, t.copy(), pt, tissue=1)
    # image 3: class 1 -> truth {1}, pred {1, 2}: TP 1 (IoU 1), FP 1 -> PQ = 1 / 1.5 = 2/3;
    # class 2 -> truth {2}, pred {} -> 0; image mPQ = (2/3 + 0) / 2 = 1/3
    # mPQ = mean over tissues of (mean over images): ((1 + 0) / 2 + 1/3) / 2 = 5/12
    out = m.compute()
    assert out["mPQ"] == pytest.approx(5 / 12)
    # bPQ per image: 1, 0, 1 (class-agnostic perfect) -> tissues 0.5 and 1 -> 0.75
    assert out["bPQ"] == pytest.approx(0.75)
    # PQ per class over all images (not per tissue): class 1 (1 + 0 + 2/3) / 3, class 2: 0
    assert out["PQ/1"] == pytest.approx(5 / 9)
    assert out["PQ/2"] == 0.0


def test_pq_matches_torchmetrics_on_random_maps():
    from torchmetrics.functional.detection import panoptic_quality as tm_pq

    rng = np.random.default_rng(0)
    for trial in range(4):
        maps = []
        for _ in range(2):
            inst = np.zeros((48, 48), np.int64)
            for i in range(1, 9):
                r, c = rng.integers(0, 40, 2)
                h, w = rng.integers(3, 9, 2)
                inst[r : r + h, c : c + w] = i  # later boxes occlude earlier ones, as in real maps
            maps.append(inst)
        true, pred = maps
        pred = np.where(rng.random(pred.shape) < 0.02, 0, pred)  # some ragged pixels
        ours = panoptic_quality(true, pred)[0]
        # reference: nuclei as one "thing" category, background as a "stuff" category so that
        # background is scored like any other pixel (as void it would forgive false positives)
        to_tm = lambda m: torch.from_numpy(np.stack([(m > 0).astype(np.int64), m], -1))[None]  # noqa: E731
        ref = tm_pq(to_tm(pred), to_tm(true), things={1}, stuffs={0}, return_per_class=True)[0, 0]
        assert ours == pytest.approx(float(ref), abs=1e-9), trial
