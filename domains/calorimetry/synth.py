"""The embedded default of the calorimetry domain: GFlash-style electromagnetic showers.

Showers are drawn from the Grindhammer-Peters parametrisation (hep-ex/0001020) for the absorber
constants of the PDG tables, voxelised on a cartesian grid and written once in the CaloChallenge
HDF5 layout under ``data/generated/calorimetry`` (see :func:`generated_file`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from suite.data import cached, generated_dir

from .data import Geometry, parse_class, write_calochallenge

#: the GFlash parametrisation is electromagnetic; pion showers come only from files
EM_PARTICLES = ("photon", "electron")


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
    if particle not in EM_PARTICLES:
        raise ValueError(f"the generator simulates electromagnetic showers {EM_PARTICLES}, not {particle!r}; "
                         f"give {material}_{particle} a file in data.init_args.files")
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


