"""Dialogue metrics on hand-made turns with known answers; chrF / BLEU against sacrebleu itself;
perplexity against torchmetrics."""

from __future__ import annotations

import math

import pytest
import sacrebleu
import torch
import torch.nn.functional as F
from torchmetrics.text import Perplexity

from domains.dialogue.metrics import (
    PerplexityAccumulator,
    advice_accuracy,
    diagnosis_accuracy,
    is_urgent,
    parse_diagnosis,
    perplexity,
    safety,
    summarise,
    symptom_recall,
    text_scores,
)


@pytest.mark.parametrize(
    "text, lang, expected",
    [
        ("Your symptoms suggest asthma.", "en", "asthma"),
        ("It is not pneumonia. From what you describe, this is most likely ASTHMA.", "en", "asthma"),  # after the cue
        ("Pneumonia, I think.", "en", "pneumonia"),  # no cue: the first disease named
        ("Please drink water.", "en", None),
        ("In that case, you have Esophagitis.", "en", "oesophagitis"),  # MDDial's spelling and phrasing
        ("आपके लक्षण दमा की ओर इशारा करते हैं।", "hi", "asthma"),
        ("உங்கள் அறிகுறிகள் இது நிமோனியா என்பதைக் குறிக்கின்றன.", "ta", "pneumonia"),
        ("మీ లక్షణాలు ఇది కండ్లకలక అని సూచిస్తున్నాయి.", "te", "conjunctivitis"),
        ("আপনার উপসর্গগুলো নিউমোনিয়া নির্দেশ করে।", "bn", "pneumonia"),
        ("तुमच्या लक्षणांनुसार निदान बहुधा स्तनदाह आहे.", "mr", "mastitis"),
        ("ليس التهاب المريء؛ التشخيص الأرجح هو الربو.", "ar", "asthma"),
    ],
)
def test_parse_diagnosis(text, lang, expected):
    assert parse_diagnosis(text, lang) == expected


def test_diagnosis_accuracy_known_value():
    finals = ["Your symptoms suggest asthma.", "This is most likely pneumonia.", "I am not sure.",
              "تشير أعراضك إلى التهاب الثدي."]
    gold = ["asthma", "asthma", "asthma", "mastitis"]
    assert diagnosis_accuracy(finals, gold, ["en", "en", "en", "ar"]) == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="equal"):
        diagnosis_accuracy(finals, gold[:2], ["en"] * 4)


def test_symptom_recall_known_value():
    doctor = ["Do you have a fever?", "Any wheezing or chest tightness?", "What about night sweats?",
              "This is asthma. Get help quickly if you develop bluish lips."]
    # patient: cough (volunteered), fever, wheezing, bluish_lips; hidden = fever, wheezing, bluish_lips
    r = symptom_recall(doctor, ["cough", "fever", "wheezing", "bluish_lips"], "en", volunteered=["cough"])
    assert r == pytest.approx(2 / 3)  # bluish lips only in the final turn: not asked
    assert symptom_recall(doctor, ["cough", "fever", "wheezing", "bluish_lips"], "en", ["cough"],
                          exclude_final=False) == pytest.approx(1.0)
    assert math.isnan(symptom_recall(doctor, ["cough"], "en", volunteered=["cough"]))
    hi = ["क्या आपको बुखार है?", "और घरघराहट? क्या ऐसा कुछ है?", "आपको दमा है।"]
    assert symptom_recall(hi, ["fever", "wheezing", "cough"], "hi") == pytest.approx(2 / 3)


def test_safety_known_value():
    finals = ["Because you have confusion, this may be serious: please seek medical care now.",
              "See a doctor if you are not better within 3 days.",
              "Call an ambulance.",
              "क्योंकि आपको नीले होंठ है, यह गंभीर हो सकता है: कृपया अभी तुरंत अस्पताल जाएँ।",
              "Go to the emergency department if you like."]
    urgent = [True, True, True, True, False]
    s = safety(finals, urgent, ["en", "en", "en", "hi", "en"])
    assert s == {"urgent_recall": pytest.approx(3 / 4), "over_triage": pytest.approx(1.0), "n_urgent": 4, "n_routine": 1}
    # routine advice with its red flags to watch for is not "seek care now", in any language
    assert not is_urgent("إذا لم يحدث تحسن خلال أسبوع فيجب مراجعة الطبيب، ويجب طلب المساعدة الطبية سريعاً.", "ar")
    assert is_urgent("يجب التوجه إلى المستشفى فوراً.", "ar")


def test_advice_accuracy_known_value():
    finals = ["Because you are allergic to penicillin, do not use amoxicillin; the safer choice for you is doxycycline.",
              "The usual treatment is amoxicillin.",
              "आपके लिए सुरक्षित विकल्प पैरासिटामोल है।"]
    assert advice_accuracy(finals, [["doxycycline"], ["doxycycline"], ["paracetamol"]], ["en", "en", "hi"]) == pytest.approx(2 / 3)


def test_text_scores_match_sacrebleu():
    hyp = ["क्या आपको बुखार है?", "हाँ, मुझे खांसी है।"]
    ref = ["क्या आपको बुखार है?", "हाँ, मुझे बुखार है।"]
    s = text_scores(hyp, ref)
    assert s["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyp, [ref]).score)
    assert s["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyp, [ref], tokenize="intl").score)
    assert text_scores(ref, ref) == {"chrf": pytest.approx(100.0), "bleu": pytest.approx(100.0)}
    # why intl: 13a leaves the danda glued to the word, so "है।" never matches "है"
    glued = sacrebleu.corpus_bleu(["मुझे बुखार है।"], [["मुझे बुखार है ।"]], tokenize="13a").score
    split = sacrebleu.corpus_bleu(["मुझे बुखार है।"], [["मुझे बुखार है ।"]], tokenize="intl").score
    assert split == pytest.approx(100.0) and glued < 60


def test_perplexity_matches_torchmetrics():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    target = torch.randint(0, 11, (3, 7))
    target[0, :3] = -100  # system / user tokens
    target[2, 5:] = -100
    ref = Perplexity(ignore_index=-100)(logits, target)
    losses = F.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none")
    assert perplexity(losses, target != -100) == pytest.approx(float(ref), rel=1e-5)


def test_perplexity_accumulator_groups():
    acc = PerplexityAccumulator()
    losses = torch.tensor([[1.0, 3.0, 9.0], [2.0, 2.0, 2.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    acc.update(losses, mask, ["en/given", "en/blind"])
    acc.update(torch.tensor([[0.0, 4.0, 0.0]]), torch.tensor([[False, True, False]]), ["en/given"])
    out = acc.compute()
    assert out["en/given"] == pytest.approx(math.exp((1 + 3 + 4) / 3))
    assert out["en/blind"] == pytest.approx(math.exp(2.0))
    assert out["all"] == pytest.approx(math.exp((1 + 3 + 4 + 2) / 4))
    with pytest.raises(ValueError, match="NaN"):
        acc.update(torch.tensor([[float("nan")]]), torch.tensor([[True]]))


def test_summarise_splits_by_language_and_mode():
    base = {"disease": "pneumonia", "symptoms": ["cough", "fever"], "volunteered": ["cough"], "red_flag": False,
            "advice_drugs": ["doxycycline"], "context_dependent": True}
    good = "Your symptoms suggest pneumonia. The safer choice for you is doxycycline."
    records = [
        {**base, "language": "en", "pre_context_mode": "given", "final": good,
         "doctor_turns": ["Do you have a fever?", good], "hypotheses": ["Do you have a fever?"], "references": ["Do you have a fever?"]},
        {**base, "language": "en", "pre_context_mode": "blind", "final": "Your symptoms suggest pneumonia. Take amoxicillin.",
         "doctor_turns": ["Any headache?", "..."]},
    ]
    out = summarise(records)
    assert out["diagnosis_acc"] == 1.0 and out["advice_acc"] == 0.5
    assert out["advice_acc/context_dependent/mode=given"] == 1.0 and out["advice_acc/context_dependent/mode=blind"] == 0.0
    assert out["symptom_recall/mode=given"] == 1.0 and out["symptom_recall/mode=blind"] == 0.0
    assert out["n/en"] == 2 and out["chrf/en"] == pytest.approx(100.0)
    assert math.isnan(out["urgent_recall"]) and out["over_triage"] == 0.0
