"""Fuzzing the ETT / CSV reader: truncate, flip bytes, inject NaN / inf, change dtypes, shape and
columns of a file in ETT's layout. Property, both ways: where Time-Series-Library's loading logic
(``tslib_reference``) reads the file and the suite has no stated reason to refuse it, the data
module holds the same scaled values and windows; everywhere else it raises the suite's
DataFormatError naming the file and the expected form, never a library traceback. Derandomised,
no example database, so runs are reproducible and write nothing into the checkout."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from domains.forecasting.data import ForecastData, ForecastFormatError
from suite.data import DataFormatError
from tests.domains.forecasting.tslib_reference import refused_on_purpose, tslib_load

ETT_COLUMNS = ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
L, H = 96, 24


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


#: cell texts that break a number in some way, or change it into another valid one
TOKENS = ["nan", "NaN", "", "inf", "-inf", "1e400", "1e39", "1_0", "True", "abc", "1.5.2", "-", " 7", "+7", "1e5", "0x1F", "NA", "7.25"]


def ett_like_bytes(rows: int, seed: int = 0) -> bytes:
    """A CSV in exactly ETT's layout (date + 6 loads + OT), random-walk values; not ETT data."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.normal(size=(rows, 7)).cumsum(0).round(3) + 10, columns=ETT_COLUMNS)
    df.insert(0, "date", pd.date_range("2016-07-01", periods=rows, freq="h").strftime("%Y-%m-%d %H:%M:%S"))
    return df.to_csv(index=False).encode()


ETT_HOUR = ett_like_bytes(20 * 30 * 24 + 120)  # the 20 protocol months and a tail the protocol never reads
CUSTOM = ett_like_bytes(400, seed=1)  # 70 / 10 / 20 % split


def _columns(raw: bytes, edit) -> bytes:
    """Apply ``edit(list of fields) -> list of fields`` to every line (the files hold no quotes)."""
    lines = raw.decode().split("\n")
    return "\n".join(",".join(edit(line.split(","))) if line else line for line in lines).encode()


MUTATIONS = ["truncate", "truncate_lines", "truncate_tail", "flip", "token", "dtype", "drop_line", "dup_line", "drop_column", "add_column",
             "trailing_comma", "no_header", "rename", "swap", "ot_first"]


def mutate(raw: bytes, data: st.DataObject, kind: str | None = None) -> bytes:
    """One mutation of the CSV text (``kind``, or one drawn)."""
    kind = kind or data.draw(st.sampled_from(MUTATIONS), label="mutation")
    n_fields = raw.split(b"\n", 1)[0].count(b",") + 1
    if kind == "truncate":
        return raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]
    if kind == "truncate_lines":  # whole rows only: a shorter, well-formed file
        lines = raw.split(b"\n")
        return b"\n".join(lines[: data.draw(st.integers(0, len(lines) - 1), label="lines")]) + b"\n"
    if kind == "truncate_tail":  # inside the rows the protocol does not need: still a valid file, or a partial last row
        return raw[: data.draw(st.integers(int(0.97 * len(raw)), len(raw) - 1), label="length")]
    if kind == "flip":
        b = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 3), label="flips")):
            b[data.draw(st.integers(0, len(b) - 1), label="offset")] ^= data.draw(st.integers(1, 255), label="xor")
        return bytes(b)
    if kind == "token":
        spans = [m.span() for m in re.finditer(rb"[^,\n]+", raw)]
        start, stop = spans[data.draw(st.integers(0, len(spans) - 1), label="cell")]
        return raw[:start] + data.draw(st.sampled_from(TOKENS), label="with").encode() + raw[stop:]
    col = data.draw(st.integers(0, n_fields - 1), label="column")
    if kind == "dtype":  # one whole column written as another type
        how = data.draw(st.sampled_from(["int", "scientific", "bool", "text", "quoted"]), label="as")

        def cast(fields: list[str]) -> list[str]:
            v = fields[col]
            try:
                x = float(v)
            except ValueError:  # the header, the dates
                return fields
            fields[col] = {"int": str(round(x)), "scientific": f"{x:.6e}", "bool": str(x > 10), "text": f"v{v}", "quoted": f'"{v}"'}[how]
            return fields

        return _columns(raw, cast)
    if kind == "drop_column":
        return _columns(raw, lambda f: f[:col] + f[col + 1 :])
    if kind == "add_column":
        extra = data.draw(st.sampled_from(["1.5", "x"]), label="value")
        return _columns(raw, lambda f: f + ["extra" if f[0] == "date" else extra])
    if kind == "trailing_comma":
        return _columns(raw, lambda f: f + [""] if f[0] != "date" else f)
    if kind == "swap":
        other = data.draw(st.integers(0, n_fields - 1), label="with column")

        def swap(f: list[str]) -> list[str]:
            f[col], f[other] = f[other], f[col]
            return f

        return _columns(raw, swap)
    if kind == "ot_first":
        return _columns(raw, lambda f: [f[-1], *f[:-1]])
    lines = raw.split(b"\n")
    if kind == "no_header":
        return b"\n".join(lines[1:])
    if kind == "rename":
        header = lines[0].decode().split(",")
        header[col] = data.draw(st.sampled_from(["date", "OT", "HUFL", "ot", "Date", "x"]), label="name")
        return b"\n".join([",".join(header).encode(), *lines[1:]])
    i = data.draw(st.integers(1, len(lines) - 1), label="line")
    return b"\n".join(lines[:i] + lines[i + 1 :] if kind == "drop_line" else lines[: i + 1] + lines[i:])


def expected(path: Path, protocol: str) -> dict | None:
    """The reference's splits where the suite must load the file; ``None`` where it must refuse it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the library's own warnings (date-format inference, dtype guesses)
        try:
            df_raw = pd.read_csv(path)  # the library's one read of the file
            if refused_on_purpose(df_raw, L, H, protocol) is not None:
                return None
            return tslib_load(df_raw, L, H, protocol)
        except Exception:  # noqa: BLE001  the library cannot read it either
            return None


def check(path: Path, protocol: str) -> str:
    """``loaded`` or ``refused``, after checking that this is what the reference says should happen."""
    ref = expected(path, protocol)
    dm = ForecastData(str(path), lookback=L, horizon=H)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pandas' date-format inference warnings on damaged dates
            dm.setup()
    except DataFormatError as err:
        assert isinstance(err, ForecastFormatError) and str(path) in str(err) and "expected" in str(err), str(err)
        assert ref is None, f"refused a file the reference loads cleanly: {err}"
        return "refused"
    assert ref is not None, "loaded a file the reference cannot read or that the suite should refuse"
    assert dm.protocol_used == protocol
    for name, (data_x, n) in ref.items():
        starts = dm.splits[name].starts
        assert len(starts) == n
        ours = dm.values[starts[0] : starts[-1] + L + H]
        np.testing.assert_allclose(ours, data_x, rtol=1e-5, atol=1e-5)
        for i in (0, n - 1):  # the first and last window, as the reference's __getitem__ cuts them
            item = dm.splits[name][i]
            np.testing.assert_allclose(item["x"].numpy(), data_x[i : i + L], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(item["y"].numpy(), data_x[i + L : i + L + H], rtol=1e-5, atol=1e-5)
    return "loaded"


def test_unmutated_files_load_as_the_reference_reads_them(tmp_path):
    for name, raw, protocol in (("ETTh1.csv", ETT_HOUR, "ett_hour"), ("custom.csv", CUSTOM, "ratio")):
        (tmp_path / name).write_bytes(raw)
        assert check(tmp_path / name, protocol) == "loaded"
        df = pd.read_csv(tmp_path / name)
        assert list(df.columns[1:]) == ETT_COLUMNS  # ETT's layout: Dataset_ETT_hour's columns[1:] is the reference's order


@fuzz(12)
@given(data=st.data())
def test_fuzz_ett_hour_csv(tmp_path, data):
    """The hourly ETT protocol on a file of its full length (20 months and a tail); any mutation."""
    path = tmp_path / "ETTh1.csv"
    path.write_bytes(mutate(ETT_HOUR, data))
    event(check(path, "ett_hour"))  # --hypothesis-show-statistics: how many loaded, how many were refused


@pytest.mark.parametrize("kind", MUTATIONS)
@fuzz(6)
@given(data=st.data())
def test_fuzz_custom_csv(tmp_path, kind, data):
    """The 70/10/20 protocol on a short file, so every kind of mutation gets examples of its own."""
    path = tmp_path / "weather.csv"
    path.write_bytes(mutate(CUSTOM, data, kind))
    event(check(path, "ratio"))


@pytest.mark.parametrize("token", TOKENS)
def test_each_bad_cell_loads_as_the_reference_or_is_refused(tmp_path, token):
    """Every token in one train cell and one test cell of OT: each check of the reader is hit on purpose."""
    lines = CUSTOM.decode().split("\n")
    for row in (5, 390):
        fields = lines[row].split(",")
        fields[-1] = token
        lines[row] = ",".join(fields)
    path = tmp_path / "weather.csv"
    path.write_text("\n".join(lines))
    outcome = check(path, "ratio")
    assert outcome == ("loaded" if token in (" 7", "+7", "1e5", "7.25") else "refused"), (token, outcome)


@pytest.mark.parametrize("date, outcome", [("2016-07-01 05:00:00", "loaded"), ("2016-13-01 00:00:00", "refused"),
                                           ("yesterday", "refused"), ("", "refused"), ("2016-07-01 0x:00:00", "refused")])
def test_each_bad_date_loads_as_the_reference_or_is_refused(tmp_path, date, outcome):
    """A date in the test split (parsed by the reference) or in the train split: another valid date loads."""
    lines = CUSTOM.decode().split("\n")
    for row in (3, 385):
        fields = lines[row].split(",")
        fields[0] = date
        lines[row] = ",".join(fields)
    path = tmp_path / "weather.csv"
    path.write_text("\n".join(lines))
    assert check(path, "ratio") == outcome


@pytest.mark.parametrize("rows", [0, 1, 14399])
def test_ett_csv_too_short_for_its_protocol_names_the_file(tmp_path, rows):
    path = tmp_path / "ETTh2.csv"
    lines = ETT_HOUR.split(b"\n")
    path.write_bytes(b"\n".join(lines[: rows + 1]) + b"\n")
    with pytest.raises(ForecastFormatError, match=re.escape(str(path))) as err:
        ForecastData(str(path), lookback=L, horizon=H).setup()
    assert isinstance(err.value, DataFormatError) and isinstance(err.value, ValueError)
    assert ("no data rows" in str(err.value)) if rows == 0 else (f"{rows} rows; protocol 'ett_hour' expects at least 14400 rows" in str(err.value))
