"""Long-term forecasting data: the ETT CSV reader with the standard protocol and the
sliding-window DataModule (the seeded transformer-load generator in the same layout is ``synth.py``).

Protocol (Informer / Autoformer / PatchTST / GPT4TS ``Dataset_ETT_hour``, ``_minute``, ``_Custom``):

* ETTh*: chronological 12 / 4 / 4 months of 30 days x 24 h; ETTm*: the same at 15 min (x4).
  ``borders1 = [0, 12*30*24 - L, 16*30*24 - L]``, ``borders2 = [12*30*24, 16*30*24, 20*30*24]``
  for lookback ``L``: val and test windows start ``L`` steps before their split so that every
  forecast target lies inside its split.
* any other CSV with a ``date`` column (Weather, Electricity, Traffic): 70 / 10 / 20 % by rows.
* the scaler (per-channel mean / population std) is fit on the train rows only; windows and
  metrics live in scaled units, as the literature reports them.
* windows: ``n = rows - L - H + 1`` per split, stride 1. Val and test loaders never drop the
  last partial batch: several reference repositories build them with ``drop_last=True``, which
  silently skips up to ``batch_size - 1`` test windows and changes the published numbers.
  Here every one of the 2785 ETTh1 test windows (L=336, H=96) counts.

ETTh1 (CC BY-ND 4.0) is read in place, unmodified; it is never copied into the repository.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from suite.data import DataFormatError, SuiteDataModule, file_hash
from suite.plots import pyplot

from .synth import generated_csv

HOURS_PER_MONTH = 30 * 24  # the protocol's "month" is 30 days
DEFAULT_ETT_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "ETT-small"


def ett_dir() -> Path:
    """Folder holding ETTh1.csv etc.: ``$SUITE_ETT_DIR`` or ``../shared/data/ETT-small`` beside the repo."""
    return Path(os.environ.get("SUITE_ETT_DIR", DEFAULT_ETT_DIR))


def resolve_csv(csv_path: str) -> Path:
    """A bare dataset name (``ETTh1``) means ``<ett_dir()>/ETTh1.csv``; anything else is a path."""
    p = Path(csv_path).expanduser()
    if p.suffix == "" and len(p.parts) == 1:
        p = ett_dir() / f"{csv_path}.csv"
    if not p.is_file():
        raise FileNotFoundError(
            f"forecasting CSV {p} not found. Put the ETT files in {ett_dir()} (or set SUITE_ETT_DIR), "
            "pass a path to any CSV with a 'date' column, or leave csv_path empty for the generated set."
        )
    return p


class ForecastFormatError(DataFormatError):
    """A forecasting CSV that does not hold what the format promises (the suite's
    :class:`~suite.data.DataFormatError`): the message names the file, the column (or row) and
    the expected form."""


def split_borders(n_rows: int, lookback: int, protocol: str, path: str | Path = "<series>") -> tuple[list[int], list[int]]:
    """Row borders ``(starts, ends)`` of train / val / test, as in the reference data loaders.

    A series too short for its protocol raises :class:`ForecastFormatError` naming ``path``
    (the reference loaders slice past the end instead and return short or empty splits).
    """
    if protocol in ("ett_hour", "ett_minute"):
        month = HOURS_PER_MONTH * (4 if protocol == "ett_minute" else 1)
        ends = [12 * month, 16 * month, 20 * month]
        if n_rows < ends[-1]:
            raise ForecastFormatError(path, None, f"{n_rows} rows; protocol {protocol!r} expects at least {ends[-1]} rows "
                                                  f"(20 months of {month} rows: 12 train, 4 val, 4 test)")
    elif protocol == "ratio":
        n_train, n_test = int(n_rows * 0.7), int(n_rows * 0.2)
        ends = [n_train, n_rows - n_test, n_rows]
    else:
        raise ValueError(f"protocol must be 'ett_hour', 'ett_minute', 'ratio' or 'auto', got {protocol!r}")
    starts = [0, ends[0] - lookback, ends[1] - lookback]
    return starts, ends


def infer_protocol(path: Path) -> str:
    name = path.name.lower()
    return "ett_hour" if name.startswith("etth") else "ett_minute" if name.startswith("ettm") else "ratio"


def read_series_csv(path: str | Path, target: str = "OT", features: str = "M") -> tuple[pd.DatetimeIndex, np.ndarray, list[str]]:
    """Read a forecasting CSV: a ``date`` column of date strings and numeric channels, target moved last.

    ``features="M"`` keeps every channel (multivariate), ``"S"`` only ``target``. Returns
    ``(dates, values float32 [rows, channels], channel names)``. Anything the file does not hold
    as promised raises :class:`ForecastFormatError` naming the file, column and row: unreadable
    text, rows with more fields than the header, a missing, non-numeric or non-finite value
    (NaN, inf, beyond float32), a date that does not parse. Nothing is filled in, and a damaged
    row is refused even where the protocol would not read it (the file is damaged).
    """
    path = Path(path)
    if features not in ("M", "S"):
        raise ValueError(f"features must be 'M' (all channels) or 'S' (target only), got {features!r}")
    try:
        df = pd.read_csv(path)
    except (ValueError, pd.errors.ParserError) as e:  # a tokenizer error, bad UTF-8, an empty file
        raise ForecastFormatError(path, None, f"not a readable CSV ({type(e).__name__}: {str(e).strip()}); "
                                              f"expected comma-separated rows under a header like 'date,<channel>,...,{target}'") from None
    if not isinstance(df.index, pd.RangeIndex):  # pandas takes the first column as index when rows have one field more
        raise ForecastFormatError(path, None, f"the rows hold more fields than the header names ({list(df.columns)}); "
                                              "expected one value per header column")
    if "date" not in df.columns:
        raise ForecastFormatError(path, "date", f"no such column (columns are {list(df.columns)}); "
                                                f"expected a header like 'date,<channel>,...,{target}'")
    if target not in df.columns:
        raise ForecastFormatError(path, target, f"target column not found (columns are {list(df.columns)}); "
                                                "expected it in the header, or set data.target")
    if len(df) == 0:
        raise ForecastFormatError(path, None, "no data rows; expected one row per time step under the header")
    if pd.api.types.is_numeric_dtype(df["date"]):  # e.g. a shifted header: numbers would parse as epoch nanoseconds
        raise ForecastFormatError(path, "date", f"holds numbers ({df['date'].iloc[0]!r} ...); expected date strings like "
                                                "'2016-07-01 00:00:00'")
    dates = pd.DatetimeIndex(pd.to_datetime(df["date"], errors="coerce"))
    if dates.isna().any():
        row = int(np.flatnonzero(dates.isna())[0])
        raise ForecastFormatError(path, "date", f"row {row + 2} ({df['date'].iloc[row]!r}) is not a date; "
                                                "expected the format of the other rows, e.g. '2016-07-01 00:00:00'")
    channels = [c for c in df.columns if c not in ("date", target)] + [target] if features == "M" else [target]
    table = df[channels]
    for col in channels:  # True/False parses as a bool column, which to_numeric would keep as 0/1
        if pd.api.types.is_bool_dtype(table[col]):
            raise ForecastFormatError(path, col, f"holds booleans ({table[col].iloc[0]!r} ...); expected numbers")
    numeric = table.apply(pd.to_numeric, errors="coerce")
    bad = numeric.isna().to_numpy()
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise ForecastFormatError(path, channels[col], f"row {row + 2} is {table[channels[col]].iloc[row]!r}; "
                                                       "expected a number (missing values are not filled in; clean the file first)")
    with np.errstate(over="ignore"):
        values = numeric.to_numpy(np.float64).astype(np.float32)
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise ForecastFormatError(path, channels[col], f"row {row + 2} is {table[channels[col]].iloc[row]!r}; "
                                                       "expected a finite number within float32 range")
    return dates, values, channels


class Scaler:
    """Per-channel standardisation fit on train rows: scikit-learn's StandardScaler (ddof=0,
    float64 statistics, a constant channel's scale set to 1), as the reference loaders use it.

    Written here because scikit-learn is not a dependency of the suite; it is three lines.
    """

    def __init__(self, train: np.ndarray) -> None:
        train = np.asarray(train, dtype=np.float64)
        self.mean = train.mean(0)
        self.std = train.std(0)
        self.std[self.std == 0] = 1.0  # a constant channel stays constant instead of becoming NaN

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float64) - self.mean) / self.std).astype(np.float32)

    def inverse(self, x: np.ndarray) -> np.ndarray:
        return x * self.std + self.mean


class WindowDataset(Dataset):
    """Sliding windows ``x = values[s : s+L]``, ``y = values[s+L : s+L+H]`` for each start ``s``."""

    def __init__(self, values: np.ndarray, starts: np.ndarray, lookback: int, horizon: int) -> None:
        self.values = torch.from_numpy(np.ascontiguousarray(values))
        self.starts = np.asarray(starts, dtype=np.int64)
        self.lookback, self.horizon = lookback, horizon

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = int(self.starts[i])
        x = self.values[s : s + self.lookback]
        y = self.values[s + self.lookback : s + self.lookback + self.horizon]
        return {"x": x, "y": y, "start": s}


class ForecastData(SuiteDataModule):
    """Sliding windows over one CSV, split, scaled and windowed by the standard protocol.

    Args:
        csv_path: a CSV with a ``date`` column, a bare ETT name (``ETTh1`` -> ``$SUITE_ETT_DIR/ETTh1.csv``),
            or ``None`` for the generated transformer-load series.
        lookback, horizon: input and forecast lengths (the literature uses 336 or 512 / 96..720).
        protocol: ``auto`` (ETTh*/ETTm* borders by file name, else 70/10/20), or one of
            ``ett_hour``, ``ett_minute``, ``ratio``.
        train_windows: train on a seeded random subset of this many windows (CPU budgets);
            ``None`` uses all. ``val_windows`` takes evenly spaced val windows. Test is always complete.
        predict_windows: evenly spaced test windows that ``predict`` writes and plots.
        eval_batch_size: batch size of val / test / predict (default ``batch_size``); evaluation
            needs no gradients, so larger batches are cheaper per window.
    """

    def __init__(
        self,
        csv_path: str | None = None,
        lookback: int = 336,
        horizon: int = 96,
        target: str = "OT",
        features: str = "M",
        protocol: str = "auto",
        train_windows: int | None = None,
        val_windows: int | None = None,
        predict_windows: int = 4,
        generated_hours: int = 24 * 7 * 30,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        self.csv_path, self.lookback, self.horizon = csv_path, lookback, horizon
        self.target, self.features, self.protocol = target, features, protocol
        self.train_windows, self.val_windows, self.predict_windows = train_windows, val_windows, predict_windows
        self.generated_hours = generated_hours
        self.eval_batch_size = eval_batch_size or batch_size

    @property
    def num_channels(self) -> int:
        return len(self.channels)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        path = generated_csv(self.generated_hours, seed=0) if self.csv_path is None else resolve_csv(self.csv_path)
        protocol = infer_protocol(path) if self.protocol == "auto" else self.protocol
        self.path, self.source_hash = path, file_hash(path)
        self.dates, raw, self.channels = read_series_csv(path, self.target, self.features)
        starts, ends = split_borders(len(raw), self.lookback, protocol, path)
        self.scaler = Scaler(raw[starts[0] : ends[0]])
        self.values = self.scaler.transform(raw)
        span = self.lookback + self.horizon
        for name, s, e in zip(("train", "val", "test"), starts, ends):
            n = e - s - span + 1
            if n < 1:
                raise ForecastFormatError(path, None, f"the {name} split has {e - s} rows under protocol {protocol!r}; expected at "
                                                      f"least lookback + horizon = {span} rows in it (a longer file, or shorter windows)")
            window_starts = np.arange(s, s + n)
            if name == "train" and self.train_windows is not None and self.train_windows < n:
                rng = np.random.default_rng(self.seed)
                window_starts = np.sort(rng.choice(window_starts, self.train_windows, replace=False))
            if name == "val" and self.val_windows is not None and self.val_windows < n:
                window_starts = window_starts[np.linspace(0, n - 1, self.val_windows).round().astype(int)]
            self.splits[name] = WindowDataset(self.values, window_starts, self.lookback, self.horizon)
            self.record_split(name, window_starts)
        test = self.splits["test"].starts
        pick = np.linspace(0, len(test) - 1, min(self.predict_windows, len(test))).round().astype(int)
        self.splits["predict"] = WindowDataset(self.values, test[pick], self.lookback, self.horizon)
        self.protocol_used = protocol

    def val_dataloader(self) -> DataLoader:
        return self.loader("val", batch_size=self.eval_batch_size)  # never drop_last: every window counts

    def test_dataloader(self) -> DataLoader:
        return self.loader("test", batch_size=self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.loader("predict", batch_size=self.eval_batch_size)

    def describe(self) -> dict[str, Any]:
        """What a run read: file, hash, protocol, channels and window counts."""
        return {"csv": str(self.path), "sha256_16": self.source_hash, "protocol": self.protocol_used,
                "channels": self.channels, "lookback": self.lookback, "horizon": self.horizon, **self.split_sizes}

    def write_forecasts(self, out_dir: str | Path, starts: np.ndarray, forecast: np.ndarray) -> tuple[Path, Path]:
        """Write ``forecasts.csv`` (original units, long format) and ``forecasts.png``.

        ``forecast`` is ``[windows, horizon, channels]`` in scaled units for windows starting at
        ``starts``. The plot shows, per channel, the last window's history, truth and forecast.
        """
        plt = pyplot()

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        rows = []
        for s, f in zip(starts, forecast):
            t0 = int(s) + self.lookback
            truth = self.scaler.inverse(self.values[t0 : t0 + self.horizon])
            pred = self.scaler.inverse(f)
            for c, name in enumerate(self.channels):
                rows.append(pd.DataFrame({
                    "window_start": str(self.dates[int(s)]), "date": self.dates[t0 : t0 + self.horizon].astype(str),
                    "step": np.arange(1, self.horizon + 1), "channel": name, "forecast": pred[:, c], "truth": truth[:, c],
                }))
        csv = out / "forecasts.csv"
        pd.concat(rows).to_csv(csv, index=False)

        s, f = int(starts[-1]), self.scaler.inverse(forecast[-1])
        hist = self.scaler.inverse(self.values[s : s + self.lookback + self.horizon])
        fig, axes = plt.subplots(self.num_channels, 1, figsize=(10, 1.8 * self.num_channels), sharex=True, squeeze=False)
        x_hist, x_fut = np.arange(-self.lookback, 0), np.arange(self.horizon)
        for c, ax in enumerate(axes[:, 0]):
            ax.plot(x_hist, hist[: self.lookback, c], color="0.4", lw=0.8, label="history")
            ax.plot(x_fut, hist[self.lookback :, c], color="k", lw=1.0, label="truth")
            ax.plot(x_fut, f[:, c], color="tab:red", lw=1.2, label="forecast")
            ax.set_ylabel(self.channels[c], fontsize=8)
        axes[0, 0].legend(loc="upper left", fontsize=7, ncol=3)
        axes[-1, 0].set_xlabel(f"steps from forecast origin {self.dates[s + self.lookback]}")
        fig.tight_layout()
        png = out / "forecasts.png"
        fig.savefig(png, dpi=90)
        plt.close(fig)
        (out / "data.json").write_text(json.dumps(self.describe(), indent=2))
        return csv, png
