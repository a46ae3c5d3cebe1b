"""Pieces of windowed prediction: reading one window, and the strip buffer that blends windows.

The buffer blends overlapping window predictions while holding only the rows still being touched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.windows import Window

from seg_pipeline.inference.writers import class_dtype_for

Normalize = Callable[[np.ndarray], np.ndarray]


class StripBuffer:
    """Weighted probability sums for raster rows ``top .. top + rows`` (full width)."""

    def __init__(self, num_classes: int, width: int) -> None:
        self.top = 0
        self.sums = np.zeros((num_classes, 0, width), dtype=np.float32)
        self.weights = np.zeros((0, width), dtype=np.float32)
        self.valid = np.zeros((0, width), dtype=bool)

    def extend_to(self, bottom: int) -> None:
        """Grow the buffer so it holds rows up to ``bottom``."""
        missing = bottom - (self.top + self.weights.shape[0])
        if missing > 0:
            classes, _, width = self.sums.shape
            self.sums = np.concatenate([self.sums, np.zeros((classes, missing, width), np.float32)], axis=1)
            self.weights = np.concatenate([self.weights, np.zeros((missing, width), np.float32)], axis=0)
            self.valid = np.concatenate([self.valid, np.zeros((missing, width), bool)], axis=0)

    def add(self, window: Window, probabilities: np.ndarray, weights: np.ndarray, valid: np.ndarray) -> None:
        """Add one window's probabilities with its blend weights and validity."""
        rows = slice(window.row_off - self.top, window.row_off - self.top + window.height)
        cols = slice(window.col_off, window.col_off + window.width)
        self.sums[:, rows, cols] += probabilities * weights
        self.weights[rows, cols] += weights
        self.valid[rows, cols] |= valid

    def pop(self, bottom: int) -> tuple[np.ndarray, np.ndarray]:
        """Remove rows ``top .. bottom`` and return their blended probabilities and validity."""
        count = bottom - self.top
        probabilities = self.sums[:, :count] / self.weights[:count]
        valid = self.valid[:count]
        self.sums = self.sums[:, count:].copy()
        self.weights = self.weights[count:].copy()
        self.valid = self.valid[count:].copy()
        self.top = bottom
        return probabilities, valid


def band_nodata(src: rasterio.io.DatasetReader, band_indexes: list[int], override: float | None) -> list:
    """The nodata value of each band read (``override`` for all when given)."""
    if override is not None:
        return [override] * len(band_indexes)
    return [src.nodatavals[index - 1] for index in band_indexes]


def read_window(
    src: rasterio.io.DatasetReader,
    window: Window,
    band_indexes: list[int],
    nodata_values: list,
    normalize: Normalize | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read one window as float32 (C, h, w) plus a validity mask (h, w).

    A pixel is nodata when every band is NaN or equals its band's nodata value. NaNs are set to 0
    before ``normalize`` and nodata pixels to 0 after it, so they cannot poison the model's input.
    """
    data = src.read(band_indexes, window=window, out_dtype="float32")
    missing = np.isnan(data)
    for band, nodata in enumerate(nodata_values):
        if nodata is not None and not np.isnan(nodata):
            missing[band] |= data[band] == np.float32(nodata)
    valid = ~missing.all(axis=0)
    data = np.nan_to_num(data, nan=0.0)
    if normalize is not None:
        data = np.asarray(normalize(data), dtype=np.float32)
        if data.shape[1:] != valid.shape:
            raise ValueError(f"normalize changed the window size from {valid.shape} to {data.shape[1:]}.")
    data[:, ~valid] = 0.0
    return data, valid


def check_probabilities(name: str, probabilities: Any, expected: tuple[int, ...]) -> np.ndarray:
    """Probabilities of set ``name`` as float32 numpy, refusing a shape other than ``expected``."""
    if not isinstance(probabilities, torch.Tensor):
        probabilities = torch.as_tensor(probabilities)
    if tuple(probabilities.shape) != expected:
        raise ValueError(
            f"predict_fn must return probabilities {expected} (B, num_classes, h, w) for {name!r}, "
            f"got {tuple(probabilities.shape)}; check num_classes."
        )
    return probabilities.detach().float().cpu().numpy()


def resolve_class_dtype(class_dtype: str, class_nodata: int | None, num_classes: int) -> tuple[str, int]:
    """The class map's dtype and nodata value, checked to leave room for every class."""
    dtype = class_dtype_for(num_classes)[0] if class_dtype == "auto" else class_dtype
    if dtype not in ("uint8", "uint16"):
        raise ValueError(f"class_dtype must be 'auto', 'uint8' or 'uint16', got {class_dtype!r}.")
    nodata = int(np.iinfo(dtype).max) if class_nodata is None else class_nodata
    if not num_classes <= nodata <= np.iinfo(dtype).max:
        raise ValueError(
            f"class_nodata={nodata} must lie in {num_classes}..{np.iinfo(dtype).max} for "
            f"{num_classes} classes in {dtype}; pick class_dtype='uint16' or another nodata value."
        )
    return dtype, nodata
