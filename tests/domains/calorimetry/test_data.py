"""Calorimetry data, tokens and metrics: the CaloChallenge and FM4CAL readers on files in those
exact layouts, the geometry against CaloChallenge's XMLHandler logic, energy-unit detection, the
generator's physics, the tokeniser bug fixes, and the observables / separation measures against
closed forms."""

from __future__ import annotations

import math
import warnings

import h5py
import numpy as np
import pytest
import torch

from domains.calorimetry.data import (
    CaloFormatError,
    CaloShowerData,
    CaloUnitWarning,
    Geometry,
    ShowerTokenizer,
    read_binning_xml,
    read_calochallenge,
    read_showers,
    read_sparse_showers,
    reference_class_name,
    shower_hits,
    sparse_hits,
    write_calochallenge,
    write_sparse_showers,
)
from domains.calorimetry.metrics import (
    binned_kl,
    compare,
    lateral_profile,
    longitudinal_profile,
    separation_power,
    shower_observables,
)
from domains.calorimetry.synth import MATERIALS, simulate_showers
from suite.data import DataFormatError

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
        (np.ones(3), np.ones((3, 288)), "field 'incident_energies': expected shape \\(N, 1\\); found shape \\(3,\\)"),
        (np.ones((3, 1)), np.ones((3, 100)), "field 'showers': expected shape \\(3, 288\\) for this geometry; found shape \\(3, 100\\)"),
        (np.ones((3, 1)), -np.ones((3, 288)), "field 'showers': expected finite values >= 0 MeV; found 864 bad values"),
        (np.zeros((3, 1)), np.ones((3, 288)), "field 'incident_energies': expected finite values > 0 MeV"),
    ],
)
def test_reader_rejects_wrong_layouts_naming_file_and_field(tmp_path, incident, showers, message) -> None:
    path = tmp_path / "bad.hdf5"
    _write_raw(path, incident, showers)
    with pytest.raises(CaloFormatError, match=message) as err:
        read_calochallenge(path, 288)
    assert "bad.hdf5" in str(err.value) and isinstance(err.value, DataFormatError) and isinstance(err.value, ValueError)


def test_reader_names_a_missing_dataset(tmp_path) -> None:
    with h5py.File(tmp_path / "x.hdf5", "w") as f:
        f.create_dataset("showers", data=np.ones((2, 288)))
    with pytest.raises(CaloFormatError, match="x.hdf5: field 'incident_energies': expected datasets 'incident_energies'.*found keys \\['showers'\\]"):
        read_calochallenge(tmp_path / "x.hdf5", 288)


def test_reader_names_truncated_files_and_wrong_dtypes(tmp_path) -> None:
    path = tmp_path / "t.hdf5"
    write_calochallenge(path, np.full(4, 2e4), np.ones((4, 288)))
    path.write_bytes(path.read_bytes()[:900])
    with pytest.raises(CaloFormatError, match="t.hdf5: field 'file': expected a readable HDF5 object"):
        read_calochallenge(path, 288)
    with h5py.File(tmp_path / "s.hdf5", "w") as f:
        f.create_dataset("incident_energies", data=np.full((2, 1), 2e4))
        f.create_dataset("showers", data=np.full((2, 288), b"x"))
    with pytest.raises(CaloFormatError, match="s.hdf5: field 'showers': expected an \\(N, 288\\) array of real numbers; found dtype \\|S1"):
        read_calochallenge(tmp_path / "s.hdf5", 288)


def test_energies_in_gev_are_detected_by_range_converted_and_warned(tmp_path) -> None:
    rng = np.random.default_rng(3)
    showers_mev = rng.exponential(30.0, (6, 288)).astype(np.float32)
    inc_mev = showers_mev.sum(1) * 1.05  # a containing calorimeter: deposits just below the incident energy
    cases = {
        "inc_gev.hdf5": (inc_mev / 1e3, showers_mev, "'incident_energies' look like GeV"),
        "both_gev.hdf5": (inc_mev / 1e3, showers_mev / 1e3, "'incident_energies' and 'showers' look like GeV"),
    }
    for name, (inc, showers, message) in cases.items():
        _write_raw(tmp_path / name, inc.reshape(-1, 1), showers)
        with pytest.warns(CaloUnitWarning, match=f"{name}: {message}"):
            e, s = read_calochallenge(tmp_path / name, 288)
        assert np.allclose(e, inc_mev, rtol=1e-6) and np.allclose(s, showers_mev, rtol=1e-5)
    _write_raw(tmp_path / "mev.hdf5", inc_mev.reshape(-1, 1), showers_mev)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file in MeV converts nothing and warns about nothing
        e, s = read_calochallenge(tmp_path / "mev.hdf5", 288)
        assert np.allclose(e, inc_mev) and np.array_equal(s, showers_mev)
        e, _ = read_calochallenge(tmp_path / "inc_gev.hdf5", 288, energy_unit="MeV")  # an explicit unit is trusted
        assert np.allclose(e, inc_mev / 1e3)


# --- FM4CAL's sparse layout ------------------------------------------------------------------------
def _write_fm4cal(path, incident_gev, showers, material="G4_W_gamma", grid=(8, 6, 6)) -> None:
    """FM4CAL's utils.compress_hdf5 layout written with h5py directly (plus the material its loader reads)."""
    with h5py.File(path, "w") as f:
        for i, (e0, shower) in enumerate(zip(incident_gev, showers)):
            dense = shower.reshape(grid)
            g = f.create_group(f"{i}")
            g.create_dataset("indices", data=np.argwhere(dense != 0), compression="gzip")
            g.create_dataset("values", data=dense[dense != 0], compression="gzip")
            g.attrs["shape"] = dense.shape
            g.attrs["initial_energy"] = e0
            g.create_dataset("material", data=material.encode())


def test_sparse_reader_reads_fm4cal_groups_in_numeric_order(tmp_path) -> None:
    rng = np.random.default_rng(4)
    showers = (rng.exponential(80.0, (12, 288)) * (rng.random((12, 288)) < 0.15)).astype(np.float32)
    showers[5] = 0.0  # an event without hits is kept, as an empty shower
    inc = np.linspace(10.0, 100.0, 12)
    _write_fm4cal(tmp_path / "w.h5", inc, showers)
    f = read_sparse_showers(tmp_path / "w.h5", (8, 6, 6))
    assert np.allclose(f.incident_mev, inc * 1e3) and np.array_equal(f.dense(), showers)  # "10" after "9", not after "1"
    assert f.materials == ["G4_W_gamma"] * 12 and reference_class_name(f.materials[0]) == "W_photon"
    assert np.array_equal(read_showers(tmp_path / "w.h5", (8, 6, 6)).dense(), showers)  # the layout is detected
    v, e = sparse_hits(f.voxels[0], f.energies[0], 50.0)
    assert all(np.array_equal(a, b) for a, b in zip((v, e), shower_hits(showers[0], 50.0)))
    write_sparse_showers(tmp_path / "ours.h5", inc, showers, (8, 6, 6), "G4_W_gamma")
    assert np.array_equal(read_sparse_showers(tmp_path / "ours.h5", (8, 6, 6)).dense(), showers)
    assert [reference_class_name(m) for m in ("G4_Ta_e-", "G4_Pb_gamma", "G4_Fe_pi-")] == ["Ta_electron", "Pb_photon", "Fe_pion"]


def test_sparse_reader_names_the_event_and_field_of_bad_input(tmp_path) -> None:
    good = np.zeros((2, 288), np.float32)
    good[:, :3] = 20.0
    _write_fm4cal(tmp_path / "a.h5", [50.0, 60.0], good)
    with h5py.File(tmp_path / "a.h5", "a") as f:
        del f["1/values"]
        f["1"].create_dataset("values", data=np.array([1.0, np.nan, 2.0]))
    with pytest.raises(CaloFormatError, match="a.h5: field '1/values': expected finite values >= 0 MeV"):
        read_sparse_showers(tmp_path / "a.h5", (8, 6, 6))
    _write_fm4cal(tmp_path / "b.h5", [50.0], good[:1], grid=(8, 6, 6))
    with pytest.raises(CaloFormatError, match="b.h5: field '0.attrs.shape': expected the geometry's grid \\(4, 12, 6\\)"):
        read_sparse_showers(tmp_path / "b.h5", (4, 12, 6))
    with pytest.warns(CaloUnitWarning, match="implausible in GeV"):
        _write_fm4cal(tmp_path / "c.h5", [5.0e4], good[:1])
        assert read_sparse_showers(tmp_path / "c.h5", (8, 6, 6), incident_unit="auto").incident_mev[0] == 5.0e4


def test_datamodule_reads_fm4cal_files_and_refuses_another_material(tmp_path) -> None:
    rng = np.random.default_rng(5)
    showers = (rng.exponential(200.0, (20, 288)) * (rng.random((20, 288)) < 0.1)).astype(np.float32)
    _write_fm4cal(tmp_path / "w.h5", np.full(20, 50.0), showers)
    dm = CaloShowerData(classes=["W_photon"], files={"W_photon": str(tmp_path / "w.h5")}, grid=[8, 6, 6], threshold_mev=50.0, max_hits=128)
    dm.setup()
    assert sum(len(dm.splits[s]) for s in ("train", "val", "test")) == 20
    # FM4CAL keeps a class in many files: a list is read in order (here beside a CaloChallenge file)
    _write_raw(tmp_path / "w.hdf5", np.full((10, 1), 5.0e4, np.float32), showers[:10])
    dm = CaloShowerData(classes=["W_photon"], files={"W_photon": [str(tmp_path / "w.h5"), str(tmp_path / "w.hdf5")]},
                        grid=[8, 6, 6], threshold_mev=50.0, max_hits=128)
    loaded = dm.load_class("W_photon")
    assert len(loaded) == 30 and np.array_equal(loaded.dense(), np.concatenate([showers, showers[:10]]))
    assert "+" in dm.data_hashes["W_photon"]
    dm = CaloShowerData(classes=["Ta_photon"], files={"Ta_photon": str(tmp_path / "w.h5")}, grid=[8, 6, 6], threshold_mev=50.0)
    with pytest.raises(CaloFormatError, match="w.h5: field 'material': expected only events of class Ta_photon; found materials \\['G4_W_gamma'\\]"):
        dm.setup()


# --- the geometry against CaloChallenge's XMLHandler ----------------------------------------------------
def _binning_xml(path, layers, name="electron", pid=11) -> None:
    """A binning file in the layout of CaloChallenge's binning_dataset_*.xml."""
    rows = "\n".join(f'      <Layer id="{i}" r_edges="{",".join(map(str, r))}" n_bin_alpha="{a}" />' for i, (r, a) in enumerate(layers))
    path.write_text(f'<Bins>\n   <Bin pid="{pid}" name="{name}">\n{rows}\n   </Bin>\n</Bins>\n')


def _xmlhandler_positions(layers) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """CaloChallenge's XMLHandler, step by step: per layer, for each angular bin j, for each radial
    bin i, (r_mid[i], alpha_mid[j]) with alpha midpoints of linspace(-pi, pi, n_alpha + 1);
    eta = r cos(alpha), phi = r sin(alpha); bin_edges accumulate the layers' voxel counts."""
    etas, phis, bin_edges = [], [], [0]
    for r_edges, n_alpha in layers:
        mids = [r_edges[i] + (r_edges[i + 1] - r_edges[i]) / 2 for i in range(len(r_edges) - 1)]
        a_edges = np.linspace(-math.pi, math.pi, n_alpha + 1)
        alphas = [a_edges[j] + (a_edges[j + 1] - a_edges[j]) / 2 for j in range(n_alpha)]
        r_list, a_list = [], []
        if len(r_edges) > 1:
            for j in range(n_alpha):
                for i in range(len(mids)):
                    r_list.append(mids[i])
                    a_list.append(alphas[j])
        etas.append(np.array(r_list) * np.cos(a_list))
        phis.append(np.array(r_list) * np.sin(a_list))
        bin_edges.append(bin_edges[-1] + len(r_list))
    return etas, phis, bin_edges


DS2_R = [0, 4.65, 9.3, 13.95, 18.6, 23.25, 27.9, 32.55, 37.2, 41.85]  # CaloChallenge dataset 2's radial edges [mm]
DS1_LIKE = [([0, 5, 10, 30], 1), ([0, 2, 4, 6, 8], 10), ([0], 1), ([0, 50, 100], 1), ([0], 1), ([0, 100, 400], 3)]


@pytest.mark.parametrize("layers", [[(DS2_R, 16)] * 45, [([0, 2.325, 4.65, 6.975], 50)] * 4, DS1_LIKE], ids=["dataset2", "dataset3-like", "dataset1-like"])
def test_geometry_from_binning_xml_matches_xmlhandler(tmp_path, layers) -> None:
    _binning_xml(tmp_path / "binning.xml", layers)
    geo = read_binning_xml(tmp_path / "binning.xml")
    etas, phis, bin_edges = _xmlhandler_positions(layers)
    pos = geo.voxel_positions()
    relevant = [i for i, (r, _) in enumerate(layers) if len(r) > 1]
    assert geo.n_voxels == bin_edges[-1] and geo.n_layers == len(relevant)
    for k, layer in enumerate(relevant):  # CaloChallenge's "relevant layers" keep their order
        rows = slice(bin_edges[layer], bin_edges[layer + 1])
        assert np.allclose(pos[rows, 1], etas[layer], atol=1e-9) and np.allclose(pos[rows, 2], phis[layer], atol=1e-9)
        assert (pos[rows, 0] == k).all()
    # HighLevelFeatures' E_layers and per-layer centre of energy, from the same shower
    shower = np.random.default_rng(0).exponential(1.0, (2, geo.n_voxels))
    from domains.calorimetry.metrics import longitudinal_profile

    profile = longitudinal_profile(shower, geo)
    for k, layer in enumerate(relevant):
        e = shower[:, bin_edges[layer] : bin_edges[layer + 1]]
        assert np.allclose(profile[:, k], e.sum(-1))
        ec_eta = (etas[layer] * e).sum(-1) / (e.sum(-1) + 1e-16)
        sel = pos[:, 0] == k
        assert np.allclose((pos[sel, 1] * shower[:, sel]).sum(-1) / shower[:, sel].sum(-1), ec_eta)
    if layers[0][0] == DS2_R:
        assert geo.grid == (45, 16, 9) and geo.kind == "cylindrical"
        assert pos[0, 1] < 0 and pos[0, 2] < 0  # angle origin -pi: the first angular bin lies at -pi + pi/16, not at +pi/16


def test_binning_xml_picks_its_bin_and_names_bad_files(tmp_path) -> None:
    path = tmp_path / "two.xml"
    path.write_text('<Bins><Bin name="photon"><Layer id="0" r_edges="0,5,10" n_bin_alpha="1"/></Bin>'
                    '<Bin name="pion"><Layer id="0" r_edges="0,5" n_bin_alpha="2"/></Bin></Bins>')
    assert read_binning_xml(path, "photon").grid == (1, 1, 2) and read_binning_xml(path, "pion").n_voxels == 2
    with pytest.raises(CaloFormatError, match="two.xml: field 'Bin': expected exactly one <Bin>.*found Bin names \\['photon', 'pion'\\]"):
        read_binning_xml(path)
    bad = tmp_path / "bad.xml"
    bad.write_text('<Bins><Bin name="photon"><Layer id="0" r_edges="0,5,x" n_bin_alpha="1"/></Bin></Bins>')
    with pytest.raises(CaloFormatError, match="bad.xml: field 'Layer 0': expected r_edges"):
        read_binning_xml(bad)
    bad.write_text("<Bins><Bin")
    with pytest.raises(CaloFormatError, match="bad.xml: field 'XML': expected <Bins>"):
        read_binning_xml(bad)


def test_datamodule_takes_the_geometry_from_the_binning_xml_and_reads_pion_classes(tmp_path) -> None:
    layers = [([0, 5, 10, 30], 1), ([0, 2, 4, 6, 8], 10), ([0], 1), ([0, 50, 100], 1)]
    _binning_xml(tmp_path / "binning_dataset_1_pions.xml", layers, name="pion", pid=211)
    n = 3 + 40 + 2
    rng = np.random.default_rng(6)
    showers = (rng.exponential(300.0, (20, n)) * (rng.random((20, n)) < 0.5)).astype(np.float32)
    _write_raw(tmp_path / "pions.hdf5", np.full((20, 1), 6.5e4, np.float32), showers)
    kw = dict(classes=["ATLAS_pion"], files={"ATLAS_pion": str(tmp_path / "pions.hdf5")}, binning_xml=str(tmp_path / "binning_dataset_1_pions.xml"),
              threshold_mev=50.0, max_hits=64)
    dm = CaloShowerData(grid=[1, 1, n], **kw)
    dm.setup()
    assert dm.geometry.n_layers == 3 and dm.geometry.kind == "cylindrical" and len(dm.splits["train"]) == 14
    with pytest.raises(ValueError, match="grid \\[45, 16, 9\\] does not match .*\\[1, 1, 45\\]"):
        CaloShowerData(grid=[45, 16, 9], **kw)
    with pytest.raises(ValueError, match="electromagnetic showers"):
        CaloShowerData(classes=["W_pion"], grid=[8, 6, 6]).setup()


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
    """FM4CAL's EnergyTokenizer: token t = np.digitize(e, arange(e_min, e_max + res, res)) (already
    1-based) and de_tokenize(t) = e_min + (t + 0.5) res +- res / 2, which lies in the bin above e's;
    ours decodes inside e's bin."""
    e_min, e_max, res = 0.0, 100.0, 1.0
    e = np.random.default_rng(0).uniform(e_min + res, e_max - res, 500)
    ref_token = np.digitize(e, np.arange(e_min, e_max + res, res))
    jitter = np.random.default_rng(1).uniform(-0.5 * res, 0.5 * res, e.shape)
    ref_decoded = np.clip(e_min + (ref_token + 0.5) * res + jitter, e_min, e_max)
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
