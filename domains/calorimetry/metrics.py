"""Shower observables, two families of comparisons of generated and reference showers, and their plots.

**Ours** (:func:`compare`): per shower deposited/incident energy, number of hits, longitudinal
and lateral centroids and widths, plus the mean longitudinal and lateral (radial) profiles of a
sample. Each is compared by the separation power ``0.5 sum (h1 - h2)^2 / (h1 + h2)`` of
normalised histograms (0 = identical, 1 = disjoint; the CaloChallenge measure, arXiv
2410.21611) and by a binned KL divergence. A classifier AUC on the observables is the third,
global check (0.5 = indistinguishable).

**FM4CAL's** (:func:`reference_metrics`, its ``plotting.py`` and ``utils/metrics.py``): cells
above 0.1 MeV only; per observable the 1-Wasserstein distance (``scipy.stats``) and the KL
divergence on bins that are quantiles of the reference sample. Observables: the visible
cell-energy spectrum, the energy sum, the number of hits, the centre of gravity in x, y, z, and
the longitudinal and radial profiles.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy.stats import entropy, wasserstein_distance
from torchmetrics.functional.classification import binary_auroc

from suite.plots import pyplot

from .formats import Geometry

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
    """Energy per layer (N, n_layers), over the geometry's real layers (dataset 1: its 5 or 7)."""
    layer = geometry.voxel_cells()[:, 0]
    onehot = np.zeros((geometry.n_voxels, geometry.n_layers))
    onehot[np.arange(geometry.n_voxels), layer] = 1.0
    return np.asarray(showers, dtype=np.float64) @ onehot


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


# --- FM4CAL's metrics ---------------------------------------------------------------------------------
#: FM4CAL counts a cell only above 0.1 MeV (``plotting.py``: ``features["energy"] > 0.1``)
REFERENCE_CUT_MEV = 0.1
#: what FM4CAL compares, in the order :func:`reference_metrics` reports them
REFERENCE_OBSERVABLES = ("cell_energy", "energy_sum", "n_hits", "cog_x", "cog_y", "cog_z", "longitudinal", "radial")
#: FM4CAL's constant added to the generated bins of its quantile KL (``utils/metrics.py``)
QUANTILE_KL_EPS = 1e-10


def quantile_kl(reference: np.ndarray, generated: np.ndarray, n_bins: int = 30) -> float:
    """KL(reference || generated) on ``n_bins`` bins that are quantiles of the reference.

    As FM4CAL's ``quantiled_kl_divergence``: edges at the reference quantiles, the outer ones at
    -inf and +inf; p and q are the two samples' bin fractions, q + 1e-10, and
    ``scipy.stats.entropy(p, q)`` renormalises both. Ties in a discrete observable collapse
    edges; the collapsed bins are empty in both samples and contribute nothing.
    """
    ref, gen = np.asarray(reference, dtype=np.float64), np.asarray(generated, dtype=np.float64)
    if len(ref) == 0 or len(gen) == 0:
        return float("nan")
    edges = np.quantile(ref, np.linspace(0.0, 1.0, n_bins + 1))
    edges[0], edges[-1] = -np.inf, np.inf
    p = np.histogram(ref, edges)[0] / len(ref)
    q = np.histogram(gen, edges)[0] / len(gen) + QUANTILE_KL_EPS
    return float(entropy(p, q))


def profile_kl(reference: np.ndarray, generated: np.ndarray) -> float:
    """KL(reference || generated) of two profiles already binned (energy per layer or ring), with
    the same 1e-10 on the generated bins as :func:`quantile_kl`."""
    p = np.asarray(reference, dtype=np.float64)
    q = np.asarray(generated, dtype=np.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        return float("nan")
    return float(entropy(p / p.sum(), q / q.sum() + QUANTILE_KL_EPS))


def reference_observables(showers: np.ndarray, geometry: Geometry, cut_mev: float = REFERENCE_CUT_MEV) -> dict[str, np.ndarray]:
    """FM4CAL's observables of showers (N, n_voxels) [MeV], cells above ``cut_mev`` only.

    Per-shower samples: ``cell_energy`` (every visible cell of every shower), ``energy_sum``,
    ``n_hits``, ``cog_x`` / ``cog_y`` [mm] and ``cog_z`` [layer] (energy-weighted means; showers
    with no visible cell have none and are left out). Profiles (summed over showers):
    ``longitudinal`` (energy per layer) and ``voxel_energy`` (energy per voxel, for the radial one).
    """
    e = np.asarray(showers, dtype=np.float64)
    e = np.where(e > cut_mev, e, 0.0)
    pos = geometry.voxel_positions()
    total = e.sum(1)
    seen = total > 0
    cog = (e[seen] @ pos) / total[seen, None]
    return {
        "cell_energy": e[e > 0],
        "energy_sum": total,
        "n_hits": (e > 0).sum(1).astype(np.float64),
        "cog_x": cog[:, 1], "cog_y": cog[:, 2], "cog_z": cog[:, 0],
        "longitudinal": longitudinal_profile(e, geometry).sum(0),
        "voxel_energy": e.sum(0),
    }


def reference_metrics(reference: np.ndarray, generated: np.ndarray, geometry: Geometry,
                      cut_mev: float = REFERENCE_CUT_MEV, n_bins: int = 30) -> dict[str, float]:
    """1-Wasserstein distance and quantile KL of each of FM4CAL's observables, reference vs generated.

    Returns ``{"w1/<name>", "kl/<name>"}`` for :data:`REFERENCE_OBSERVABLES` and ``"kl_mean"``.
    W1 is in the observable's unit (MeV, hits, mm, layers). The profiles are energy-weighted
    distributions of the layer index and of the radius: W1 with the energies as weights, KL over
    the layers and over :meth:`Geometry.radial_edges` rings (FM4CAL shows these profiles without
    a number of their own; see the README).
    """
    r, g = reference_observables(reference, geometry, cut_mev), reference_observables(generated, geometry, cut_mev)
    out: dict[str, float] = {}
    for name in REFERENCE_OBSERVABLES[:6]:
        a, b = r[name], g[name]
        out[f"w1/{name}"] = float(wasserstein_distance(a, b)) if len(a) and len(b) else float("nan")
        out[f"kl/{name}"] = quantile_kl(a, b, n_bins)
    layers = np.arange(geometry.n_layers, dtype=np.float64)
    lr, lg = r["longitudinal"], g["longitudinal"]
    ok = lr.sum() > 0 and lg.sum() > 0
    out["w1/longitudinal"] = float(wasserstein_distance(layers, layers, lr, lg)) if ok else float("nan")
    out["kl/longitudinal"] = profile_kl(lr, lg)
    radius = geometry.voxel_radius()
    vr, vg = r["voxel_energy"], g["voxel_energy"]
    ok = vr.sum() > 0 and vg.sum() > 0
    out["w1/radial"] = float(wasserstein_distance(radius, radius, vr, vg)) if ok else float("nan")
    edges = geometry.radial_edges()
    ring = np.clip(np.digitize(radius, edges) - 1, 0, len(edges) - 2)
    out["kl/radial"] = profile_kl(np.bincount(ring, vr, len(edges) - 1), np.bincount(ring, vg, len(edges) - 1))
    out["kl_mean"] = float(np.nanmean([out[f"kl/{n}"] for n in REFERENCE_OBSERVABLES]))
    return out


# --------------------------------------------------------------------------------------------------
# PNG plots people look at: per-layer energy images and observable histograms, generated vs reference.


def layer_images(reference: np.ndarray, generated: np.ndarray, geometry: Geometry, path: str | Path, title: str = "") -> Path:
    """Mean energy per voxel, one panel per layer: reference (top row) and generated (bottom row).

    A panel is the layer's (a, b) cells: (y, x) for a cartesian geometry, (angle, radius) for a
    polar one, each layer at its own size (CaloChallenge dataset 1 bins its layers differently).
    """
    cells = geometry.voxel_cells()
    ref, gen = np.asarray(reference).mean(0), np.asarray(generated).mean(0)
    nz = geometry.n_layers
    vmax = max(ref.max(), gen.max(), 1e-9)
    plt = pyplot()
    fig, axes = plt.subplots(2, nz, figsize=(min(1.6 * nz, 24.0), 3.6), squeeze=False)
    for row, (name, mean) in enumerate((("reference", ref), ("generated", gen))):
        for z in range(nz):
            sel = cells[:, 0] == z
            img = np.zeros((cells[sel, 1].max() + 1, cells[sel, 2].max() + 1))
            img[cells[sel, 1], cells[sel, 2]] = mean[sel]
            ax = axes[row, z]
            ax.imshow(img, vmin=0, vmax=vmax, cmap="viridis", origin="lower", aspect="auto")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"layer {z}", fontsize=8)
        axes[row, 0].set_ylabel(name, fontsize=8)
    axes_note = "(y, x)" if geometry.kind == "cartesian" else "(angle, radius)"
    fig.suptitle(f"{title} mean energy per voxel {axes_note} [MeV] (colour scale shared)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def observable_histograms(
    reference: np.ndarray,
    generated: np.ndarray,
    incident_ref_mev: np.ndarray,
    incident_gen_mev: np.ndarray,
    geometry: Geometry,
    path: str | Path,
    title: str = "",
) -> Path:
    """One normalised histogram per observable, reference filled, generated as a line."""
    obs_r = shower_observables(reference, incident_ref_mev, geometry)
    obs_g = shower_observables(generated, incident_gen_mev, geometry)
    cols = 3
    rows = int(np.ceil(len(OBSERVABLES) / cols))
    plt = pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.5 * rows), squeeze=False)
    for ax, name in zip(axes.flat, OBSERVABLES):
        a, b = obs_r[name][~np.isnan(obs_r[name])], obs_g[name][~np.isnan(obs_g[name])]
        if len(a) and len(b):
            hr, hg, edges = histograms(a, b)
            ax.stairs(hr / max(hr.sum(), 1), edges, fill=True, alpha=0.3, color="k", label="reference")
            ax.stairs(hg / max(hg.sum(), 1), edges, color="C1", label="generated")
        ax.set_xlabel(name, fontsize=8)
    for ax in list(axes.flat)[len(OBSERVABLES) :]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
