"""CLUB against its closed form on a Gaussian channel, the FairLLaVA loss (value and where its
gradients go), image-token sampling, DDP label gathering, and the resampling / group-DRO baselines."""

from __future__ import annotations

import math
import multiprocessing as mp

import numpy as np
import pytest
import torch

from domains.radiology_vqa.fairness import (
    CLUBCategorical,
    GroupBalancedSampler,
    GroupDRO,
    fairllava_loss,
    gather_labels,
    group_balanced_weights,
    mid_layer,
    probe_mi,
    sample_image_token,
)


def _naive_mi(log_q: torch.Tensor, a: torch.Tensor) -> float:
    """The reference's definition by a double loop: mean_i log q(a_i|z_i) - mean_{i != j} log q(a_j|z_i)."""
    n = len(a)
    pos = sum(log_q[i, a[i]] for i in range(n)) / n
    neg = sum(log_q[i, a[j]] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    return float(pos - neg)


def _channel(mu: float, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A uniform on {0, 1}; Z = mu (2A - 1) e_1 + N(0, I_4)."""
    a = torch.randint(0, 2, (n,), generator=g)
    z = torch.randn(n, 4, generator=g)
    z[:, 0] += mu * (2 * a - 1)
    return z, a


def _true_mi(mu: float) -> float:
    """I(A; Z) of the channel by quadrature: log 2 - E_z H(A | z)."""
    x = np.linspace(-12, 12, 200_001)
    phi = lambda m: np.exp(-((x - m) ** 2) / 2) / np.sqrt(2 * np.pi)  # noqa: E731
    pz = 0.5 * phi(mu) + 0.5 * phi(-mu)
    p1 = np.clip(0.5 * phi(mu) / pz, 1e-300, 1 - 1e-16)
    h = -(p1 * np.log(p1) + (1 - p1) * np.log1p(-p1))
    return float(np.log(2) - (pz * h).sum() * (x[1] - x[0]))


def _fit(est: CLUBCategorical, z: torch.Tensor, a: torch.Tensor) -> None:
    opt = torch.optim.LBFGS(est.parameters(), max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = est.learning_loss(z, a)
        loss.backward()
        return loss

    opt.step(closure)


@pytest.mark.parametrize("mu", [0.0, 0.5, 1.0])
def test_club_tracks_closed_form_of_gaussian_channel(mu):
    # With q = p(a|z) (logistic in z_1 here, so a linear q is well specified) the CLUB value is
    # E_joint log p(a|z) - E_prod log p(a|z) = mu E[(2A - 1) Z_1] = mu^2: zero iff independent,
    # above the true MI otherwise (the gap is E_z KL(p(a) || p(a|z))).
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    est = CLUBCategorical(4, 2)
    _fit(est, *_channel(mu, 4000, g))
    with torch.no_grad():
        value = est.mi(*_channel(mu, 100_000, g)).item()
    assert abs(value - mu**2) < 0.03  # sampling + fitting error at these sizes is ~0.01
    if mu == 0:
        assert abs(value) < 0.01
    else:
        assert value > _true_mi(mu) + 0.05  # an upper bound, and strictly above for a dependent pair


@pytest.mark.parametrize("mu", [0.0, 1.0])
def test_probe_mi_is_a_held_out_club_estimate(mu):
    # the benchmark's probe: a fresh linear q fitted on one sample, scored on another. Without the
    # ridge term it is the closed form mu^2 above; the ridge shrinks q, so the estimate is lower
    # (never above it), still ~0 when independent.
    g = torch.Generator().manual_seed(1)
    z_fit, a_fit = _channel(mu, 4000, g)
    z_eval, a_eval = _channel(mu, 50_000, g)
    a_fit[:100] = -1  # unknown labels are skipped, not fitted as a class
    plain = probe_mi(z_fit, a_fit, z_eval, a_eval, num_classes=2, l2=0.0)
    assert abs(plain - mu**2) < 0.07  # q fitted on 4,000 samples: its weight errs by a few per cent
    ridge = probe_mi(z_fit, a_fit, z_eval, a_eval, num_classes=2)
    assert (abs(ridge) < 0.01) if mu == 0 else (0.5 * mu**2 < ridge < plain)
    assert ridge == probe_mi(z_fit, a_fit, z_eval, a_eval, num_classes=2)  # seeded: the same number twice


def test_estimator_stays_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    est = CLUBCategorical(16, 3)
    z, a = torch.nn.functional.normalize(torch.randn(64, 16), dim=-1), torch.randint(0, 3, (64,))
    with torch.no_grad():
        fp32 = est.mi(z, a)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = est.mi(z.bfloat16(), a)
            logp = est.log_q(z)
    assert logp.dtype == torch.float32
    # z rounded to bf16 is the only difference (~3 significant digits of z, not of the MI)
    torch.testing.assert_close(auto, est.mi(z.bfloat16().float(), a), rtol=0, atol=1e-6)
    assert abs(float(auto - fp32)) < 2e-3


def test_club_increases_with_dependence():
    g = torch.Generator().manual_seed(3)
    values = []
    for mu in (0.0, 0.3, 0.6, 0.9):
        est = CLUBCategorical(4, 2)
        _fit(est, *_channel(mu, 3000, g))
        with torch.no_grad():
            values.append(est.mi(*_channel(mu, 30_000, g)).item())
    assert values == sorted(values) and values[0] < 0.01 < values[1]
    assert [round(_true_mi(m), 3) for m in (0.3, 0.6, 0.9)] == sorted(round(_true_mi(m), 3) for m in (0.3, 0.6, 0.9))


def test_mi_equals_the_double_sum_and_skips_unknown_labels():
    torch.manual_seed(1)
    est = CLUBCategorical(5, 3)
    z, a = torch.randn(7, 5), torch.tensor([0, 2, 1, 1, -1, 0, 2])
    keep = a >= 0
    expected = _naive_mi(est.log_q(z[keep]).detach(), a[keep])
    assert est.mi(z, a).item() == pytest.approx(expected, abs=1e-6)


def test_mi_of_fewer_than_two_samples_is_zero_not_the_log_likelihood():
    est = CLUBCategorical(3, 2)
    z = torch.randn(1, 3, requires_grad=True)
    value = est.mi(z, torch.tensor([1]))
    assert value.item() == 0.0  # the reference returns mean log q(a|z) < 0 here
    value.backward()
    assert torch.all(z.grad == 0)


def test_fairllava_loss_value_and_gradient_routing():
    torch.manual_seed(2)
    ests = {"age": CLUBCategorical(6, 3), "sex": CLUBCategorical(6, 2)}
    z = torch.randn(8, 6, requires_grad=True)
    ce = (z**2).mean()  # stands in for the LM's cross-entropy (depends on z)
    labels = {"age": torch.tensor([0, 1, 2, 0, 1, 2, 0, -1]), "sex": torch.tensor([0, 1, 0, 1, 0, 1, 1, 0])}
    weights = {"age": 0.6, "sex": 0.1}
    out = fairllava_loss(ce, z, labels, ests, weights, w_ce=1.5, lambda_fair=0.7, w_club=2.0)

    mi = {k: e.mi(z, labels[k]).detach() for k, e in ests.items()}
    fit = {k: e.learning_loss(z.detach(), labels[k]).detach() for k, e in ests.items()}
    by_hand = 1.5 * ce.detach() + 0.7 * (sum(weights[k] * math.sqrt(mi[k] ** 2 + 1e-6) for k in ests) + 2.0 * sum(fit.values()))
    assert out["loss"].item() == pytest.approx(float(by_hand), rel=1e-6)
    assert out["mi/age"].item() == pytest.approx(float(mi["age"]), abs=1e-7)

    out["loss"].backward()
    # the estimators' gradient is that of lambda * w_club * their own fitting loss only
    for k, e in ests.items():
        fresh = {n: p.detach().clone().requires_grad_(True) for n, p in e.q.named_parameters()}
        fit_k = torch.func.functional_call(e.q, fresh, (z.detach(),)).log_softmax(-1)
        keep = labels[k] >= 0
        (0.7 * 2.0 * torch.nn.functional.nll_loss(fit_k[keep], labels[k][keep])).backward()
        for n, p in e.q.named_parameters():
            assert torch.allclose(p.grad, fresh[n].grad, atol=1e-6), (k, n)
    # z's gradient: w_ce CE + lambda * sum_a lambda_a sqrt(MI_a^2 + eps), estimators constant
    z2 = z.detach().clone().requires_grad_(True)
    target = 1.5 * (z2**2).mean() + 0.7 * sum(weights[k] * torch.sqrt(e.mi(z2, labels[k], detach_params=True) ** 2 + 1e-6)
                                              for k, e in ests.items())
    target.backward()
    assert torch.allclose(z.grad, z2.grad, atol=1e-6)


def test_zero_weight_attribute_still_fits_its_estimator():
    est = {"race": CLUBCategorical(4, 3)}
    z = torch.randn(6, 4, requires_grad=True)
    out = fairllava_loss(z.sum() * 0, z, {"race": torch.tensor([0, 1, 2, 0, 1, 2])}, est, {"race": 0.0})
    assert out["mi_penalty"].item() == 0.0 and out["club_fit"].item() > 0
    with pytest.raises(KeyError, match="race"):
        fairllava_loss(z.sum(), z, {}, est, {"race": 0.2})


def test_sample_image_token_picks_image_positions_uniformly_and_reproducibly():
    b, t, d = 3, 6, 4
    hidden = torch.zeros(b, t, d)
    for pos in range(t):
        hidden[:, pos, 0] = pos + 1.0  # position k is the vector (k + 1) e_0 before normalising
        hidden[:, pos, 1] = 1.0
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    seen = {i: set() for i in range(b)}
    counts = torch.zeros(t)
    for s in range(300):
        z = sample_image_token(hidden, mask, torch.Generator().manual_seed(s))
        assert torch.allclose(z.norm(dim=-1), torch.ones(b))
        pos = torch.round(z[:, 0] / z[:, 1]).long() - 1  # undo the normalisation: x0 / x1 = k + 1
        for i in range(b):
            seen[i].add(int(pos[i]))
        counts[pos[0]] += 1
    assert seen == {0: {1, 2, 3}, 1: {0}, 2: {3, 4}}
    assert counts[1:4].min() > 70  # ~100 each of 300 draws
    a = sample_image_token(hidden, mask, torch.Generator().manual_seed(5))
    assert torch.equal(a, sample_image_token(hidden, mask, torch.Generator().manual_seed(5)))
    mask[1] = False
    with pytest.raises(ValueError, match=r"samples \[1\] have no image token"):
        sample_image_token(hidden, mask)


def test_mid_layer_counts_the_embedding_output():
    states = tuple(torch.full((1,), float(i)) for i in range(31))  # SmolLM2: 30 layers + embeddings
    assert mid_layer(states).item() == 15.0
    assert mid_layer(tuple(range(33))) == 16  # the reference's 32-layer Vicuna: output of layer 16


def _ddp_worker(rank: int, init: str, z: torch.Tensor, a: torch.Tensor, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    torch.manual_seed(0)
    est = CLUBCategorical(z.shape[1], 3)
    half = len(a) // 2
    part = slice(rank * half, (rank + 1) * half)
    local = est.mi(z[part], a[part], gather=True).item()
    queue.put((rank, local, gather_labels(a[part][: half - rank]).tolist()))  # unequal sizes pad and drop
    dist.destroy_process_group()


def test_gathered_negatives_equal_the_single_process_global_batch(tmp_path):
    torch.manual_seed(4)
    z, a = torch.randn(10, 5), torch.tensor([0, 1, 2, 2, 0, 1, 1, 0, 2, 2])
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, f"file://{tmp_path}/store", z, a, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    torch.manual_seed(0)
    single = CLUBCategorical(5, 3).mi(z, a).item()
    # each rank: its own positives, negatives over every rank's labels; DDP averages the two
    assert (results[0][1] + results[1][1]) / 2 == pytest.approx(single, abs=1e-6)
    gathered = [v for v in results[0][2] if v >= 0]
    assert gathered == a[:5].tolist() + a[5:9].tolist()
    assert torch.equal(gather_labels(a), a)  # no process group: a no-op


def test_group_balanced_weights_by_hand():
    w = group_balanced_weights(torch.tensor([0, 0, 0, 1, 2, 2, -1]))
    third = 1 / 3
    assert torch.allclose(w, torch.tensor([third / 3] * 3 + [third] + [third / 2] * 2 + [0.0], dtype=torch.float64))
    sampler = GroupBalancedSampler(w, num_samples=3000, seed=1)
    draws = torch.tensor(list(sampler))
    assert 6 not in draws.tolist()
    shares = torch.bincount(torch.tensor([0, 0, 0, 1, 2, 2, -1])[draws], minlength=3).float() / 3000
    assert torch.allclose(shares, torch.full((3,), third), atol=0.04)
    assert list(sampler) == draws.tolist()
    sampler.set_epoch(1)
    assert list(sampler) != draws.tolist()


def test_group_dro_exponentiated_gradient_step_by_hand():
    dro = GroupDRO(3, step_size=0.5)
    losses = torch.tensor([1.0, 3.0, 2.0, 2.0], requires_grad=True)
    groups = torch.tensor([0, 0, 1, -1])  # group 2 absent, one item of unknown group
    robust, per = dro(losses, groups)
    q = torch.tensor([1 / 3 * math.exp(0.5 * 2.0), 1 / 3 * math.exp(0.5 * 2.0), 1 / 3])
    q = q / q.sum()
    assert torch.allclose(dro.q, q) and torch.allclose(per, torch.tensor([2.0, 2.0, 0.0]))
    assert robust.item() == pytest.approx(float(q[0] * 2 + q[1] * 2))
    robust.backward()
    assert torch.allclose(losses.grad, torch.tensor([q[0] / 2, q[0] / 2, q[1], 0.0]))
    dro.eval()
    before = dro.q.clone()
    dro(losses.detach(), groups)
    assert torch.equal(dro.q, before)  # weights move only in training
    adj = GroupDRO(2, step_size=1.0, adjustment=2.0, group_counts=[4, 16])
    adj(torch.tensor([0.0, 0.0]), torch.tensor([0, 1]))
    expected = torch.tensor([math.exp(1.0), math.exp(0.5)])
    assert torch.allclose(adj.q, expected / expected.sum())
    assert "q" in dro.state_dict()
