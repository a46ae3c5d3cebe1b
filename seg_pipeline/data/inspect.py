"""Reading and validating one tile: its header, valid pixels, band statistics and mask value counts.

A tile that cannot be used is not an error here: :func:`inspect_tile` always returns a catalog row,
*quarantined* with a reason that names the file and what to do. Pixels are read block by block, so
memory stays bounded for rasters of any size.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.transform import Affine

from seg_pipeline.data.catalog import COLUMNS, STATUS_OK, STATUS_QUARANTINED
from seg_pipeline.data.mask_values import color_keys
from seg_pipeline.data.raster_io import RasterInfo, RasterReadError, info_from_dataset, open_raster
from seg_pipeline.data.spec import TileRecord
from seg_pipeline.io import file_sha256

#: Values per read block: bounds memory for big rasters (4 M values, 32 MB as float64 statistics).
_BLOCK_VALUES = 1 << 22
_TRANSFORM_TOLERANCE = 1e-6


def empty_row(record: TileRecord, settings_key: str) -> dict[str, Any]:
    """A catalog row for ``record`` with the file sizes and mtimes filled in and nothing read yet."""
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(
        item_id=record.item_id,
        status=STATUS_OK,
        reason="",
        fixed_split=record.fixed_split,
        image_path=str(record.image_path) if record.image_path else None,
        mask_path=str(record.mask_path) if record.mask_path else None,
        has_label=False,
        labeled_fraction=0.0,
        settings_key=settings_key,
    )
    for prefix, path in (("image", record.image_path), ("mask", record.mask_path)):
        if path is not None and path.exists():
            stat = path.stat()
            row[f"{prefix}_size"], row[f"{prefix}_mtime_ns"] = stat.st_size, stat.st_mtime_ns
    return row


def quarantine(row: dict[str, Any], reason: str) -> dict[str, Any]:
    """Mark ``row`` quarantined with ``reason`` (in place; returned for chaining)."""
    row["status"], row["reason"] = STATUS_QUARANTINED, reason
    return row


def _row_blocks(height: int, width: int, bands: int) -> Iterable[tuple[int, int]]:
    """Row ranges that keep one read under ``_BLOCK_VALUES`` values."""
    rows = max(1, _BLOCK_VALUES // max(1, width * bands))
    for start in range(0, height, rows):
        yield start, min(height, start + rows)


def _image_stats(path: Path) -> tuple[RasterInfo, dict[str, Any]]:
    """Read an image block by block: header, valid-pixel count and per-band statistics (memory follows
    the block: a 10980 px scene is never decoded whole).
    """
    from rasterio.windows import Window

    with open_raster(path) as src:
        info = info_from_dataset(src, path)
        n_valid = 0
        sums = np.zeros(info.count, dtype=np.float64)
        sq_sums = np.zeros(info.count, dtype=np.float64)
        for r0, r1 in _row_blocks(info.height, info.width, info.count):
            try:
                block = src.read(window=Window(0, r0, info.width, r1 - r0))
            except Exception as exc:  # GDAL raises several types for truncated files
                raise RasterReadError(
                    path, f"pixel data is corrupt or truncated ({exc}); re-export it"
                ) from exc
            finite = (
                np.isfinite(block).all(axis=0) if block.dtype.kind == "f" else np.ones(block.shape[1:], bool)
            )
            ok = finite if info.nodata is None else finite & ~(block == info.nodata).all(axis=0)
            n_valid += int(ok.sum())
            picked = block[:, ok].astype(np.float64)
            sums += picked.sum(axis=1)
            sq_sums += np.square(picked).sum(axis=1)
    mean = sums / max(n_valid, 1)
    std = np.sqrt(np.maximum(sq_sums / max(n_valid, 1) - mean**2, 0.0))
    stats = {
        "nodata_fraction": 1.0 - n_valid / max(info.height * info.width, 1),
        "band_mean": mean.tolist(),
        "band_std": std.tolist(),
        "n_valid": n_valid,
    }
    return info, stats


def _mask_problem(mask_info: RasterInfo, image_info: RasterInfo) -> str | None:
    """Why a mask cannot label its image (geometry, bands, dtype), or ``None``."""
    path = mask_info.path
    if mask_info.count in (3, 4) and mask_info.dtype != "uint8":
        return (
            f"mask {path} has {mask_info.count} bands of {mask_info.dtype}; colour masks must be 8-bit RGB(A)"
        )
    if mask_info.count not in (1, 3, 4):
        return (
            f"mask {path} has {mask_info.count} bands; masks must be single-band class ids or RGB(A) colours "
            "(with dataset.mask_colors)"
        )
    if np.dtype(mask_info.dtype).kind == "f":
        return (
            f"mask {path} has float dtype {mask_info.dtype}; masks must hold integer class ids "
            "(convert with gdal_translate -ot Byte)"
        )
    if (mask_info.width, mask_info.height) != (image_info.width, image_info.height):
        return (
            f"mask {path} is {mask_info.width}x{mask_info.height} but image {image_info.path} is "
            f"{image_info.width}x{image_info.height}; they must have the same size"
        )
    if mask_info.crs and image_info.crs and mask_info.crs != image_info.crs:
        return f"mask {path} CRS {mask_info.crs} differs from image CRS {image_info.crs}; reproject the mask"
    # Both carry a real transform (with or without a CRS: a shift is a shift): they must agree.
    identity = tuple(Affine.identity())
    both_placed = (
        tuple(mask_info.transform)[:6] != identity[:6] and tuple(image_info.transform)[:6] != identity[:6]
    )
    if both_placed and not np.allclose(
        mask_info.transform, image_info.transform, atol=_TRANSFORM_TOLERANCE, rtol=0
    ):
        return f"mask {path} transform {mask_info.transform} differs from the image's {image_info.transform}"
    return None


def _mask_counts(path: Path) -> dict[int, int]:
    """Pixel count of every raw value of a mask, read block by block (recoding comes later)."""
    from rasterio.windows import Window

    counts = np.zeros(1, dtype=np.int64)
    with open_raster(path) as src:
        if src.count >= 3:  # a colour mask: one key per colour (see mask_values.color_keys)
            return _color_counts(src, path)
        for r0, r1 in _row_blocks(src.height, src.width, 1):
            try:
                block = src.read(1, window=Window(0, r0, src.width, r1 - r0))
            except Exception as exc:
                raise RasterReadError(
                    path, f"pixel data is corrupt or truncated ({exc}); re-export it"
                ) from exc
            if block.min(initial=0) < 0:
                raise RasterReadError(
                    path, f"negative label {int(block.min())}; labels must be class ids >= 0"
                )
            values = np.bincount(block.astype(np.int64).ravel())
            if len(values) > len(counts):
                counts = np.pad(counts, (0, len(values) - len(counts)))
            counts[: len(values)] += values
    return {int(v): int(counts[v]) for v in np.nonzero(counts)[0]}


def _color_counts(src: Any, path: Path) -> dict[int, int]:
    from rasterio.windows import Window

    totals: dict[int, int] = {}
    for r0, r1 in _row_blocks(src.height, src.width, 3):
        try:
            block = src.read([1, 2, 3], window=Window(0, r0, src.width, r1 - r0))
        except Exception as exc:
            raise RasterReadError(path, f"pixel data is corrupt or truncated ({exc}); re-export it") from exc
        keys, counts = np.unique(color_keys(block), return_counts=True)
        for key, n in zip(keys.tolist(), counts.tolist(), strict=True):
            totals[key] = totals.get(key, 0) + n
    return totals


def inspect_tile(record: TileRecord, expected_bands: int | None, settings_key: str = "") -> dict[str, Any]:
    """Read and validate one tile; always returns a catalog row (quarantined on any problem).

    A mask's raw values are counted, not judged: class counts come from them once the dataset's
    recoding is known (:mod:`seg_pipeline.data.mask_values`).
    """
    row = empty_row(record, settings_key)
    if record.problem:
        return quarantine(row, record.problem)
    assert record.image_path is not None
    try:
        info, stats = _image_stats(record.image_path)
    except RasterReadError as exc:
        return quarantine(row, f"unreadable image: {exc}")
    row.update(
        driver=info.driver,
        width=info.width,
        height=info.height,
        bands=info.count,
        dtype=info.dtype,
        crs=info.crs,
        transform=list(info.transform),
        minx=info.bounds[0],
        miny=info.bounds[1],
        maxx=info.bounds[2],
        maxy=info.bounds[3],
        georeferenced=info.georeferenced,
        nodata=info.nodata,
        nodata_fraction=stats["nodata_fraction"],
        band_mean=stats["band_mean"],
        band_std=stats["band_std"],
        image_sha256=file_sha256(record.image_path),
    )
    if expected_bands is not None and info.count != expected_bands:
        return quarantine(
            row, f"image {record.image_path} has {info.count} bands but the dataset expects {expected_bands}"
        )
    if stats["n_valid"] == 0:
        return quarantine(row, f"image {record.image_path} is all nodata/NaN; nothing to learn from")
    if record.mask_path is None:
        return row
    try:
        with open_raster(record.mask_path) as src:
            mask_info = info_from_dataset(src, record.mask_path)
        problem = _mask_problem(mask_info, info)
        if problem:
            return quarantine(row, problem)
        raw = _mask_counts(record.mask_path)
    except RasterReadError as exc:
        return quarantine(row, f"unreadable mask: {exc}")
    row.update(
        mask_sha256=file_sha256(record.mask_path),
        mask_driver=mask_info.driver,
        mask_values=list(raw),
        mask_value_counts=list(raw.values()),
    )
    return row
