"""Plots are optional: matplotlib comes with the `plots` extra.

Figures are drawn with matplotlib's object-oriented API and rendered by the non-interactive Agg
canvas, without pyplot, so drawing a plot changes no global backend or figure state of the
process that imports stream-swav.
"""
from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'stream-swav[plots]'"
DPI = 100


def new_figure(width_px: int, height_px: int, name: str) -> Figure | None:
    """An empty figure of width_px x height_px, or None, after a log line saying that the plot `name`
    is skipped, when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("%s not drawn: matplotlib is not installed (%s); the results files are written as usual",
                    name, INSTALL_HINT)
        return None
    return Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, layout="constrained")


def png_bytes(figure: Figure) -> bytes:
    """The figure as PNG, at the size it was created with."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


__all__ = ["INSTALL_HINT", "new_figure", "png_bytes"]
