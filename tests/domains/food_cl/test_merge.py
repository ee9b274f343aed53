"""DIME's spectral merge against its closed forms and the reference algorithm, the weight fix, and the baselines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from domains.food_cl.merge import average_merge, dime_merge, head_rank, spectral_merge, ties_merge

# shapes of one AdaptFormer adapter (d = 12, bottleneck 5): W_down, b_down, W_up, b_up
SHAPES = {"down.weight": (5, 12), "down.bias": (5,), "up.weight": (12, 5), "up.bias": (12,)}


def _stack(seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}


def _reference(old, new, c_old, c_new, rho_frac, rho_head, rho_tail):
    """The reference's svd_align_merge_adapter_into for one tensor, step by step (including its weights)."""
    dst, src = (new, old) if c_old <= c_new else (old, new)
    m_dst, m_src = dst.reshape(1, -1) if dst.dim() == 1 else dst, src.reshape(1, -1) if src.dim() == 1 else src
    u, s, vh = torch.linalg.svd(torch.cat([m_dst, m_src], 1), full_matrices=False)
    c = m_dst.shape[1]
    wd, ws = c_old / (c_old + c_new), c_new / (c_old + c_new)
    vh_dst, vh_src = vh[:, :c], vh[:, c:]
    delta = (wd * vh_dst + ws * vh_src) - vh_dst
    r = s.shape[0]
    mask = torch.full((r,), rho_tail, dtype=s.dtype)
    mask[: int(max(1, min(r - 1, round(rho_frac * r))))] = rho_head
    return ((u * s) @ (vh_dst + mask[:, None] * delta)).reshape(dst.shape)


@pytest.mark.parametrize("key", list(SHAPES))
@pytest.mark.parametrize("rho_frac", [0.6, 0.25])
def test_spectral_merge_closed_forms(key, rho_frac):
    dst, src = _stack(0)[key], _stack(1)[key]
    w, rho_head, rho_tail = 0.3, 0.2, 0.9
    out = spectral_merge(dst, src, w, rho_frac, rho_head, rho_tail)
    m_dst, m_src = dst.reshape(1, -1) if dst.dim() == 1 else dst, src.reshape(1, -1) if src.dim() == 1 else src
    x = np.concatenate([m_dst.numpy(), m_src.numpy()], 1)
    c = m_dst.shape[1]
    # 1) the sum over joint singular directions, with numpy's SVD: M_dst + sum_k rho_k w s_k u_k (v_src,k - v_dst,k)^T
    u, s, vh = np.linalg.svd(x, full_matrices=False)
    k_head = head_rank(len(s), rho_frac)
    rho = np.where(np.arange(len(s)) < k_head, rho_head, rho_tail)
    by_sum = m_dst.numpy() + sum(rho[k] * w * s[k] * np.outer(u[:, k], vh[k, c:] - vh[k, :c]) for k in range(len(s)))
    np.testing.assert_allclose(out.reshape(by_sum.shape).numpy(), by_sum, rtol=0, atol=1e-12)
    # 2) the projector form, with P_head from the eigenvectors of X X^T (no SVD)
    evals, evecs = np.linalg.eigh(x @ x.T)
    top = evecs[:, np.argsort(evals)[::-1][:k_head]]
    p_head = top @ top.T
    eye = np.eye(len(x))
    by_projector = m_dst.numpy() + w * (rho_head * p_head + rho_tail * (eye - p_head)) @ (m_src.numpy() - m_dst.numpy())
    np.testing.assert_allclose(out.reshape(by_projector.shape).numpy(), by_projector, rtol=0, atol=1e-10)


def test_equal_rho_is_linear_interpolation():
    a, b = _stack(2), _stack(3)
    for k in a:
        out = spectral_merge(a[k], b[k], 0.4, rho_frac=0.6, rho_head=0.7, rho_tail=0.7)
        torch.testing.assert_close(out, a[k] + 0.7 * 0.4 * (b[k] - a[k]), rtol=0, atol=1e-12)
    assert spectral_merge(a["up.bias"].float(), b["up.bias"].float(), 0.5).dtype == torch.float32


@pytest.mark.parametrize("c_old, c_new", [(30, 4), (3, 11), (6, 6)])
def test_reference_option_reproduces_the_reference(c_old, c_new):
    old, new = _stack(4), _stack(5)
    ours = dime_merge(old, new, c_old, c_new, weights="reference")
    for k in old:
        torch.testing.assert_close(ours[k], _reference(old[k], new[k], c_old, c_new, 0.6, 0.2, 0.9), rtol=0, atol=1e-12)


def test_weight_fix_both_ways():
    old, new = _stack(6), _stack(7)
    flat = dict(rho_head=1.0, rho_tail=1.0)  # rho = 1: the merge is a plain weighted average, easy to read
    # more old classes (the merged stack is the anchor): fix and reference agree, weights C_old/C and C_new/C
    for weights in ("own", "reference"):
        out = dime_merge(old, new, 30, 10, weights=weights, **flat)
        for k in old:
            torch.testing.assert_close(out[k], 0.75 * old[k] + 0.25 * new[k], rtol=0, atol=1e-12)
    # more new classes (the new adapter is the anchor): the fix keeps the class shares ...
    out = dime_merge(old, new, 10, 30, weights="own", **flat)
    for k in old:
        torch.testing.assert_close(out[k], 0.25 * old[k] + 0.75 * new[k], rtol=0, atol=1e-12)
    # ... the reference inverts them: the 30 new classes get the weight of the 10 old ones
    out = dime_merge(old, new, 10, 30, weights="reference", **flat)
    for k in old:
        torch.testing.assert_close(out[k], 0.75 * old[k] + 0.25 * new[k], rtol=0, atol=1e-12)
    # with DIME's rho the fixed merge moves the new anchor toward the old stack by the old share
    out = dime_merge(old, new, 10, 30)
    for k in old:
        torch.testing.assert_close(out[k], spectral_merge(new[k], old[k], 0.25, 0.6, 0.2, 0.9), rtol=0, atol=1e-12)


def test_first_task_copies_and_bad_input():
    new = _stack(8)
    for weights in ("own", "reference"):
        out = dime_merge({k: torch.zeros_like(v) for k, v in new.items()}, new, 0, 7, weights=weights)
        assert all(torch.equal(out[k], new[k]) for k in new) and out["up.bias"] is not new["up.bias"]
    with pytest.raises(ValueError, match=r"only in the first \['down\.bias'\]"):
        dime_merge(new, {k: v for k, v in new.items() if k != "down.bias"}, 3, 4)
    with pytest.raises(ValueError, match="weights must be 'own' or 'reference'"):
        dime_merge(new, new, 3, 4, weights="inverted")


def test_average_merge_by_hand():
    out = average_merge({"w": torch.tensor([[1.0, 2.0]])}, {"w": torch.tensor([[3.0, 6.0]])}, 1, 3)
    torch.testing.assert_close(out["w"], torch.tensor([[2.5, 5.0]]))  # (1*[1,2] + 3*[3,6]) / 4
    tasks = [_stack(10 + t) for t in range(4)]
    classes = [8, 2, 5, 1]
    plain, weighted = tasks[0], tasks[0]
    for t in range(1, 4):
        plain = average_merge(plain, tasks[t], t, 1)  # a running mean over tasks
        weighted = average_merge(weighted, tasks[t], sum(classes[:t]), classes[t])  # class-count weighted
    for k in SHAPES:
        torch.testing.assert_close(plain[k], sum(s[k] for s in tasks) / 4)
        torch.testing.assert_close(weighted[k], sum(c * s[k] for c, s in zip(classes, tasks)) / 16)


def test_ties_by_hand():
    # task vectors over two tensors, flattened a then b: [3, -1, 0.5, 2], [-2, -4, 1, 0.1], [1, -0.2, -3, 0.5]
    taus = [{"a": torch.tensor([3.0, -1.0]), "b": torch.tensor([0.5, 2.0])},
            {"a": torch.tensor([-2.0, -4.0]), "b": torch.tensor([1.0, 0.1])},
            {"a": torch.tensor([1.0, -0.2]), "b": torch.tensor([-3.0, 0.5])}]
    # trim to 2 of 4 entries: [3, 0, 0, 2], [-2, -4, 0, 0], [1, 0, -3, 0]; sum [2, -4, -3, 2] -> signs + - - +
    # disjoint means: (3 + 1) / 2 = 2, -4, -3, 2
    out = ties_merge(taus, density=0.5)
    torch.testing.assert_close(out["a"], torch.tensor([2.0, -4.0]))
    torch.testing.assert_close(out["b"], torch.tensor([-3.0, 2.0]))
    base = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([0.0, 0.0])}
    shifted = [{k: base[k] + t[k] for k in t} for t in taus]
    out = ties_merge(shifted, base=base, density=0.5, scale=0.5)
    torch.testing.assert_close(out["a"], torch.tensor([1.0 + 1.0, 1.0 - 2.0]))  # base + 0.5 * merged tau
    torch.testing.assert_close(out["b"], torch.tensor([-1.5, 1.0]))
    weighted = ties_merge(taus, density=0.5, weights=[1.0, 1.0, 3.0])
    torch.testing.assert_close(weighted["a"], torch.tensor([(1 * 3 + 3 * 1) / 4, -4.0]))
    full = ties_merge(taus, density=1.0)  # nothing trimmed: entry 1 = mean of the agreeing -1, -4, -0.2
    torch.testing.assert_close(full["a"][1], torch.tensor(-5.2 / 3))
