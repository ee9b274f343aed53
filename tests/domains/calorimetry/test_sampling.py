"""FM4CAL's sampling options as pure functions: each filter against a hand-made distribution, the
dynamic temperature against its closed form, and draws that never leave what was allowed."""

from __future__ import annotations

import math

import pytest
import torch

from domains.calorimetry.sampling import REFERENCE_SAMPLING, Sampling, draw, filter_logits, temperature_at

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
