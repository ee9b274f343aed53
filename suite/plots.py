"""matplotlib for the PNG files that runs write: the file-only Agg backend, imported when a plot is drawn.

Importing pyplot costs about a second and needs no display; a run that draws nothing never pays it.
"""

from __future__ import annotations

from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display on servers and CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
