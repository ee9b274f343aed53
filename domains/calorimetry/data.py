"""Calorimeter showers: the CaloChallenge HDF5 reader, a GFlash-style generator, and the DataModule.

One on-disk layout serves both real and generated data (the CaloChallenge one, arXiv 2410.21611):
``incident_energies`` (N, 1) and ``showers`` (N, n_voxels), energies in MeV, voxels flattened
over the detector binning in C order (layer-major). The generator writes exactly that, cached
under ``data/generated/calorimetry``.

Classes are ``<material>_<particle>`` (``W_photon``, ``Pb_electron``): one expert per class.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset

from suite.data import SuiteDataModule, cached, file_hash, generated_dir, split_by_group

PARTICLES = ("photon", "electron")


@dataclass(frozen=True)
class Material:
    """Electromagnetic constants of an absorber: radiation length, Molière radius, critical energy."""

    name: str
    Z: int
    X0_mm: float
    RM_mm: float
    Ec_MeV: float


# Review of Particle Physics (PDG), "Atomic and Nuclear Properties of Materials"
# (pdg.lbl.gov/AtomicNuclearProperties): X0 = (X0 in g/cm^2) / density, E_c for electrons.
# R_M = E_s X0 / E_c with E_s = 21.2052 MeV (PDG review "Passage of particles through matter",
# Eq. for the Molière radius); it reproduces the tabulated R_M of W, Pb, Fe and Cu to < 0.5 %.
# Ta: X0 = 6.82 g/cm^2 / 16.654 g/cm^3; its E_c from the PDG table (8.14 MeV).
_ES_MEV = 21.2052
MATERIALS: dict[str, Material] = {
    m.name: m
    for m in (
        Material("W", 74, 3.504, 3.504 * _ES_MEV / 7.97, 7.97),
        Material("Ta", 73, 4.094, 4.094 * _ES_MEV / 8.14, 8.14),
        Material("Pb", 82, 5.612, 5.612 * _ES_MEV / 7.43, 7.43),
        Material("Fe", 26, 17.57, 17.57 * _ES_MEV / 21.68, 21.68),
        Material("Cu", 29, 14.36, 14.36 * _ES_MEV / 19.42, 19.42),
    )
}


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


# --- the GFlash-style generator -----------------------------------------------------------------
def _profile_params(material: Material, energy_gev: float, rng: np.random.Generator) -> tuple[float, float]:
    """Per-shower Gamma shape alpha and depth of maximum T (in X0), with correlated log-normal fluctuations.

    Mean T = ln(E/E_c) - 0.5 (PDG, electron-induced), mean alpha from GFlash's homogeneous-media
    fit, fluctuations and their correlation from Grindhammer & Peters (hep-ex/0001020).
    """
    ln_y = math.log(energy_gev * 1e3 / material.Ec_MeV)
    t_mean = ln_y - 0.5
    a_mean = 0.21 + (0.492 + 2.38 / material.Z) * ln_y
    s_t = 1.0 / (-1.4 + 1.26 * ln_y)
    s_a = 1.0 / (-0.58 + 0.86 * ln_y)
    rho = 0.705 - 0.023 * ln_y
    z1, z2 = rng.standard_normal(2)
    t = math.exp(math.log(t_mean) + s_t * z1)
    alpha = math.exp(math.log(a_mean) + s_a * (rho * z1 + math.sqrt(1 - rho * rho) * z2))
    return max(alpha, 1.05), max(t, 0.1)  # alpha > 1 keeps a maximum inside the shower


def _lateral_radius(material: Material, energy_gev: float, tau: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Radial distance [mm] of spots at relative depth ``tau = t / T``: GFlash core + halo.

    f(r) = p 2r R_C^2/(r^2+R_C^2)^2 + (1-p) 2r R_T^2/(r^2+R_T^2)^2 in Molière radii, with the
    depth- and energy-dependent R_C, R_T, p of Grindhammer & Peters; the CDF r^2/(r^2+R^2)
    inverts in closed form.
    """
    Z, ln_e = material.Z, math.log(energy_gev)
    r_core = 0.0251 + 0.00319 * ln_e + (0.1162 - 0.000381 * Z) * tau
    k1, k2, k3, k4 = 0.659 - 0.00309 * Z, 0.645, -2.59, 0.3585 + 0.0421 * ln_e
    r_tail = k1 * (np.exp(k3 * (tau - k2)) + np.exp(k4 * (tau - k2)))
    p1, p2, p3 = 2.632 - 0.00094 * Z, 0.401 + 0.00187 * Z, 1.313 - 0.0686 * ln_e
    u = (p2 - tau) / p3
    p_core = np.clip(p1 * np.exp(u - np.exp(u)), 0.0, 1.0)
    radius = np.where(rng.random(tau.shape) < p_core, r_core, r_tail)
    v = rng.random(tau.shape).clip(1e-12, 1 - 1e-9)
    return radius * np.sqrt(v / (1 - v)) * material.RM_mm


def simulate_showers(
    material: str,
    particle: str,
    incident_gev: np.ndarray,
    geometry: Geometry,
    seed: int,
    sampling_term: float = 0.10,
) -> np.ndarray:
    """Deposited energy per voxel [MeV], shape (N, n_voxels), for showers of ``incident_gev``.

    Each shower is a cloud of energy spots (GFlash): depth ~ Gamma(alpha, T/(alpha-1)) in X0,
    radius ~ core + halo in Molière radii, uniform azimuth. A photon first travels to its
    conversion point, exponential with mean 9/7 X0 (the pair-production mean free path); an
    electron showers from the front face, hence earlier. The spot count is Poisson and spot
    energies Gamma(4)-distributed, tuned so that sigma_E/E = ``sampling_term``/sqrt(E/GeV).
    Energy outside the grid leaks out (as in a real calorimeter of this size).
    """
    mat = MATERIALS.get(material)
    if mat is None:
        raise KeyError(f"unknown material {material!r}; known: {sorted(MATERIALS)}")
    if particle not in PARTICLES:
        raise ValueError(f"particle must be one of {PARTICLES}, got {particle!r}")
    if geometry.kind != "cartesian":
        raise ValueError("the generator voxelises onto a cartesian geometry")
    rng = np.random.default_rng(seed)
    nz, ny, nx = geometry.grid
    shape_k = 4.0  # Gamma shape of spot energies: smooth deposits instead of quantised ones
    out = np.zeros((len(incident_gev), geometry.n_voxels), dtype=np.float64)
    for i, e_gev in enumerate(np.asarray(incident_gev, dtype=np.float64)):
        alpha, t_max = _profile_params(mat, e_gev, rng)
        beta = (alpha - 1.0) / t_max
        # Var(sum) = <N> mu^2 (1 + 1/k) must equal a^2 E and <N> mu = E  =>  mu = a^2 / (1 + 1/k) GeV
        mu_gev = sampling_term**2 / (1 + 1 / shape_k)
        n_spots = rng.poisson(e_gev / mu_gev)
        eps = rng.gamma(shape_k, mu_gev * 1e3 / shape_k, n_spots)  # MeV
        t = rng.gamma(alpha, 1.0 / beta, n_spots)
        start = rng.exponential(9.0 / 7.0) if particle == "photon" else 0.0
        r = _lateral_radius(mat, e_gev, t / t_max, rng)
        phi = rng.uniform(0, 2 * np.pi, n_spots)
        iz = np.floor((t + start) * mat.X0_mm / geometry.layer_mm).astype(np.int64)
        iy = np.floor(r * np.sin(phi) / geometry.cell_mm + ny / 2).astype(np.int64)
        ix = np.floor(r * np.cos(phi) / geometry.cell_mm + nx / 2).astype(np.int64)
        inside = (iz < nz) & (iy >= 0) & (iy < ny) & (ix >= 0) & (ix < nx)
        flat = (iz * ny + iy) * nx + ix
        out[i] = np.bincount(flat[inside], weights=eps[inside], minlength=geometry.n_voxels)
    return out.astype(np.float32)


def generated_file(cls: str, n: int, geometry: Geometry, energy_range_gev: Sequence[float], sampling_term: float, seed: int) -> Path:
    """Generate (once) and cache a CaloChallenge-layout file for one class; return its path."""
    material, particle = parse_class(cls)
    cfg = {"cls": cls, "n": n, "geometry": asdict(geometry), "energy": list(energy_range_gev), "a": sampling_term, "seed": seed, "v": 1}
    key = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    path = generated_dir("calorimetry") / f"{cls}_{n}_{key}.hdf5"

    def build(tmp: Path) -> None:
        # a distinct, reproducible stream per class: the seed plus a hash of the class name
        stream = seed * 1000 + int(hashlib.sha256(cls.encode()).hexdigest()[:6], 16) % 1000
        rng = np.random.default_rng(stream)
        lo, hi = energy_range_gev
        inc = np.exp(rng.uniform(math.log(lo), math.log(hi), n))  # log-uniform, as CaloChallenge samples
        showers = simulate_showers(material, particle, inc, geometry, seed=stream + 1, sampling_term=sampling_term)
        write_calochallenge(tmp, inc * 1e3, showers, {"material": material, "particle": particle, "generator": json.dumps(cfg)})

    return cached(path, build)


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
