"""Time-Series-Library's ETT / custom-CSV loading logic, re-stated for tests (not imported: the
library is not a dependency). It is what ``Dataset_ETT_hour.__read_data__`` and
``Dataset_Custom.__read_data__`` do with ``features='M'``, ``scale=True``, ``label_len=0``:

* ``pd.read_csv(path)``; columns ``['date', <others in file order>, target]`` (Dataset_Custom's
  order; for a file in ETT's own layout, date first and OT last, it is exactly Dataset_ETT_hour's
  ``df_raw.columns[1:]``);
* borders ``[0, 12m - L, 16m - L]`` / ``[12m, 16m, 20m]`` with m = 30 * 24 rows (ETT hourly), or
  70 / 10 / 20 % of the rows (custom);
* sklearn's ``StandardScaler`` fit on ``df_data[0:12m].values`` (float64 statistics, population
  std, a zero scale set to 1; ``check_array`` refuses inf and text, lets NaN through), applied to
  every row;
* each split's dates parsed with ``pd.to_datetime`` (raises on a bad date in that split);
* ``data_x = data[border1:border2]``, ``len = len(data_x) - L - H + 1``, window ``i`` is
  ``x = data_x[i : i+L]``, ``y = data_x[i+L : i+L+H]``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

MONTH = 30 * 24


def tslib_borders(n_rows: int, seq_len: int, protocol: str) -> tuple[list[int], list[int]]:
    if protocol == "ett_hour":
        return [0, 12 * MONTH - seq_len, 16 * MONTH - seq_len], [12 * MONTH, 16 * MONTH, 20 * MONTH]
    num_train, num_test = int(n_rows * 0.7), int(n_rows * 0.2)
    num_vali = n_rows - num_train - num_test
    return [0, num_train - seq_len, n_rows - num_test - seq_len], [num_train, num_train + num_vali, n_rows]


def tslib_load(df_raw: pd.DataFrame, seq_len: int, pred_len: int, protocol: str, target: str = "OT") -> dict[str, tuple[np.ndarray, int]]:
    """``{split: (data_x float64, number of windows)}`` from ``df_raw = pd.read_csv(path)``; raises
    wherever the library raises."""
    cols = list(df_raw.columns)
    cols.remove(target)
    cols.remove("date")
    df_raw = df_raw[["date"] + cols + [target]]
    b1, b2 = tslib_borders(len(df_raw), seq_len, protocol)
    df_data = df_raw[df_raw.columns[1:]]
    train = np.asarray(df_data[b1[0] : b2[0]].values, dtype=np.float64)  # check_array: text raises here
    everything = np.asarray(df_data.values, dtype=np.float64)
    if np.isinf(train).any() or np.isinf(everything).any():
        raise ValueError("Input contains infinity")  # check_array(force_all_finite="allow-nan")
    mean, scale = np.nanmean(train, 0), np.nanstd(train, 0)
    scale[scale < 10 * np.finfo(np.float64).eps] = 1.0  # _handle_zeros_in_scale
    data = (everything - mean) / scale
    out = {}
    for i, name in enumerate(("train", "val", "test")):
        pd.to_datetime(df_raw[["date"]][b1[i] : b2[i]].date)
        data_x = data[b1[i] : b2[i]]
        out[name] = (data_x, len(data_x) - seq_len - pred_len + 1)
    return out


def refused_on_purpose(df: pd.DataFrame, seq_len: int, pred_len: int, protocol: str, target: str = "OT") -> str | None:
    """Why a file (``df = pd.read_csv(path)``) that the library would load, or crash on late, is
    refused by the suite; ``None`` if it is not.

    The library reads these silently and trains on what it got: rows with one field more than
    the header (pandas then takes the dates as the index and shifts every column), NaN (sklearn
    lets it through), text that numpy would still turn into a number (``'1_0'``), True/False,
    values beyond float32, a bad date outside the split that is parsed, a series shorter than its
    protocol (short or empty splits, negative borders).
    """
    if not isinstance(df.index, pd.RangeIndex):
        return "more fields than header"
    if "date" not in df.columns or target not in df.columns:
        return "no date or target column"
    if len(df) == 0 or pd.api.types.is_numeric_dtype(df["date"]) or pd.to_datetime(df["date"], errors="coerce").isna().any():
        return "dates"
    data = df[[c for c in df.columns if c != "date"]]
    if any(pd.api.types.is_bool_dtype(data[c]) or not pd.api.types.is_numeric_dtype(data[c]) for c in data):
        return "a column pandas does not read as numbers"
    with np.errstate(over="ignore"):
        if not np.isfinite(data.to_numpy(np.float64).astype(np.float32)).all():
            return "NaN, inf or beyond float32"
    b1, b2 = tslib_borders(len(df), seq_len, protocol)
    if len(df) < b2[-1] or min(b1) < 0 or any(e - s - seq_len - pred_len + 1 < 1 for s, e in zip(b1, b2)):
        return "too short for the protocol"
    return None
