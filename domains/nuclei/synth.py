"""Seeded generator of H&E-like tiles with nucleus instance and class labels (PanNuke layout).

Tissue is rendered as stain concentrations and then imaged by Beer-Lambert absorption:

    OD(x) = c_H(x) v_H + c_E(x) v_E,     I(x) = I0 10^(-OD(x))

with Ruifrok & Johnston's haematoxylin and eosin optical-density directions (Anal. Quant.
Cytol. Histol. 23, 2001; ``skimage.color.rgb_from_hed``), perturbed per slide and scaled per
tile, so stain variation behaves like real staining and scanning: nuclei are haematoxylin-rich,
stroma and cytoplasm eosin-rich, overlapping nuclei absorb more.

Five nucleus classes follow PanNuke's (channels 0-4 of ``masks.npy``), each with its own size,
elongation, outline, chromatin pattern and arrangement, at 40x (about 0.25 um per pixel):

* neoplastic: large, pleomorphic, irregular outlines, vesicular chromatin with a dark membrane
  rim and nucleoli, packed in crowded sheets where neighbours touch and overlap;
* inflammatory (lymphocytes): small, round, dense and uniformly dark, scattered or in aggregates;
* connective (fibroblasts): spindle-shaped, aligned with the stroma fibres;
* dead (pyknotic / apoptotic): small, very dark, shrunken, with a hypereosinophilic halo;
* epithelial: medium ovoid nuclei with fine chromatin lining glands, with pink cytoplasm.

Where nuclei overlap, the one placed later lies on top and owns the overlapping pixels in the
instance map (as in PanNuke's non-overlapping annotations) while both absorb light there.
A placement is rejected if it would hide more than ``MAX_HIDDEN`` of a nucleus or split it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage.draw import polygon as draw_polygon

#: PanNuke's nucleus classes, in the order of masks.npy channels 0-4 (channel 5: background)
CLASS_NAMES = ("neoplastic", "inflammatory", "connective", "dead", "epithelial")

#: Ruifrok & Johnston optical-density directions (rows of skimage.color.rgb_from_hed)
HAEMATOXYLIN_OD = np.array([0.65, 0.70, 0.29])
EOSIN_OD = np.array([0.07, 0.99, 0.11])

MAX_HIDDEN = 0.35  # largest fraction of an existing nucleus a newcomer may cover
MIN_AREA = 12  # px; smaller edge slivers are not kept (PanNuke drops them too)


@dataclass(frozen=True)
class NucleusClass:
    """Morphology and chromatin of one class; lengths in pixels at 40x."""

    radius: tuple[float, float]  # equivalent-circle radius range
    elongation: tuple[float, float]  # major / minor axis ratio
    roughness: float  # amplitude of outline harmonics 2-5 (pleomorphism)
    spindle: bool  # tapered ends (fibroblasts)
    haematoxylin: tuple[float, float]  # mean H optical density inside the nucleus
    texture: float  # chromatin contrast (relative std of H)
    grain: float  # chromatin grain size (Gaussian sigma, px)
    rim: float  # extra H at the nuclear membrane (vesicular chromatin)
    nucleoli: int  # up to this many dark nucleoli
    cytoplasm: float  # eosin OD of the surrounding cytoplasm (0: none)


CLASSES: dict[str, NucleusClass] = {
    "neoplastic": NucleusClass((9.0, 13.0), (1.0, 1.6), 0.10, False, (0.35, 0.65), 0.35, 1.6, 0.7, 2, 0.25),
    "inflammatory": NucleusClass((4.5, 6.0), (1.0, 1.15), 0.03, False, (1.3, 1.6), 0.08, 0.8, 0.0, 0, 0.0),
    "connective": NucleusClass((6.0, 8.0), (2.8, 4.5), 0.03, True, (0.9, 1.2), 0.12, 1.0, 0.1, 0, 0.0),
    "dead": NucleusClass((3.5, 5.0), (1.0, 1.3), 0.06, False, (1.8, 2.2), 0.05, 0.8, 0.0, 0, 0.6),
    "epithelial": NucleusClass((6.5, 8.5), (1.2, 1.6), 0.03, False, (0.4, 0.65), 0.15, 0.9, 0.2, 1, 0.2),
}

#: tissue types (PanNuke names) and their class mix (order of CLASS_NAMES) and nuclei per tile
TISSUES: dict[str, tuple[tuple[float, ...], tuple[int, int]]] = {
    "Breast": ((0.62, 0.14, 0.14, 0.04, 0.06), (30, 50)),
    "Colon": ((0.06, 0.24, 0.18, 0.03, 0.49), (30, 50)),
    "Lung": ((0.30, 0.35, 0.25, 0.05, 0.05), (25, 45)),
    "Skin": ((0.10, 0.20, 0.30, 0.05, 0.35), (25, 45)),
}


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple[float, float]) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to unit standard deviation (band-limited texture)."""
    f = ndi.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return f / (f.std() + 1e-8)


def _outline(rng: np.random.Generator, cls: NucleusClass, radius: float, angle: float) -> np.ndarray:
    """Polygon (32 vertices, (row, col) offsets) of one nucleus: an ellipse with harmonic wobble."""
    e = rng.uniform(*cls.elongation)
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

    def __init__(self, rng: np.random.Generator, size: int, fibre_angle: float) -> None:
        self.rng, self.size = rng, size
        self.inst = np.zeros((size, size), np.int32)
        self.cls = np.zeros((size, size), np.int8)
        self.h = np.zeros((size, size))
        self.e = np.zeros((size, size))
        self.area: dict[int, int] = {}
        self.centres: list[tuple[float, float, float, str]] = []  # (row, col, radius, class)
        self.fibre_angle = fibre_angle
        self.grain = {name: _smooth_noise(rng, (size, size), c.grain) for name, c in CLASSES.items()}

    def place(self, name: str, row: float, col: float, radius: float | None = None, angle: float | None = None) -> bool:
        """Add one nucleus if it keeps every nucleus at least (1 - MAX_HIDDEN) visible and unsplit."""
        cls, rng = CLASSES[name], self.rng
        radius = rng.uniform(*cls.radius) if radius is None else radius
        angle = rng.uniform(0, np.pi) if angle is None else angle
        poly = _outline(rng, cls, radius, angle) + (row, col)
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
        self.centres.append((row, col, radius, name))
        return True

    def _stays_whole(self, j: int, rr: np.ndarray, cc: np.ndarray) -> bool:
        rows, cols = np.nonzero(self.inst == j)
        r0, c0 = rows.min(), cols.min()
        box = self.inst[r0 : rows.max() + 1, c0 : cols.max() + 1] == j
        box = box.copy()
        keep = (rr >= r0) & (rr < r0 + box.shape[0]) & (cc >= c0) & (cc < c0 + box.shape[1])
        box[rr[keep] - r0, cc[keep] - c0] = False
        return ndi.label(box)[1] == 1

    def _stain(self, name: str, rr: np.ndarray, cc: np.ndarray, row: float, col: float, radius: float) -> None:
        """Haematoxylin of one nucleus: chromatin grain, membrane rim, nucleoli; eosin of its cytoplasm."""
        cls, rng = CLASSES[name], self.rng
        r0, c0 = rr.min(), cc.min()
        mask = np.zeros((rr.max() - r0 + 3, cc.max() - c0 + 3), bool)
        mask[rr - r0 + 1, cc - c0 + 1] = True
        depth = ndi.distance_transform_edt(mask)[rr - r0 + 1, cc - c0 + 1]  # px to the nuclear edge
        # partial volume: a nucleus cut off-centre by the 3-5 um section is paler
        density = rng.uniform(*cls.haematoxylin) * rng.uniform(0.7, 1.1) * (1 + cls.texture * self.grain[name][rr, cc])
        density *= 1 + cls.rim * np.exp(-(depth - 1) / 1.5)
        density *= np.clip(depth / 1.5, 0.35, 1.0)  # soft, partial-volume edge
        for _ in range(rng.integers(0, cls.nucleoli + 1)):
            k = rng.integers(len(rr))
            density += 0.8 * np.exp(-((rr - rr[k]) ** 2 + (cc - cc[k]) ** 2) / (2 * 1.2**2))
        self.h[rr, cc] += np.clip(density, 0.05, None)
        self.e[rr, cc] *= 0.4  # nuclei take up little eosin
        if cls.cytoplasm:
            yy, xx = np.ogrid[: self.size, : self.size]
            reach = radius * (1.6 if name == "dead" else 2.0)
            halo = np.exp(-((yy - row) ** 2 + (xx - col) ** 2) / (2 * reach**2))
            self.e += cls.cytoplasm * halo * (self.inst == 0)


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
            radius = rng.uniform(*CLASSES[name].radius)
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
    while left > 0:
        cy, cx = rng.uniform(0.15 * size, 0.85 * size, 2)
        ry, rx = rng.uniform(25, 50, 2)
        n = min(left, int(2 * np.pi * np.sqrt((ry**2 + rx**2) / 2) / 15))
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


def _stroma(rng: np.random.Generator, size: int, fibre_angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Eosin and faint haematoxylin of the background: wavy collagen fibres and pale spaces."""
    big = int(size * 1.5)
    fibres = ndi.gaussian_filter(rng.standard_normal((big, big)), (1.2, 10.0), mode="wrap")
    fibres = ndi.rotate(fibres, np.degrees(fibre_angle), reshape=False, order=1, mode="wrap")
    o = (big - size) // 2
    fibres = fibres[o : o + size, o : o + size]
    fibres = (fibres - fibres.min()) / (np.ptp(fibres) + 1e-8)
    space = _smooth_noise(rng, (size, size), 18) > rng.uniform(0.8, 1.6)  # lumen / fat / tears
    eosin = rng.uniform(0.25, 0.45) * (0.3 + 1.2 * fibres**1.5)
    eosin[space] *= 0.08
    # basophilic ground substance / mucin: blotches of faint haematoxylin outside nuclei
    blotch = np.clip(_smooth_noise(rng, (size, size), 10) - rng.uniform(0.3, 1.0), 0, None)
    haem = 0.05 + 0.02 * _smooth_noise(rng, (size, size), 3) + rng.uniform(0.1, 0.3) * blotch
    haem[space] *= 0.3
    return eosin, np.clip(haem, 0, None)


def render_tile(rng: np.random.Generator, tissue: str, stains: np.ndarray, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """One tile: RGB uint8 (size, size, 3) and PanNuke masks (size, size, 6) for ``tissue``.

    ``stains`` is the slide's 2x3 matrix of unit OD vectors (haematoxylin row, eosin row).
    """
    mix, (lo, hi) = TISSUES[tissue]
    fibre_angle = rng.uniform(0, np.pi)
    tile = _Tile(rng, size, fibre_angle)
    eosin, haem = _stroma(rng, size, fibre_angle)
    area = (size / 256) ** 2  # counts are per 256-px tile (PanNuke); smaller tiles hold fewer
    names = list(rng.choice(CLASS_NAMES, size=rng.integers(round(lo * area), round(hi * area) + 1), p=mix))
    tile.e, tile.h = eosin, haem
    _arrange(tile, names)
    conc = np.stack([tile.h, tile.e], -1) * rng.uniform(0.8, 1.2, 2)  # staining intensity per tile
    od = conc @ stains + 0.02  # + unstained-tissue absorbance
    i0 = rng.uniform(235, 255, 3)  # lamp / white balance
    rgb = i0 * 10.0 ** (-od)
    focus = rng.uniform(0.6, 1.4)  # optics (PSF width varies with focus across a slide)
    rgb = ndi.gaussian_filter(rgb, (focus, focus, 0))
    rgb = rgb + rng.normal(0, 3.0, rgb.shape)  # sensor noise
    image = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    masks = _pannuke_masks(tile.inst, tile.cls)
    return image, masks


def _pannuke_masks(inst: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """Instance map + class map -> PanNuke (H, W, 6): channel c-1 holds ids of class c, 5 background."""
    out = np.zeros(inst.shape + (6,), np.uint16)
    for c in range(1, 6):
        out[..., c - 1] = np.where(cls == c, inst, 0)
    out[..., 5] = inst == 0
    return out


def slide_stains(rng: np.random.Generator, jitter: float = 0.08) -> np.ndarray:
    """A slide's stain matrix: Ruifrok-Johnston directions with per-slide angular jitter."""
    h = _unit(np.clip(HAEMATOXYLIN_OD + rng.normal(0, jitter, 3), 0.01, None))
    e = _unit(np.clip(EOSIN_OD + rng.normal(0, jitter, 3), 0.01, None))
    return np.stack([h, e])


def generate_pannuke(out_dir: Path, n_tiles: int = 128, tiles_per_slide: int = 4, size: int = 256, seed: int = 0) -> None:
    """Write ``images.npy``, ``masks.npy``, ``types.npy`` (PanNuke layout) and ``groups.npy`` (slide ids).

    Tiles of one slide share tissue type and stain vectors; every tile has its own RNG stream
    (``SeedSequence([seed, slide, tile])``), so any tile can be regenerated on its own.
    """
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
        stains = slide_stains(slide_rng)
        images[i], masks[i] = render_tile(np.random.default_rng([seed, slide, k + 1]), tissue, stains, size)
        types.append(tissue)
        groups.append(slide)
    np.save(out_dir / "images.npy", images)
    np.save(out_dir / "masks.npy", masks)
    np.save(out_dir / "types.npy", np.array(types))
    np.save(out_dir / "groups.npy", np.array(groups))
