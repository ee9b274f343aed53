"""Medical dialogue data: MedAidDialog / MDDial JSON and chat JSONL readers, pre-context
serialisation, the chat-message Dataset with pre-context dropout, and the DataModule.

Layouts read (tested on tiny files written exactly so):

* **MDDial JSON** (Macherla et al. 2023, github.com/srijamacherla24/MDDial ``data/train.json``,
  ``test.json``; field names checked against that repository's files): one JSON object whose keys
  are ``"Dialog 1"``, ``"Dialog 2"``, ... and whose values hold ``disease_tag`` (str),
  ``symptoms_by_doctor_dialog`` ({symptom name: the patient's answer}) and ``dialogs``, a list of
  ``{"patient": str, "doctor": str}`` pairs in order. MDDial's patient utterances end in the
  artefact ``", Doctor: ?"``; it is removed (``strip_mddial_artifact``). Answers are classified
  yes / no from MDDial's eight fixed answer phrases (or a leading "yes" / "no" / "not"); any other
  answer is an error rather than a guess.
* **MedAidDialog-style JSON**: MedAidDialog (arXiv 2603.24132) extends MDDial with languages and
  patient pre-context, but its files were not found published, so its field names could not be
  checked. This reader takes MDDial's layout plus: ``dialogue_id`` (shared by the translations of
  one consultation; default: the key), ``language`` (default ``en``), ``pre_context`` (null or
  ``{age, sex, allergies, chronic_conditions, medications}``; ``gender`` is accepted for ``sex``)
  and ``turns``, a list of ``{"role": "patient" | "doctor", "text": str}`` (instead of
  ``dialogs``). Optional labels the generator writes: ``profile``, ``patient_symptoms``,
  ``volunteered_symptoms``, ``red_flag``, ``red_flag_reasons``, ``context_dependent``,
  ``advice_drugs`` and ``turns_without_pre_context`` (the same consultation when nothing is known
  beforehand). A JSON list of such records is accepted too.
* **Chat JSONL** (the Hugging Face / OpenAI fine-tuning format): one object per line with
  ``messages``: ``[{"role": "system" | "user" | "assistant", "content": str}, ...]`` (an optional
  leading system message; ``weight`` on assistant messages is kept), and optionally
  ``metadata`` holding the labels above. The patient is ``user``, the doctor ``assistant``.

Bad input raises :class:`DialogueFormatError` naming the file, the record, the field and the
expected form; no turn is ever dropped or repaired silently.

Items are ``{"messages": [...], "meta": {...}}`` (see :class:`DialogueDataset`). Tokenisation is
not done here: ``DialogueData.collate_fn`` is where the chat tokenizer / collator plugs in.
"""

from __future__ import annotations

import json
import re
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from suite.chat import ChatCollator, ConversationTooLong, encode_chat
from suite.checkpoint import ResumableDataLoader
from suite.data import DataFormatError, EpochSeededSampler, SuiteDataModule, cached, file_hash, generated_dir, split_by_group

from .kb import FIELD_LEXICON, LANGUAGES, PRE_CONTEXT_FIELDS, KnowledgeBase, load_kb
from .synth import GENERATOR_VERSION, generate_medaid_json

#: MDDial's fixed patient answers (MDDial repository, data/*.json)
MDDIAL_YES = ("Yes, sometimes", "I am experiencing that sometimes", "Yes Doctor, I am feeling that as well",
              "Yes most of the times")
MDDIAL_NO = ("No, I don't have that", "No, I never had anything like that.", "Well not in my knowledge",
             "Not that I know of")
MDDIAL_ARTIFACT = re.compile(r",?\s*Doctor:\s*\?\s*$")
ROLES = {"patient": "user", "doctor": "assistant"}
PRE_CONTEXT_MODES = ("given", "asked", "blind")


class DialogueFormatError(DataFormatError):
    """A dialogue file does not follow its layout: says which file, record and field, and the expected form
    (the suite's one reader error, :class:`suite.data.DataFormatError`, with the record named too)."""

    def __init__(self, file: str | Path, where: str, field: str, expected: str, got: Any = None) -> None:
        got_s = "" if got is None else f", got {_short(got)}"
        ValueError.__init__(self, f"{file}: {where}: field '{field}': expected {expected}{got_s}")
        self.path, self.file, self.where, self.field, self.expected = str(file), str(file), where, field, expected


def _short(v: Any, n: int = 80) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


@dataclass
class Turn:
    role: str  # patient | doctor
    text: str
    annotations: dict[str, Any] = field(default_factory=dict)  # act, symptom(s), weight, ...


@dataclass
class Dialogue:
    """One dialogue in one language, with its labels (ids from knowledge.yaml where they match)."""

    dialogue_id: str
    language: str
    turns: list[Turn]
    pre_context: dict[str, Any] | None = None
    disease_tag: str | None = None
    disease: str | None = None
    symptoms: list[str] = field(default_factory=list)
    volunteered: list[str] = field(default_factory=list)
    asked: dict[str, bool] = field(default_factory=dict)
    profile: dict[str, Any] | None = None
    red_flag: bool | None = None
    red_flag_reasons: list[str] = field(default_factory=list)
    context_dependent: bool | None = None
    advice_drugs: list[str] = field(default_factory=list)
    turns_without_pre_context: list[Turn] | None = None
    system: str | None = None  # a chat file's own system message (used verbatim)
    source: str = ""

    @property
    def item_id(self) -> str:
        return f"{self.dialogue_id}/{self.language}"


# --------------------------------------------------------------------------------------------
# field checks shared by the readers
class _Checker:
    def __init__(self, file: Path, where: str) -> None:
        self.file, self.where = file, where

    def fail(self, fld: str, expected: str, got: Any = None) -> DialogueFormatError:
        return DialogueFormatError(self.file, self.where, fld, expected, got)

    def text(self, value: Any, fld: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(fld, "a non-empty string", value)
        return value

    def opt_str(self, rec: dict, fld: str, default: str | None = None) -> str | None:
        v = rec.get(fld, default)
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise self.fail(fld, "a non-empty string or absent", v)
        return v

    def str_list(self, rec: dict, fld: str) -> list[str]:
        v = rec.get(fld)
        if v is None:
            return []
        if not isinstance(v, list) or not all(isinstance(x, str) and x.strip() for x in v):
            raise self.fail(fld, "a list of non-empty strings", v)
        return list(v)

    def opt_bool(self, rec: dict, fld: str) -> bool | None:
        v = rec.get(fld)
        if v is not None and not isinstance(v, bool):
            raise self.fail(fld, "true, false or absent", v)
        return v

    def pre_context(self, v: Any, fld: str = "pre_context") -> dict[str, Any] | None:
        if v is None:
            return None
        if not isinstance(v, dict):
            raise self.fail(fld, "null or an object with age, sex, allergies, chronic_conditions, medications", v)
        v = dict(v)
        if "gender" in v:
            if "sex" in v:
                raise self.fail(f"{fld}.gender", "either 'sex' or 'gender', not both")
            v["sex"] = v.pop("gender")
        unknown = sorted(set(v) - set(PRE_CONTEXT_FIELDS))
        if unknown:
            raise self.fail(fld, f"only the keys {list(PRE_CONTEXT_FIELDS)}", unknown)
        out: dict[str, Any] = {}
        for k in PRE_CONTEXT_FIELDS:
            if k not in v or v[k] is None:
                continue
            x = v[k]
            if k == "age":
                if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x <= 130:
                    raise self.fail(f"{fld}.age", "an integer number of years, 0-130", x)
            elif k == "sex":
                x = self.text(x, f"{fld}.sex")
            elif not isinstance(x, list) or not all(isinstance(i, str) and i.strip() for i in x):
                raise self.fail(f"{fld}.{k}", "a list of strings (empty for none)", x)
            out[k] = x
        return out

    def turns(self, v: Any, fld: str) -> list[Turn]:
        if not isinstance(v, list) or not v:
            raise self.fail(fld, 'a non-empty list of {"role": "patient" | "doctor", "text": str}', v)
        out = []
        for i, t in enumerate(v):
            if not isinstance(t, dict):
                raise self.fail(f"{fld}[{i}]", 'an object {"role": ..., "text": ...}', t)
            role = t.get("role")
            if role not in ROLES:
                raise self.fail(f"{fld}[{i}].role", '"patient" or "doctor"', role)
            out.append(Turn(role, self.text(t.get("text"), f"{fld}[{i}].text"),
                            {k: val for k, val in t.items() if k not in ("role", "text")}))
        return out


def _answer_is_yes(answer: str, chk: _Checker, fld: str) -> bool:
    a = answer.strip()
    if a in MDDIAL_YES or a.casefold() == "yes":
        return True
    if a in MDDIAL_NO or a.casefold() == "no":
        return False
    low = a.casefold()
    if re.match(r"yes\b", low):
        return True
    if re.match(r"(no|not|well not)\b", low):
        return False
    raise chk.fail(fld, f"one of MDDial's answers {list(MDDIAL_YES + MDDIAL_NO)} or yes / no", answer)


def _labels(d: Dialogue, rec: dict, chk: _Checker, kb: KnowledgeBase) -> None:
    """Fill the labels from the record's explicit fields, else derive them from the dialogue."""
    if d.disease_tag:
        d.disease = kb.lookup("diseases", d.disease_tag)
    sbd = rec.get("symptoms_by_doctor_dialog")
    if sbd is not None:
        if not isinstance(sbd, dict) or not all(isinstance(k, str) and isinstance(a, str) for k, a in sbd.items()):
            raise chk.fail("symptoms_by_doctor_dialog", "an object {symptom: answer}", sbd)
        for name, a in sbd.items():
            key = kb.lookup("symptoms", name) or name.strip().casefold()
            d.asked[key] = _answer_is_yes(a, chk, f"symptoms_by_doctor_dialog[{name!r}]")
    d.volunteered = [kb.lookup("symptoms", s) or s for s in chk.str_list(rec, "volunteered_symptoms")]
    if not d.volunteered and d.language in LANGUAGES:  # the symptoms named in the patient's opening turn
        first = next((t.text for t in d.turns if t.role == "patient"), "")
        d.volunteered = list(dict.fromkeys(k for _, k in kb.find(first, "symptoms", d.language)))
    given = chk.str_list(rec, "patient_symptoms")
    d.symptoms = ([kb.lookup("symptoms", s) or s for s in given] if given
                  else list(dict.fromkeys(d.volunteered + [k for k, yes in d.asked.items() if yes])))
    d.red_flag = chk.opt_bool(rec, "red_flag")
    d.red_flag_reasons = chk.str_list(rec, "red_flag_reasons")
    if d.red_flag is None and d.disease is not None:
        d.red_flag_reasons = [s for s in kb.diseases[d.disease].red_flags if s in d.symptoms]
        d.red_flag = bool(d.red_flag_reasons)
    d.context_dependent = chk.opt_bool(rec, "context_dependent")
    if d.context_dependent is None and d.pre_context is None and rec.get("profile") is None:
        d.context_dependent = False  # nothing about the patient is known, so nothing depends on it
    d.advice_drugs = chk.str_list(rec, "advice_drugs")
    d.profile = chk.pre_context(rec.get("profile"), "profile")


# --------------------------------------------------------------------------------------------
# readers
def read_medaid_json(path: str | Path, kb: KnowledgeBase | None = None, strip_mddial_artifact: bool = True) -> list[Dialogue]:
    """Read an MDDial or MedAidDialog-style JSON file (see the module docstring)."""
    kb, path = kb or load_kb(), Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DialogueFormatError(path, f"line {err.lineno}", "(file)", "valid JSON", err.msg) from err
    if isinstance(raw, list):
        raw = {f"Dialog {i + 1}": r for i, r in enumerate(raw)}
    if not isinstance(raw, dict) or not raw:
        raise DialogueFormatError(path, "top level", "(file)", 'an object {"Dialog 1": {...}, ...} or a list of dialogues',
                                  type(raw).__name__)
    out = []
    for key, rec in raw.items():
        chk = _Checker(path, f"dialogue {key!r}")
        if not isinstance(rec, dict):
            raise chk.fail("(record)", "an object", rec)
        if ("turns" in rec) == ("dialogs" in rec):
            raise chk.fail("turns", "either 'turns' (MedAidDialog-style) or 'dialogs' (MDDial), exactly one")
        if "dialogs" in rec:
            pairs = rec["dialogs"]
            if not isinstance(pairs, list) or not pairs:
                raise chk.fail("dialogs", 'a non-empty list of {"patient": str, "doctor": str}', pairs)
            turns = []
            for i, p in enumerate(pairs):
                if not isinstance(p, dict) or set(p) != {"patient", "doctor"}:
                    raise chk.fail(f"dialogs[{i}]", 'an object with exactly "patient" and "doctor"', p)
                text = chk.text(p["patient"], f"dialogs[{i}].patient")
                if strip_mddial_artifact:
                    text = MDDIAL_ARTIFACT.sub("", text).strip()
                turns += [Turn("patient", chk.text(text, f"dialogs[{i}].patient (after removing ', Doctor: ?')")),
                          Turn("doctor", chk.text(p["doctor"], f"dialogs[{i}].doctor"))]
        else:
            turns = chk.turns(rec["turns"], "turns")
        without = rec.get("turns_without_pre_context")
        d = Dialogue(
            dialogue_id=chk.opt_str(rec, "dialogue_id", key),
            language=chk.opt_str(rec, "language", "en"),
            turns=turns,
            pre_context=chk.pre_context(rec.get("pre_context")),
            disease_tag=chk.opt_str(rec, "disease_tag"),
            turns_without_pre_context=None if without is None else chk.turns(without, "turns_without_pre_context"),
            source=str(path),
        )
        _labels(d, rec, chk, kb)
        out.append(d)
    return out


def read_chat_jsonl(path: str | Path, kb: KnowledgeBase | None = None) -> list[Dialogue]:
    """Read a chat JSONL file (``{"messages": [{"role", "content"}, ...], "metadata"?: {...}}`` per line)."""
    kb, path = kb or load_kb(), Path(path)
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            chk = _Checker(path, f"line {n}")
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise chk.fail("(line)", "one JSON object per line", err.msg) from err
            if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list) or not rec["messages"]:
                raise chk.fail("messages", 'a non-empty list of {"role": "system" | "user" | "assistant", "content": str}',
                               rec.get("messages") if isinstance(rec, dict) else rec)
            system, turns = None, []
            for i, m in enumerate(rec["messages"]):
                fld = f"messages[{i}]"
                if not isinstance(m, dict):
                    raise chk.fail(fld, 'an object {"role": ..., "content": ...}', m)
                if "tool_calls" in m or "function_call" in m:
                    raise chk.fail(f"{fld}.tool_calls", "plain text turns (tool calls are not supported)")
                role = m.get("role")
                if role not in ("system", "user", "assistant"):
                    raise chk.fail(f"{fld}.role", '"system", "user" or "assistant"', role)
                content = chk.text(m.get("content"), f"{fld}.content")
                if role == "system":
                    if i != 0:
                        raise chk.fail(f"{fld}.role", "a system message only as the first message", role)
                    system = content
                    continue
                notes = {}
                if "weight" in m:
                    if role != "assistant" or m["weight"] not in (0, 1):
                        raise chk.fail(f"{fld}.weight", "0 or 1, on assistant messages only", m["weight"])
                    notes["weight"] = m["weight"]
                turns.append(Turn("patient" if role == "user" else "doctor", content, notes))
            if not turns:
                raise chk.fail("messages", "at least one user or assistant message")
            meta = rec.get("metadata") or {}
            if not isinstance(meta, dict):
                raise chk.fail("metadata", "an object or absent", meta)
            d = Dialogue(
                dialogue_id=chk.opt_str(meta, "dialogue_id", f"{path.name}:{n}"),
                language=chk.opt_str(meta, "language", "und"),
                turns=turns,
                pre_context=chk.pre_context(meta.get("pre_context")),
                disease_tag=chk.opt_str(meta, "disease_tag"),
                system=system,
                source=str(path),
            )
            _labels(d, meta, chk, kb)
            out.append(d)
    if not out:
        raise DialogueFormatError(path, "file", "(lines)", "at least one JSON line with messages")
    return out


def dialogue_metadata(d: Dialogue) -> dict[str, Any]:
    """The labels of a dialogue as the reader's optional fields (for writing files)."""
    return {
        "dialogue_id": d.dialogue_id, "language": d.language, "disease_tag": d.disease_tag,
        "pre_context": d.pre_context, "profile": d.profile, "patient_symptoms": d.symptoms,
        "volunteered_symptoms": d.volunteered, "red_flag": d.red_flag, "red_flag_reasons": d.red_flag_reasons,
        "context_dependent": d.context_dependent, "advice_drugs": d.advice_drugs,
    }


def write_chat_jsonl(dialogues: Sequence[Dialogue], path: str | Path, kb: KnowledgeBase | None = None) -> None:
    """Export dialogues (pre-context in the system turn) for Hugging Face / OpenAI fine-tuning tools."""
    kb = kb or load_kb()
    with open(path, "w", encoding="utf-8") as f:
        for d in dialogues:
            meta = {k: v for k, v in dialogue_metadata(d).items() if v is not None}
            f.write(json.dumps({"messages": to_messages(d, "given", kb), "metadata": meta}, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------
# pre-context in the system turn
def serialize_pre_context(pre_context: dict[str, Any] | None, language: str, kb: KnowledgeBase | None = None) -> str:
    """The pre-context as the system turn states it: fixed field order, one line per given field,
    names in ``language`` (free-text entries unknown to the knowledge base are kept as written)."""
    if not pre_context:
        return ""
    kb = kb or load_kb()
    t = kb.block(language)["pre_context"]
    lines = [t["header"]]
    for k in PRE_CONTEXT_FIELDS:
        if k not in pre_context:
            continue
        v = pre_context[k]
        if k == "age":
            value = str(v)
        elif k == "sex":
            value = t.get(str(v).casefold(), str(v))
        else:
            value = kb.join(kb.names_in(FIELD_LEXICON[k], v, language), language) if v else t["none"]
        lines.append(t[k].format(value=value))
    return "\n".join(lines)


def system_prompt(pre_context: dict[str, Any] | None, language: str, kb: KnowledgeBase | None = None) -> str:
    """The system turn: the doctor's instruction in ``language``, then the pre-context if any."""
    kb = kb or load_kb()
    lang = language if language in LANGUAGES else "en"
    block = serialize_pre_context(pre_context, lang, kb)
    return kb.block(lang)["system"] + ("\n" + block if block else "")


#: the keys a typed pre-context may use, and the field each names
_CONTEXT_KEYS = {"age": "age", "sex": "sex", "gender": "sex", "allergies": "allergies", "allergy": "allergies",
                 "chronic_conditions": "chronic_conditions", "conditions": "chronic_conditions",
                 "medications": "medications", "medicines": "medications", "meds": "medications"}


def parse_pre_context_text(text: str, kb: KnowledgeBase | None = None) -> dict[str, Any]:
    """A pre-context typed by a person (the chat's ``/context``): a JSON object, or
    ``age=54; sex=male; allergies=penicillin, aspirin; medications=warfarin; conditions=asthma``.

    List entries are matched to the knowledge base by any of their names in any language (so they
    serialise in the chat's language); unknown entries are kept as written; ``none`` is an empty list.
    """
    kb = kb or load_kb()
    text = text.strip()
    if text.startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"context: not valid JSON ({err.msg})") from None
        if not isinstance(raw, dict):
            raise ValueError("context: expected a JSON object")
        pairs = [(str(k), v) for k, v in raw.items()]
    else:
        pairs = []
        for part in filter(None, (p.strip() for p in text.split(";"))):
            key, eq, value = part.partition("=")
            if not eq:
                key, eq, value = part.partition(":")
            if not eq:
                raise ValueError(f"context: expected key=value parts separated by ';' (keys {sorted(set(_CONTEXT_KEYS.values()))}), got {part!r}")
            pairs.append((key.strip(), value.strip()))
    out: dict[str, Any] = {}
    for key, value in pairs:
        fld = _CONTEXT_KEYS.get(key.strip().casefold().replace(" ", "_"))
        if fld is None:
            raise ValueError(f"context: unknown key {key!r}; use {sorted(set(_CONTEXT_KEYS.values()))}")
        if fld == "age":
            try:
                out["age"] = int(value)
            except (TypeError, ValueError):
                raise ValueError(f"context: age must be a whole number of years, got {value!r}") from None
        elif fld == "sex":
            out["sex"] = str(value).strip().casefold()
        else:
            items = value if isinstance(value, list) else [v.strip() for v in str(value).split(",")]
            items = [str(v).strip() for v in items if str(v).strip() and str(v).strip().casefold() not in ("none", "no", "-")]
            out[fld] = [kb.lookup(FIELD_LEXICON[fld], v) or v for v in items]
    return _Checker(Path("<context>"), "typed pre-context").pre_context(out)


def to_messages(d: Dialogue, mode: str = "given", kb: KnowledgeBase | None = None) -> list[dict[str, Any]]:
    """Chat messages of a dialogue. ``mode``: ``given`` (pre-context in the system turn), ``asked``
    (no pre-context; the turns in which the doctor asks for it, where the file has them) or
    ``blind`` (no pre-context, same turns). A chat file's own system message is used verbatim."""
    if mode not in PRE_CONTEXT_MODES:
        raise ValueError(f"mode must be one of {PRE_CONTEXT_MODES}, got {mode!r}")
    if d.system is not None:
        system = d.system
    else:
        system = system_prompt(d.pre_context if mode == "given" else None, d.language, kb)
    turns = d.turns_without_pre_context if mode == "asked" and d.turns_without_pre_context else d.turns
    msgs: list[dict[str, Any]] = [{"role": "system", "content": system}]
    for t in turns:
        m = {"role": ROLES[t.role], "content": t.text}
        if "weight" in t.annotations:
            m["weight"] = t.annotations["weight"]
        msgs.append(m)
    return msgs


# --------------------------------------------------------------------------------------------
class DialogueDataset(Dataset):
    """Dialogues as chat items ``{"messages": [...], "meta": {...}}``.

    ``meta``: ``item_id``, ``dialogue_id`` (shared across translations), ``language``, ``disease``
    (knowledge-base id or None), ``disease_tag``, ``symptoms`` (the patient's), ``volunteered``,
    ``asked`` ({symptom: answer}), ``red_flag`` (urgent care indicated), ``red_flag_reasons``,
    ``context_dependent`` (the advice depends on the profile), ``advice_drugs``, ``profile``,
    ``pre_context`` (as the model sees it, None when absent or dropped), ``pre_context_mode``
    (given / asked / blind / none), ``with_pre_context``, ``source``.

    Training (``modes=None``): one item per dialogue; a dialogue that has a pre-context loses it
    with probability ``precontext_dropout``, decided by ``(seed, epoch, item id)`` only, so a
    resumed run drops the same ones; a dropped dialogue uses the doctor-asks turns where the file
    has them (``asked``), else the same turns (``blind``). Index with ``(epoch, i)`` (see
    :class:`EpochTaggedSampler`); a plain ``i`` means epoch 0.
    Evaluation (``modes=("given", "blind")`` etc.): a dialogue with a pre-context appears once per
    mode, one without it once (mode ``none``), so every metric can be split by mode.
    """

    def __init__(self, dialogues: Sequence[Dialogue], kb: KnowledgeBase | None = None, precontext_dropout: float = 0.0,
                 modes: Sequence[str] | None = None, seed: int = 0) -> None:
        if not 0 <= precontext_dropout <= 1:
            raise ValueError(f"precontext_dropout must be in [0, 1], got {precontext_dropout}")
        for m in modes or ():
            if m not in PRE_CONTEXT_MODES:
                raise ValueError(f"pre-context modes must be among {PRE_CONTEXT_MODES}, got {m!r}")
        self.dialogues, self.kb = list(dialogues), kb or load_kb()
        self.dropout, self.seed, self.modes = precontext_dropout, seed, tuple(modes) if modes else None
        self.index: list[tuple[int, str | None]] = []  # (dialogue, fixed mode or None = decide per epoch)
        for j, d in enumerate(self.dialogues):
            if self.modes is None or not self._has_context(d):
                self.index.append((j, None))
            else:
                self.index += [(j, m) for m in self.modes]
        self.ids = [self.dialogues[j].item_id + (f"#{m}" if m else "") for j, m in self.index]

    @staticmethod
    def _has_context(d: Dialogue) -> bool:
        return bool(d.pre_context) and d.system is None

    def dropped(self, i: int, epoch: int = 0) -> bool:
        """Whether training item ``i`` loses its pre-context in ``epoch`` (a pure function of seed, epoch, id)."""
        key = zlib.crc32(self.dialogues[self.index[i][0]].item_id.encode())
        return bool(np.random.default_rng([self.seed, epoch, key]).random() < self.dropout)

    def mode(self, i: int, epoch: int = 0) -> str:
        j, fixed = self.index[i]
        d = self.dialogues[j]
        if not self._has_context(d):  # a chat file's system message is used as written
            return "given" if d.pre_context and d.system is not None else "none"
        if fixed is not None:
            return fixed
        if self.dropout and self.dropped(i, epoch):
            return "asked" if d.turns_without_pre_context else "blind"
        return "given"

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        d = self.dialogues[self.index[i][0]]
        mode = self.mode(i, epoch)
        messages = to_messages(d, "given" if mode == "none" else mode, self.kb)
        meta = {
            "item_id": self.ids[i], "dialogue_id": d.dialogue_id, "language": d.language,
            "disease": d.disease, "disease_tag": d.disease_tag, "symptoms": list(d.symptoms),
            "volunteered": list(d.volunteered), "asked": dict(d.asked), "red_flag": d.red_flag,
            "red_flag_reasons": list(d.red_flag_reasons), "context_dependent": d.context_dependent,
            "advice_drugs": list(d.advice_drugs), "profile": d.profile,
            "pre_context": d.pre_context if mode == "given" else None,
            "pre_context_mode": mode, "with_pre_context": mode == "given", "source": d.source,
        }
        return {"messages": messages, "meta": meta}


class EpochTaggedSampler(EpochSeededSampler):
    """:class:`suite.data.EpochSeededSampler`'s order, yielding ``(epoch, index)`` so the dataset
    can seed per-epoch choices (pre-context dropout) without knowing the trainer."""

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        return ((epoch, i) for i in super().__iter__())


def collate_dialogues(items: list[dict[str, Any]]) -> dict[str, list]:
    """Raw batch: lists of messages and of meta dicts (no tokenisation)."""
    return {"messages": [it["messages"] for it in items], "meta": [it["meta"] for it in items]}


class ChatBatcher:
    """The collate function once a model's tokenizer is known (:meth:`DialogueData.use_tokenizer`).

    Tokenises each item as it is drawn, because pre-context dropout changes an item's messages from
    one epoch to the next: ``suite.chat.encode_chat`` (labels on doctor turns only; a conversation
    longer than ``max_length`` loses whole earliest exchanges, counted per item in
    ``turns_dropped``), then ``ChatCollator`` (right padding). The raw ``messages`` and ``meta``
    stay in the batch for generation-based metrics. A picklable object, so loader workers can use it.
    """

    def __init__(self, tokenizer: Any, max_length: int | None = None) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length
        self.collator = ChatCollator(tokenizer.pad_token_id)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        encoded, dropped = [], []
        for it in items:
            try:
                enc = encode_chat(self.tokenizer, it["messages"], self.max_length)
            except ConversationTooLong as err:
                raise ConversationTooLong(
                    f"dialogue {it['meta']['item_id']}: {err}; raise model.init_args.max_length or keep fewer / "
                    "shorter languages (data.init_args.languages)") from None
            encoded.append({"input_ids": enc.input_ids, "labels": enc.labels})
            dropped.append(enc.turns_dropped)
        batch = self.collator(encoded)
        batch.update(messages=[it["messages"] for it in items], meta=[it["meta"] for it in items],
                     turns_dropped=torch.tensor(dropped))
        return batch


# --------------------------------------------------------------------------------------------
class DialogueData(SuiteDataModule):
    """Multilingual doctor-patient dialogues for MedAidLM.

    Args:
        source: ``generated`` (default: the seeded generator, cached under
            ``data/generated/dialogue/``), ``medaid_json`` (MDDial / MedAidDialog-style JSON) or
            ``chat_jsonl``.
        path: for the file sources, one file (split by dialogue id) or ``{train: ..., val: ...,
            test: ...}`` (a missing ``val`` is carved from ``train`` by dialogue id; a missing
            ``test`` reuses ``val``).
        languages: languages to keep (default all seven); translations of one consultation share
            a dialogue id and land in the same split.
        n_dialogues, generator_seed, precontext_rate, context_case_rate: the generated set
            (consultations, each rendered in every language; see synth.py).
        precontext_dropout: training-time chance that a dialogue's pre-context is dropped,
            seeded per (seed, epoch, item).
        eval_pre_context: modes each validation / test dialogue with a pre-context is shown in
            (``given``, ``asked``, ``blind``; see :class:`DialogueDataset`).
        fractions, split_seed: train / val / test shares of dialogue ids and the split's seed.
        heldout: ``chitchat`` or ``chatterbot``: adds a ``heldout`` split of real conversational
            text (installed wheels, see realtext.py) for perplexity; ``heldout_language`` picks
            chatterbot's language, ``heldout_limit`` caps the number of conversations.

    ``chat_jsonl`` items are used as written (their own system message), so pre-context dropout
    and the eval modes apply only to the JSON sources, whose pre-context is structured.
    """

    #: Tokenisation plugs in here: :meth:`use_tokenizer` sets a :class:`ChatBatcher` (messages ->
    #: input_ids, attention mask and labels that are -100 except on doctor turns). Until then
    #: batches are raw lists.
    collate_fn: Callable[[list[dict[str, Any]]], Any] = staticmethod(collate_dialogues)

    def __init__(
        self,
        source: str = "generated",
        path: str | dict[str, str] | None = None,
        languages: list[str] | None = None,
        n_dialogues: int = 400,
        generator_seed: int = 0,
        precontext_rate: float = 0.7,
        context_case_rate: float = 0.35,
        precontext_dropout: float = 0.3,
        eval_pre_context: list[str] | None = None,
        fractions: dict[str, float] | None = None,
        split_seed: int = 0,
        heldout: str | None = None,
        heldout_language: str = "en",
        heldout_limit: int = 200,
        batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        if source not in ("generated", "medaid_json", "chat_jsonl"):
            raise ValueError(f"source must be 'generated', 'medaid_json' or 'chat_jsonl', got {source!r}")
        if source != "generated" and not path:
            raise ValueError(f"source={source!r} needs `path`: a file, or {{train: file, val: file, test: file}}")
        self.languages = list(languages) if languages else list(LANGUAGES)
        unknown = sorted(set(self.languages) - set(LANGUAGES)) if source == "generated" else []
        if unknown:
            raise ValueError(f"languages {unknown} are not generated; choose from {list(LANGUAGES)}")
        if heldout not in (None, "chitchat", "chatterbot"):
            raise ValueError(f"heldout must be None, 'chitchat' or 'chatterbot', got {heldout!r}")
        self.source, self.path = source, path
        self.n_dialogues, self.generator_seed = n_dialogues, generator_seed
        self.precontext_rate, self.context_case_rate = precontext_rate, context_case_rate
        self.precontext_dropout = precontext_dropout
        self.eval_pre_context = list(eval_pre_context or ["given", "blind"])
        self.fractions = fractions or {"train": 0.8, "val": 0.1, "test": 0.1}
        self.split_seed, self.heldout, self.heldout_limit = split_seed, heldout, heldout_limit
        self.heldout_language = heldout_language
        self.kb = load_kb()
        self.data_files: dict[str, str] = {}

    def use_tokenizer(self, tokenizer: Any, max_length: int | None = None) -> None:
        """Batches from now on are tokenised with the model's tokenizer (the model calls this in ``setup``)."""
        self.collate_fn = ChatBatcher(tokenizer, max_length)

    def generated_path(self) -> Path:
        name = (f"medaid_v{GENERATOR_VERSION}_n{self.n_dialogues}_seed{self.generator_seed}"
                f"_p{self.precontext_rate:g}_c{self.context_case_rate:g}_{self.kb.fingerprint}.json")
        build = lambda tmp: generate_medaid_json(tmp, self.n_dialogues, self.generator_seed, self.precontext_rate,  # noqa: E731
                                                 self.context_case_rate, LANGUAGES, self.kb)
        return cached(generated_dir("dialogue") / name, build)

    def _read(self, path: str | Path) -> list[Dialogue]:
        self.data_files[str(path)] = file_hash(path)
        reader = read_chat_jsonl if self.source == "chat_jsonl" else read_medaid_json
        dialogues = [d for d in reader(path, self.kb) if d.language in self.languages or d.language == "und"]
        if not dialogues:
            raise ValueError(f"{path}: no dialogues in languages {self.languages}")
        return dialogues

    def _split_by_id(self, dialogues: list[Dialogue], fractions: dict[str, float]) -> dict[str, list[Dialogue]]:
        idx = split_by_group([d.dialogue_id for d in dialogues], fractions, self.split_seed)
        return {name: [dialogues[i] for i in ix] for name, ix in idx.items()}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if self.source == "generated":
            parts = self._split_by_id(self._read(self.generated_path()), self.fractions)
        elif isinstance(self.path, str):
            parts = self._split_by_id(self._read(self.path), self.fractions)
        else:
            parts = {name: self._read(p) for name, p in self.path.items()}
            if "val" not in parts:
                val = self.fractions.get("val", 0.1)
                parts.update(self._split_by_id(parts["train"], {"train": 1 - val, "val": val}))
            if "test" not in parts:
                warnings.warn("data.path has no 'test' file: `test` scores the validation split", stacklevel=2)
                parts["test"] = parts["val"]
        for name, dialogues in parts.items():
            if name == "train":
                ds = DialogueDataset(dialogues, self.kb, self.precontext_dropout, None, self.seed)
            else:
                ds = DialogueDataset(dialogues, self.kb, 0.0, self.eval_pre_context, self.seed)
            self.splits[name] = ds
            self.record_split(name, [d.item_id for d in dialogues])
        if self.heldout:
            self._setup_heldout()

    def _setup_heldout(self) -> None:
        from .realtext import RealTextUnavailable, heldout_dialogues

        try:
            convs = heldout_dialogues(self.heldout, self.heldout_language, self.heldout_limit)
        except RealTextUnavailable as err:
            warnings.warn(f"no heldout split: {err}", stacklevel=2)
            return
        self.splits["heldout"] = _RealTextDataset(convs)
        self.record_split("heldout", [c["id"] for c in convs])

    def train_dataloader(self) -> DataLoader:
        ds = self._split("train")
        # resumes inside an epoch at the batch it had reached (the order is a function of (seed, epoch))
        return ResumableDataLoader(ds, batch_size=self.batch_size, sampler=EpochTaggedSampler(len(ds), self.seed),
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          collate_fn=self.collate_fn)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val", collate_fn=self.collate_fn)

    def test_dataloader(self) -> DataLoader:
        return self.loader("test", collate_fn=self.collate_fn)

    def predict_dataloader(self) -> DataLoader:
        return self.loader("predict" if "predict" in self.splits else "test", collate_fn=self.collate_fn)

    def heldout_dataloader(self) -> DataLoader:
        return self.loader("heldout", collate_fn=self.collate_fn)


class _RealTextDataset(Dataset):
    """Real conversations (held-out text for perplexity), in the same item shape."""

    def __init__(self, conversations: list[dict[str, Any]]) -> None:
        self.conversations = conversations

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, i: int) -> dict[str, Any]:
        c = self.conversations[i]
        return {"messages": list(c["messages"]),
                "meta": {"item_id": c["id"], "dialogue_id": c["id"], "language": c["language"], "source": c["source"],
                         "pre_context_mode": "none", "with_pre_context": False}}
