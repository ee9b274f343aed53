"""Every calorimetry reader either loads what the file holds or raises CaloFormatError naming the
file: truncation, flipped bytes, NaN/inf, other dtypes, shapes and keys (hypothesis).

Byte flips: our writers checksum data (Fletcher-32) and metadata (HDF5's newest layout), so a
flipped byte in one of our files loads the original values or fails. A file without checksums
(CaloChallenge's and FM4CAL's own) can be turned by a flipped data byte into another valid
file; there the property is that no library error escapes and what loads passes the checks.
"""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domains.calorimetry.data import (
    CaloFormatError,
    read_binning_xml,
    read_calochallenge,
    read_sparse_showers,
    write_calochallenge,
    write_sparse_showers,
)

GRID = (4, 3, 3)
N_VOX = 36
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
_counter = itertools.count()

rng = np.random.default_rng(0)
INC = np.array([1.2e4, 3.0e4, 7.5e4])
SHOWERS = (rng.exponential(60.0, (3, N_VOX)) * (rng.random((3, N_VOX)) < 0.4)).astype(np.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    out = {"root": root, "dense": root / "dense.h5", "sparse": root / "sparse.h5", "plain": root / "plain.h5"}
    write_calochallenge(out["dense"], INC, SHOWERS)
    write_sparse_showers(out["sparse"], INC / 1e3, SHOWERS, GRID, "G4_W_gamma")
    with h5py.File(out["plain"], "w") as f:  # as CaloChallenge's files: no checksums, default layout
        f.create_dataset("incident_energies", data=INC.reshape(-1, 1))
        f.create_dataset("showers", data=SHOWERS)
    return out


def _fresh(root: Path, data: bytes) -> Path:
    path = root / f"m{next(_counter)}.h5"
    path.write_bytes(data)
    return path


def _load(reader, path: Path):
    """The reader's result, or the CaloFormatError it raised (which must name the file)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unit warnings are not what this checks
            return reader(path)
    except CaloFormatError as e:
        assert str(path) in str(e), e
        return e


def _dense(path: Path):
    return read_calochallenge(path, N_VOX)


def _sparse(path: Path):
    return read_sparse_showers(path, GRID)


damage = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0.0, 0.999)),
    st.tuples(st.just("flip"), st.floats(0.0, 0.999), st.integers(0, 7)),
)


def _damaged(raw: bytes, how: tuple) -> bytes:
    if how[0] == "truncate":
        return raw[: int(how[1] * len(raw))]
    b = bytearray(raw)
    b[int(how[1] * len(b))] ^= 1 << how[2]
    return bytes(b)


@FAST
@given(how=damage)
def test_dense_reader_loads_the_same_values_or_names_the_file(files, how) -> None:
    out = _load(_dense, _fresh(files["root"], _damaged(files["dense"].read_bytes(), how)))
    if not isinstance(out, CaloFormatError):
        assert np.allclose(out[0], INC) and np.array_equal(out[1], SHOWERS)


@FAST
@given(how=damage)
def test_sparse_reader_loads_the_same_values_or_names_the_file(files, how) -> None:
    out = _load(_sparse, _fresh(files["root"], _damaged(files["sparse"].read_bytes(), how)))
    if not isinstance(out, CaloFormatError):
        assert np.allclose(out.incident_mev, INC) and np.array_equal(out.dense(), SHOWERS)


@FAST
@given(how=damage)
def test_reader_of_a_file_without_checksums_never_leaks_a_library_error(files, how) -> None:
    out = _load(_dense, _fresh(files["root"], _damaged(files["plain"].read_bytes(), how)))
    if not isinstance(out, CaloFormatError):  # another valid file: right shape, finite, >= 0
        inc, showers = out
        assert inc.shape == (3,) and (inc > 0).all() and showers.shape == (3, N_VOX)
        assert np.isfinite(showers).all() and (showers >= 0).all()


# --- content mutations: NaN / inf, dtype, shape, keys ---------------------------------------------------
DTYPES = {"float64": True, "int32": True, "uint16": True, "bool": False, "S4": False, "complex64": False}

mutation = st.one_of(
    st.tuples(st.just("value"), st.sampled_from(["incident_energies", "showers"]), st.sampled_from([np.nan, np.inf, -np.inf, -1.0]),
              st.integers(0, 2), st.integers(0, N_VOX - 1)),
    st.tuples(st.just("dtype"), st.sampled_from(["incident_energies", "showers"]), st.sampled_from(sorted(DTYPES))),
    st.tuples(st.just("shape"), st.sampled_from(["incident_energies", "showers"]), st.sampled_from(["flat", "extra", "transpose", "3d"])),
    st.tuples(st.just("key"), st.sampled_from(["incident_energies", "showers"]), st.sampled_from(["delete", "rename", "group"])),
    st.tuples(st.just("extra"), st.text("abcxyz_", min_size=1, max_size=6)),
)


def _mutated(path: Path, m: tuple) -> tuple[dict, bool]:
    """Write the CaloChallenge layout with one mutation; return what it holds and whether it is valid."""
    data = {"incident_energies": INC.reshape(-1, 1).copy(), "showers": SHOWERS.copy()}
    valid = True
    if m[0] == "value":
        _, key, value, i, j = m
        data[key][i, j if key == "showers" else 0] = value
        valid = False
    elif m[0] == "dtype":
        data[m[1]] = data[m[1]].astype(m[2])
        valid = DTYPES[m[2]] and (data[m[1]] > 0).all() if m[1] == "incident_energies" else DTYPES[m[2]]
    elif m[0] == "shape":
        a = data[m[1]]
        data[m[1]] = {"flat": a.ravel(), "extra": np.concatenate([a, a[:, :1]], 1), "transpose": a.T, "3d": a[..., None]}[m[2]]
        valid = False
    elif m[0] == "key":
        valid = False
    with h5py.File(path, "w") as f:
        for key, a in data.items():
            if m[0] == "key" and key == m[1]:
                if m[2] == "rename":
                    f.create_dataset(key + "_", data=a)
                elif m[2] == "group":
                    f.create_group(key).create_dataset("data", data=a)
                continue
            f.create_dataset(key, data=a)
        if m[0] == "extra" and m[1] not in data:
            f.create_dataset(m[1], data=np.arange(3))
    return data, valid


@FAST
@given(m=mutation)
def test_dense_reader_loads_what_the_file_holds_or_names_file_and_field(files, m) -> None:
    path = files["root"] / f"c{next(_counter)}.h5"
    data, valid = _mutated(path, m)
    out = _load(_dense, path)
    if valid:
        assert not isinstance(out, CaloFormatError), out
        assert np.allclose(out[0], data["incident_energies"][:, 0].astype(np.float64), rtol=1e-7)
        assert np.array_equal(out[1], data["showers"].astype(np.float32))
    else:
        assert isinstance(out, CaloFormatError), m
        assert out.field in ("incident_energies", "showers")


sparse_mutation = st.one_of(
    st.tuples(st.just("value"), st.sampled_from([np.nan, np.inf, -2.0])),
    st.tuples(st.just("index"), st.sampled_from(["outside", "negative", "repeat", "float", "two_columns"])),
    st.tuples(st.just("attr"), st.sampled_from(["no_energy", "text_energy", "nan_energy", "shape", "no_shape"])),
    st.tuples(st.just("member"), st.sampled_from(["no_values", "no_indices", "dataset_event", "bad_material", "no_material"])),
)


@FAST
@given(m=sparse_mutation, event=st.integers(0, 2))
def test_sparse_reader_loads_what_the_file_holds_or_names_file_and_event(files, m, event) -> None:
    path = files["root"] / f"s{next(_counter)}.h5"
    valid = m[1] in ("no_shape", "no_material")
    with h5py.File(path, "w") as f:
        for i, (e0, shower) in enumerate(zip(INC / 1e3, SHOWERS)):
            dense = shower.reshape(GRID)
            idx, val = np.argwhere(dense != 0), dense[dense != 0].astype(np.float32)
            attrs = {"shape": GRID, "initial_energy": e0}
            material: bytes | None = b"G4_W_gamma"
            if i == event:
                kind, what = m
                if kind == "value":
                    val[0] = what
                elif kind == "index":
                    idx = {"outside": idx + np.array([GRID[0], 0, 0]), "negative": idx - 9, "repeat": np.concatenate([idx, idx[:1]]),
                           "float": idx + 0.5, "two_columns": idx[:, :2]}[what]
                    val = np.concatenate([val, val[:1]]) if what == "repeat" else val
                elif what == "no_energy":
                    attrs.pop("initial_energy")
                elif what in ("text_energy", "nan_energy"):
                    attrs["initial_energy"] = "fifty" if what == "text_energy" else np.nan
                elif what == "no_shape":
                    attrs.pop("shape")
                elif what == "shape":
                    attrs["shape"] = (GRID[0] + 1, 3, 3)
                elif what == "dataset_event":
                    f.create_dataset(str(i), data=val)
                    continue
                elif what in ("bad_material", "no_material"):
                    material = b"\xff\xfe" if what == "bad_material" else None
            g = f.create_group(str(i))
            if not (m == ("member", "no_indices") and i == event):
                g.create_dataset("indices", data=idx)
            if not (m == ("member", "no_values") and i == event):
                g.create_dataset("values", data=val)
            for k, v in attrs.items():
                g.attrs[k] = v
            if material is not None:
                g.create_dataset("material", data=material)
    out = _load(_sparse, path)
    if valid:
        assert not isinstance(out, CaloFormatError), out
        assert np.allclose(out.incident_mev, INC) and np.array_equal(out.dense(), SHOWERS)
    else:
        assert isinstance(out, CaloFormatError), m
        assert out.field.startswith(str(event)), (out.field, m)


XML = """<Bins>
   <Bin pid="11" name="electron">
      <Layer id="0" r_edges="0,4.65,9.3,13.95" n_bin_alpha="4" />
      <Layer id="1" r_edges="0" n_bin_alpha="1" />
      <Layer id="2" r_edges="0,10,20" n_bin_alpha="1" />
   </Bin>
</Bins>
"""


@FAST
@given(cut=st.floats(0.0, 1.0), flips=st.lists(st.tuples(st.floats(0.0, 0.999), st.sampled_from(list('0x,."<>= -1'))), max_size=3))
def test_binning_xml_reader_builds_a_consistent_geometry_or_names_the_file(files, cut, flips) -> None:
    text = list(XML[: max(1, int(cut * len(XML))) if cut < 0.98 else len(XML)])
    for where, char in flips:
        text[int(where * len(text))] = char
    path = files["root"] / f"x{next(_counter)}.xml"
    path.write_text("".join(text))
    out = _load(read_binning_xml, path)
    if not isinstance(out, CaloFormatError):
        assert out.n_voxels == sum(ly.n_voxels for ly in out.layers) == len(out.voxel_positions())
        assert np.isfinite(out.voxel_positions()).all()
