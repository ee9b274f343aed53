"""The shower transformer: hit tokens -> causal blocks (attention + per-class MoE FFN) -> heads.

A shower is a sequence of hits ordered by deposited energy; each hit is a space token (its
voxel) plus an energy token (its binned deposit), and position 0 holds the incident energy.
Each block is causal self-attention with rotary positions and a feed-forward mixture of experts
with one expert per class (``<material>_<particle>``), picked by a label-masked router. Each hit
is factorised as p(voxel | past) p(energy | voxel, past): a space head reads the hidden state, an
energy head reads it plus an embedding of the chosen voxel. Heads, and optionally rsLoRA on the
attention projections, exist per particle; every row only ever passes through its own.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from suite.adapters import LoRA
from suite.adapters.lora import LoRALinear
from suite.adapters.moe import FeedForward, MixtureOfExperts

from .data import parse_class
from .tokens import ShowerTokenizer

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
    """Causal self-attention; a particle with LoRA gets its own q/k/v/out update on its rows only."""

    def __init__(self, width: int, heads: int, theta: float) -> None:
        super().__init__()
        if width % heads or (width // heads) % 2:
            raise ValueError(f"width {width} must split into {heads} heads of even size (rotary pairs)")
        self.heads, self.theta = heads, theta
        self.q, self.k, self.v, self.out = (nn.Linear(width, width, bias=False) for _ in PROJECTIONS)
        self.lora = nn.ModuleDict()

    def add_particle(self, particle: str, spec: LoRA) -> None:
        self.lora[particle] = nn.ModuleDict({p: ParticleLoRALinear(getattr(self, p), spec) for p in PROJECTIONS})

    def _proj(self, name: str, x: torch.Tensor, gates: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
        y = getattr(self, name)(x)  # base rows: exactly the frozen Linear, as before any LoRA existed
        for particle, rows in gates:
            if particle in self.lora:
                y = torch.where(rows, self.lora[particle][name](x), y)
        return y

    def forward(self, x: torch.Tensor, gates: list[tuple[str, torch.Tensor]], cache: dict | None = None) -> torch.Tensor:
        """``cache`` (generation): keys/values of earlier positions, extended in place."""
        b, t, w = x.shape
        q, k, v = (self._proj(n, x, gates).view(b, t, self.heads, -1).transpose(1, 2) for n in ("q", "k", "v"))
        start = 0 if cache is None or "k" not in cache else cache["k"].shape[2]
        q, k = rope(q, self.theta, start), rope(k, self.theta, start)
        if cache is not None:
            if start:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        a = F.scaled_dot_product_attention(q, k, v, is_causal=start == 0 and t > 1)
        return self._proj("out", a.transpose(1, 2).reshape(b, t, w), gates)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, ffn_mult: int, classes: list[str], theta: float, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, heads, theta)
        experts = [FeedForward(width, ffn_mult * width, dropout) for _ in classes]
        self.moe = MixtureOfExperts(experts, width, router="label", labels=classes)

    def forward(self, x: torch.Tensor, gates: list[tuple[str, torch.Tensor]], class_ids: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), gates, cache)
        return x + self.moe(self.ln2(x), labels=class_ids)


class Heads(nn.Module):
    """Separate output heads: next voxel from h; its energy from h + an embedding of that voxel."""

    def __init__(self, width: int, space_vocab: int, energy_vocab: int) -> None:
        super().__init__()
        self.space = nn.Linear(width, space_vocab)
        self.next_space = nn.Embedding(space_vocab, width)
        self.energy = nn.Linear(width, energy_vocab)

    def space_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.space(h)

    def energy_logits(self, h: torch.Tensor, next_space: torch.Tensor) -> torch.Tensor:
        return self.energy(h + self.next_space(next_space))


class ShowerTransformer(nn.Module):
    """Token + voxel-axis + energy embeddings -> blocks -> per-particle heads."""

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

    @property
    def classes(self) -> list[str]:
        return self.blocks[0].moe.label_names

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
        gates = [(p, torch.tensor([q == p for q in particles], device=x.device)[:, None, None]) for p in dict.fromkeys(particles)]
        for i, blk in enumerate(self.blocks):
            x = blk(x, gates, class_ids, None if caches is None else caches[i])
        return self.norm(x)

    def hidden(self, space: torch.Tensor, energy: torch.Tensor, incident_mev: torch.Tensor,
               class_ids: torch.Tensor, particles: list[str]) -> torch.Tensor:
        """(B, L) hit tokens -> (B, L + 1, width); position 0 is the incident energy, position i predicts hit i + 1."""
        x = torch.cat([self.embed_condition(incident_mev), self.embed_hits(space, energy)], 1)
        return self.run(x, class_ids, particles)

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
