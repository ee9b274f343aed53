"""ETT reader and protocol, the generic-CSV protocol, the generated series, forecast files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from domains.forecasting import data as fdata
from domains.forecasting import synth
from domains.forecasting.data import ForecastData, ForecastFormatError, read_series_csv, split_borders
from domains.forecasting.synth import generate_transformer_load
from suite.data import DataFormatError

ETT_COLUMNS = ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
ETTH1_ROWS = 17420  # rows of the real ETTh1.csv (2016-07-01 00:00 .. 2018-06-26 19:00)


def write_ett_like(path, rows: int, freq: str = "h", seed: int = 0) -> pd.DataFrame:
    """A synthetic CSV in exactly ETT's layout (date + 6 loads + OT); random values, not ETT data."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.normal(size=(rows, 7)).cumsum(0).round(3), columns=ETT_COLUMNS)
    df.insert(0, "date", pd.date_range("2016-07-01", periods=rows, freq=freq).strftime("%Y-%m-%d %H:%M:%S"))
    df.to_csv(path, index=False)
    return df


def check_standard_etth1_windows(dm: ForecastData) -> None:
    assert dm.protocol_used == "ett_hour" and dm.channels == ETT_COLUMNS
    assert {k: dm.split_sizes[k] for k in ("train", "val", "test")} == {"train": 8209, "val": 2785, "test": 2785}
    month = 30 * 24
    # each split's forecast targets lie inside its 12/4/4-month block; windows reach back L rows
    for name, (lo, hi) in {"train": (0, 12 * month), "val": (12 * month, 16 * month), "test": (16 * month, 20 * month)}.items():
        starts = dm.splits[name].starts
        assert starts[0] + dm.lookback == max(lo, dm.lookback) if name == "train" else starts[0] + dm.lookback == lo
        assert starts[-1] + dm.lookback + dm.horizon == hi


def test_etth1_window_counts_on_a_synthetic_csv_with_etth1_rows(tmp_path):
    raw = write_ett_like(tmp_path / "ETTh1.csv", ETTH1_ROWS)
    dm = ForecastData(str(tmp_path / "ETTh1.csv"), lookback=336, horizon=96, batch_size=32)
    dm.setup()
    check_standard_etth1_windows(dm)
    # the scaler saw the train rows only, and windows are in scaled units
    train = raw[ETT_COLUMNS].to_numpy(np.float64)[: 12 * 30 * 24]
    np.testing.assert_allclose(dm.scaler.mean, train.mean(0), rtol=1e-6)  # float64 statistics, as sklearn's on the float64 frame
    np.testing.assert_allclose(dm.scaler.std, train.std(0), rtol=1e-6)
    np.testing.assert_allclose(dm.values[: 12 * 30 * 24].mean(0), 0, atol=1e-4)
    assert not np.allclose(dm.values[12 * 30 * 24 :].mean(0), 0, atol=1e-2)  # later rows are not re-centred
    # no drop_last on test: every window is seen, the last batch holds 2785 % 32 = 1 window
    sizes = [len(b["y"]) for b in dm.test_dataloader()]
    assert sum(sizes) == 2785 and sizes[-1] == 1
    batch = next(iter(dm.test_dataloader()))
    s = int(batch["start"][0])
    np.testing.assert_array_equal(batch["x"][0].numpy(), dm.values[s : s + 336])
    np.testing.assert_array_equal(batch["y"][0].numpy(), dm.values[s + 336 : s + 432])


def test_ettm_borders_are_four_times_the_hourly_ones(tmp_path):
    write_ett_like(tmp_path / "ETTm2.csv", 4 * 20 * 30 * 24, freq="15min")
    dm = ForecastData(str(tmp_path / "ETTm2.csv"), lookback=96, horizon=192)
    dm.setup()
    month = 4 * 30 * 24
    assert dm.protocol_used == "ett_minute"
    assert dm.split_sizes["train"] == 12 * month - 96 - 192 + 1
    assert dm.split_sizes["val"] == dm.split_sizes["test"] == 4 * month - 192 + 1
    with pytest.raises(ForecastFormatError, match="<series>: 14000 rows; protocol 'ett_hour' expects at least 14400 rows"):
        split_borders(14000, 336, "ett_hour")


@pytest.mark.skipif(not (fdata.ett_dir() / "ETTh1.csv").is_file(), reason="ETTh1.csv not found (set SUITE_ETT_DIR)")
def test_real_etth1_window_counts():
    dm = ForecastData("ETTh1", lookback=336, horizon=96)
    dm.setup()
    check_standard_etth1_windows(dm)
    assert len(dm.dates) == ETTH1_ROWS and str(dm.dates[0]) == "2016-07-01 00:00:00"


def test_generic_csv_ratio_protocol_target_last_and_univariate(tmp_path):
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"date": pd.date_range("2020-01-01", periods=1000, freq="10min"),
                       "OT": rng.normal(size=1000), "p (mbar)": rng.normal(size=1000), "T (degC)": rng.normal(size=1000)})
    df.to_csv(tmp_path / "weather.csv", index=False)
    dm = ForecastData(str(tmp_path / "weather.csv"), lookback=96, horizon=24)
    dm.setup()
    assert dm.protocol_used == "ratio" and dm.channels == ["p (mbar)", "T (degC)", "OT"]  # target moved last
    # 700 / 100 / 200 rows; val and test reach back 96 rows
    assert (dm.split_sizes["train"], dm.split_sizes["val"], dm.split_sizes["test"]) == (700 - 120 + 1, 196 - 120 + 1, 296 - 120 + 1)
    dm_s = ForecastData(str(tmp_path / "weather.csv"), lookback=96, horizon=24, features="S")
    dm_s.setup()
    assert dm_s.channels == ["OT"] and dm_s.values.shape == (1000, 1)


def test_reader_errors_name_file_field_and_row(tmp_path):
    bad = tmp_path / "bad.csv"

    def refused(match: str) -> ForecastFormatError:
        with pytest.raises(ForecastFormatError, match=match) as err:
            read_series_csv(bad)
        assert isinstance(err.value, DataFormatError) and str(bad) in str(err.value) and "expected" in str(err.value)
        return err.value

    pd.DataFrame({"time": ["2020-01-01"], "OT": [1.0]}).to_csv(bad, index=False)
    assert refused(r"bad.csv: field 'date': no such column").field == "date"
    pd.DataFrame({"date": ["2020-01-01", "2020-01-02"], "load": [1.0, 2.0]}).to_csv(bad, index=False)
    refused(r"field 'OT': target column not found")
    pd.DataFrame({"date": ["2020-01-01", "2020-01-02", "2020-01-03"], "OT": ["1.0", "", "3"]}).to_csv(bad, index=False)
    refused(r"field 'OT': row 3 .*expected a number .*not filled in")
    pd.DataFrame({"date": ["2020-01-01", "yesterday"], "OT": [1.0, 2.0]}).to_csv(bad, index=False)
    refused(r"field 'date': row 3 \('yesterday'\) is not a date")
    for token, row in (("inf", 2), ("-inf", 3), ("1e39", 2)):  # beyond float32 is as unusable as inf
        bad.write_text(f"date,OT\n2020-01-01,{token if row == 2 else 1}\n2020-01-02,{token if row == 3 else 2}\n")
        refused(rf"field 'OT': row {row} is .*expected a finite number within float32 range")
    bad.write_text("date,OT\n2020-01-01,True\n2020-01-02,False\n")
    refused(r"field 'OT': holds booleans .*expected numbers")
    # one field more per row than the header: pandas would take the dates as the index and shift every column
    bad.write_text("date,HUFL,OT\n2020-01-01,1,2,3\n2020-01-02,4,5,6\n")
    refused(r"bad.csv: the rows hold more fields than the header names")
    bad.write_text("date,OT\n1467331200,1.0\n1467334800,2.0\n")  # epoch seconds would parse as nanoseconds
    refused(r"field 'date': holds numbers .*expected date strings")
    bad.write_text("date,OT\n2020-01-01,1\n2020-01-02,4,5\n")
    refused(r"bad.csv: not a readable CSV \(ParserError")
    bad.write_bytes(b"date,OT\n2020-01-01,\xff1\n")
    refused(r"bad.csv: not a readable CSV \(UnicodeDecodeError")
    bad.write_text("")
    refused(r"bad.csv: not a readable CSV \(EmptyDataError")
    bad.write_text("date,OT\n")
    refused(r"bad.csv: no data rows")
    with pytest.raises(FileNotFoundError, match="SUITE_ETT_DIR"):
        ForecastData("ETTh9").setup()


def test_series_too_short_for_its_protocol_is_a_format_error_naming_the_file(tmp_path):
    short = tmp_path / "short.csv"
    write_ett_like(short, 300)  # ratio protocol: val 30 + 96 rows < lookback + horizon = 192
    with pytest.raises(ForecastFormatError, match=r"short.csv: the val split has 126 rows under protocol 'ratio'; expected at least"):
        ForecastData(str(short), lookback=96, horizon=96).setup()
    etth = tmp_path / "ETTh2.csv"
    write_ett_like(etth, 14000)
    with pytest.raises(ForecastFormatError, match=r"ETTh2.csv: 14000 rows; protocol 'ett_hour' expects at least 14400 rows"):
        ForecastData(str(etth), lookback=336, horizon=96).setup()
    ettm = tmp_path / "ETTm1.csv"
    write_ett_like(ettm, 14400, freq="15min")  # enough for the hourly borders, a quarter of the minute ones
    with pytest.raises(ForecastFormatError, match=r"ETTm1.csv: 14400 rows; protocol 'ett_minute' expects at least 57600"):
        ForecastData(str(ettm), lookback=96, horizon=96).setup()


def test_generator_is_seeded_and_physically_coupled():
    a, b = generate_transformer_load(24 * 7 * 8, seed=0), generate_transformer_load(24 * 7 * 8, seed=0)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(generate_transformer_load(24 * 7 * 8, seed=1))
    assert list(a.columns) == ["date", *ETT_COLUMNS] and not a.isna().any().any()
    load = a["HUFL"].to_numpy()
    hours = pd.to_datetime(a["date"])
    weekend = hours.dt.day_of_week.to_numpy() >= 5
    assert load[weekend].mean() < 0.9 * load[~weekend].mean()  # weekly seasonality
    lag_corr = lambda x, k: np.corrcoef(x[:-k], x[k:])[0, 1]
    assert lag_corr(load, 24) > 0.6 > lag_corr(load, 12)  # daily seasonality
    # oil temperature follows the load with the oil time constant: best correlated a few hours later
    ot = a["OT"].to_numpy() - pd.Series(a["OT"]).rolling(24 * 7, min_periods=1).mean().to_numpy()
    sq = load**2 - pd.Series(load**2).rolling(24 * 7, min_periods=1).mean().to_numpy()
    corr = [np.corrcoef(sq[: len(sq) - k], ot[k:])[0, 1] for k in range(8)]
    assert max(corr) > 0.5 and int(np.argmax(corr)) >= 1


def test_generated_default_is_cached_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SUITE_DATA_DIR", str(tmp_path))
    path = synth.generated_csv(24 * 7 * 4, seed=0)
    assert path.is_relative_to(tmp_path / "generated" / "forecasting")
    stamp = path.stat().st_mtime_ns
    assert synth.generated_csv(24 * 7 * 4, seed=0).stat().st_mtime_ns == stamp
    dm = ForecastData(None, lookback=48, horizon=24, generated_hours=24 * 7 * 4, train_windows=50, val_windows=10)
    dm.setup()
    assert dm.split_sizes["train"] == 50 and dm.split_sizes["val"] == 10
    assert dm.split_sizes["test"] == int(24 * 7 * 4 * 0.2) + 48 - 72 + 1  # the test split stays complete


def test_write_forecasts_inverts_scaling_and_plots(tmp_path):
    write_ett_like(tmp_path / "series.csv", 600)
    dm = ForecastData(str(tmp_path / "series.csv"), lookback=48, horizon=12, predict_windows=3)
    dm.setup()
    starts = dm.splits["predict"].starts
    assert len(starts) == 3 and starts[0] == dm.splits["test"].starts[0] and starts[-1] == dm.splits["test"].starts[-1]
    perfect = np.stack([dm.values[s + 48 : s + 60] for s in starts])  # a forecast equal to the truth
    csv, png = dm.write_forecasts(tmp_path / "out", starts, perfect)
    out = pd.read_csv(csv)
    assert len(out) == 3 * 12 * 7 and set(out["channel"]) == set(ETT_COLUMNS)
    np.testing.assert_allclose(out["forecast"], out["truth"], rtol=1e-5, atol=1e-4)
    raw = pd.read_csv(tmp_path / "series.csv")
    first = out[(out["channel"] == "OT") & (out["window_start"] == out["window_start"].iloc[0])]
    np.testing.assert_allclose(first["truth"], raw["OT"].to_numpy()[starts[0] + 48 : starts[0] + 60], rtol=1e-5, atol=1e-4)
    assert png.stat().st_size > 10_000
