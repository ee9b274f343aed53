"""A frontal chest radiograph as a Beer-Lambert projection of a thoracic phantom.

Every structure is a map of path length (cm) through it along the beam; the detector sees
``N0 * exp(-sum_k mu_k * t_k)`` photons per pixel, plus scatter, with Poisson quantum noise (its
normal limit, so an image with and without a finding share one noise field), and
the image is displayed as ``log(N0 / counts)`` in a fixed window (bright = attenuating), as a
radiograph is. Linear attenuation coefficients are rounded values at an effective energy of
~60 keV (NIST XCOM): soft tissue / water / blood / fluid 0.20 /cm, inflated lung 0.05 /cm
(about a quarter tissue, three quarters air), cortical bone 0.50 /cm.

Anatomy (normalised coordinates: x, y in [-1, 1], y down, the patient's right on the viewer's
left as radiographs are read): body wall, two lung fields (ellipses cut by the diaphragm domes,
or a real lung mask when one is given), heart with a set cardiothoracic ratio (CTR = widest
cardiac diameter / widest inner thoracic diameter), mediastinum, aortic knob, spine, ten
posterior ribs per side, clavicles, humeral heads, breast shadows, vessels branching from the
hila. Age lowers bone density and unfolds the aortic knob; sex sets thorax size and breast
shadows. AP (portable, supine) against PA (erect): the heart is magnified (~15 %, it lies far
from the detector), the scapulae overlie the lungs, inspiration is shallower, no grid so more
scatter, lower dose so more quantum noise, and an effusion layers as a diffuse haze instead of
a meniscus.

Findings: cardiomegaly (CTR 0.53-0.65 on PA), pleural effusion (meniscus / haze, right, left or
both), lung opacity (consolidation blobs that replace alveolar air with fluid), pneumothorax (a
rim of air without lung markings between the chest wall and a visible visceral pleural line).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

MU_SOFT, MU_BONE = 0.20, 0.50  # /cm at ~60 keV (NIST XCOM, rounded)
AIR_FRACTION = 0.75  # inflated lung: ~25 % tissue by volume, so mu_lung ~ 0.05 /cm
AP_MAGNIFICATION = 1.15  # heart-to-detector distance in AP vs PA (why AP CTR is not diagnostic)
WINDOW = (0.3, 5.2)  # display window of log(N0 / counts)


@dataclass
class Anatomy:
    """What stays fixed for a patient across studies (sizes in normalised units, cm for depths)."""

    thorax_hw: float  # inner half-width of the rib cage
    depth: float  # AP diameter of the chest at the midline, cm
    apex_y: float
    dome_y: tuple[float, float]  # dome tops (patient right = viewer left, patient left)
    ctr_normal: float  # the CTR this patient's heart has when not enlarged
    breast: float  # breast-shadow tissue, cm (0 for men)
    bone_density: float  # relative to a 35-year-old
    aortic_knob: float  # radius of the aortic knob
    lung_mask: np.ndarray | None = field(default=None, repr=False)  # (size, size) 0 / 1 right / 2 left


@dataclass
class Exam:
    """One study: view, findings with their location, and acquisition details."""

    view: str  # "PA" or "AP"
    cardiomegaly: bool = False
    effusion: str | None = None  # "right", "left", "both"
    opacity: tuple[str, str] | None = None  # (side, zone) e.g. ("left", "lower")
    pneumothorax: str | None = None  # "right" / "left"
    artefact: bool = False  # burned-in text marker of a portable unit


def patient_anatomy(rng: np.random.Generator, age: float, sex: str, lung_mask: np.ndarray | None = None) -> Anatomy:
    """Patient-level anatomy: men have wider, deeper chests; women breast shadows (cm of tissue)."""
    male = sex == "male"
    thorax_hw = rng.uniform(0.74, 0.82) if male else rng.uniform(0.68, 0.76)
    if lung_mask is not None:  # a real outline, shrunk for women; the rib cage follows its extent
        size = lung_mask.shape[0]
        scale = 1.0 if male else 0.92
        centre = (size - 1) / 2
        lung_mask = ndi.affine_transform(lung_mask, np.eye(2) / scale, offset=centre - centre / scale, order=0)
        cols = np.nonzero(lung_mask.any(axis=0))[0]
        thorax_hw = (cols.max() - cols.min() + 1) / size + 0.02
    return Anatomy(
        thorax_hw=thorax_hw,
        depth=rng.normal(23.0 if male else 21.0, 1.2),
        apex_y=rng.uniform(-0.80, -0.74),
        dome_y=(rng.uniform(0.28, 0.36), rng.uniform(0.36, 0.44)),  # the right dome sits higher (liver)
        # normal CTR ~0.42-0.48 on PA films, slowly rising with age
        ctr_normal=float(np.clip(rng.normal(0.43 + 0.0007 * (age - 40), 0.02), 0.37, 0.49)),
        breast=0.0 if male else rng.uniform(2.0, 5.0),
        bone_density=float(np.clip(1.0 - 0.004 * max(age - 35.0, 0.0), 0.75, 1.0)),
        aortic_knob=0.045 * (1.0 + 0.007 * max(age - 40.0, 0.0)),
        lung_mask=lung_mask,
    )


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size) + 0.5) / size * 2 - 1
    return np.meshgrid(c, c, indexing="ij")[::-1]  # x (columns), y (rows)


def _smoothstep(v: np.ndarray) -> np.ndarray:
    v = np.clip(v, 0.0, 1.0)
    return v * v * (3 - 2 * v)


def _ellipsoid(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float, depth: float) -> np.ndarray:
    """Chord length (cm) through an ellipsoid of the given half-axes and maximal depth."""
    r2 = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2
    return depth * np.sqrt(np.clip(1 - r2, 0, None))


def _dome(x: np.ndarray, side_x: float, top: float, half_width: float) -> np.ndarray:
    """Height (y) of a hemidiaphragm dome over x: highest at ``side_x``, falling laterally."""
    return top + 0.22 * ((x - side_x) / half_width) ** 2


def _lungs(x: np.ndarray, y: np.ndarray, a: Anatomy, inspiration: float) -> tuple[np.ndarray, np.ndarray]:
    """Lung thickness (cm) and side labels (1 = patient right, 2 = patient left, 0 = no lung)."""
    size = x.shape[0]
    if a.lung_mask is not None:  # a real lung outline: thickness grows with depth inside the field
        side = a.lung_mask.copy()
        depth = ndi.distance_transform_edt(side > 0)
        thick = np.zeros_like(depth)
        for s in (1, 2):
            d = depth * (side == s)
            thick += 15.0 * np.sqrt(d / max(d.max(), 1e-6))
        return thick, side
    w, thick, side = a.thorax_hw, np.zeros((size, size)), np.zeros((size, size), np.int8)
    for s, sign in ((1, -1.0), (2, 1.0)):
        cx, ax = sign * w * 0.52, w * 0.50
        top = a.dome_y[s - 1] - inspiration
        cy = (a.apex_y + top + 0.18) / 2
        ay = (top + 0.18 - a.apex_y) / 2
        t = _ellipsoid(x, y, cx, cy, ax, ay, 15.0)
        t *= _smoothstep((_dome(x, cx, top, ax) - y) / 0.05)  # cut by the diaphragm (posterior recess: soft)
        t *= _smoothstep((sign * x - 0.06) / 0.04)  # mediastinal border
        thick += t
        side[t > 0.3] = s
    return thick, side


def _vessels(rng: np.random.Generator, x: np.ndarray, a: Anatomy) -> np.ndarray:
    """Pulmonary vessels (cm of blood): branching segments from each hilum, thinning outwards."""
    size = x.shape[0]
    v = np.zeros((size, size))
    for sign in (-1.0, 1.0):
        stack = [((sign * 0.14, -0.02), np.arctan2(rng.uniform(-1, 1), sign), 0.6, 0)]
        while stack:
            (x0, y0), ang, width, level = stack.pop()
            length = rng.uniform(0.18, 0.32) * (0.8**level)
            t = np.arange(max(int(length * size), 2)) / max(int(length * size) - 1, 1)
            px, py = x0 + t * length * np.cos(ang), y0 + t * length * np.sin(ang)
            cols, rows = ((px + 1) / 2 * size).astype(int), ((py + 1) / 2 * size).astype(int)
            ok = (cols >= 0) & (cols < size) & (rows >= 0) & (rows < size)
            np.add.at(v, (rows[ok], cols[ok]), width * 2.5)
            if level < 2:
                for _ in range(2 if level else 4):
                    stack.append(((px[-1], py[-1]), ang + rng.normal(0, 0.5), width * 0.7, level + 1))
    return ndi.gaussian_filter(v, 0.6)


def _ribs(x: np.ndarray, y: np.ndarray, a: Anatomy) -> np.ndarray:
    """Posterior ribs (cm of bone): curved bands rising from the spine then sweeping down laterally."""
    bone = np.zeros_like(x)
    s = np.abs(x) / a.thorax_hw
    inside = (s < 1.06) & (s > 0.06)
    for k in range(10):
        y0 = a.apex_y + 0.03 + 0.125 * k
        centre = y0 - 0.06 * np.sin(np.pi * np.clip(s, 0, 1) * 0.8) + 0.26 * s**2
        d = np.abs(y - centre) / 0.024
        band = (d < 1) & inside
        bone[band] += 0.35 + 0.45 * d[band] ** 4  # the cortex shows as a brighter rim
    return bone


def render(rng: np.random.Generator, a: Anatomy, exam: Exam, size: int = 64) -> tuple[np.ndarray, dict]:
    """One radiograph (uint8, size x size) and its ground truth (projected / true CTR, regions)."""
    x, y = _grid(size)
    # each finding draws from its own stream, so an image with and without it differ only there
    sub = {k: np.random.default_rng(rng.integers(2**63)) for k in ("heart", "effusion", "opacity", "pneumothorax", "marker")}
    ap = exam.view == "AP"
    inspiration = rng.uniform(0.06, 0.12) if ap else rng.uniform(-0.02, 0.03)  # AP: shallower breath
    x = x + rng.normal(0, 0.015)  # positioning
    y = y + rng.normal(0, 0.015)

    # body wall: an elliptical cross-section narrowing to the neck
    half = (a.thorax_hw + 0.13) * (1 - 0.55 * _smoothstep((-0.68 - y) / 0.3))
    body = a.depth * np.sqrt(np.clip(1 - (x / half) ** 2, 0, None))
    lung, side = _lungs(x, y, a, inspiration)
    lung_present = lung > 0.3

    # heart: widest diameter = CTR x thoracic diameter; it sits left of the midline on the left dome
    ctr_true = sub["heart"].uniform(0.53, 0.65) if exam.cardiomegaly else a.ctr_normal
    ctr = ctr_true * (AP_MAGNIFICATION if ap else 1.0)
    hw = ctr * a.thorax_hw
    hh = 0.62 * hw + 0.08
    hx, hy = 0.3 * hw - 0.04, a.dome_y[1] - inspiration + 0.06 - hh  # its base rests on the left dome
    heart = _ellipsoid(x, y, hx, hy, hw, hh, 10.0 * min(hw / 0.33, 1.3))
    med_half = 0.075 + 0.03 * _smoothstep((y + 0.7) / 0.6)
    mediastinum = 7.0 * _smoothstep((med_half - np.abs(x - 0.01)) / 0.03) * _smoothstep((y + 0.9) / 0.1)
    knob = _ellipsoid(x, y, 0.12, -0.30, a.aortic_knob, a.aortic_knob * 1.1, 4.0)
    solid = np.maximum(heart, np.maximum(mediastinum, knob))

    air = AIR_FRACTION * np.clip(lung - solid, 0, None)  # cm of air along the ray
    vessels = _vessels(rng, x, a) * lung_present
    air = np.clip(air - AIR_FRACTION * vessels, 0, None)
    trachea = 1.8 * _smoothstep((0.03 - np.abs(x - 0.01)) / 0.015) * _smoothstep((-0.3 - y) / 0.1)
    air = air + trachea * (body > 0)
    truth: dict = {"ctr_true": round(float(ctr_true), 4), "ctr_projected": round(float(ctr), 4)}

    def lung_side(name: str) -> np.ndarray:
        return side == (1 if name == "right" else 2)

    if exam.effusion:
        sides = ("right", "left") if exam.effusion == "both" else (exam.effusion,)
        for s in sides:
            m = lung_side(s)
            if ap:  # supine: fluid layers posteriorly, a haze graded towards the base
                frac = sub["effusion"].uniform(0.25, 0.5) * _smoothstep((y + 0.4) / 1.0)
            else:  # erect: a meniscus, higher laterally, blunting the costophrenic angle
                rows = np.nonzero(m.any(axis=1))[0]
                base = (rows.max() + 0.5) / size * 2 - 1 if len(rows) else a.dome_y[0]
                level = base - sub["effusion"].uniform(0.12, 0.28) - 0.12 * np.abs(x) / a.thorax_hw
                frac = _smoothstep((y - level) / 0.05)
            air = np.where(m, air * (1 - frac), air)
    if exam.opacity:
        s, zone = exam.opacity
        orng = sub["opacity"]
        rows = {"upper": -0.45, "middle": -0.1, "lower": 0.2}[zone]
        cx = (-1 if s == "right" else 1) * a.thorax_hw * orng.uniform(0.35, 0.65)
        blob = np.zeros_like(x)
        for _ in range(orng.integers(1, 3)):
            r = orng.uniform(0.08, 0.16)
            bx, by = cx + orng.normal(0, 0.05), rows + orng.normal(0, 0.05)
            blob += np.exp(-((x - bx) ** 2 + (y - by) ** 2) / (2 * r**2))
        texture = ndi.gaussian_filter(orng.standard_normal(x.shape), size * 0.03)
        texture = (texture - texture.mean()) / (texture.std() + 1e-8)
        fill = np.clip(blob * (1 + 0.4 * texture), 0, 1) * orng.uniform(0.6, 0.9)  # alveolar air -> fluid
        air = np.where(lung_side(s), air * (1 - fill), air)
    if exam.pneumothorax:
        m = lung_side(exam.pneumothorax)
        depth = ndi.distance_transform_edt(m) / size * 2  # normalised distance to the lung edge
        sign = -1 if exam.pneumothorax == "right" else 1
        lateral = _smoothstep((sign * x - 0.25) / 0.1)
        rim = sub["pneumothorax"].uniform(0.10, 0.18) * (1.0 - 0.6 * _smoothstep((y - a.apex_y) / 0.9))  # widest at the apex
        gap = m & (depth < rim) & ((lateral > 0.5) | (y < a.apex_y + 0.25))
        # the pleural space fills with air across the hemithorax's depth there; lung and vessels are gone
        air = np.where(gap, np.maximum(lung, 0.6 * a.depth), air)
        pleura = m & ~gap & ndi.binary_dilation(gap, iterations=1)
        air = np.where(pleura, air - 0.4, air)  # the visceral pleural line
        truth["pneumothorax_px"] = int(gap.sum())

    # bones (extra attenuation beyond the soft tissue they displace)
    bone = _ribs(x, y, a) * (lung_present | (body > 0))
    bone += 1.6 * _smoothstep((0.06 - np.abs(x - 0.01)) / 0.03)  # vertebral bodies
    for sign in (-1.0, 1.0):
        cs = np.abs(x) / 0.62
        clav = (np.abs(y - (-0.66 + 0.09 * cs)) < 0.025) & (cs > 0.1) & (cs < 1) & (sign * x > 0)
        bone += 1.5 * clav
        bone += _ellipsoid(x, y, sign * (a.thorax_hw + 0.16), -0.80, 0.12, 0.12, 5.0)  # humeral heads
        if ap:  # scapulae overlie the lateral lung fields unless the shoulders are rotated forward (PA)
            scap = (sign * x > a.thorax_hw * 0.62) & (sign * x < a.thorax_hw * 1.05) & (y > -0.7) & (y < -0.1)
            bone += 0.8 * scap * (1 - (y + 0.7) / 0.6)
        if a.breast:
            body += _ellipsoid(x, y, sign * a.thorax_hw * 0.5, 0.36, 0.36, 0.26, a.breast) * _smoothstep((y - 0.15) / 0.2)
    bone = bone * a.bone_density * (body > 0)

    line = MU_SOFT * (body - air) + (MU_BONE - MU_SOFT) * bone
    line = np.where(body > 0, np.clip(line, 0, None), 0.0)
    n0 = rng.uniform(1.5e3, 3e3) if ap else rng.uniform(6e3, 1.2e4)  # photons per pixel, unattenuated
    primary = n0 * np.exp(-line)
    scatter = (rng.uniform(0.35, 0.5) if ap else rng.uniform(0.1, 0.2)) * ndi.gaussian_filter(primary, size / 8)
    mean = primary + scatter  # quantum noise: Poisson, in its normal limit (>= ~10 photons per pixel here)
    counts = mean + np.sqrt(mean) * rng.standard_normal(mean.shape)
    shown = np.log(n0 / np.maximum(counts, 0.5))
    shown = ndi.gaussian_filter(shown, 0.5)  # detector blur
    image = np.clip((shown - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0, 1)
    if exam.artefact:  # burned-in text of a portable unit: four bright letter blocks, top right
        r0, c0, h, w = int(size * 0.05), int(size * 0.66), max(2, size // 16), max(2, size // 24)
        r0 += int(sub["marker"].integers(0, 2))
        for k in range(4):
            c = c0 + k * (w + 1)
            image[r0 : r0 + h, c : c + w] = 1.0
            image[r0 + 1 : r0 + h - 1, c + 1 : c + w - 1] = 0.55 if k % 2 else 0.9
    return np.rint(image * 255).astype(np.uint8), truth
