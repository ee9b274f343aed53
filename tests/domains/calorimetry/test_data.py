"""Calorimetry data, tokens and metrics: the CaloChallenge reader on files in that exact layout,
the generator's physics, the tokeniser bug fixes, and the observables / separation measures
against closed forms."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch

from domains.calorimetry.data import CaloShowerData, Geometry, read_calochallenge, shower_hits
from domains.calorimetry.synth import MATERIALS, simulate_showers
from domains.calorimetry.metrics import binned_kl, compare, lateral_profile, longitudinal_profile, separation_power, shower_observables
from domains.calorimetry.tokens import ShowerTokenizer

GEO = Geometry((8, 6, 6), 10.0, 7.0)


def _write_raw(path, incident, showers) -> None:
    """The CaloChallenge layout written with h5py directly, not with our writer."""
    with h5py.File(path, "w") as f:
        f.create_dataset("incident_energies", data=incident)
        f.create_dataset("showers", data=showers)


# --- reader -----------------------------------------------------------------------------------
def test_reader_reads_the_calochallenge_layout(tmp_path) -> None:
    rng = np.random.default_rng(0)
    showers = rng.exponential(40.0, (5, GEO.n_voxels)).astype(np.float32) * (rng.random((5, GEO.n_voxels)) < 0.2)
    inc = np.array([[1.0e4], [2.0e4], [3.0e4], [5.0e4], [9.0e4]], dtype=np.float32)
    _write_raw(tmp_path / "dataset_2_1.hdf5", inc, showers)
    e, s = read_calochallenge(tmp_path / "dataset_2_1.hdf5", GEO.n_voxels)
    assert e.shape == (5,) and np.allclose(e, inc[:, 0])
    assert np.array_equal(s, showers)


@pytest.mark.parametrize(
    "incident, showers, message",
    [
        (np.ones(3), np.ones((3, 288)), "'incident_energies' has shape \\(3,\\), expected \\(N, 1\\)"),
        (np.ones((3, 1)), np.ones((3, 100)), "'showers' has shape \\(3, 100\\), expected \\(3, 288\\)"),
        (np.ones((3, 1)), -np.ones((3, 288)), "'showers' must be finite and >= 0"),
        (np.zeros((3, 1)), np.ones((3, 288)), "'incident_energies' must be finite and > 0"),
    ],
)
def test_reader_rejects_wrong_layouts_naming_file_and_field(tmp_path, incident, showers, message) -> None:
    path = tmp_path / "bad.hdf5"
    _write_raw(path, incident, showers)
    with pytest.raises(ValueError, match=message) as err:
        read_calochallenge(path, 288)
    assert "bad.hdf5" in str(err.value)


def test_reader_names_a_missing_dataset(tmp_path) -> None:
    with h5py.File(tmp_path / "x.hdf5", "w") as f:
        f.create_dataset("showers", data=np.ones((2, 288)))
    with pytest.raises(KeyError, match="missing dataset 'incident_energies'"):
        read_calochallenge(tmp_path / "x.hdf5", 288)


def test_datamodule_serves_real_files_as_energy_ordered_hits(tmp_path) -> None:
    rng = np.random.default_rng(1)
    showers = (rng.exponential(200.0, (20, GEO.n_voxels)) * (rng.random((20, GEO.n_voxels)) < 0.1)).astype(np.float32)
    _write_raw(tmp_path / "w.hdf5", np.full((20, 1), 5.0e4, np.float32), showers)
    dm = CaloShowerData(classes=["W_photon"], files={"W_photon": str(tmp_path / "w.hdf5")}, grid=[8, 6, 6],
                        threshold_mev=50.0, max_hits=128, batch_size=4)
    dm.setup()
    assert sum(len(dm.splits[s]) for s in ("train", "val", "test")) == 20
    batch = next(iter(dm.train_dataloader()))
    for b in range(4):
        n = int(batch["n_hits"][b])
        e = batch["energies"][b, :n]
        assert (e[:-1] >= e[1:]).all() and (e >= 50.0).all()
        assert (batch["voxels"][b, n:] == -1).all()
    assert dm.cut_report["W_photon"]["showers_over_max_hits"] == 0
    assert set(dm.split_hashes) == {"train", "val", "test"}


# --- generator --------------------------------------------------------------------------------
def test_material_constants_reproduce_pdg_moliere_radii() -> None:
    tabulated_mm = {"W": 9.327, "Pb": 16.02, "Fe": 17.19, "Cu": 15.66}  # PDG tables
    for name, rm in tabulated_mm.items():
        assert MATERIALS[name].RM_mm == pytest.approx(rm, rel=5e-3)
    assert MATERIALS["W"].X0_mm < MATERIALS["Ta"].X0_mm < MATERIALS["Pb"].X0_mm


def test_generator_is_seeded_and_writes_calochallenge_files(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SUITE_DATA_DIR", str(tmp_path))
    e = np.array([20.0, 60.0])
    a, b = simulate_showers("W", "photon", e, GEO, seed=3), simulate_showers("W", "photon", e, GEO, seed=3)
    assert np.array_equal(a, b) and not np.array_equal(a, simulate_showers("W", "photon", e, GEO, seed=4))
    dm = CaloShowerData(classes=["Pb_electron"], n_per_class=12, grid=[8, 6, 6], threshold_mev=50.0)
    inc, showers = read_calochallenge(dm.class_file("Pb_electron"), GEO.n_voxels)
    assert showers.shape == (12, 288) and ((inc >= 1e4) & (inc <= 1e5)).all()
    assert dm.class_file("Pb_electron").parent == tmp_path / "generated" / "calorimetry"


def _mean_obs(material: str, particle: str, energy_gev: float, n: int = 120, geo: Geometry = GEO) -> dict[str, float]:
    s = simulate_showers(material, particle, np.full(n, energy_gev), geo, seed=11)
    obs = shower_observables(s, np.full(n, energy_gev * 1e3), geo)
    return {k: float(np.nanmean(v)) for k, v in obs.items()}


def test_generator_physics_depth_start_and_width() -> None:
    w_lo, w_hi = _mean_obs("W", "photon", 12.0), _mean_obs("W", "photon", 90.0)
    # GFlash/PDG: t_max = ln(E / E_c) + C grows with log energy: ~ln(7.5) X0 = 2.0 X0 = 0.7 layer here
    assert 0.3 < w_hi["z_centroid"] - w_lo["z_centroid"] < 1.2
    # electrons shower from the front face; photons first convert (mean 9/7 X0 = 4.5 mm of W)
    e_el = _mean_obs("W", "electron", 50.0)
    e_ph = _mean_obs("W", "photon", 50.0)
    assert 0.2 < e_ph["z_centroid"] - e_el["z_centroid"] < 0.8
    # Pb: longer X0 (deeper, in mm) and a wider Moliere radius (16.0 vs 9.3 mm) than W; the
    # lateral check uses 2 mm cells so that the W core is resolved
    pb = _mean_obs("Pb", "photon", 50.0)
    assert pb["z_centroid"] > e_ph["z_centroid"] + 1.0
    fine = Geometry((12, 48, 48), 10.0, 2.0)
    w_r, pb_r = (_mean_obs(m, "photon", 50.0, 60, fine)["r_mean"] for m in ("W", "Pb"))
    assert 1.3 < pb_r / w_r < 1.8


def test_generator_sampling_term_in_a_containing_detector() -> None:
    """With no leakage, sigma(E_dep)/E_dep = a / sqrt(E) (a = 10 %): the spot-count Poisson and
    Gamma(4) spot energies are tuned for exactly that."""
    big = Geometry((40, 30, 30), 10.0, 10.0)  # 114 X0 deep, +-16 Moliere radii of W
    for energy in (10.0, 40.0):
        s = simulate_showers("W", "electron", np.full(300, energy), big, seed=5, sampling_term=0.10)
        ratio = s.sum(1) / (energy * 1e3)
        assert ratio.mean() == pytest.approx(1.0, abs=0.01)
        assert ratio.std() == pytest.approx(0.10 / math.sqrt(energy), rel=0.15)


# --- tokens -------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", ["log", "linear"])
def test_detokenised_energy_lies_in_its_own_bin(spacing) -> None:
    tok = ShowerTokenizer(288, 50.0, 1.2e5, 64, spacing)
    e = torch.exp(torch.empty(2000, dtype=torch.float64).uniform_(math.log(50.0), math.log(1.19e5)))
    t = tok.energy_tokens(e, torch.ones_like(e, dtype=torch.bool))
    for dec in (tok.energies(t), tok.energies(t, torch.Generator().manual_seed(0))):
        d = dec.double()
        assert (tok.edges[t - 1] <= d * (1 + 1e-6)).all() and (d < tok.edges[t] * (1 + 1e-6)).all()
        assert torch.equal(tok.energy_tokens(d.clamp(max=1.19e5), torch.ones_like(t, dtype=torch.bool)), t)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_detokenisation_draws_with_a_generator_on_the_tokens_device() -> None:
    """Test-time generation samples with a generator on the model's device, also inside the bins."""
    tok = ShowerTokenizer(288, 50.0, 1.2e5, 64)
    t = torch.randint(1, 65, (4, 10), device="cuda")
    e = tok.energies(t, torch.Generator(device="cuda").manual_seed(0))
    assert e.device.type == "cuda" and torch.equal(tok.energy_tokens(e, torch.ones_like(t, dtype=torch.bool)), t)


def test_reference_detokenisation_was_one_bin_too_high() -> None:
    """FM4CAL: token = np.digitize(e, arange(e_min, e_max + res, res)) + 1 and decode
    e_min + (token - 1 + 0.5) res lands in the bin above e; ours decodes inside e's bin."""
    e_min, e_max, res = 0.0, 100.0, 1.0
    e = np.random.default_rng(0).uniform(e_min, e_max - res, 500)
    ref_token = np.digitize(e, np.arange(e_min, e_max + res, res)) + 1
    ref_decoded = e_min + (ref_token - 1 + 0.5) * res
    assert (np.floor(ref_decoded) == np.floor(e) + 1).all()  # the bug, reproduced
    tok = ShowerTokenizer(10, e_min + 1e-9, e_max, int((e_max - e_min) / res), "linear")
    ours = tok.energies(tok.energy_tokens(torch.as_tensor(e), torch.ones(len(e), dtype=torch.bool))).numpy()
    assert (np.floor(ours) == np.floor(e)).all()


@pytest.mark.parametrize("cls", ["W_photon", "Ta_electron", "Pb_electron", "Pb_photon"])
def test_hits_decode_to_their_own_voxels_for_every_class(cls) -> None:
    """No per-class hit shifts (the reference moved Ta/Pb electron hits by fixed offsets)."""
    material, particle = cls.split("_")
    shower = simulate_showers(material, particle, np.array([50.0]), GEO, seed=2)[0]
    v, e = shower_hits(shower, 50.0)
    tok = ShowerTokenizer(GEO.n_voxels, 50.0, 1.2e5, 64)
    space = tok.space_tokens(torch.as_tensor(v)[None])
    energy = tok.energy_tokens(torch.as_tensor(e)[None], torch.ones(1, len(v), dtype=torch.bool))
    dense = tok.dense(space, energy)[0].numpy()
    assert np.array_equal(np.flatnonzero(dense), np.sort(v))
    assert np.allclose(dense[v], e, rtol=0.14)  # within one ~13 % log bin


def test_tokeniser_rejects_out_of_range_inputs() -> None:
    tok = ShowerTokenizer(288, 50.0, 1.2e5, 64)
    with pytest.raises(ValueError, match="outside the energy range"):
        tok.energy_tokens(torch.tensor([10.0]), torch.tensor([True]))
    with pytest.raises(ValueError, match="outside the 288-voxel grid"):
        tok.space_tokens(torch.tensor([288]))


# --- metrics ------------------------------------------------------------------------------------
def test_separation_power_and_kl_closed_forms() -> None:
    assert separation_power(np.array([3, 1, 0]), np.array([6, 2, 0])) == 0.0
    assert separation_power(np.array([1, 0]), np.array([0, 5])) == pytest.approx(1.0)
    # 0.5 * ((1 - .5)^2 / 1.5 + (0 - .5)^2 / .5) = 1/3
    assert separation_power(np.array([1.0, 0.0]), np.array([0.5, 0.5])) == pytest.approx(1 / 3)
    assert binned_kl(np.array([1, 1]), np.array([1, 3])) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), abs=1e-5)
    assert binned_kl(np.array([2, 5, 1]), np.array([4, 10, 2])) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="empty histogram"):
        separation_power(np.zeros(3), np.ones(3))


def test_observables_of_hand_made_showers() -> None:
    pos = GEO.voxel_positions()
    s = np.zeros((2, GEO.n_voxels))
    s[0, 100] = 500.0  # one voxel
    left = np.flatnonzero((pos[:, 0] == 3) & np.isclose(pos[:, 1], -3.5) & np.isclose(pos[:, 2], 3.5))[0]
    right = np.flatnonzero((pos[:, 0] == 5) & np.isclose(pos[:, 1], 3.5) & np.isclose(pos[:, 2], 3.5))[0]
    s[1, [left, right]] = 1000.0
    obs = shower_observables(s, np.array([1000.0, 4000.0]), GEO)
    assert obs["e_ratio"].tolist() == [0.5, 0.5] and obs["n_hits"].tolist() == [1, 2]
    assert obs["z_centroid"][0] == pos[100, 0] and obs["x_centroid"][0] == pos[100, 1] and obs["x_width"][0] == 0.0
    assert obs["z_centroid"][1] == 4.0 and obs["z_width"][1] == 1.0
    assert obs["x_centroid"][1] == 0.0 and obs["x_width"][1] == pytest.approx(3.5) and obs["y_width"][1] == 0.0
    assert longitudinal_profile(s, GEO).sum() == pytest.approx(s.sum())
    assert lateral_profile(s, GEO, np.array([0.0, 5.0, 100.0])).sum() == pytest.approx(s.sum())
    empty = shower_observables(np.zeros((1, GEO.n_voxels)), np.array([1.0]), GEO)
    assert np.isnan(empty["z_centroid"][0])


def test_compare_separates_materials_and_not_a_sample_from_itself() -> None:
    e = np.full(150, 50.0)
    w = simulate_showers("W", "photon", e, GEO, seed=1)
    w2 = simulate_showers("W", "photon", e, GEO, seed=2)
    pb = simulate_showers("Pb", "photon", e, GEO, seed=1)
    same = compare(w, w, e * 1e3, e * 1e3, GEO)
    assert same["sep_mean"] == 0.0 and same["kl_mean"] == pytest.approx(0.0, abs=1e-9)
    twins = compare(w, w2, e * 1e3, e * 1e3, GEO)
    apart = compare(w, pb, e * 1e3, e * 1e3, GEO)
    assert twins["sep_mean"] < 0.1 < apart["sep_mean"]
    assert twins["auc"] < 0.75 and apart["auc"] > 0.95
