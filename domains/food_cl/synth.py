"""Seeded generator of food-like photos: procedural dishes on plates, in the Food-101 layout.

A class is a *recipe*, drawn once from its own random stream:

* a base colour from the colours of real food (CIELAB means and covariances fitted on crops of
  real photos, ``colour_stats.json``; see ``calibrate.py``), optionally shifted toward a second
  food's colour (cooking, sauces), and the within-class colour spread of that food;
* a shape: a mound (rice, salad), a flat disk (pizza, pancake), a slice (cake, pie), pieces
  (dumplings, meatballs), strips (fries, asparagus), a ring (doughnut, bagel) or soup in a bowl;
* a surface texture: power-law luminance noise P(f) ~ f^-beta with the beta and contrast of that
  food's photo, plus a pattern (citrus segments, noodle strands, seeds, crust, browning patches);
* toppings (sprinkles, a garnish of leaves, a sauce drizzle, a dollop) and a gloss.

An image is one serving of a recipe under random nuisances (in one of two photographic settings:
``restaurant``, below, for the continual classes; ``studio`` product shots for the pretraining
classes, so the frozen backbone meets a new domain as in21k ViTs meet food photos): colour jitter within the class
spread, shape jitter, plate colour (white or red ceramic, fitted on the espresso cup and saucer
photo) or a bowl, wooden table (fitted on the same photo), pose (plate rotation, camera tilt,
distance, offset), lighting (direction, elevation, ambient, colour temperature, exposure), a cast
shadow, specular highlights, defocus, sensor noise and JPEG compression.

Two pools of recipes come from different random streams, so they never share a class: the
``continual`` pool (the classes learned task by task) and the ``pretrain`` pool (classes for
pretraining the backbone). Training-set class sizes follow an exponential long tail; test and
validation sets are balanced. Every image has its own stream ``(seed, pool, class, split, i)``,
so any image can be regenerated alone and the result does not depend on the order of work.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

from .calibrate import FORMAT, STATS_FILE

GENERATOR_VERSION = 1  # bump when the rendering changes, so stale caches are not reused

SHAPES = {"mound": 0.24, "disk": 0.14, "slice": 0.12, "pieces": 0.2, "strips": 0.12, "ring": 0.08, "soup": 0.1}
TEXTURES = {"smooth": 0.18, "segments": 0.14, "strands": 0.16, "speckle": 0.18, "crust": 0.16, "mottled": 0.18}
TOPPINGS = {"none": 0.3, "sprinkles": 0.2, "garnish": 0.2, "drizzle": 0.15, "dollop": 0.15}
GREENS = ("lime_peel", "kiwi_flesh")  # garnish leaves take a green food's colour
Pool = Literal["continual", "pretrain"]
Setting = Literal["restaurant", "studio"]
POOLS = {"continual": 0, "pretrain": 1}
SPLITS = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class ColourStats:
    """One fitted photo region: CIELAB mean/covariance, spectral slope and luminance contrast."""

    name: str
    kind: str
    lab_mean: tuple[float, float, float]
    lab_cov: tuple[tuple[float, float, float], ...]
    beta: float
    l_std: float


@lru_cache(maxsize=1)
def colour_stats(path: Path = STATS_FILE) -> dict[str, ColourStats]:
    """The regions of ``colour_stats.json`` (written by ``calibrate.py``), by name."""
    raw = json.loads(Path(path).read_text())
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path}: field 'format' is {raw.get('format')!r}, expected {FORMAT!r}")
    return {
        name: ColourStats(name, r["kind"], tuple(r["lab_mean"]), tuple(map(tuple, r["lab_cov"])), r["beta"], r["l_std"])
        for name, r in raw["regions"].items()
    }


@dataclass(frozen=True)
class Dish:
    """A class recipe. Lengths are fractions of the plate radius; colours are CIELAB."""

    name: str
    source: str  # the food photo region its colour comes from
    lab: tuple[float, float, float]
    lab_cov: tuple[tuple[float, float, float], ...]
    shape: str
    size: float  # radius of mound/disk/slice/ring/soup; cluster radius of pieces/strips
    pieces: int  # pieces/strips count (1 otherwise)
    piece_size: float  # piece radius or strip half-width
    elongation: float  # piece/strip aspect (length / width)
    wobble: float  # outline irregularity
    height: float  # relief for shading (0 flat, 1 hemisphere)
    texture: str
    beta: float
    contrast: float
    pattern_freq: float  # segments per turn / strands per unit / seed density
    second_lab: tuple[float, float, float]  # crust, browning patches or seed colour
    topping: str
    topping_lab: tuple[float, float, float]
    gloss: float
    bowl: bool


def _choice(rng: np.random.Generator, table: dict[str, float]) -> str:
    keys = list(table)
    p = np.array([table[k] for k in keys])
    return keys[rng.choice(len(keys), p=p / p.sum())]


@lru_cache(maxsize=256)
def _cholesky(cov: tuple[tuple[float, float, float], ...]) -> np.ndarray:
    return np.linalg.cholesky(np.array(cov) + 1e-6 * np.eye(3))


def _jitter(rng: np.random.Generator, mean: np.ndarray, cov: tuple[tuple[float, float, float], ...],
            scale: float = 1.0) -> np.ndarray:
    """A colour drawn from N(mean, scale^2 cov) in CIELAB, lightness kept inside (4, 96)."""
    lab = mean + scale * _cholesky(cov) @ rng.standard_normal(3)
    lab[0] = np.clip(lab[0], 4.0, 96.0)
    return lab


def make_dish(index: int, seed: int = 0, pool: Pool = "continual") -> Dish:
    """Recipe ``index`` of ``pool`` (its own stream: the same recipe whatever else is drawn)."""
    rng = np.random.default_rng([seed, POOLS[pool], index, 999])
    stats = colour_stats()
    foods = [s for s in stats.values() if s.kind == "food"]
    a, b = rng.choice(len(foods), 2, replace=False)
    fa, fb = foods[a], foods[b]
    mean_a = np.array(fa.lab_mean)
    lab = mean_a + rng.uniform(0, 0.4) * (np.array(fb.lab_mean) - mean_a)
    lab = _jitter(rng, lab, fa.lab_cov)  # the class sits one food-spread away from the photo's mean
    shape = _choice(rng, SHAPES)
    size = {"mound": (0.35, 0.6), "disk": (0.55, 0.72), "slice": (0.5, 0.72), "pieces": (0.45, 0.65),
            "strips": (0.45, 0.65), "ring": (0.35, 0.55), "soup": (0.55, 0.62)}[shape]
    pieces = int(rng.integers(3, 9)) if shape == "pieces" else int(rng.integers(4, 11)) if shape == "strips" else 1
    texture = _choice(rng, TEXTURES)
    if texture in ("crust", "mottled"):  # cooked: toward the browns of crema or wood
        second = _jitter(rng, np.array(stats["coffee_crema" if rng.random() < 0.5 else "wood_table"].lab_mean), fa.lab_cov, 0.5)
        second[0] *= rng.uniform(0.5, 0.9)
    else:  # seeds, segment walls: darker or paler than the flesh
        second = lab + np.array([rng.choice([-1, 1]) * rng.uniform(15, 35), 0, 0]) + rng.normal(0, 5, 3)
        second[0] = np.clip(second[0], 4, 96)
    topping = _choice(rng, TOPPINGS)
    others = [f for i, f in enumerate(foods) if i != a]
    tsrc = stats[GREENS[rng.integers(2)]] if topping == "garnish" else others[rng.integers(len(others))]
    top_lab = _jitter(rng, np.array(tsrc.lab_mean), tsrc.lab_cov)
    name = f"{fa.name.split('_')[0]}_{shape}_{texture}_{index:03d}" + ("" if pool == "continual" else "_pre")
    return Dish(
        name=name,
        source=fa.name,
        lab=tuple(np.round(lab, 3)),
        lab_cov=fa.lab_cov,
        shape=shape,
        size=float(rng.uniform(*size)),
        pieces=pieces,
        piece_size=float(rng.uniform(0.14, 0.24) if shape == "pieces" else rng.uniform(0.035, 0.07)),
        elongation=float(rng.uniform(1.0, 1.8) if shape == "pieces" else rng.uniform(4.0, 9.0)),
        wobble=float(rng.uniform(0.0, 0.12)),
        height=float(rng.uniform(0.05, 0.2) if shape in ("disk", "slice", "soup") else rng.uniform(0.3, 1.0)),
        texture=texture,
        beta=float(np.clip(fa.beta + rng.normal(0, 0.3), 0.5, 4.0)),
        contrast=float(np.clip(fa.l_std / fa.lab_mean[0], 0.04, 0.4) * rng.uniform(0.8, 1.6)),
        pattern_freq=float(rng.uniform(6, 14)),
        second_lab=tuple(np.round(second, 3)),
        topping=topping,
        topping_lab=tuple(np.round(top_lab, 3)),
        gloss=float(rng.uniform(0.0, 0.6)),
        bowl=shape == "soup" or bool(rng.random() < 0.2),
    )


def make_dishes(n: int, seed: int = 0, pool: Pool = "continual") -> list[Dish]:
    """The first ``n`` recipes of ``pool``."""
    return [make_dish(i, seed, pool) for i in range(n)]


# ------------------------------------------------------------------------------------------------
# rendering, vectorised over a batch of servings of one dish (32-px images are too small for
# numpy to be efficient one at a time). Every random number of an image comes from its own
# stream, drawn in a fixed order by _draw, so an image does not depend on its batch.
def _lab_to_linear(labs: np.ndarray) -> np.ndarray:
    """CIELAB (k, 3) -> linear-light RGB (k, 3) in [0, 1] (out-of-gamut colours clipped)."""
    import warnings

    from skimage.color import lab2rgb

    with warnings.catch_warnings():  # "negative Z values clipped": expected for saturated colours
        warnings.simplefilter("ignore", UserWarning)
        srgb = np.clip(lab2rgb(labs[:, None, :].astype(np.float64))[:, 0], 0, 1)
    return np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)


def _to_srgb(lin: np.ndarray) -> np.ndarray:
    lin = np.clip(lin, 0, 1)
    return np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)


@lru_cache(maxsize=8)
def _freq(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frequencies (cycles/px) of a size x size real FFT: fy, fx and their modulus (DC set to inf)."""
    fy, fx = np.fft.fftfreq(size)[:, None], np.fft.rfftfreq(size)[None, :]
    f = np.hypot(fy, fx)
    f[0, 0] = np.inf
    return fy, fx, f


def power_law(white: np.ndarray, beta: float) -> np.ndarray:
    """White noise (..., S, S) -> zero-mean, unit-std noise with power spectrum ~ f^-beta."""
    size = white.shape[-1]
    field = np.fft.irfft2(np.fft.rfft2(white) * _freq(size)[2] ** (-beta / 2), s=(size, size))
    return field / (field.std(axis=(-2, -1), keepdims=True) + 1e-8)


def _fft_filter(images: np.ndarray, sigma: np.ndarray | float, shift: np.ndarray | None = None) -> np.ndarray:
    """Gaussian blur (per-image sigma, px) and optional sub-pixel shift (dy, dx) of (n, S, S) maps.

    Done in the Fourier domain (periodic boundary) so each image gets its own kernel in one call.
    """
    size = images.shape[-1]
    fy, fx, _ = _freq(size)
    sigma = np.asarray(sigma, dtype=float).reshape(-1, 1, 1)
    kernel = np.exp(-2 * np.pi**2 * sigma**2 * (fx**2 + fy**2))
    if shift is not None:
        kernel = kernel * np.exp(-2j * np.pi * (fy * shift[:, 0, None, None] + fx * shift[:, 1, None, None]))
    return np.fft.irfft2(np.fft.rfft2(images) * kernel, s=(size, size))


def _ramp(d: np.ndarray, px: np.ndarray | float) -> np.ndarray:
    """Coverage of a shape with signed distance ``d`` (negative inside), anti-aliased over a pixel."""
    return np.clip(0.5 - d / px, 0.0, 1.0)


def _draw(dish: Dish, rng: np.random.Generator, size: int) -> dict[str, np.ndarray]:
    """Every random number one serving needs, in a fixed order (fields a dish never uses are not drawn)."""
    u, field = rng.uniform, (size, size)
    out = {
        "pose": np.array([u(0, np.radians(45)), u(0.8, 1.05), *rng.normal(0, 0.06, 2), u(0, 2 * np.pi)]),
        "white_plate": np.array(rng.random() < 0.7),
        "colour_z": rng.standard_normal((5, 3)),  # table, plate, food, second colour, topping
        "grain": np.array([u(0, np.pi)]),
        "grain_walk": rng.normal(0, 1, 4 * size),
        "wood_noise": rng.standard_normal(field),
        "food": np.array([u(0.9, 1.1), *rng.normal(0, 0.05, 2), np.radians(u(45, 80)), u(0, 2 * np.pi), u(0, np.pi)]),
        "wobble": np.concatenate([rng.normal(0, 1, 4), u(0, 2 * np.pi, 4)]),
        "parts": np.stack([rng.random(dish.pieces), u(0, 2 * np.pi, dish.pieces), rng.normal(0, 0.35, dish.pieces),
                           u(0, np.pi, dish.pieces), u(0.85, 1.15, dish.pieces)], 1),
        "texture_noise": rng.standard_normal(field),
        "pattern": np.array([u(0, np.pi), u(0.2, 0.8)]),
        "topping": rng.random(16),
        "light": np.array([u(0, 2 * np.pi), np.radians(u(25, 65)), u(0.35, 0.55), rng.normal(), u(0.75, 1.15), u(0.2, 0.7)]),
    }
    if dish.texture in ("strands", "mottled"):
        out["pattern_noise"] = rng.standard_normal(field)
    if dish.texture == "speckle":
        out["pattern_random"] = rng.random(field)
    if dish.topping == "sprinkles":
        out["topping_random"] = rng.random(field)
    out["sensor"] = rng.normal(0, 0.01, (size, size, 3))
    return out


class _Scene:
    """Image grid and plate-plane coordinates of a batch: (n, S, S) arrays; scalars as (n, 1, 1)."""

    def __init__(self, pose: np.ndarray, size: int) -> None:
        self.size = size
        t = (np.arange(size) + 0.5) / size * 2 - 1
        self.y, self.x = np.meshgrid(t, t, indexing="ij")
        tilt, scale, cx, cy, phi = (pose[:, i, None, None] for i in range(5))
        xp, yp = (self.x - cx) / scale, (self.y - cy) / (scale * np.cos(tilt))  # camera tilt foreshortens
        self.u = xp * np.cos(phi) + yp * np.sin(phi)
        self.v = -xp * np.sin(phi) + yp * np.cos(phi)
        self.px = 2.0 / (size * scale)  # one pixel in plate units

    def polar(self, cu: np.ndarray | float = 0.0, cv: np.ndarray | float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        du, dv = self.u - cu, self.v - cv
        return np.hypot(du, dv), np.arctan2(dv, du)

    def local(self, cu: np.ndarray, cv: np.ndarray, turn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates in a frame centred at (cu, cv) and turned by ``turn``."""
        du, dv = self.u - cu, self.v - cv
        return du * np.cos(turn) + dv * np.sin(turn), -du * np.sin(turn) + dv * np.cos(turn)


def _col(a: np.ndarray, i: int | slice) -> np.ndarray:
    """Column ``i`` of a per-image (n, k) parameter as (n, 1, 1)."""
    return a[:, i, None, None]


def _food_layer(sc: _Scene, dish: Dish, p: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Coverage, relief and depth inside the outline of the food, and its radius (n, 1, 1)."""
    food, wob = p["food"], p["wobble"]
    size = dish.size * _col(food, 0)
    rho, ang = sc.polar(_col(food, 1), _col(food, 2))
    amount = 0.0 if dish.shape == "soup" else dish.wobble
    harm = 1 + sum(amount / k * _col(wob, k - 2) * np.cos(k * ang + _col(wob, k + 2)) for k in range(2, 6))
    if dish.shape in ("mound", "disk", "soup", "ring"):
        r = size * harm
        if dish.shape == "ring":
            inner = 0.42 * r
            d = np.maximum(rho - r, inner - rho)
            mid, half = (r + inner) / 2, (r - inner) / 2
            h = dish.height * np.sqrt(np.clip(1 - ((rho - mid) / half) ** 2, 0, 1))
        else:
            d = rho - r
            h = dish.height * np.sqrt(np.clip(1 - (rho / r) ** 2, 0, 1))
    elif dish.shape == "slice":
        width, a0 = _col(food, 3), _col(food, 4)
        rho, ang = sc.polar(-0.35 * size * np.cos(a0), -0.35 * size * np.sin(a0))  # apex behind the centre
        off = np.abs(np.angle(np.exp(1j * (ang - a0)))) - width / 2
        d = np.maximum(rho - size * 1.3, rho * np.sin(np.clip(off, -np.pi / 2, np.pi / 2)))
        h = dish.height * np.clip(-d / (0.2 * size), 0, 1)
    else:  # pieces or strips: the union of parts scattered over a cluster
        d, h = np.full(sc.u.shape, np.inf), np.zeros(sc.u.shape)
        parts = p["parts"]
        for k in range(dish.pieces):
            r0, a0 = size * 0.75 * np.sqrt(_col(parts[:, k], 0)), _col(parts[:, k], 1)
            turn = _col(food, 5) + _col(parts[:, k], 2) if dish.shape == "strips" else _col(parts[:, k], 3)
            lu, lv = sc.local(r0 * np.cos(a0), r0 * np.sin(a0), turn)
            width = dish.piece_size * _col(parts[:, k], 4)
            length = width * dish.elongation
            if dish.shape == "strips":
                dk = np.maximum(np.abs(lu) - length, np.abs(lv) - width)
                hk = np.sqrt(np.clip(1 - (lv / width) ** 2, 0, 1)) * (np.abs(lu) < length)
            else:
                q = np.hypot(lu / length, lv / width)
                dk, hk = (q - 1) * width, np.sqrt(np.clip(1 - q**2, 0, 1))
            d, h = np.minimum(d, dk), np.maximum(h, dish.height * hk * 0.6)
    return _ramp(d, sc.px), h, np.clip(-d, 0, None), size


def _texture(sc: _Scene, dish: Dish, p: dict[str, np.ndarray], cover: np.ndarray, inside: np.ndarray,
             radius: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Luminance modulation of the base colour and the mix weight of the second colour."""
    lum = 1 + dish.contrast * power_law(p["texture_noise"], dish.beta)
    mix = np.zeros_like(lum)
    freq, phase, threshold = dish.pattern_freq, _col(p["pattern"], 0), _col(p["pattern"], 1)
    rho, ang = sc.polar()
    if dish.texture == "segments":  # citrus-like: pale walls between wedge segments, a rind rim
        walls = np.exp(-(np.sin(0.5 * freq * ang + phase) ** 2) / 0.04)
        mix = 0.7 * walls * (rho > 0.12 * radius) + 0.8 * (inside < 0.08 * radius)
    elif dish.texture == "strands":  # noodles: stripes bent by low-frequency noise
        along = sc.u * np.cos(phase) + sc.v * np.sin(phase)
        bend = _fft_filter(p["pattern_noise"], sc.size / 8)
        bend *= sc.size / 4 / (bend.std(axis=(1, 2), keepdims=True) + 1e-8) / 4
        lum = lum * (0.7 + 0.5 * np.sin(2 * np.pi * freq * along + bend) ** 2)
    elif dish.texture == "speckle":  # seeds / pores: sparse dots in the second colour
        mix = np.clip(_fft_filter((p["pattern_random"] < freq / 150).astype(float), 0.5) * 4, 0, 1)
    elif dish.texture == "crust":  # baked edge: browning toward the outline
        mix = 0.9 * np.exp(-inside / (0.12 * radius))
    elif dish.texture == "mottled":  # browned or charred patches
        mix = 0.9 * np.clip(power_law(p["pattern_noise"], 3.0) - threshold, 0, 1)
    return lum, mix * cover


def _topping(sc: _Scene, dish: Dish, p: dict[str, np.ndarray], cover: np.ndarray,
             radius: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coverage and relief of the topping (within the food)."""
    t = p["topping"]
    zero = np.zeros_like(cover)
    if dish.topping == "sprinkles":
        alpha = np.clip(_fft_filter((p["topping_random"] < 0.08) * cover, 0.45) * 3, 0, 1)
        return alpha, 0.05 * alpha
    if dish.topping == "garnish":  # 2-4 small leaves
        alpha = zero
        count = 2 + np.floor(3 * t[:, 0])
        for k in range(4):
            r0, a0 = radius * 0.6 * np.sqrt(_col(t, 1 + 3 * k)), 2 * np.pi * _col(t, 2 + 3 * k)
            lu, lv = sc.local(r0 * np.cos(a0), r0 * np.sin(a0), np.pi * _col(t, 3 + 3 * k))
            leaf = _ramp((np.hypot(lu / 0.12, lv / 0.05) - 1) * 0.05, sc.px) * (k < count)[:, None, None]
            alpha = np.maximum(alpha, leaf)
        return alpha * cover, 0.1 * alpha * cover
    if dish.topping == "drizzle":  # a sauce line waving across the food
        a, b = sc.local(0.0, 0.0, np.pi * _col(t, 13))
        wave = radius * 0.35 * np.sin(2 * np.pi * a / (radius * (0.5 + 0.4 * _col(t, 14))) + 2 * np.pi * _col(t, 15))
        alpha = _ramp(np.abs(b - wave) - 0.6 * sc.px, sc.px) * cover
        return alpha, 0.05 * alpha
    if dish.topping == "dollop":
        r0, a0 = radius * 0.3 * np.sqrt(_col(t, 13)), 2 * np.pi * _col(t, 14)
        rho, _ = sc.polar(r0 * np.cos(a0), r0 * np.sin(a0))
        rd = radius * (0.2 + 0.12 * _col(t, 15))
        alpha = _ramp(rho - rd, sc.px) * cover
        return alpha, 0.3 * np.sqrt(np.clip(1 - (rho / rd) ** 2, 0, 1))
    return zero, zero


def _colours(dish: Dish, p: dict[str, np.ndarray]) -> np.ndarray:
    """(n, 5, 3) linear RGB: table, plate, food, second colour, topping, jittered within their spreads."""
    stats = colour_stats()
    wood, white, red = stats["wood_table"], stats["white_ceramic"], stats["red_ceramic"]
    n = len(p["white_plate"])
    means = np.empty((n, 5, 3))
    chol = np.empty((n, 5, 3, 3))
    for i, (m, cov, scale) in enumerate([(wood.lab_mean, wood.lab_cov, 1.0), (None, None, 0.5), (dish.lab, dish.lab_cov, 1.0),
                                         (dish.second_lab, dish.lab_cov, 0.5), (dish.topping_lab, dish.lab_cov, 0.5)]):
        if m is None:  # the plate: white or red ceramic
            means[:, i] = np.where(p["white_plate"][:, None], white.lab_mean, red.lab_mean)
            chol[:, i] = scale * np.where(p["white_plate"][:, None, None], _cholesky(white.lab_cov), _cholesky(red.lab_cov))
        else:
            means[:, i], chol[:, i] = m, scale * _cholesky(cov)
    lab = means + np.einsum("nkij,nkj->nki", chol, p["colour_z"])
    lab[..., 0] = np.clip(lab[..., 0], 4.0, 96.0)
    return _lab_to_linear(lab.reshape(-1, 3)).reshape(n, 5, 3)


def _studio(p: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same draws, photographed as product shots: near top-down and 1.35x closer, white plates,
    high soft neutral light, little defocus (mapped from the draws, so the streams are unchanged)."""
    p = dict(p)
    pose = p["pose"].copy()
    pose[:, 0] *= 0.25  # tilt up to ~11 degrees instead of 45
    pose[:, 1] *= 1.35  # closer: the plate fills the frame
    light = p["light"].copy()  # azimuth, elevation, ambient, temperature, exposure, blur
    light[:, 1] = np.radians(60) + 0.25 * (light[:, 1] - np.radians(25))
    light[:, 2] += 0.25
    light[:, 3] = 0.0
    light[:, 4] = 1.0 + 0.25 * (light[:, 4] - 0.95)
    light[:, 5] *= 0.3
    p.update(pose=pose, light=light, white_plate=np.ones_like(p["white_plate"]))
    return p


def render_batch(dish: Dish, rngs: list[np.random.Generator], size: int = 32, setting: Setting = "restaurant") -> np.ndarray:
    """Servings of ``dish``, one per random stream, as (n, size, size, 3) uint8 sRGB images.

    ``setting``: ``restaurant`` (wooden tables, white or red plates, any light and camera: the
    continual photos) or ``studio`` (see :func:`_studio`: the pretraining photos, so the frozen
    backbone meets a new photographic domain in the continual tasks, as an ImageNet-21k ViT
    meets food photos).
    """
    if setting not in ("restaurant", "studio"):
        raise ValueError(f"setting must be 'restaurant' or 'studio', got {setting!r}")
    draws = [_draw(dish, rng, size) for rng in rngs]
    p = {k: np.stack([d[k] for d in draws]) for k in draws[0]}
    if setting == "studio":
        p = _studio(p)
    sc = _Scene(p["pose"], size)
    table, plate, food, second, top = (c[:, None, None, :] for c in np.moveaxis(_colours(dish, p), 1, 0))
    if setting == "studio":  # a light grey backdrop instead of the wooden table
        table = np.broadcast_to(_lab_to_linear(np.array([[78.0, 0.0, 2.0]])), table.shape)
    # table: wood grain along a random direction
    g = _col(p["grain"], 0)
    along = (sc.x * np.cos(g) + sc.y * np.sin(g) + 1.5) / 3 * (4 * size - 1)  # position in the grain walk
    walk = np.cumsum(p["grain_walk"], axis=1) / np.sqrt(size)
    lo = np.clip(np.floor(along).astype(int), 0, 4 * size - 2)
    frac = np.clip(along - lo, 0, 1)
    rows = np.arange(len(rngs))[:, None, None]
    grain = walk[rows, lo] * (1 - frac) + walk[rows, lo + 1] * frac
    grain -= grain.mean(axis=(1, 2), keepdims=True)
    grain_amp = 0.0 if setting == "studio" else 0.25
    albedo = table * (1 + grain_amp * grain + 0.05 * power_law(p["wood_noise"], colour_stats()["wood_table"].beta))[..., None]
    # plate (or bowl): a disk with a rim; a bowl's wall is wider and rises higher
    rho, _ = sc.polar()
    rim_in = 0.68 if dish.bowl else 0.8
    plate_cover = _ramp(rho - 0.95, sc.px)
    plate_h = 0.25 * np.clip((rho - rim_in) / (0.95 - rim_in), 0, 1) ** 2 * (3 if dish.bowl else 1)
    albedo = albedo * (1 - plate_cover[..., None]) + plate * plate_cover[..., None]
    # food, its texture and topping
    cover, food_h, inside, radius = _food_layer(sc, dish, p)
    if dish.bowl:
        cover = cover * _ramp(rho - rim_in, sc.px)
    lum, mix = _texture(sc, dish, p, cover, inside, radius)
    food_rgb = (food * (1 - mix[..., None]) + second * mix[..., None]) * lum[..., None]
    albedo = albedo * (1 - cover[..., None]) + food_rgb * cover[..., None]
    t_alpha, t_h = _topping(sc, dish, p, cover, radius)
    albedo = albedo * (1 - t_alpha[..., None]) + top * t_alpha[..., None]
    height = plate_h * plate_cover + food_h * cover + t_h
    # light: Lambertian relief, a soft cast shadow, specular highlights, colour temperature
    az, el, ambient, temperature, exposure, blur = (p["light"][:, i] for i in range(6))
    light = np.stack([np.cos(az) * np.cos(el), np.sin(az) * np.cos(el), np.sin(el)], -1)
    gy, gx = np.gradient(height * size / 6, axis=(1, 2))  # heights in plate radii -> slopes per pixel
    normal = np.stack([-gx, -gy, np.ones_like(gx)], -1)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    lambert = np.clip(np.einsum("nijc,nc->nij", normal, light), 0, None) / light[:, 2, None, None]
    shade = ambient[:, None, None] + (1 - ambient[:, None, None]) * lambert
    reach = (size * 0.06 * (0.5 + dish.height) / np.tan(el))[:, None]
    shadow = _fft_filter(cover, 1.0, shift=-light[:, [1, 0]] / np.cos(el)[:, None] * reach)
    shade *= 1 - 0.45 * np.clip(shadow, 0, 1) * (1 - cover)
    half = light + np.array([0, 0, 1.0])
    half /= np.linalg.norm(half, axis=-1, keepdims=True)
    gloss = dish.gloss * cover + 0.3 * plate_cover * (1 - cover)
    spec = gloss * np.clip(np.einsum("nijc,nc->nij", normal, half), 0, 1) ** 40
    tint = np.stack([1 + 0.07 * temperature, np.ones_like(temperature), 1 - 0.07 * temperature], -1) * exposure[:, None]
    vignette = 1 - 0.15 * (sc.x**2 + sc.y**2)
    lin = (albedo * shade[..., None] + spec[..., None]) * tint[:, None, None, :] * vignette[..., None]
    channels = np.moveaxis(lin, -1, 1).reshape(-1, size, size)  # defocus: blur each channel map
    lin = np.moveaxis(_fft_filter(channels, np.repeat(blur, 3)).reshape(-1, 3, size, size), 1, -1)
    srgb = _to_srgb(lin) + p["sensor"]
    return np.clip(np.rint(srgb * 255), 0, 255).astype(np.uint8)


def render(dish: Dish, rng: np.random.Generator, size: int = 32, setting: Setting = "restaurant") -> np.ndarray:
    """One serving of ``dish`` as an (size, size, 3) uint8 sRGB image."""
    return render_batch(dish, [rng], size, setting)[0]


# ------------------------------------------------------------------------------------------------
# data sets on disk
def long_tail_sizes(n_classes: int, n_max: int, n_min: int, seed: int = 0) -> np.ndarray:
    """Images per class, n_max * (n_min / n_max)^(rank / (C - 1)), ranks shuffled by ``seed``."""
    if not 1 <= n_min <= n_max:
        raise ValueError(f"long tail needs 1 <= n_min <= n_max, got n_min={n_min}, n_max={n_max}")
    rank = np.random.default_rng([seed, 17]).permutation(n_classes)
    sizes = n_max * (n_min / n_max) ** (rank / max(n_classes - 1, 1))
    return np.maximum(np.rint(sizes).astype(int), n_min)


def _image_rng(seed: int, pool: str, cls: int, split: str, i: int) -> np.random.Generator:
    return np.random.default_rng([seed, POOLS[pool], cls, SPLITS[split], i])


def _write_jpeg(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(image).save(path, quality=92)


def _render_all(jobs: list[tuple[Dish, int, str, int, Path]], pool: str, seed: int, size: int, desc: str,
                setting: Setting = "restaurant") -> None:
    """Render and write (dish, class, split, i, path) jobs, batching the servings of one dish."""
    from tqdm.auto import tqdm

    groups: dict[int, list[tuple[Dish, int, str, int, Path]]] = {}
    for job in jobs:
        groups.setdefault(job[1], []).append(job)
    with tqdm(total=len(jobs), desc=desc, unit="img", leave=False, mininterval=1.0) as bar:
        for group in groups.values():
            for start in range(0, len(group), 64):
                chunk = group[start : start + 64]
                images = render_batch(chunk[0][0], [_image_rng(seed, pool, c, split, i) for _, c, split, i, _ in chunk], size, setting)
                for (_, _, _, _, path), image in zip(chunk, images):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    _write_jpeg(path, image)
                bar.update(len(chunk))


def generate_food101(
    out_dir: Path,
    n_classes: int = 60,
    size: int = 32,
    train_max: int = 150,
    train_min: int = 8,
    n_val: int = 10,
    n_test: int = 20,
    seed: int = 0,
) -> None:
    """Write the continual pool in the Food-101 layout, with a long-tailed ``meta/train.txt``.

    ``images/<class>/<id>.jpg``, ``meta/classes.txt``, ``meta/labels.txt``, ``meta/train.txt`` and
    ``meta/test.txt`` (``class/id`` lines) as in Food-101, plus ``meta/val.txt`` (balanced, the
    same form) and ``recipes.json`` (the class recipes).
    """
    out_dir = Path(out_dir)
    dishes = make_dishes(n_classes, seed, "continual")
    counts = {"train": long_tail_sizes(n_classes, train_max, train_min, seed), "val": [n_val] * n_classes,
              "test": [n_test] * n_classes}
    lists: dict[str, list[str]] = {s: [] for s in SPLITS}
    jobs = []
    next_id = 0
    for split in ("train", "val", "test"):
        for c, dish in enumerate(dishes):
            for i in range(int(counts[split][c])):
                image_id = f"{next_id:06d}"
                next_id += 1
                lists[split].append(f"{dish.name}/{image_id}")
                jobs.append((dish, c, split, i, out_dir / "images" / dish.name / f"{image_id}.jpg"))
    _render_all(jobs, "continual", seed, size, "food_cl: dishes")
    meta = out_dir / "meta"
    meta.mkdir(parents=True, exist_ok=True)
    (meta / "classes.txt").write_text("".join(f"{d.name}\n" for d in dishes))
    (meta / "labels.txt").write_text("".join(f"{d.name.replace('_', ' ').capitalize()}\n" for d in dishes))
    for split, lines in lists.items():
        (meta / f"{split}.txt").write_text("".join(f"{line}\n" for line in lines))
    (out_dir / "recipes.json").write_text(json.dumps([asdict(d) for d in dishes], indent=1))


def generate_pretrain(out_dir: Path, n_classes: int = 40, size: int = 32, n_train: int = 64, n_val: int = 16,
                      seed: int = 0, setting: Setting = "studio") -> None:
    """Write the pretraining pool as an ImageFolder tree ``{train,val}/<class>/<i>.jpg`` (+ ``recipes.json``),
    photographed in ``setting`` (studio by default: another photographic domain than the continual set's)."""
    out_dir = Path(out_dir)
    dishes = make_dishes(n_classes, seed, "pretrain")
    jobs = [(d, c, split, i, out_dir / split / d.name / f"{i:05d}.jpg")
            for split, n in (("train", n_train), ("val", n_val)) for c, d in enumerate(dishes) for i in range(n)]
    _render_all(jobs, "pretrain", seed, size, "food_cl: pretraining dishes", setting)
    (out_dir / "recipes.json").write_text(json.dumps([asdict(d) for d in dishes], indent=1))

