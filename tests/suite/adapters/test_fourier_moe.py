"""FourierMoE: closed-form inverse DFT, exact realness, the spectral forward, routing and saving.

References: the 2-D inverse DFT written out with explicit DFT matrices in complex128 (numpy),
``dW = scale/(MN) * Omega_M F Omega_N^T``, from the full conjugate-symmetric spectrum ``F``; and
Switch routing written out in float64 numpy (softmax, top-k kept without renormalising, the
balance loss ``E * sum_e f_e P_e``).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from suite.adapters import FourierMoE, FourierMoELinear, adapter_layers, inject, merge


def _layer(M, N, **kw) -> FourierMoELinear:
    torch.manual_seed(0)
    return FourierMoELinear(nn.Linear(N, M), FourierMoE(targets=["x"], **kw), "x")


def _full_spectrum(layer: FourierMoELinear, e: int) -> np.ndarray:
    """Expert e's coefficients placed on the full M x N grid, mirrored as conj at (-u, -v)."""
    M, N = layer.base_layer.weight.shape
    F = np.zeros((M, N), dtype=np.complex128)
    c = layer.complex_coefficients()[e].detach().to(torch.complex128).numpy()
    for i, u in enumerate(layer.row_idx[e].tolist()):
        for j, v in enumerate(layer.col_idx[e].tolist()):
            if layer.bin_weight[e, i, j] == 0:
                continue  # redundant half of a self-conjugate column
            F[u, v] += c[i, j]
            if (u, v) != ((-u) % M, (-v) % N):
                F[(-u) % M, (-v) % N] += np.conj(c[i, j])
    return F


def _closed_form_delta(layer: FourierMoELinear, e: int) -> np.ndarray:
    """Expert e's dW by the explicit 2-D inverse DFT of its full spectrum (complex128)."""
    M, N = layer.base_layer.weight.shape
    F = _full_spectrum(layer, e)
    om_M = np.exp(2j * np.pi * np.outer(np.arange(M), np.arange(M)) / M)
    om_N = np.exp(2j * np.pi * np.outer(np.arange(N), np.arange(N)) / N)
    return layer.spec.scale / (M * N) * om_M @ F @ om_N.T


def _switch_gates(x: np.ndarray, router: np.ndarray, k: int) -> tuple[np.ndarray, float, np.ndarray]:
    """Switch routing in float64: p = softmax(x R^T); the k largest p_e kept as gates (not
    renormalised), 0 elsewhere; balance loss E * sum_e f_e P_e with f_e the share of the T*k
    assignments and P_e the mean probability. Also the logits sorted per token (to check for ties)."""
    logits = x @ router.T
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    T, E = p.shape
    gates = np.zeros_like(p)
    counts = np.zeros(E)
    for t in range(T):
        chosen = sorted(range(E), key=lambda e: -p[t, e])[:k]
        for e in chosen:
            gates[t, e] = p[t, e]
            counts[e] += 1
    balance = E * float(np.sum(counts / (T * k) * p.mean(0)))
    return gates, balance, -np.sort(-logits, axis=-1)


@pytest.mark.parametrize("M,N", [(24, 16), (25, 15), (12, 33)])
def test_single_expert_is_the_closed_form_inverse_dft(M, N):
    layer = _layer(M, N, experts=1, top_k=1, rows=M // 2, cols=N // 2 + 1, scale=7.0)
    with torch.no_grad():
        layer.coefficients.normal_()
    F = _full_spectrum(layer, 0)
    np.testing.assert_allclose(F, np.conj(F[(-np.arange(M)) % M][:, (-np.arange(N)) % N]), atol=0)  # Hermitian
    dW = _closed_form_delta(layer, 0)
    assert np.abs(dW.imag).max() <= 1e-12 * np.abs(dW.real).max(), "conjugate symmetry makes dW exactly real"
    ours = layer.delta_weight().detach().double().numpy()
    np.testing.assert_allclose(ours, dW.real, rtol=0, atol=1e-5 * np.abs(dW.real).max())
    x = torch.randn(5, N)
    torch.testing.assert_close(layer(x) - layer.base_layer(x), x @ layer.delta_weight().T, atol=1e-5, rtol=1e-4)


def test_self_conjugate_bins_are_real_and_redundant_bins_inert():
    layer = _layer(8, 6, experts=1, top_k=1, rows=8, cols=4)  # every row and column: all bins
    u, v = layer.row_idx[0][:, None], layer.col_idx[0][None, :]
    boundary = (v == 0) | (v == 3)
    assert torch.equal(layer.imag_mask[0] == 0, boundary & ((u == 0) | (u == 4)))
    assert torch.equal(layer.bin_weight[0] == 0, boundary & (u > 4))
    with torch.no_grad():
        layer.coefficients.normal_()
    layer(torch.randn(3, 6)).sum().backward()
    g = layer.coefficients.grad[0]
    assert torch.all(g[..., 0][layer.bin_weight[0] == 0] == 0) and torch.all(g[..., 1][layer.imag_mask[0] == 0] == 0)
    # 8 x 6 real weight: exactly 48 free real numbers among the bins
    free = (layer.bin_weight[0] > 0).sum() + ((layer.bin_weight[0] > 0) & (layer.imag_mask[0] > 0)).sum()
    assert free == 48


@settings(max_examples=20, deadline=None)
@given(
    M=st.integers(4, 40), N=st.integers(4, 40), E=st.integers(1, 3), k=st.integers(1, 3),
    rows=st.integers(1, 3), cols=st.integers(1, 2), seed=st.integers(0, 5),
)
def test_spectral_forward_equals_dense_experts(M, N, E, k, rows, cols, seed):
    """The FFT path is exact: it matches applying E dense irfft2 matrices with the same gates."""
    k = min(k, E)
    assume(cols <= (N // 2 + 1) // E and rows <= M // (2 * E))  # bands wide enough (the error is tested below)
    layer = _layer(M, N, experts=E, top_k=k, rows=rows, cols=cols, seed=seed)
    with torch.no_grad():
        layer.coefficients.normal_()
    x = torch.randn(2, 3, N)
    y = layer(x)
    layer.impl = "dense"
    torch.testing.assert_close(y, layer(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_top_k_gates_and_forward_match_a_plain_softmax_top_k(k):
    """Gates, balance loss and the routed forward against float64 numpy written here: the output
    is W x + b + sum_e g_e(x) dW_e x with g from _switch_gates and dW_e from the explicit inverse
    DFT. Tolerances: gates 1e-6 (fp32 softmax), output 1e-4 of its scale (fp32 FFTs)."""
    layer = _layer(16, 24, experts=4, top_k=k, rows=2, cols=3, scale=20.0)
    with torch.no_grad():
        layer.coefficients.normal_()
        layer.router.mul_(8.0)  # peaked routing, far from uniform
    x = torch.randn(6, 9, 24, generator=torch.Generator().manual_seed(1))
    xf = x.reshape(-1, 24)
    gates, balance, logits = _switch_gates(xf.double().numpy(), layer.router.detach().double().numpy(), k)
    if k < 4:  # no near-tie at the k-th place, where fp32 and fp64 could choose differently
        assert (logits[:, k - 1] - logits[:, k]).min() > 1e-3

    ours = layer.route(xf).detach().double().numpy()
    np.testing.assert_allclose(ours, gates, rtol=0, atol=1e-6)
    assert ((ours > 0).sum(-1) == k).all()
    assert layer.aux_loss().item() == pytest.approx(balance, rel=1e-5)
    assert k == 4 or (gates.sum(-1) < 1 - 1e-3).any(), "top-k gates are not renormalised to sum to 1"

    deltas = np.stack([_closed_form_delta(layer, e).real for e in range(4)])  # (E, M, N)
    base = layer.base_layer(x).detach().double().numpy().reshape(-1, 16)
    expected = base + np.einsum("te,emn,tn->tm", gates, deltas, xf.double().numpy())
    got = layer(x).detach().double().numpy().reshape(-1, 16)
    assert np.abs(expected - base).max() > 0.1, "the experts must change the output for the check to mean anything"
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_balance_loss_switch_values():
    layer = _layer(16, 16, experts=4, top_k=2, rows=2, cols=2)
    with torch.no_grad():
        layer.router.zero_()  # uniform probabilities: perfectly balanced in expectation
    layer(torch.randn(10, 16))
    torch.testing.assert_close(layer.aux_loss(), torch.tensor(1.0))  # E * sum_e f_e P_e = 4 * (2 * 1/2 * 1/4)
    layer = _layer(16, 16, experts=4, top_k=1, rows=2, cols=2)
    with torch.no_grad():
        layer.router.zero_()
        layer.router[0] = 50.0  # everything to expert 0
    layer(torch.ones(10, 16))
    torch.testing.assert_close(layer.aux_loss(), torch.tensor(4.0), atol=1e-4, rtol=0)


def test_zero_init_routing_gradients_and_merge_rules():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    x = torch.randn(4, 5, 16)
    y0 = m(x)
    inject(m, FourierMoE(experts=2, top_k=1, rows=4, cols=2, targets=["0", "2"]))
    torch.testing.assert_close(m(x), y0, atol=0, rtol=0)
    with torch.no_grad():
        m[0].coefficients.normal_()
    m(x).pow(2).mean().backward()
    assert m[0].router.grad.abs().sum() > 0 and m[0].coefficients.grad.abs().sum() > 0
    with pytest.raises(NotImplementedError, match="only experts=1 merges"):
        merge(m)
    single = nn.Sequential(nn.Linear(16, 32))
    inject(single, FourierMoE(experts=1, top_k=1, rows=4, cols=2, targets=["0"]))
    with torch.no_grad():
        single[0].coefficients.normal_()
        y = single(x)
        merge(single)
        torch.testing.assert_close(single(x), y, atol=1e-5, rtol=1e-5)


def test_positions_travel_with_the_coefficients():
    torch.manual_seed(0)
    a, b = nn.Sequential(nn.Linear(32, 32)), None
    b = copy.deepcopy(a)
    inject(a, FourierMoE(experts=2, rows=4, cols=3, seed=0, targets=["0"]))
    inject(b, FourierMoE(experts=2, rows=4, cols=3, seed=1, targets=["0"]))
    assert not torch.equal(a[0].col_idx, b[0].col_idx) or not torch.equal(a[0].row_idx, b[0].row_idx)
    with torch.no_grad():
        a[0].coefficients.normal_()
    b[0].load_state_dict(a[0].state_dict())
    x = torch.randn(3, 32)
    torch.testing.assert_close(b(x), a(x), atol=0, rtol=0)
    assert {"row_idx", "col_idx", "bin_weight", "imag_mask"} <= set(a[0].adapter_state_dict())
    a(x)
    copy.deepcopy(a)  # the stored balance loss (an autograd graph) must not block copies


def test_bands_too_narrow_fail_clearly():
    with pytest.raises(ValueError, match=r"FourierMoE on '0' \(8x8\): expert 0's band has 5 rows x 3 columns, fewer than rows=2, cols=4"):
        inject(nn.Sequential(nn.Linear(8, 8)), FourierMoE(experts=2, rows=2, cols=4, targets=["0"]))
    with pytest.raises(ValueError, match="top_k <= experts"):
        FourierMoE(experts=2, top_k=3, targets=["0"])
    with pytest.raises(TypeError, match="nn.Linear only"):
        inject(nn.Sequential(nn.Conv2d(3, 3, 1)), FourierMoE(targets=["0"]))


def test_half_precision_model_keeps_fp32_spectra():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32))
    inject(m, FourierMoE(experts=2, top_k=1, rows=4, cols=2, targets=["0"]))
    with torch.no_grad():
        m[0].coefficients.normal_()
    x = torch.randn(3, 16)
    y32 = m(x)
    m.to(torch.bfloat16)
    y16 = m(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=0.1, rtol=0.05)  # bf16 base matmul round-off
