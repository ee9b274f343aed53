"""AdaptFormer adapters on a tiny timm ViT, the cosine and prototype heads, and Balanced Softmax."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from domains.food_cl.adapters import (
    AdaptFormer,
    CosineClassifier,
    ParallelAdapter,
    PrototypeClassifier,
    adapter_stack,
    balanced_softmax_loss,
    load_adapter_stack,
    parallel_adapters,
    reset_trained,
    set_branch,
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
