"""AdaptFormer adapters on a tiny timm ViT, the cosine and prototype heads, and Balanced Softmax."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from domains.food_cl.adapters import (
    AdaptFormer,
    CosineClassifier,
    ParallelAdapter,
    PrototypeClassifier,
    adapter_stack,
    average_merge,
    balanced_softmax_loss,
    dime_merge,
    head_rank,
    load_adapter_stack,
    parallel_adapters,
    reset_trained,
    set_branch,
    spectral_merge,
    ties_merge,
    using_branch,
)
from suite.adapters import inject, load_adapters, save_adapters


def _vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32).eval()


@pytest.fixture
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_inject_places_one_adapter_per_block_and_starts_as_identity(images):
    model = _vit()
    frozen = copy.deepcopy(model)
    report = inject(model, AdaptFormer(bottleneck=8))
    layers = parallel_adapters(model)
    assert [n for n, _ in layers] == [f"blocks.{i}.mlp" for i in range(6)] and report.adapted == [n for n, _ in layers]
    d = 64
    assert report.trainable == 6 * (d * 8 + 8 + 8 * d + d)  # W_down, b_down, W_up, b_up per block, nothing else
    for _, layer in layers:
        assert torch.count_nonzero(layer.up.weight) == 0 and torch.count_nonzero(layer.up.bias) == 0
        assert torch.count_nonzero(layer.down.bias) == 0
        bound = 1 / math.sqrt(d)  # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert layer.down.weight.abs().max() <= bound and layer.down.weight.std() > 0.5 * bound / math.sqrt(3)
    with torch.no_grad():
        assert torch.equal(model(images), frozen(images))  # zero up-projection: the frozen model exactly


def test_forward_is_mlp_plus_scaled_bottleneck():
    model = _vit()
    inject(model, AdaptFormer(bottleneck=8, scale=0.1))
    layer = model.blocks[0].mlp
    with torch.no_grad():
        layer.up.weight.normal_()
        layer.up.bias.normal_()
    x = torch.randn(2, 5, 64)
    expected = layer.base_layer(x) + 0.1 * layer.up(F.relu(layer.down(x)))
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)
    layer.train()
    assert not torch.equal(layer(x), layer(x))  # dropout 0.1 on the hidden units while training
    set_branch(model, "merged")
    assert torch.equal(layer(x), layer(x))  # the merged adapter never drops out
    set_branch(model, "none")
    assert torch.equal(layer(x), layer.base_layer(x))


def test_branches_and_stacks(images):
    model = _vit()
    frozen = copy.deepcopy(model)
    inject(model, AdaptFormer(bottleneck=8))
    with torch.no_grad():
        for _, layer in parallel_adapters(model):
            layer.up.weight.normal_(0, 0.5)
    stack = adapter_stack(model, "trained")
    assert set(stack) == {f"blocks.{i}.mlp.{k}" for i in range(6) for k in ("down.weight", "down.bias", "up.weight", "up.bias")}
    with torch.no_grad():
        trained_out = model(images)
        with using_branch(model, "merged"):
            assert torch.equal(model(images), frozen(images))  # the merged adapter starts at zero
        load_adapter_stack(model, stack, "merged")
        with using_branch(model, "merged"):
            torch.testing.assert_close(model(images), trained_out, rtol=0, atol=0)
    assert all(layer.branch == "trained" for _, layer in parallel_adapters(model))  # restored
    reset_trained(model, seed=3)
    assert torch.equal(adapter_stack(model, "merged")["blocks.0.mlp.up.weight"], stack["blocks.0.mlp.up.weight"])
    assert torch.count_nonzero(adapter_stack(model)["blocks.0.mlp.up.weight"]) == 0
    other = _vit()
    inject(other, AdaptFormer(bottleneck=8))
    reset_trained(other, seed=3)
    assert torch.equal(adapter_stack(other)["blocks.2.mlp.down.weight"], adapter_stack(model)["blocks.2.mlp.down.weight"])
    with pytest.raises(ValueError, match=r"missing \['blocks\.0\.mlp\.down\.bias'\]"):
        load_adapter_stack(model, {k: v for k, v in stack.items() if k != "blocks.0.mlp.down.bias"}, "merged")


def test_only_the_trained_adapter_gets_gradients(images):
    model = _vit()
    inject(model, AdaptFormer(bottleneck=8))
    with torch.no_grad():
        load_adapter_stack(model, {k: torch.randn_like(v) for k, v in adapter_stack(model).items()}, "merged")
    model(images).sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.mlp.{k}" for i in range(6) for k in ("down.weight", "down.bias", "up.weight", "up.bias")}
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert not any(b.requires_grad for n, b in model.named_buffers() if "merged_" in n)


def test_save_and_load_through_suite_adapters(tmp_path, images):
    model = _vit()
    inject(model, AdaptFormer(bottleneck=8))
    with torch.no_grad():
        load_adapter_stack(model, {k: torch.randn_like(v) for k, v in adapter_stack(model).items()}, "trained")
        load_adapter_stack(model, {k: torch.randn_like(v) for k, v in adapter_stack(model).items()}, "merged")
    save_adapters(model, tmp_path / "adapters")
    fresh = _vit()
    load_adapters(fresh, tmp_path / "adapters")  # injects AdaptFormer from the saved config
    assert isinstance(fresh.blocks[3].mlp, ParallelAdapter)
    for branch in ("trained", "merged"):
        a, b = adapter_stack(model, branch), adapter_stack(fresh, branch)
        assert all(torch.equal(a[k], b[k]) for k in a)
        with torch.no_grad(), using_branch(model, branch), using_branch(fresh, branch):
            assert torch.equal(model(images), fresh(images))


def test_adaptformer_refuses_other_layers():
    model = _vit()
    with pytest.raises(TypeError, match="AdaptFormer wraps a transformer MLP"):
        inject(model, AdaptFormer(targets=[r"blocks\.0\.attn"]))
    with pytest.raises(ValueError, match="bottleneck >= 1"):
        AdaptFormer(bottleneck=0)


def test_cosine_and_prototype_classifiers():
    head = CosineClassifier(2, 2, scale=3.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    x = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    expected = 3.0 * torch.tensor([[1.0, 1 / math.sqrt(2)], [0.0, 1 / math.sqrt(2)]])
    torch.testing.assert_close(head(x), expected)
    assert head.scale.requires_grad and "scale" in dict(head.named_parameters())
    assert head.scale.shape == (1,)  # not 0-d: FSDP2 shards no scalar parameter
    fixed = CosineClassifier(2, 2, learn_scale=False)
    assert "scale" in dict(fixed.named_buffers())

    protos = PrototypeClassifier(2, 4)
    features = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    assert protos.write(features, torch.tensor([2, 2, 0, 0])) == [0, 2]
    torch.testing.assert_close(protos.prototypes[2], torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(protos.prototypes[0], torch.tensor([0.0, 3.0]))
    logits = protos(torch.tensor([[1.0, 0.1], [0.1, 1.0]]))
    assert torch.isinf(logits[:, [1, 3]]).all() and logits.argmax(1).tolist() == [2, 0]
    assert set(protos.state_dict()) == {"prototypes", "filled"}


def test_balanced_softmax_by_hand():
    logits = torch.zeros(2, 2)
    counts = torch.tensor([1.0, 3.0])
    # softmax of (0 + log 1, 0 + log 3) = (1/4, 3/4): -log 1/4 for class 0, -log 3/4 for class 1
    loss = balanced_softmax_loss(logits, torch.tensor([0, 1]), counts, reduction="none")
    torch.testing.assert_close(loss, torch.tensor([math.log(4), -math.log(0.75)]))
    z = torch.tensor([[0.3, -1.2, 2.0]])
    n = torch.tensor([10.0, 0.0, 2.0])  # a zero count is clamped to 1, as in the reference
    manual = -math.log(10 * math.exp(0.3) / (10 * math.exp(0.3) + 1 * math.exp(-1.2) + 2 * math.exp(2.0)))
    torch.testing.assert_close(balanced_softmax_loss(z, torch.tensor([0]), n), torch.tensor(manual))
    with pytest.raises(ValueError, match=r"class_counts has shape \(2,\), expected \(3,\)"):
        balanced_softmax_loss(z, torch.tensor([0]), counts)


# --------------------------------------------------------------------------------------------------
# DIME's spectral merge against its closed forms and the reference algorithm, the weight fix, and the baselines.


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
