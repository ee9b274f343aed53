"""Knowledge base: completeness in all seven languages, the checks that refuse a broken file, and
name matching per script."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from domains.dialogue.kb import KB_PATH, LANGUAGES, TEMPLATES_PATH, KnowledgeBase, KnowledgeBaseError, load_kb


def test_kb_is_complete():
    kb = load_kb()
    assert len(kb.diseases) == 12 and 95 <= len(kb.symptom_ids) <= 115
    # MDDial's twelve disease tags map onto the knowledge base
    mddial = ["Esophagitis", "Enteritis", "Asthma", "Coronary heart disease", "Pneumonia", "Rhinitis", "Thyroiditis",
              "Traumatic brain injury", "Dermatitis", "External otitis", "Conjunctivitis", "Mastitis"]
    assert sorted(kb.lookup("diseases", t) for t in mddial) == sorted(kb.disease_ids)
    for d in kb.diseases.values():
        assert set(d.advice) == set(LANGUAGES) and d.sources and d.red_flags
        assert all(0 < p < 1 for p in d.symptoms.values())
        for r in d.rules:  # every rule can fire and has a sentence in every language
            assert r.trigger({r.kind: [r.when[0]]}) == r.when[0]
    # pre-context matters on identifiable cases: allergy and medication rules both exist
    kinds = {r.kind for d in kb.diseases.values() for r in d.rules}
    assert {"allergies", "medications", "chronic_conditions"} <= kinds
    pneumonia = kb.diseases["pneumonia"].rules[0]
    assert (pneumonia.when, pneumonia.avoid, pneumonia.use) == (("penicillin",), "amoxicillin", "doxycycline")


def _broken(tmp_path: Path, edit, which: str = "kb") -> tuple[Path, Path]:
    src = KB_PATH if which == "kb" else TEMPLATES_PATH
    data = yaml.load(src.read_text(encoding="utf-8"), Loader=yaml.CSafeLoader)
    edit(data)
    out = tmp_path / src.name
    out.write_text(yaml.dump(data, Dumper=yaml.CSafeDumper, allow_unicode=True), encoding="utf-8")
    return (out, TEMPLATES_PATH) if which == "kb" else (KB_PATH, out)


def test_missing_translation_is_refused(tmp_path):
    def drop_tamil(d):
        del d["symptoms"]["fever"]["ta"]

    with pytest.raises(KnowledgeBaseError, match=r"symptoms\.fever.*exactly"):
        KnowledgeBase(*_broken(tmp_path, drop_tamil))


def test_unknown_symptom_and_bad_probability_are_refused(tmp_path):
    def unknown(d):
        d["diseases"]["asthma"]["symptoms"]["purple_toes"] = 0.2

    with pytest.raises(KnowledgeBaseError, match=r"diseases\.asthma\.symptoms.*purple_toes"):
        KnowledgeBase(*_broken(tmp_path, unknown))

    def prob(d):
        d["diseases"]["asthma"]["symptoms"]["wheezing"] = 1.5

    with pytest.raises(KnowledgeBaseError, match=r"wheezing.*\(0, 1\)"):
        KnowledgeBase(*_broken(tmp_path, prob))

    def rule(d):
        d["diseases"]["pneumonia"]["treatment"]["rules"][0]["use"] = "unobtainium"

    with pytest.raises(KnowledgeBaseError, match=r"pneumonia\.treatment\.rules\[0\].*use"):
        KnowledgeBase(*_broken(tmp_path, rule))


def test_templates_must_stay_parallel(tmp_path):
    def placeholder(d):
        d["hi"]["doctor_ask"][0] = "क्या आपको {disease} है?"

    with pytest.raises(KnowledgeBaseError, match=r"hi\.doctor_ask\[0\].*placeholders"):
        KnowledgeBase(*_broken(tmp_path, placeholder, "templates"))

    def variants(d):
        d["ar"]["patient_open"] = d["ar"]["patient_open"][:1]

    with pytest.raises(KnowledgeBaseError, match=r"ar\.patient_open.*variants"):
        KnowledgeBase(*_broken(tmp_path, variants, "templates"))


def test_ambiguous_names_are_refused(tmp_path):
    def clash(d):
        d["symptoms"]["cough"]["en"].append("fever")

    with pytest.raises(KnowledgeBaseError, match="also a name of"):
        KnowledgeBase(*_broken(tmp_path, clash))


@pytest.mark.parametrize(
    "lang, text, lexicon, expected",
    [
        # English: case, plural, longest name first ("chest pain when breathing in" is not "chest pain")
        ("en", "Headaches and a FEVER, plus chest pain when breathing in.", "symptoms", ["headache", "fever", "pleuritic_pain"]),
        ("en", "Probably hay fever, not PNEUMONIA", "diseases", ["rhinitis", "pneumonia"]),
        # Hindi: candrabindu / anusvara and nukta spellings match the same entry
        ("hi", "मुझे खाँसी और तकलीफ नहीं, बस सांस की तकलीफ़", "symptoms", ["cough", "shortness_of_breath"]),
        # Arabic: article and attached preposition, hamza variants
        ("ar", "أعتقد أنك مصاب بالربو وليس بالتهاب المريء", "diseases", ["asthma", "oesophagitis"]),
        # Tamil: case ending attached to the name
        ("ta", "இது நிமோனியாவாக இருக்கலாம்", "diseases", ["pneumonia"]),
        # Telugu: ZWNJ spelling variants of a drug name
        ("te", "మెట్ఫార్మిన్ ఆపండి", "medicines", ["metformin"]),
    ],
)
def test_find_per_script(lang, text, lexicon, expected):
    kb = load_kb()
    assert [k for _, k in kb.find(text, lexicon, lang)] == expected


def test_lookup_accepts_ids_tags_and_names_in_any_language():
    kb = load_kb()
    assert kb.lookup("symptoms", "Acid reflux") == "acid_regurgitation"  # MDDial's name
    assert kb.lookup("symptoms", "Burning sensation behind the breastbone") == "heartburn"
    assert kb.lookup("symptoms", "बुखार") == "fever" and kb.lookup("symptoms", "fever") == "fever"
    assert kb.lookup("diseases", "التهاب الملتحمة") == "conjunctivitis"
    assert kb.lookup("symptoms", "Thin white moss") is None  # MDDial terms without a counterpart stay unknown
