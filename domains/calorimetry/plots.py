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
    """Mean energy per voxel, one panel per layer: reference (top row) and generated (bottom row).

    A panel is the layer's (a, b) cells: (y, x) for a cartesian geometry, (angle, radius) for a
    polar one, each layer at its own size (CaloChallenge dataset 1 bins its layers differently).
    """
    cells = geometry.voxel_cells()
    ref, gen = np.asarray(reference).mean(0), np.asarray(generated).mean(0)
    nz = geometry.n_layers
    vmax = max(ref.max(), gen.max(), 1e-9)
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
