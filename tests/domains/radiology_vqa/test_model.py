"""The LLaVA-style model on a tiny config (tiny CLIP + tiny LM + fallback tokenizer): the image
positions, what each stage trains, where LoRA goes, the loss wiring (fairness term on in training,
off in validation), the seeded token draw, group DRO's per-sample loss, decoding, bf16 against fp32."""

from __future__ import annotations

import copy

import pytest
import torch

from domains.radiology_vqa.data import RadiologyVQAData
from domains.radiology_vqa.fairness import fairllava_loss, mid_layer, sample_image_token
from domains.radiology_vqa.model import ImageChatEncoder, Projector, RadiologyVLM
from suite.adapters import LoRA, adapter_layers
from suite.chat import IGNORE_INDEX

TINY_DATA = dict(n_patients=24, image_size=32, real_table="priors", batch_size=4, bias_strength=1.0)
TINY_MODEL = dict(vision="tiny", lm="tiny", lm_layers=2)  # 32-px ViT, 8-px patches: 4 x 4 grid -> 4 image tokens


@pytest.fixture(scope="module")
def data():
    dm = RadiologyVQAData(**TINY_DATA)
    dm.setup()
    return dm


def tiny(stage: str = "lora", dm: RadiologyVQAData | None = None, **kw) -> RadiologyVLM:
    args = dict(TINY_MODEL, stage=stage, attribute_classes={"age": 3, "sex": 2, "race": 3}, num_groups=18)
    if stage == "lora":
        args["adapter"] = LoRA(r=4, alpha=8, targets="all-linear")
    return RadiologyVLM(**(args | kw))


def batch_of(model: RadiologyVLM, dm: RadiologyVQAData, split: str = "train", n: int = 4) -> dict:
    dm.set_chat_encoder(model.chat)
    try:
        loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
        return next(iter(loader))
    finally:
        dm.set_chat_encoder(None)


def test_chat_encoder_expands_the_image_marker():
    model = tiny("projector")
    enc = model.chat
    n = model.projector.num_tokens
    assert n == 4
    convs = [[{"role": "user", "content": "<image>\nIs there a pneumothorax?"}, {"role": "assistant", "content": "no"}],
             [{"role": "user", "content": "<image>\nWhat view is this radiograph?"}, {"role": "assistant", "content": "PA"}],
             [{"role": "user", "content": "Is this text only?"}, {"role": "assistant", "content": "yes"}]]
    out = enc(convs)
    assert out["image_mask"].sum(1).tolist() == [n, n, 0]
    for r in range(2):  # the n positions are contiguous, right after "<|im_start|>user\n", and carry no label
        pos = out["image_mask"][r].nonzero().flatten()
        assert pos.tolist() == list(range(int(pos[0]), int(pos[0]) + n))
        assert (out["labels"][r, pos] == IGNORE_INDEX).all()
        assert model.tokenizer.decode(out["input_ids"][r, : pos[0]]) == "<|im_start|>user\n"
    answer = out["labels"][0][out["labels"][0] != IGNORE_INDEX]
    assert model.tokenizer.decode(answer) == "no<|im_end|>"
    # prompts: left-padded, ending in the generation prompt, the same image positions
    assert out["prompt_image_mask"].sum(1).tolist() == [n, n, 0]
    for r in range(3):
        ids = out["prompt_ids"][r][out["prompt_attention_mask"][r].bool()]
        assert model.tokenizer.decode(ids).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert (out["prompt_attention_mask"][:, -1] == 1).all()
    with pytest.raises(ValueError, match="2 <image> markers"):
        enc([[{"role": "user", "content": "<image><image>\nwhich?"}, {"role": "assistant", "content": "x"}]])


def test_projector_merges_patch_blocks_before_the_mlp():
    proj = Projector(vision_width=3, lm_width=8, grid=(4, 4), merge=2)
    tokens = torch.arange(2 * 16 * 3, dtype=torch.float32).reshape(2, 16, 3)
    seen = []
    proj.mlp[0].register_forward_hook(lambda m, args, out: seen.append(args[0]))
    assert proj(tokens).shape == (2, 4, 8)
    grid = tokens.reshape(2, 4, 4, 3)
    for i in range(2):
        for j in range(2):  # merged token (i, j) = concat of patches (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1)
            expected = torch.cat([grid[:, 2 * i, 2 * j], grid[:, 2 * i, 2 * j + 1], grid[:, 2 * i + 1, 2 * j], grid[:, 2 * i + 1, 2 * j + 1]], -1)
            torch.testing.assert_close(seen[0][:, 2 * i + j], expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not divide"):
        Projector(3, 8, (4, 4), merge=3)


def test_stage_projector_trains_only_the_projector():
    model = tiny("projector")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("projector.") for n in trainable)
    assert model.report.trainable == sum(p.numel() for p in model.projector.parameters())
    with pytest.raises(ValueError, match="adapter null"):
        tiny("projector", adapter=LoRA(r=4, targets="all-linear"))


def test_stage_lora_adapts_the_lm_only_and_trains_the_club_heads():
    model = tiny("lora")
    adapted = [n for n, _ in adapter_layers(model)]
    assert adapted and all(n.startswith("lm.") for n in adapted)
    assert not any(n.endswith("lm_head") for n in adapted)  # all-linear skips the output layer, as the reference
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if not (".lora." in n or n.startswith(("projector.", "club.")))} == set()
    assert any(n.startswith("club.sex.") for n in trainable) and any(n.startswith("projector.") for n in trainable)
    assert not any(p.requires_grad for p in model.vision.parameters())
    plain = tiny("lora", fairness="none")
    assert not any(p.requires_grad for p in plain.club.parameters())  # no CLUB heads to train without the term


def test_fairness_term_on_in_training_off_in_validation(data):
    torch.manual_seed(0)
    model = tiny("lora")
    batch = batch_of(model, data)
    model.train()
    model._batch_idx = 3
    losses = model.compute_losses(batch)
    # recompute the FairLLaVA loss by hand from the same forward and the same token draw
    embeds = model.embed(batch["image"], batch["input_ids"], batch["image_mask"])
    out = model.decoder(embeds, batch["attention_mask"])
    token_ce, _, _ = model.token_losses(out.last_hidden_state, batch["labels"])
    z = sample_image_token(mid_layer(out.hidden_states, 0.5), batch["image_mask"], model._draw_generator())
    labels = {a: batch["group_ids"][a] for a in model.club}
    ref = fairllava_loss(token_ce.mean(), z, labels, model.club, {"age": 0.6, "sex": 0.1, "race": 0.2})
    torch.testing.assert_close(losses["loss"], ref["loss"])
    assert losses["loss"] > losses["ce"] + 0.5  # the CLUB fitting terms (~log K each) are in the training loss
    for a in ("age", "sex", "race"):
        torch.testing.assert_close(losses[f"mi/{a}"], ref[f"mi/{a}"])
    losses["loss"].backward()
    assert model.club["sex"].q.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for n, p in model.named_parameters() if ".lora.B" in n)
    model.eval()
    with torch.no_grad():
        val = model.compute_losses(batch)
    torch.testing.assert_close(val["loss"], val["ce"], rtol=0, atol=0)  # off in validation
    assert {"mi/age", "mi/sex", "mi/race"} <= set(val) and "mi_penalty" not in val and not val["loss"].requires_grad


def test_mi_penalty_moves_the_lm_not_the_club_heads(data):
    model = tiny("lora", w_club=0.0)  # only the MI penalty: the estimator is a constant in it
    batch = batch_of(model, data)
    model.train()
    loss = model.compute_losses(batch)
    (loss["loss"] - loss["ce"]).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.club.parameters())
    moved = lambda prefix: sum(float(p.grad.abs().sum()) for n, p in model.named_parameters()  # noqa: E731
                               if prefix in n and p.grad is not None)
    assert moved(".lora.B") > 0 and moved("projector.") > 0  # (lora.A has no gradient while B is still zero)


def test_token_draw_is_seeded_by_step_and_micro_batch():
    model = tiny("lora")
    model.train()
    hidden, mask = torch.randn(64, 10, 8), torch.zeros(64, 10, dtype=torch.bool)
    mask[:, 2:8] = True
    model._batch_idx = 1
    a, b = (sample_image_token(hidden, mask, model._draw_generator()) for _ in range(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # a resumed run at the same (step, micro-batch) draws the same
    model._batch_idx = 2
    assert not torch.equal(a, sample_image_token(hidden, mask, model._draw_generator()))


def test_group_dro_uses_per_sample_losses(data):
    model = tiny("lora", fairness="none", objective="group_dro", dro_step_size=0.5)
    batch = batch_of(model, data)
    model.train()
    q0 = model.dro.q.clone()
    losses = model.compute_losses(batch)
    embeds = model.embed(batch["image"], batch["input_ids"], batch["image_mask"])
    with torch.no_grad():
        h = model.decoder(embeds, batch["attention_mask"]).last_hidden_state
        logits = model.lm.get_output_embeddings()(h[:, :-1]).float()
        tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], reduction="none",
                                                ignore_index=IGNORE_INDEX)
        per_sample = tok.sum(1) / (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)
    groups = batch["group"]
    present = sorted(set(groups.tolist()))
    assert not torch.equal(model.dro.q, q0) and (model.dro.q > 0).all()  # q moved, in training
    mean = {g: per_sample[groups == g].mean() for g in present}
    expected = sum(model.dro.q[g] * mean[g] for g in present)
    torch.testing.assert_close(losses["loss"], expected, rtol=1e-5, atol=1e-6)
    q1 = model.dro.q.clone()
    model.eval()
    with torch.no_grad():
        val = model.compute_losses(batch)
    assert torch.equal(model.dro.q, q1) and torch.equal(val["loss"], val["ce"])


def test_text_only_rows_get_no_image_and_no_fairness_term(data):
    model = tiny("lora")
    batch = batch_of(model, data)
    convs = copy.deepcopy(batch["messages"])
    convs[0][0]["content"] = convs[0][0]["content"].replace("<image>\n", "")
    batch.update(model.chat(convs))
    assert batch["image_mask"][0].sum() == 0 and batch["image_mask"][1:].any(1).all()
    model.train()
    out = model.compute_losses(batch)
    assert torch.isfinite(out["loss"]) and out["mi_penalty"] > 0


def test_greedy_answers_do_not_depend_on_the_batch(data):
    model = tiny("lora").eval()
    batch = batch_of(model, data, "val")
    together = model.answer(batch)
    for i in (0, 2):  # left-padded prompts in a batch answer as they do alone
        one = {k: (v[i : i + 1] if torch.is_tensor(v) else [v[i]] if isinstance(v, list) else
                   {a: (x[i : i + 1] if torch.is_tensor(x) else [x[i]]) for a, x in v.items()} if isinstance(v, dict) else v)
               for k, v in batch.items()}
        one.update(model.chat(one["messages"]))
        alone = model.answer(one)[0]
        assert alone["prediction"] == together[i]["prediction"]
        if "p_yes" in alone:
            assert alone["p_yes"] == pytest.approx(together[i]["p_yes"], abs=1e-4)
    r = together[0]
    assert set(r) >= {"id", "patient_id", "image_path", "question", "answer", "prediction", "question_type", "groups"}
    assert set(r["groups"]) == {"age", "sex", "race"}


def test_bf16_loss_is_close_to_fp32(data):
    model = tiny("lora").eval()
    batch = batch_of(model, data, "val")
    with torch.no_grad():
        fp32 = model.compute_losses(batch)["ce"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model.compute_losses(batch)["ce"]
    assert bf16.dtype == torch.float32 and abs(float(bf16 - fp32)) < 0.02 * float(fp32)  # bf16 rounding, ~3 digits


def test_image_size_must_match_the_tower(data):
    model = tiny("projector")
    other = RadiologyVQAData(**(TINY_DATA | {"image_size": 48}))
    model.trainer = type("T", (), {"datamodule": other})()  # what setup() reads
    with pytest.raises(ValueError, match="image_size=48 but the vision tower takes 32-px"):
        RadiologyVLM.setup(model, "fit")
