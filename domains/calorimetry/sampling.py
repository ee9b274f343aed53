"""Drawing a shower token by token: FM4CAL's sampling options and our constraints, as pure functions.

The model's ``generate()`` masks what a step may not draw (its constraints), then calls
:func:`draw` on the space logits and on the energy logits. The options follow the reference's
``ECAL_GPT.generate``:

- ``method``: ``"multinomial"`` (its ``Default``), ``"greedy"``, ``"top_k"`` (k = 100),
  ``"nucleus"`` (p = 0.95: the smallest set of most likely tokens whose probability exceeds p,
  the crossing token included) or ``"min_p"`` (drop tokens below ``min_p`` times the most likely
  one's probability, min_p = 0.05, always keeping the ``min_tokens_to_keep`` = 50 most likely);
- ``temperature`` divides the logits before any of these; ``dynamic_temperature`` replaces it by
  the reference's schedule ``min(t_max, t_min + (t_max - t_min) step / max_steps)``, rising
  linearly from 0.95 to 1.05 over the sequence (``__increasing_linear_temp``);
- ``stop_on``: ``"either"`` ends a sequence on the space *or* the energy end token (the
  reference), ``"space"`` on the space end token only (ours; the energy end token is never drawn).

Our constraints, deviations from the reference (which has none): ``unique_voxels`` (a voxel is
hit at most once: a shower deposits one energy per cell) and ``monotone_energy`` (each energy
token at most the previous one: the training sequences are ordered by energy, highest first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
