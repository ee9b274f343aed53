"""Fairness metrics against values worked out by hand on tiny inputs."""

from __future__ import annotations

import numpy as np
import pytest

from domains.radiology_vqa.metrics import (
    bootstrap_ci,
    closed_correct,
    demographic_parity_difference,
    demographic_parity_ratio,
    equalized_odds_difference,
    equity_scaled,
    fairness_summary,
    group_rates,
    max_gap,
    normalize_answer,
    per_group,
    per_group_ece,
    summary_markdown,
    token_f1,
    worst_group,
)


def test_answer_normalisation_and_token_f1():
    assert normalize_answer("The  Right, pleural effusion!") == "right pleural effusion"
    # pred tokens {right, effusion}, ref {right, pleural, effusion}: P = 1, R = 2/3, F1 = 0.8
    assert token_f1("right effusion", "Right pleural effusion.") == pytest.approx(0.8)
    assert token_f1("left", "right") == 0.0 and token_f1("", "") == 1.0 and token_f1("a", "left") == 0.0
    assert closed_correct("Yes, the heart is enlarged.", "yes") and not closed_correct("no", "yes")
    assert not closed_correct("maybe yes", "yes")  # the first word decides
    assert closed_correct("PA", "pa") and not closed_correct("AP view", "ap")


def test_group_accuracy_gap_and_equity_scaling_by_hand():
    correct = [1, 1, 0, 1, 0, 0, 1, 1]
    groups = ["a", "a", "a", "b", "b", "", "c", "c"]
    per = per_group(correct, groups)
    assert per == pytest.approx({"a": 2 / 3, "b": 0.5, "c": 1.0})  # the unknown item counts in no group
    assert worst_group(per) == 0.5 and max_gap(per) == pytest.approx(0.5)
    overall = np.mean(correct)  # 5 / 8
    # 0.625 / (1 + |0.625 - 2/3| + |0.625 - 0.5| + |0.625 - 1|) = 0.625 / 1.541666...
    assert equity_scaled(overall, per) == pytest.approx(0.625 / (1 + 1 / 24 + 0.125 + 0.375))


def test_parity_and_equalised_odds_by_hand():
    pred = [1, 1, 0, 0, 1, 0, 1, 1, 0, 0]
    true = [1, 0, 1, 0, 1, 1, 0, 0, 1, 0]
    groups = ["m"] * 4 + ["f"] * 6
    # m: pred rate 2/4, TPR 1/2 (tp 1 of 2), FPR 1/2; f: pred rate 3/6, TPR 1/3, FPR 2/3
    rates = group_rates(pred, true, groups)
    assert rates["m"] == pytest.approx({"positive_rate": 0.5, "tpr": 0.5, "fpr": 0.5})
    assert rates["f"] == pytest.approx({"positive_rate": 0.5, "tpr": 1 / 3, "fpr": 2 / 3})
    assert demographic_parity_difference(pred, groups) == pytest.approx(0.0)
    assert equalized_odds_difference(pred, true, groups) == pytest.approx(1 / 6)  # max(1/2 - 1/3, 2/3 - 1/2)
    assert demographic_parity_ratio(pred, groups) == pytest.approx(1.0)
    pred2 = [1, 1, 1, 0] + [1, 0, 0, 0, 0, 0]  # m: 3/4, f: 1/6
    assert demographic_parity_difference(pred2, groups) == pytest.approx(3 / 4 - 1 / 6)
    assert demographic_parity_ratio(pred2, groups) == pytest.approx((1 / 6) / (3 / 4), abs=1e-6)


def test_group_without_positives_is_left_out_of_the_tpr_range():
    pred, true, groups = [1, 0, 1, 0, 0], [1, 1, 0, 0, 0], ["a", "a", "b", "b", "b"]
    rates = group_rates(pred, true, groups)
    assert np.isnan(rates["b"]["tpr"])  # torchmetrics' rate table would give 0 and an EO gap of 0.5
    # TPR range: only a (nan spread); FPR: a has no negatives -> nan, so the FPR range is nan too
    assert np.isnan(equalized_odds_difference(pred, true, groups))
    pred, true, groups = [1, 0, 1, 1, 0], [1, 0, 0, 0, 0], ["a", "a", "b", "b", "b"]
    assert equalized_odds_difference(pred, true, groups) == pytest.approx(2 / 3)  # FPR: a 0, b 2/3


def test_bootstrap_is_seeded_and_covers_the_mean():
    values = np.random.default_rng(0).normal(size=200)
    ci = bootstrap_ci(lambda ix: values[ix].mean(), len(values), n_boot=1000, seed=3)
    assert ci == bootstrap_ci(lambda ix: values[ix].mean(), len(values), n_boot=1000, seed=3)
    assert ci != bootstrap_ci(lambda ix: values[ix].mean(), len(values), n_boot=1000, seed=4)
    assert ci[0] < values.mean() < ci[1]
    # normal approximation: the 95 % interval of a mean of 200 is ~ +-1.96 sd / sqrt(200)
    assert ci[1] - ci[0] == pytest.approx(2 * 1.96 * values.std() / np.sqrt(200), rel=0.15)
    # items of one patient move together: with three patients (all right, all wrong, all right)
    # a resample's accuracy is k/3 of whole patients, never a mix of one patient's items
    correct = np.array([1.0] * 4 + [0.0] * 4 + [1.0] * 4)
    seen = set()
    bootstrap_ci(lambda ix: seen.add(round(correct[ix].mean(), 6)) or 0.0, 12, clusters=list("pppp" "qqqq" "rrrr"), n_boot=200)
    assert seen == {0.0, round(1 / 3, 6), round(2 / 3, 6), 1.0}


def test_per_group_ece_by_hand():
    # binary ECE bins P(yes) against the frequency of yes (torchmetrics' binary convention)
    # group a: one bin [0.9, 1.0) holding 0.9, 0.9 with one yes -> |0.9 - 0.5| = 0.4
    # group b: 0.2 and 0.3 in two bins, both no -> (|0.2 - 0| + |0.3 - 0|) / 2 = 0.25
    ece = per_group_ece([0.9, 0.9, 0.2, 0.3], [1, 0, 0, 0], ["a", "a", "b", "b"], n_bins=10)
    assert ece["a"] == pytest.approx(0.4, abs=1e-6)
    assert ece["b"] == pytest.approx(0.25, abs=1e-6)


def test_fairness_summary_and_markdown():
    rows = [("closed", "yes", "yes", "female", "1", 0.8), ("closed", "no", "yes", "female", "1", 0.3),
            ("closed", "no", "no", "male", "2", 0.1), ("closed", "yes", "yes", "male", "3", 0.9)]
    records = [{"question_type": t, "prediction": p, "answer": a, "groups": {"sex": s}, "patient_id": pid, "p_yes": py}
               for t, p, a, s, pid, py in rows]
    records.append({"question_type": "open", "prediction": "left effusion", "answer": "left", "groups": {"sex": "male"},
                    "patient_id": "2"})
    s = fairness_summary(records, ["sex", "age"], n_boot=50, seed=0)
    assert s["closed_acc"] == pytest.approx(0.75) and s["open_f1"] == pytest.approx(2 / 3)
    assert s["sex"]["closed_acc"] == pytest.approx({"female": 0.5, "male": 1.0})
    assert s["sex"]["gap"] == pytest.approx(0.5) and s["sex"]["worst"] == pytest.approx(0.5)
    assert s["sex"]["equity_scaled_acc"] == pytest.approx(0.75 / 1.5)
    assert s["sex"]["dp_diff"] == pytest.approx(0.0)  # 1 yes of 2 in each group
    assert s["sex"]["eo_diff"] == pytest.approx(0.5)  # TPR female 1/2, male 1; no female negatives
    assert s["sex"]["open_f1"] == pytest.approx({"male": 2 / 3})
    assert set(s["sex"]["ece"]) == {"female", "male"} and "age" not in s
    md = summary_markdown(s, ["sex"])
    assert "| female | 0.500 |" in md and "max gap 0.500" in md
