"""Sliding-window inference over rasters of any size with bounded memory.

The raster is cut into overlapping windows (``window_grid``); the last window of every row and
column is flush with the raster edge, so every pixel is predicted. Window predictions are blended
with smooth weights (``blend_weights``) into a running buffer that holds only the rows still being
touched: windows are processed one horizontal strip (one window row) at a time and finished rows are
written with windowed writes. Peak memory is about
``(num_classes + 2) * 4 bytes * (window_height + 256) * raster_width`` plus one batch of windows,
independent of the raster's height.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from seg_pipeline.inference.writers import class_dtype_for, geotiff_profile, scale_probabilities
from seg_pipeline.io import atomic_write
from seg_pipeline.progress import ItemProgress

__all__ = ["blend_weights", "predict_raster", "window_grid"]

logger = logging.getLogger(__name__)

PredictFn = Callable[[torch.Tensor], torch.Tensor]
Normalize = Callable[[np.ndarray], np.ndarray]


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


class _StripBuffer:
    """Weighted probability sums for raster rows ``top .. top + rows`` (full width)."""

    def __init__(self, num_classes: int, width: int) -> None:
        self.top = 0
        self.sums = np.zeros((num_classes, 0, width), dtype=np.float32)
        self.weights = np.zeros((0, width), dtype=np.float32)
        self.valid = np.zeros((0, width), dtype=bool)

    def extend_to(self, bottom: int) -> None:
        missing = bottom - (self.top + self.weights.shape[0])
        if missing > 0:
            classes, _, width = self.sums.shape
            self.sums = np.concatenate([self.sums, np.zeros((classes, missing, width), np.float32)], axis=1)
            self.weights = np.concatenate([self.weights, np.zeros((missing, width), np.float32)], axis=0)
            self.valid = np.concatenate([self.valid, np.zeros((missing, width), bool)], axis=0)

    def add(self, window: Window, probabilities: np.ndarray, weights: np.ndarray, valid: np.ndarray) -> None:
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


def _band_nodata(src: rasterio.io.DatasetReader, band_indexes: list[int], override: float | None) -> list:
    if override is not None:
        return [override] * len(band_indexes)
    return [src.nodatavals[index - 1] for index in band_indexes]


def _read_window(
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


def _check_probabilities(probabilities: torch.Tensor, expected: tuple[int, ...]) -> np.ndarray:
    if not isinstance(probabilities, torch.Tensor):
        probabilities = torch.as_tensor(probabilities)
    if tuple(probabilities.shape) != expected:
        raise ValueError(
            f"predict_fn must return probabilities {expected} (B, num_classes, h, w), "
            f"got {tuple(probabilities.shape)}; check num_classes."
        )
    return probabilities.detach().float().cpu().numpy()


def _resolve_class_dtype(class_dtype: str, class_nodata: int | None, num_classes: int) -> tuple[str, int]:
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


def predict_raster(
    src_path: str | os.PathLike[str],
    dst_path: str | os.PathLike[str],
    predict_fn: PredictFn,
    *,
    num_classes: int,
    window: int | Sequence[int] = 512,
    overlap: int = 64,
    batch_size: int = 4,
    bands: Sequence[int] | None = None,
    normalize: Normalize | None = None,
    input_nodata: float | None = None,
    blend: str = "cosine",
    write_probabilities: str | os.PathLike[str] | None = None,
    probability_dtype: str = "float32",
    class_dtype: str = "auto",
    class_nodata: int | None = None,
    log_fn: Callable[[str], None] | None = None,
    progress_delay_s: float = 5.0,
) -> dict[str, Any]:
    """Predict a raster window by window and write a GeoTIFF class map (and optionally probabilities).

    Args:
        src_path: Any raster rasterio reads (GeoTIFF, PNG, ...).
        dst_path: Output class map GeoTIFF: one band, the source's CRS, transform and size,
            tiled and deflate-compressed, uint8 up to 255 classes else uint16.
        predict_fn: Maps a float32 batch (B, C, h, w) to probabilities (B, num_classes, h, w),
            e.g. an ``EnsemblePredictor``.
        num_classes: Number of classes K the predictor returns.
        window: Window size (int or (height, width)); rasters smaller than it are one window.
        overlap: Pixels shared by neighbouring windows, blended with ``blend`` weights.
        batch_size: Windows per ``predict_fn`` call.
        bands: 1-based band indexes to read (default: all).
        normalize: Maps a window (C, h, w) float32 array to the model's input scale.
        input_nodata: Overrides the source's per-band nodata values.
        blend: ``"cosine"`` or ``"uniform"`` window weights.
        write_probabilities: Optional path of a K-band probability GeoTIFF.
        probability_dtype: ``"float32"`` (NaN at nodata) or ``"uint8"`` (round(p * 255)).
        class_dtype: ``"auto"``, ``"uint8"`` or ``"uint16"``.
        class_nodata: Value written where all input bands are nodata (default: the dtype's max).
        log_fn: Sink for per-window progress lines (default: the ``seg_pipeline.inference.tiling``
            logger at INFO), so a large raster shows throughput and ETA while it runs.
        progress_delay_s: Window progress starts only after this many seconds, so small rasters
            (most of them, predicted in a fraction of that) add no lines; 0 reports every raster.

    Returns:
        Summary dict (paths, size, windows, dtype, nodata, per-class pixel counts, seconds), small
        enough for Dagster metadata. Outputs appear atomically; on error nothing is left behind.
    """
    started = time.perf_counter()
    src_path, dst_path = Path(src_path), Path(dst_path)
    if not src_path.is_file():
        raise FileNotFoundError(f"src_path {src_path} does not exist.")
    if dst_path.resolve() == src_path.resolve():
        raise ValueError(f"dst_path {dst_path} would overwrite the input raster; choose another path.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if probability_dtype not in ("float32", "uint8"):
        raise ValueError(f"probability_dtype must be 'float32' or 'uint8', got {probability_dtype!r}.")
    dtype, nodata = _resolve_class_dtype(class_dtype, class_nodata, num_classes)

    with (
        rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # PNG/JPEG inputs are fine without CRS
        with rasterio.open(src_path) as src:
            band_indexes = list(bands) if bands is not None else list(range(1, src.count + 1))
            if not band_indexes or any(not 1 <= index <= src.count for index in band_indexes):
                raise ValueError(
                    f"bands={bands!r} must be 1-based indexes within 1..{src.count} of {src_path}."
                )
            height, width = src.height, src.width
            windows = window_grid(height, width, window, overlap)
            weights = blend_weights(windows[0].height, windows[0].width, overlap, blend)
            georeference = {"crs": src.crs, "transform": src.transform}
            class_profile = geotiff_profile(height, width, 1, dtype, nodata=nodata, **georeference)
            prob_profile = geotiff_profile(
                height,
                width,
                num_classes,
                probability_dtype,
                nodata=float("nan") if probability_dtype == "float32" else None,
                **georeference,
            )
            nodata_values = _band_nodata(src, band_indexes, input_nodata)
            counts = np.zeros(num_classes, dtype=np.int64)
            nodata_pixels = 0

            with contextlib.ExitStack() as outputs:
                class_dst = outputs.enter_context(
                    rasterio.open(outputs.enter_context(atomic_write(dst_path)), "w", **class_profile)
                )
                prob_dst = None
                if write_probabilities is not None:
                    prob_dst = outputs.enter_context(
                        rasterio.open(
                            outputs.enter_context(atomic_write(write_probabilities)), "w", **prob_profile
                        )
                    )

                def flush(buffer: _StripBuffer, bottom: int) -> None:
                    nonlocal counts, nodata_pixels
                    if bottom <= buffer.top:
                        return
                    rows = Window(col_off=0, row_off=buffer.top, width=width, height=bottom - buffer.top)
                    probabilities, valid = buffer.pop(bottom)
                    classes = probabilities.argmax(axis=0).astype(dtype)
                    classes[~valid] = nodata
                    counts += np.bincount(classes[valid].ravel(), minlength=num_classes)[:num_classes]
                    nodata_pixels += int((~valid).sum())
                    class_dst.write(classes, 1, window=rows)
                    if prob_dst is not None:
                        probabilities[:, ~valid] = np.nan
                        prob_dst.write(scale_probabilities(probabilities, probability_dtype), window=rows)

                buffer = _StripBuffer(num_classes, width)
                block_rows = class_profile["blockysize"]
                strips = [list(group) for _, group in itertools.groupby(windows, key=lambda w: w.row_off)]
                progress = ItemProgress(
                    f"predict {src_path.name}",
                    len(windows),
                    unit="windows",
                    log_fn=log_fn or logger.info,
                    delay_s=progress_delay_s,
                )
                with torch.inference_mode():
                    for strip_index, strip in enumerate(strips):
                        buffer.extend_to(strip[0].row_off + strip[0].height)
                        for start in range(0, len(strip), batch_size):
                            batch_windows = strip[start : start + batch_size]
                            reads = [
                                _read_window(src, w, band_indexes, nodata_values, normalize)
                                for w in batch_windows
                            ]
                            inputs = torch.from_numpy(np.stack([data for data, _ in reads]))
                            expected = (len(batch_windows), num_classes, *inputs.shape[-2:])
                            probabilities = _check_probabilities(predict_fn(inputs), expected)
                            for win, probs, (_, valid) in zip(
                                batch_windows, probabilities, reads, strict=True
                            ):
                                buffer.add(win, probs, weights, valid)
                            progress.advance(
                                len(batch_windows), detail=f"strip {strip_index + 1}/{len(strips)}"
                            )
                        last = strip_index == len(strips) - 1
                        finished = height if last else strips[strip_index + 1][0].row_off
                        # Write whole GeoTIFF block rows so no compressed tile is written twice.
                        flush(buffer, finished if last else finished - finished % block_rows)
                progress.done()

    return {
        "dst_path": str(dst_path),
        "probabilities_path": str(write_probabilities) if write_probabilities is not None else None,
        "height": height,
        "width": width,
        "num_classes": num_classes,
        "num_windows": len(windows),
        "window": [windows[0].height, windows[0].width],
        "overlap": overlap,
        "class_dtype": dtype,
        "class_nodata": nodata,
        "nodata_pixels": nodata_pixels,
        "class_pixel_counts": counts.tolist(),
        "crs": str(georeference["crs"]) if georeference["crs"] else None,
        "seconds": round(time.perf_counter() - started, 3),
    }
