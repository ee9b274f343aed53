"""Scoring a causal LM on facts and text: exact match of generated answers, multiple-choice
log-likelihood, perplexity; and a split forward that computes the frozen lower layers once.

Every method of ``benchmarks/llm_adapters.py`` adapts (or fully trains) the same top blocks of
the LM and leaves the blocks below them frozen, so the input of the first adapted block is the
same for every method and every step: :class:`SplitLM` computes it once per sequence
(:meth:`SplitLM.cache`), and training and scoring run the top blocks on it. The result is what
the whole LM computes (``tests/benchmarks/test_llm_adapters.py`` checks it against the model's own
forward); only generation runs the model end to end, as a user would.

Log-likelihoods are computed only where a label is set (``labels != -100``): the vocabulary
projection of the other positions, a fifth of SmolLM2's forward, is never needed. We write these
few functions rather than use lm-evaluation-harness because the benchmark scores chat-formatted
items with assistant-only labels on cached hidden states, which that harness has no hook for.
"""

from __future__ import annotations

import contextlib
import math
import re
import string
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from suite.chat import IGNORE_INDEX, ChatCollator, encode_chat, encode_prompt

from benchmarks.facts import MCItem, Question


@dataclass
class Encoded:
    """A tokenised sequence with its labels and, once cached, the input of the first top block."""

    input_ids: list[int]
    labels: list[int]
    hidden: torch.Tensor | None = None  # (len, d) on the model's device

    def __len__(self) -> int:
        return len(self.input_ids)


def chat_encoding(tokenizer: Any, messages: list[dict[str, str]]) -> Encoded:
    enc = encode_chat(tokenizer, messages)
    return Encoded(enc.input_ids, enc.labels)


def option_encodings(tokenizer: Any, items: Sequence[MCItem], system: str) -> list[Encoded]:
    """For each item, for each option in order: the conversation answered with that option
    (labels on the option and the end-of-turn token: the score is the probability that the whole reply is the option)."""
    out = []
    for it in items:
        for opt in it.options:
            out.append(chat_encoding(tokenizer, [{"role": "system", "content": system},
                                                 {"role": "user", "content": it.question.text},
                                                 {"role": "assistant", "content": opt}]))
    return out


class SplitLM:
    """A Llama-style Hugging Face causal LM as two parts: blocks ``[0, split)`` and blocks
    ``[split, L)`` + final norm + ``lm_head``. Works on the model PEFT wraps (pass ``get_base_model()``)."""

    def __init__(self, lm: Any, split: int) -> None:
        self.lm, self.inner, self.split = lm, lm.model, split
        n = len(self.inner.layers)
        if not 0 <= split < n:
            raise ValueError(f"split must be in [0, {n}) for a model with {n} blocks, got {split}")

    def _run(self, h: torch.Tensor, attention_mask: torch.Tensor, blocks: Iterable[torch.nn.Module]) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        pos = torch.arange(h.shape[1], device=h.device)[None]
        mask = create_causal_mask(config=self.inner.config, inputs_embeds=h, attention_mask=attention_mask,
                                  cache=None, position_ids=pos)
        rope = self.inner.rotary_emb(h, position_ids=pos)
        for block in blocks:
            h = block(h, attention_mask=mask, position_embeddings=rope, position_ids=pos)
        return h

    @torch.no_grad()
    def bottom(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The input of block ``split`` (right-padded batches: real tokens never see the padding)."""
        return self._run(self.inner.embed_tokens(input_ids), attention_mask, self.inner.layers[: self.split])

    def top(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final normalised hidden states from the input of block ``split``."""
        return self.inner.norm(self._run(hidden, attention_mask, self.inner.layers[self.split :]))

    def cache(self, encs: Sequence[Encoded], batch_size: int = 32, precision: Callable[[], Any] = contextlib.nullcontext) -> None:
        """Fill ``enc.hidden`` for every sequence (batched by length)."""
        order = sorted(range(len(encs)), key=lambda i: len(encs[i]))
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            ids, mask, _ = pad_tokens([encs[i] for i in idx], pad_id=0)
            with precision():
                h = self.bottom(ids, mask)
            for row, i in enumerate(idx):
                encs[i].hidden = h[row, : len(encs[i])].clone()


def pad_tokens(encs: Sequence[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding)."""
    n = max(len(e) for e in encs)
    ids = torch.full((len(encs), n), pad_id, dtype=torch.long)
    labels = torch.full((len(encs), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(encs), n), dtype=torch.long)
    for r, e in enumerate(encs):
        ids[r, : len(e)] = torch.tensor(e.input_ids)
        labels[r, : len(e)] = torch.tensor(e.labels)
        mask[r, : len(e)] = 1
    return ids, mask, labels


def pad_hidden(encs: Sequence[Encoded]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded cached hidden states ``(B, L, d)``, ``attention_mask`` and ``labels``."""
    if any(e.hidden is None for e in encs):
        raise ValueError("a sequence has no cached hidden state: call SplitLM.cache on it first")
    n = max(len(e) for e in encs)
    h0 = encs[0].hidden
    hidden = h0.new_zeros(len(encs), n, h0.shape[-1])
    for r, e in enumerate(encs):
        hidden[r, : len(e)] = e.hidden
    _, mask, labels = pad_tokens(encs, pad_id=0)
    return hidden, mask, labels


def labelled_nll(model: SplitLM, hidden: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the summed negative log-likelihood of its labelled tokens, and their count.

    Token ``t + 1`` is predicted from position ``t``; only labelled positions reach ``lm_head``.
    """
    h = model.top(hidden, attention_mask)
    target = labels[:, 1:]
    sel = target != IGNORE_INDEX
    logits = model.lm.lm_head(h[:, :-1][sel]).float()
    tok = F.cross_entropy(logits, target[sel], reduction="none")
    rows = sel.nonzero()[:, 0]
    nll = torch.zeros(labels.shape[0], dtype=tok.dtype, device=tok.device).index_add(0, rows, tok)
    return nll, sel.sum(1)


@torch.no_grad()
def sequence_nll(model: SplitLM, encs: Sequence[Encoded], batch_size: int = 64,
                 precision: Callable[[], Any] = contextlib.nullcontext) -> tuple[list[float], list[int]]:
    """``(summed NLL, labelled tokens)`` of every cached sequence, in order."""
    nll, count = [0.0] * len(encs), [0] * len(encs)
    order = sorted(range(len(encs)), key=lambda i: len(encs[i]))
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        with precision():
            n, c = labelled_nll(model, *pad_hidden([encs[i] for i in idx]))
        for j, i in enumerate(idx):
            nll[i], count[i] = float(n[j]), int(c[j])
    return nll, count


def perplexity(nll: Sequence[float], count: Sequence[int]) -> float:
    """``exp(total NLL / total labelled tokens)``: every token weighs the same, whatever its sequence."""
    tokens = sum(count)
    if tokens == 0:
        raise ValueError("perplexity of no labelled tokens")
    return math.exp(sum(nll) / tokens)


def mc_choices(option_loglik: Sequence[float], n_options: int) -> list[int]:
    """The chosen option of each item (the highest log-likelihood; the first on ties), from item-major scores."""
    if len(option_loglik) % n_options:
        raise ValueError(f"{len(option_loglik)} scores do not split into items of {n_options} options")
    out = []
    for i in range(0, len(option_loglik), n_options):
        row = option_loglik[i : i + n_options]
        out.append(max(range(n_options), key=lambda k: (row[k], -k)))
    return out


@dataclass
class MCResult:
    accuracy: float
    correct: list[bool]
    gold_loglik: list[float]  # log-likelihood of each item's gold answer


def score_mc(model: SplitLM, items: Sequence[MCItem], encs: Sequence[Encoded], batch_size: int = 64,
             precision: Callable[[], Any] = contextlib.nullcontext) -> MCResult:
    """Multiple choice by log-likelihood: ``encs`` are :func:`option_encodings` of ``items`` (cached)."""
    k = len(items[0].options) if items else 0
    if len(encs) != k * len(items) or any(len(it.options) != k for it in items):
        raise ValueError(f"{len(encs)} option encodings for {len(items)} items of {k} options")
    nll, _ = sequence_nll(model, encs, batch_size, precision)
    ll = [-x for x in nll]
    choice = mc_choices(ll, k)
    correct = [c == it.label for c, it in zip(choice, items)]
    gold = [ll[i * k + it.label] for i, it in enumerate(items)]
    return MCResult(sum(correct) / max(len(items), 1), correct, gold)


# --- exact match of generated answers ----------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def exact_match(prediction: str, answer: str) -> bool:
    """The reply's first line equals the answer after :func:`normalize_answer`."""
    first = prediction.strip().split("\n", 1)[0] if prediction.strip() else ""
    return normalize_answer(first) == normalize_answer(answer)


@torch.no_grad()
def generate_answers(lm: Any, tokenizer: Any, questions: Sequence[Question], system: str, batch_size: int = 32,
                     max_new_tokens: int = 12, precision: Callable[[], Any] = contextlib.nullcontext) -> list[str]:
    """Greedy replies of the whole model to each question (left-padded batches, KV cache)."""
    from suite.generation import generate

    prompts = [encode_prompt(tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": q.text}])
               for q in questions]
    collate = ChatCollator(tokenizer.pad_token_id, padding_side="left")
    out = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        batch = collate([{"input_ids": prompts[i].input_ids, "labels": prompts[i].labels} for i in idx])
        with precision():
            gen = generate(lm, tokenizer, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           max_new_tokens=max_new_tokens)
        for j, i in enumerate(idx):
            out[i] = gen.texts[j]
    return out
