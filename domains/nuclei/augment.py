"""Augmentations that carry a model across stains, scanners and magnifications, and stain normalisation.

Training tiles (``NucleiData(augment=True)``) go through, in this order:

1. one of the 8 flips / rotations (exact, HoVer maps transformed algebraically: :func:`dihedral`);
2. a zoom-in around the 40x nucleus size (crop a ``1/s`` window, resize back; labels by nearest
   neighbour, HoVer maps recomputed). Only ``s >= 1``: shrinking a tile would need invented
   tissue around it. Smaller-than-typical nuclei come from the generator, which draws each
   slide's magnification around the calibrated 40x size (``synth.py``);
3. HED stain jitter (Tellez et al., "Whole-slide mitosis detection in H&E breast histology using
   PHH3 as a reference to train distilled stain-invariant convolutional networks", IEEE TMI
   2018): each stain's concentration scaled by U(1 - h, 1 + h) and shifted by U(-h, h) in
   Ruifrok-Johnston HED space. Neither MONAI nor torchvision has it; it is five lines of
   Beer-Lambert algebra here (exact identity at h = 0, tested);
4. torchvision's ``ColorJitter`` (brightness, contrast, saturation, hue), ``GaussianBlur`` (focus)
   and ``JPEG`` (scanner compression), and additive Gaussian sensor noise, as HoVer-Net and
   CellViT train (their blur / noise / colour sets, magnitudes in :class:`AugmentConfig`).

Test-time stain normalisation: :class:`MacenkoNormalizer`, MONAI's ``NormalizeHEStains`` with
the stain order fixed (see there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from skimage.color import rgb_from_hed

#: Ruifrok-Johnston optical-density directions: rows haematoxylin, eosin, DAB (skimage.color)
HED_FROM_OD = np.linalg.inv(rgb_from_hed)


@dataclass
class AugmentConfig:
    """Magnitudes of the training augmentations (0 or p = 0 switches one off)."""

    zoom: tuple[float, float] = (1.0, 1.3)  # zoom-in factor range (log-uniform)
    p_zoom: float = 0.5
    hed: float = 0.08  # Tellez's sigma for scale and shift (0.05 "light", 0.2 "strong")
    brightness: float = 0.15
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.03
    blur_sigma: tuple[float, float] = (0.3, 1.5)
    p_blur: float = 0.3
    jpeg_quality: tuple[int, int] = (40, 95)
    p_jpeg: float = 0.3
    noise: float = 3.0  # std of additive Gaussian noise, in 0-255 grey levels
    p_noise: float = 0.3


def dihedral(k: int, inst: np.ndarray, types: np.ndarray, hv: np.ndarray, image: np.ndarray) -> tuple[np.ndarray, ...]:
    """Apply one of the 8 flips/rotations (``k`` in 0..7) to a tile and its targets.

    The HoVer maps are transformed algebraically rather than recomputed: a left-right flip
    negates the horizontal map, an up-down flip the vertical one, a transpose swaps them. This
    is exact because both maps are normalised per side of the centroid (tested).
    """
    if k & 1:  # transpose
        inst, types, image = inst.T, types.T, image.transpose(1, 0, 2)
        hv = hv[::-1].transpose(0, 2, 1)
    if k & 2:  # left-right
        inst, types, image = inst[:, ::-1], types[:, ::-1], image[:, ::-1]
        hv = hv[:, :, ::-1] * np.array([-1, 1], np.float32)[:, None, None]
    if k & 4:  # up-down
        inst, types, image = inst[::-1], types[::-1], image[::-1]
        hv = hv[:, ::-1] * np.array([1, -1], np.float32)[:, None, None]
    return tuple(np.ascontiguousarray(a) for a in (inst, types, hv, image))


def zoom(image: np.ndarray, inst: np.ndarray, types: np.ndarray, scale: float, top: float, left: float) -> tuple[np.ndarray, ...]:
    """Crop a ``1/scale`` window at relative position (top, left) in [0, 1] and resize it back to the tile.

    The image is resized bilinearly, the label maps by nearest neighbour (ids stay ids).
    """
    h, w = inst.shape
    ch, cw = max(1, round(h / scale)), max(1, round(w / scale))
    r0, c0 = round(top * (h - ch)), round(left * (w - cw))
    crop = lambda a: a[r0 : r0 + ch, c0 : c0 + cw]  # noqa: E731
    img = torch.from_numpy(np.ascontiguousarray(crop(image))).permute(2, 0, 1)[None].float()
    img = F.interpolate(img, size=(h, w), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    labels = torch.from_numpy(np.stack([crop(inst), crop(types)]).astype(np.int64))[None].float()
    labels = F.interpolate(labels, size=(h, w), mode="nearest")[0].long().numpy()
    return img.round().clamp(0, 255).byte().numpy(), labels[0].astype(inst.dtype), labels[1].astype(types.dtype)


def hed_jitter(image: np.ndarray, alpha: Sequence[float], beta: Sequence[float]) -> np.ndarray:
    """Scale (``alpha``) and shift (``beta``) the H, E, D concentrations of a uint8 RGB tile (Beer-Lambert, I0 = 256)."""
    od = -np.log10((image.astype(np.float64) + 1) / 256)
    conc = od @ HED_FROM_OD
    conc = conc * np.asarray(alpha) + np.asarray(beta)
    rgb = 256 * 10 ** (-(conc @ rgb_from_hed)) - 1
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


class Photometric:
    """Stain, colour, focus, compression and noise augmentation of one uint8 RGB tile (torch's RNG)."""

    def __init__(self, config: AugmentConfig | None = None) -> None:
        from torchvision.transforms import v2

        self.c = c = config or AugmentConfig()
        self.colour = v2.ColorJitter(brightness=c.brightness, contrast=c.contrast, saturation=c.saturation, hue=c.hue)
        self.blur = v2.GaussianBlur(kernel_size=7, sigma=c.blur_sigma)
        self.jpeg = v2.JPEG(quality=list(c.jpeg_quality))

    def _u(self, lo: float, hi: float, n: int = 1) -> np.ndarray:
        return (lo + (hi - lo) * torch.rand(n, dtype=torch.float64)).numpy()

    def __call__(self, image: np.ndarray) -> np.ndarray:
        c = self.c
        if c.hed > 0:
            image = hed_jitter(image, self._u(1 - c.hed, 1 + c.hed, 3), self._u(-c.hed, c.hed, 3))
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        x = self.colour(x)
        if torch.rand(()) < c.p_blur:
            x = self.blur(x)
        if torch.rand(()) < c.p_jpeg:
            x = self.jpeg(x)
        if c.noise > 0 and torch.rand(()) < c.p_noise:
            x = (x.float() + c.noise * torch.randn(x.shape)).round().clamp(0, 255).byte()
        return x.permute(1, 2, 0).numpy()


class MacenkoNormalizer:
    """Macenko stain normalisation to a reference stain matrix, through MONAI's ``NormalizeHEStains``.

    MONAI 1.6.1's ``ExtractHEStains`` puts the vector with the lower red/blue ratio first, reading
    optical-density vectors as if they were colours; in optical density haematoxylin has the
    higher ratio (Ruifrok-Johnston: 0.65 / 0.29 against eosin's 0.07 / 0.11), so on real H&E its
    "haematoxylin" column is the one that is *not* concentrated in nuclei (measured on the
    benchmark's real tiles), so normalisation swaps the stains. Fixed here as in Macenko's
    reference code (mitkovetta/staining-normalization, schaugf/HEnorm_python): haematoxylin is
    the vector with the larger red optical density (Ruifrok-Johnston: 0.65 vs 0.07).

    Args:
        target_he: reference stain matrix, rows haematoxylin and eosin unit OD vectors (2, 3).
        max_cref: reference 99th-percentile concentrations of H and E.
    """

    def __init__(self, target_he: Sequence[Sequence[float]], max_cref: Sequence[float], tli: float = 240) -> None:
        from monai.apps.pathology.transforms.stain.array import ExtractHEStains, NormalizeHEStains

        class _Ordered(ExtractHEStains):
            def __call__(self, image: np.ndarray) -> np.ndarray:
                return order_stains(super().__call__(image))

        self.norm = NormalizeHEStains(tli=tli, target_he=np.asarray(target_he, np.float64).T, max_cref=max_cref)
        self.norm.stain_extractor = _Ordered(tli=tli, max_cref=max_cref)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        try:
            return self.norm(np.ascontiguousarray(image))
        except ValueError:  # a tile of blank glass has no stain to estimate: leave it as it is
            return image


def order_stains(he: np.ndarray) -> np.ndarray:
    """Columns (H, E) of a (3, 2) Macenko stain matrix, haematoxylin = larger red optical density."""
    return he if he[0, 0] >= he[0, 1] else he[:, ::-1].copy()


def macenko_stains(image: np.ndarray, tli: float = 240) -> np.ndarray:
    """(2, 3) unit OD vectors (haematoxylin, eosin) of an RGB tile by Macenko's method (MONAI, order fixed)."""
    from monai.apps.pathology.transforms.stain.array import ExtractHEStains

    he = order_stains(ExtractHEStains(tli=tli)(np.ascontiguousarray(image))).T.astype(np.float64)
    he = np.abs(he)  # eigenvector signs are arbitrary; OD vectors are non-negative
    return he / np.linalg.norm(he, axis=1, keepdims=True)
