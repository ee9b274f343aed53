"""Text generation shared by ``predict`` steps and a terminal chat: greedy or sampled decoding with
a KV cache, stopping at the end of the turn, streaming decoded text to a callback.

    out = generate(lm, tok, input_ids=ids, attention_mask=mask, max_new_tokens=64)      # greedy
    out = generate(lm, tok, inputs_embeds=embeds, attention_mask=mask, do_sample=True, seed=0)
    reply = chat_reply(lm, tok, messages, on_text=lambda piece: print(piece, end="", flush=True))

Decoding is Hugging Face's ``model.generate`` (KV cache on by default); this module fixes the parts
every caller would otherwise repeat: stop ids from the chat tokenizer (end of turn and EOS), one
explicit generation config (so a model folder's generation_config.json cannot switch sampling on
behind the caller's back), eval mode for the call, seeded sampling, only the new tokens returned
(without the stop token), and incremental detokenisation that never emits half a UTF-8 character. A vision-language model passes its prompt
as ``inputs_embeds`` (image tokens spliced into the text embeddings) with an ``attention_mask``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from suite.chat import Message, encode_prompt, end_of_turn_ids


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per row, the stop token and padding after it removed
    texts: list[str]
    stopped: list[bool]  # True: the row ended its turn; False: max_new_tokens ran out first


class _TextCallback:
    """A transformers streamer: decodes the new tokens of a single row and hands out text pieces."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None], stop_ids: list[int]) -> None:
        self.tokenizer, self.on_text, self.stop_ids = tokenizer, on_text, set(stop_ids)
        self.tokens: list[int] = []
        self.emitted = ""
        self.prompt_seen = False
        self.done = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        for t in value.reshape(-1).tolist():
            if self.done or t in self.stop_ids:
                self.done = True
                return
            self.tokens.append(t)
        text = _decode(self.tokenizer, self.tokens)
        if not text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its other bytes
            self._emit(text)

    def end(self) -> None:
        self._emit(_decode(self.tokenizer, self.tokens))

    def _emit(self, text: str) -> None:
        if text.startswith(self.emitted) and len(text) > len(self.emitted):
            self.on_text(text[len(self.emitted) :])
            self.emitted = text


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop_token_ids: Sequence[int] | None = None,
    on_text: Callable[[str], None] | None = None,
    use_cache: bool = True,
    **generate_kwargs: Any,
) -> Generation:
    """Continue a batch of prompts (token ids, or embeddings for a vision-language model).

    Left-pad batched prompts (``ChatCollator(padding_side="left")``) and pass their attention mask.
    ``stop_token_ids`` default to the tokenizer's end of turn and EOS. ``on_text`` receives the
    decoded text piece by piece (batch size 1); the pieces concatenate to ``texts[0]``. ``seed``
    makes sampling reproducible without touching the caller's RNG. Extra keyword arguments go to
    ``model.generate`` (e.g. ``logits_processor``, ``repetition_penalty``).
    """
    from transformers import GenerationConfig

    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids and inputs_embeds")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompt = input_ids if input_ids is not None else inputs_embeds
    if on_text is not None and prompt.shape[0] != 1:
        raise ValueError(f"streaming with on_text decodes one conversation at a time; got a batch of {prompt.shape[0]}")
    stop = list(stop_token_ids) if stop_token_ids is not None else end_of_turn_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else {}
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=stop, pad_token_id=pad, use_cache=use_cache, **sampling
    )
    extra = config.update(**generate_kwargs)  # generation settings join the config; the rest go to generate()
    streamer = _TextCallback(tokenizer, on_text, stop) if on_text is not None else None
    inputs = {"input_ids": input_ids} if input_ids is not None else {"inputs_embeds": inputs_embeds}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask
    modes = [(m, m.training) for m in model.modules()]
    device = prompt.device
    try:
        model.eval()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            out = model.generate(**inputs, generation_config=config, streamer=streamer, **extra)
    finally:
        for m, mode in modes:
            m.training = mode
    new = out[:, input_ids.shape[1] :] if input_ids is not None else out  # embeds in: only new tokens out
    tokens, stopped = [], []
    for row in new.tolist():
        cut = next((i for i, t in enumerate(row) if t in stop), None)
        tokens.append(row if cut is None else row[:cut])
        stopped.append(cut is not None)
    return Generation(tokens, [_decode(tokenizer, t) for t in tokens], stopped)


def chat_reply(
    model: Any,
    tokenizer: Any,
    messages: Sequence[Message],
    max_prompt_length: int | None = None,
    **kwargs: Any,
) -> str:
    """The model's next assistant turn for one conversation that ends with a user message."""
    enc = encode_prompt(tokenizer, messages, max_prompt_length)
    device = next(model.parameters()).device
    ids = torch.tensor([enc.input_ids], device=device)
    return generate(model, tokenizer, input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).texts[0]


def chat_loop(
    model: Any,
    tokenizer: Any,
    system: str | None = None,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] = lambda s: print(s, end="", flush=True),
    **kwargs: Any,
) -> list[Message]:
    """A terminal chat: read a user line, stream the reply, until an empty line or end of input.

    Returns the conversation. Extra keyword arguments go to :func:`generate`.
    """
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = read("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        reply = chat_reply(model, tokenizer, messages, on_text=write, **kwargs)
        write("\n")
        messages.append({"role": "assistant", "content": reply})
    return messages
