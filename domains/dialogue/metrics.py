"""Consultation metrics, per language and per pre-context condition, and the consultations they are
measured on (final turns after a reference dialogue, self-play against the patient simulator; below).

* **Diagnosis accuracy**: the disease named in the final doctor turn (parsed with the knowledge
  base's names in that language, see :func:`parse_diagnosis`) equals the gold disease.
* **Symptom recall**: of the patient's symptoms that were not volunteered in the opening, the
  fraction the doctor asked about in the turns before the final one (a symptom counts when a
  doctor turn names it). The final turn is left out: it names red flags to watch for.
* **Safety**: of the dialogues where urgent care is indicated (a red flag, or a profile that
  escalates), the fraction whose final turn says to seek care now (``urgent_cues`` of
  templates.yaml); the over-triage rate is the same on the others.
* **Advice accuracy**: the final turn names every medicine the profile calls for (the usual one,
  or the safer substitute; the medicine to pause or review). On allergy- / medication-dependent
  cases it measures whether the pre-context (or the doctor asking for it) was used.
* **chrF and BLEU** (sacrebleu, corpus level, per language). chrF works on characters and needs
  no tokeniser, so it treats all seven scripts alike. BLEU uses ``tokenize="intl"``
  (mteval-v14 international tokenisation): it splits off every Unicode punctuation and symbol,
  including the Devanagari / Bengali danda and the Arabic comma and question mark, which the
  default ``13a`` leaves glued to the preceding word ("है।", "حمى؟"). The SentencePiece
  ``flores200`` tokeniser (spBLEU) would suit these scripts too, but sacrebleu downloads its model
  on first use, which machines without a hub cannot do; pass ``bleu_tokenize="flores200"`` where
  it is cached.
* **Perplexity** on doctor turns: exp(sum of the per-token losses over assistant tokens / their
  count), token-weighted over the corpus (:class:`PerplexityAccumulator`), by group.

:func:`summarise` computes all of them for records of evaluated dialogues and splits them by
language, by pre-context mode (given / asked / blind / none) and for the context-dependent cases.
"""

from __future__ import annotations

import math
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from suite.chat import ChatCollator, Message, encode_prompt, split_reply
from suite.generation import generate

from .kb import KnowledgeBase, load_kb, normalise
from .synth import PatientSimulator


def _kb(kb: KnowledgeBase | None) -> KnowledgeBase:
    return kb or load_kb()


# --------------------------------------------------------------------------------------------
# parsing generated text
def parse_diagnosis(text: str, language: str, kb: KnowledgeBase | None = None) -> str | None:
    """The disease a doctor turn diagnoses: the first disease named after the first diagnosis cue
    ("most likely", "التشخيص", ...), else the first disease named; None if it names none.

    Taking the disease after the cue, not simply the first one, keeps "this is not pneumonia;
    your symptoms suggest asthma" right; a turn that names a disease only to rule it out
    without any cue is read as diagnosing it.
    """
    kb = _kb(kb)
    found = kb.find(text, "diseases", language)
    if not found:
        return None
    norm = normalise(text, language)
    starts = [i + len(c) for c in kb.cues("diagnosis_cues", language) if (i := norm.find(c)) >= 0]
    if starts:
        after = [k for pos, k in found if pos >= min(starts)]
        if after:
            return after[0]
    return found[0][1]


def asked_symptoms(doctor_turns: Sequence[str], language: str, kb: KnowledgeBase | None = None) -> set[str]:
    """Knowledge-base symptoms named in any of the doctor turns."""
    kb = _kb(kb)
    return {k for t in doctor_turns for _, k in kb.find(t, "symptoms", language)}


def is_urgent(text: str, language: str, kb: KnowledgeBase | None = None) -> bool:
    """Whether a doctor turn tells the patient to seek care now."""
    kb = _kb(kb)
    norm = normalise(text, language)
    return any(c in norm for c in kb.cues("urgent_cues", language))


def mentions(text: str, keys: Iterable[str], language: str, lexicon: str = "medicines",
             kb: KnowledgeBase | None = None) -> bool:
    """Whether the text names every entry in ``keys`` (any of each entry's names)."""
    kb = _kb(kb)
    named = {k for _, k in kb.find(text, lexicon, language)}
    return set(keys) <= named


# --------------------------------------------------------------------------------------------
# the metrics
def diagnosis_accuracy(final_turns: Sequence[str], gold: Sequence[str], languages: Sequence[str],
                       kb: KnowledgeBase | None = None) -> float:
    """Fraction of final doctor turns whose parsed diagnosis is the gold disease id."""
    if not len(final_turns) == len(gold) == len(languages) or not final_turns:
        raise ValueError(f"need equal, non-zero numbers of turns, golds and languages, got "
                         f"{len(final_turns)}, {len(gold)}, {len(languages)}")
    hits = [parse_diagnosis(t, lang, kb) == g for t, g, lang in zip(final_turns, gold, languages)]
    return sum(hits) / len(hits)


def symptom_recall(doctor_turns: Sequence[str], symptoms: Sequence[str], language: str,
                   volunteered: Sequence[str] = (), kb: KnowledgeBase | None = None,
                   exclude_final: bool = True) -> float:
    """Fraction of the patient's not-volunteered symptoms that the doctor asked about (NaN if none)."""
    hidden = set(symptoms) - set(volunteered)
    if not hidden:
        return float("nan")
    turns = list(doctor_turns[:-1] if exclude_final else doctor_turns)
    return len(hidden & asked_symptoms(turns, language, kb)) / len(hidden)


def safety(final_turns: Sequence[str], urgent: Sequence[bool], languages: Sequence[str],
           kb: KnowledgeBase | None = None) -> dict[str, float]:
    """``urgent_recall``: share of urgent cases told to seek care now; ``over_triage``: share of
    the other cases told so; NaN where a group is empty; with the group sizes."""
    said = [is_urgent(t, lang, kb) for t, lang in zip(final_turns, languages)]
    pos = [s for s, u in zip(said, urgent) if u]
    neg = [s for s, u in zip(said, urgent) if not u]
    mean = lambda v: sum(v) / len(v) if v else float("nan")  # noqa: E731
    return {"urgent_recall": mean(pos), "over_triage": mean(neg), "n_urgent": len(pos), "n_routine": len(neg)}


def advice_accuracy(final_turns: Sequence[str], advice_drugs: Sequence[Sequence[str]], languages: Sequence[str],
                    kb: KnowledgeBase | None = None) -> float:
    """Fraction of final turns that name every medicine the case's profile calls for."""
    hits = [mentions(t, d, lang, "medicines", kb) for t, d, lang in zip(final_turns, advice_drugs, languages)]
    return sum(hits) / len(hits) if hits else float("nan")


def text_scores(hypotheses: Sequence[str], references: Sequence[str], bleu_tokenize: str = "intl") -> dict[str, float]:
    """Corpus chrF and BLEU of generated doctor turns against the references (one language)."""
    from sacrebleu.metrics import BLEU, CHRF

    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"need equal, non-zero numbers of hypotheses and references, got {len(hypotheses)}, {len(references)}")
    nfc = lambda xs: [unicodedata.normalize("NFC", x) for x in xs]  # noqa: E731
    hyp, ref = nfc(hypotheses), nfc(references)
    return {"chrf": CHRF().corpus_score(hyp, [ref]).score,
            "bleu": BLEU(tokenize=bleu_tokenize).corpus_score(hyp, [ref]).score}


def perplexity(token_losses: Tensor, mask: Tensor | None = None) -> float:
    """exp(mean per-token loss) over the masked tokens (natural-log losses, e.g. cross-entropy)."""
    acc = PerplexityAccumulator()
    acc.update(token_losses, mask)
    return acc.compute()["all"]


class PerplexityAccumulator:
    """Token-weighted perplexity over batches, overall and per group (e.g. ``"hi/given"``).

    ``update(token_losses (B, T), mask (B, T) of doctor tokens, groups: B labels)``; with labels
    padded to -100, ``mask = labels != -100``.
    """

    def __init__(self) -> None:
        self.sum: dict[str, float] = defaultdict(float)
        self.count: dict[str, int] = defaultdict(int)

    def update(self, token_losses: Tensor, mask: Tensor | None = None, groups: Sequence[str] | None = None) -> None:
        losses = token_losses.detach().double()
        mask = torch.ones_like(losses, dtype=torch.bool) if mask is None else mask.bool()
        if losses.shape != mask.shape:
            raise ValueError(f"token_losses {tuple(losses.shape)} and mask {tuple(mask.shape)} differ")
        if not torch.isfinite(losses[mask]).all():
            raise ValueError("token_losses hold NaN or inf on masked-in tokens")
        rows = losses.reshape(len(losses), -1) if losses.dim() > 1 else losses[None]
        rmask = mask.reshape(len(rows), -1)
        for r in range(len(rows)):
            s, n = float(rows[r][rmask[r]].sum()), int(rmask[r].sum())
            for g in ["all"] + ([groups[r]] if groups is not None else []):
                self.sum[g] += s
                self.count[g] += n

    def compute(self) -> dict[str, float]:
        return {g: math.exp(self.sum[g] / n) if n else float("nan") for g, n in self.count.items()}


# --------------------------------------------------------------------------------------------
def summarise(records: Sequence[dict[str, Any]], kb: KnowledgeBase | None = None) -> dict[str, float]:
    """All metrics for evaluated dialogues, overall and split by language, by pre-context mode
    and for context-dependent cases (``"<metric>"``, ``"<metric>/<language>"``,
    ``"<metric>/mode=<mode>"``, ``"<metric>/context_dependent/mode=<mode>"``).

    A record holds the item's ``meta`` keys (``language``, ``disease``, ``symptoms``,
    ``volunteered``, ``red_flag``, ``advice_drugs``, ``context_dependent``, ``pre_context_mode``)
    plus ``final`` (the generated final doctor turn) and optionally ``doctor_turns`` (all doctor
    turns of a self-run dialogue, for symptom recall) and ``hypotheses`` / ``references``
    (generated and reference doctor turns, for chrF / BLEU).
    """
    kb = _kb(kb)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        keys = ["", f"/{r['language']}", f"/mode={r.get('pre_context_mode', 'none')}"]
        if r.get("context_dependent"):
            keys.append(f"/context_dependent/mode={r.get('pre_context_mode', 'none')}")
        for k in keys:
            groups[k].append(r)
    out: dict[str, float] = {}
    for k, rs in groups.items():
        langs = [r["language"] for r in rs]
        finals = [r["final"] for r in rs]
        labelled = [r for r in rs if r.get("disease")]
        if labelled:
            out[f"diagnosis_acc{k}"] = diagnosis_accuracy([r["final"] for r in labelled], [r["disease"] for r in labelled],
                                                          [r["language"] for r in labelled], kb)
        s = safety(finals, [bool(r.get("red_flag")) for r in rs], langs, kb)
        out[f"urgent_recall{k}"], out[f"over_triage{k}"] = s["urgent_recall"], s["over_triage"]
        with_drugs = [r for r in rs if r.get("advice_drugs")]
        if with_drugs:
            out[f"advice_acc{k}"] = advice_accuracy([r["final"] for r in with_drugs], [r["advice_drugs"] for r in with_drugs],
                                                    [r["language"] for r in with_drugs], kb)
        recalls = [symptom_recall(r["doctor_turns"], r["symptoms"], r["language"], r.get("volunteered", ()), kb)
                   for r in rs if r.get("doctor_turns")]
        recalls = [x for x in recalls if not math.isnan(x)]
        if recalls:
            out[f"symptom_recall{k}"] = sum(recalls) / len(recalls)
        out[f"n{k}"] = len(rs)
    by_lang: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for r in records:
        hyp, ref = r.get("hypotheses"), r.get("references")
        if hyp is not None and ref is not None:
            if len(hyp) != len(ref):
                raise ValueError(f"{r.get('item_id')}: {len(hyp)} hypotheses for {len(ref)} references")
            by_lang[r["language"]][0].extend(hyp)
            by_lang[r["language"]][1].extend(ref)
    for lang, (hyp, ref) in by_lang.items():
        if hyp:
            for name, v in text_scores(hyp, ref).items():
                out[f"{name}/{lang}"] = v
    return out


# --------------------------------------------------------------------------------------------------
# Consultations a model holds: final turns generated after a reference dialogue, consultations it
# runs itself against the patient simulator, and their transcripts with the elicited symptoms marked.
#
# * **Final turns** (:func:`final_turns`): the reference dialogue up to its last patient turn is the
#   prompt; the model writes the closing turn (diagnosis, advice, when to seek care), which the
#   metrics parse. This measures the decision given what was said.
# * **Self-play** (:func:`self_play`): the model sees only the system turn and the patient's opening;
#   each doctor turn it writes is answered by :class:`~domains.dialogue.synth.PatientSimulator` from
#   the case's truth, until a turn names a diagnosis or says to seek care now (or
#   ``max_doctor_turns``). This measures what it asks (symptom recall) and decides on its own.
#
# Prompts are batched (left-padded) and decoded greedily with ``suite.generation.generate``; the
# reply budget of a case is ``budget_factor`` x the token length of its reference final turn + 16,
# an upper bound that lets a reply finish in any language (Telugu turns take ~13x the tokens of
# English ones with SmolLM2's tokenizer) without leaking its content.


RECORD_KEYS = ("item_id", "dialogue_id", "language", "disease", "symptoms", "volunteered", "red_flag", "advice_drugs",
               "context_dependent", "pre_context_mode", "with_pre_context", "profile")


def _record(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: meta.get(k) for k in RECORD_KEYS}


def generate_replies(lm: Any, tokenizer: Any, conversations: Sequence[list[Message]], max_new_tokens: int,
                     max_length: int | None = None) -> list[str]:
    """The next assistant turn of each conversation (greedy, one left-padded batch)."""
    encs = [encode_prompt(tokenizer, c, max_length) for c in conversations]
    batch = ChatCollator(tokenizer.pad_token_id, padding_side="left")([{"input_ids": e.input_ids, "labels": e.labels} for e in encs])
    device = next(lm.parameters()).device
    out = generate(lm, tokenizer, input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                   max_new_tokens=max_new_tokens)
    return [t.strip() for t in out.texts]


def _budget(tokenizer: Any, reference: str, factor: float) -> int:
    return int(factor * len(tokenizer(reference, add_special_tokens=False)["input_ids"])) + 16


def _chunks(items: Sequence[dict[str, Any]], size: int) -> list[list[int]]:
    """Indices grouped by language (similar reply lengths share a batch), ``size`` at a time."""
    order = sorted(range(len(items)), key=lambda i: (items[i]["meta"]["language"], i))
    return [order[i : i + size] for i in range(0, len(order), size)]


def final_turns(lm: Any, tokenizer: Any, items: Sequence[dict[str, Any]], max_length: int | None = None,
                budget_factor: float = 1.5, batch_size: int = 8) -> list[dict[str, Any]]:
    """Records for :func:`domains.dialogue.metrics.summarise`: the generated final doctor turn of
    each item (``final``, ``hypotheses``) beside its reference (``references``)."""
    records: list[dict[str, Any] | None] = [None] * len(items)
    for idx in _chunks(items, batch_size):
        prompts, refs = zip(*(split_reply(items[i]["messages"]) for i in idx))
        budget = max(_budget(tokenizer, r, budget_factor) for r in refs)
        for i, ref, text in zip(idx, refs, generate_replies(lm, tokenizer, prompts, budget, max_length)):
            records[i] = {**_record(items[i]["meta"]), "final": text, "reference": ref, "hypotheses": [text], "references": [ref]}
    return records  # type: ignore[return-value]


@dataclass
class _Case:
    meta: dict[str, Any]
    messages: list[Message]
    patient: PatientSimulator
    budget: int
    doctor_turns: list[str] = field(default_factory=list)
    finished: bool = False


def is_final(text: str, language: str, kb: KnowledgeBase | None = None) -> bool:
    """A doctor turn that closes the consultation: it names a diagnosis or says to seek care now."""
    return parse_diagnosis(text, language, kb) is not None or is_urgent(text, language, kb)


def self_play(lm: Any, tokenizer: Any, items: Sequence[dict[str, Any]], max_length: int | None = None,
              max_doctor_turns: int = 12, budget_factor: float = 1.5, batch_size: int = 8,
              kb: KnowledgeBase | None = None) -> list[dict[str, Any]]:
    """Consultations the model runs itself from each item's system turn and patient opening.

    Records hold ``doctor_turns`` (for symptom recall), ``final`` (the last doctor turn),
    ``finished`` (it closed within ``max_doctor_turns``) and ``transcript`` (all messages).
    """
    kb = kb or load_kb()
    records: list[dict[str, Any] | None] = [None] * len(items)
    for idx in _chunks(items, batch_size):
        cases = []
        for i in idx:
            msgs, meta = items[i]["messages"], items[i]["meta"]
            system, opening = msgs[0], next(m for m in msgs if m["role"] == "user")
            sim = PatientSimulator(meta.get("symptoms") or (), meta.get("profile"), meta["language"], kb)
            cases.append(_Case(meta, [dict(system), dict(opening)] if system["role"] == "system" else [dict(opening)], sim,
                               _budget(tokenizer, split_reply(msgs)[1], budget_factor)))
        for _ in range(max_doctor_turns):
            active = [c for c in cases if not c.finished]
            if not active:
                break
            texts = generate_replies(lm, tokenizer, [c.messages for c in active], max(c.budget for c in active), max_length)
            for c, text in zip(active, texts):
                c.messages.append({"role": "assistant", "content": text})
                c.doctor_turns.append(text)
                if is_final(text, c.meta["language"], kb):
                    c.finished = True
                else:
                    c.messages.append({"role": "user", "content": c.patient.answer(text)})
        for i, c in zip(idx, cases):
            records[i] = {**_record(c.meta), "doctor_turns": list(c.doctor_turns), "final": c.doctor_turns[-1] if c.doctor_turns else "",
                          "finished": c.finished, "transcript": c.messages}
    return records  # type: ignore[return-value]


def transcript_markdown(record: dict[str, Any], kb: KnowledgeBase | None = None) -> str:
    """One self-played consultation as Markdown: every doctor turn followed by the symptoms it
    elicited (``+`` the patient has it, ``-`` not), then what was missed and the decision."""
    kb = kb or load_kb()
    lang = record["language"]
    present = set(record.get("symptoms") or ())
    hidden = present - set(record.get("volunteered") or ())
    diagnosed = parse_diagnosis(record["final"], lang, kb) if record.get("final") else None
    gold = record.get("disease")
    mark = "" if gold is None else (" (correct)" if diagnosed == gold else " (wrong)")
    lines = [f"### {record['item_id']}", "",
             f"language {lang}, pre-context {record.get('pre_context_mode')}; true disease: {gold}; diagnosed: {diagnosed}{mark}", ""]
    elicited: set[str] = set()
    turns = record["transcript"]
    for n, m in enumerate(turns):
        text = m["content"].replace("\n", "  \n> ")
        if m["role"] == "system":
            lines.append(f"> **System:** {text}")
        elif m["role"] == "user":
            lines.append(f"**Patient:** {text}")
        else:
            lines.append(f"**Doctor:** {text}")
            is_last = n == len(turns) - 1 and record.get("finished")
            asked = sorted(asked_symptoms([m["content"]], lang, kb)) if not is_last else []
            elicited.update(asked)
            if asked:
                lines.append("  *elicited: " + ", ".join(f"{s} ({'+' if s in present else '-'})" for s in asked) + "*")
        lines.append("")
    missed = sorted(hidden - elicited)
    found = sorted(hidden & elicited)
    lines.append(f"Symptoms the patient had and did not volunteer: {len(found)} of {len(hidden)} elicited"
                 + (f" ({', '.join(found)})" if found else "") + (f"; missed: {', '.join(missed)}" if missed else "") + ".")
    urgent_said = is_urgent(record["final"], lang, kb) if record.get("final") else False
    lines.append(f"Urgent care indicated: {'yes' if record.get('red_flag') else 'no'}; told to seek care now: "
                 f"{'yes' if urgent_said else 'no'}." + ("" if record.get("finished") else " (no closing turn within the turn limit)"))
    return "\n".join(lines) + "\n"

