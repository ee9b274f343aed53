"""Seeded MDDial-style consultations in seven parallel languages (MedAidDialog layout).

One consultation is drawn once, language-free, then rendered in every language from parallel
templates (``templates.yaml``), so its translations share every turn, symptom and decision:

1. **Case.** A disease from ``knowledge.yaml``; each of its symptoms present with its probability
   (at least two that are not red flags); an adult profile (age, sex, allergies, long-term
   conditions, regular medicines) from the background prevalences, and, with probability
   ``context_case_rate``, one trigger of one of the disease's treatment rules added, so that
   allergy- and medication-dependent advice is common enough to measure.
2. **Opening.** The patient volunteers one or two of the present symptoms (a present red flag
   with probability 0.3 as well).
3. **Elicitation.** The doctor keeps a naive-Bayes posterior over the twelve diseases from the
   knowledge base's likelihoods and asks, turn by turn, a symptom of high expected information
   gain (one of the three best, drawn in proportion to the gain), until the leading disease has
   posterior >= 0.95 (at least 2, at most 5 questions); then screens every red flag of the
   leading disease not yet known. The patient answers truthfully.
4. **Pre-context.** Given (with probability ``precontext_rate``; each field then kept with
   probability 0.85) or not. The doctor asks about allergies, regular medicines and long-term
   conditions that the pre-context does not state.
5. **Close.** Diagnosis, the disease's self-care advice, the usual treatment changed by every rule
   the profile fires (substitute / avoid / pause / review), and when to seek care: "seek care now"
   when a red flag is present or a rule escalates (an anticoagulant after a head injury), else the
   disease's routine or review interval with its red flags to watch for.

A case whose dialogue would not single out its own disease (the leading disease when red flags
are screened, and the final one, must be the true one) is redrawn, so every reference diagnosis
follows from what was said. Each consultation is also rendered as the doctor would run it with no
pre-context at all (``turns_without_pre_context``: the same questions plus the three profile
questions), which pre-context dropout in training uses.

Consultation ``i`` depends only on ``(seed, i)``: a larger set extends a smaller one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .kb import FIELD_LEXICON, LANGUAGES, LIST_FIELDS, PRE_CONTEXT_FIELDS, KnowledgeBase, load_kb, normalise

GENERATOR_VERSION = 1  # bump when the generator's behaviour changes, so stale caches are not reused

MIN_QUESTIONS, MAX_QUESTIONS = 2, 5  # symptom questions before the red-flag screen
CONFIDENCE = 0.95  # posterior of the leading disease at which the doctor stops asking
VOLUNTEER_RED_FLAG = 0.3  # chance that a present red flag is mentioned in the opening
KEEP_FIELD = 0.85  # chance that a field is kept when a pre-context is given
MAX_REDRAWS = 50
CONTEXT_QUESTIONS = (("allergies", "ask_allergies"), ("medications", "ask_medications"),
                     ("chronic_conditions", "ask_conditions"))


@dataclass
class Case:
    """One patient: the truth the dialogue is about."""

    disease: str
    present: frozenset[str]
    volunteered: tuple[str, ...]
    profile: dict[str, Any]
    given: tuple[str, ...]  # pre-context fields the doctor is told (empty: no pre-context)
    acts: list[dict[str, Any]] = field(default_factory=list)  # opening + symptom questions


def _entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.clip(p, 1e-12, None))).sum(-1)


class _Doctor:
    """Naive-Bayes belief over diseases from the answers so far."""

    def __init__(self, kb: KnowledgeBase) -> None:
        self.kb = kb
        self.p = np.clip(kb.likelihoods(), 0.01, 0.99)
        self.col = {s: j for j, s in enumerate(kb.symptom_ids)}
        self.log_post = np.zeros(len(kb.disease_ids))
        self.known: dict[str, bool] = {}

    def observe(self, symptom: str, present: bool) -> None:
        q = self.p[:, self.col[symptom]]
        self.log_post += np.log(q if present else 1 - q)
        self.known[symptom] = present

    @property
    def posterior(self) -> np.ndarray:
        w = np.exp(self.log_post - self.log_post.max())
        return w / w.sum()

    def leading(self) -> tuple[str, float]:
        post = self.posterior
        return self.kb.disease_ids[int(post.argmax())], float(post.max())

    def next_question(self, rng: np.random.Generator) -> str | None:
        post = self.posterior
        cand = [s for s in self.kb.symptom_ids if s not in self.known]
        q = self.p[:, [self.col[s] for s in cand]]  # (D, S)
        p_yes = post @ q
        post_yes = post[:, None] * q / p_yes
        post_no = post[:, None] * (1 - q) / (1 - p_yes)
        gain = _entropy(post) - (p_yes * _entropy(post_yes.T) + (1 - p_yes) * _entropy(post_no.T))
        best = np.argsort(-gain)[:3]
        best = best[gain[best] > 1e-6]
        if not len(best):
            return None
        return cand[int(rng.choice(best, p=gain[best] / gain[best].sum()))]


# --------------------------------------------------------------------------------------------
# cases
def sample_profile(kb: KnowledgeBase, disease: str, rng: np.random.Generator, context_case_rate: float) -> dict[str, Any]:
    """Age, sex and the three pre-context lists (ids), from background prevalences plus, with
    probability ``context_case_rate``, one trigger of one of the disease's rules."""
    d = kb.diseases[disease]
    age = int(rng.integers(d.age[0], d.age[1] + 1))
    sex = d.sex if d.sex != "any" else ("female" if rng.random() < 0.5 else "male")
    prof = kb.profile
    out: dict[str, Any] = {"age": age, "sex": sex}
    for fld in LIST_FIELDS:
        out[fld] = [k for k, v in (prof.get(fld) or {}).items() if age >= v.get("min_age", 0) and rng.random() < v["p"]]
    if d.rules and rng.random() < context_case_rate:
        rule = d.rules[int(rng.integers(len(d.rules)))]
        trigger = rule.when[int(rng.integers(len(rule.when)))]
        if trigger not in out[rule.kind]:
            out[rule.kind].append(trigger)
    for med, cond in (prof.get("implies") or {}).items():
        if med in out["medications"] and cond not in out["chronic_conditions"]:
            out["chronic_conditions"].append(cond)
    for fld in LIST_FIELDS:  # knowledge-base order, so equal profiles serialise equally
        order = list(kb.lexicons[FIELD_LEXICON[fld]])
        out[fld] = sorted(set(out[fld]), key=order.index)
    return out


def _try_case(kb: KnowledgeBase, disease: str, rng: np.random.Generator, precontext_rate: float,
              context_case_rate: float) -> Case | None:
    d = kb.diseases[disease]
    present = frozenset(s for s, p in d.symptoms.items() if rng.random() < p)
    ordinary = [s for s in d.symptoms if s in present and s not in d.red_flags]
    if len(ordinary) < 2:
        return None
    w = np.array([d.symptoms[s] for s in ordinary])
    n_open = 1 + int(rng.random() < 0.5)
    opening = [ordinary[i] for i in sorted(rng.choice(len(ordinary), n_open, replace=False, p=w / w.sum()))]
    opening += [s for s in d.red_flags if s in present and rng.random() < VOLUNTEER_RED_FLAG]
    profile = sample_profile(kb, disease, rng, context_case_rate)
    given: tuple[str, ...] = ()
    if rng.random() < precontext_rate:
        given = tuple(f for f in PRE_CONTEXT_FIELDS if rng.random() < KEEP_FIELD) or (PRE_CONTEXT_FIELDS[0],)

    doc = _Doctor(kb)
    acts: list[dict[str, Any]] = [{"role": "patient", "act": "open", "symptoms": opening, "v": int(rng.integers(2))}]
    for s in opening:
        doc.observe(s, True)

    def ask(s: str, act: str) -> None:
        acts.append({"role": "doctor", "act": act, "symptom": s, "v": int(rng.integers(kb.variants(f"doctor_{act}")))})
        yes = s in present
        acts.append({"role": "patient", "act": "yes" if yes else "no", "symptom": s, "v": int(rng.integers(2))})
        doc.observe(s, yes)

    for n in range(MAX_QUESTIONS):
        if n >= MIN_QUESTIONS and doc.leading()[1] >= CONFIDENCE:
            break
        s = doc.next_question(rng)
        if s is None:
            break
        ask(s, "ask")
    leading, _ = doc.leading()
    if leading != disease:
        return None
    for s in kb.diseases[leading].red_flags:
        if s not in doc.known:
            ask(s, "ask_red_flag")
    if doc.leading()[0] != disease:
        return None
    return Case(disease, present, tuple(opening), profile, given, acts)


def sample_case(kb: KnowledgeBase, rng: np.random.Generator, disease: str, precontext_rate: float = 0.7,
                context_case_rate: float = 0.35) -> Case:
    """A case of ``disease`` whose dialogue singles it out (redrawn until it does)."""
    for _ in range(MAX_REDRAWS):
        case = _try_case(kb, disease, rng, precontext_rate, context_case_rate)
        if case is not None:
            return case
    raise RuntimeError(f"no identifiable case of {disease!r} in {MAX_REDRAWS} draws: check its symptoms in {kb.kb_path}")


# --------------------------------------------------------------------------------------------
# the close: treatment and care decisions
def decide(kb: KnowledgeBase, disease: str, present: set[str] | frozenset[str], profile: dict[str, Any]) -> dict[str, Any]:
    """Treatment sentences, care sentence and labels for a diagnosed disease and a known profile."""
    d = kb.diseases[disease]
    fired = [(r, r.trigger(profile)) for r in d.rules]
    fired = [(r, t) for r, t in fired if t is not None]
    treatment, advice_drugs = [], []
    if not any(r.avoid == d.default_drug and r.type in ("substitute", "avoid") for r, _ in fired):
        treatment.append({"key": "treat_default", "slots": {"drug": ["medicines", d.default_drug]}})
        advice_drugs.append(d.default_drug)
    urgent_med = None
    for r, t in fired:
        trig = [FIELD_LEXICON[r.kind], t]
        if r.type == "escalate":
            urgent_med = urgent_med or (r.kind, t)
            continue
        slots = {"trigger": trig}
        if r.avoid:
            slots["avoid"] = ["medicines", r.avoid]
        if r.use:
            slots["use"] = ["medicines", r.use]
        treatment.append({"key": f"treat_{r.type}_{r.kind}", "slots": slots})
        advice_drugs.append(r.use if r.type == "substitute" else t)
    flags = [s for s in d.red_flags if s in present]
    if flags:
        care = {"key": "care_urgent_symptom", "slots": {"symptom": ["symptoms", flags[0]]}}
    elif urgent_med:
        care = {"key": f"care_urgent_{urgent_med[0]}", "slots": {"trigger": [FIELD_LEXICON[urgent_med[0]], urgent_med[1]]}}
    else:
        care = {"key": f"care_{d.care_template}", "slots": {"period": ["periods", d.care_period],
                                                              "red_flags": ["symptoms_or", list(d.red_flags[:2])]}}
    return {
        "treatment": treatment, "care": care, "advice_drugs": list(dict.fromkeys(advice_drugs)),
        "red_flag": bool(flags or urgent_med), "red_flag_reasons": flags + ([urgent_med[1]] if urgent_med else []),
        "context_dependent": bool(fired),
    }


def _close(kb: KnowledgeBase, case: Case, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Profile questions for fields the pre-context lacks (drawn once for both variants) + the final turn."""
    tail = []
    for fld, act in CONTEXT_QUESTIONS:
        tail.append({"field": fld, "acts": [
            {"role": "doctor", "act": act, "v": int(rng.integers(kb.variants(f"doctor_{act}")))},
            {"role": "patient", "act": fld, "items": list(case.profile[fld]), "v": 0},
        ]})
    final = {"role": "doctor", "act": "final", "disease": case.disease, "v": int(rng.integers(kb.variants("diagnosis"))),
             **decide(kb, case.disease, case.present, case.profile)}
    return tail + [final]


def consultation(kb: KnowledgeBase, index: int, seed: int, precontext_rate: float = 0.7,
                 context_case_rate: float = 0.35) -> dict[str, Any]:
    """Consultation ``index`` of the set seeded by ``seed``, language-free (acts, ids)."""
    rng = np.random.default_rng([seed, index, GENERATOR_VERSION])
    disease = kb.disease_ids[index % len(kb.disease_ids)]  # balanced classes; order shuffled by the split
    case = sample_case(kb, rng, disease, precontext_rate, context_case_rate)
    *tail, final = _close(kb, case, rng)

    def acts_for(given: Sequence[str]) -> list[dict[str, Any]]:
        asked = [a for t in tail if t["field"] not in given for a in t["acts"]]
        return case.acts + asked + [final]

    pre_context = {f: case.profile[f] for f in case.given} if case.given else None
    return {
        "dialogue_id": f"c{seed:03d}-{index:05d}",
        "disease": case.disease,
        "pre_context": pre_context,
        "profile": case.profile,
        "patient_symptoms": [s for s in kb.diseases[case.disease].symptoms if s in case.present],
        "volunteered_symptoms": list(case.volunteered),
        "acts": acts_for(case.given),
        "acts_without_pre_context": acts_for(()) if case.given else None,
        "red_flag": final["red_flag"], "red_flag_reasons": final["red_flag_reasons"],
        "context_dependent": final["context_dependent"], "advice_drugs": final["advice_drugs"],
        "generator": {"version": GENERATOR_VERSION, "seed": seed, "index": index, "kb": kb.fingerprint},
    }


# --------------------------------------------------------------------------------------------
# rendering
def _slot(kb: KnowledgeBase, value: Sequence[Any], lang: str) -> str:
    lexicon, key = value
    if lexicon == "periods":
        return kb.block(lang)["periods"][key]
    if lexicon == "symptoms_or":
        return kb.join(kb.names_in("symptoms", key, lang), lang, "or")
    return kb.name(lexicon, key, lang)


def render_act(kb: KnowledgeBase, act: dict[str, Any], lang: str) -> str:
    """The text of one act in one language."""
    kind, v = act["act"], act.get("v", 0)
    if kind == "open":
        return kb.fill("patient_open", lang, v, symptoms=kb.join(kb.names_in("symptoms", act["symptoms"], lang), lang))
    if kind in ("ask", "ask_red_flag"):
        return kb.fill(f"doctor_{kind}", lang, v, symptom=kb.name("symptoms", act["symptom"], lang))
    if kind in ("yes", "no"):
        return kb.fill(f"patient_{kind}", lang, v, symptom=kb.name("symptoms", act["symptom"], lang))
    if kind in ("ask_allergies", "ask_medications", "ask_conditions"):
        return kb.fill(f"doctor_{kind}", lang, v)
    if kind in LIST_FIELDS:
        short = "conditions" if kind == "chronic_conditions" else kind
        if not act["items"]:
            return kb.fill(f"patient_no_{short}", lang, v)
        items = kb.join(kb.names_in(FIELD_LEXICON[kind], act["items"], lang), lang)
        return kb.fill(f"patient_{short}", lang, v, items=items)
    if kind == "final":
        d = kb.diseases[act["disease"]]
        parts = [kb.fill("diagnosis", lang, v, disease=kb.name("diseases", d.id, lang)), d.advice[lang]]
        for sentence in [*act["treatment"], act["care"]]:
            slots = {k: _slot(kb, val, lang) for k, val in sentence["slots"].items()}
            parts.append(kb.fill(sentence["key"], lang, 0, **slots))
        return " ".join(parts)
    raise ValueError(f"unknown act {kind!r}")


def render_turns(kb: KnowledgeBase, acts: list[dict[str, Any]], lang: str) -> list[dict[str, Any]]:
    """Turns in the MedAid layout: role patient | doctor, text, and the act annotations."""
    out = []
    for a in acts:
        turn = {"role": a["role"], "text": render_act(kb, a, lang), "act": a["act"]}
        if "symptom" in a:
            turn["symptom"] = a["symptom"]
        if a["act"] == "open":
            turn["symptoms"] = list(a["symptoms"])
        out.append(turn)
    return out


def dialogue_record(kb: KnowledgeBase, consult: dict[str, Any], lang: str) -> dict[str, Any]:
    """One consultation in one language, as a MedAidDialog-style JSON record (see data.py)."""
    answers = {a["symptom"]: a["act"] for a in consult["acts"] if a["act"] in ("yes", "no")}
    rec = {
        "dialogue_id": consult["dialogue_id"],
        "language": lang,
        "disease_tag": kb.diseases[consult["disease"]].mddial,
        "pre_context": consult["pre_context"],
        "profile": consult["profile"],
        "symptoms_by_doctor_dialog": answers,
        "patient_symptoms": consult["patient_symptoms"],
        "volunteered_symptoms": consult["volunteered_symptoms"],
        "red_flag": consult["red_flag"],
        "red_flag_reasons": consult["red_flag_reasons"],
        "context_dependent": consult["context_dependent"],
        "advice_drugs": consult["advice_drugs"],
        "turns": render_turns(kb, consult["acts"], lang),
    }
    if consult["acts_without_pre_context"] is not None:
        rec["turns_without_pre_context"] = render_turns(kb, consult["acts_without_pre_context"], lang)
    rec["generator"] = consult["generator"]
    return rec


def generate_medaid_json(path: str | Path, n_dialogues: int, seed: int = 0, precontext_rate: float = 0.7,
                         context_case_rate: float = 0.35, languages: Sequence[str] = LANGUAGES,
                         kb: KnowledgeBase | None = None) -> None:
    """Write ``n_dialogues`` consultations x ``languages`` to one MedAid-style JSON file."""
    from tqdm.auto import tqdm

    kb = kb or load_kb()
    records: dict[str, Any] = {}
    for i in tqdm(range(n_dialogues), desc="dialogue: generating consultations", disable=n_dialogues < 200):
        consult = consultation(kb, i, seed, precontext_rate, context_case_rate)
        for lang in languages:
            records[f"Dialog {len(records) + 1}"] = dialogue_record(kb, consult, lang)
    Path(path).write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")


# --------------------------------------------------------------------------------------------
class PatientSimulator:
    """Answers a model's doctor turns for one case, in one language, from the case's truth.

    For interactive evaluation (symptom recall of a model that asks its own questions): a
    question naming a symptom is answered yes / no from ``symptoms``; a question about allergies,
    regular medicines or long-term conditions (``question_cues`` in templates.yaml) from
    ``profile``; anything else with "I'm not sure". Answers use the generator's first templates.
    """

    def __init__(self, symptoms: Sequence[str], profile: dict[str, Any] | None, language: str,
                 kb: KnowledgeBase | None = None) -> None:
        self.kb, self.language = kb or load_kb(), language
        self.symptoms, self.profile = set(symptoms), profile or {}

    def answer(self, doctor_text: str) -> str:
        kb, lang = self.kb, self.language
        found = kb.find(doctor_text, "symptoms", lang)
        if found:
            s = found[0][1]
            return render_act(kb, {"act": "yes" if s in self.symptoms else "no", "symptom": s}, lang)
        text = normalise(doctor_text, lang)
        cues = kb.block(lang)["question_cues"]
        for fld in ("allergies", "medications", "chronic_conditions"):  # allergy questions mention medicines too
            if any(normalise(c, lang) in text for c in cues[fld]):
                return render_act(kb, {"act": fld, "items": list(self.profile.get(fld) or ())}, lang)
        return kb.fill("patient_unsure", lang)
