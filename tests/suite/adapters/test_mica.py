"""MiCA against PEFT 0.21's ``init_lora_weights="mica"`` and against the SVD closed form."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from suite.adapters import MiCA, adapter_layers, export_peft, inject

peft = pytest.importorskip("peft")


def _principal_cosines(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between span(P) and span(Q) (orthonormal columns)."""
    return torch.linalg.svdvals(P.T.double() @ Q.double())


@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_B_spans_peft_mica_subspace(kind):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 40) if kind == "linear" else nn.Embedding(30, 16))
    ours = copy.deepcopy(base)
    inject(ours, MiCA(r=4, targets=["0"]))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["0"], init_lora_weights="mica"))
    layer = theirs.base_model.model[0]
    B_peft = layer.lora_B["default"].weight if kind == "linear" else layer.lora_embedding_B["default"]
    cos = _principal_cosines(ours[0].lora.B[0], B_peft.detach())
    assert cos.min() > 1 - 1e-6, f"principal angles not ~0: cosines {cos}"


def test_closed_form_minor_subspace_and_frozen_B():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(20, 30))
    W = m[0].weight.detach().clone()
    inject(m, MiCA(r=3, alpha=3, targets=["0"]))
    layer = m[0]
    B = layer.lora.B[0]
    torch.testing.assert_close(B.T @ B, torch.eye(3), atol=1e-5, rtol=0)  # orthonormal
    sv = torch.linalg.svdvals(W.double())
    # ||B^T W||_F^2 is the energy of W in span(B): the 3 smallest squared singular values
    torch.testing.assert_close((B.double().T @ W.double()).norm() ** 2, (sv[-3:] ** 2).sum(), rtol=1e-4, atol=1e-8)
    assert layer.lora.A.abs().max() == 0, "A starts at zero"
    assert "lora.B" not in dict(layer.named_parameters()) and "lora.B" in layer.adapter_state_dict(), "B is a saved buffer"
    x = torch.randn(8, 20)
    F.mse_loss(m(x), torch.randn(8, 30)).backward()
    assert layer.lora.A.grad.abs().sum() > 0
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["0.lora.A"]


def test_qkv_slices_take_their_own_minor_vectors():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 48))
    W = m[0].weight.detach()
    inject(m, MiCA(r=2, qkv=["q", "v"], targets=["0"]))
    B = m[0].lora.B
    for i, s in enumerate([0, 2]):
        U = torch.linalg.svd(W[s * 16 : (s + 1) * 16], full_matrices=False)[0]
        assert _principal_cosines(B[i], U[:, -2:]).min() > 1 - 1e-6


def test_training_parity_with_peft_mica(tmp_path):
    """Exported with init_lora_weights="mica", PEFT keeps B frozen and trains A exactly as we do."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 5))
    ours = copy.deepcopy(base)
    inject(ours, MiCA(r=3, alpha=6, targets=["0", "2"]))
    export_peft(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    x, y = torch.randn(16, 12), torch.randn(16, 5)
    for model in (ours, theirs):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        for _ in range(3):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == sum(
        p.numel() for p in ours.parameters() if p.requires_grad
    ), "PEFT trains only A, as MiCA does"
    assert ours[0].lora.A.abs().max() > 0
    torch.testing.assert_close(theirs(x), ours(x), atol=1e-5, rtol=1e-5)


def test_rank_above_the_weight_fails_clearly():
    with pytest.raises(ValueError, match="MiCA on '0': r=9 exceeds min"):
        inject(nn.Sequential(nn.Linear(8, 30)), MiCA(r=9, targets=["0"]))
    with pytest.raises(ValueError, match="no DoRA variant"):
        MiCA(dora=True, targets=["0"])
