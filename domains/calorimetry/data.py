"""Calorimeter showers: hit lists, their tokens and the DataModule (readers and the detector binning
in ``formats.py``, the generator in ``synth.py``).

Two on-disk layouts are read: CaloChallenge's dense one (arXiv 2410.21611; ``incident_energies``
(N, 1) and ``showers`` (N, n_voxels) in MeV, voxels flattened over the detector binning) and
FM4CAL's sparse per-event groups. The generator writes the dense one, cached under
``data/generated/calorimetry``. The detector binning is cartesian for the generator or read from
CaloChallenge's ``binning_dataset_*.xml`` files.

Classes are ``<material>_<particle>`` (``W_photon``, ``Pb_electron``, ``ATLAS_pion``): one expert per class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset

from suite.data import SuiteDataModule, file_hash, split_by_group

from .formats import (  # noqa: F401 - re-exported: the domain's readers live in one place
    PARTICLES,
    CaloFormatError,
    CaloUnitWarning,
    CylinderLayer,
    Geometry,
    ShowerFile,
    parse_class,
    read_binning_xml,
    read_calochallenge,
    read_showers,
    read_sparse_showers,
    reference_class_name,
    write_calochallenge,
    write_sparse_showers,
)


# --- sparse hits and the DataModule ---------------------------------------------------------------
def shower_hits(shower: np.ndarray, threshold_mev: float) -> tuple[np.ndarray, np.ndarray]:
    """Voxels at or above threshold, ordered by deposited energy, highest first (the sequence order)."""
    idx = np.flatnonzero(shower >= threshold_mev)
    order = np.argsort(-shower[idx], kind="stable")
    return idx[order], shower[idx[order]]


def sparse_hits(voxels: np.ndarray, energies: np.ndarray, threshold_mev: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`shower_hits` of a sparse shower (same order: energy descending, ties by voxel index)."""
    by_voxel = np.argsort(voxels, kind="stable")
    v, e = voxels[by_voxel], energies[by_voxel]
    keep = e >= threshold_mev
    v, e = v[keep], e[keep]
    order = np.argsort(-e, kind="stable")
    return v[order], e[order]


class ShowerSet(Dataset):
    """Showers of one or more classes as sparse, energy-ordered hit lists."""

    def __init__(self, items: list[tuple[np.ndarray, np.ndarray, float, str]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        voxels, energies, inc, cls = self.items[i]
        return {"voxels": voxels, "energies": energies, "incident_energy": inc, "label": cls}


def collate_showers(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Pad hit lists to the longest in the batch (voxel -1 marks padding)."""
    n = max(1, max(len(it["voxels"]) for it in items))
    voxels = torch.full((len(items), n), -1, dtype=torch.long)
    energies = torch.zeros(len(items), n)
    for b, it in enumerate(items):
        k = len(it["voxels"])
        voxels[b, :k] = torch.as_tensor(it["voxels"], dtype=torch.long)
        energies[b, :k] = torch.as_tensor(it["energies"], dtype=torch.float32)
    return {
        "voxels": voxels,
        "energies": energies,
        "n_hits": (voxels >= 0).sum(1),
        "incident_energy": torch.tensor([it["incident_energy"] for it in items], dtype=torch.float32),
        "label": [it["label"] for it in items],
    }


class CaloShowerData(SuiteDataModule):
    """Showers per class, generated (default) or read from CaloChallenge / FM4CAL files.

    Args:
        classes: classes to train on (this stage's new classes).
        eval_classes: classes validated and tested (default: ``classes``); later stages list the
            old ones too, to show they are not forgotten.
        files: real data: ``{class: path.hdf5}`` (or a list of paths, read in order) in
            CaloChallenge's dense layout or FM4CAL's sparse groups (detected per file); classes
            not listed are generated.
        grid, layer_mm, cell_mm: the geometry (must match the model's ``grid``).
        binning_xml, binning_particle: a CaloChallenge ``binning_dataset_*.xml`` to take the
            geometry from (cylindrical, angle origin -pi as its XMLHandler) and the name of the
            ``Bin`` to read (default: the only one); ``grid`` must then equal the file's
            (``[45, 16, 9]`` for dataset 2, ``[1, 1, 368]`` for dataset 1's photons).
        energy_unit: ``"auto"`` (MeV as the layouts say; GeV detected by range, converted and
            warned about), ``"MeV"`` or ``"GeV"``.
        n_per_class: generated showers per class.
        energy_range_gev: incident energies, sampled log-uniformly.
        sampling_term: stochastic term a of sigma_E/E = a/sqrt(E).
        threshold_mev: readout threshold; deposits below it are not hits (the energy fraction
            they carry is reported at setup).
        max_hits: longest hit sequence; showers with more hits keep their ``max_hits`` highest
            deposits, and how many showers and how much energy that cut is reported at setup.
        splits: train/val/test shares of each class's showers (default 0.7 / 0.15 / 0.15).
        seed: batch order, the split and the generator's random stream.
    """

    def __init__(
        self,
        classes: list[str] = ["W_photon", "Ta_photon"],  # noqa: B006 - jsonargparse needs a literal default
        eval_classes: list[str] | None = None,
        files: dict[str, str | list[str]] | None = None,
        grid: list[int] = [10, 8, 8],  # noqa: B006
        layer_mm: float = 8.0,
        cell_mm: float = 5.0,
        binning_xml: str | None = None,
        binning_particle: str | None = None,
        energy_unit: str = "auto",
        n_per_class: int = 800,
        energy_range_gev: list[float] = [10.0, 100.0],  # noqa: B006
        sampling_term: float = 0.10,
        threshold_mev: float = 30.0,
        max_hits: int = 96,
        splits: dict[str, float] | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        for c in list(classes) + list(eval_classes or []) + list(files or {}):
            parse_class(c)
        if energy_unit not in ("auto", "MeV", "GeV"):
            raise ValueError(f"energy_unit must be 'auto', 'MeV' or 'GeV', got {energy_unit!r}")
        self.classes = list(classes)
        self.eval_classes = list(eval_classes) if eval_classes is not None else list(classes)
        self.files = dict(files or {})
        if binning_xml is not None:
            self.geometry = read_binning_xml(binning_xml, binning_particle)
            if tuple(grid) != self.geometry.grid:
                raise ValueError(f"grid {list(grid)} does not match {binning_xml} ({list(self.geometry.grid)}); "
                                 f"set data.init_args.grid (and so the model's) to {list(self.geometry.grid)}")
        else:
            self.geometry = Geometry(tuple(grid), layer_mm, cell_mm)
        self.energy_unit = energy_unit
        self.n_per_class = n_per_class
        self.energy_range_gev = list(energy_range_gev)
        self.sampling_term = sampling_term
        self.threshold_mev = threshold_mev
        self.max_hits = max_hits
        self.fractions = splits or {"train": 0.7, "val": 0.15, "test": 0.15}
        self.data_hashes: dict[str, str] = {}
        self.cut_report: dict[str, dict[str, float]] = {}

    def class_files(self, cls: str) -> list[Path]:
        if cls in self.files:
            given = self.files[cls]
            return [Path(p) for p in ([given] if isinstance(given, (str, Path)) else given)]
        from .synth import generated_file  # synth.py builds on this module's Geometry and writer

        return [generated_file(cls, self.n_per_class, self.geometry, self.energy_range_gev, self.sampling_term, self.seed)]

    def class_file(self, cls: str) -> Path:
        """The (first) file of a class."""
        return self.class_files(cls)[0]

    def load_class(self, cls: str) -> ShowerFile:
        """The class's showers, its files concatenated; FM4CAL files must hold only that class's material."""
        parts = []
        for path in self.class_files(cls):
            showers = read_showers(path, self.geometry.grid, self.energy_unit)
            labels = {m for m in showers.materials if m is not None}
            if any(reference_class_name(m) != cls for m in labels):
                raise CaloFormatError(path, "material", f"only events of class {cls}", f"materials {sorted(labels)}")
            parts.append(showers)
        self.data_hashes[cls] = "+".join(file_hash(p.path) for p in parts)
        if len(parts) == 1:
            return parts[0]
        return ShowerFile(parts[0].path, np.concatenate([p.incident_mev for p in parts]), [v for p in parts for v in p.voxels],
                          [e for p in parts for e in p.energies], parts[0].n_voxels, [m for p in parts for m in p.materials])

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        per_split: dict[str, list] = {name: [] for name in self.fractions}
        ids: dict[str, list[str]] = {name: [] for name in self.fractions}
        # evaluation classes first, in their listed order: later stages append classes, so an old
        # class's test showers stay in the same batches from stage to stage
        for cls in dict.fromkeys(self.eval_classes + self.classes):
            showers = self.load_class(cls)
            hits, cut_showers, cut_energy, below, total = [], 0, 0.0, 0.0, 0.0
            for v_all, e_all in zip(showers.voxels, showers.energies):
                v, e = sparse_hits(v_all, e_all, self.threshold_mev)
                total += float(e_all.sum())
                below += float(e_all.sum()) - float(e.sum())
                if len(v) > self.max_hits:
                    cut_showers += 1
                    cut_energy += float(e[self.max_hits :].sum())
                    v, e = v[: self.max_hits], e[: self.max_hits]
                hits.append((v, e))
            total = total or 1.0
            self.cut_report[cls] = {
                "below_threshold_energy_fraction": below / total,
                "showers_over_max_hits": cut_showers,
                "over_max_hits_energy_fraction": cut_energy / total,
            }
            rank_zero_info(
                f"calorimetry {cls}: {len(showers)} showers, mean {np.mean([len(h[0]) for h in hits]):.1f} hits; "
                f"{100 * self.cut_report[cls]['below_threshold_energy_fraction']:.2f} % of energy below "
                f"{self.threshold_mev} MeV; {cut_showers} showers cut to {self.max_hits} hits "
                f"({100 * self.cut_report[cls]['over_max_hits_energy_fraction']:.2f} % of energy)"
            )
            inc = showers.incident_mev
            split = split_by_group(np.arange(len(showers)), self.fractions, seed=self.seed)
            for name, idx in split.items():
                if name == "train" and cls not in self.classes:
                    continue
                if name != "train" and cls not in self.eval_classes:
                    continue
                per_split[name] += [(hits[i][0], hits[i][1], float(inc[i]), cls) for i in idx]
                ids[name] += [f"{cls}/{i}" for i in idx]
        for name, items in per_split.items():
            self.splits[name] = ShowerSet(items)
            self.record_split(name, ids[name])

    def loader(self, name: str, shuffle: bool = False, **kwargs: Any):  # type: ignore[override]
        return super().loader(name, shuffle=shuffle, collate_fn=collate_showers, **kwargs)


# --------------------------------------------------------------------------------------------------
# Shower tokens: each hit is a space token (its voxel) paired with an energy token (its deposit).
#
# Space vocabulary: 0 = start, ``1..n_voxels`` = voxel ``token - 1``, then end, then pad.
# Energy vocabulary: 0 = start, ``1..n_bins`` = deposit bins, then end, then pad.
#
# Two bugs of the FM4CAL reference tokeniser are fixed here:
#
# - De-tokenisation one bin too high. The reference's ``EnergyTokenizer`` binned the raw deposit
#   with ``bins = arange(e_min, e_max + res, res)`` and stored ``t = np.digitize(e, bins)`` as the
#   token, so ``t`` already counts from 1 for ``bins[t-1] <= e < bins[t]``. ``de_tokenize`` then
#   returned ``e_min + (t + 0.5) res`` plus a uniform jitter of +-res/2, a value in
#   ``[e_min + t res, e_min + (t + 1) res)``: bin ``t + 1``, one bin above the deposit. Here
#   token ``t`` *is* bin ``[edges[t-1], edges[t])`` and decodes inside it.
# - Hard-coded hit shifts. The reference decoder moved the decoded hits of Ta and Pb electrons by
#   fixed, class-specific offsets. Here a voxel is ``token - 1`` for every class, with no per-class
#   correction, so a generated hit lands exactly where its token says.


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
