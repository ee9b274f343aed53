"""open_clip towers: shapes and equality with open_clip's own encoders, checkpoints, LoRA in both
towers, and contrastive pretraining that learns zero-shot retrieval on a toy set."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from suite.adapters import LoRA, adapter_layers, inject
from suite.backbones.clip import ClipPretrain, build_clip, clip_config, load_clip_checkpoint, retrieval_accuracy

from .clip_toy import ShapePairsData


def _seeded(seed: int = 0, **kw):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_clip("tiny", **kw)


def test_towers_match_open_clip_encoders():
    parts = _seeded()
    again = _seeded()
    for (n, a), (_, b) in zip(parts.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), f"seeded rebuild differs at {n}"
    images = torch.rand(2, 3, 32, 32)
    texts = ["a red circle", "a blue square"]
    with torch.no_grad():
        out = parts.vision(images)
        assert out.tokens.shape == (2, 16, 64) and out.pooled.shape == (2, 64)
        assert parts.vision.num_tokens == 16 and parts.vision.width == 64
        # reference: open_clip's own forward on normalised pixels, with its token output switched on
        mean = torch.tensor(parts.vision.mean).view(1, 3, 1, 1)
        std = torch.tensor(parts.vision.std).view(1, 3, 1, 1)
        visual = parts.model.visual
        visual.output_tokens = True
        pooled, tokens = visual((images - mean) / std)
        visual.output_tokens = False
        torch.testing.assert_close(out.tokens, tokens, rtol=0, atol=0)
        torch.testing.assert_close(out.pooled, pooled, rtol=0, atol=0)
        torch.testing.assert_close(out.pooled, parts.model.encode_image((images - mean) / std), rtol=0, atol=0)
        torch.testing.assert_close(parts.text(texts), parts.model.encode_text(parts.tokenizer(texts)), rtol=0, atol=0)
        # an earlier block's tokens (LLaVA-style feature_layer=-2), computed by hand: no final norm
        early = build_clip("tiny", feature_layer=-2)
        early.model.load_state_dict(parts.model.state_dict())
        x = visual._embeds((images - mean) / std)
        want = visual.transformer.resblocks[0](x)[:, 1:]
        torch.testing.assert_close(early.vision(images).tokens, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"expected images \(B, 3, 32, 32\)"):
        parts.vision(torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match="outside the tower's 2 blocks"):
        build_clip("tiny", feature_layer=2)
    with pytest.raises(ValueError, match="unknown open_clip config"):
        build_clip("ViT-X-99")


def test_preprocess_and_config_overrides():
    parts = build_clip("tiny", config={"vision_cfg": {"image_size": 48}, "text_cfg": {"vocab_size": 100}})
    assert parts.vision.image_size == (48, 48) and parts.tokenizer is None
    img = Image.fromarray((np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8))
    x = parts.preprocess(img)
    assert x.shape == (3, 48, 48) and 0.0 <= x.min() and x.max() <= 1.0  # [0, 1]: the tower normalises
    with pytest.raises(ValueError, match="has no tokenizer"):
        parts.text(["a caption"])
    assert parts.text(torch.randint(0, 100, (2, 24))).shape == (2, 64)
    assert clip_config("ViT-B-32", {"vision_cfg": {"layers": 2}})["vision_cfg"] == {"image_size": 224, "layers": 2, "width": 768, "patch_size": 32}


def test_checkpoints_round_trip_and_mismatch_errors(tmp_path):
    import open_clip

    parts = _seeded(1)
    images, ids = torch.rand(2, 3, 32, 32), parts.tokenizer(["a red circle", "a green triangle"])
    with torch.no_grad():
        want_img, want_txt = parts.model.encode_image(parts.vision.normalize(images)), parts.model.encode_text(ids)
    state = parts.model.state_dict()
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "train.pt")  # open_clip training ckpt
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    for name in ("train.pt", "model.safetensors"):
        loaded = _seeded(2, checkpoint=tmp_path / name)
        assert str(tmp_path / name) in loaded.source
        with torch.no_grad():
            torch.testing.assert_close(loaded.model.encode_image(loaded.vision.normalize(images)), want_img, rtol=0, atol=0)
            torch.testing.assert_close(loaded.model.encode_text(ids), want_txt, rtol=0, atol=0)
    # open_clip's plain CLIP class keeps the text tower flat (positional_embedding, transformer.*): converted
    flat = open_clip.create_model("ViT-B-32", pretrained=None, **clip_config("tiny"))
    torch.save(flat.state_dict(), tmp_path / "flat.bin")
    loaded = build_clip("tiny", checkpoint=tmp_path / "flat.bin")
    with torch.no_grad():
        torch.testing.assert_close(loaded.text(ids), flat.encode_text(ids), rtol=0, atol=0)
    bad = {k: v for k, v in state.items() if k != "visual.proj"}
    bad["visual.extra"] = torch.zeros(1)
    bad["text.token_embedding.weight"] = torch.zeros(10, 64)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as err:
        load_clip_checkpoint(parts.model, tmp_path / "bad.pth")
    msg = str(err.value)
    assert "bad.pth" in msg and "missing (1): visual.proj" in msg and "unexpected (1): visual.extra" in msg
    assert "mis-shaped (1): text.token_embedding.weight: file (10, 64), model (49408, 64)" in msg
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pt")  # a pickled module, not weights
    with pytest.raises(ValueError, match="not a weights-only checkpoint"):
        build_clip("tiny", checkpoint=tmp_path / "pickled.pt")
    with pytest.raises(FileNotFoundError):
        build_clip("tiny", checkpoint=tmp_path / "absent.pt")


def test_lora_adapts_both_towers():
    parts = _seeded(3)
    images, ids = torch.rand(2, 3, 32, 32), parts.tokenizer(["a red circle", "a blue square"])
    model = parts.model
    with torch.no_grad():
        before = parts.vision(images).pooled, parts.text(ids)
    report = inject(model, LoRA(r=2, targets=["attn", "c_fc", "c_proj"]))
    names = [n for n, _ in adapter_layers(model)]
    assert sum(n.startswith("visual.") for n in names) == 6 and sum(n.startswith("text.") for n in names) == 6
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    with torch.no_grad():
        torch.testing.assert_close(parts.vision(images).pooled, before[0], rtol=0, atol=1e-6)  # the towers see the adapters
        for _, layer in adapter_layers(model):
            for delta in (getattr(layer, "lora", None), getattr(layer, "lora_in", None)):
                if delta is not None:
                    delta.B.normal_()
        after = parts.vision(images).pooled, parts.text(ids)
    assert (after[0] - before[0]).abs().max() > 1e-3 and (after[1] - before[1]).abs().max() > 1e-3


@pytest.mark.slow
def test_vit_b_32_builds():
    parts = build_clip("ViT-B-32")
    with torch.no_grad():
        out = parts.vision(torch.rand(1, 3, 224, 224))
    assert out.tokens.shape == (1, 49, 768) and out.pooled.shape == (1, 512)
    assert parts.text(["a chest radiograph"]).shape == (1, 512)


def test_retrieval_accuracy_closed_form():
    emb = torch.eye(4)
    ids = torch.tensor([7, 7, 8, 9])  # pairs 0 and 1 share a caption
    r = retrieval_accuracy(emb, emb, ids)
    assert r["i2t_top1"] == 1 and r["t2i_top1"] == 1
    assert r["chance"].item() == pytest.approx((2 / 4 + 2 / 4 + 1 / 4 + 1 / 4) / 4)
    # image 2 retrieves text 0 (wrong caption), image 1 retrieves text 0 (same caption: right)
    img = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1.0]])
    r = retrieval_accuracy(img, emb, ids)
    assert r["i2t_top1"].item() == pytest.approx(3 / 4)


def _fast_adamw(params):
    return torch.optim.AdamW(params, lr=2e-3, fused=True)  # fused: the 49,408-token embedding dominates the step


@pytest.mark.slow  # ~9 s on 2 idle cores
def test_clip_pretrain_learns_retrieval(tmp_path):
    model = ClipPretrain(optimizer=_fast_adamw)
    assert model.report.trainable == model.report.total  # both towers and logit_scale train
    data = ShapePairsData(n_train=1024, n_val=96, batch_size=64)
    trainer = L.Trainer(max_steps=120, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, check_val_every_n_epoch=1000, num_sanity_val_steps=0,
                        default_root_dir=tmp_path)
    before = trainer.validate(model, data, verbose=False)[0]
    trainer.fit(model, data)
    after = trainer.validate(model, data, verbose=False)[0]
    chance = after["val/retrieval_chance"]
    assert chance == pytest.approx(before["val/retrieval_chance"]) and 0.05 < chance < 0.15  # 12 captions
    # measured: ~0.5-0.7 in both directions after 120 steps (~5-7x chance); random weights give ~chance
    assert after["val/retrieval_i2t_top1"] > 3 * chance and after["val/retrieval_t2i_top1"] > 3 * chance
    assert after["val/loss"] < before["val/loss"] - 0.5
    assert model.backbone.logit_scale.item() <= np.log(100) + 1e-6
    # the checkpoint a prerequisite hands on loads back as an open_clip model
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    loaded = build_clip("tiny", checkpoint=tmp_path / "last.ckpt")
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.vision(images).pooled, build_vision(model)(images).pooled, rtol=0, atol=0)


def build_vision(model: ClipPretrain):
    from suite.backbones.clip import ClipVisionTower

    mean, std, _ = model.image_stats
    return ClipVisionTower(model.backbone.visual, mean, std)


def test_clip_pretrain_with_adapter_and_frozen_tower():
    lora = ClipPretrain(adapter=LoRA(r=2, targets=["attn", "c_fc", "c_proj"]))
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert "backbone.logit_scale" in trainable and all(".lora" in n or n == "backbone.logit_scale" for n in trainable)
    text_only = ClipPretrain(towers=["text"])
    assert not any(p.requires_grad for p in text_only.backbone.visual.parameters())
    assert all(p.requires_grad for p in text_only.backbone.text.parameters())
    frozen = copy.deepcopy(text_only.backbone.visual.state_dict())
    again = ClipPretrain(towers=["text"])  # the frozen tower is rebuilt from backbone_seed
    for k, v in again.backbone.visual.state_dict().items():
        assert torch.equal(v, frozen[k])
    with pytest.raises(ValueError, match="towers must be"):
        ClipPretrain(towers=["audio"])


def test_clip_pretraining_as_a_cached_prerequisite(monkeypatch):
    """A run that needs a CLIP pretrained here declares it; it runs once, and its checkpoint loads."""
    import csv

    import suite.cli
    from suite.prerequisites import Prerequisite, resolve, run_prerequisite

    yaml_file = str(Path(__file__).with_name("clip_pretrain.yaml"))
    override = {"vision_cfg": {"layers": 1}}  # linked: the consumer and the pretraining build the same model
    consumer = {
        "model": {"class_path": "suite.backbones.clip.ClipPretrain", "init_args": {"clip_config": override, "checkpoint": "clip"}},
        "prerequisites": [{"name": "clip", "configs": [yaml_file], "into": "model.init_args.checkpoint",
                           "link": {"model.init_args.clip_config": "model.init_args.clip_config"}}],
    }
    assert list(resolve(consumer)) == ["model.init_args.checkpoint"]
    product = Path(consumer["model"]["init_args"]["checkpoint"])
    assert product.name == "last.ckpt" and product.is_file()
    metrics = next(product.parent.parent.glob("logs/version_*/metrics.csv"))
    header = next(csv.reader(metrics.open()))
    assert {"val/retrieval_i2t_top1", "val/retrieval_t2i_top1", "val/retrieval_chance", "train/loss"} <= set(header)
    parts = build_clip("tiny", config=override, checkpoint=product)
    assert len(parts.model.visual.transformer.resblocks) == 1
    ckpt = torch.load(product, map_location="cpu", weights_only=True)
    torch.testing.assert_close(parts.model.logit_scale, ckpt["state_dict"]["backbone.logit_scale"], rtol=0, atol=0)

    def no_second_fit(*a, **k):
        raise AssertionError("the cached prerequisite ran again")

    monkeypatch.setattr(suite.cli, "main", no_second_fit)
    prereq = Prerequisite(**consumer["prerequisites"][0])
    assert run_prerequisite(prereq, {"model.init_args.clip_config": override}) == product


def test_clip_pretrain_under_ddp_contrasts_the_global_batch(tmp_path):
    """2 forked processes (gloo): ClipLoss gathers every rank's pairs and retrieval runs over all of
    them, so validation gives what one process gives on the whole batch (both are order-free)."""
    data = ShapePairsData(n_train=32, n_val=32, batch_size=16)
    kw = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    single = L.Trainer(devices=1, **kw).validate(ClipPretrain(), ShapePairsData(n_train=32, n_val=32, batch_size=32), verbose=False)[0]
    ddp = L.Trainer(devices=2, strategy="ddp_fork", **kw).validate(ClipPretrain(), data, verbose=False)[0]
    for key in ("val/loss", "val/retrieval_i2t_top1", "val/retrieval_t2i_top1", "val/retrieval_chance"):
        assert ddp[key] == pytest.approx(single[key], rel=1e-5, abs=1e-6), key
