"""Shower observables and the CaloChallenge-style comparisons of generated and reference showers.

Observables per shower: deposited/incident energy, number of hits, longitudinal and lateral
centroids and widths; plus the mean longitudinal and lateral (radial) profiles of a sample.
Each is compared by the separation power ``0.5 sum (h1 - h2)^2 / (h1 + h2)`` of normalised
histograms (0 = identical, 1 = disjoint; the CaloChallenge measure, arXiv 2410.21611) and by a
binned KL divergence. A classifier AUC on the observables is the third, global check (0.5 =
indistinguishable).
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc

from .data import Geometry

#: per-shower scalar observables, in the order :func:`shower_observables` returns them
OBSERVABLES = ("e_ratio", "n_hits", "z_centroid", "z_width", "x_centroid", "y_centroid", "x_width", "y_width", "r_mean")
#: sample-level profiles compared as distributions over layer / radius
PROFILES = ("longitudinal", "lateral")
#: KL smoothing: added to every bin of both histograms before renormalising, so an empty bin
#: costs a large but finite amount instead of infinity
KL_EPS = 1e-6


def _weighted_moments(e: np.ndarray, coord: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Energy-weighted mean and width of ``coord`` per shower; NaN for empty showers."""
    total = e.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (e * coord).sum(1) / total
        var = (e * (coord[None, :] - mean[:, None]) ** 2).sum(1) / total
    return mean, np.sqrt(np.maximum(var, 0.0))


def shower_observables(showers: np.ndarray, incident_mev: np.ndarray, geometry: Geometry, threshold_mev: float = 0.0) -> dict[str, np.ndarray]:
    """Per-shower observables (positions in mm, z in layers) for showers (N, n_voxels) [MeV].

    Centroids and widths of an empty shower are undefined and come back as NaN; comparisons
    report how many they left out.
    """
    showers = np.asarray(showers, dtype=np.float64)
    showers = np.where(showers >= threshold_mev, showers, 0.0)
    pos = geometry.voxel_positions()
    z, x, y = pos[:, 0], pos[:, 1], pos[:, 2]
    zc, zw = _weighted_moments(showers, z)
    xc, xw = _weighted_moments(showers, x)
    yc, yw = _weighted_moments(showers, y)
    rm, _ = _weighted_moments(showers, np.hypot(x, y))
    return {
        "e_ratio": showers.sum(1) / np.asarray(incident_mev, dtype=np.float64),
        "n_hits": (showers > 0).sum(1).astype(np.float64),
        "z_centroid": zc, "z_width": zw, "x_centroid": xc, "y_centroid": yc, "x_width": xw, "y_width": yw, "r_mean": rm,
    }


def longitudinal_profile(showers: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Energy per layer (N, n_layers)."""
    return np.asarray(showers, dtype=np.float64).reshape(len(showers), geometry.grid[0], -1).sum(-1)


def lateral_profile(showers: np.ndarray, geometry: Geometry, r_edges_mm: np.ndarray) -> np.ndarray:
    """Energy per radial ring around the shower axis (N, len(r_edges_mm) - 1)."""
    pos = geometry.voxel_positions()
    ring = np.digitize(np.hypot(pos[:, 1], pos[:, 2]), r_edges_mm) - 1
    onehot = np.zeros((geometry.n_voxels, len(r_edges_mm) - 1))
    inside = (ring >= 0) & (ring < len(r_edges_mm) - 1)
    onehot[np.flatnonzero(inside), ring[inside]] = 1.0
    return np.asarray(showers, dtype=np.float64) @ onehot


def separation_power(h1: np.ndarray, h2: np.ndarray) -> float:
    """``0.5 sum (h1 - h2)^2 / (h1 + h2)`` over histograms normalised to unit sum (bins empty in both skipped)."""
    p, q = _normalised(h1), _normalised(h2)
    s = p + q
    nz = s > 0
    return float(0.5 * ((p[nz] - q[nz]) ** 2 / s[nz]).sum())


def binned_kl(h_ref: np.ndarray, h_gen: np.ndarray, eps: float = KL_EPS) -> float:
    """``KL(ref || gen) = sum p log(p / q)`` of histograms smoothed by ``eps`` per bin and renormalised."""
    p = _normalised(_normalised(h_ref) + eps)
    q = _normalised(_normalised(h_gen) + eps)
    return float((p * np.log(p / q)).sum())


def _normalised(h: np.ndarray) -> np.ndarray:
    h = np.asarray(h, dtype=np.float64)
    if (h < 0).any():
        raise ValueError("histogram bins must be >= 0")
    total = h.sum()
    if total <= 0:
        raise ValueError("cannot normalise an empty histogram")
    return h / total


def histograms(reference: np.ndarray, generated: np.ndarray, bins: int = 30) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Histograms of two samples on common edges spanning both (NaNs must be removed first)."""
    both = np.concatenate([reference, generated])
    lo, hi = float(both.min()), float(both.max())
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    return np.histogram(reference, edges)[0], np.histogram(generated, edges)[0], edges


def compare(
    reference: np.ndarray,
    generated: np.ndarray,
    incident_ref_mev: np.ndarray,
    incident_gen_mev: np.ndarray,
    geometry: Geometry,
    bins: int = 30,
) -> dict[str, float]:
    """Separation power and KL of every observable and profile, plus the classifier AUC.

    Returns ``{"sep/<name>", "kl/<name>", "sep_mean", "kl_mean", "auc", "n_empty_ref", "n_empty_gen"}``.
    """
    obs_r = shower_observables(reference, incident_ref_mev, geometry)
    obs_g = shower_observables(generated, incident_gen_mev, geometry)
    out: dict[str, float] = {}
    empty_r, empty_g = np.isnan(obs_r["z_centroid"]), np.isnan(obs_g["z_centroid"])
    out["n_empty_ref"], out["n_empty_gen"] = float(empty_r.sum()), float(empty_g.sum())
    for name in OBSERVABLES:
        a, b = obs_r[name][~np.isnan(obs_r[name])], obs_g[name][~np.isnan(obs_g[name])]
        if len(a) == 0 or len(b) == 0:
            out[f"sep/{name}"], out[f"kl/{name}"] = 1.0, float("inf")
            continue
        hr, hg, _ = histograms(a, b, bins)
        out[f"sep/{name}"], out[f"kl/{name}"] = separation_power(hr, hg), binned_kl(hr, hg)
    r_max = np.hypot(*geometry.voxel_positions()[:, 1:].T).max()
    profiles = {
        "longitudinal": (longitudinal_profile(reference, geometry), longitudinal_profile(generated, geometry)),
        "lateral": tuple(lateral_profile(s, geometry, np.linspace(0, r_max + 1e-6, 11)) for s in (reference, generated)),
    }
    for name, (pr, pg) in profiles.items():
        # the mean profile is itself a distribution of energy over layers / rings
        hr, hg = pr.sum(0), pg.sum(0)
        if hr.sum() <= 0 or hg.sum() <= 0:
            out[f"sep/{name}"], out[f"kl/{name}"] = 1.0, float("inf")
        else:
            out[f"sep/{name}"], out[f"kl/{name}"] = separation_power(hr, hg), binned_kl(hr, hg)
    names = [k for k in out if k.startswith("sep/")]
    out["sep_mean"] = float(np.mean([out[k] for k in names]))
    out["kl_mean"] = float(np.mean([out[k.replace("sep/", "kl/")] for k in names]))
    # the classifier sees every shower: an empty one (counted in n_empty_*) has no centroid or width,
    # and enters with 0 there, so "deposited nothing" stays visible to it rather than being dropped
    feats = lambda o: np.stack([np.nan_to_num(o[n], nan=0.0) for n in OBSERVABLES], 1)  # noqa: E731
    out["auc"] = classifier_auc(feats(obs_r), feats(obs_g))
    return out


def classifier_auc(reference: np.ndarray, generated: np.ndarray, seed: int = 0, steps: int = 200) -> float:
    """AUC of a logistic regression telling generated from reference on held-out halves.

    Cheap (a few ms on observables); 0.5 means the observables cannot tell the two apart, 1.0
    that they always can. A linear classifier is the weakest useful one, so this is a floor on
    separability, not the CaloChallenge's DNN classifier. Runs with gradients even when called
    from Lightning's test loop (which is under inference mode).
    """
    with torch.inference_mode(False), torch.enable_grad():
        return _fit_auc(reference, generated, seed, steps)


def _fit_auc(reference: np.ndarray, generated: np.ndarray, seed: int, steps: int) -> float:
    x = torch.as_tensor(np.concatenate([reference, generated]), dtype=torch.float64)
    y = torch.cat([torch.zeros(len(reference)), torch.ones(len(generated))]).double()
    if len(reference) < 4 or len(generated) < 4:
        return float("nan")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    tr, te = perm[: len(x) // 2], perm[len(x) // 2 :]
    if y[te].min() == y[te].max():
        return float("nan")
    mu, sd = x[tr].mean(0), x[tr].std(0).clamp_min(1e-9)
    xs = (x - mu) / sd
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xs[tr] @ w + b, y[tr]) + 1e-3 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(binary_auroc(xs[te] @ w + b, y[te].long()))
