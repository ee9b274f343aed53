"""The disease-symptom knowledge base and the parallel templates, loaded and checked once.

``knowledge.yaml`` holds the medicine (diseases, symptoms with per-disease probabilities, red flags,
advice, treatments and the allergy / medication / condition rules that change them) and
``templates.yaml`` the sentences of each of the seven languages. This module only reads them,
checks that every entry is complete in every language (a missing translation or an unknown id is
an error naming the entry), and offers what the generator, the readers and the metrics share:

* ``name(lexicon, id, lang)``: how the generator writes an entry;
* ``find(text, lexicon, lang)``: the entries a (possibly model-written) text mentions, longest
  name first and without overlaps, after a normalisation per script (case and word boundaries for
  English; nukta, candrabindu and ZWJ/ZWNJ for Devanagari; diacritics, alef / yeh / teh marbuta
  variants and the article for Arabic), so "Headaches", "खाँसी" / "खांसी" and "بالربو" are found;
* ``fill(key, lang, variant, **slots)`` and ``join(items, lang)``: template rendering.
"""

from __future__ import annotations

import hashlib
import re
import string
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import yaml

KB_PATH = Path(__file__).with_name("knowledge.yaml")
TEMPLATES_PATH = Path(__file__).with_name("templates.yaml")

LANGUAGES = ("en", "hi", "te", "ta", "bn", "mr", "ar")
LANGUAGE_NAMES = {"en": "English", "hi": "Hindi", "te": "Telugu", "ta": "Tamil", "bn": "Bengali",
                  "mr": "Marathi", "ar": "Arabic"}
#: the optional patient pre-context, in the order it is serialised
PRE_CONTEXT_FIELDS = ("age", "sex", "allergies", "chronic_conditions", "medications")
LIST_FIELDS = ("allergies", "chronic_conditions", "medications")
#: which lexicon names the entries of each pre-context list
FIELD_LEXICON = {"allergies": "medicines", "medications": "medicines", "chronic_conditions": "conditions"}
LEXICONS = ("symptoms", "medicines", "conditions", "diseases")
RULE_TYPES = ("substitute", "avoid", "pause", "review", "escalate")


class KnowledgeBaseError(ValueError):
    """knowledge.yaml or templates.yaml is incomplete or inconsistent (names the file and entry)."""


# --------------------------------------------------------------------------------------------
# normalisation for matching
_ARABIC_DIACRITICS = re.compile("[\u0610-\u061a\u064b-\u065f\u0670\u06d6-\u06ed\u0640]")
_ARABIC_LETTERS = str.maketrans({"أ": "ا", "إ": "ا", "آ": "ا", "ٱ": "ا", "ى": "ي", "ة": "ه"})
_DEVANAGARI = str.maketrans({"\u093c": None, "\u0901": "\u0902"})  # nukta dropped; candrabindu -> anusvara


def normalise(text: str, language: str) -> str:
    """The form texts and names are compared in (not for display)."""
    text = unicodedata.normalize("NFC", text).replace("\u200c", "").replace("\u200d", "")
    text = text.replace("\u2019", "'").replace("\u0972", "\u0905\u0945")  # ॲ written as अ + ॅ
    if language in ("hi", "mr"):
        text = text.translate(_DEVANAGARI)
    elif language == "ar":
        text = _ARABIC_DIACRITICS.sub("", text).translate(_ARABIC_LETTERS)
    elif language == "en":
        text = text.casefold()
    return " ".join(text.split())


def _match_form(name: str, language: str) -> str:
    form = normalise(name, language)
    if language == "ar" and form.startswith("ال") and len(form) > 4:
        form = form[2:]  # "الربو" also matches "ربو", "بالربو", "للربو"
    return form


def placeholders(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f}


def _read_yaml(path: Path) -> Any:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~8x faster on this file
    return yaml.load(path.read_text(encoding="utf-8"), Loader=loader)


# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """A change to a disease's usual treatment triggered by the patient's profile."""

    type: str  # substitute | avoid | pause | review | escalate
    kind: str  # allergies | medications | chronic_conditions
    when: tuple[str, ...]
    avoid: str | None = None
    use: str | None = None

    def trigger(self, profile: dict[str, Any]) -> str | None:
        """The first of the patient's entries (in ``when`` order) that fires this rule."""
        have = set(profile.get(self.kind) or ())
        return next((t for t in self.when if t in have), None)


@dataclass(frozen=True)
class Disease:
    id: str
    mddial: str
    names: dict[str, tuple[str, ...]]
    age: tuple[int, int]
    sex: str
    symptoms: dict[str, float]
    red_flags: tuple[str, ...]
    care_template: str
    care_period: str
    advice: dict[str, str]
    default_drug: str
    rules: tuple[Rule, ...]
    sources: tuple[str, ...]


class KnowledgeBase:
    """The loaded and checked knowledge base plus templates (use :func:`load_kb`)."""

    def __init__(self, kb_path: str | Path = KB_PATH, templates_path: str | Path = TEMPLATES_PATH) -> None:
        self.kb_path, self.templates_path = Path(kb_path), Path(templates_path)
        raw = _read_yaml(self.kb_path)
        self.templates: dict[str, dict[str, Any]] = _read_yaml(self.templates_path)
        self.fingerprint = hashlib.sha256(self.kb_path.read_bytes() + self.templates_path.read_bytes()).hexdigest()[:12]
        self.languages = tuple(raw.get("languages") or ())
        if self.languages != LANGUAGES:
            raise self._error("languages", f"expected {list(LANGUAGES)}, got {list(self.languages)}")
        self.background = float(raw["background_probability"])
        self.lexicons: dict[str, dict[str, dict[str, tuple[str, ...]]]] = {
            lex: {k: self._names(f"{lex}.{k}", v) for k, v in (raw.get(lex) or {}).items()}
            for lex in ("symptoms", "medicines", "conditions")
        }
        self.diseases = {k: self._disease(k, v) for k, v in (raw.get("diseases") or {}).items()}
        self.lexicons["diseases"] = {k: d.names for k, d in self.diseases.items()}
        self.profile = raw.get("profile") or {}
        self._check_profile()
        self._check_templates()
        self._check_unique_names()
        self._patterns: dict[tuple[str, str], tuple[re.Pattern, list[str]]] = {}
        self._lookup: dict[str, dict[Any, str]] = {}
        self.symptom_ids = tuple(self.lexicons["symptoms"])
        self.disease_ids = tuple(self.diseases)

    # ---- loading and checks ----------------------------------------------------------------
    def _error(self, where: str, problem: str, file: Path | None = None) -> KnowledgeBaseError:
        return KnowledgeBaseError(f"{file or self.kb_path}: {where}: {problem}")

    def _names(self, where: str, entry: Any) -> dict[str, tuple[str, ...]]:
        if not isinstance(entry, dict) or set(entry) != set(LANGUAGES):
            got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise self._error(where, f"expected names in exactly {list(LANGUAGES)}, got {got}")
        out = {}
        for lang, names in entry.items():
            names = [names] if isinstance(names, str) else names
            if not names or not all(isinstance(n, str) and n.strip() for n in names):
                raise self._error(f"{where}.{lang}", f"expected a non-empty list of names, got {names!r}")
            out[lang] = tuple(n.strip() for n in names)
        return out

    def _disease(self, key: str, d: dict[str, Any]) -> Disease:
        where = f"diseases.{key}"
        sym = d.get("symptoms") or {}
        for s, p in sym.items():
            if s not in self.lexicons["symptoms"]:
                raise self._error(f"{where}.symptoms", f"unknown symptom {s!r}")
            if not 0 < float(p) < 1:
                raise self._error(f"{where}.symptoms.{s}", f"probability must be in (0, 1), got {p}")
        red = tuple(d.get("red_flags") or ())
        if not set(red) <= set(sym):
            raise self._error(f"{where}.red_flags", f"{sorted(set(red) - set(sym))} are not among its symptoms")
        care = d.get("care") or {}
        if care.get("template") not in ("routine", "review"):
            raise self._error(f"{where}.care.template", f"expected routine or review, got {care.get('template')!r}")
        advice = d.get("advice") or {}
        if set(advice) != set(LANGUAGES) or not all(isinstance(a, str) and a for a in advice.values()):
            raise self._error(f"{where}.advice", f"expected one sentence in each of {list(LANGUAGES)}")
        treat = d.get("treatment") or {}
        meds = self.lexicons["medicines"]
        if treat.get("default") not in meds:
            raise self._error(f"{where}.treatment.default", f"unknown medicine {treat.get('default')!r}")
        rules = []
        for i, r in enumerate(treat.get("rules") or ()):
            rw = f"{where}.treatment.rules[{i}]"
            rule = Rule(r.get("type"), r.get("kind"), tuple(r.get("when") or ()), r.get("avoid"), r.get("use"))
            if rule.type not in RULE_TYPES:
                raise self._error(rw, f"type must be one of {RULE_TYPES}, got {rule.type!r}")
            if rule.kind not in FIELD_LEXICON:
                raise self._error(rw, f"kind must be one of {list(FIELD_LEXICON)}, got {rule.kind!r}")
            if not rule.when or not set(rule.when) <= set(self.lexicons[FIELD_LEXICON[rule.kind]]):
                raise self._error(rw, f"`when` must list {FIELD_LEXICON[rule.kind]} ids, got {list(rule.when)}")
            needs = {"substitute": ("avoid", "use"), "avoid": ("avoid",)}.get(rule.type, ())
            for f in needs:
                if getattr(rule, f) not in meds:
                    raise self._error(rw, f"a {rule.type} rule needs `{f}`: a medicine id, got {getattr(rule, f)!r}")
            rules.append(rule)
        age = tuple(int(a) for a in d.get("age") or ())
        if len(age) != 2 or not 0 < age[0] <= age[1] <= 110:
            raise self._error(f"{where}.age", f"expected [min, max] adult ages, got {d.get('age')!r}")
        if d.get("sex") not in ("any", "female", "male"):
            raise self._error(f"{where}.sex", f"expected any, female or male, got {d.get('sex')!r}")
        return Disease(key, str(d.get("mddial", key)), self._names(f"{where}.names", d.get("names")), age, d["sex"],
                       {s: float(p) for s, p in sym.items()}, red, care["template"], str(care.get("period")),
                       dict(advice), treat["default"], tuple(rules), tuple(d.get("sources") or ()))

    def _check_profile(self) -> None:
        for field in LIST_FIELDS:
            for k, v in (self.profile.get(field) or {}).items():
                if k not in self.lexicons[FIELD_LEXICON[field]] or not 0 <= float(v.get("p", -1)) <= 1:
                    raise self._error(f"profile.{field}.{k}", f"expected a {FIELD_LEXICON[field]} id with p in [0, 1]")
        for med, cond in (self.profile.get("implies") or {}).items():
            if med not in self.lexicons["medicines"] or cond not in self.lexicons["conditions"]:
                raise self._error(f"profile.implies.{med}", "expected medicine id: condition id")

    def _check_templates(self) -> None:
        ref = self.templates.get("en")
        if set(self.templates) != set(LANGUAGES):
            raise self._error("languages", f"expected blocks {list(LANGUAGES)}, got {sorted(self.templates)}",
                              self.templates_path)
        for lang in LANGUAGES:
            block = self.templates[lang]
            if set(block) != set(ref):
                raise self._error(lang, f"keys differ from en: missing {sorted(set(ref) - set(block))}, "
                                  f"extra {sorted(set(block) - set(ref))}", self.templates_path)
            for key, val in ref.items():
                mine = block[key]
                if isinstance(val, dict):
                    if set(mine) != set(val):
                        raise self._error(f"{lang}.{key}", f"expected keys {sorted(val)}", self.templates_path)
                elif isinstance(val, list) and key.endswith("_cues"):
                    if not mine:
                        raise self._error(f"{lang}.{key}", "expected at least one cue", self.templates_path)
                elif isinstance(val, list):
                    if len(mine) != len(val):
                        raise self._error(f"{lang}.{key}", f"{len(mine)} variants, en has {len(val)}", self.templates_path)
                    for i, (a, b) in enumerate(zip(val, mine)):
                        if placeholders(a) != placeholders(b):
                            raise self._error(f"{lang}.{key}[{i}]", f"placeholders {sorted(placeholders(b))}, en has "
                                              f"{sorted(placeholders(a))}", self.templates_path)
        for d in self.diseases.values():
            if d.care_period not in ref["periods"]:
                raise self._error(f"diseases.{d.id}.care.period", f"expected one of {sorted(ref['periods'])}")
            for r in d.rules:
                key = f"treat_{r.type}_{r.kind}" if r.type != "escalate" else f"care_urgent_{r.kind}"
                if key not in ref:
                    raise self._error(f"diseases.{d.id}.treatment.rules", f"no template {key!r} in {self.templates_path}")

    def _check_unique_names(self) -> None:
        for lex, entries in self.lexicons.items():
            for lang in LANGUAGES:
                seen: dict[str, str] = {}
                for k, names in entries.items():
                    for n in names[lang]:
                        form = _match_form(n, lang)
                        if seen.get(form, k) != k:
                            raise self._error(f"{lex}.{k}.{lang}", f"name {n!r} is also a name of {seen[form]!r}")
                        seen[form] = k

    # ---- names and matching ----------------------------------------------------------------
    def name(self, lexicon: str, key: str, language: str) -> str:
        """How the generator writes entry ``key``; unknown keys (free text from real data) pass through."""
        entry = self.lexicons[lexicon].get(key)
        return entry[language][0] if entry else key

    def find(self, text: str, lexicon: str, language: str) -> list[tuple[int, str]]:
        """``(position, id)`` of every entry of ``lexicon`` the text names, in order of appearance."""
        pattern, ids = self._pattern(lexicon, language)
        out = []
        for m in pattern.finditer(normalise(text, language)):
            group = next(i for i, g in enumerate(m.groups()) if g is not None)
            out.append((m.start(), ids[group]))
        return out

    def _pattern(self, lexicon: str, language: str) -> tuple[re.Pattern, list[str]]:
        key = (lexicon, language)
        if key not in self._patterns:
            forms = sorted({(_match_form(n, language), k) for k, e in self.lexicons[lexicon].items()
                            for n in e[language]}, key=lambda f: (-len(f[0]), f[0]))
            alts = "|".join(f"({re.escape(f)})" for f, _ in forms)
            # English: whole words, optional plural; elsewhere a name may carry case endings and
            # postpositions written on the word (Tamil, Telugu, Bengali, Arabic), so no boundaries
            body = rf"(?<!\w)(?:{alts})(?:e?s)?(?!\w)" if language == "en" else f"(?:{alts})"
            self._patterns[key] = (re.compile(body), [k for _, k in forms])
        return self._patterns[key]

    def lookup(self, lexicon: str, name: str) -> str | None:
        """The id of an entry given its id, MDDial tag or any of its names in any language."""
        name = name.strip()
        if name in self.lexicons[lexicon]:
            return name
        if lexicon not in self._lookup:
            index: dict[str, str] = {}
            if lexicon == "diseases":
                index.update({d.mddial.casefold(): d.id for d in self.diseases.values()})
            for lang in LANGUAGES:
                for k, e in self.lexicons[lexicon].items():
                    index.update({(lang, _match_form(n, lang)): k for n in e[lang]})
            self._lookup[lexicon] = index
        index = self._lookup[lexicon]
        return index.get(name.casefold()) or next(
            (index[(lang, _match_form(name, lang))] for lang in LANGUAGES if (lang, _match_form(name, lang)) in index), None)

    # ---- templates ---------------------------------------------------------------------------
    def block(self, language: str) -> dict[str, Any]:
        if language not in self.templates:
            raise KeyError(f"no templates for language {language!r}; have {list(LANGUAGES)}")
        return self.templates[language]

    def variants(self, key: str) -> int:
        return len(self.templates["en"][key])

    def fill(self, key: str, language: str, variant: int = 0, **slots: str) -> str:
        options = self.block(language)[key]
        return options[variant % len(options)].format(**slots)

    def join(self, items: Sequence[str], language: str, conj: str = "and") -> str:
        """"a, b and c" with the language's separators (Arabic attaches و to the next word)."""
        fmt = self.block(language)["list"]
        items = list(items)
        if len(items) <= 1:
            return "".join(items)
        return fmt["sep"].join(items[:-1]) + fmt[conj] + items[-1]

    def cues(self, key: str, language: str) -> list[str]:
        """Cue phrases (urgent_cues, diagnosis_cues) in matching form."""
        extra = []
        if key == "diagnosis_cues":  # the text before {disease} in each diagnosis template
            extra = [t.split("{disease}")[0].strip(" ,:،") for t in self.block(language)["diagnosis"]]
        return [normalise(c, language) for c in [*self.block(language)[key], *extra] if c.strip()]

    # ---- probabilities -----------------------------------------------------------------------
    def likelihoods(self) -> np.ndarray:
        """P(symptom reported | disease), shape (diseases, symptoms) in ``disease_ids`` x ``symptom_ids`` order."""
        p = np.full((len(self.disease_ids), len(self.symptom_ids)), self.background)
        col = {s: j for j, s in enumerate(self.symptom_ids)}
        for i, d in enumerate(self.diseases.values()):
            for s, q in d.symptoms.items():
                p[i, col[s]] = q
        return p

    def names_in(self, lexicon: str, keys: Iterable[str], language: str) -> list[str]:
        return [self.name(lexicon, k, language) for k in keys]


@lru_cache(maxsize=4)
def load_kb(kb_path: str | Path = KB_PATH, templates_path: str | Path = TEMPLATES_PATH) -> KnowledgeBase:
    """The knowledge base (parsed and checked once per process)."""
    return KnowledgeBase(kb_path, templates_path)
