"""PNG plots people look at: per-layer energy images and observable histograms, generated vs reference."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .data import Geometry  # noqa: E402
from .metrics import OBSERVABLES, histograms, shower_observables  # noqa: E402


def layer_images(reference: np.ndarray, generated: np.ndarray, geometry: Geometry, path: str | Path, title: str = "") -> Path:
    """Mean energy per voxel, one panel per layer: reference (top row) and generated (bottom row)."""
    nz, na, nb = geometry.grid
    ref = np.asarray(reference).reshape(-1, nz, na, nb).mean(0)
    gen = np.asarray(generated).reshape(-1, nz, na, nb).mean(0)
    vmax = max(ref.max(), gen.max(), 1e-9)
    fig, axes = plt.subplots(2, nz, figsize=(1.6 * nz, 3.6), squeeze=False)
    for row, (name, img) in enumerate((("reference", ref), ("generated", gen))):
        for z in range(nz):
            ax = axes[row, z]
            ax.imshow(img[z], vmin=0, vmax=vmax, cmap="viridis", origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"layer {z}", fontsize=8)
        axes[row, 0].set_ylabel(name, fontsize=8)
    fig.suptitle(f"{title} mean energy per voxel [MeV] (colour scale shared)", fontsize=9)
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
