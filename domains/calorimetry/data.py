"""Calorimeter showers: the CaloChallenge HDF5 reader, the geometry and the DataModule (the generator is ``synth.py``).

One on-disk layout serves both real and generated data (the CaloChallenge one, arXiv 2410.21611):
``incident_energies`` (N, 1) and ``showers`` (N, n_voxels), energies in MeV, voxels flattened
over the detector binning in C order (layer-major). The generator writes exactly that, cached
under ``data/generated/calorimetry``.

Classes are ``<material>_<particle>`` (``W_photon``, ``Pb_electron``): one expert per class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset

from suite.data import SuiteDataModule, file_hash, split_by_group

PARTICLES = ("photon", "electron")


def parse_class(name: str) -> tuple[str, str]:
    """``"W_photon"`` -> ``("W", "photon")``, with a clear error for anything else."""
    material, _, particle = name.rpartition("_")
    if not material or particle not in PARTICLES:
        raise ValueError(f"class {name!r} must be '<material>_<particle>' with particle in {PARTICLES}, e.g. 'W_photon'")
    return material, particle


@dataclass(frozen=True)
class Geometry:
    """Detector binning: ``grid`` = (layers, a, b) voxels, flattened in C order as CaloChallenge does.

    ``kind="cartesian"``: (a, b) = (y, x) square cells of ``cell_mm`` centred on the beam.
    ``kind="cylindrical"``: (a, b) = (angular, radial) bins with radial edges ``r_edges_mm``
    (CaloChallenge datasets 2 and 3: 45 layers x 16 angles x 9 radial bins).
    """

    grid: tuple[int, int, int] = (10, 8, 8)
    layer_mm: float = 8.0
    cell_mm: float = 5.0
    kind: str = "cartesian"
    r_edges_mm: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        if len(self.grid) != 3 or min(self.grid) < 1:
            raise ValueError(f"geometry grid must be 3 positive ints (layers, a, b), got {self.grid}")
        if self.kind not in ("cartesian", "cylindrical"):
            raise ValueError(f"geometry kind must be 'cartesian' or 'cylindrical', got {self.kind!r}")
        if self.kind == "cylindrical" and len(self.r_edges_mm) != self.grid[2] + 1:
            raise ValueError(f"cylindrical geometry needs {self.grid[2] + 1} r_edges_mm, got {len(self.r_edges_mm)}")

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.grid))

    def voxel_positions(self) -> np.ndarray:
        """(n_voxels, 3): layer index, x [mm], y [mm] of every voxel centre, in flattening order."""
        nz, na, nb = self.grid
        z, a, b = np.meshgrid(np.arange(nz), np.arange(na), np.arange(nb), indexing="ij")
        if self.kind == "cartesian":
            y = (a + 0.5 - na / 2) * self.cell_mm
            x = (b + 0.5 - nb / 2) * self.cell_mm
        else:
            edges = np.asarray(self.r_edges_mm, dtype=np.float64)
            r = ((edges[:-1] + edges[1:]) / 2)[b]
            alpha = (a + 0.5) * 2 * np.pi / na
            x, y = r * np.cos(alpha), r * np.sin(alpha)
        return np.stack([z, x, y], -1).reshape(-1, 3).astype(np.float64)


# --- the CaloChallenge reader -------------------------------------------------------------------
def read_calochallenge(path: str | Path, n_voxels: int) -> tuple[np.ndarray, np.ndarray]:
    """Read ``incident_energies`` (N,) and ``showers`` (N, n_voxels), both in MeV, validating the layout."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such CaloChallenge HDF5 file")
    with h5py.File(path, "r") as f:
        for key in ("incident_energies", "showers"):
            if key not in f:
                raise KeyError(f"{path}: missing dataset {key!r}; expected 'incident_energies' (N, 1) and 'showers' (N, {n_voxels})")
        inc = np.asarray(f["incident_energies"][()], dtype=np.float64)
        showers = np.asarray(f["showers"][()], dtype=np.float32)
    if inc.ndim != 2 or inc.shape[1] != 1:
        raise ValueError(f"{path}: 'incident_energies' has shape {inc.shape}, expected (N, 1)")
    if showers.ndim != 2 or showers.shape != (inc.shape[0], n_voxels):
        raise ValueError(f"{path}: 'showers' has shape {showers.shape}, expected ({inc.shape[0]}, {n_voxels}) for this geometry")
    if not (np.isfinite(inc).all() and (inc > 0).all()):
        raise ValueError(f"{path}: 'incident_energies' must be finite and > 0 MeV")
    if not (np.isfinite(showers).all() and (showers >= 0).all()):
        raise ValueError(f"{path}: 'showers' must be finite and >= 0 MeV")
    return inc[:, 0], showers


def write_calochallenge(path: str | Path, incident_mev: np.ndarray, showers_mev: np.ndarray, attrs: dict[str, Any] | None = None) -> None:
    """Write the CaloChallenge layout (plus optional file attributes, e.g. material and particle)."""
    with h5py.File(path, "w") as f:
        f.create_dataset("incident_energies", data=np.asarray(incident_mev, np.float32).reshape(-1, 1))
        f.create_dataset("showers", data=np.asarray(showers_mev, np.float32), compression="gzip", compression_opts=4)
        for k, v in (attrs or {}).items():
            f.attrs[k] = v


# --- sparse hits and the DataModule ---------------------------------------------------------------
def shower_hits(shower: np.ndarray, threshold_mev: float) -> tuple[np.ndarray, np.ndarray]:
    """Voxels at or above threshold, ordered by deposited energy, highest first (the sequence order)."""
    idx = np.flatnonzero(shower >= threshold_mev)
    order = np.argsort(-shower[idx], kind="stable")
    return idx[order], shower[idx[order]]


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
    """Showers per class, generated (default) or read from CaloChallenge files.

    Args:
        classes: classes to train on (this stage's new classes).
        eval_classes: classes validated and tested (default: ``classes``); later stages list the
            old ones too, to show they are not forgotten.
        files: real data: ``{class: path.hdf5}`` in the CaloChallenge layout; classes not listed are generated.
        grid, layer_mm, cell_mm: the geometry (must match the model's ``grid``).
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
        files: dict[str, str] | None = None,
        grid: list[int] = [10, 8, 8],  # noqa: B006
        layer_mm: float = 8.0,
        cell_mm: float = 5.0,
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
        self.classes = list(classes)
        self.eval_classes = list(eval_classes) if eval_classes is not None else list(classes)
        self.files = dict(files or {})
        self.geometry = Geometry(tuple(grid), layer_mm, cell_mm)
        self.n_per_class = n_per_class
        self.energy_range_gev = list(energy_range_gev)
        self.sampling_term = sampling_term
        self.threshold_mev = threshold_mev
        self.max_hits = max_hits
        self.fractions = splits or {"train": 0.7, "val": 0.15, "test": 0.15}
        self.data_hashes: dict[str, str] = {}
        self.cut_report: dict[str, dict[str, float]] = {}

    def class_file(self, cls: str) -> Path:
        if cls in self.files:
            return Path(self.files[cls])
        from .synth import generated_file  # synth.py builds on this module's Geometry and writer

        return generated_file(cls, self.n_per_class, self.geometry, self.energy_range_gev, self.sampling_term, self.seed)

    def load_class(self, cls: str) -> tuple[np.ndarray, np.ndarray]:
        path = self.class_file(cls)
        self.data_hashes[cls] = file_hash(path)
        return read_calochallenge(path, self.geometry.n_voxels)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        per_split: dict[str, list] = {name: [] for name in self.fractions}
        ids: dict[str, list[str]] = {name: [] for name in self.fractions}
        # evaluation classes first, in their listed order: later stages append classes, so an old
        # class's test showers stay in the same batches from stage to stage
        for cls in dict.fromkeys(self.eval_classes + self.classes):
            inc, showers = self.load_class(cls)
            below = showers * (showers < self.threshold_mev)
            hits, cut_showers, cut_energy = [], 0, 0.0
            for s in showers:
                v, e = shower_hits(s, self.threshold_mev)
                if len(v) > self.max_hits:
                    cut_showers += 1
                    cut_energy += float(e[self.max_hits :].sum())
                    v, e = v[: self.max_hits], e[: self.max_hits]
                hits.append((v, e))
            total = float(showers.sum()) or 1.0
            self.cut_report[cls] = {
                "below_threshold_energy_fraction": float(below.sum()) / total,
                "showers_over_max_hits": cut_showers,
                "over_max_hits_energy_fraction": cut_energy / total,
            }
            rank_zero_info(
                f"calorimetry {cls}: {len(showers)} showers, mean {np.mean([len(h[0]) for h in hits]):.1f} hits; "
                f"{100 * self.cut_report[cls]['below_threshold_energy_fraction']:.2f} % of energy below "
                f"{self.threshold_mev} MeV; {cut_showers} showers cut to {self.max_hits} hits "
                f"({100 * self.cut_report[cls]['over_max_hits_energy_fraction']:.2f} % of energy)"
            )
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
