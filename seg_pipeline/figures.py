"""Matplotlib without a display, and one way to save a figure: whole or not at all.

Every picture the pipeline draws (training curves, split maps, report figures) goes through
:func:`pyplot` (the Agg backend, chosen before pyplot is imported, so no GUI toolkit is needed) and
:func:`save_png` (an atomic write, then the figure is closed so a long run does not keep them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from seg_pipeline.io import atomic_write


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (imported on first use: it costs about 0.3 s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path, dpi: int = 100) -> Path:
    """Write ``fig`` to ``path`` as a PNG through a temp file, close it, and return ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    pyplot().close(fig)
    return path
