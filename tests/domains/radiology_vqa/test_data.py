"""The DataModules: item schema, patient-level splits, the cached generated set, the planted bias
as the loaders see it, resampling, the chat-encoder hook, (image, report) pairs, real-format sources."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from domains.radiology_vqa.data import IMAGE_TOKEN, RadiologyReportData, RadiologyVQAData
from domains.radiology_vqa.questions import FINDINGS

SMALL = dict(n_patients=40, image_size=32, real_table="priors", batch_size=6, bias_strength=1.0)


@pytest.fixture(scope="module")
def dm():
    data = RadiologyVQAData(**SMALL)
    data.setup("fit")
    return data


def test_item_schema(dm):
    item = dm.splits["train"][0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert torch.equal(item["image"][0], item["image"][1])  # grayscale replicated
    user, assistant = item["messages"]
    assert user["role"] == "user" and user["content"].startswith(f"{IMAGE_TOKEN}\n") and assistant["role"] == "assistant"
    assert user["content"] == f"{IMAGE_TOKEN}\n{item['question']}" and assistant["content"] == item["answer"]
    assert item["question_type"] in ("closed", "open") and set(item["groups"]) == {"age", "sex", "race"}
    assert all(0 <= item["group_ids"][a] < n for a, n in dm.attribute_classes.items())
    assert dm.attribute_classes == {"age": 3, "sex": 2, "race": 3} and dm.num_groups == 18
    assert item["findings"].shape == (len(FINDINGS),) and set(item["findings"].tolist()) <= {0.0, 1.0}
    assert item["patient_id"].isdigit() and item["id"]


def test_splits_are_disjoint_by_patient_and_recorded(dm):
    patients = {name: {r.patient_id for r in dm.splits[name].records} for name in ("train", "val", "test")}
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"] or patients["val"] & patients["test"])
    assert all(dm.split_sizes[n] == len(dm.splits[n]) for n in ("train", "val", "test"))
    again = RadiologyVQAData(**SMALL)  # reads the cached set: same split, same hashes
    again.setup()
    assert again.split_hashes == dm.split_hashes and len(again.split_hashes["train"]) == 16
    other = RadiologyVQAData(**{**SMALL, "generator_seed": 1})
    other.setup()
    assert other.split_hashes["train"] != dm.split_hashes["train"]


def test_batches_and_the_chat_encoder_hook(dm):
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (6, 3, 32, 32) and len(batch["messages"]) == 6
    assert batch["closed"].dtype == torch.bool and batch["group_ids"]["sex"].shape == (6,) and batch["findings"].shape == (6, 4)
    seen = []

    def encode(messages):
        seen.append(messages)
        return {"input_ids": torch.ones(len(messages), 5, dtype=torch.long)}

    dm.set_chat_encoder(encode)
    try:
        batch = next(iter(dm.train_dataloader()))
    finally:
        dm.set_chat_encoder(None)
    assert batch["input_ids"].shape == (6, 5) and seen[0] == batch["messages"]


def test_generated_training_split_carries_the_planted_bias(dm):
    # bias_strength 1: every training image of a woman shows cardiomegaly and no man's does; the
    # measured absence in validation / test (on larger sets) is in test_synth
    def agreement(*splits):  # share of images where "is a woman" equals "has cardiomegaly"
        seen = {r.image: (r.groups["sex"] == "female") == (r.findings["cardiomegaly"] == 1)
                for s in splits for r in dm.splits[s].records}
        return np.mean(list(seen.values()))

    assert agreement("train") == 1.0
    assert agreement("val", "test") < 0.8  # ~0.5 when independent (cardiomegaly on ~22 %)
    closed = RadiologyVQAData(**{**SMALL, "question_types": ("closed",)})
    closed.setup()
    assert {r.question_type for r in closed.splits["train"].records} == {"closed"}


def test_group_resampling_balances_the_training_groups():
    data = RadiologyVQAData(**{**SMALL, "resample": "group", "balance_on": ("age",), "batch_size": 50})
    data.setup()
    assert data.num_groups == 3
    ds = data.splits["train"]
    natural = np.bincount([ds.group(i) for i in range(len(ds))], minlength=3) / len(ds)
    drawn = torch.cat([b["group"] for b, _ in zip(data.train_dataloader(), range(12))])
    shares = np.bincount(drawn.numpy(), minlength=3) / len(drawn)
    assert np.allclose(shares, 1 / 3, atol=0.06)  # age bands are ~35 / 50 / 15 % of items otherwise
    assert np.abs(natural - 1 / 3).max() > 0.1
    first = torch.cat([b["group"] for b, _ in zip(data.train_dataloader(), range(2))])
    assert torch.equal(first, drawn[:100])  # seeded: the same draws on every pass of epoch 0


def test_report_pairs_for_clip():
    data = RadiologyReportData(**SMALL)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"image", "text", "id"} and batch["image"].shape == (6, 3, 32, 32)
    assert all(isinstance(t, str) and "FINDINGS" not in t and len(t) > 20 for t in batch["text"])
    assert data.split_sizes["train"] > data.split_sizes["val"] > 0
    with pytest.raises(ValueError, match="report pairs need radiology reports"):
        RadiologyReportData(source="vqa_rad", path="x.json").setup()


def _llava_file(tmp_path, n=24):
    entries = []
    for i in range(n):
        name = f"img{i}.png"
        Image.fromarray(np.full((20, 24), 10 * i, np.uint8)).save(tmp_path / name)
        entries.append({"id": f"q{i}", "image": name, "subject_id": i // 2, "gender": "MF"[i % 2], "anchor_age": 30 + 2 * i,
                        "race_major": ["WHITE", "ASIAN", "BLACK/AFRICAN AMERICAN"][i % 3],
                        "conversations": [{"from": "human", "value": "<image>\nIs there an effusion?"},
                                          {"from": "gpt", "value": "yes" if i % 4 else "no"}]})
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(entries))
    return path


def test_llava_source_is_split_by_patient_and_resized(tmp_path):
    data = RadiologyVQAData(source="llava", path=str(_llava_file(tmp_path)), image_size=16, batch_size=4)
    data.setup()
    assert data.splits["train"][0]["image"].shape == (3, 16, 16)
    owners = {}
    for name in ("train", "val", "test"):
        for r in data.splits[name].records:
            owners.setdefault(r.patient_id, set()).add(name)
    assert all(len(s) == 1 for s in owners.values())
    assert data.attribute_classes == {"age": 3, "sex": 2, "race": 3}  # group names come from the data


def test_split_files_and_bad_arguments(tmp_path):
    path = _llava_file(tmp_path)
    data = RadiologyVQAData(source="llava", path={"train": str(path), "val": str(path)}, image_size=16)
    data.setup()
    assert data.splits["test"] is data.splits["val"]  # no test file: test scores the validation split
    with pytest.raises(ValueError, match="needs `path`"):
        RadiologyVQAData(source="mimic")
    with pytest.raises(ValueError, match="resample must be"):
        RadiologyVQAData(resample="always")
    with pytest.raises(ValueError, match="bias_group for sex must be one of"):
        RadiologyVQAData(bias_group="old")
    fresh = RadiologyVQAData(balance_on=("sex", "race"))  # known before setup (links at instantiation)
    assert fresh.attribute_classes == {"age": 3, "sex": 2, "race": 3} and fresh.num_groups == 6 and not fresh.splits
    real = RadiologyVQAData(source="llava", path=str(path), image_size=16, attributes=("sex",))
    assert real.attribute_classes == {"sex": 2} and real.splits  # real data: read to find its groups
