"""The two shower networks: the fm4cal architecture is the reference's ECAL_GPT (cross-attention
first block fed by the energy stream, z / Nz on every channel, linear [-1, 1] energy input,
rotary positions on half of each head, heads on one hidden state), cached decoding equals the
full forward for both, and growing by a class keeps old outputs bit-identical for both."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from domains.calorimetry.data import ShowerTokenizer
from domains.calorimetry.network import (
    ARCHITECTURES,
    REFERENCE_SAMPLING,
    Attention,
    Fm4calTransformer,
    Sampling,
    draw,
    filter_logits,
    rope,
    temperature_at,
)
from suite.adapters import LoRA

GRID = (8, 6, 6)
TOK = ShowerTokenizer(288, 50.0, 1.2e5, 32)
CLASSES = ["W_photon", "Ta_photon"]


def _net(arch: str, depth: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    return ARCHITECTURES[arch](TOK, GRID, 32, depth, 4, 2, list(CLASSES), "photon", 1000.0, 0.0).eval()


def _tokens(b: int = 3, length: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    space = torch.randint(1, TOK.n_voxels + 1, (b, length), generator=g)
    energy = torch.randint(1, TOK.n_bins + 1, (b, length), generator=g)
    return space, energy, torch.tensor([1.5e4, 4.0e4, 9.0e4][:b]), torch.tensor([0, 1, 0][:b]), ["photon"] * b


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_cached_decoding_equals_the_full_forward(arch) -> None:
    net = _net(arch)
    space, energy, inc, ids, parts = _tokens()
    full = net.hidden(space, energy, inc, ids, parts)
    caches = [{} for _ in net.blocks]
    steps = [net.run(net.embed_condition(inc), ids, parts, caches)[:, -1]]
    for t in range(space.shape[1]):
        steps.append(net.run(net.embed_hits(space[:, t : t + 1], energy[:, t : t + 1]), ids, parts, caches)[:, -1])
    assert full.shape == (3, space.shape[1] + 1, 32)
    assert torch.allclose(torch.stack(steps, 1), full, atol=1e-5)


def test_fm4cal_block_structure_and_embeddings() -> None:
    net = _net("fm4cal")
    first, rest = net.blocks[0], net.blocks[1:]
    assert first.ln_query is not None and first.attn.out.bias is not None  # cross-attention, c_proj with bias
    assert all(b.ln_query is None and b.attn.out.bias is None for b in rest)
    assert first.attn.rope_dims == 4  # half of each 8-channel head
    # z / Nz on every channel: voxel 200 sits in layer 200 // 36 = 5 of 8
    x, e = net.embed_hits(torch.tensor([[201]]), torch.tensor([[3]]))
    assert torch.allclose(x - net.space_emb(torch.tensor([[201]])), torch.full((1, 1, 32), 5 / 8))
    assert torch.equal(e, net.energy_emb(torch.tensor([[3]])))
    # incident energy: one Linear of (E - 10 GeV) / 90 GeV * 2 - 1, on both streams, then SOS
    cx, ce = net.embed_condition(torch.tensor([1.0e4, 1.0e5]))
    assert torch.allclose(cx[:, 0], net.cond(torch.tensor([[-1.0], [1.0]]))) and torch.equal(cx[:, 0], ce[:, 0])
    assert torch.equal(cx[:, 1], net.space_emb.weight[TOK.START].expand(2, -1))
    # both heads read the same hidden state: the energy logits do not depend on the drawn voxel
    h = torch.randn(2, 32)
    heads = net.heads["photon"]
    assert torch.equal(heads.energy_logits(h, torch.tensor([1, 2])), heads.energy_logits(h, torch.tensor([7, 9])))


def test_fm4cal_queries_come_from_the_energy_stream_causally() -> None:
    net = _net("fm4cal")
    space, energy, inc, ids, parts = _tokens()
    base = net.hidden(space, energy, inc, ids, parts)
    energy2 = energy.clone()
    energy2[:, 3] = (energy2[:, 3] % TOK.n_bins) + 1
    moved = net.hidden(space, energy2, inc, ids, parts)
    # hit 4's energy (input position 3, output position 4) is a query only: earlier outputs are untouched
    assert torch.equal(moved[:, :4], base[:, :4]) and not torch.allclose(moved[:, 4], base[:, 4])
    # in our architecture the energy embedding is summed into the token itself: the same causal cut
    ours = _net("ours")
    a, b = ours.hidden(space, energy, inc, ids, parts), ours.hidden(space, energy2, inc, ids, parts)
    assert torch.equal(a[:, :4], b[:, :4]) and not torch.allclose(a[:, 4], b[:, 4])


def test_partial_rotary_turns_only_the_first_part_of_each_head() -> None:
    attn = Attention(32, 4, 1000.0, rope_fraction=0.5)
    x = torch.randn(2, 4, 5, 8)
    y = attn._rope(x, 3)
    assert torch.equal(y[..., 4:], x[..., 4:]) and torch.allclose(y[..., :4], rope(x[..., :4], 1000.0, 3))
    assert torch.allclose(Attention(32, 4, 1000.0)._rope(x, 3), rope(x, 1000.0, 3))
    with pytest.raises(ValueError, match="rotary part"):
        Attention(24, 4, 1000.0, rope_fraction=0.5)  # 6-channel heads: 3 rotary channels cannot pair


def _nll(net, space, energy, inc, ids, parts) -> torch.Tensor:
    s_tgt = torch.cat([space, torch.full((len(space), 1), TOK.space_end)], 1)
    e_tgt = torch.cat([energy, torch.full((len(space), 1), TOK.energy_end)], 1)
    h = net.hidden(space, energy, inc, ids, parts)
    s = net.per_particle(parts, lambda hd: hd.space_logits(h))
    e = net.per_particle(parts, lambda hd: hd.energy_logits(h, s_tgt))
    return F.cross_entropy(s.transpose(1, 2), s_tgt) + F.cross_entropy(e.transpose(1, 2), e_tgt)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_both_architectures_train_and_grow_without_forgetting(arch) -> None:
    net = _net(arch).train()
    data = _tokens(3, 6, seed=1)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    first = float(_nll(net, *data).detach())
    for _ in range(25):
        opt.zero_grad()
        _nll(net, *data).backward()
        opt.step()
    assert float(_nll(net, *data).detach()) < 0.5 * first
    net.eval()
    with torch.no_grad():
        before = net.hidden(*data)
    added = net.add_class("W_electron", "W_photon", LoRA(r=4, alpha=4.0, rslora=True, targets=["q", "k", "v", "out"]))
    assert len(added) == 3 and {n for n, p in net.named_parameters() if p.requires_grad}
    net.train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    space, energy, inc, _, _ = _tokens(3, 6, seed=2)
    el = (space, energy, inc, torch.tensor([2, 2, 2]), ["electron"] * 3)
    for _ in range(3):
        opt.zero_grad()
        _nll(net, *el).backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        assert torch.equal(net.hidden(*data), before)  # photons: same tensors, same bits
        assert not torch.allclose(net.hidden(space, energy, inc, torch.tensor([0, 0, 0]), ["photon"] * 3),
                                  net.hidden(*el))  # electrons took their own LoRA and expert


def test_fm4cal_needs_its_cross_attention_block() -> None:
    with pytest.raises(ValueError, match="depth >= 1"):
        Fm4calTransformer(TOK, GRID, 32, 0, 4, 2, CLASSES, "photon", 1000.0, 0.0)


# --------------------------------------------------------------------------------------------------
# FM4CAL's sampling options as pure functions: each filter against a hand-made distribution, the
# dynamic temperature against its closed form, and draws that never leave what was allowed.


PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
LOGITS = PROBS.log()
NEG = float("-inf")


def test_top_k_keeps_exactly_the_k_most_likely() -> None:
    out = filter_logits(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), Sampling(method="top_k", top_k=2))
    assert out.tolist() == [[NEG, 3.0, 2.0, NEG]]
    assert torch.equal(filter_logits(LOGITS, Sampling(method="top_k", top_k=10)), LOGITS)


def test_nucleus_keeps_the_smallest_set_whose_mass_exceeds_p_with_the_crossing_token() -> None:
    # cumulative 0.5, 0.8, 0.95, 1.0: p = 0.7 is crossed by the second token, which stays
    out = filter_logits(LOGITS, Sampling(method="nucleus", top_p=0.7))
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]
    out = filter_logits(LOGITS[:, [3, 1, 0, 2]], Sampling(method="nucleus", top_p=0.9))  # order does not matter
    assert torch.isfinite(out).tolist() == [[False, True, True, True]]


def test_min_p_drops_tokens_below_a_fraction_of_the_most_likely_but_keeps_a_floor() -> None:
    # threshold 0.2 * 0.5 = 0.1: only the 0.05 token goes
    out = filter_logits(LOGITS, Sampling(method="min_p", min_p=0.2, min_tokens_to_keep=1))
    assert torch.isfinite(out).tolist() == [[True, True, True, False]]
    out = filter_logits(LOGITS, Sampling(method="min_p", min_p=0.5, min_tokens_to_keep=3))  # 0.25: two fall, one comes back
    assert torch.isfinite(out).tolist() == [[True, True, True, False]]
    assert torch.equal(filter_logits(LOGITS, Sampling(method="min_p", min_p=0.2)), LOGITS)  # the reference keeps 50


def test_dynamic_temperature_rises_linearly_from_095_to_105() -> None:
    cfg = REFERENCE_SAMPLING
    assert [temperature_at(cfg, s, 200) for s in (0, 100, 200, 400)] == pytest.approx([0.95, 1.0, 1.05, 1.05])
    assert temperature_at(Sampling(temperature=0.7), 150, 200) == 0.7
    logits = torch.tensor([[2.0, 0.0]])
    # at step 100 of 200 the temperature is 1.0: the draw frequency is softmax(logits)
    g = torch.Generator().manual_seed(0)
    hits = sum(int(draw(logits, cfg, 100, 200, g)) == 0 for _ in range(4000))
    assert hits / 4000 == pytest.approx(1 / (1 + math.exp(-2.0)), abs=0.02)


def test_draws_stay_inside_the_allowed_tokens_and_repeat_with_the_seed() -> None:
    logits = torch.randn(64, 30, generator=torch.Generator().manual_seed(1))
    banned = torch.rand(64, 30, generator=torch.Generator().manual_seed(2)) < 0.5
    banned[:, 0] = False  # at least one allowed token per row, as generate() guarantees
    masked = logits.masked_fill(banned, NEG)
    for cfg in (Sampling(), Sampling(method="top_k", top_k=3), Sampling(method="nucleus", top_p=0.5),
                Sampling(method="min_p", min_p=0.3, min_tokens_to_keep=2), REFERENCE_SAMPLING):
        a = draw(masked, cfg, 5, 50, torch.Generator().manual_seed(3))
        b = draw(masked, cfg, 5, 50, torch.Generator().manual_seed(3))
        assert torch.equal(a, b) and not banned.gather(1, a[:, None]).any()
        if cfg.method == "top_k":  # only among the 3 best allowed
            assert (masked.gather(1, a[:, None]) >= masked.topk(3, -1).values[:, -1:]).all()
    assert torch.equal(draw(masked, Sampling(method="greedy")), masked.argmax(-1))
    assert torch.equal(draw(masked, Sampling(temperature=0.0)), masked.argmax(-1))


def test_sampling_options_are_checked() -> None:
    for bad in (dict(method="beam"), dict(stop_on="energy"), dict(top_p=0.0), dict(temperature=-1.0)):
        with pytest.raises(ValueError):
            Sampling(**bad)
    assert REFERENCE_SAMPLING.stop_on == "either" and not REFERENCE_SAMPLING.unique_voxels and not REFERENCE_SAMPLING.monotone_energy
