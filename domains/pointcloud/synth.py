"""A seeded procedural corpus of ModelNet-like objects built from parts.

Every class is a small CAD program: boxes, cylinders, surfaces of revolution and tori placed by
class-specific topology (a chair is a seat, four legs and a back) with proportions drawn from
ranges of real furniture and objects. Points are sampled on the triangle surfaces with
probability proportional to area (so a large table top gets more points than a thin leg, as a
scanner or ModelNet's mesh sampling would give), normalised to the unit sphere, jittered, and -
for the ScanObjectNN-like ``scan`` variant - seen from one viewpoint so the far side is occluded.

Two disjoint sets of classes, as Point-MAE pretrains on one corpus (ShapeNet) and is tested
few-shot on another (ModelNet): :data:`FEW_SHOT_CLASSES` (15 ModelNet-like categories, the
episodes' classes) and :data:`PRETRAIN_CLASSES` (12 other part-built categories, only ever
reconstructed in pretraining). Meshes are ``(vertices (V, 3), faces (F, 3))`` numpy arrays, z up.
All randomness comes from one ``numpy.random.Generator`` so a (seed, class, index) triple always
yields the same cloud.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

Mesh = tuple[np.ndarray, np.ndarray]


# --- surface sampling (shared with the .off reader) --------------------------------------------------
def triangle_areas(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    a, b, c = (vertices[faces[:, i]] for i in range(3))
    return 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)


def sample_surface(vertices: np.ndarray, faces: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points uniform over the surface: triangles drawn by area, then uniform barycentrics."""
    areas = triangle_areas(vertices, faces)
    total = areas.sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError(f"mesh has no surface area to sample (total area {total})")
    tri = rng.choice(len(faces), size=n, p=areas / total)
    u, v = rng.random(n), rng.random(n)
    flip = u + v > 1  # reflect into the triangle: uniform without rejection
    u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
    a, b, c = (vertices[faces[tri, i]] for i in range(3))
    return (a + u[:, None] * (b - a) + v[:, None] * (c - a)).astype(np.float32)


def normalize_unit_sphere(points: np.ndarray) -> np.ndarray:
    """Centre on the centroid and scale into the unit sphere: PointNet++'s ``pc_normalize``
    (also Point-BERT's and Point-MAE's ModelNet loaders), the same operations in the same order.
    A cloud with no extent (every point equal) has no unit-sphere form and is refused."""
    points = points - np.mean(points, axis=0)
    m = np.max(np.sqrt(np.sum(points**2, axis=1)))
    if not m > 0:
        raise ValueError(f"cannot scale a cloud to the unit sphere: its largest distance from the centroid is {m}")
    return points / m


# --- primitives ---------------------------------------------------------------------------------------
def merge(*meshes: Mesh) -> Mesh:
    verts, faces, offset = [], [], 0
    for v, f in meshes:
        verts.append(v)
        faces.append(f + offset)
        offset += len(v)
    return np.concatenate(verts), np.concatenate(faces)


def box(size: tuple[float, float, float], centre: tuple[float, float, float] = (0, 0, 0)) -> Mesh:
    corners = (np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], float) - 0.5) * size + centre
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    return corners, np.array([t for a, b, c, d in quads for t in ((a, b, c), (a, c, d))])


def grid(fn: Callable[[np.ndarray, np.ndarray], np.ndarray], nu: int, nv: int) -> Mesh:
    """Triangulate a parametric surface ``fn(u, v) -> (..., 3)`` over the unit square."""
    u, v = np.meshgrid(np.linspace(0, 1, nu + 1), np.linspace(0, 1, nv + 1), indexing="ij")
    verts = fn(u, v).reshape(-1, 3)
    i, j = np.meshgrid(np.arange(nu), np.arange(nv), indexing="ij")
    a = (i * (nv + 1) + j).ravel()
    b, c, d = a + nv + 1, a + nv + 2, a + 1
    return verts, np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)])


def revolution(radius: np.ndarray, height: np.ndarray, centre=(0.0, 0.0, 0.0), segments: int = 24) -> Mesh:
    """Surface of revolution about z of the piecewise-linear profile ``(radius[i], height[i])``."""
    radius, height = np.asarray(radius, float), np.asarray(height, float)

    def fn(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        t = v * (len(radius) - 1)
        r, z = np.interp(t, np.arange(len(radius)), radius), np.interp(t, np.arange(len(height)), height)
        ang = 2 * np.pi * u
        return np.stack([r * np.cos(ang), r * np.sin(ang), z], -1) + centre

    return grid(fn, segments, 4 * (len(radius) - 1))


def cylinder(r: float, h: float, centre=(0.0, 0.0, 0.0), axis: str = "z", caps: bool = True) -> Mesh:
    prof_r = [0, r, r, 0] if caps else [r, r]
    prof_z = [-h / 2, -h / 2, h / 2, h / 2] if caps else [-h / 2, h / 2]
    v, f = revolution(np.array(prof_r), np.array(prof_z), segments=16)
    v = v[:, {"z": [0, 1, 2], "x": [2, 0, 1], "y": [0, 2, 1]}[axis]]
    return v + centre, f


def torus_arc(major: float, minor: float, start: float, stop: float, centre=(0.0, 0.0, 0.0)) -> Mesh:
    """Part of a torus in the x-z plane (a cup handle), angles in radians."""

    def fn(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        a, b = start + (stop - start) * u, 2 * np.pi * v
        rr = major + minor * np.cos(b)
        return np.stack([rr * np.cos(a), minor * np.sin(b), rr * np.sin(a)], -1) + centre

    return grid(fn, 12, 8)


def ellipsoid(radii: tuple[float, float, float], centre=(0.0, 0.0, 0.0)) -> Mesh:
    t = np.linspace(0, np.pi, 9)
    v, f = revolution(np.sin(t), -np.cos(t), segments=16)
    return v * radii + centre, f


def rotate(mesh: Mesh, axis: str, angle: float, origin=(0.0, 0.0, 0.0)) -> Mesh:
    """``mesh`` rotated by ``angle`` radians about the line through ``origin`` along ``axis``."""
    c, s = np.cos(angle), np.sin(angle)
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    v, f = mesh
    origin = np.asarray(origin, float)
    return (v - origin) @ r.T + origin, f


# --- classes ------------------------------------------------------------------------------------------
def _legs(rng, xs: float, ys: float, h: float, w: float, z0: float = 0.0, round_: bool = False) -> list[Mesh]:
    out = []
    for sx in (-1, 1):
        for sy in (-1, 1):
            c = (sx * xs, sy * ys, z0 + h / 2)
            out.append(cylinder(w / 2, h, c) if round_ else box((w, w, h), c))
    return out


def chair(rng) -> Mesh:
    w, d, seat_h, back_h = rng.uniform(0.4, 0.55), rng.uniform(0.4, 0.55), rng.uniform(0.4, 0.5), rng.uniform(0.35, 0.6)
    t = rng.uniform(0.03, 0.06)
    parts = _legs(rng, w / 2 - 0.03, d / 2 - 0.03, seat_h, rng.uniform(0.03, 0.05), round_=rng.random() < 0.5)
    parts += [box((w, d, t), (0, 0, seat_h)), box((w, t, back_h), (0, d / 2 - t / 2, seat_h + back_h / 2))]
    return merge(*parts)


def table(rng) -> Mesh:
    w, d, h = rng.uniform(0.8, 1.8), rng.uniform(0.6, 1.0), rng.uniform(0.65, 0.8)
    top = box((w, d, rng.uniform(0.03, 0.06)), (0, 0, h))
    if rng.random() < 0.7:
        return merge(top, *_legs(rng, w / 2 - 0.06, d / 2 - 0.06, h, rng.uniform(0.04, 0.08)))
    return merge(top, cylinder(0.05, h, (0, 0, h / 2)), cylinder(rng.uniform(0.2, 0.35), 0.03, (0, 0, 0.015)))


def stool(rng) -> Mesh:
    r, h = rng.uniform(0.15, 0.22), rng.uniform(0.45, 0.75)
    legs = []
    n = int(rng.integers(3, 5))
    for k in range(n):
        a = 2 * np.pi * k / n
        legs.append(cylinder(0.015, h, (0.8 * r * np.cos(a), 0.8 * r * np.sin(a), h / 2)))
    return merge(cylinder(r, 0.04, (0, 0, h)), *legs)


def bench(rng) -> Mesh:
    w, d, h = rng.uniform(1.2, 1.8), rng.uniform(0.3, 0.45), rng.uniform(0.4, 0.5)
    parts = [box((w, d, 0.05), (0, 0, h)), box((0.05, d, h), (-w / 2 + 0.1, 0, h / 2)), box((0.05, d, h), (w / 2 - 0.1, 0, h / 2))]
    if rng.random() < 0.5:
        parts.append(box((w, 0.04, 0.35), (0, d / 2, h + 0.25)))
    return merge(*parts)


def sofa(rng) -> Mesh:
    w, d, h = rng.uniform(1.5, 2.2), rng.uniform(0.8, 1.0), rng.uniform(0.35, 0.45)
    arm_w, back_h = rng.uniform(0.1, 0.2), rng.uniform(0.35, 0.5)
    return merge(
        box((w, d, h), (0, 0, h / 2)),
        box((w, 0.2, back_h), (0, d / 2 - 0.1, h + back_h / 2)),
        box((arm_w, d, 0.25), (-w / 2 + arm_w / 2, 0, h + 0.125)),
        box((arm_w, d, 0.25), (w / 2 - arm_w / 2, 0, h + 0.125)),
    )


def bed(rng) -> Mesh:
    w, l, h = rng.uniform(1.0, 1.8), rng.uniform(1.9, 2.2), rng.uniform(0.35, 0.55)
    parts = [box((w, l, 0.25), (0, 0, h)), box((w, 0.06, rng.uniform(0.8, 1.2)), (0, -l / 2, 0.5))]
    parts += _legs(rng, w / 2 - 0.05, l / 2 - 0.05, h - 0.12, 0.06)
    if rng.random() < 0.5:
        parts.append(box((w, 0.06, 0.6), (0, l / 2, 0.3)))
    return merge(*parts)


def bookshelf(rng) -> Mesh:
    w, d, h, t = rng.uniform(0.6, 1.2), rng.uniform(0.25, 0.4), rng.uniform(1.2, 2.0), 0.03
    parts = [box((t, d, h), (-w / 2, 0, h / 2)), box((t, d, h), (w / 2, 0, h / 2)), box((w, t, h), (0, d / 2, h / 2))]
    for z in np.linspace(0, h, int(rng.integers(4, 7))):
        parts.append(box((w, d, t), (0, 0, z)))
    return merge(*parts)


def monitor(rng) -> Mesh:
    w, h = rng.uniform(0.5, 0.7), rng.uniform(0.3, 0.45)
    stand = rng.uniform(0.1, 0.2)
    return merge(
        box((w, rng.uniform(0.02, 0.05), h), (0, 0, stand + h / 2)),
        box((0.05, 0.03, stand), (0, 0.02, stand / 2)),
        box((rng.uniform(0.2, 0.3), rng.uniform(0.15, 0.2), 0.02), (0, 0.02, 0.01)),
    )


def lamp(rng) -> Mesh:
    h, shade_r = rng.uniform(0.4, 0.7), rng.uniform(0.12, 0.22)
    shade_h = rng.uniform(0.15, 0.25)
    shade = revolution(np.array([shade_r, shade_r * rng.uniform(0.4, 0.7)]), np.array([h, h + shade_h]))
    return merge(cylinder(rng.uniform(0.08, 0.15), 0.03, (0, 0, 0.015)), cylinder(0.012, h + 0.05, (0, 0, h / 2)), shade)


def bottle(rng) -> Mesh:
    r, h = rng.uniform(0.03, 0.05), rng.uniform(0.2, 0.32)
    neck = r * rng.uniform(0.3, 0.45)
    shoulder = h * rng.uniform(0.55, 0.7)
    radius = np.array([0, r, r, r * 0.9, neck, neck, 0])
    height = np.array([0, 0, shoulder, shoulder + 0.02, shoulder + 0.06, h, h])
    return revolution(radius, height)


def cup(rng) -> Mesh:
    r, h = rng.uniform(0.035, 0.05), rng.uniform(0.08, 0.12)
    body = revolution(np.array([0, r * 0.85, r]), np.array([0, 0, h]))  # open top
    handle = torus_arc(h * 0.3, 0.006, -np.pi / 2, np.pi / 2, (r, 0, h / 2))
    return merge(body, handle)


def bowl(rng) -> Mesh:
    r, h = rng.uniform(0.08, 0.14), rng.uniform(0.04, 0.07)
    t = np.linspace(0, 1, 6)
    return revolution(np.concatenate([[0], r * (0.4 + 0.6 * np.sin(t * np.pi / 2))]), np.concatenate([[0], h * t]))


def vase(rng) -> Mesh:
    h, r = rng.uniform(0.25, 0.45), rng.uniform(0.06, 0.1)
    bulge, mouth = rng.uniform(1.2, 1.6), rng.uniform(0.5, 0.9)
    radius = np.array([0, r * 0.7, r * bulge, r, r * 0.6, r * mouth])
    return revolution(radius, h * np.array([0, 0, 0.35, 0.65, 0.85, 1.0]))


def airplane(rng) -> Mesh:
    length, span = rng.uniform(1.0, 1.6), rng.uniform(0.9, 1.6)
    fr = rng.uniform(0.06, 0.1)
    chord = rng.uniform(0.15, 0.3)
    wing_x = rng.uniform(-0.1, 0.1)
    return merge(
        ellipsoid((length / 2, fr, fr)),
        box((chord, span, 0.02), (wing_x, 0, 0)),
        box((chord * 0.5, span * 0.35, 0.015), (-length / 2 + 0.08, 0, 0.02)),
        box((chord * 0.5, 0.015, rng.uniform(0.12, 0.25)), (-length / 2 + 0.08, 0, 0.1)),
    )


def car(rng) -> Mesh:
    l, w, h = rng.uniform(3.8, 4.8), rng.uniform(1.6, 1.9), rng.uniform(0.5, 0.7)
    cab_l, cab_h = l * rng.uniform(0.4, 0.55), rng.uniform(0.4, 0.55)
    wr = rng.uniform(0.3, 0.38)
    parts = [box((l, w, h), (0, 0, wr + h / 2)), box((cab_l, w * 0.9, cab_h), (-l * 0.05, 0, wr + h + cab_h / 2))]
    for sx in (-1, 1):
        for sy in (-1, 1):
            parts.append(cylinder(wr, 0.2, (sx * l * 0.33, sy * w / 2, wr), axis="y"))
    return merge(*parts)


# --- pretraining-only classes (never in a few-shot episode) ----------------------------------------
def bathtub(rng) -> Mesh:
    w, d, h, t = rng.uniform(1.4, 1.8), rng.uniform(0.7, 0.85), rng.uniform(0.45, 0.6), 0.05
    parts = [box((w, d, t), (0, 0, t / 2)), box((t, d, h), (-w / 2, 0, h / 2)), box((t, d, h), (w / 2, 0, h / 2)),
             box((w, t, h), (0, -d / 2, h / 2)), box((w, t, h), (0, d / 2, h / 2))]
    if rng.random() < 0.5:  # claw feet
        parts += _legs(rng, w / 2 - 0.1, d / 2 - 0.1, 0.1, 0.06, z0=-0.1, round_=True)
    return merge(*parts)


def cabinet(rng) -> Mesh:
    w, d, h = rng.uniform(0.6, 1.2), rng.uniform(0.4, 0.55), rng.uniform(0.7, 1.3)
    n = int(rng.integers(3, 6))
    parts = [box((w, d, h), (0, 0, 0.05 + h / 2)), box((w * 0.95, d * 0.95, 0.05), (0, 0, 0.025))]
    for z in 0.05 + (np.arange(n) + 0.5) * h / n:  # drawer fronts and their handles
        parts += [box((w * 0.9, 0.02, h / n * 0.85), (0, -d / 2 - 0.01, z)), box((w * 0.2, 0.03, 0.02), (0, -d / 2 - 0.035, z))]
    return merge(*parts)


def clock(rng) -> Mesh:
    r, t = rng.uniform(0.15, 0.3), rng.uniform(0.04, 0.08)
    base_z = r + (0.05 if rng.random() < 0.5 else 0.0)
    parts = [cylinder(r, t, (0, 0, base_z), axis="y"), torus_arc(r, t * 0.4, 0, 2 * np.pi, (0, 0, base_z)),
             rotate(box((0.012, 0.01, r * 0.7), (0, -t / 2 - 0.01, base_z + r * 0.35)), "y", rng.uniform(0, 2 * np.pi), (0, 0, base_z)),
             rotate(box((0.016, 0.01, r * 0.5), (0, -t / 2 - 0.02, base_z + r * 0.25)), "y", rng.uniform(0, 2 * np.pi), (0, 0, base_z))]
    if base_z > r:  # a mantel clock on a plinth
        parts.append(box((r * 1.4, t * 1.5, 0.05), (0, 0, 0.025)))
    return merge(*parts)


def faucet(rng) -> Mesh:
    h, reach = rng.uniform(0.15, 0.28), rng.uniform(0.05, 0.1)
    parts = [cylinder(rng.uniform(0.025, 0.04), 0.02, (0, 0, 0.01)), cylinder(0.015, h, (0, 0, h / 2)),
             torus_arc(reach / 2, 0.012, 0, np.pi, (reach / 2, 0, h)),  # spout arching over and down
             cylinder(0.012, reach * 0.5, (reach, 0, h - reach * 0.25))]
    handle = cylinder(0.01, 0.06, (0, 0.04, h * 0.7), axis="y") if rng.random() < 0.5 else box((0.08, 0.015, 0.015), (-0.03, 0, h + 0.01))
    return merge(*parts, handle)


def guitar(rng) -> Mesh:
    lower, upper, depth = rng.uniform(0.17, 0.22), rng.uniform(0.12, 0.16), rng.uniform(0.04, 0.06)
    neck = rng.uniform(0.4, 0.5)
    return merge(
        ellipsoid((lower, depth, lower * 1.05), (0, 0, lower)),
        ellipsoid((upper, depth, upper), (0, 0, 1.8 * lower + upper * 0.6)),
        box((0.05, 0.025, neck), (0, 0, 1.8 * lower + 1.4 * upper + neck / 2)),
        box((0.08, 0.02, 0.18), (0, 0.005, 1.8 * lower + 1.4 * upper + neck + 0.09)),
    )


def laptop(rng) -> Mesh:
    w, d, t = rng.uniform(0.3, 0.4), rng.uniform(0.22, 0.28), rng.uniform(0.015, 0.025)
    opening = rng.uniform(np.radians(95), np.radians(130))  # screen angle to the keyboard
    screen = box((w, d, 0.01), (0, d / 2 + d / 2, t))  # lies flat behind the base, then hinges up
    return merge(box((w, d, t), (0, 0, t / 2)), rotate(screen, "x", np.pi - opening, (0, d / 2, t)))


def mailbox(rng) -> Mesh:
    post, l, w, h = rng.uniform(0.9, 1.2), rng.uniform(0.4, 0.55), rng.uniform(0.15, 0.22), rng.uniform(0.12, 0.18)
    return merge(
        box((0.08, 0.08, post), (0, 0, post / 2)),
        box((l, w, h), (0, 0, post + h / 2)),
        cylinder(w / 2, l, (0, 0, post + h), axis="x"),  # the rounded roof
        box((0.02, 0.1, 0.15), (l * 0.3, w / 2 + 0.01, post + h + 0.05)),  # the flag
    )


def piano(rng) -> Mesh:
    w, d, h = rng.uniform(1.4, 1.6), rng.uniform(0.55, 0.65), rng.uniform(1.1, 1.3)
    key_z = rng.uniform(0.68, 0.75)
    return merge(
        box((w, d, h), (0, 0, h / 2)),
        box((w * 0.95, 0.28, 0.08), (0, -d / 2 - 0.14, key_z)),  # keyboard shelf
        box((0.06, 0.06, key_z), (-w * 0.45, -d / 2 - 0.24, key_z / 2)),
        box((0.06, 0.06, key_z), (w * 0.45, -d / 2 - 0.24, key_z / 2)),
        box((w * 0.5, 0.02, 0.3), (0, -d / 2 - 0.05, key_z + 0.35)),  # music stand
    )


def rocket(rng) -> Mesh:
    r, h, nose = rng.uniform(0.06, 0.1), rng.uniform(0.8, 1.2), rng.uniform(0.15, 0.3)
    parts = [cylinder(r, h, (0, 0, h / 2)), revolution(np.array([r, r * 0.6, 0]), np.array([h, h + nose * 0.6, h + nose]))]
    n_fins = int(rng.integers(3, 5))
    fin = box((0.01, r * 2.5, h * 0.25), (0, r + r * 1.25, h * 0.125))
    parts += [rotate(fin, "z", 2 * np.pi * k / n_fins) for k in range(n_fins)]
    parts.append(revolution(np.array([r * 0.5, r * 0.8]), np.array([0, -0.08])))  # nozzle
    return merge(*parts)


def skateboard(rng) -> Mesh:
    l, w, wheel = rng.uniform(0.7, 0.85), rng.uniform(0.19, 0.23), rng.uniform(0.025, 0.035)
    z = 2 * wheel + 0.04
    parts = [box((l, w, 0.015), (0, 0, z))]
    for sx in (-1, 1):  # kick tails bent up at both ends
        parts.append(rotate(box((0.12, w, 0.015), (sx * (l / 2 + 0.06), 0, z)), "y", -sx * 0.3, (sx * l / 2, 0, z)))
    for sx in (-1, 1):
        parts.append(box((0.05, w * 0.8, 0.04), (sx * l * 0.35, 0, z - 0.02)))  # trucks
        for sy in (-1, 1):
            parts.append(cylinder(wheel, 0.03, (sx * l * 0.35, sy * w * 0.45, wheel), axis="y"))
    return merge(*parts)


def loudspeaker(rng) -> Mesh:
    w, d, h = rng.uniform(0.2, 0.35), rng.uniform(0.2, 0.3), rng.uniform(0.35, 0.9)
    parts = [box((w, d, h), (0, 0, h / 2))]
    n = int(rng.integers(1, 4))
    for k in range(n):  # cone drivers on the front face, largest at the bottom
        r = w * 0.4 * (1 - 0.25 * k)
        z = h * (k + 0.5) / n
        v, f = rotate(revolution(np.array([r, r * 0.3]), np.array([0, 0.04])), "x", np.pi / 2)  # axis z -> -y
        parts.append((v + (0, -d / 2, z), f))
    return merge(*parts)


def tent(rng) -> Mesh:
    r, h, sides = rng.uniform(1.0, 1.6), rng.uniform(1.2, 2.0), int(rng.integers(4, 7))
    parts = [revolution(np.array([r, 0]), np.array([0, h]), segments=sides)]  # a pyramid of canvas
    if rng.random() < 0.5:
        parts.append(cylinder(0.02, 0.3, (0, 0, h + 0.1)))  # the pole through the apex
    return merge(*parts)


#: the 15 ModelNet-like classes of the few-shot episodes, in label order
FEW_SHOT_CLASSES: dict[str, Callable[[np.random.Generator], Mesh]] = {
    f.__name__: f
    for f in (airplane, bed, bench, bookshelf, bottle, bowl, car, chair, cup, lamp, monitor, sofa, stool, table, vase)
}
#: the 12 classes only the pretraining corpus has (as ShapeNet's categories are for Point-MAE)
PRETRAIN_CLASSES: dict[str, Callable[[np.random.Generator], Mesh]] = {
    f.__name__: f
    for f in (bathtub, cabinet, clock, faucet, guitar, laptop, loudspeaker, mailbox, piano, rocket, skateboard, tent)
}
#: every class; a cloud's random stream is seeded by its index here, whatever subset is drawn
ALL_CLASSES = FEW_SHOT_CLASSES | PRETRAIN_CLASSES


# --- clouds ---------------------------------------------------------------------------------------------
def occlude(points: np.ndarray, rng: np.random.Generator, distance: float = 3.0) -> np.ndarray:
    """Keep the points a single depth camera sees from a random viewpoint ``distance`` away
    (above the horizon, as a person scanning a room holds it): Katz et al.'s hidden point removal
    (spherical flip + convex hull, SIGGRAPH 2007), the operator Open3D uses for the same purpose."""
    from scipy.spatial import ConvexHull

    az, el = rng.uniform(0, 2 * np.pi), rng.uniform(np.radians(10), np.radians(45))
    camera = distance * np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
    rel = points - camera
    norm = np.linalg.norm(rel, axis=1, keepdims=True)
    radius = norm.max() * 100.0  # large flip radius: close to exact visibility for smooth surfaces
    flipped = rel + 2 * (radius - norm) * rel / norm
    hull = ConvexHull(np.vstack([flipped, np.zeros((1, 3))]))
    visible = hull.vertices[hull.vertices < len(points)]
    return points[np.sort(visible)]


def make_cloud(name: str, num_points: int, rng: np.random.Generator, variant: str = "clean") -> np.ndarray:
    """One ``(num_points, 3)`` float32 cloud of class ``name`` (a key of :data:`ALL_CLASSES`)."""
    if variant not in ("clean", "scan"):
        raise ValueError(f"variant must be 'clean' (ModelNet-like) or 'scan' (ScanObjectNN-like), got {variant!r}")
    v, f = ALL_CLASSES[name](rng)
    # ModelNet is roughly aligned (small yaw); scans come at any yaw around the up axis
    yaw = rng.uniform(-np.pi, np.pi) if variant == "scan" else rng.uniform(-0.2, 0.2)
    c, s = np.cos(yaw), np.sin(yaw)
    v = v @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]).T
    if variant == "clean":
        pts = normalize_unit_sphere(sample_surface(v, f, num_points, rng))
        return (pts + rng.normal(0, 0.005, pts.shape)).astype(np.float32)
    pts = occlude(normalize_unit_sphere(sample_surface(v, f, 4 * num_points, rng)), rng)
    pts = pts[rng.choice(len(pts), num_points, replace=len(pts) < num_points)]
    pts = normalize_unit_sphere(pts)
    return (pts + rng.normal(0, 0.01, pts.shape)).astype(np.float32)


def make_corpus(
    per_class: int, num_points: int, seed: int, variant: str = "clean", classes: Sequence[str] = tuple(FEW_SHOT_CLASSES)
) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` clouds of every class in ``classes``: points ``(M, num_points, 3)`` and labels
    ``(M,)`` indexing ``classes``. Each cloud is seeded by (seed, its class's index in
    :data:`ALL_CLASSES`, its index), so it is the same cloud whichever subset it is drawn with."""
    unknown = [c for c in classes if c not in ALL_CLASSES]
    if unknown:
        raise ValueError(f"unknown classes {unknown}; the corpus has {list(ALL_CLASSES)}")
    order = list(ALL_CLASSES)
    points, labels = [], []
    for label, name in enumerate(classes):
        for i in range(per_class):
            rng = np.random.default_rng([seed, order.index(name), i])  # each cloud reproducible on its own
            points.append(make_cloud(name, num_points, rng, variant))
            labels.append(label)
    return np.stack(points), np.asarray(labels, dtype=np.int64)
