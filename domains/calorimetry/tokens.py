"""Shower tokens: each hit is a space token (its voxel) paired with an energy token (its deposit).

Space vocabulary: 0 = start, ``1..n_voxels`` = voxel ``token - 1``, then end, then pad.
Energy vocabulary: 0 = start, ``1..n_bins`` = deposit bins, then end, then pad.

Two bugs of the FM4CAL reference tokeniser are fixed here:

- De-tokenisation one bin too high. The reference's ``EnergyTokenizer`` binned the raw deposit
  with ``bins = arange(e_min, e_max + res, res)`` and stored ``t = np.digitize(e, bins)`` as the
  token, so ``t`` already counts from 1 for ``bins[t-1] <= e < bins[t]``. ``de_tokenize`` then
  returned ``e_min + (t + 0.5) res`` plus a uniform jitter of +-res/2, a value in
  ``[e_min + t res, e_min + (t + 1) res)``: bin ``t + 1``, one bin above the deposit. Here
  token ``t`` *is* bin ``[edges[t-1], edges[t])`` and decodes inside it.
- Hard-coded hit shifts. The reference decoder moved the decoded hits of Ta and Pb electrons by
  fixed, class-specific offsets. Here a voxel is ``token - 1`` for every class, with no per-class
  correction, so a generated hit lands exactly where its token says.
"""

from __future__ import annotations

import numpy as np
import torch


class ShowerTokenizer:
    """Voxel index <-> space token, deposit [MeV] <-> energy token (log- or linearly spaced bins).

    Args:
        n_voxels: voxels of the detector binning.
        e_min_mev: the readout threshold: the lowest deposit a hit can have (left edge of bin 1).
        e_max_mev: the largest deposit representable (right edge of the last bin).
        n_bins: energy bins.
        spacing: ``"log"`` (deposits span decades) or ``"linear"`` (the reference's choice).
    """

    START = 0

    def __init__(self, n_voxels: int, e_min_mev: float, e_max_mev: float, n_bins: int, spacing: str = "log") -> None:
        if not 0 < e_min_mev < e_max_mev:
            raise ValueError(f"need 0 < e_min_mev < e_max_mev, got {e_min_mev}, {e_max_mev}")
        if spacing not in ("log", "linear"):
            raise ValueError(f"spacing must be 'log' or 'linear', got {spacing!r}")
        self.n_voxels, self.n_bins, self.spacing = n_voxels, n_bins, spacing
        space = np.geomspace if spacing == "log" else np.linspace
        self.edges = torch.as_tensor(space(e_min_mev, e_max_mev, n_bins + 1), dtype=torch.float64)
        self.space_end, self.space_pad = n_voxels + 1, n_voxels + 2
        self.energy_end, self.energy_pad = n_bins + 1, n_bins + 2

    @property
    def space_vocab(self) -> int:
        return self.n_voxels + 3

    @property
    def energy_vocab(self) -> int:
        return self.n_bins + 3

    def space_tokens(self, voxels: torch.Tensor) -> torch.Tensor:
        """Voxel indices (-1 = padding) -> space tokens."""
        if voxels.numel() and int(voxels.max()) >= self.n_voxels:
            raise ValueError(f"voxel index {int(voxels.max())} is outside the {self.n_voxels}-voxel grid: check the model's grid against the data's")
        return torch.where(voxels >= 0, voxels + 1, torch.full_like(voxels, self.space_pad))

    def voxels(self, space_tokens: torch.Tensor) -> torch.Tensor:
        """Space tokens -> voxel indices; special tokens -> -1. The same rule for every class."""
        is_voxel = (space_tokens >= 1) & (space_tokens <= self.n_voxels)
        return torch.where(is_voxel, space_tokens - 1, torch.full_like(space_tokens, -1))

    def energy_tokens(self, energies_mev: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Deposits [MeV] -> bin tokens where ``valid``; padding elsewhere.

        ``torch.bucketize(right=True)`` has ``np.digitize`` semantics: ``t`` with
        ``edges[t-1] <= e < edges[t]``, so the token is the 1-based bin itself. A deposit outside
        ``[e_min, e_max)`` is an error (lower the threshold or raise e_max), not a clipped value.
        """
        e = energies_mev.to(torch.float64)
        lo, hi = float(self.edges[0]), float(self.edges[-1])
        bad = valid & ((e < lo) | (e >= hi))
        if bad.any():
            raise ValueError(
                f"{int(bad.sum())} deposits outside the energy range [{lo:g}, {hi:g}) MeV "
                f"(e.g. {float(e[bad][0]):g}); set the data's threshold_mev to the lowest deposit kept and the model's e_max_mev above the largest"
            )
        t = torch.bucketize(e, self.edges.to(e.device), right=True)
        return torch.where(valid, t, torch.full_like(t, self.energy_pad))

    def energies(self, energy_tokens: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Energy tokens -> deposits [MeV] inside their own bin; special tokens -> 0.

        Without a generator the bin centre (geometric for log bins); with one, a value drawn
        uniformly within the bin (in log for log bins), which undoes the binning's discreteness.
        """
        t = energy_tokens.long()
        is_bin = (t >= 1) & (t <= self.n_bins)
        k = t.clamp(1, self.n_bins)
        edges = self.edges.to(t.device)
        lo, hi = edges[k - 1], edges[k]
        if generator is None:
            u = 0.5 * torch.ones_like(lo)
        else:  # drawn on the generator's device (a CUDA generator cannot fill a CPU tensor), then moved
            u = torch.rand(lo.shape, generator=generator, dtype=torch.float64, device=generator.device).to(lo.device)
        if self.spacing == "log":
            e = torch.exp(torch.log(lo) + u * (torch.log(hi) - torch.log(lo)))
        else:
            e = lo + u * (hi - lo)
        e = torch.minimum(e, torch.nextafter(hi, lo))  # stay strictly inside [lo, hi)
        return torch.where(is_bin, e, torch.zeros_like(e)).float()

    def dense(self, space_tokens: torch.Tensor, energy_tokens: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Token sequences (B, L) -> voxel energies (B, n_voxels) [MeV]; non-voxel tokens contribute nothing."""
        vox = self.voxels(space_tokens)
        e = self.energies(energy_tokens, generator)
        keep = (vox >= 0) & (e > 0)
        out = torch.zeros(space_tokens.shape[0], self.n_voxels, dtype=torch.float32, device=space_tokens.device)
        return out.index_put_((torch.nonzero(keep, as_tuple=True)[0], vox[keep]), e[keep], accumulate=True)
