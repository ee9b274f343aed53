"""Point encoder, Chamfer loss, Point-MAE checkpoint loading and the MCFT module (freezing,
pruning, no inference overhead, losses, checkpoint -> test rebuild, resume of the EMA teacher)."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree
from torch.utils.flop_counter import FlopCounterMode

from domains.pointcloud.data import PointCloudData
from domains.pointcloud.model import PointCloudClassifier, linear_head
from domains.pointcloud.pretrain import PointMAEPretrain, chamfer_distance, random_patch_mask
from suite.adapters import LoRA, adapter_layers
from suite.backbones.point import PointEncoder, PointEncoderConfig, farthest_point_sample, knn_indices, load_point_mae
from suite.callbacks import EMATeacher

#: the tiny encoder every pointcloud test uses (width 64, depth 3, 16 patches of 16 points)
TINY = {"trans_dim": 64, "depth": 3, "num_heads": 4, "num_group": 16, "group_size": 16, "embed_hidden": [16, 32]}
#: a tiny procedural corpus: 3-way 4-shot episodes, 256 points per cloud
TINY_DATA = {"num_points": 256, "n_way": 3, "k_shot": 4, "n_query": 4, "n_val": 2,
             "pretrain_per_class": 4, "train_per_class": 8, "test_per_class": 6, "batch_size": 6}


@pytest.fixture
def data_dir(tmp_path_factory, monkeypatch):
    path = tmp_path_factory.getbasetemp() / "pointcloud-data"  # shared by the tests of a session
    monkeypatch.setenv("SUITE_DATA_DIR", str(path))
    return path


def tiny_model(**kw) -> PointCloudClassifier:
    args = {"num_classes": 3, "encoder": PointEncoderConfig.coerce(TINY), "init_from": None} | kw
    return PointCloudClassifier(**args)


def tiny_trainer(root, **kw) -> L.Trainer:
    args = {"max_epochs": 2, "default_root_dir": root, "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "enable_checkpointing": False} | kw
    return L.Trainer(**args)


# --- grouping and losses against brute-force references ---------------------------------------------
def test_fps_matches_reference():
    xyz = torch.rand(2, 200, 3, generator=torch.Generator().manual_seed(0))
    got = farthest_point_sample(xyz, 16)
    for b in range(2):  # textbook FPS: start at 0, then the point farthest from all chosen ones
        pts, chosen = xyz[b].double().numpy(), [0]
        dist = np.full(len(pts), np.inf)
        for _ in range(15):
            dist = np.minimum(dist, ((pts - pts[chosen[-1]]) ** 2).sum(1))
            chosen.append(int(dist.argmax()))
        assert got[b].tolist() == chosen


def test_knn_matches_bruteforce():
    xyz = torch.rand(2, 100, 3, generator=torch.Generator().manual_seed(1))
    centres = xyz[:, :5]
    got = knn_indices(xyz, centres, 8)
    for b in range(2):
        for g in range(5):
            d = ((xyz[b] - centres[b, g]) ** 2).sum(1)
            assert got[b, g].tolist() == d.argsort()[:8].tolist()


def test_chamfer_matches_kdtree_reference():
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(3, 20, 3, generator=g), torch.rand(3, 30, 3, generator=g)
    ref = np.mean([
        (cKDTree(y).query(x)[0] ** 2).mean() + (cKDTree(x).query(y)[0] ** 2).mean()
        for x, y in zip(a.double().numpy(), b.double().numpy())
    ])
    assert float(chamfer_distance(a, b)) == pytest.approx(ref, rel=1e-5)
    assert float(chamfer_distance(a, a)) == 0.0


def test_random_patch_mask_masks_the_same_count_per_cloud():
    mask = random_patch_mask(4, 16, 0.6, torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [9] * 4 and len({tuple(m.tolist()) for m in mask}) > 1
    with pytest.raises(ValueError, match="mask_ratio"):
        random_patch_mask(1, 4, 0.1)


# --- the encoder honours Point-MAE's layout and maths -------------------------------------------------
def reference_forward(sd: dict[str, torch.Tensor], patches: torch.Tensor, centre: torch.Tensor, heads: int) -> torch.Tensor:
    """Point-MAE's PointTransformer forward written out from its source with explicit ops:
    (B, C, N) Conv1d layout, softmax attention, pos re-added before every block."""

    def conv_stack(prefix, x):
        x = F.conv1d(x, sd[f"{prefix}.0.weight"], sd[f"{prefix}.0.bias"])
        x = F.batch_norm(x, sd[f"{prefix}.1.running_mean"], sd[f"{prefix}.1.running_var"], sd[f"{prefix}.1.weight"], sd[f"{prefix}.1.bias"])
        return F.conv1d(F.relu(x), sd[f"{prefix}.3.weight"], sd[f"{prefix}.3.bias"])

    b, g, k, _ = patches.shape
    f = conv_stack("encoder.first_conv", patches.reshape(b * g, k, 3).transpose(2, 1))
    f = torch.cat([f.max(2, keepdim=True)[0].expand(-1, -1, k), f], 1)
    tok = conv_stack("encoder.second_conv", f).max(2)[0].reshape(b, g, -1)
    lin = lambda x, p: F.linear(x, sd[f"{p}.weight"], sd.get(f"{p}.bias"))
    pos = lin(F.gelu(lin(centre, "pos_embed.0")), "pos_embed.2")
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), tok], 1)
    pos = torch.cat([sd["cls_pos"].expand(b, -1, -1), pos], 1)
    c = x.shape[-1]
    n_blocks = len({key.split(".")[2] for key in sd if key.startswith("blocks.blocks.")})
    for i in range(n_blocks):
        p = f"blocks.blocks.{i}"
        x = x + pos
        ln = lambda y, n: F.layer_norm(y, (c,), sd[f"{p}.{n}.weight"], sd[f"{p}.{n}.bias"])
        qkv = lin(ln(x, "norm1"), f"{p}.attn.qkv").reshape(b, -1, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] @ qkv[1].transpose(-2, -1) * (c // heads) ** -0.5).softmax(-1)
        x = x + lin((attn @ qkv[2]).transpose(1, 2).reshape(b, -1, c), f"{p}.attn.proj")
        x = x + lin(F.gelu(lin(ln(x, "norm2"), f"{p}.mlp.fc1")), f"{p}.mlp.fc2")
    x = F.layer_norm(x, (c,), sd["norm.weight"], sd["norm.bias"])
    return torch.cat([x[:, 0], x[:, 1:].max(1)[0]], -1)


def _randomised_encoder(seed: int = 0, **over) -> PointEncoder:
    torch.manual_seed(seed)
    enc = PointEncoder(PointEncoderConfig.coerce(TINY | over))
    with torch.no_grad():  # non-trivial BatchNorm statistics and LayerNorm affine
        for name, t in enc.state_dict().items():
            if "running_var" in name or name.endswith("norm.weight") or "norm1.weight" in name:
                t.uniform_(0.5, 1.5)
            elif "running_mean" in name or name.endswith("bias"):
                t.normal_(0, 0.1)
    return enc.eval()


def test_encoder_matches_point_mae_reference_forward():
    enc = _randomised_encoder()
    pts = torch.rand(2, 256, 3, generator=torch.Generator().manual_seed(3)) * 2 - 1
    patches, centre = enc.group_divider(pts)
    ref = reference_forward(enc.state_dict(), patches, centre, TINY["num_heads"])
    with torch.no_grad():
        torch.testing.assert_close(enc(pts), ref, rtol=1e-4, atol=1e-5)


def _save_official(path, state: dict, prefix: str, extra: dict) -> None:
    """A checkpoint as Point-MAE's ``save_checkpoint`` writes it: DataParallel keys under base_model."""
    sd = {f"module.{prefix}{k}": v for k, v in state.items()} | {f"module.{k}": v for k, v in extra.items()}
    torch.save({"base_model": sd, "epoch": 300, "metrics": {"acc": 0.0}}, path)


def test_point_mae_pretraining_checkpoint_loads(tmp_path):
    src = _randomised_encoder(1)
    state = {k: v for k, v in src.state_dict().items() if k not in ("cls_token", "cls_pos")}  # MAE_encoder has none
    decoder_junk = {"mask_token": torch.zeros(1, 1, 64), "MAE_decoder.blocks.0.norm1.weight": torch.ones(64), "increase_dim.0.weight": torch.ones(48, 64, 1)}
    _save_official(tmp_path / "pretrain.pth", state, "MAE_encoder.", decoder_junk)
    dst = _randomised_encoder(2)
    report = load_point_mae(dst, tmp_path / "pretrain.pth")
    assert report.missing == ["cls_pos", "cls_token"] and report.ignored == []
    for k, v in state.items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_point_mae_finetuned_and_point_bert_layouts_load(tmp_path):
    src = _randomised_encoder(1)
    _save_official(tmp_path / "ft.pth", src.state_dict(), "", {"cls_head_finetune.0.weight": torch.ones(3, 128)})
    dst = _randomised_encoder(2)
    report = load_point_mae(dst, tmp_path / "ft.pth")
    assert report.ignored == ["cls_head_finetune.0.weight"] and report.missing == []
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in src.state_dict().items())
    bert = _randomised_encoder(3, encoder_dims=48)  # Point-BERT: a reduce_dim Linear(encoder_dims, trans_dim)
    _save_official(tmp_path / "bert.pth", bert.state_dict(), "transformer_q.", {"transformer_k.cls_token": torch.ones(1, 1, 64)})
    dst = _randomised_encoder(4, encoder_dims=48)
    load_point_mae(dst, tmp_path / "bert.pth")
    assert torch.equal(dst.reduce_dim.weight, bert.reduce_dim.weight)


def test_point_mae_checkpoint_that_does_not_fit_is_explained(tmp_path):
    deep = _randomised_encoder(depth=4)
    _save_official(tmp_path / "deep.pth", deep.state_dict(), "MAE_encoder.", {})
    with pytest.raises(RuntimeError, match=r"blocks beyond depth 3: \['3'\]"):
        load_point_mae(_randomised_encoder(), tmp_path / "deep.pth")
    wide = PointEncoder(PointEncoderConfig.coerce(TINY | {"trans_dim": 32}))
    _save_official(tmp_path / "wide.pth", wide.state_dict(), "MAE_encoder.", {})
    with pytest.raises(RuntimeError, match="mis-shaped"):
        load_point_mae(_randomised_encoder(), tmp_path / "wide.pth")
    torch.save({"base_model": {"x": 1}}, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="junk.pth.*Point-MAE checkpoint"):
        load_point_mae(_randomised_encoder(), tmp_path / "junk.pth")


def test_classifier_init_from_point_mae_checkpoint(tmp_path):
    src = _randomised_encoder(5)
    _save_official(tmp_path / "pretrain.pth", src.state_dict(), "MAE_encoder.", {})
    model = tiny_model(init_from=str(tmp_path / "pretrain.pth"), train_blocks=1)
    assert torch.equal(model.backbone.blocks.blocks[0].attn.qkv.weight, src.blocks.blocks[0].attn.qkv.weight)
    with pytest.raises(FileNotFoundError, match="init_from"):
        tiny_model(init_from=str(tmp_path / "missing.pth"))


# --- MCFT: what trains, what is pruned, what inference costs ---------------------------------------------
def test_train_blocks_selects_the_top_k_blocks():
    mcft = tiny_model(train_blocks=1)
    names = {n for n, p in mcft.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("backbone.blocks.blocks.2.", "backbone.norm.", "head.")) for n in names)
    assert any(n.startswith("backbone.blocks.blocks.2.") for n in names)
    full = tiny_model(train_blocks=-1, consistency_weight=0)
    assert all(p.requires_grad for p in full.parameters())
    probe = tiny_model(train_blocks=0, consistency_weight=0)
    assert {n for n, p in probe.named_parameters() if p.requires_grad} == {"head.1.weight", "head.1.bias"}
    lora = tiny_model(train_blocks=0, consistency_weight=0, adapter=LoRA(r=4, targets=["qkv", "proj", "fc1", "fc2"]))
    owned = {f"{name}.{k}" for name, layer in adapter_layers(lora) for k in layer.adapter_params()}
    assert owned and {n for n, p in lora.named_parameters() if p.requires_grad} == owned | {"head.1.weight", "head.1.bias"}
    with pytest.raises(ValueError, match="train_blocks"):
        tiny_model(train_blocks=5)


def test_head_learning_rate_has_its_own_group():
    model = tiny_model(train_blocks=1, head_lr=0.01, optimizer=lambda p: torch.optim.AdamW(p, lr=5e-4))
    encoder_group, head_group = model.configure_optimizers().param_groups
    assert encoder_group["lr"] == 5e-4 and head_group["lr"] == 0.01
    assert {id(p) for p in head_group["params"]} == {id(p) for p in model.head.parameters()}
    assert len(encoder_group["params"]) + len(head_group["params"]) == len(model.trainable_parameters())


def test_prototype_head_is_the_nearest_class_mean_classifier(data_dir):
    model = tiny_model(train_blocks=1)
    dm = PointCloudData(**TINY_DATA)
    dm.setup("fit")
    model.init_head_from_prototypes(dm.loader("train"))
    model.eval()
    stack = lambda split: [torch.stack(v) for v in zip(*[(c["points"], torch.tensor(c["label"])) for c in dm.splits[split]])]
    (support, y), (query, _) = stack("train"), stack("test")
    with torch.no_grad():
        fs, fq = model.backbone(support), model.backbone(query)
        mu, sd = fs.mean(0), (fs.var(0, unbiased=False) + 1e-5).sqrt()
        protos = torch.stack([((fs - mu) / sd)[y == c].mean(0) for c in range(3)])
        nearest = torch.cdist((fq - mu) / sd, protos).argmin(1)
        assert torch.equal(model(query).argmax(1), nearest)
    with pytest.raises(ValueError, match="head_init"):
        tiny_model(head_init="zeros")


def test_frozen_batchnorm_keeps_its_statistics():
    mcft = tiny_model(train_blocks=1).train()
    assert not mcft.backbone.encoder.first_conv[1].training and mcft.backbone.blocks.blocks[2].training
    full = tiny_model(train_blocks=-1, consistency_weight=0).train()
    assert full.backbone.encoder.first_conv[1].training


def _param_count(m) -> int:
    return sum(p.numel() for p in m.parameters())


def _flops(model, pts) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(pts)
    return counter.get_total_flops()


@pytest.mark.filterwarnings("ignore:Total length of `list` across ranks is zero")  # no validation set: intended
def test_mcft_adds_nothing_at_inference(tmp_path, data_dir):
    plain = torch.nn.Sequential(PointEncoder(PointEncoderConfig.coerce(TINY)), linear_head(128, 3))
    mcft = tiny_model(train_blocks=1, pseudo_label_threshold=0.2, head_init="random")  # semi-supervised, no val set
    dm = PointCloudData(**(TINY_DATA | {"unlabelled": 3, "n_val": 0}))
    frozen_bn = mcft.backbone.encoder.first_conv[1].running_mean.clone()
    trainer = tiny_trainer(tmp_path, max_steps=2)
    trainer.fit(mcft, dm)
    assert torch.equal(mcft.backbone.encoder.first_conv[1].running_mean, frozen_bn)  # frozen stays frozen
    assert {"train/consistency", "train/pseudo_frac"} <= set(trainer.callback_metrics)
    assert hasattr(mcft, "ema_teacher")  # trained with a teacher ...
    assert _param_count(mcft) == _param_count(plain)  # ... that is not part of the model
    rename = {"0": "backbone", "1": "head"}
    assert {k for k in mcft.state_dict() if not k.startswith(("val_acc", "test_acc"))} == {
        rename[k.split(".", 1)[0]] + "." + k.split(".", 1)[1] for k in plain.state_dict()
    }
    pts = torch.rand(2, 256, 3)
    assert _flops(mcft, pts) == _flops(plain, pts)
    prompt = tiny_model(train_blocks=0, consistency_weight=0, encoder=PointEncoderConfig.coerce(TINY | {"num_prompts": 4}))
    assert _flops(prompt, pts) > _flops(plain, pts)  # prompt tokens do cost inference FLOPs
    pruned = tiny_model(train_blocks=1, prune_blocks=1)
    assert pruned.backbone.depth == 2 and _param_count(pruned) < _param_count(plain)
    assert _param_count(pruned) == _param_count(plain) - _param_count(plain[0].blocks.blocks[2])
    with pytest.raises(ValueError, match="prune"):
        tiny_model(prune_blocks=3)


def test_losses_supervised_and_semi_supervised():
    model = tiny_model(train_blocks=1, pseudo_label_threshold=0.2).train()
    g = torch.Generator().manual_seed(0)
    lab = {"points": torch.rand(4, 256, 3, generator=g), "label": torch.tensor([0, 1, 2, 0])}
    unl = {"points": torch.rand(6, 256, 3, generator=g), "label": torch.full((6,), -1)}
    with pytest.raises(RuntimeError, match="EMATeacher"):
        model.compute_losses(lab)
    EMATeacher(momentum=0.9).on_fit_start(tiny_trainer("."), model)
    sup = {k: v.detach() for k, v in model.compute_losses(lab).items()}
    assert set(sup) == {"ce", "consistency", "loss"}
    assert float(sup["loss"]) == pytest.approx(float(sup["ce"] + sup["consistency"]), rel=1e-6)
    assert 0 < float(sup["consistency"]) < 2  # 1 - cos of two augmented views
    semi = model.compute_losses({"labelled": lab, "unlabelled": unl})
    values = {k: float(v.detach()) for k, v in semi.items()}
    assert values["pseudo_frac"] == 1.0  # 3 classes: the top probability is >= 1/3 > 0.2
    assert values["loss"] == pytest.approx(values["ce"] + values["consistency"] + values["pseudo_ce"], rel=1e-6)
    semi["loss"].backward()
    assert all(t.grad is None for t in model.ema_teacher.tensors.values())  # stop-gradient on the teacher
    assert model.backbone.blocks.blocks[2].attn.qkv.weight.grad is not None


def test_consistency_is_zero_for_identical_views():
    model = tiny_model(train_blocks=1).train()
    model.augment = lambda points, g: points  # both views identical and teacher == student
    EMATeacher(momentum=0.9).on_fit_start(tiny_trainer("."), model)
    model.backbone.eval()  # the same (eval-mode) BatchNorms in both encoders
    out = model.compute_losses({"points": torch.rand(3, 256, 3), "label": torch.tensor([0, 1, 2])})
    assert float(out["consistency"].detach()) == pytest.approx(0.0, abs=1e-6)


# --- checkpoints: test --ckpt_path rebuilds, resume restores the teacher ------------------------------
@pytest.fixture
def stage_ckpt(tmp_path_factory, data_dir):
    """A pretraining-stage checkpoint of the tiny encoder (2 optimiser steps)."""
    root = tmp_path_factory.getbasetemp() / "pc-pretrain"
    if not (root / "last.ckpt").exists():
        pre = PointMAEPretrain(encoder=PointEncoderConfig.coerce(TINY), decoder_heads=4)  # 64 wide: 6 heads do not divide it
        trainer = tiny_trainer(root, max_steps=2, limit_val_batches=0)
        trainer.fit(pre, PointCloudData(purpose="pretrain", **TINY_DATA))
        trainer.save_checkpoint(root / "last.ckpt")
    return root / "last.ckpt"


@pytest.mark.slow
def test_checkpoint_rebuilds_for_test_and_resume_restores_the_teacher(tmp_path, stage_ckpt):
    kw = {"init_from": str(stage_ckpt), "train_blocks": 1, "momentum": 0.5}
    pre = torch.load(stage_ckpt, weights_only=True)["state_dict"]

    full = tiny_model(**kw)
    assert torch.equal(full.backbone.blocks.blocks[0].mlp.fc1.weight, pre["backbone.blocks.blocks.0.mlp.fc1.weight"])
    tiny_trainer(tmp_path / "a", max_epochs=2, limit_val_batches=0).fit(full, PointCloudData(**TINY_DATA))

    first = tiny_model(**kw)
    t1 = tiny_trainer(tmp_path / "b", max_epochs=1, limit_val_batches=0)
    t1.fit(first, PointCloudData(**TINY_DATA))
    t1.save_checkpoint(tmp_path / "b.ckpt")
    ckpt = torch.load(tmp_path / "b.ckpt", weights_only=True)
    assert not any(k.startswith("backbone.blocks.blocks.0.") for k in ckpt["state_dict"])  # frozen: rebuilt from init_from
    assert any(k.startswith("backbone.blocks.blocks.2.") for k in ckpt["state_dict"])
    teacher_key = next(k for k in ckpt["callbacks"] if "EMATeacher" in k)
    assert "blocks.blocks.2.attn.qkv.weight" in ckpt["callbacks"][teacher_key]["teacher"]

    resumed = tiny_model(**kw)
    t2 = tiny_trainer(tmp_path / "c", max_epochs=2, limit_val_batches=0)
    t2.fit(resumed, PointCloudData(**TINY_DATA), ckpt_path=tmp_path / "b.ckpt")
    for a, b in ((resumed.ema_teacher, full.ema_teacher), (resumed, full)):
        for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(v, w, rtol=0, atol=1e-6, msg=k)

    t2.save_checkpoint(tmp_path / "c.ckpt")
    tester = tiny_trainer(tmp_path / "d")
    rebuilt = tiny_model(**kw)  # fresh module: frozen weights from init_from, trained ones from the ckpt
    got = tester.test(rebuilt, PointCloudData(**TINY_DATA), ckpt_path=tmp_path / "c.ckpt", verbose=False)[0]
    want = tiny_trainer(tmp_path / "e").test(full, PointCloudData(**TINY_DATA), verbose=False)[0]
    assert got["test/acc"] == want["test/acc"] and got["test/loss"] == pytest.approx(want["test/loss"], rel=1e-6)
    other = tiny_model(**(kw | {"init_from": None}))  # a different frozen backbone is refused
    with pytest.raises(RuntimeError, match="fingerprint"):
        tiny_trainer(tmp_path / "f").test(other, PointCloudData(**TINY_DATA), ckpt_path=tmp_path / "c.ckpt", verbose=False)
