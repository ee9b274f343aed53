"""Continual-learning metrics on hand-made predictions and accuracy matrices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from domains.food_cl.metrics import (
    average_accuracy,
    confusion,
    forgetting,
    last_accuracy,
    seen_accuracy,
    shot_accuracy,
    summarize,
    task_accuracies,
    weighted_average_accuracy,
)

NAN = float("nan")


@pytest.fixture
def cm():
    # 6 classes, 2 test images each; correct: class 0 2/2, 1 1/2, 2 2/2, 3 1/2, 4 2/2, 5 1/2
    targets = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    preds = torch.tensor([0, 0, 1, 0, 2, 2, 3, 4, 4, 4, 0, 5])
    return confusion(preds, targets, 6)


def test_task_and_seen_accuracy(cm):
    assert cm.sum() == 12 and cm[5, 0] == 1
    np.testing.assert_allclose(task_accuracies(cm, [0, 0, 0, 1, 1, 2]), [5 / 6, 3 / 4, 1 / 2])
    assert np.isnan(task_accuracies(cm, [0, 0, 0, 1, 1, 1], num_tasks=3)[2])  # a task without test images
    assert seen_accuracy(cm, 6) == pytest.approx(9 / 12) and seen_accuracy(cm, 3) == pytest.approx(5 / 6)


def test_head_medium_tail(cm):
    # thresholds: head > 100 training images, tail < 20, medium 20..100 (both ends included)
    groups = shot_accuracy(cm, [150, 100, 20, 19, 101, 5])
    assert groups == pytest.approx({"head": (1 + 1) / 2, "medium": (0.5 + 1) / 2, "tail": (0.5 + 0.5) / 2})
    assert np.isnan(shot_accuracy(cm, [50] * 6)["head"])


def test_curve_metrics_by_hand():
    acc_t, classes = [0.9, 0.7, 0.6], [6, 3, 1]
    assert last_accuracy(acc_t) == 0.6 and average_accuracy(acc_t) == pytest.approx(2.2 / 3)
    # w_t = cumulative classes / (C t / T), C = 10, T = 3: 6/(10/3) = 1.8, 9/(20/3) = 1.35, 10/10 = 1
    assert weighted_average_accuracy(acc_t, classes) == pytest.approx((1.8 * 0.9 + 1.35 * 0.7 + 0.6) / 4.15)
    # balanced tasks: every w_t = 1 and the weighted mean is the plain mean
    assert weighted_average_accuracy(acc_t, [2, 2, 2]) == pytest.approx(average_accuracy(acc_t))
    with pytest.raises(ValueError, match="3 accuracies for 2 tasks"):
        weighted_average_accuracy(acc_t, [1, 2])


def test_forgetting_by_hand():
    acc = np.array([[0.9, NAN, NAN], [0.7, 0.8, NAN], [0.6, 0.85, 0.5]])
    # task 0: best before the end 0.9, final 0.6 -> 0.3; task 1: 0.8 -> 0.85 is backward transfer -0.05
    assert forgetting(acc) == pytest.approx((0.3 - 0.05) / 2)
    # the reference's maximum also covers the last row, so task 1 counts as 0
    assert forgetting(acc, include_last=True) == pytest.approx(0.3 / 2)
    assert np.isnan(forgetting(np.array([[0.5]])))
    summary = summarize([0.9, 0.75, 0.62], acc, [4, 4, 4])
    assert summary == pytest.approx({"A_T": 0.62, "A_mean": 2.27 / 3, "A_weighted": 2.27 / 3, "forgetting": 0.125})
