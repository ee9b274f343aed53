"""The shower networks: hit tokens -> causal blocks (attention + per-class MoE FFN) -> heads.

A shower is a sequence of hits ordered by deposited energy; each hit is a space token (its
voxel) plus an energy token (its binned deposit), conditioned on the incident energy. Every
block ends in a feed-forward mixture of experts with one expert per class
(``<material>_<particle>``), picked by a label-masked router. Heads, and optionally rsLoRA on the
attention projections, exist per particle; every row only ever passes through its own.

Two architectures with one interface (``architecture`` in the model):

- ``ShowerTransformer`` (``"ours"``): self-attention over summed voxel + (layer, a, b) axis +
  energy embeddings, rotary positions on whole heads, ln(E)/5 through an MLP as position 0; each
  hit is p(voxel | past) p(energy | voxel, past): the energy head also sees the chosen voxel.
- ``Fm4calTransformer`` (``"fm4cal"``): the reference's ``ECAL_GPT``: a first cross-attention
  block (queries from the energy stream, keys and values from the space stream, both starting
  with the incident energy), then self-attention blocks; incident energy scaled linearly to
  [-1, 1] through one Linear; the voxel's layer ``z / Nz`` added on every channel; rotary
  positions on half of each head; voxel and energy heads reading the same hidden state.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from suite.adapters import LoRA
from suite.adapters.lora import LoRALinear
from suite.adapters.moe import FeedForward, MixtureOfExperts

from .data import ShowerTokenizer, parse_class

PROJECTIONS = ("q", "k", "v", "out")


class ParticleLoRALinear(LoRALinear):
    """LoRA that shares its frozen base Linear with the base particle's path; never merged."""

    def merge(self) -> None:
        raise NotImplementedError("merging would change the shared base weight and so the base particle's outputs")


def rope(x: torch.Tensor, theta: float, offset: int = 0) -> torch.Tensor:
    """Rotary position embedding (Su et al., arXiv 2104.09864) on (B, H, T, D) at positions offset, offset + 1, ..."""
    d, t = x.shape[-1] // 2, x.shape[-2]
    freq = theta ** (-torch.arange(d, device=x.device, dtype=torch.float32) / d)
    ang = torch.arange(offset, offset + t, device=x.device, dtype=torch.float32)[:, None] * freq
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class Attention(nn.Module):
    """Causal attention; a particle with LoRA gets its own q/k/v/out update on its rows only.

    Self-attention by default; given ``query`` it is cross-attention (queries from that stream,
    keys and values from ``x``). Rotary positions turn the first ``rope_fraction`` of each head.
    """

    def __init__(self, width: int, heads: int, theta: float, rope_fraction: float = 1.0, out_bias: bool = False) -> None:
        super().__init__()
        head_dim = width // heads
        self.rope_dims = int(head_dim * rope_fraction)
        if width % heads or self.rope_dims % 2 or self.rope_dims == 0:
            raise ValueError(f"width {width} must split into {heads} heads whose rotary part ({rope_fraction} of each) is even")
        self.heads, self.theta = heads, theta
        self.q, self.k, self.v = (nn.Linear(width, width, bias=False) for _ in range(3))
        self.out = nn.Linear(width, width, bias=out_bias)
        self.lora = nn.ModuleDict()

    def add_particle(self, particle: str, spec: LoRA) -> None:
        self.lora[particle] = nn.ModuleDict({p: ParticleLoRALinear(getattr(self, p), spec) for p in PROJECTIONS})

    def _proj(self, name: str, x: torch.Tensor, gates: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
        y = getattr(self, name)(x)  # base rows: exactly the frozen Linear, as before any LoRA existed
        for particle, rows in gates:
            if particle in self.lora:
                y = torch.where(rows, self.lora[particle][name](x), y)
        return y

    def _rope(self, x: torch.Tensor, start: int) -> torch.Tensor:
        if self.rope_dims == x.shape[-1]:
            return rope(x, self.theta, start)
        return torch.cat([rope(x[..., : self.rope_dims], self.theta, start), x[..., self.rope_dims :]], -1)

    def forward(self, x: torch.Tensor, gates: list[tuple[str, torch.Tensor]], cache: dict | None = None,
                query: torch.Tensor | None = None) -> torch.Tensor:
        """``cache`` (generation): keys/values of earlier positions, extended in place."""
        b, t, w = x.shape
        q = self._proj("q", x if query is None else query, gates).view(b, t, self.heads, -1).transpose(1, 2)
        k, v = (self._proj(n, x, gates).view(b, t, self.heads, -1).transpose(1, 2) for n in ("k", "v"))
        start = 0 if cache is None or "k" not in cache else cache["k"].shape[2]
        q, k = self._rope(q, start), self._rope(k, start)
        if cache is not None:
            if start:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        # attention itself in fp32 (autocast would cast it back to bf16): the CPU's bf16
        # flash-attention backward runs ~4x slower than fp32 (0.74 s vs 0.18 s at 32 x 4 x 129 x 32)
        with torch.autocast(q.device.type, enabled=False):
            a = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=start == 0 and t > 1).to(q.dtype)
        return self._proj("out", a.transpose(1, 2).reshape(b, t, w), gates)


class Block(nn.Module):
    """Pre-norm attention + per-class MoE FFN; ``cross=True`` is FM4CAL's conditioning block, whose
    queries come from the (separately normed) energy stream."""

    def __init__(self, width: int, heads: int, ffn_mult: int, classes: list[str], theta: float, dropout: float,
                 rope_fraction: float = 1.0, out_bias: bool = False, cross: bool = False) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.ln_query = nn.LayerNorm(width) if cross else None
        self.attn = Attention(width, heads, theta, rope_fraction, out_bias)
        experts = [FeedForward(width, ffn_mult * width, dropout) for _ in classes]
        self.moe = MixtureOfExperts(experts, width, router="label", labels=classes)

    def forward(self, x: torch.Tensor, gates: list[tuple[str, torch.Tensor]], class_ids: torch.Tensor, cache: dict | None = None,
                query: torch.Tensor | None = None) -> torch.Tensor:
        q = None if self.ln_query is None else self.ln_query(query)
        x = x + self.attn(self.ln1(x), gates, cache, q)
        return x + self.moe(self.ln2(x), labels=class_ids)


class Heads(nn.Module):
    """Output heads: the next voxel from h; its energy from h, plus (``voxel_aware``) an embedding
    of that voxel. FM4CAL's heads both read h alone."""

    def __init__(self, width: int, space_vocab: int, energy_vocab: int, voxel_aware: bool = True) -> None:
        super().__init__()
        self.space = nn.Linear(width, space_vocab)
        self.next_space = nn.Embedding(space_vocab, width) if voxel_aware else None
        self.energy = nn.Linear(width, energy_vocab)

    def space_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.space(h)

    def energy_logits(self, h: torch.Tensor, next_space: torch.Tensor) -> torch.Tensor:
        return self.energy(h if self.next_space is None else h + self.next_space(next_space))


class _ShowerNetwork(nn.Module):
    """What both architectures share: class bookkeeping, per-particle heads, growing by a class.

    A subclass defines ``embed_condition`` / ``embed_hits`` (whatever ``run`` takes) and ``run``;
    ``hidden`` returns (B, L + 1, width) where position i predicts hit i + 1.
    """

    blocks: nn.ModuleList
    heads: nn.ModuleDict

    @property
    def classes(self) -> list[str]:
        return self.blocks[0].moe.label_names

    @staticmethod
    def _gates(particles: list[str], device: torch.device) -> list[tuple[str, torch.Tensor]]:
        return [(p, torch.tensor([q == p for q in particles], device=device)[:, None, None]) for p in dict.fromkeys(particles)]

    def per_particle(self, particles: list[str], fn: Callable[[Heads], torch.Tensor]) -> torch.Tensor:
        """``fn(heads)`` with each row's own particle heads; every head sees the full tensor, so a
        particle's rows are computed exactly as they were before other particles existed."""
        out = None
        for p in dict.fromkeys(particles):
            y = fn(self.heads[p])
            rows = torch.tensor([q == p for q in particles], device=y.device).view(-1, *[1] * (y.dim() - 1))
            out = y if out is None else torch.where(rows, y, out)
        return out

    def add_class(self, name: str, clone_from: str, lora: LoRA | None) -> list[str]:
        """Add ``name``: an expert cloned from ``clone_from`` per block and, for a new particle,
        heads copied from the source particle's plus (if given) LoRA on attention. Freezes all else."""
        particle, src_particle = parse_class(name)[1], parse_class(clone_from)[1]
        self.requires_grad_(False)
        for blk in self.blocks:
            blk.moe.add_expert(clone_from=clone_from, label=name)
        added = [f"expert {name} (from {clone_from})"]
        if particle not in self.heads:
            self.heads[particle] = copy.deepcopy(self.heads[src_particle]).requires_grad_(True)
            added.append(f"{particle} heads (from {src_particle})")
            if lora is not None:
                for blk in self.blocks:
                    blk.attn.add_particle(particle, lora)
                added.append(f"{particle} rsLoRA r={lora.r} alpha={lora.alpha} on {'/'.join(PROJECTIONS)}")
        return added


class ShowerTransformer(_ShowerNetwork):
    """Token + voxel-axis + energy embeddings -> self-attention blocks -> per-particle heads."""

    def __init__(self, tok: ShowerTokenizer, grid: tuple[int, int, int], width: int, depth: int, heads: int,
                 ffn_mult: int, classes: list[str], base_particle: str, theta: float, dropout: float) -> None:
        super().__init__()
        self.space_emb = nn.Embedding(tok.space_vocab, width)
        self.energy_emb = nn.Embedding(tok.energy_vocab, width)
        # each voxel also gets learned (layer, a, b) embeddings: neighbours share structure
        self.axis_emb = nn.ModuleList(nn.Embedding(n + 1, width) for n in grid)  # row n: special tokens
        axes = torch.tensor(grid).repeat(tok.space_vocab, 1)
        axes[1 : tok.n_voxels + 1] = torch.stack(torch.unravel_index(torch.arange(tok.n_voxels), grid), -1)
        self.register_buffer("axes", axes, persistent=False)
        self.cond = nn.Sequential(nn.Linear(1, width), nn.GELU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(Block(width, heads, ffn_mult, classes, theta, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.heads = nn.ModuleDict({base_particle: Heads(width, tok.space_vocab, tok.energy_vocab)})

    def embed_hits(self, space: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
        x = self.space_emb(space) + self.energy_emb(energy)
        for i, emb in enumerate(self.axis_emb):
            x = x + emb(self.axes[space, i])
        return x

    def embed_condition(self, incident_mev: torch.Tensor) -> torch.Tensor:
        # ln(E / 1 GeV) / 5 maps the 10-100 GeV range to ~[0.5, 0.9]
        return self.cond((incident_mev.float() / 1e3).log()[:, None] / 5)[:, None]

    def run(self, x: torch.Tensor, class_ids: torch.Tensor, particles: list[str], caches: list[dict] | None = None) -> torch.Tensor:
        """Blocks + final norm over embedded positions (with ``caches``: only the new positions)."""
        gates = self._gates(particles, x.device)
        for i, blk in enumerate(self.blocks):
            x = blk(x, gates, class_ids, None if caches is None else caches[i])
        return self.norm(x)

    def hidden(self, space: torch.Tensor, energy: torch.Tensor, incident_mev: torch.Tensor,
               class_ids: torch.Tensor, particles: list[str]) -> torch.Tensor:
        """(B, L) hit tokens -> (B, L + 1, width); position 0 is the incident energy, position i predicts hit i + 1."""
        x = torch.cat([self.embed_condition(incident_mev), self.embed_hits(space, energy)], 1)
        return self.run(x, class_ids, particles)


class Fm4calTransformer(_ShowerNetwork):
    """FM4CAL's ``ECAL_GPT`` with our lifecycle (label-routed experts, per-particle heads and LoRA).

    The sequences are ``[I, SOS, hit 1, ...]`` in two streams: space tokens (+ ``z / Nz`` on every
    channel) and energy tokens, both starting with the embedded incident energy ``I``. Block 0 is
    cross-attention (queries from the energy stream, keys/values from the space stream), the
    others self-attention over the space stream; the output at ``I`` is dropped, so position i
    of :meth:`hidden` (``SOS`` for i = 0) predicts hit i + 1, as in our network.

    ``depth`` counts all blocks (the reference: 3, one cross + two self); ``rope_fraction`` 0.5 and
    ``theta`` 1000 as the reference. ``energy_range_gev`` is the span mapped linearly to [-1, 1]
    (the reference's global 10-100 GeV). The reference rotates interleaved channel pairs
    (``rotary_embedding_torch``) and we rotate split halves: a fixed permutation of channels that
    the projections absorb, with the same frequencies.
    """

    def __init__(self, tok: ShowerTokenizer, grid: tuple[int, int, int], width: int, depth: int, heads: int,
                 ffn_mult: int, classes: list[str], base_particle: str, theta: float, dropout: float,
                 rope_fraction: float = 0.5, energy_range_gev: tuple[float, float] = (10.0, 100.0)) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError("the fm4cal architecture needs depth >= 1 (its first block is the cross-attention one)")
        self.start = tok.START
        self.energy_range_gev = tuple(float(e) for e in energy_range_gev)
        self.space_emb = nn.Embedding(tok.space_vocab, width)
        self.energy_emb = nn.Embedding(tok.energy_vocab, width)
        self.cond = nn.Linear(1, width)
        z = torch.zeros(tok.space_vocab)  # special tokens sit at z = 0, as the reference's tok2z
        z[1 : tok.n_voxels + 1] = torch.div(torch.arange(tok.n_voxels), grid[1] * grid[2], rounding_mode="floor") / grid[0]
        self.register_buffer("z_over_nz", z, persistent=False)
        self.blocks = nn.ModuleList(
            Block(width, heads, ffn_mult, classes, theta, dropout, rope_fraction, out_bias=(i == 0), cross=(i == 0))
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.heads = nn.ModuleDict({base_particle: Heads(width, tok.space_vocab, tok.energy_vocab, voxel_aware=False)})

    def embed_hits(self, space: torch.Tensor, energy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.space_emb(space) + self.z_over_nz[space][..., None], self.energy_emb(energy)

    def embed_condition(self, incident_mev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[I, SOS]`` of both streams (B, 2, width)."""
        lo, hi = self.energy_range_gev
        i = self.cond(((incident_mev.float() / 1e3 - lo) / (hi - lo) * 2 - 1)[:, None])[:, None]
        sos = torch.full((len(incident_mev), 1), self.start, dtype=torch.long, device=incident_mev.device)
        xs, es = self.embed_hits(sos, sos)
        return torch.cat([i, xs], 1), torch.cat([i, es], 1)

    def run(self, x: tuple[torch.Tensor, torch.Tensor], class_ids: torch.Tensor, particles: list[str],
            caches: list[dict] | None = None) -> torch.Tensor:
        """Blocks + final norm over the (space, energy) streams; returns the space stream."""
        xs, es = x
        gates = self._gates(particles, xs.device)
        for i, blk in enumerate(self.blocks):
            xs = blk(xs, gates, class_ids, None if caches is None else caches[i], query=es if i == 0 else None)
        return self.norm(xs)

    def hidden(self, space: torch.Tensor, energy: torch.Tensor, incident_mev: torch.Tensor,
               class_ids: torch.Tensor, particles: list[str]) -> torch.Tensor:
        """(B, L) hit tokens -> (B, L + 1, width): the outputs at SOS, hit 1, ..., hit L."""
        (cx, ce), (hx, he) = self.embed_condition(incident_mev), self.embed_hits(space, energy)
        return self.run((torch.cat([cx, hx], 1), torch.cat([ce, he], 1)), class_ids, particles)[:, 1:]


ARCHITECTURES = {"ours": ShowerTransformer, "fm4cal": Fm4calTransformer}


# --------------------------------------------------------------------------------------------------
# Drawing a shower token by token: FM4CAL's sampling options and our constraints, as pure functions.
#
# The model's ``generate()`` masks what a step may not draw (its constraints), then calls
# :func:`draw` on the space logits and on the energy logits. The options follow the reference's
# ``ECAL_GPT.generate``:
#
# - ``method``: ``"multinomial"`` (its ``Default``), ``"greedy"``, ``"top_k"`` (k = 100),
#   ``"nucleus"`` (p = 0.95: the smallest set of most likely tokens whose probability exceeds p,
#   the crossing token included) or ``"min_p"`` (drop tokens below ``min_p`` times the most likely
#   one's probability, min_p = 0.05, always keeping the ``min_tokens_to_keep`` = 50 most likely);
# - ``temperature`` divides the logits before any of these; ``dynamic_temperature`` replaces it by
#   the reference's schedule ``min(t_max, t_min + (t_max - t_min) step / max_steps)``, rising
#   linearly from 0.95 to 1.05 over the sequence (``__increasing_linear_temp``);
# - ``stop_on``: ``"either"`` ends a sequence on the space *or* the energy end token (the
#   reference), ``"space"`` on the space end token only (ours; the energy end token is never drawn).
#
# Our constraints, deviations from the reference (which has none): ``unique_voxels`` (a voxel is
# hit at most once: a shower deposits one energy per cell) and ``monotone_energy`` (each energy
# token at most the previous one: the training sequences are ordered by energy, highest first).


METHODS = ("multinomial", "greedy", "top_k", "nucleus", "min_p")


@dataclass(frozen=True)
class Sampling:
    """How ``generate()`` draws tokens; the defaults are ours, :data:`REFERENCE_SAMPLING` is FM4CAL's."""

    method: str = "multinomial"
    temperature: float = 1.0
    dynamic_temperature: bool = False
    temperature_range: tuple[float, float] = (0.95, 1.05)
    top_k: int = 100
    top_p: float = 0.95
    min_p: float = 0.05
    min_tokens_to_keep: int = 50
    stop_on: str = "space"
    unique_voxels: bool = True
    monotone_energy: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"sampling method must be one of {METHODS}, got {self.method!r}")
        if self.stop_on not in ("space", "either"):
            raise ValueError(f"stop_on must be 'space' or 'either', got {self.stop_on!r}")
        if self.temperature < 0 or min(self.temperature_range) <= 0:
            raise ValueError(f"temperatures must be > 0 (0 only as greedy `temperature`), got {self.temperature}, {self.temperature_range}")
        if not 0 < self.top_p <= 1 or not 0 <= self.min_p <= 1 or self.top_k < 1 or self.min_tokens_to_keep < 1:
            raise ValueError(f"need 0 < top_p <= 1, 0 <= min_p <= 1, top_k >= 1, min_tokens_to_keep >= 1; got {self}")


#: the reference's generation: plain multinomial at temperature 1 with its dynamic schedule on
#: (as its README's commands run it), stopping on either end token, no constraints
REFERENCE_SAMPLING = Sampling(dynamic_temperature=True, stop_on="either", unique_voxels=False, monotone_energy=False)


def temperature_at(cfg: Sampling, step: int, max_steps: int) -> float:
    """The temperature of generation step ``step`` (0-based) of at most ``max_steps``."""
    if not cfg.dynamic_temperature:
        return cfg.temperature
    lo, hi = cfg.temperature_range
    return min(hi, lo + (hi - lo) * step / max_steps)


def filter_logits(logits: torch.Tensor, cfg: Sampling) -> torch.Tensor:
    """Logits (..., V) with the tokens ``cfg.method`` excludes set to -inf (others unchanged)."""
    if cfg.method in ("multinomial", "greedy"):
        return logits
    if cfg.method == "top_k":
        idx = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).indices
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, idx, True)
        return logits.masked_fill(~keep, float("-inf"))
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    if cfg.method == "nucleus":
        drop = probs.cumsum(-1) > cfg.top_p
        drop[..., 1:] = drop[..., :-1].clone()  # keep the token that crosses top_p
        drop[..., 0] = False
    else:  # min_p
        drop = probs < cfg.min_p * probs[..., :1]
        drop[..., : cfg.min_tokens_to_keep] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def draw(logits: torch.Tensor, cfg: Sampling, step: int = 0, max_steps: int = 1,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``logits`` (B, V): temperature, then ``cfg.method``'s filter, then a draw."""
    t = temperature_at(cfg, step, max_steps)
    if cfg.method == "greedy" or t == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / t, cfg).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
