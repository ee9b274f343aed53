"""The step-imbalance protocol, the long tail, and the DataModule's task splits on a tiny generated set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from domains.food_cl.data import (
    DatasetFormatError,
    FoodCLData,
    FoodImages,
    balance_classes,
    long_tail_subsample,
    make_protocol,
    step_imbalanced_sizes,
)
from suite.data import generated_dir

TINY = dict(generated_classes=8, train_max=12, train_min=2, val_per_class=2, test_per_class=3, pretrain_classes=4,
            pretrain_per_class=4, image_size=16, num_tasks=3, batch_size=8)


def test_step_sizes_by_hand():
    # C = 101, T = 10, rho = 0.01 (the DIME Food-101-LT setting): ratios 0.01^(t/9) normalised over
    # the 91 classes left after one per task: 36.67, 21.98, 13.18, 7.90, 4.74, 2.84, 1.70, 1.02,
    # 0.61, 0.37 -> rounded 37 22 13 8 5 3 2 1 1 0 (sum 92), one taken from the largest, +1 each
    assert step_imbalanced_sizes(101, 10, 0.01, seed=None) == [37, 23, 14, 9, 6, 4, 3, 2, 2, 1]
    # C = 10, T = 5: 0.01^(t/4) -> 3.43 1.09 0.34 0.11 0.03 of 5 -> 3 1 0 0 0, one more to the largest
    assert step_imbalanced_sizes(10, 5, 0.01, seed=None) == [5, 2, 1, 1, 1]
    assert step_imbalanced_sizes(7, 1, 0.01) == [7]  # T = 1: one task (the reference divides by zero)


@pytest.mark.parametrize("classes, tasks, rho", [(50, 5, 0.01), (101, 10, 0.01), (186, 10, 0.001), (12, 12, 0.01), (30, 4, 1.0)])
def test_step_sizes_follow_the_formula(classes, tasks, rho):
    sizes = step_imbalanced_sizes(classes, tasks, rho, seed=None)
    assert sum(sizes) == classes and min(sizes) >= 1
    ratio = rho ** (np.arange(tasks) / max(tasks - 1, 1))
    ideal = 1 + ratio / ratio.sum() * (classes - tasks)
    # rounding moves a task by at most half a class, settling the rounding error by at most one more
    assert np.all(np.abs(np.array(sizes) - ideal) <= 1.5 + 1e-9)
    assert sizes == sorted(sizes, reverse=True)
    shuffled = [step_imbalanced_sizes(classes, tasks, rho, seed=s) for s in range(4)]
    assert all(sorted(s) == sorted(sizes) for s in shuffled)  # a seeded shuffle of the same sizes
    assert shuffled[0] == step_imbalanced_sizes(classes, tasks, rho, seed=0)
    if len(set(sizes)) > 1:
        assert len({tuple(s) for s in shuffled}) > 1


def test_protocol_order_and_tasks():
    p = make_protocol(20, 4, 0.01, seed=3)
    assert sorted(p.class_order.tolist()) == list(range(20))
    assert p.class_order.tolist() == make_protocol(20, 4, 0.01, seed=3).class_order.tolist()
    assert p.class_order.tolist() != make_protocol(20, 4, 0.01, seed=4).class_order.tolist()
    assert p.offsets[-1] == 20 and [len(p.task_classes(t)) for t in range(4)] == p.classes_per_task
    assert p.to_incremental(p.class_order).tolist() == list(range(20))  # original id at position i -> i
    assert p.task_of_class.tolist() == [t for t in range(4) for _ in range(p.classes_per_task[t])]


def test_long_tail_subsample_and_balance():
    labels = np.repeat(np.arange(5), 40)
    keep = long_tail_subsample(labels, 0.1, seed=0)
    counts = np.bincount(labels[keep], minlength=5)
    # 40 * 0.1^(rank/4) for ranks 0..4 = 40, 22.5, 12.6, 7.1, 4 -> 40 22 13 7 4 in some seeded order
    assert sorted(counts.tolist()) == [4, 7, 13, 22, 40]
    assert np.array_equal(keep, long_tail_subsample(labels, 0.1, seed=0))
    unbalanced = np.array([0] * 5 + [1] * 3 + [2] * 9)
    kept = unbalanced[balance_classes(unbalanced)]
    assert np.bincount(kept).tolist() == [3, 3, 3]


def _datamodule(task=0, **kw):
    dm = FoodCLData(task=task, **{**TINY, **kw})
    dm.setup()
    return dm


def test_num_classes_is_known_before_generation():
    dm = FoodCLData(**{**TINY, "generated_classes": 9})
    assert dm.num_classes == 9
    assert not any(p.name.startswith("food101_v1_c9_") for p in generated_dir("food_cl").iterdir())


def test_task_splits():
    dms = [_datamodule(t) for t in range(3)]
    sizes = dms[0].classes_per_task
    assert sizes == step_imbalanced_sizes(8, 3, 0.01, seed=0) and sum(sizes) == 8
    seen_train: set[str] = set()
    for t, dm in enumerate(dms):
        train, test, val = dm.splits["train"], dm.splits["test"], dm.splits["val"]
        # a task trains on its own classes only, with every training image of them
        assert set(train.labels.tolist()) == set(dm.task_classes) and len(dm.task_classes) == sizes[t]
        assert np.bincount(train.labels, minlength=8)[list(dm.task_classes)].tolist() == dm.task_class_counts.tolist()
        assert not seen_train & set(train.ids)
        seen_train |= set(train.ids)
        # val and test hold every class seen so far, balanced
        assert dm.seen_classes == sum(sizes[: t + 1])
        assert np.bincount(test.labels).tolist() == [3] * dm.seen_classes
        assert np.bincount(val.labels).tolist() == [2] * dm.seen_classes
        assert np.array_equal(test.tasks, dm.task_of_class[test.labels])
        assert dm.task_offset == dm.task_classes.start
    assert len(seen_train) == dms[0].class_counts.sum()  # every training image belongs to exactly one task
    assert dms[0].split_hashes["protocol"] == dms[2].split_hashes["protocol"]
    assert dms[0].split_hashes["train"] != dms[1].split_hashes["train"]
    assert dms[0].split_hashes["test"] != dms[2].split_hashes["test"]


def test_batches_and_prototype_loader():
    dm = _datamodule(1)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape[1:] == (3, 16, 16) and batch["image"].dtype == torch.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0  # mean/std 0.5
    assert torch.equal(batch["task"], torch.full_like(batch["task"], 1))
    assert isinstance(batch["id"][0], str) and batch["id"][0].startswith("images/")
    loader = dm.prototype_dataloader([0, 1])
    first = torch.cat([b["image"] for b in loader])
    again = torch.cat([b["image"] for b in loader])
    labels = torch.cat([b["label"] for b in loader])
    assert torch.equal(first, again)  # no augmentation, fixed order
    assert set(labels.tolist()) == set(range(dm.seen_classes))
    assert len(labels) == dm.class_counts[: dm.seen_classes].sum()


def test_modes_joint_and_pretrain():
    joint = _datamodule(mode="joint")
    assert set(joint.splits["train"].labels.tolist()) == set(range(8)) and joint.seen_classes == 8
    pre = _datamodule(mode="pretrain")
    assert pre.num_classes == 4 and len(pre.splits["train"]) == 16 and len(pre.splits["val"]) == 4
    assert not set(pre.class_names) & set(joint.class_names)  # pretraining classes are not continual classes


def test_imagefolder_source_long_tail_and_balanced_eval(tmp_path):
    for split, per_class in (("train", [20, 20, 20]), ("test", [4, 3, 4])):
        for c, n in enumerate(per_class):
            for i in range(n):
                (tmp_path / split / f"dish{c}").mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((20, 24, 3), 40 * c, np.uint8)).save(tmp_path / split / f"dish{c}" / f"{i}.jpg")
    with pytest.warns(UserWarning) as record:
        dm = FoodCLData(source="imagefolder", path=str(tmp_path), mode="joint", long_tail=0.25, image_size=16, num_tasks=2)
        dm.setup()
    messages = " ".join(str(w.message) for w in record)
    assert "images per class range 3..4; keeping 3 per class" in messages and "no validation split" in messages
    assert sorted(dm.class_counts.tolist()) == [5, 10, 20]  # 20 * 0.25^(rank/2)
    assert np.bincount(dm.splits["test"].labels).tolist() == [3, 3, 3]
    image = dm.splits["test"][0]["image"]
    assert image.shape == (3, 16, 16)  # 20 x 24 resized and centre-cropped


def test_unreadable_image_is_an_error_naming_it(tmp_path):
    from domains.food_cl.readers import read_image_folder

    (tmp_path / "pho").mkdir()
    (tmp_path / "pho" / "broken.jpg").write_bytes(b"not a jpeg")
    images = read_image_folder(tmp_path)
    ds = FoodImages(images, images.labels, np.zeros(1, int), transform=lambda x: x)
    with pytest.raises(DatasetFormatError, match=r"pho/broken\.jpg: cannot be decoded as an image.*listed in"):
        ds[0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="task must be in 0..num_tasks-1"):
        FoodCLData(task=3, num_tasks=3)
    with pytest.raises(ValueError, match="needs `path`"):
        FoodCLData(source="food101")
    with pytest.raises(ValueError, match="needs `train_list` and `test_list`"):
        FoodCLData(source="list", train_list="train_lt.txt")
