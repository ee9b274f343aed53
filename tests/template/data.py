"""Template domain, data: a real-format reader, a seeded generator in that format, the DataModule.

The "real format" here is a CSV with one row per sample: ``id,group,label,x0,...,x{d-1}``. A domain
would read its field's format instead (PanNuke folds, ETT CSVs, HDF5 showers), test the reader on
small files written in exactly that format, and write its generated default in the same format so
one reader serves both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from suite.data import DataFormatError, SuiteDataModule, cached, generated_dir, split_by_group


def read_samples(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, groups, labels, features)`` of a sample CSV; bad files name the file, field and form."""
    path = Path(path)
    try:
        table = np.genfromtxt(path, delimiter=",", names=True, dtype=None, encoding="utf-8")
    except (OSError, ValueError) as err:
        raise DataFormatError(path, None, f"not a readable CSV with a header row ({err})") from err
    names = table.dtype.names or ()
    for field in ("id", "group", "label"):
        if field not in names:
            raise DataFormatError(path, field, f"missing; expected columns id,group,label,x0,... (have {list(names)})")
    feats = [n for n in names if n.startswith("x")]
    if not feats:
        raise DataFormatError(path, "x0", "no feature columns x0, x1, ...")
    x = np.stack([table[n].astype(np.float32) for n in feats], 1)
    if not np.isfinite(x).all():
        row = int(np.argwhere(~np.isfinite(x))[0, 0])
        raise DataFormatError(path, feats[0], f"row {row + 1} holds NaN or inf; expected finite numbers")
    return table["id"].astype(str), table["group"].astype(str), table["label"].astype(np.int64), x


def write_samples(path: str | Path, ids, groups, labels, x: np.ndarray) -> None:
    header = "id,group,label," + ",".join(f"x{i}" for i in range(x.shape[1]))
    rows = [f"{i},{g},{y}," + ",".join(f"{v:.6f}" for v in row) for i, g, y, row in zip(ids, groups, labels, x)]
    Path(path).write_text(header + "\n" + "\n".join(rows) + "\n")


def generate(n: int, num_classes: int, dim: int, seed: int) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Gaussian clusters, one per class, sampled in groups of 4 (a group is one "patient")."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 2.0, (num_classes, dim))
    labels = np.arange(n) % num_classes
    x = centres[labels] + rng.normal(0, 1.0, (n, dim))
    return [f"s{i}" for i in range(n)], [f"g{i // 4}" for i in range(n)], labels, x.astype(np.float32)


class TemplateData(SuiteDataModule):
    """Samples from ``path`` (a CSV in the format above) or, by default, the generated set.

    ``num_classes`` is an attribute, so the CLI links it into the model (stated once).
    """

    def __init__(self, path: str | None = None, n: int = 96, num_classes: int = 3, dim: int = 8, batch_size: int = 16, seed: int = 0) -> None:
        super().__init__(batch_size=batch_size, seed=seed)
        self.path, self.n, self.num_classes, self.dim = path, n, num_classes, dim

    def source(self) -> Path:
        if self.path is not None:
            return Path(self.path)
        target = generated_dir("template") / f"samples_{self.n}_{self.num_classes}_{self.dim}.csv"
        return cached(target, lambda tmp: write_samples(tmp, *generate(self.n, self.num_classes, self.dim, seed=0)))

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        ids, groups, labels, x = read_samples(self.source())
        for name, idx in split_by_group(groups, {"train": 0.6, "val": 0.2, "test": 0.2}, self.seed).items():
            self.splits[name] = TensorDataset(torch.from_numpy(x[idx]), torch.from_numpy(labels[idx]))
            self.record_split(name, ids[idx])
