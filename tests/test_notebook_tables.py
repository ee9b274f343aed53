"""notebooks/tables.py: the benchmark tables a notebook plots are read back exactly."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from notebooks.tables import markdown_tables, mean_std


def test_tables_and_mean_std_cells(tmp_path: Path) -> None:
    md = tmp_path / "r.md"
    md.write_text("# t\n\n| method | acc |\n|---|---|\n| a | 95.9 ± 2.6 |\n| b | n/a |\n\ntext\n| x |\n|---|\n| 1 |\n")
    first, second = markdown_tables(md)
    assert list(first.columns) == ["method", "acc"] and first["method"].tolist() == ["a", "b"]
    assert second["x"].tolist() == ["1"]
    assert mean_std(first["acc"][0]) == (95.9, 2.6) and mean_std("-0.6 ± 0.7 (vs probe)") == (-0.6, 0.7)
    assert all(math.isnan(v) for v in mean_std(first["acc"][1]))


def test_a_ragged_row_names_the_file(tmp_path: Path) -> None:
    md = tmp_path / "bad.md"
    md.write_text("| a | b |\n|---|---|\n| 1 |\n")
    with pytest.raises(ValueError, match=r"bad\.md: a table row has 1 cells, its header 2"):
        markdown_tables(md)


def test_the_committed_results_parse() -> None:
    root = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    for md in sorted(root.glob("*.md")):
        markdown_tables(md)  # a notebook plots from these
