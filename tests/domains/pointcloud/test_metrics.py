"""The accuracy and loss the point-cloud classifier logs, pinned against a hand computation on a
fixed set of batches (micro accuracy over every cloud, not a mean of per-batch accuracies)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from domains.pointcloud.model import PointCloudClassifier

TINY = {"trans_dim": 32, "depth": 2, "num_heads": 2, "num_group": 8, "group_size": 8, "embed_hidden": [8, 16]}


def test_logged_test_accuracy_and_loss_equal_a_hand_computation(tmp_path):
    torch.manual_seed(0)
    model = PointCloudClassifier(num_classes=4, encoder=TINY, init_from=None)
    g = torch.Generator().manual_seed(1)
    sizes = (5, 3)  # unequal batches: the mean of per-batch accuracies differs from the micro accuracy
    batches = [{"points": torch.rand(n, 64, 3, generator=g) * 2 - 1, "label": torch.randint(0, 4, (n,), generator=g),
                "index": torch.arange(n)} for n in sizes]
    model.eval()
    with torch.no_grad():
        logits = [model(b["points"]) for b in batches]
    right = [(lg.argmax(-1) == b["label"]).float() for lg, b in zip(logits, batches)]
    acc = float(torch.cat(right).mean())
    loss = float(sum(F.cross_entropy(lg, b["label"], reduction="sum") for lg, b in zip(logits, batches)) / sum(sizes))
    per_batch_mean = float(torch.stack([r.mean() for r in right]).mean())
    assert 0 < acc < 1 and abs(per_batch_mean - acc) > 1e-3  # the fixed batches tell the two averages apart

    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
    loader = DataLoader(batches, batch_size=None)  # the fixed batches, as they are
    logged = trainer.test(model, dataloaders=loader, verbose=False)[0]
    assert logged["test/acc"] == pytest.approx(acc, abs=1e-6)
    assert logged["test/loss"] == pytest.approx(loss, rel=1e-5)  # batch-size-weighted mean of the batch losses
