"""Fit the colour and texture statistics of real food photos that the generator draws from.

The photos are not committed; only the fitted numbers are (``colour_stats.json``). They come from
two registry packages:

* Debian 12 ``opencv-doc`` 4.6.0+dfsg-12 (OpenCV's ``samples/data``, under the package's
  ``Files: *`` entry, Apache-2.0 AND BSD-3-Clause):
  ``usr/share/doc/opencv-doc/examples/data/{fruits,apple,orange}.jpg``. Fetch and unpack without
  installing: ``apt-get download opencv-doc && dpkg-deb -x opencv-doc_*.deb DEST``.
* scikit-image 0.26 (``skimage.data.coffee()``, CC0, Rachel Michetti / Pikolo Espresso Bar): an
  espresso cup on a saucer on a wooden table.

Each region is a hand-picked box (rows r0:r1, columns c0:c1) lying inside one surface. For each
region we record, in CIELAB (D65, ``skimage.color.rgb2lab``):

* ``lab_mean`` and ``lab_cov``: the mean and covariance of the region's pixel colours;
* ``beta``: the exponent of the luminance power spectrum, P(f) ~ f^-beta, fitted by least squares
  on log-log axes to the 2-D spectrum of the Hann-windowed crop for 2/size < f < 0.25 cycles/px;
* ``l_std``: the standard deviation of L* (texture contrast).

    python -m domains.food_cl.calibrate DEST/usr/share/doc/opencv-doc/examples/data
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

STATS_FILE = Path(__file__).with_name("colour_stats.json")
FORMAT = "food_cl-colour-stats/1"

OPENCV_DEB = "opencv-doc 4.6.0+dfsg-12 (Debian 12): usr/share/doc/opencv-doc/examples/data/"

#: name -> (photo, kind, (r0, r1, c0, c1)); kind: food, ceramic (plates) or table (backgrounds)
REGIONS: dict[str, tuple[str, str, tuple[int, int, int, int]]] = {
    "orange_peel": ("fruits.jpg", "food", (5, 60, 5, 70)),
    "orange_pulp": ("fruits.jpg", "food", (140, 200, 130, 190)),
    "red_cabbage": ("fruits.jpg", "food", (15, 80, 300, 420)),
    "lime_peel": ("fruits.jpg", "food", (150, 240, 370, 470)),
    "lemon_pulp": ("fruits.jpg", "food", (300, 370, 380, 450)),
    "kiwi_flesh": ("fruits.jpg", "food", (300, 350, 30, 75)),
    "banana": ("fruits.jpg", "food", (110, 220, 5, 70)),
    "apple_skin": ("apple.jpg", "food", (180, 330, 150, 320)),
    "orange_skin": ("orange.jpg", "food", (150, 330, 250, 400)),
    "coffee_crema": ("coffee", "food", (125, 180, 250, 330)),
    "white_ceramic": ("coffee", "ceramic", (30, 60, 240, 360)),
    "red_ceramic": ("coffee", "ceramic", (200, 260, 100, 150)),
    "wood_table": ("coffee", "table", (230, 390, 480, 595)),
}


def spectral_slope(lum: np.ndarray) -> float:
    """beta of P(f) ~ f^-beta for a luminance crop (Hann window, 2/size < f < 0.25 cycles/px)."""
    h, w = lum.shape
    win = np.outer(np.hanning(h), np.hanning(w))
    power = np.abs(np.fft.fft2((lum - lum.mean()) * win)) ** 2
    f = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :])
    band = (f > 2 / min(h, w)) & (f < 0.25)
    return float(-np.polyfit(np.log(f[band]), np.log(power[band]), 1)[0])


def region_stats(rgb: np.ndarray) -> dict[str, object]:
    """Colour mean/covariance in CIELAB, luminance spectral slope and contrast of one crop."""
    from skimage.color import rgb2lab

    lab = rgb2lab(rgb)
    flat = lab.reshape(-1, 3)
    return {
        "lab_mean": np.round(flat.mean(0), 3).tolist(),
        "lab_cov": np.round(np.cov(flat.T), 3).tolist(),
        "beta": round(spectral_slope(lab[..., 0]), 3),
        "l_std": round(float(lab[..., 0].std()), 3),
        "pixels": int(flat.shape[0]),
    }


def calibrate(opencv_data: Path) -> dict[str, object]:
    from PIL import Image
    from skimage import data as skdata

    photos: dict[str, np.ndarray] = {"coffee": skdata.coffee()}
    regions = {}
    for name, (photo, kind, (r0, r1, c0, c1)) in REGIONS.items():
        if photo not in photos:
            photos[photo] = np.asarray(Image.open(opencv_data / photo).convert("RGB"))
        source = "scikit-image 0.26: skimage.data.coffee()" if photo == "coffee" else OPENCV_DEB + photo
        regions[name] = {"kind": kind, "source": source, "box_rows_cols": [r0, r1, c0, c1],
                         **region_stats(photos[photo][r0:r1, c0:c1])}
    return {
        "format": FORMAT,
        "colour_space": "CIELAB D65 (skimage.color.rgb2lab)",
        "beta": "P(f) ~ f^-beta of L*, Hann window, least squares for 2/size < f < 0.25 cycles/px",
        "regions": regions,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("opencv_data", type=Path, help="the unpacked opencv-doc examples/data folder")
    parser.add_argument("--out", type=Path, default=STATS_FILE)
    args = parser.parse_args()
    stats = calibrate(args.opencv_data)
    regions = stats.pop("regions")
    head = json.dumps(stats, indent=1)[:-2]  # one region per line keeps the file readable and diffable
    lines = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in regions.items())
    args.out.write_text(f'{head},\n "regions": {{\n{lines}\n }}\n}}\n')
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
