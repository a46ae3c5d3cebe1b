"""Window geometry of sliding-window inference: the grid of windows and their blending weights.

The raster is cut into the fewest windows of at most the configured size that overlap by at least
``overlap`` pixels (:func:`window_grid`); the windows are then shrunk to the smallest multiple of
:data:`ALIGN` that still covers the raster and spaced at equal strides, first flush with one edge
and last flush with the other. So a 2000 px axis with windows of 1024 (overlap 32) gets two windows
of 1024, and a 1100 px axis two of 576 instead of two of 1024: the forward passes see close to the
raster's own pixels, not the configured window's multiples. Window predictions are blended with
smooth weights (:func:`blend_weights`) that never reach 0, so pixels seen by one window only keep
their prediction.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rasterio.windows import Window

__all__ = ["ALIGN", "blend_weights", "window_grid"]


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int | np.integer) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int | np.integer) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints (height, width), got {value!r}.")
    return int(pair[0]), int(pair[1])


#: Window sides are rounded up to this multiple: SMP encoders downsample by 32, so a window of any
#: other size would be padded to it anyway.
ALIGN = 32


def _axis_windows(size: int, window: int, overlap: int) -> tuple[list[int], int]:
    """Starts and common length of the windows along one axis of ``size`` pixels.

    The count is the fewest windows of ``window`` pixels that overlap by ``overlap``; the length is
    then the smallest multiple of :data:`ALIGN` (at most ``window``) that still covers the axis
    with that count and overlap, and the starts are spread evenly from 0 to ``size - length``.
    """
    if size <= window:
        return [0], size
    count = -(-(size - overlap) // (window - overlap))
    needed = -(-(size + (count - 1) * overlap) // count)
    length = min(window, -(-needed // ALIGN) * ALIGN, size)
    starts = [(index * (size - length)) // (count - 1) for index in range(count)]
    return starts, length


def window_grid(height: int, width: int, window: int | Sequence[int], overlap: int = 0) -> list[Window]:
    """Overlapping windows that cover a ``height`` x ``width`` raster, in row-major order.

    Args:
        height: Raster height in pixels.
        width: Raster width in pixels.
        window: Window size, an int or ``(height, width)``.
        overlap: Pixels shared by neighbouring windows (stride = window - overlap).

    Returns:
        ``rasterio.windows.Window`` objects, all of one shape (so one set of blend weights fits
        every window). Along an axis the raster is smaller than the window, the single window has
        the raster's size (the predictor pads it as its model needs).
    """
    win_h, win_w = _pair(window, "window")
    if height < 1 or width < 1:
        raise ValueError(f"raster size must be positive, got height={height}, width={width}.")
    if win_h < 1 or win_w < 1:
        raise ValueError(f"window must be > 0, got {window!r}.")
    if not isinstance(overlap, int | np.integer) or overlap < 0:
        raise ValueError(f"overlap must be an int >= 0, got {overlap!r}.")
    if overlap >= min(win_h, win_w):
        raise ValueError(f"overlap={overlap} must be smaller than window={window!r}; lower the overlap.")
    rows, row_length = _axis_windows(height, win_h, overlap)
    cols, col_length = _axis_windows(width, win_w, overlap)
    return [
        Window(col_off=col, row_off=row, width=col_length, height=row_length) for row in rows for col in cols
    ]


def _ramp(length: int, overlap: int) -> np.ndarray:
    """1-D weights: Hann ramp up over ``overlap`` pixels at both ends, 1 in between, never 0."""
    weights = np.ones(length, dtype=np.float64)
    if overlap <= 0:
        return weights
    steps = np.arange(1, overlap + 1)
    ramp = 0.5 * (1.0 - np.cos(np.pi * steps / (overlap + 1)))  # in (0, 1)
    band = min(overlap, length)
    rising = weights.copy()
    rising[:band] = ramp[:band]
    return np.minimum(rising, rising[::-1])


def blend_weights(height: int, width: int, overlap: int, kind: str = "cosine") -> np.ndarray:
    """Per-pixel weights (height, width) float32 for blending overlapping window predictions.

    ``"cosine"`` is the outer product of two 1-D Hann ramps over the ``overlap`` band, so seams fade
    smoothly where windows overlap; the smallest weight is still > 0, so pixels seen by one window
    only (raster edges) keep their prediction. ``"uniform"`` weighs every pixel 1.
    """
    if height < 1 or width < 1:
        raise ValueError(f"blend_weights needs a positive size, got height={height}, width={width}.")
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, got {overlap}.")
    if kind == "uniform":
        return np.ones((height, width), dtype=np.float32)
    if kind != "cosine":
        raise ValueError(f"blend kind must be 'cosine' or 'uniform', got {kind!r}.")
    return np.outer(_ramp(height, overlap), _ramp(width, overlap)).astype(np.float32)
