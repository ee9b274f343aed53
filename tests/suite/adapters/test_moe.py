"""suite.adapters.moe: label and learned routing against dense references, growing the bank
without changing old outputs (bit-identical), router-row cloning, the Switch balance loss, and
the MoE adapter spec through inject / save / load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from suite.adapters import inject, load_adapters, save_adapters
from suite.adapters.moe import FeedForward, LowRankExpert, MixtureOfExperts, MoE, route_labels, switch_balance_loss

DIM = 8


def _bank(labels: list[str], seed: int = 0) -> MixtureOfExperts:
    torch.manual_seed(seed)
    return MixtureOfExperts([FeedForward(DIM, 16) for _ in labels], DIM, router="label", labels=labels)


def _trainable(module: nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


def test_label_router_with_one_expert_per_label_is_exactly_that_expert() -> None:
    bank = _bank(["W", "Ta"])
    x = torch.randn(4, 5, DIM)
    labels = ["W", "Ta", "Ta", "W"]
    y = bank(x, labels=labels)
    for b, lab in enumerate(labels):
        assert torch.equal(y[b], bank.experts[bank.label_experts(lab)[0]](x[b]))
    assert len(bank.router_weight) == 0  # gate is exactly 1: no router weights exist
    per_token = torch.tensor([[0, 1, 1, 0, 0]] * 4)  # labels per token also work
    y_tok = bank(x, labels=per_token)
    assert torch.equal(y_tok[:, 1], bank.experts[1](x[:, 1]))


def test_adding_a_label_keeps_old_outputs_bit_identical_and_trains_only_the_new_expert() -> None:
    bank = _bank(["W", "Ta"])
    x = torch.randn(6, 7, DIM)
    old_labels = ["W", "Ta", "W", "Ta", "Ta", "W"]
    before = bank(x, labels=old_labels)
    new = bank.add_expert(clone_from="W", label="Pb")
    assert new == [2] and bank.label_names == ["W", "Ta", "Pb"]
    assert all(torch.equal(a, b) for a, b in zip(bank.experts[2].parameters(), bank.experts[0].parameters()))
    assert _trainable(bank) == {n for n, _ in bank.named_parameters() if n.startswith("experts.2.")}
    # train the new expert for a few steps on mixed batches
    opt = torch.optim.AdamW([p for p in bank.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    mixed = ["W", "Pb", "Ta", "Pb", "W", "Pb"]
    for _ in range(3):
        opt.zero_grad()
        bank(x, labels=mixed).square().mean().backward()
        assert all(p.grad is None for n, p in bank.named_parameters() if not n.startswith("experts.2."))
        opt.step()
    assert not torch.equal(bank.experts[2].fc1.weight, bank.experts[0].fc1.weight)
    assert torch.equal(bank(x, labels=old_labels), before)
    # an old label's rows are gathered and computed alone, so even in a mixed batch they equal
    # what the old bank gives for exactly those rows
    rows = [0, 2, 4]
    old_rows = _bank(["W", "Ta"])(x[rows], labels=[mixed[i] for i in rows])
    assert torch.equal(bank(x, labels=mixed)[rows], old_rows)


def test_new_router_rows_are_copied_from_the_closest_label_not_the_last_expert() -> None:
    """FM4CAL's extend_model copied router row ``current_num_experts - 1`` (the last expert) for
    every new expert whatever ``closest_expert`` was; rows must come from the cloned experts."""
    torch.manual_seed(0)
    bank = MixtureOfExperts([FeedForward(DIM, 16) for _ in range(4)], DIM, router="label", labels=["W", "W", "Ta", "Ta"])
    assert len(bank.router_weight) == 4 and bank.experts_per_label == 2
    x = torch.randn(3, 5, DIM)
    before = bank(x, labels=["W", "Ta", "W"])
    new = bank.add_expert(clone_from="W", label="Pb")
    assert new == [4, 5]
    for src, dst in zip(bank.label_experts("W"), new):
        assert torch.equal(bank.router_weight[dst], bank.router_weight[src])
        assert torch.equal(bank.router_bias[dst], bank.router_bias[src])
    assert not torch.equal(bank.router_weight[5], bank.router_weight[3])  # not the last expert's row
    # within-label soft routing: Pb starts as an exact copy of W
    assert torch.allclose(bank(x, labels=["Pb"] * 3), bank(x, labels=["W"] * 3), atol=0, rtol=0)
    assert _trainable(bank) == {"router_weight.4", "router_weight.5", "router_bias.4", "router_bias.5"} | {
        n for n, _ in bank.named_parameters() if n.startswith(("experts.4.", "experts.5."))
    }
    assert torch.equal(bank(x, labels=["W", "Ta", "W"]), before)


def test_learned_top2_router_matches_a_dense_reference_and_reports_switch_loss() -> None:
    torch.manual_seed(1)
    bank = MixtureOfExperts([FeedForward(DIM, 16) for _ in range(4)], DIM, router="learned", top_k=2)
    x = torch.randn(10, DIM)
    y = bank(x)
    w = torch.stack(list(bank.router_weight))
    b = torch.cat(list(bank.router_bias))
    probs = torch.softmax(x @ w.T + b, -1)
    top = probs.topk(2, -1)
    dense = torch.stack([e(x) for e in bank.experts], 1)  # (N, E, D)
    gate = torch.zeros_like(probs).scatter(1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    assert torch.allclose(y, (gate[..., None] * dense).sum(1), atol=1e-6)
    aux = bank.aux_loss()
    frac = torch.bincount(top.indices[:, 0], minlength=4).float() / 10
    assert torch.allclose(aux, 4 * (frac * probs.mean(0)).sum())
    assert bank.aux_loss() is None  # read once per forward
    bank.eval()
    bank(x)
    assert bank.aux_loss() is None  # no balance loss outside training


def test_switch_balance_loss_closed_forms() -> None:
    n, e = 8, 4
    uniform = torch.full((n, e), 1 / e)
    balanced_top1 = torch.arange(n) % e
    assert torch.allclose(switch_balance_loss(uniform, balanced_top1), torch.tensor(1.0))
    collapsed = torch.zeros(n, e)
    collapsed[:, 0] = 1.0
    assert torch.allclose(switch_balance_loss(collapsed, torch.zeros(n, dtype=torch.long)), torch.tensor(float(e)))
    keep = torch.tensor([True] * 4 + [False] * 4)  # padding is left out
    assert torch.allclose(switch_balance_loss(collapsed, torch.zeros(n, dtype=torch.long), keep), torch.tensor(float(e)))


def test_learned_router_add_expert_clones_the_row_and_trains_only_it() -> None:
    torch.manual_seed(2)
    bank = MixtureOfExperts([FeedForward(DIM, 16) for _ in range(3)], DIM, router="learned")
    (new,) = bank.add_expert(clone_from=1)
    assert torch.equal(bank.router_weight[new], bank.router_weight[1])
    assert _trainable(bank) == {f"router_weight.{new}", f"router_bias.{new}"} | {
        n for n, _ in bank.named_parameters() if n.startswith(f"experts.{new}.")
    }


def test_bad_labels_and_extensions_fail_clearly() -> None:
    bank = _bank(["W", "Ta"])
    with pytest.raises(KeyError, match="unknown labels \\['Pb'\\]"):
        bank(torch.randn(1, 2, DIM), labels=["Pb"])
    with pytest.raises(ValueError, match="already has experts"):
        bank.add_expert(clone_from="W", label="Ta")
    with pytest.raises(TypeError, match="names a label"):
        bank.add_expert(clone_from=0, label="Pb")
    with pytest.raises(ValueError, match="needs `labels`"):
        bank(torch.randn(1, 2, DIM))
    with pytest.raises(ValueError, match="same number of experts"):
        MixtureOfExperts([FeedForward(DIM, 4)] * 3, DIM, router="label", labels=["W", "W", "Ta"])
    with pytest.raises(ValueError, match="labels are for router='label'"):
        MoE(num_experts=2, labels=["a", "b"], targets=["0"])  # a learned router would ignore them


def test_moe_adapter_spec_injects_saves_and_loads(tmp_path) -> None:
    def model() -> nn.Module:
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(DIM, DIM), nn.ReLU(), nn.Linear(DIM, 4))

    base, m = model(), model()
    report = inject(m, MoE(num_experts=3, r=2, top_k=1, targets=["0", "2"]))
    x = torch.randn(5, DIM)
    assert torch.equal(m(x), base(x))  # zero-initialised up-projections: unchanged at start
    assert report.trainable == sum(p.numel() for n, p in m.named_parameters() if ".moe." in n)
    assert all(".moe." in n for n, p in m.named_parameters() if p.requires_grad)
    for expert in m[0].moe.experts:  # give the experts something to save
        nn.init.normal_(expert.up.weight)
    assert isinstance(m[0].moe.experts[0], LowRankExpert)
    m.train()
    m(x).sum().backward()
    assert m[0].moe.aux_loss() is not None and m[0].aux_loss() is None  # counted once, by the bank
    save_adapters(m, tmp_path / "moe")
    fresh = model()
    load_adapters(fresh, tmp_path / "moe")
    m.eval(), fresh.eval()
    assert torch.equal(fresh(x), m(x))


def test_label_routed_moe_adapter_follows_route_labels() -> None:
    torch.manual_seed(4)
    m = nn.Sequential(nn.Linear(DIM, DIM))
    inject(m, MoE(num_experts=2, r=2, router="label", labels=["a", "b"], targets=["0"]))
    for expert in m[0].moe.experts:
        nn.init.normal_(expert.up.weight)
    x = torch.randn(2, DIM)
    with route_labels(m, ["a", "b"]):
        y = m(x)
    base = m[0].base_layer(x)
    assert torch.equal(y[0], base[0] + m[0].moe.experts[0](x[:1])[0])
    assert torch.equal(y[1], base[1] + m[0].moe.experts[1](x[1:])[0])
    assert m[0].route is None  # restored after the block
