"""Point-MAE encoder checkpoints: a suite Lightning checkpoint loads through the same reader."""

from __future__ import annotations

import torch

from suite.backbones.point import PointEncoder, PointEncoderConfig, load_point_mae

TINY = PointEncoderConfig(trans_dim=32, depth=2, num_heads=2, num_group=8, group_size=8, embed_hidden=(8, 16))


def test_lightning_checkpoint_loads_the_backbone_and_ignores_the_rest(tmp_path):
    torch.manual_seed(1)
    src = PointEncoder(TINY)
    state = {f"backbone.{k}": v for k, v in src.state_dict().items()} | {"head.weight": torch.ones(3, 64)}
    torch.save({"state_dict": state, "epoch": 2, "hyper_parameters": {"encoder": TINY.to_dict()}}, tmp_path / "last.ckpt")
    torch.manual_seed(2)
    dst = PointEncoder(TINY)
    report = load_point_mae(dst, tmp_path / "last.ckpt")
    assert report.missing == [] and report.ignored == []
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
