"""Detector binning: where each flattened voxel sits, read from CaloChallenge's binning XML files.

Showers are stored flat (one energy per voxel); the geometry says which layer, angle and radius
(or which cartesian cell) each flat index is, so that centroids, widths and profiles are
computed in the detector's own coordinates.

- ``cartesian``: the generator's ``(layers, y, x)`` cells of ``cell_mm`` centred on the beam.
- ``cylindrical``: CaloChallenge's polar binning (arXiv 2410.21611). Within a layer, voxel
  ``a * n_r + r`` is angular bin ``a`` and radial bin ``r`` (angle-major, as XMLHandler fills
  it); bin centres are the midpoints of ``r_edges`` and of ``linspace(-pi, pi, n_alpha + 1)``,
  so the angle origin is -pi, exactly as CaloChallenge's ``XMLHandler``. Datasets 2 and 3 are
  regular (45 x 16 x 9 and 45 x 50 x 18): ``grid = (layers, angles, radii)``. Dataset 1 has a
  different binning per layer and empty layers (5 real ones for photons, 7 for pions): its
  ``layers`` hold each layer's binning and ``grid`` is the flat token axis ``(1, 1, n_voxels)``.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .formats import CaloFormatError


@dataclass(frozen=True)
class CylinderLayer:
    """One layer of a polar binning: its XML ``id``, radial edges [mm] and number of angular bins."""

    layer_id: int
    r_edges_mm: tuple[float, ...]
    n_alpha: int

    @property
    def n_voxels(self) -> int:
        return (len(self.r_edges_mm) - 1) * self.n_alpha


@dataclass(frozen=True)
class Geometry:
    """Detector binning: ``grid`` = (layers, a, b) voxels, flattened in C order as CaloChallenge does.

    ``kind="cartesian"``: (a, b) = (y, x) square cells of ``cell_mm`` centred on the beam.
    ``kind="cylindrical"``: (a, b) = (angular, radial) bins with radial edges ``r_edges_mm``,
    or per-layer binnings in ``layers`` (:func:`read_binning_xml` builds both).
    """

    grid: tuple[int, int, int] = (10, 8, 8)
    layer_mm: float = 8.0
    cell_mm: float = 5.0
    kind: str = "cartesian"
    r_edges_mm: tuple[float, ...] = field(default=())
    layers: tuple[CylinderLayer, ...] = field(default=())

    def __post_init__(self) -> None:
        if len(self.grid) != 3 or min(self.grid) < 1:
            raise ValueError(f"geometry grid must be 3 positive ints (layers, a, b), got {self.grid}")
        if self.kind not in ("cartesian", "cylindrical"):
            raise ValueError(f"geometry kind must be 'cartesian' or 'cylindrical', got {self.kind!r}")
        if self.kind == "cartesian" and self.layers:
            raise ValueError("per-layer binnings (layers) describe a cylindrical geometry")
        if self.kind == "cylindrical" and not self.layers and len(self.r_edges_mm) != self.grid[2] + 1:
            raise ValueError(f"cylindrical geometry needs {self.grid[2] + 1} r_edges_mm, got {len(self.r_edges_mm)}")
        if self.layers and sum(ly.n_voxels for ly in self.layers) != int(np.prod(self.grid)):
            raise ValueError(f"grid {self.grid} does not hold the {sum(ly.n_voxels for ly in self.layers)} voxels of its layers")

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.grid))

    @property
    def n_layers(self) -> int:
        return len(self.layers) if self.layers else self.grid[0]

    def _polar_layers(self) -> tuple[CylinderLayer, ...]:
        if self.layers:
            return self.layers
        return tuple(CylinderLayer(i, tuple(self.r_edges_mm), self.grid[1]) for i in range(self.grid[0]))

    def voxel_cells(self) -> np.ndarray:
        """(n_voxels, 3) integer (layer, a, b) of every voxel in flattening order; for a polar
        binning a is the angular and b the radial bin, the layer counted over non-empty layers."""
        if self.kind == "cartesian":
            return np.stack(np.unravel_index(np.arange(self.n_voxels), self.grid), -1)
        cells = []
        for i, ly in enumerate(self._polar_layers()):
            n_r = len(ly.r_edges_mm) - 1
            a, r = np.divmod(np.arange(ly.n_voxels), n_r)  # angle-major within a layer
            cells.append(np.stack([np.full_like(a, i), a, r], -1))
        return np.concatenate(cells)

    def voxel_positions(self) -> np.ndarray:
        """(n_voxels, 3): layer index, x [mm], y [mm] of every voxel centre, in flattening order."""
        cells = self.voxel_cells()
        if self.kind == "cartesian":
            _, na, nb = self.grid
            y = (cells[:, 1] + 0.5 - na / 2) * self.cell_mm
            x = (cells[:, 2] + 0.5 - nb / 2) * self.cell_mm
            return np.stack([cells[:, 0], x, y], -1).astype(np.float64)
        parts = []
        for i, ly in enumerate(self._polar_layers()):
            edges = np.asarray(ly.r_edges_mm, dtype=np.float64)
            sel = cells[:, 0] == i
            r = ((edges[:-1] + edges[1:]) / 2)[cells[sel, 2]]
            alpha = -math.pi + (cells[sel, 1] + 0.5) * 2 * math.pi / ly.n_alpha  # XMLHandler: midpoints of linspace(-pi, pi)
            parts.append(np.stack([np.full(len(r), float(i)), r * np.cos(alpha), r * np.sin(alpha)], -1))
        return np.concatenate(parts)

    def voxel_radius(self) -> np.ndarray:
        """Distance of every voxel centre from the beam axis [mm]."""
        pos = self.voxel_positions()
        return np.hypot(pos[:, 1], pos[:, 2])

    def radial_edges(self) -> np.ndarray:
        """Rings for the lateral profile [mm]: the radial bins of a polar binning (the union of all
        layers' edges), rings one cell wide for a cartesian one (the reference's 1-pixel rings)."""
        if self.kind == "cylindrical":
            return np.unique(np.concatenate([ly.r_edges_mm for ly in self._polar_layers()]))
        r_max = self.voxel_radius().max()
        return np.arange(0.0, r_max + self.cell_mm, self.cell_mm)


def read_binning_xml(path: str | Path, particle: str | None = None) -> Geometry:
    """The geometry of a CaloChallenge ``binning_dataset_*.xml`` file.

    The file holds ``<Bins><Bin name=... pid=...><Layer id=.. r_edges="0,..." n_bin_alpha=".."/>``.
    ``particle`` picks the ``Bin`` by name (``photon``, ``pion``, ``electron``), as XMLHandler
    does; without it the file must hold exactly one. Layers keep the file's order; a layer whose
    ``r_edges`` is a single value has no voxels and is left out (XMLHandler's "relevant layers").
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such binning XML file")
    expected = '<Bins><Bin name="..."><Layer id="0" r_edges="0,..." n_bin_alpha="1"/>...</Bin></Bins>'
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise CaloFormatError(path, "XML", expected, f"unparsable ({e})") from e
    bins = [b for b in root if b.tag == "Bin"]
    names = [b.attrib.get("name") for b in bins]
    if particle is not None:
        bins = [b for b in bins if b.attrib.get("name") == particle]
    if len(bins) != 1:
        want = f"one <Bin name={particle!r}>" if particle else "exactly one <Bin> (or pass its name as particle)"
        raise CaloFormatError(path, "Bin", want, f"Bin names {names}")
    layers, regular = [], True
    for i, el in enumerate(b for b in bins[0] if b.tag == "Layer"):
        try:
            layer_id = int(el.attrib.get("id", i))
            edges = tuple(float(s) for s in el.attrib["r_edges"].split(","))
            n_alpha = int(el.attrib["n_bin_alpha"])
        except (KeyError, ValueError) as e:
            raise CaloFormatError(path, f"Layer {i}", 'r_edges="0,r1,r2,..." (mm) and an integer n_bin_alpha', f"{el.attrib}") from e
        if edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:])) or n_alpha < 1:
            raise CaloFormatError(path, f"Layer {layer_id}", "r_edges increasing from 0 and n_bin_alpha >= 1", f"{el.attrib}")
        if len(edges) == 1:
            regular = False  # an empty layer: the layers are no longer one regular stack
            continue
        layers.append(CylinderLayer(layer_id, edges, n_alpha))
    if not layers:
        raise CaloFormatError(path, "Layer", "at least one layer with radial bins", "none")
    first = layers[0]
    regular &= all(ly.r_edges_mm == first.r_edges_mm and ly.n_alpha == first.n_alpha for ly in layers)
    if regular:
        grid = (len(layers), first.n_alpha, len(first.r_edges_mm) - 1)
        return Geometry(grid, kind="cylindrical", r_edges_mm=first.r_edges_mm, layers=tuple(layers))
    return Geometry((1, 1, sum(ly.n_voxels for ly in layers)), kind="cylindrical", layers=tuple(layers))
