"""Test MSE / MAE pinned to values computed by hand: the literature's global mean over every
element of every window, whatever the batch sizes (the last batch is partial, never dropped)."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from domains.forecasting.data import ForecastData
from domains.forecasting.model import ForecastModule, OneForAll


class Persistence(ForecastModule):
    """The naive forecast: every future step repeats the last observed value (no parameters)."""

    def __init__(self, lookback: int, horizon: int, **kwargs) -> None:
        super().__init__(lookback=lookback, horizon=horizon, revin=False, **kwargs)

    def forecast(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, -1:, :].expand(-1, self.horizon, -1)


def _trainer(tmp_path) -> L.Trainer:
    return L.Trainer(logger=False, default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                     accelerator="cpu", precision="32-true")


def _windows(xs: list[list[float]], ys: list[list[float]]) -> list[dict]:
    return [{"x": torch.tensor(x).reshape(-1, 1), "y": torch.tensor(y).reshape(-1, 1), "start": i} for i, (x, y) in enumerate(zip(xs, ys))]


def test_mse_mae_by_hand_on_three_windows_in_uneven_batches(tmp_path):
    # window 1: x [0, 1] -> forecast [1, 1], truth [2, 4]: errors 1, 3
    # window 2: x [5, 3] -> forecast [3, 3], truth [3, 0]: errors 0, -3
    # window 3: x [1, 1] -> forecast [1, 1], truth [2, 1]: errors 1, 0
    # MSE = (1 + 9 + 0 + 9 + 1 + 0) / 6 = 10/3 and MAE = (1 + 3 + 0 + 3 + 1 + 0) / 6 = 4/3, over all 6 elements;
    # averaging the two batches' MSE instead would give (19/4 + 1/2) / 2 = 2.625
    windows = _windows([[0, 1], [5, 3], [1, 1]], [[2, 4], [3, 0], [2, 1]])
    loader = DataLoader(windows, batch_size=2)  # batches of 2 and 1
    trainer = _trainer(tmp_path)
    model = Persistence(lookback=2, horizon=2)
    test = trainer.test(model, dataloaders=loader, verbose=False)[0]
    val = trainer.validate(model, dataloaders=loader, verbose=False)[0]
    for out, stage in ((test, "test"), (val, "val")):
        assert out[f"{stage}/mse"] == pytest.approx(10 / 3, rel=1e-6)
        assert out[f"{stage}/mae"] == pytest.approx(4 / 3, rel=1e-6)


def test_one_for_all_test_metrics_equal_numpy_over_every_test_window(tmp_path):
    dm = ForecastData(None, lookback=48, horizon=12, generated_hours=24 * 7 * 4, eval_batch_size=64, batch_size=16)
    dm.setup()
    n = dm.split_sizes["test"]
    assert n % 64 != 0  # a partial last batch is part of what is checked
    L.seed_everything(0)
    model = OneForAll(lookback=48, horizon=12, backbone="tiny", num_layers=1)
    torch.nn.init.normal_(model.head.lora.B, std=0.05)  # a forecast that is not the window mean
    out = _trainer(tmp_path).test(model, datamodule=dm, verbose=False)[0]

    starts = dm.splits["test"].starts
    x = np.stack([dm.values[s : s + 48] for s in starts])  # every test window, from the scaled series itself
    y = np.stack([dm.values[s + 48 : s + 60] for s in starts])
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).numpy().astype(np.float64)
    err = pred - y.astype(np.float64)
    assert out["test/mse"] == pytest.approx(float(np.mean(err**2)), rel=1e-5)
    assert out["test/mae"] == pytest.approx(float(np.mean(np.abs(err))), rel=1e-5)
    batch_means = [np.mean(err[i : i + 64] ** 2) for i in range(0, n, 64)]
    assert abs(np.mean(batch_means) - np.mean(err**2)) > 1e-4  # the check tells the global mean from a mean of batch means
