"""CG-LoRA against a float64 reference written from the definitions (symmetric square roots via
eigh, statistics gathered by explicit autograd), plus the init contract (shift, idempotent,
deterministic, limited batches, trust region, clear errors).

Tolerance: ours is fp32 with Cholesky whitening, the reference fp64 with eigh: rtol 1e-4.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from suite.adapters import CGLoRA, adapter_layers, init_adapters, inject


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def _batches(n=3):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, 6, generator=g), torch.randn(4, 3, 5, generator=g)) for _ in range(n)]


def _loss(model):
    return lambda b: F.mse_loss(model(b[0]), b[1])


def _sym_pow(F64: torch.Tensor, damping: float, power: float) -> torch.Tensor:
    lam = damping * torch.trace(F64) / F64.shape[0]
    w, V = torch.linalg.eigh(F64 + lam * torch.eye(F64.shape[0], dtype=F64.dtype))
    return (V * w**power) @ V.T


def _reference_steps(model: MLP, batches, spec: CGLoRA) -> dict[str, torch.Tensor]:
    """s * B A per layer from the definitions, in float64."""
    m = copy.deepcopy(model).double()
    stats = {n: dict(G=0, A=0, S=0, tokens=0, examples=0) for n in ("fc1", "fc2")}
    for x, t in batches:
        x, t = x.double(), t.double()
        h = m.fc1(x)
        a = torch.tanh(h)
        o = m.fc2(a)
        dh, do = torch.autograd.grad(F.mse_loss(o, t), [h, o])
        for name, inp, d in (("fc1", x, dh), ("fc2", a, do)):
            s, rows = stats[name], inp.shape[0]
            x2, d2 = inp.reshape(-1, inp.shape[-1]), d.reshape(-1, d.shape[-1])
            s["G"] = s["G"] + d2.T @ x2  # = dL/dW of this batch
            s["A"] = s["A"] + x2.T @ x2
            s["S"] = s["S"] + (rows * d2).T @ (rows * d2)
            s["tokens"] += x2.shape[0]
            s["examples"] += rows
    out = {}
    for name, s in stats.items():
        A, G = s["A"] / s["tokens"], s["G"] / len(batches)
        S_full = s["S"] / s["examples"]
        A_ih = _sym_pow(A, spec.damping, -0.5)
        d_out = G.shape[0]
        slices = [0] if spec.qkv is None or name != "fc1" else [{"q": 0, "k": 1, "v": 2}[q] for q in spec.qkv]
        chunk = d_out if spec.qkv is None or name != "fc1" else d_out // 3
        step = torch.zeros_like(G)
        for sl in slices:
            rows_ = slice(sl * chunk, (sl + 1) * chunk)
            S_ih = _sym_pow(S_full[rows_, rows_], spec.damping, -0.5)
            U, sig, Vh = torch.linalg.svd(S_ih @ G[rows_] @ A_ih)
            r = spec.r
            step[rows_] = -spec.step * S_ih @ (U[:, :r] * sig[:r]) @ Vh[:r] @ A_ih
        out[name] = step
    return out


@pytest.mark.parametrize("qkv", [None, ["q", "v"]])
def test_matches_the_reference_newton_step(qkv):
    torch.manual_seed(0)
    base = MLP()
    batches = _batches()
    spec = CGLoRA(r=2, alpha=4, damping=0.05, step=0.5, max_update=None, qkv=qkv, targets=["fc1", "fc2"] if qkv is None else ["fc1"])
    ref = _reference_steps(base, batches, spec)
    model = copy.deepcopy(base)
    inject(model, spec)
    assert init_adapters(model, batches, _loss(model)) == (["fc1", "fc2"] if qkv is None else ["fc1"])
    for name, layer in adapter_layers(model):
        ours = layer.lora.delta().double()
        torch.testing.assert_close(ours, ref[name], rtol=1e-4, atol=1e-6 * ref[name].abs().max().item())
        if qkv:
            assert ours[4:8].abs().max() == 0, "the k slice is not adapted"
        B, A = layer.lora.B, layer.lora.A.view(len(layer.lora.slices), 2, -1)
        torch.testing.assert_close(B.norm(dim=1), A.norm(dim=2), rtol=1e-4, atol=0)  # balanced components


def test_shift_starts_unchanged_and_no_shift_takes_the_step():
    torch.manual_seed(0)
    base = MLP()
    batches = _batches()
    x = batches[0][0]
    shifted = copy.deepcopy(base)
    inject(shifted, CGLoRA(r=2, shift=True, targets=["fc1", "fc2"]))
    init_adapters(shifted, batches, _loss(shifted))
    torch.testing.assert_close(shifted(x), base(x), atol=1e-6, rtol=0)
    assert torch.equal(shifted.fc1.lora.B, shifted.fc1.lora.B0) and shifted.fc1.lora.A.abs().max() > 0
    plain = copy.deepcopy(base)
    inject(plain, CGLoRA(r=2, shift=False, targets=["fc1", "fc2"]))
    init_adapters(plain, batches, _loss(plain))
    assert (plain(x) - base(x)).abs().max() > 1e-5
    loss = lambda m: sum(_loss(m)(b) for b in batches).item()  # noqa: E731
    assert loss(plain) < loss(base), "the (trust-region) Newton step lowers the calibration loss"


def test_idempotent_deterministic_and_limited():
    torch.manual_seed(0)
    base = MLP()
    consumed = []

    def batches():
        for i, b in enumerate(_batches(5)):
            consumed.append(i)
            yield b

    models = []
    for _ in range(2):
        m = copy.deepcopy(base)
        torch.manual_seed(len(models))  # different global RNG state: must not matter
        inject(m, CGLoRA(r=2, calibration_batches=2, targets=["fc1", "fc2"]))
        m.train()
        consumed.clear()
        init_adapters(m, batches(), _loss(m))
        assert consumed == [0, 1]
        assert all(mod.training for mod in m.modules()), "train mode is restored after the eval-mode calibration"
        models.append(m)
    for (_, a), (_, b) in zip(adapter_layers(models[0]), adapter_layers(models[1])):
        assert torch.equal(a.lora.A, b.lora.A) and torch.equal(a.lora.B, b.lora.B)
    assert all(bool(layer.initialised) for _, layer in adapter_layers(models[0]))

    def must_not_run():
        raise AssertionError("an initialised model must not read calibration data")
        yield

    assert init_adapters(models[0], must_not_run(), _loss(models[0])) == []


def test_trust_region_bounds_the_update():
    torch.manual_seed(0)
    m = MLP()
    inject(m, CGLoRA(r=2, max_update=1e-3, targets=["fc2"]))
    init_adapters(m, _batches(), _loss(m))
    info = m.fc2.calibration_info
    assert info["clipped"] and info["update_to_weight"] > 1e-3
    torch.testing.assert_close(m.fc2.lora.delta().norm() / m.fc2.base_layer.weight.norm(), torch.tensor(1e-3), rtol=1e-4, atol=0)


def test_bad_calibration_fails_clearly():
    m = MLP()
    inject(m, CGLoRA(r=2, targets=["fc1"]))
    with pytest.raises(ValueError, match="need calibration batches"):
        init_adapters(m, None, _loss(m))
    with pytest.raises(RuntimeError, match="does not run through the layers to initialise"):
        init_adapters(m, _batches(), lambda b: m.fc2(torch.zeros(2, 12)).sum())
    with pytest.raises(ValueError, match="empty iterable"):
        init_adapters(m, [], _loss(m))
    with pytest.raises(TypeError, match="nn.Linear only"):
        inject(nn.Sequential(nn.Conv2d(3, 3, 1)), CGLoRA(targets=["0"]))
    with pytest.raises(ValueError, match="damping must be > 0"):
        CGLoRA(damping=0, targets=["x"])
    assert m.fc1._calib is None, "recording state is dropped after an error"


def _calibrate_rank(rank: int, base: MLP, batches, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    try:
        m = copy.deepcopy(base)
        inject(m, CGLoRA(r=2, calibration_batches=2, targets=["fc1", "fc2"]))
        init_adapters(m, [batches[rank]], _loss(m))
        torch.save({n: (l.lora.B @ l.lora.A).detach() for n, l in adapter_layers(m)}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_with_one_batch_each_match_one_process_with_both(tmp_path):
    """Under DDP each rank calibrates on its own shard; the statistics are all-reduced, so both
    ranks start from the same adapter, the one a single process computes from both batches.
    Compared as B @ A (sign-free); fp32 sums in a different order: rtol 1e-4."""
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    base, batches = MLP(), _batches(2)
    mp.start_processes(_calibrate_rank, args=(base, batches, str(tmp_path)), nprocs=2, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    single = copy.deepcopy(base)
    inject(single, CGLoRA(r=2, calibration_batches=2, targets=["fc1", "fc2"]))
    init_adapters(single, batches, _loss(single))
    for name, layer in adapter_layers(single):
        assert torch.equal(ranks[0][name], ranks[1][name])
        torch.testing.assert_close(ranks[0][name], (layer.lora.B @ layer.lora.A).detach(), rtol=1e-4, atol=1e-7)
        assert ranks[0][name].abs().max() > 0
