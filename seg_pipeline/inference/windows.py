"""Window geometry of sliding-window inference: the grid of windows and their blending weights.

The raster is cut into overlapping windows (:func:`window_grid`); the last window of every row and
column is flush with the raster edge, so every pixel is predicted. Window predictions are blended
with smooth weights (:func:`blend_weights`) that never reach 0, so pixels seen by one window only
keep their prediction.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rasterio.windows import Window

__all__ = ["blend_weights", "window_grid"]


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int | np.integer) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int | np.integer) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints (height, width), got {value!r}.")
    return int(pair[0]), int(pair[1])


def _axis_starts(size: int, window: int, overlap: int) -> list[int]:
    """Window starts along one axis: stride ``window - overlap``, last start flush with the edge."""
    if size <= window:
        return [0]
    starts = list(range(0, size - window, window - overlap))
    starts.append(size - window)
    return starts


def window_grid(height: int, width: int, window: int | Sequence[int], overlap: int = 0) -> list[Window]:
    """Overlapping windows that cover a ``height`` x ``width`` raster, in row-major order.

    Args:
        height: Raster height in pixels.
        width: Raster width in pixels.
        window: Window size, an int or ``(height, width)``.
        overlap: Pixels shared by neighbouring windows (stride = window - overlap).

    Returns:
        ``rasterio.windows.Window`` objects. Along an axis the raster is smaller than the window,
        the single window has the raster's size (the predictor pads it as its model needs).
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
    rows = _axis_starts(height, win_h, overlap)
    cols = _axis_starts(width, win_w, overlap)
    return [
        Window(col_off=col, row_off=row, width=min(win_w, width), height=min(win_h, height))
        for row in rows
        for col in cols
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
