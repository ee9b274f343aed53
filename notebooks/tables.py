"""Reading the committed benchmark tables (``benchmarks/results/*.md``) back into DataFrames, so a
notebook can plot a domain against its baselines from the numbers the benchmark printed."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

_MEAN_STD = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*±\s*(\d+(?:\.\d+)?)")


def markdown_tables(path: str | Path) -> list[pd.DataFrame]:
    """Every pipe table of a markdown file, in order, as DataFrames of strings (header row as columns)."""
    tables, block = [], []
    for line in [*Path(path).read_text().splitlines(), ""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            header, rows = block[0], block[2:]  # block[1] is the |---| separator
            bad = [r for r in rows if len(r) != len(header)]
            if bad:
                raise ValueError(f"{path}: a table row has {len(bad[0])} cells, its header {len(header)}: {bad[0]}")
            tables.append(pd.DataFrame(rows, columns=header))
            block = []
    return tables


def mean_std(cell: str) -> tuple[float, float]:
    """``"3.749 ± 0.004"`` -> ``(3.749, 0.004)``; NaNs for a cell that holds no such pair."""
    m = _MEAN_STD.match(str(cell))
    return (float(m.group(1)), float(m.group(2))) if m else (float("nan"), float("nan"))
