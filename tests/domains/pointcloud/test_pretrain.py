"""Point-MAE pretraining as Point-MAE does it: scale-and-translate augmentation of the training
clouds, a 4-block 6-head decoder, and a corpus of classes that no few-shot episode uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from domains.pointcloud.data import PointCloudData
from domains.pointcloud.pretrain import SHIFT, SCALE, PointMAEPretrain, scale_and_translate, warmup_cosine
from domains.pointcloud.synth import FEW_SHOT_CLASSES, PRETRAIN_CLASSES
from suite.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[3]
ENC = {"trans_dim": 48, "depth": 2, "num_heads": 4, "num_group": 8, "group_size": 8, "embed_hidden": [8, 16]}  # 48: 4 and 6 heads


def point_mae_scale_and_translate(pc: torch.Tensor, xyz1: np.ndarray, xyz2: np.ndarray) -> torch.Tensor:
    """Point-MAE's ``PointcloudScaleAndTranslate.__call__`` (datasets/data_transforms.py), with the
    per-cloud draws ``xyz1`` (scale) and ``xyz2`` (shift) passed in instead of ``np.random``."""
    pc = pc.clone()
    for i in range(pc.size()[0]):
        pc[i, :, 0:3] = torch.mul(pc[i, :, 0:3], torch.from_numpy(xyz1[i]).float()) + torch.from_numpy(xyz2[i]).float()
    return pc


def test_scale_and_translate_is_point_maes_transform():
    points = torch.rand(6, 50, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    got = scale_and_translate(points, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)  # the same draws, in the same order
    scale = torch.empty(6, 1, 3).uniform_(*SCALE, generator=g)[:, 0].double().numpy()
    shift = torch.empty(6, 1, 3).uniform_(-SHIFT, SHIFT, generator=g)[:, 0].double().numpy()
    torch.testing.assert_close(got, point_mae_scale_and_translate(points, scale, shift), rtol=0, atol=1e-6)
    # the draws cover Point-MAE's ranges, independently per cloud and axis
    many = scale_and_translate(torch.ones(2000, 1, 3), torch.Generator().manual_seed(1))[:, 0] - scale_and_translate(
        torch.zeros(2000, 1, 3), torch.Generator().manual_seed(1))[:, 0]  # = the scales
    assert SCALE[0] <= many.min() < SCALE[0] + 0.01 and SCALE[1] - 0.01 < many.max() <= SCALE[1]
    assert abs(float(np.corrcoef(many[:, 0], many[:, 1])[0, 1])) < 0.1
    assert SCALE == (2 / 3, 3 / 2) and SHIFT == 0.2


def test_pretraining_reconstructs_augmented_clouds_seeded_by_step():
    model = PointMAEPretrain(encoder=ENC)
    seen = []
    model.reconstruct = lambda points, mask=None: (seen.append(points), {"pred": torch.zeros(1, 8, 3), "target": torch.zeros(1, 8, 3)})[1]
    clouds = torch.rand(4, 64, 3, generator=torch.Generator().manual_seed(2))
    model.train()
    model.compute_losses({"points": clouds})
    expected = scale_and_translate(clouds, torch.Generator().manual_seed(0 * 1_000_003 + 0))  # aug_seed 0, global step 0
    torch.testing.assert_close(seen[-1], expected, rtol=0, atol=0)
    model.compute_losses({"points": clouds})
    torch.testing.assert_close(seen[-1], expected, rtol=0, atol=0)  # the same step draws the same transform (resume)
    model.eval()
    model.compute_losses({"points": clouds})
    assert seen[-1] is clouds  # validation sees the clouds as they are
    plain = PointMAEPretrain(encoder=ENC, augment=False).train()
    plain.reconstruct = model.reconstruct
    plain.compute_losses({"points": clouds})
    assert seen[-1] is clouds


def test_decoder_is_point_maes_and_the_yaml_pretrains_on_disjoint_classes(data_dir):
    model = PointMAEPretrain(encoder=ENC)
    assert len(model.decoder.blocks) == 4 and {b.attn.num_heads for b in model.decoder.blocks} == {6}
    cfg = yaml.safe_load((ROOT / "domains/pointcloud/pretrain.yaml").read_text())
    args = cfg["model"]["init_args"]
    assert (args["decoder_depth"], args["decoder_heads"], args["augment"]) == (4, 6, True)
    assert args["encoder"]["trans_dim"] % args["decoder_heads"] == 0
    cli = cli_main(["--config", str(ROOT / "domains/pointcloud/pretrain.yaml"), "--data.init_args.pretrain_per_class", "1",
                    "--model.init_args.encoder", '{"trans_dim": 48, "depth": 1, "num_heads": 4, "num_group": 8, "group_size": 8, "embed_hidden": [8, 16]}'],
                   run=False)
    dm: PointCloudData = cli.datamodule
    pool = dm.pool("pretrain")
    assert pool.class_names == list(PRETRAIN_CLASSES) and not set(pool.class_names) & set(FEW_SHOT_CLASSES)
    assert len(cli.model.decoder.blocks) == 4


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SUITE_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def test_learning_rate_schedule_is_point_maes_timm_cosine():
    """Point-MAE's CosLR: timm's CosineLRScheduler(t_initial=epochs, lr_min=1e-6, warmup_lr_init=1e-6,
    warmup_t=initial_epochs), here stepped per optimiser step."""
    from timm.scheduler import CosineLRScheduler

    total, warm = 220, 10 / 300
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    ref = CosineLRScheduler(opt, t_initial=total, lr_min=1e-6, warmup_lr_init=1e-6, warmup_t=round(warm * total), cycle_limit=1)
    expected = [ref._get_lr(t)[0] for t in range(total + 1)]
    np.testing.assert_allclose([warmup_cosine(t, total, warm, 1e-3) for t in range(total + 1)], expected, rtol=1e-12, atol=0)

    model = PointMAEPretrain(encoder=ENC, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    model._trainer = type("T", (), {"estimated_stepping_batches": total})()  # what a fit of 220 steps reports
    out = model.configure_optimizers()
    sched = out["lr_scheduler"]["scheduler"]
    assert out["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(total):
        lrs.append(out["optimizer"].param_groups[0]["lr"])
        out["optimizer"].step()
        sched.step()
    np.testing.assert_allclose(lrs, expected[:total], rtol=1e-9)
    constant = PointMAEPretrain(encoder=ENC, lr_schedule="constant").configure_optimizers()
    assert isinstance(constant, torch.optim.Optimizer)
