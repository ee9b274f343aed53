"""FM4CAL's metrics (W1 and quantile KL per observable, cells above 0.1 MeV) against a hand
computation on a toy pair of samples, and the quantile KL against its definition."""

from __future__ import annotations

import math

import numpy as np
import pytest

from domains.calorimetry.data import Geometry
from domains.calorimetry.metrics import REFERENCE_OBSERVABLES, quantile_kl, reference_metrics, reference_observables

# 2 layers x 2 x 2 cells of 10 mm: voxel (z, a, b) -> flat (z * 2 + a) * 2 + b, centre x = +-5, y = +-5 mm
TOY = Geometry((2, 2, 2), layer_mm=10.0, cell_mm=10.0)


def _toy_pair() -> tuple[np.ndarray, np.ndarray]:
    ref, gen = np.zeros((2, 8)), np.zeros((2, 8))
    ref[0, [0, 7, 1]] = [3.0, 1.0, 0.05]  # 0.05 MeV is below the 0.1 MeV cut
    ref[1, 3] = 2.0
    gen[0, [4, 0]] = [2.0, 0.1]  # exactly 0.1 MeV is not above the cut
    gen[1, [0, 3, 6]] = [1.0, 1.0, 2.0]
    return ref, gen


def test_reference_observables_of_the_toy_pair() -> None:
    ref, gen = _toy_pair()
    r, g = reference_observables(ref, TOY), reference_observables(gen, TOY)
    assert sorted(r["cell_energy"]) == [1.0, 2.0, 3.0] and sorted(g["cell_energy"]) == [1.0, 1.0, 2.0, 2.0]
    assert r["energy_sum"].tolist() == [4.0, 2.0] and g["energy_sum"].tolist() == [2.0, 4.0]
    assert r["n_hits"].tolist() == [2, 1] and g["n_hits"].tolist() == [1, 3]
    assert np.allclose(r["cog_x"], [-2.5, 5.0]) and np.allclose(g["cog_x"], [-5.0, -2.5])
    assert np.allclose(r["cog_y"], [-2.5, 5.0]) and np.allclose(g["cog_y"], [-5.0, 2.5])
    assert np.allclose(r["cog_z"], [0.25, 0.0]) and np.allclose(g["cog_z"], [1.0, 0.5])
    assert r["longitudinal"].tolist() == [5.0, 1.0] and g["longitudinal"].tolist() == [2.0, 4.0]


def test_reference_metrics_match_a_hand_computation() -> None:
    """W1 = the area between the two empirical CDFs; KL on quantile bins of the reference."""
    ref, gen = _toy_pair()
    m = reference_metrics(ref, gen, TOY, n_bins=2)
    hand_w1 = {
        "cell_energy": 1 / 6 + 1 / 3,  # CDFs {1,2,3} vs {1,1,2,2}: |1/3 - 1/2| on [1,2) + |2/3 - 1| on [2,3)
        "energy_sum": 0.0,  # {4, 2} vs {2, 4}
        "n_hits": 0.5,  # {2, 1} vs {1, 3}: |1 - 1/2| on [2, 3)
        "cog_x": (2.5 + 7.5) / 2,  # sorted {-2.5, 5} vs {-5, -2.5}
        "cog_y": (2.5 + 2.5) / 2,  # sorted {-2.5, 5} vs {-5, 2.5}
        "cog_z": (0.5 + 0.75) / 2,  # sorted {0, 0.25} vs {0.5, 1}
        "longitudinal": 5 / 6 - 1 / 3,  # energy over layers (5, 1) vs (2, 4): |F_ref(0) - F_gen(0)|
        "radial": 0.0,  # every cell centre lies at sqrt(50) mm
    }
    for name, value in hand_w1.items():
        assert m[f"w1/{name}"] == pytest.approx(value, abs=1e-12), name
    # cell energies, 2 quantile bins of {1, 2, 3}: edges (-inf, 2, inf); ref (1/3, 2/3), gen (1/2, 1/2)
    assert m["kl/cell_energy"] == pytest.approx(1 / 3 * math.log(2 / 3) + 2 / 3 * math.log(4 / 3), rel=1e-8)
    # energy sums {4, 2} vs {2, 4}: the same sample, KL 0 (up to the 1e-10 on the generated bins)
    assert m["kl/energy_sum"] == pytest.approx(0.0, abs=1e-9)
    # the longitudinal profile is already binned by layer: p = (5/6, 1/6), q = (1/3, 2/3)
    assert m["kl/longitudinal"] == pytest.approx(5 / 6 * math.log(5 / 2) + 1 / 6 * math.log(1 / 4), rel=1e-8)
    assert m["kl/radial"] == pytest.approx(0.0, abs=1e-12)
    assert set(m) == {f"{k}/{n}" for k in ("w1", "kl") for n in REFERENCE_OBSERVABLES} | {"kl_mean"}


def test_quantile_kl_follows_its_definition() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=400), rng.normal(0.5, 1.0, size=300)
    edges = np.quantile(a, np.linspace(0, 1, 11))
    edges[0], edges[-1] = -np.inf, np.inf
    p = np.histogram(a, edges)[0] / len(a)
    q = np.histogram(b, edges)[0] / len(b) + 1e-10
    q = q / q.sum()
    assert quantile_kl(a, b, 10) == pytest.approx(float(np.sum(p * np.log(p / q))), rel=1e-10)
    assert quantile_kl(a, a, 10) == pytest.approx(0.0, abs=1e-8)
    # a discrete observable: tied quantiles collapse bins, which stay empty in both samples
    hits = np.array([3, 3, 3, 3, 4, 5]), np.array([3, 4, 4, 5, 5, 5])
    assert np.isfinite(quantile_kl(*hits, 30)) and quantile_kl(*hits, 30) > 0
    assert math.isnan(quantile_kl(np.array([]), b))
