"""The DIME module on a tiny ViT and a tiny generated stream: one task's fit, the merge written before
the checkpoint, the weight fix and the baselines' merges in the model path, prototype refresh, the
one-class task, starting points (suite stages, a timm state dict), the test report."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from domains.food_cl.adapters import (
    AdaptFormer,
    adapter_stack,
    dime_merge,
    load_adapter_stack,
    parallel_adapters,
    ties_merge,
    using_branch,
)
from domains.food_cl.data import FoodCLData
from domains.food_cl.metrics import evaluation_report, task_confusion
from domains.food_cl.model import FoodDIME
from suite.module import CheckpointMismatchError

#: 8 classes in 3 tasks of 2, 4 and 2 classes (rho 0.2, protocol seed 0): task 1 outnumbers task 0
DATA = dict(generated_classes=8, train_max=12, train_min=3, val_per_class=2, test_per_class=3, pretrain_classes=4,
            pretrain_per_class=4, image_size=16, num_tasks=3, task_imbalance=0.2, batch_size=8)
VIT = dict(backbone="test_vit", img_size=16, backbone_kwargs={"patch_size": 8, "depth": 2})
QUIET = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)


def data(task: int = 0, **kw) -> FoodCLData:
    dm = FoodCLData(task=task, **{**DATA, **kw})
    dm.setup()
    return dm


def model(dm: FoodCLData, **kw) -> FoodDIME:
    args = dict(num_classes=dm.num_classes, classes_per_task=dm.classes_per_task, task=dm.task,
                adapter=AdaptFormer(bottleneck=8), **VIT)
    return FoodDIME(**{**args, **kw})


def fit(m: FoodDIME, dm: FoodCLData, root: Path, epochs: int = 2, **trainer) -> L.Trainer:
    ckpt = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, save_top_k=-1, save_on_train_epoch_end=True)
    t = L.Trainer(max_epochs=epochs, default_root_dir=root, callbacks=[ckpt], **{**QUIET, **trainer})
    t.fit(m, dm)
    return t


def randomise(m: FoodDIME, seed: int) -> dict[str, torch.Tensor]:
    """Give the trained stack random values (a stand-in for training); returns them."""
    g = torch.Generator().manual_seed(seed)
    stack = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in adapter_stack(m.backbone).items()}
    load_adapter_stack(m.backbone, stack, "trained")
    return stack


def test_stream_is_the_one_expected():
    assert data().classes_per_task == [2, 4, 2]
    assert data(generated_classes=8, task_imbalance=0.01).classes_per_task == [1, 6, 1]


def test_a_task_fit_trains_a_fresh_stack_then_merges_and_writes_prototypes(tmp_path):
    dm = data(0)
    m = model(dm)
    frozen = {k: v.clone() for k, v in m.backbone.state_dict().items() if "base_layer" in k or "blocks" not in k}
    start = adapter_stack(m.backbone)
    assert all(torch.count_nonzero(start[k]) == 0 for k in start if ".up." in k)  # the identity at start
    fit(m, dm, tmp_path)
    trained = adapter_stack(m.backbone)
    assert not torch.equal(trained["blocks.0.mlp.up.weight"], start["blocks.0.mlp.up.weight"])  # it trained
    assert all(torch.equal(m.backbone.state_dict()[k], v) for k, v in frozen.items())  # the ViT did not
    merged = adapter_stack(m.backbone, "merged")
    assert all(torch.equal(merged[k], trained[k]) for k in trained)  # the first merge is the stack itself
    assert m.classifier.filled.tolist() == [True, True] + [False] * 6
    assert int(m.tasks_learned) == 1 and int(m.merged_classes) == 2 and int(m.merged_count) == 1
    assert m.train_counts[:2].tolist() == dm.task_class_counts.tolist() and m.train_counts[2:].sum() == 0
    # the prototypes are the class means under the merged stack (no augmentation)
    m.eval()
    with torch.no_grad(), using_branch(m.backbone, "merged"):
        batches = list(dm.prototype_dataloader())
        feats = torch.cat([m.backbone(b["image"]) for b in batches])
        labels = torch.cat([b["label"] for b in batches])
    for c in (0, 1):
        torch.testing.assert_close(m.classifier.prototypes[c], feats[labels == c].mean(0), rtol=1e-4, atol=1e-5)
    # every stage after this one starts from the same seeded fresh stack (a shared origin)
    assert torch.equal(adapter_stack(model(data(1)).backbone)["blocks.1.mlp.down.weight"], start["blocks.1.mlp.down.weight"])
    assert not torch.equal(adapter_stack(model(data(1), fresh_init="per_task").backbone)["blocks.1.mlp.down.weight"],
                           start["blocks.1.mlp.down.weight"])


def test_the_merge_is_in_last_ckpt_but_not_in_earlier_epochs(tmp_path):
    """on_train_epoch_end of the last epoch runs before ModelCheckpoint saves: last.ckpt holds the merge."""
    dm = data(0)
    m = model(dm)
    fit(m, dm, tmp_path, epochs=2)
    first = torch.load(next((tmp_path / "checkpoints").glob("epoch=0-*.ckpt")), weights_only=True)["state_dict"]
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert int(first["tasks_learned"]) == 0 and torch.count_nonzero(first["backbone.blocks.0.mlp.merged_up_weight"]) == 0
    assert int(last["tasks_learned"]) == 1
    for k, v in adapter_stack(m.backbone, "merged").items():
        name, _, key = k.rpartition(".mlp.")
        assert torch.equal(last[f"backbone.{name}.mlp.merged_{key.replace('.', '_')}"], v), k
    assert torch.equal(last["classifier.prototypes"], m.classifier.prototypes) and last["classifier.filled"][:2].all()
    # a checkpoint saved only after validation (here every second epoch) would miss it: refused up front
    with pytest.raises(ValueError, match="save_on_train_epoch_end"):
        L.Trainer(max_epochs=1, check_val_every_n_epoch=2, default_root_dir=tmp_path / "other", **QUIET).fit(model(dm), dm)


@pytest.mark.parametrize("weights", ["own", "reference"])
def test_weight_fix_in_the_model_path(weights):
    """Task 1 (4 classes) outnumbers the 2 merged ones: the new stack is the anchor, and the fix gives
    the old stack its own share 2/6 where the reference gives it 4/6."""
    dm0, dm1 = data(0), data(1)
    m0 = model(dm0, merge_weights=weights)
    randomise(m0, 0)
    m0.finish_task(dm0)
    m1 = model(dm1, merge_weights=weights)
    m1.extend_from(m0)
    new = randomise(m1, 1)
    old = adapter_stack(m1.backbone, "merged")
    m1.finish_task(dm1)
    merged = adapter_stack(m1.backbone, "merged")
    expected = dime_merge(old, new, 2, 4, weights=weights)
    for k in merged:
        torch.testing.assert_close(merged[k], expected[k], rtol=0, atol=1e-6)
    # with rho = 1 everywhere the merge is the weighted mean, so the shares can be read off directly
    m2 = model(dm1, merge_weights=weights, rho_head=1.0, rho_tail=1.0)
    m2.extend_from(m0)
    load_adapter_stack(m2.backbone, new, "trained")
    m2.finish_task(dm1)
    w_old = 2 / 6 if weights == "own" else 4 / 6
    for k, v in adapter_stack(m2.backbone, "merged").items():
        torch.testing.assert_close(v, w_old * old[k] + (1 - w_old) * new[k], rtol=0, atol=1e-6)
    assert int(m1.merged_classes) == 6 and int(m1.tasks_learned) == 2


@pytest.mark.parametrize("merge", ["average", "ties", "replace"])
def test_baseline_merges_in_the_model_path(merge):
    dms = [data(t) for t in range(3)]
    stacks, prev = [], None
    for t, dm in enumerate(dms):
        m = model(dm, merge=merge)
        if prev is not None:
            m.extend_from(prev)
        stacks.append(randomise(m, 10 + t))
        m.finish_task(dm)
        prev = m
    merged = adapter_stack(prev.backbone, "merged")
    init = adapter_stack(model(dms[0]).backbone)  # the shared fresh stack: TIES's base
    expected = {"average": {k: sum(s[k] for s in stacks) / 3 for k in merged},
                "ties": ties_merge(stacks, base=init, density=0.2),
                "replace": stacks[-1]}[merge]
    for k in merged:
        torch.testing.assert_close(merged[k], expected[k], rtol=0, atol=1e-6)
    assert [row["task"] for row in prev.history] == [0, 1] and int(prev.merged_count) == 3


def test_prototype_refresh_rewrites_old_classes():
    dm0, dm1 = data(0), data(1)
    m0 = model(dm0)
    randomise(m0, 0)
    m0.finish_task(dm0)
    old = m0.classifier.prototypes[:2].clone()
    for mode in ("current", "refresh"):
        m1 = model(dm1, prototypes=mode)
        m1.extend_from(m0)
        randomise(m1, 1)
        m1.finish_task(dm1)
        if mode == "current":  # the reference: task 0's prototypes stay those of the stack of their time
            assert torch.equal(m1.classifier.prototypes[:2], old)
            continue
        assert not torch.allclose(m1.classifier.prototypes[:2], old)
        m1.eval()
        with torch.no_grad(), using_branch(m1.backbone, "merged"):
            batches = list(dm1.prototype_dataloader([0]))
            feats = torch.cat([m1.backbone(b["image"]) for b in batches])
            labels = torch.cat([b["label"] for b in batches])
        for c in (0, 1):
            torch.testing.assert_close(m1.classifier.prototypes[c], feats[labels == c].mean(0), rtol=1e-4, atol=1e-5)
        assert m1.classifier.filled[:6].all() and not m1.classifier.filled[6:].any()


def test_a_one_class_task_trains_nothing_and_is_not_merged(tmp_path):
    """Balanced Softmax over one logit is 0 whatever the adapter does: nothing can be learned."""
    dm = data(0, task_imbalance=0.01)  # tasks of 1, 6 and 1 classes
    m = model(dm)
    randomise(m, 3)
    load_adapter_stack(m.backbone, adapter_stack(m.backbone), "merged")  # a merged stack from "earlier tasks"
    m.merged_classes.fill_(5)
    m.merged_count.fill_(1)
    merged = adapter_stack(m.backbone, "merged")
    trainer = fit(m, dm, tmp_path / "skip")
    assert trainer.global_step == 0 and int(m.tasks_learned) == 1 and m.classifier.filled.tolist()[:2] == [True, False]
    assert all(torch.equal(v, merged[k]) for k, v in adapter_stack(m.backbone, "merged").items())  # not merged
    assert (tmp_path / "skip" / "checkpoints" / "last.ckpt").is_file()  # saved at on_train_end
    # the reference trains it anyway: zero loss, and the untrained stack moves the merged one
    ref = model(dm, one_class="train")
    load_adapter_stack(ref.backbone, merged, "merged")
    ref.merged_classes.fill_(5)
    ref.merged_count.fill_(1)
    trainer = fit(ref, dm, tmp_path / "train")
    assert trainer.global_step > 0 and float(trainer.callback_metrics["val/loss"]) == 0.0
    assert not torch.equal(adapter_stack(ref.backbone, "merged")["blocks.0.mlp.up.weight"], merged["blocks.0.mlp.up.weight"])


def test_simplecil_and_sequential_and_joint():
    dm0, dm1 = data(0), data(1)
    proto = model(dm0, adapter=None)
    assert not parallel_adapters(proto.backbone) and not proto.trains_adapter
    proto.finish_task(dm0)
    assert proto.classifier.filled[:2].all()
    seq0 = model(dm0, adapters="continue", merge="replace")
    carried = randomise(seq0, 4)
    seq0.finish_task(dm0)
    seq1 = model(dm1, adapters="continue", merge="replace")
    seq1.extend_from(seq0)
    assert all(torch.equal(v, carried[k]) for k, v in adapter_stack(seq1.backbone).items())  # continues the stack
    fresh = model(dm1)
    fresh.extend_from(seq0)
    assert not torch.equal(adapter_stack(fresh.backbone)["blocks.0.mlp.down.weight"], carried["blocks.0.mlp.down.weight"])
    joint = data(0, mode="joint")
    assert joint.classes_per_task == [8] and list(joint.task_classes) == list(range(8))
    j = model(joint, merge="replace")
    assert j.task_head.weight.shape[0] == 8
    randomise(j, 5)
    j.finish_task(joint)
    assert j.classifier.filled.all()


def test_starting_points_are_checked(tmp_path):
    dm0, dm2 = data(0), data(2)
    m0 = model(dm0)
    randomise(m0, 0)
    m0.finish_task(dm0)
    with pytest.raises(CheckpointMismatchError, match="has learned 1 tasks; task 2 starts from the stage that learned task 1"):
        model(dm2).extend_from(m0)
    with pytest.raises(CheckpointMismatchError, match="learned the stream"):
        model(data(1, generated_classes=9)).extend_from(m0)
    with pytest.raises(CheckpointMismatchError, match="with adapters"):
        model(data(1), adapter=None).extend_from(m0)


def test_a_timm_state_dict_or_safetensors_file_is_the_backbone(tmp_path):
    import timm
    from safetensors.torch import save_file

    vit = timm.create_model("test_vit", pretrained=False, num_classes=21, img_size=16, patch_size=8, depth=2)
    state = {k: v.contiguous() for k, v in vit.state_dict().items()}
    save_file(state, tmp_path / "vit.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "vit.pth")
    dm = data(0)
    for name in ("vit.safetensors", "vit.pth"):
        m = model(dm, init_from=str(tmp_path / name))
        assert torch.equal(m.backbone.blocks[1].mlp.base_layer.fc1.weight, state["blocks.1.mlp.fc1.weight"])
        assert torch.equal(m.backbone.pos_embed, state["pos_embed"])  # the classifier head (21 classes) is ignored
    bad = dict(state, extra=torch.zeros(2))
    bad.pop("blocks.0.norm1.weight")
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError) as err:
        model(dm, init_from=str(tmp_path / "bad.pth"))
    assert "missing keys (1): blocks.0.norm1.weight" in str(err.value) and "unexpected keys (1): extra" in str(err.value)
    with pytest.raises(CheckpointMismatchError, match=r"mis-shaped keys .*pos_embed: checkpoint \(1, 5, 64\), model \(1, 17, 64\)"):
        model(dm, init_from=str(tmp_path / "vit.pth"), img_size=32)


def test_evaluation_report_by_hand():
    # 4 classes, tasks [0, 0, 1, 1]; after task 0 (2 classes seen), then after task 1 (all 4)
    cm0 = torch.zeros(4, 4, dtype=torch.long)
    cm0[0, 0], cm0[1, 1], cm0[1, 0] = 2, 1, 1  # task 0: 3 / 4 right
    cm1 = torch.zeros(4, 4, dtype=torch.long)
    cm1[0, 0], cm1[0, 2], cm1[1, 1], cm1[1, 3] = 1, 1, 1, 1  # task 0: 2 / 4 right (forgot 1 of 4)
    cm1[2, 2], cm1[3, 3], cm1[3, 2] = 2, 1, 1  # task 1: 3 / 4 right
    r = evaluation_report([cm0, cm1], [0, 1], [2, 2], [0, 0, 1, 1], train_counts=[150, 50, 5, 60])
    assert r["acc_t"] == [0.75, 0.625]
    np.testing.assert_allclose(r["acc_matrix"], [[0.75, np.nan], [0.5, 0.75]])
    s = r["scalars"]
    assert s["forgetting"] == pytest.approx(0.25) and s["acc_mean"] == pytest.approx(0.6875)
    # weights: 2 / (4 * 1 / 2) = 1 and 4 / (4 * 2 / 2) = 1: the plain mean here
    assert s["acc_weighted"] == pytest.approx(0.6875)
    # head (> 100 images): class 0 at 1/2; medium: classes 1 (1/2) and 3 (1/2); tail (< 20): class 2 at 2/2
    assert (s["acc_head"], s["acc_medium"], s["acc_tail"]) == (0.5, 0.5, 1.0)
    assert r["task_confusion"] == [[2, 2], [0, 4]] == task_confusion(cm1, [0, 0, 1, 1], 2).tolist()
    assert s["acc_task0"] == 0.5 and not math.isnan(s["acc_task1"])
