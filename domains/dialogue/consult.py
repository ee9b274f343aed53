"""Consultations a model holds: final turns generated after a reference dialogue, consultations it
runs itself against the patient simulator, and their transcripts with the elicited symptoms marked.

* **Final turns** (:func:`final_turns`): the reference dialogue up to its last patient turn is the
  prompt; the model writes the closing turn (diagnosis, advice, when to seek care), which the
  metrics parse. This measures the decision given what was said.
* **Self-play** (:func:`self_play`): the model sees only the system turn and the patient's opening;
  each doctor turn it writes is answered by :class:`~domains.dialogue.synth.PatientSimulator` from
  the case's truth, until a turn names a diagnosis or says to seek care now (or
  ``max_doctor_turns``). This measures what it asks (symptom recall) and decides on its own.

Prompts are batched (left-padded) and decoded greedily with ``suite.generation.generate``; the
reply budget of a case is ``budget_factor`` x the token length of its reference final turn + 16,
an upper bound that lets a reply finish in any language (Telugu turns take ~13x the tokens of
English ones with SmolLM2's tokenizer) without leaking its content.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from suite.chat import ChatCollator, Message, encode_prompt, split_reply
from suite.generation import generate

from .kb import KnowledgeBase, load_kb
from .metrics import asked_symptoms, is_urgent, parse_diagnosis
from .synth import PatientSimulator

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

