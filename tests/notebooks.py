"""Execute a notebook in a fresh kernel (the way a reader would) and fail on any cell error."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent


def run_notebook(name: str, env: dict[str, str] | None = None, timeout: int = 300) -> nbformat.NotebookNode:
    """Run ``notebooks/<name>`` with extra environment variables (e.g. the run folder to read).

    The kernel inherits ``os.environ`` updated with ``env``; outputs stay in memory so the test
    can check them, and the committed notebook is not modified.
    """
    path = ROOT / "notebooks" / name
    nb = nbformat.read(path, as_version=4)
    old = dict(os.environ)
    os.environ.update(env or {})
    os.environ.setdefault("MPLBACKEND", "Agg")
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
