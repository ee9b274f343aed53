"""Shower files (CaloChallenge's dense HDF5 layout, FM4CAL's sparse per-event groups) and the detector binning.

- **CaloChallenge** (arXiv 2410.21611): datasets ``incident_energies`` (N, 1) and ``showers``
  (N, n_voxels), both in MeV, voxels flattened over the detector binning (:class:`Geometry`, below).
- **FM4CAL** (``wmdataphys/FM4CAL``, ``utils.compress_hdf5``): one group per event, named
  ``"0"``, ``"1"``, ...; each holds ``indices`` (k, 3) integer (z, y, x) cells, ``values`` (k,)
  deposits in MeV, the attribute ``initial_energy`` in GeV, optionally the attribute ``shape``
  and a ``material`` string such as ``G4_W_gamma``.

Every reader either returns the file's values or raises :class:`CaloFormatError` naming the
file, the field and the expected form (a truncated file, a flipped byte, NaN, a wrong dtype,
shape or key); a library traceback never escapes. Energies that look like GeV where the layout
says MeV are detected by range, converted, and reported with a :class:`CaloUnitWarning`.
"""

from __future__ import annotations

import math
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np

from suite.data import DataFormatError

PARTICLES = ("photon", "electron", "pion")
#: FM4CAL's particle names -> ours (``G4_W_gamma`` is ``W_photon``)
REFERENCE_PARTICLES = {"gamma": "photon", "e-": "electron", "e+": "electron", "pi-": "pion", "pi+": "pion"}
#: no shower of these datasets starts below 50 MeV (CaloChallenge: >= 256 MeV; FM4CAL: >= 10 GeV),
#: so a smaller incident energy means the file is in GeV
_MIN_MEV = 50.0


class CaloFormatError(DataFormatError):
    """A shower or binning file that does not have the expected layout (the suite's reader error)."""

    def __init__(self, path: str | Path, field: str, expected: str, found: Any = None) -> None:
        super().__init__(path, field, f"expected {expected}" + ("" if found is None else f"; found {found}"))


class CaloUnitWarning(UserWarning):
    """Energies were converted because their range says GeV where the layout says MeV."""


def parse_class(name: str) -> tuple[str, str]:
    """``"W_photon"`` -> ``("W", "photon")``, with a clear error for anything else."""
    material, _, particle = name.rpartition("_")
    if not material or particle not in PARTICLES:
        raise ValueError(f"class {name!r} must be '<material>_<particle>' with particle in {PARTICLES}, e.g. 'W_photon'")
    return material, particle


def reference_class_name(material: str) -> str:
    """FM4CAL's material label -> our class: ``G4_W_gamma`` -> ``W_photon``, ``G4_Pb_e-`` -> ``Pb_electron``."""
    body = material.removeprefix("G4_")
    mat, _, particle = body.rpartition("_")
    if not mat or particle not in REFERENCE_PARTICLES:
        raise ValueError(f"material {material!r} is not an FM4CAL label like 'G4_W_gamma' or 'G4_Pb_e-'")
    return f"{mat}_{REFERENCE_PARTICLES[particle]}"


@dataclass
class ShowerFile:
    """The showers of one file as sparse hit lists: incident energies [MeV], per shower the flat
    voxel indices (unique) and their deposits [MeV], and the material label of each event (if stored)."""

    path: Path
    incident_mev: np.ndarray
    voxels: list[np.ndarray]
    energies: list[np.ndarray]
    n_voxels: int
    materials: list[str | None]

    def __len__(self) -> int:
        return len(self.incident_mev)

    def dense(self) -> np.ndarray:
        """(N, n_voxels) float32 deposits [MeV]."""
        out = np.zeros((len(self), self.n_voxels), dtype=np.float32)
        for i, (v, e) in enumerate(zip(self.voxels, self.energies)):
            out[i, v] = e
        return out


# --- shared checks -------------------------------------------------------------------------------
def _guarded(path: Path, what: str, read: Callable[[], Any]) -> Any:
    """Run a read of an HDF5 object; any library error becomes a CaloFormatError naming the field.
    h5py raises OSError, KeyError, RuntimeError, TypeError or ValueError on corrupt bytes, so the
    boundary catches them all (our own errors pass through)."""
    try:
        return read()
    except CaloFormatError:
        raise
    except Exception as e:  # noqa: BLE001 - see the docstring
        raise CaloFormatError(path, what, "a readable HDF5 object (the file may be truncated or corrupt)", f"{type(e).__name__}: {e}") from e


def _numeric(path: Path, field: str, ds: Any, expected: str) -> np.ndarray:
    if not isinstance(ds, h5py.Dataset):
        raise CaloFormatError(path, field, expected, type(ds).__name__)
    dtype = _guarded(path, field, lambda: ds.dtype)
    if dtype.kind not in "fiu":
        raise CaloFormatError(path, field, f"{expected} of real numbers", f"dtype {dtype}")
    return _guarded(path, field, lambda: np.asarray(ds[()]))


def _open(path: str | Path, kind: str) -> tuple[Path, h5py.File]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {kind} file")
    return path, _guarded(path, "file", lambda: h5py.File(path, "r"))


def _finite(path: Path, field: str, a: np.ndarray, positive: bool) -> None:
    bad = ~np.isfinite(a) | ((a <= 0) if positive else (a < 0))
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise CaloFormatError(path, field, f"finite values {'> 0' if positive else '>= 0'} MeV",
                              f"{int(bad.sum())} bad values, e.g. {a[first]} at index {first}")


def _to_mev(path: Path, incident: np.ndarray, deposits: np.ndarray, unit: str, inc_field: str, dep_field: str) -> tuple[float, float]:
    """Factors (incident, deposits) that bring a file in MeV; ``unit="auto"`` decides by range.

    A shower cannot deposit more than its incident energy, so deposits summing to more than
    twice the incident energy mean the incident energies are in GeV; incident energies below
    50 MeV mean the whole file is in GeV.
    """
    if unit not in ("auto", "MeV", "GeV"):
        raise ValueError(f"energy_unit must be 'auto', 'MeV' or 'GeV', got {unit!r}")
    if unit != "auto":
        return (1.0, 1.0) if unit == "MeV" else (1e3, 1e3)
    if len(incident) == 0:
        return 1.0, 1.0
    ratio = float(np.median(deposits / incident))
    if ratio > 2.0:
        warnings.warn(f"{path}: '{inc_field}' look like GeV (the showers deposit {ratio:.0f}x their incident energy); "
                      f"converted to MeV. Set energy_unit to silence this.", CaloUnitWarning, stacklevel=3)
        return 1e3, 1.0
    if float(incident.min()) < _MIN_MEV:
        warnings.warn(f"{path}: '{inc_field}' and '{dep_field}' look like GeV (incident energies from {incident.min():.3g}, "
                      f"below {_MIN_MEV:g} MeV); converted to MeV. Set energy_unit to silence this.", CaloUnitWarning, stacklevel=3)
        return 1e3, 1e3
    return 1.0, 1.0


# --- CaloChallenge: dense ---------------------------------------------------------------------------
def read_calochallenge(path: str | Path, n_voxels: int, energy_unit: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Read ``incident_energies`` (N,) and ``showers`` (N, n_voxels), both in MeV, validating the layout."""
    path, f = _open(path, "CaloChallenge HDF5")
    with f:
        keys = _guarded(path, "file", lambda: sorted(f.keys()))
        for key in ("incident_energies", "showers"):
            if key not in keys:
                raise CaloFormatError(path, key, f"datasets 'incident_energies' (N, 1) and 'showers' (N, {n_voxels})", f"keys {keys}")
        inc = _numeric(path, "incident_energies", _guarded(path, "incident_energies", lambda: f["incident_energies"]),
                       "an (N, 1) array").astype(np.float64)
        showers = _numeric(path, "showers", _guarded(path, "showers", lambda: f["showers"]), f"an (N, {n_voxels}) array").astype(np.float32)
    if inc.ndim != 2 or inc.shape[1] != 1:
        raise CaloFormatError(path, "incident_energies", "shape (N, 1)", f"shape {inc.shape}")
    if showers.shape != (inc.shape[0], n_voxels):
        raise CaloFormatError(path, "showers", f"shape ({inc.shape[0]}, {n_voxels}) for this geometry", f"shape {showers.shape}")
    _finite(path, "incident_energies", inc, positive=True)
    _finite(path, "showers", showers, positive=False)
    k_inc, k_dep = _to_mev(path, inc[:, 0], showers.sum(1, dtype=np.float64), energy_unit, "incident_energies", "showers")
    return inc[:, 0] * k_inc, (showers * np.float32(k_dep)).astype(np.float32)


def write_calochallenge(path: str | Path, incident_mev: np.ndarray, showers_mev: np.ndarray, attrs: dict[str, Any] | None = None) -> None:
    """Write the CaloChallenge layout (plus optional file attributes, e.g. material and particle).

    Datasets carry Fletcher-32 checksums and the format's newest layout checksums its metadata,
    so a corrupted byte in a file we wrote is an error on reading, not a silently different shower."""
    with h5py.File(path, "w", libver="latest") as f:
        f.create_dataset("incident_energies", data=np.asarray(incident_mev, np.float32).reshape(-1, 1), fletcher32=True)
        f.create_dataset("showers", data=np.asarray(showers_mev, np.float32), compression="gzip", compression_opts=4, fletcher32=True)
        for k, v in (attrs or {}).items():
            f.attrs[k] = v


# --- FM4CAL: sparse groups ------------------------------------------------------------------------
def _event_keys(path: Path, f: h5py.File) -> list[str]:
    keys = _guarded(path, "file", lambda: list(f.keys()))
    if not keys:
        raise CaloFormatError(path, "events", "one group per event ('0', '1', ...) with 'indices' and 'values'", "an empty file")
    # FM4CAL names events by number; read them in numeric order
    return sorted(keys, key=lambda k: (0, int(k), "") if k.isascii() and k.isdigit() else (1, 0, k))


def _material(path: Path, where: str, g: h5py.Group, members: list[str]) -> str | None:
    if "material" not in members:
        return None
    raw = _guarded(path, f"{where}/material", lambda: g["material"][()])
    if isinstance(raw, np.ndarray) and raw.shape == ():
        raw = raw.item()
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CaloFormatError(path, f"{where}/material", "a UTF-8 string such as 'G4_W_gamma'", repr(raw)[:60]) from e
    if not isinstance(raw, str):
        raise CaloFormatError(path, f"{where}/material", "a string such as 'G4_W_gamma'", repr(raw)[:60])
    return raw


def read_sparse_showers(path: str | Path, grid: tuple[int, int, int], incident_unit: str = "GeV") -> ShowerFile:
    """Read FM4CAL's sparse per-event groups on ``grid`` (z, y, x); incident energies become MeV.

    ``incident_unit`` is the unit of ``initial_energy`` (GeV in FM4CAL's files); ``"auto"`` takes
    GeV unless the values are only plausible in MeV (above 10 TeV as GeV), with a warning.
    Events without hits are kept (as empty showers); FM4CAL skips them.
    """
    grid = tuple(int(g) for g in grid)
    path, f = _open(path, "FM4CAL sparse HDF5")
    inc, voxels, energies, materials = [], [], [], []
    with f:
        for key in _event_keys(path, f):
            g = _guarded(path, key, lambda: f[key])
            members = _guarded(path, key, lambda: sorted(g.keys()) if isinstance(g, h5py.Group) else None)
            if members is None or "indices" not in members or "values" not in members:
                raise CaloFormatError(path, key, "a group with datasets 'indices' (k, 3) and 'values' (k,)",
                                      type(g).__name__ if members is None else f"keys {members}")
            idx = _numeric(path, f"{key}/indices", _guarded(path, f"{key}/indices", lambda: g["indices"]), "a (k, 3) array")
            val = _numeric(path, f"{key}/values", _guarded(path, f"{key}/values", lambda: g["values"]), "a (k,) array").astype(np.float32)
            if idx.dtype.kind not in "iu" or idx.ndim != 2 or idx.shape[1] != 3 or val.shape != (idx.shape[0],):
                raise CaloFormatError(path, f"{key}/indices", "integer (k, 3) cell indices with 'values' of shape (k,)",
                                      f"indices {idx.dtype} {idx.shape}, values {val.shape}")
            attrs = _guarded(path, f"{key}.attrs", lambda: {k: np.asarray(v) for k, v in g.attrs.items()})
            if "shape" in attrs:
                raw = np.ravel(attrs["shape"])
                shape = tuple(int(s) for s in raw) if raw.dtype.kind in "iu" else raw.tolist()
                if shape != grid:
                    raise CaloFormatError(path, f"{key}.attrs.shape", f"the geometry's grid {grid}", shape)
            if len(idx) and ((idx < 0) | (idx >= np.array(grid))).any():
                raise CaloFormatError(path, f"{key}/indices", f"cells inside the grid {grid}", f"range {idx.min(0).tolist()}..{idx.max(0).tolist()}")
            _finite(path, f"{key}/values", val, positive=False)
            if "initial_energy" not in attrs:
                raise CaloFormatError(path, f"{key}.attrs", "an 'initial_energy' attribute (GeV)", f"attributes {sorted(attrs)}")
            e0 = np.ravel(attrs["initial_energy"])
            if e0.size != 1 or e0.dtype.kind not in "fiu":
                raise CaloFormatError(path, f"{key}.attrs.initial_energy", "one real number (GeV)", repr(e0)[:60])
            _finite(path, f"{key}.attrs.initial_energy", e0.astype(np.float64), positive=True)
            flat = np.ravel_multi_index(idx.T.astype(np.int64), grid) if len(idx) else np.zeros(0, np.int64)
            if len(np.unique(flat)) != len(flat):
                raise CaloFormatError(path, f"{key}/indices", "each cell listed once", f"{len(flat) - len(np.unique(flat))} repeated cells")
            inc.append(float(e0[0]))
            voxels.append(flat)
            energies.append(val)
            materials.append(_material(path, key, g, members))
    inc_arr = np.asarray(inc, dtype=np.float64)
    if incident_unit == "auto":
        incident_unit = "GeV"
        if inc_arr.max() > 1e4:
            warnings.warn(f"{path}: 'initial_energy' up to {inc_arr.max():.3g} is implausible in GeV (FM4CAL's unit); read as MeV",
                          CaloUnitWarning, stacklevel=2)
            incident_unit = "MeV"
    if incident_unit not in ("GeV", "MeV"):
        raise ValueError(f"incident_unit must be 'GeV', 'MeV' or 'auto', got {incident_unit!r}")
    scale = 1e3 if incident_unit == "GeV" else 1.0
    return ShowerFile(path, inc_arr * scale, voxels, energies, int(math.prod(grid)), materials)


def write_sparse_showers(path: str | Path, incident_gev: np.ndarray, showers_mev: np.ndarray, grid: tuple[int, int, int],
                         material: str | None = None) -> None:
    """Write FM4CAL's sparse layout (as its ``compress_hdf5``, plus the ``material`` its loader reads),
    checksummed as :func:`write_calochallenge`."""
    with h5py.File(path, "w", libver="latest") as f:
        for i, (e0, shower) in enumerate(zip(np.asarray(incident_gev, np.float64), np.asarray(showers_mev))):
            dense = shower.reshape(grid)
            g = f.create_group(str(i))
            g.create_dataset("indices", data=np.argwhere(dense != 0), compression="gzip", fletcher32=True)
            g.create_dataset("values", data=dense[dense != 0], compression="gzip", fletcher32=True)
            g.attrs["shape"] = grid
            g.attrs["initial_energy"] = e0
            if material is not None:
                g.create_dataset("material", data=material.encode())


def read_showers(path: str | Path, grid: tuple[int, int, int], energy_unit: str = "auto") -> ShowerFile:
    """Read either layout (CaloChallenge's ``showers`` dataset, or FM4CAL's per-event groups)."""
    path, f = _open(path, "shower HDF5")
    with f:  # FM4CAL's files hold only groups; anything else is read (and checked) as CaloChallenge's
        dense = _guarded(path, "file", lambda: not f.keys() or any(not isinstance(f.get(k), h5py.Group) for k in f.keys()))
    if not dense:
        return read_sparse_showers(path, grid, "auto" if energy_unit == "auto" else energy_unit)
    n_voxels = int(math.prod(grid))
    inc, showers = read_calochallenge(path, n_voxels, energy_unit)
    voxels = [np.flatnonzero(s) for s in showers]
    return ShowerFile(path, inc, voxels, [s[v] for s, v in zip(showers, voxels)], n_voxels, [None] * len(inc))


# --------------------------------------------------------------------------------------------------
# Detector binning: where each flattened voxel sits, read from CaloChallenge's binning XML files.
#
# Showers are stored flat (one energy per voxel); the geometry says which layer, angle and radius
# (or which cartesian cell) each flat index is, so that centroids, widths and profiles are
# computed in the detector's own coordinates.
#
# - ``cartesian``: the generator's ``(layers, y, x)`` cells of ``cell_mm`` centred on the beam.
# - ``cylindrical``: CaloChallenge's polar binning (arXiv 2410.21611). Within a layer, voxel
#   ``a * n_r + r`` is angular bin ``a`` and radial bin ``r`` (angle-major, as XMLHandler fills
#   it); bin centres are the midpoints of ``r_edges`` and of ``linspace(-pi, pi, n_alpha + 1)``,
#   so the angle origin is -pi, exactly as CaloChallenge's ``XMLHandler``. Datasets 2 and 3 are
#   regular (45 x 16 x 9 and 45 x 50 x 18): ``grid = (layers, angles, radii)``. Dataset 1 has a
#   different binning per layer and empty layers (5 real ones for photons, 7 for pions): its
#   ``layers`` hold each layer's binning and ``grid`` is the flat token axis ``(1, 1, n_voxels)``.


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
