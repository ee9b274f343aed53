"""inject: which parameters it freezes and enables, stacked specs, and PEFT's target forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from suite.adapters import FeedForward, LoRA, MixtureOfExperts, MoE, adapter_layers, inject


class Net(nn.Module):
    """A vision tower and a language part side by side, plus a plain mixture of experts."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.vision = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
        self.lm = nn.ModuleDict({"q_proj": nn.Linear(8, 8), "v_proj": nn.Linear(8, 8), "lm_head": nn.Linear(8, 16)})
        self.ffn = MixtureOfExperts([FeedForward(8, 16), FeedForward(8, 16)], 8, router="label", labels=["a", "b"])
        self.head = nn.Linear(8, 2)

    def get_output_embeddings(self) -> nn.Module:  # the Hugging Face hook all-linear reads
        return self.lm["lm_head"]


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_two_specs_in_two_submodules_keep_each_others_adapters() -> None:
    net = Net()
    first = inject(net, LoRA(r=2, targets=["vision.0", "vision.2"]))
    second = inject(net, LoRA(r=4, targets=["lm.q_proj", "lm.v_proj"], modules_to_save=["head"]))
    trained = _trainable(net)
    assert {"vision.0.lora.A", "vision.2.lora.B", "lm.q_proj.lora.A", "lm.v_proj.lora.B", "head.weight"} <= trained
    assert not any(".base_layer." in n for n in trained)
    # the plain mixture of experts is not the spec's to freeze: it keeps its requires_grad
    assert {n for n in trained if n.startswith("ffn.")} == {n for n, _ in net.ffn.named_parameters(prefix="ffn")}
    # what each call froze, named
    assert "vision.0.base_layer.weight" in first.frozen and "lm.q_proj.weight" in first.frozen
    assert "vision.0.lora.A" not in second.frozen and "head.weight" not in second.frozen
    assert "froze" in str(first)


def test_experts_frozen_by_add_expert_stay_frozen_through_a_later_inject() -> None:
    net = Net()
    inject(net, MoE(num_experts=2, r=2, router="label", labels=["W", "Ta"], targets=["vision.0"]))
    moe = net.vision[0].moe
    new = moe.add_expert(clone_from="W", label="Pb", freeze_existing=True)
    frozen_before = {n for n, p in moe.named_parameters() if not p.requires_grad}
    assert frozen_before  # the old experts and router rows
    report = inject(net, LoRA(r=2, targets=["lm.q_proj"]))
    assert {n for n, p in moe.named_parameters() if not p.requires_grad} == frozen_before
    assert all(p.requires_grad for p in moe.experts[new[0]].parameters())
    assert not any(n.startswith("vision.0.moe.") for n in report.frozen)


def test_targets_as_one_regex_string_and_all_linear() -> None:
    net = Net()
    inject(net, LoRA(r=2, targets=r"lm\.(q|v)_proj"))  # what a PEFT user writes: a full-match regex
    assert {n for n, _ in adapter_layers(net)} == {"lm.q_proj", "lm.v_proj"}
    with pytest.raises(ValueError, match="matched no module"):
        inject(Net(), LoRA(r=2, targets=r"proj"))  # a regex must match the whole name, as in PEFT
    net = Net()
    inject(net, LoRA(r=2, targets="all-linear", exclude=r"head"))
    names = {n for n, _ in adapter_layers(net)}
    linear = {n for n, m in Net().named_modules() if isinstance(m, nn.Linear)}
    # every Linear but the output layer (get_output_embeddings) and the excluded head
    assert names == linear - {"lm.lm_head", "head"}
    spec = LoRA(r=2, targets="all-linear")
    assert spec.to_config()["init_args"]["targets"] == "all-linear"  # the string survives the round trip
