"""The embedded default of the forecasting domain: an electricity transformer under load.

Hourly loads and oil temperature in ETT's CSV layout (``date`` + HUFL, HULL, MUFL, MULL, LUFL,
LULL, OT), generated once per (length, seed) under ``data/generated/forecasting/``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.signal import lfilter

from suite.data import cached, generated_dir


def generate_transformer_load(n_hours: int = 24 * 7 * 30, seed: int = 0) -> pd.DataFrame:
    """Hourly loads and oil temperature of a distribution transformer, in ETT's CSV layout.

    * demand = slow trend x regime level (step changes at Poisson times: a new customer, a lost
      feeder) x daily profile (morning and evening peaks) x weekday/weekend factor + AR(1) noise;
    * six load channels (high / middle / low voltage, useful / useless) mix the demand with
      channel-specific phase shifts, so they are coupled but not collinear; useless (reactive)
      loads follow useful ones through a slowly drifting power factor;
    * OT, the top-oil temperature, is a first-order thermal model (IEC 60076-7 style):
      ``tau dT/dt = T_amb + dT_rated * ((K^2 R + 1)/(R + 1))^0.8 - T`` with load factor K, loss ratio R,
      and ambient temperature with a daily cycle, a seasonal drift and weather noise.
    """
    rng = np.random.default_rng(seed)
    dates = pd.date_range("2020-01-01", periods=n_hours, freq="h")
    t = np.arange(n_hours, dtype=np.float64)
    hour, day = t % 24, dates.day_of_week.to_numpy()
    daily = 1.0 + 0.25 * np.exp(-0.5 * ((hour - 9) / 2.0) ** 2) + 0.35 * np.exp(-0.5 * ((hour - 19) / 2.5) ** 2) - 0.2 * np.cos(2 * np.pi * hour / 24)
    weekly = np.where(day >= 5, 0.8, 1.0)  # Saturdays and Sundays draw less
    trend = 1.0 + 0.15 * t / n_hours
    n_changes = rng.poisson(n_hours / (24 * 60))  # about one regime change every two months
    level = np.ones(n_hours)
    for at in rng.integers(0, n_hours, n_changes):
        level[at:] *= rng.uniform(0.8, 1.25)
    noise = _ar1(rng, n_hours, phi=0.9, sigma=0.05)  # demand noise with a ~10 h memory
    demand = trend * level * weekly * daily * (1 + noise)

    cols: dict[str, np.ndarray] = {}
    power_factor = 0.9 + 0.05 * np.sin(2 * np.pi * t / (24 * 45) + rng.uniform(0, 2 * np.pi))
    for name, scale, lag in (("H", 8.0, 0), ("M", 5.0, 1), ("L", 3.0, 2)):
        useful = scale * _delay(demand, lag) * (1 + rng.normal(0, 0.03, n_hours))
        cols[f"{name}UFL"] = useful
        cols[f"{name}ULL"] = useful * np.sqrt(1 / power_factor**2 - 1) * (1 + rng.normal(0, 0.05, n_hours))

    weather = _ar1(rng, n_hours, phi=0.98, sigma=0.4)  # synoptic weather, ~2 day memory
    ambient = 15 + 8 * np.sin(2 * np.pi * (t / (24 * 365) - 0.25)) + 4 * np.sin(2 * np.pi * (hour - 9) / 24) + weather
    k = demand / demand.mean()  # load factor relative to the rated (mean) load
    ratio, rise, tau = 5.0, 25.0, 3.0  # load/no-load loss ratio, rated oil rise (K), oil time constant (h)
    steady = ambient + rise * ((k**2 * ratio + 1) / (ratio + 1)) ** 0.8  # 0.8: IEC oil exponent (ONAN)
    # explicit Euler of the first-order oil model with a 1 h step, started in equilibrium
    oil = lfilter([1 / tau], [1, -(1 - 1 / tau)], steady, zi=[steady[0] * (1 - 1 / tau)])[0]
    cols["OT"] = oil + rng.normal(0, 0.2, n_hours)

    df = pd.DataFrame({"date": dates.strftime("%Y-%m-%d %H:%M:%S"), **{name: v.round(4) for name, v in cols.items()}})
    return df


def _ar1(rng: np.random.Generator, n: int, phi: float, sigma: float) -> np.ndarray:
    """AR(1) noise ``a[i] = phi a[i-1] + N(0, sigma)``."""
    return lfilter([1.0], [1.0, -phi], rng.normal(0, sigma, n))


def _delay(x: np.ndarray, lag: int) -> np.ndarray:
    """``x`` delayed by ``lag`` steps, the first value held (no wrap-around)."""
    return np.concatenate([np.repeat(x[:1], lag), x[: len(x) - lag]])


def generated_csv(n_hours: int = 24 * 7 * 30, seed: int = 0) -> Path:
    """The generated CSV, built once under ``data/generated/forecasting/``."""
    path = generated_dir("forecasting") / f"transformer_load_{n_hours}h_seed{seed}.csv"
    return cached(path, lambda tmp: generate_transformer_load(n_hours, seed).to_csv(tmp, index=False))
