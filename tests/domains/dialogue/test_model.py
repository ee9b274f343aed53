"""MedAidLM: the loss on doctor tokens only (against the LM's own full-logit loss), pre-context
dropout reaching the model in training, the metrics wired to generated text (an oracle doctor),
the chat's pre-context hook, and the adapters and the NF4 base a YAML away."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import lightning as L
import pytest
import torch

import domains.dialogue.metrics as consult  # the consultations a model holds live beside their metrics
from domains.dialogue.data import DialogueData, parse_pre_context_text
from domains.dialogue.metrics import symptom_recall
from domains.dialogue.model import MedAidLM, act_token_weights, doctor_token_losses
from suite.adapters import AdapterLayer, adapter_layers
from suite.chat import IGNORE_INDEX
from suite.cli import main
from tests.suite.test_chat import labelled_runs

ROOT = Path(__file__).resolve().parents[3]
BASE = str(ROOT / "domains" / "dialogue.yaml")
#: the tiny random Llama + fallback BPE, 24 consultations in English, one short epoch
TINY = ["--model.init_args.backbone", "tiny", "--model.init_args.num_layers", "2", "--data.init_args.n_dialogues", "24", "--data.init_args.batch_size", "4",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", "--trainer.logger", "false",
        "--checkpoint.save_last", "false", "--checkpoint.save_top_k", "0"]


@pytest.fixture(scope="module")
def model():
    return MedAidLM(backbone="tiny", eval_cases=None, test_cases=None, selfplay_cases=6)


@pytest.fixture(scope="module")
def dm(model):
    # a large test share with many profile-dependent cases: 34 test items, 14 context-dependent without their pre-context
    data = DialogueData(languages=["en", "hi"], n_dialogues=30, context_case_rate=0.9, batch_size=4,
                        fractions={"train": 0.6, "val": 0.1, "test": 0.3})
    data.setup()
    data.use_tokenizer(model.tokenizer, model.max_length)
    return data


def test_loss_is_on_doctor_tokens_only(model, dm):
    batch = next(iter(dm.val_dataloader()))
    tok = model.tokenizer
    for r, msgs in enumerate(batch["messages"]):  # labelled tokens are exactly the doctor turns (+ end of turn)
        runs = [tok.decode(run) for run in labelled_runs(batch["labels"][r].tolist())]
        assert runs == [m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant"]
    losses, sel = doctor_token_losses(model.lm, batch)
    assert sel.sum() == (batch["labels"] != IGNORE_INDEX).sum() == len(losses)
    with torch.no_grad():  # reference: the LM's own loss over its full logits (shifted, -100 ignored)
        ref = model.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(losses.mean(), ref, rtol=1e-5, atol=1e-5)  # fp32 round-off
    torch.testing.assert_close(model.compute_losses(batch)["loss"], ref, rtol=1e-5, atol=1e-5)
    assert (batch["turns_dropped"] == 0).all()


def test_act_tokens_weigh_the_first_tokens_of_every_doctor_turn(model, dm):
    batch = next(iter(dm.val_dataloader()))
    _, sel = doctor_token_losses(model.lm, batch)
    w = act_token_weights(sel, 3, 5.0)
    target = batch["labels"][:, 1:]
    for r in range(len(batch["meta"])):  # reference: walk each row's labelled runs by hand
        expect, run = [], 0
        for t in range(target.shape[1]):
            run = run + 1 if target[r, t] != IGNORE_INDEX else 0
            if run:
                expect.append(5.0 if run <= 3 else 1.0)
        row = w[sel.nonzero()[:, 0] == r]
        assert row.tolist() == expect
        doctor_turns = sum(m["role"] == "assistant" for m in batch["messages"][r])
        assert (row == 5.0).sum() == 3 * doctor_turns  # every doctor turn is longer than 3 tokens
    losses, _ = doctor_token_losses(model.lm, batch)
    weighted = MedAidLM(backbone="tiny", act_weight=5.0, act_tokens=3)
    weighted.load_state_dict(model.state_dict())
    out = weighted.compute_losses(batch)
    torch.testing.assert_close(out["loss"], (w * losses).sum() / w.sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["token_loss"], losses.mean(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="act_weight must be > 0"):
        MedAidLM(backbone="tiny", act_weight=0.0)


def test_precontext_dropout_reaches_the_model(tmp_path):
    seen: list[tuple[int, str, str, str]] = []

    class Spy(MedAidLM):
        def compute_losses(self, batch):
            for row, meta in enumerate(batch["meta"]):
                text = self.tokenizer.decode(batch["input_ids"][row][batch["attention_mask"][row].bool()])
                seen.append((self.current_epoch, meta["item_id"], meta["pre_context_mode"], text))
            return super().compute_losses(batch)

    model = Spy(backbone="tiny", eval_cases=0)
    data = DialogueData(languages=["en"], n_dialogues=24, precontext_dropout=0.5, batch_size=8)
    trainer = L.Trainer(max_epochs=2, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, data)
    with_context = [s for s in seen if s[2] != "none"]
    assert len({s[1] for s in seen}) == len(data.splits["train"]) and len(with_context) >= 20
    dropped = [s for s in with_context if s[2] != "given"]
    assert 0.3 <= len(dropped) / len(with_context) <= 0.7  # the YAML's rate, 0.5 here
    for _, _, mode, text in with_context:  # what the LM read: the pre-context in the system turn or not
        assert ("Patient information:" in text) == (mode == "given")
        if mode == "asked":  # a dropped pre-context is asked for by the doctor instead
            assert "Are you allergic to any medicines?" in text or "Do you have any drug allergies?" in text
    by_epoch = [{s[1]: s[2] for s in with_context if s[0] == e} for e in (0, 1)]
    assert by_epoch[0] != by_epoch[1]  # drawn again each epoch
    assert 0.0 <= float(trainer.callback_metrics["train/precontext_dropped"]) <= 1.0


def _oracle(items):
    """A doctor that replays each case's reference turns: the k-th doctor turn of the case whose
    system turn and opening start the conversation."""
    ref = {}
    for it in items:
        msgs = it["messages"]
        ref[(msgs[0]["content"], msgs[1]["content"])] = [m["content"] for m in msgs if m["role"] == "assistant"]

    def generate_replies(lm, tokenizer, conversations, max_new_tokens, max_length=None):
        return [ref[(c[0]["content"], c[1]["content"])][sum(m["role"] == "assistant" for m in c)] for c in conversations]

    return generate_replies


def test_metrics_are_wired_to_the_generated_turns(model, dm, monkeypatch, tmp_path):
    items = [dm.splits["test"][i] for i in range(len(dm.splits["test"]))]
    monkeypatch.setattr(consult, "generate_replies", _oracle(items))
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    m = {k: float(v) for k, v in trainer.test(model, dm, verbose=False)[0].items()}
    assert m["test/diagnosis_acc"] == 1.0 and m["test/advice_acc"] == 1.0 and m["test/over_triage"] == 0.0
    assert m["test/advice_acc/context_dependent/mode=blind"] == 1.0  # the oracle knows what the pre-context said
    assert m["test/n/context_dependent/mode=blind"] == 14
    for lang in ("en", "hi"):
        assert m[f"test/chrf/{lang}"] == pytest.approx(100.0) and m[f"test/bleu/{lang}"] == pytest.approx(100.0)
        assert math.isfinite(m[f"test/ppl/{lang}"]) and m[f"test/ppl/{lang}"] > 1
    assert m["test/urgent_recall"] == 1.0 and sum(it["meta"]["red_flag"] for it in items) == 4
    # self-play: the oracle asks what the reference doctor asked; the simulator answers from the case
    played = [it for it in items if it["meta"]["item_id"] in model._chosen["selfplay"]]
    assert len(played) == 6 and m["test/selfplay/diagnosis_acc"] == 1.0
    recalls = [symptom_recall([x["content"] for x in it["messages"] if x["role"] == "assistant"], it["meta"]["symptoms"],
                              it["meta"]["language"], it["meta"]["volunteered"]) for it in played]
    recalls = [r for r in recalls if not math.isnan(r)]
    assert m["test/symptom_recall"] == pytest.approx(sum(recalls) / len(recalls))
    # and the reference doctor asks about every symptom it knows of (the generator's naive-Bayes questions)
    for it in played:
        hidden = set(it["meta"]["symptoms"]) - set(it["meta"]["volunteered"])
        assert hidden & set(it["meta"]["asked"]) <= consult.asked_symptoms(
            [x["content"] for x in it["messages"] if x["role"] == "assistant"][:-1], it["meta"]["language"])
    records = consult.self_play(model.lm, model.tokenizer, played[:1])
    text = consult.transcript_markdown(records[0])
    assert "*elicited: " in text and "(correct)" in text and text.count("**Doctor:**") == len(records[0]["doctor_turns"])


def test_chat_hook_serialises_a_typed_pre_context(model):
    pre = parse_pre_context_text("age=54; sex=Male; allergies=penicillin, पेनिसिलिन; medications=warfarin; conditions=none")
    assert pre == {"age": 54, "sex": "male", "allergies": ["penicillin", "penicillin"], "chronic_conditions": [],
                   "medications": ["warfarin"]}
    assert parse_pre_context_text('{"age": 30, "allergies": ["sulfa drugs"]}') == {"age": 30, "allergies": ["sulfa drugs"]}
    hi = model.chat_system_prompt("age=54; allergies=penicillin", "hi")
    assert hi.startswith("आप एक सावधान डॉक्टर") and "मरीज़ की जानकारी:" in hi and "उम्र: 54" in hi
    assert "Patient information:" not in model.chat_system_prompt(None, "en")
    for bad, msg in (("weight=80", "unknown key 'weight'"), ("age=old", "age must be a whole number"), ("penicillin", "key=value")):
        with pytest.raises(ValueError, match=msg):
            model.chat_system_prompt(bad, "en")


@pytest.mark.parametrize("preset, args", [
    ("lora", []), ("dora", ["--config", "configs/adapters/dora.yaml"]), ("mica", ["--config", "configs/adapters/mica.yaml"]),
    # the tiny LM's 64-wide layers (32-wide k/v) take 4 spectral bands of 4 rows (SmolLM2's 576-wide ones the preset's 16)
    ("fourier_moe", ["--config", "configs/adapters/fourier_moe.yaml", "--model.init_args.adapter.init_args.rows", "4"]),
    ("cg_lora", ["--config", "configs/adapters/cg_lora.yaml"]),
    ("nf4", ["--model.init_args.quantize", "nf4"]),
])
def test_adapters_and_the_nf4_base_are_a_yaml_away(preset, args, tmp_path):
    """Each preset composed after the domain YAML builds MedAidLM with that method on every Linear
    layer but the LM head, and one optimiser step on a batch moves the adapters only (test_run fits
    the default LoRA end to end through the CLI)."""
    args = [a if not a.startswith("configs/") else str(ROOT / a) for a in args]
    cli = main(["--config", BASE, *args, *TINY, "--trainer.default_root_dir", str(tmp_path)], run=False)
    model, data = cli.model, cli.datamodule
    layers = dict(adapter_layers(model.lm))
    linear = [n for n, mod in model.lm.named_modules() if isinstance(mod, torch.nn.Linear) and not isinstance(mod, AdapterLayer)
              and n != "lm_head" and ".base_layer" not in n and not any(n.startswith(a + ".") for a in layers)]
    assert not linear and "lm_head" not in layers and len(layers) == 7 * model.lm.config.num_hidden_layers  # q k v o gate up down
    from suite.adapters import CGLoRA, FourierMoE, LoRA, MiCA

    spec = {"lora": LoRA, "dora": LoRA, "mica": MiCA, "fourier_moe": FourierMoE, "cg_lora": CGLoRA, "nf4": LoRA}[preset]
    assert type(model.adapter) is spec and getattr(model.adapter, "dora", False) == (preset == "dora")
    assert model.adapter.targets == "all-linear"  # the preset changed the method, the domain kept its targets
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".base_layer." not in n and n.split(".")[0] == "backbone" for n in trained)
    if preset == "nf4":
        from suite.quant import NF4Linear

        assert all(isinstance(layer.base_layer, NF4Linear) for layer in layers.values())
    data.setup("fit")
    data.use_tokenizer(model.tokenizer, model.max_length)
    batch = next(iter(data.train_dataloader()))
    if preset == "cg_lora":  # its factors come from calibration batches (what fit does first); zero until then
        from suite.adapters import init_adapters

        init_adapters(model, [batch], lambda b: model.compute_losses(b)["loss"])
    from suite.quant import is_nf4

    # NF4 weights are frozen by construction (no gradient) and compare through no aten op: the rest is checked
    frozen = {n: p.detach().clone() for n, p in model.state_dict().items() if n not in trained and not is_nf4(p)}
    before = {n: p.detach().clone() for n, p in trained.items()}
    opt = torch.optim.AdamW(trained.values(), lr=1e-2)
    loss = model.compute_losses(batch)["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in trained.items())  # the adapters learned
    after = model.state_dict()
    assert all(torch.equal(frozen[n], after[n]) for n in frozen)  # and nothing else moved


@pytest.mark.skipif(importlib.util.find_spec("chatterbot_corpus") is None, reason="chatterbot-corpus is not installed")
def test_test_scores_the_real_heldout_conversations(tmp_path):
    """``test/heldout_ppl``: exp of the mean next-token loss over the assistant turns of the real
    chatterbot conversations, as the LM's own loss gives it (token-weighted over batches)."""
    data = DialogueData(languages=["en"], n_dialogues=12, heldout="chatterbot", heldout_limit=5, batch_size=2)
    lean = MedAidLM(backbone="tiny", eval_cases=0, test_cases=0, selfplay_cases=0)  # perplexity only, no generation
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    m = trainer.test(lean, data, verbose=False)[0]
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in data.heldout_dataloader():
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            out = lean.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            total, count = total + float(out.loss) * n, count + n
    assert count > 0 and m["test/heldout_ppl"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert m["test/heldout_ppl/chatterbot"] == pytest.approx(m["test/heldout_ppl"])
