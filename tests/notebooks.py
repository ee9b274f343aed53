"""Execute a notebook in a fresh kernel (the way a reader would) and fail on any cell error; check
that the committed notebook is not stale against the code (notebooks/refresh.py regenerates it)."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
INLINE = "module://matplotlib_inline.backend_inline"


def run_notebook(name: str, env: dict[str, str] | None = None, timeout: int = 300) -> nbformat.NotebookNode:
    """Run ``notebooks/<name>`` with extra environment variables (e.g. the run folder to read).

    The kernel inherits ``os.environ`` updated with ``env``; outputs stay in memory so the test
    can check them, and the committed notebook is not modified.
    """
    path = ROOT / "notebooks" / name
    nb = nbformat.read(path, as_version=4)
    old = dict(os.environ)
    os.environ.update(env or {})
    os.environ["MPLBACKEND"] = INLINE  # figures become outputs (Agg would draw them nowhere)
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    return nb


def cell_outputs(nb: nbformat.NotebookNode) -> str:
    """All text and error output of an executed notebook, to assert on."""
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") or str(o.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


def figure_count(nb: nbformat.NotebookNode) -> int:
    """Images among a notebook's outputs."""
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def committed(name: str) -> nbformat.NotebookNode:
    return nbformat.read(ROOT / "notebooks" / name, as_version=4)


def assert_fresh(name: str, executed: nbformat.NotebookNode) -> None:
    """The committed ``notebooks/<name>`` shows its figures, holds no error, and has as many figures
    as executing it now gives (a changed count means its outputs are stale: run notebooks/refresh.py)."""
    nb = committed(name)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"notebooks/{name} is committed with an error output: {errors[0].get('ename')}"
    assert nb.metadata.get("suite", {}).get("commands"), f"notebooks/{name} has no metadata.suite (see notebooks/refresh.py)"
    saved, now = figure_count(nb), figure_count(executed)
    assert saved > 0, f"notebooks/{name} is committed without its figures: run python notebooks/refresh.py {Path(name).stem}"
    assert saved == now, f"notebooks/{name} has {saved} committed figures but draws {now} now: run python notebooks/refresh.py {Path(name).stem}"
