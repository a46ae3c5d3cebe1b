"""Raster I/O on rasterio: one place that opens files, so every reader gets the same GDAL env.

Any GDAL-readable raster works (GeoTIFF first, PNG/JPEG masks too). Files without a CRS or
with an identity transform are accepted and flagged as not georeferenced.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.enums
from rasterio.errors import RasterioIOError
from rasterio.transform import Affine

from seg_pipeline.io import atomic_write

#: Extensions the dataset discovery treats as rasters.
RASTER_EXTENSIONS: frozenset[str] = frozenset(
    {".tif", ".tiff", ".png", ".jpg", ".jpeg", ".jp2", ".img", ".vrt", ".bmp"}
)

#: GDAL settings for opening many files: skipping the sibling-file listing roughly halves
#: open cost on big folders (GDAL otherwise lists the directory on every open). The block cache is
#: capped at 256 MB (GDAL's default is 5 % of RAM per process, 1.2 GB here, which a scene read in
#: blocks fills for nothing); a ``GDAL_CACHEMAX`` in the environment wins.
GDAL_ENV: dict[str, Any] = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "CPL_LOG": os.devnull,
    **({} if "GDAL_CACHEMAX" in os.environ else {"GDAL_CACHEMAX": 256}),
}


class RasterReadError(ValueError):
    """A raster could not be opened or read; the message names the file and the cause."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class RasterInfo:
    """What the catalog needs to know about one raster without reading its pixels."""

    path: Path
    driver: str
    width: int
    height: int
    count: int
    dtype: str
    crs: str | None
    transform: tuple[float, float, float, float, float, float]
    bounds: tuple[float, float, float, float]
    nodata: float | None
    georeferenced: bool


@contextlib.contextmanager
def gdal_env() -> Iterator[None]:
    """Enter the project's GDAL environment (no-op if one is already active)."""
    with rasterio.Env(**GDAL_ENV):
        yield


@contextlib.contextmanager
def open_raster(path: Path | str) -> Iterator[rasterio.io.DatasetReader]:
    """Open ``path`` read-only, turning GDAL failures into :class:`RasterReadError`."""
    path = Path(path)
    if not path.exists():
        raise RasterReadError(path, "file does not exist")
    if path.stat().st_size == 0:
        raise RasterReadError(path, "file is empty (0 bytes); re-export or remove it")
    try:
        with gdal_env(), rasterio.open(path) as src:
            yield src
    except RasterioIOError as exc:
        raise RasterReadError(path, f"not a readable raster ({exc}); re-export or remove it") from exc


def info_from_dataset(src: rasterio.io.DatasetReader, path: Path) -> RasterInfo:
    """Extract :class:`RasterInfo` from an open dataset."""
    transform = src.transform
    crs = src.crs.to_string() if src.crs else None
    georeferenced = crs is not None and transform != Affine.identity()
    return RasterInfo(
        path=path,
        driver=src.driver,
        width=src.width,
        height=src.height,
        count=src.count,
        dtype=src.dtypes[0],
        crs=crs,
        transform=tuple(transform)[:6],
        bounds=tuple(src.bounds),
        nodata=src.nodata,
        georeferenced=georeferenced,
    )


def read_info(path: Path | str) -> RasterInfo:
    """Read the header of a raster (no pixels)."""
    with open_raster(path) as src:
        return info_from_dataset(src, Path(path))


def read_array(path: Path | str, window: rasterio.windows.Window | None = None) -> np.ndarray:
    """Read all bands as a ``(bands, height, width)`` array; GDAL read errors name the file.

    ``.npy`` shard files (which no GDAL driver reads) are memory-mapped, so a window reads only itself.
    """
    if Path(path).suffix == ".npy":
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        array = array[np.newaxis] if array.ndim == 2 else array
        if window is not None:
            (r0, r1), (c0, c1) = window.toranges()
            array = array[:, r0:r1, c0:c1]
        return np.array(array)
    with open_raster(path) as src:
        try:
            return src.read(window=window)
        except RasterioIOError as exc:
            raise RasterReadError(path, f"pixel data is corrupt or truncated ({exc})") from exc


def raster_shape(path: Path | str) -> tuple[int, int, int]:
    """``(bands, height, width)`` of a raster or ``.npy`` shard file, without reading its pixels."""
    if Path(path).suffix == ".npy":
        shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
        return (1, *shape) if len(shape) == 2 else (shape[0], shape[1], shape[2])
    with open_raster(path) as src:
        return src.count, src.height, src.width


def read_decimated(path: Path | str, max_side: int) -> np.ndarray:
    """All bands, nearest-decimated so the longest side is at most ``max_side`` (quick looks: their
    memory stays bounded whatever the raster's size).
    """
    bands, height, width = raster_shape(path)
    step = max(1, -(-max(height, width) // max_side))
    if Path(path).suffix == ".npy":
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        array = array[np.newaxis] if array.ndim == 2 else array
        return np.array(array[:, ::step, ::step])
    with open_raster(path) as src:
        shape = (bands, -(-height // step), -(-width // step))
        return src.read(out_shape=shape, resampling=rasterio.enums.Resampling.nearest)


def write_geotiff(
    path: Path | str,
    array: np.ndarray,
    *,
    crs: str | None = None,
    transform: Affine | tuple[float, ...] | None = None,
    nodata: float | None = None,
    compress: str | None = "deflate",
) -> Path:
    """Write a ``(bands, H, W)`` or ``(H, W)`` array as a GeoTIFF, atomically."""
    path = Path(path)
    data = array[np.newaxis] if array.ndim == 2 else array
    if transform is not None and not isinstance(transform, Affine):
        transform = Affine(*transform[:6])
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": data.shape[2],
        "height": data.shape[1],
        "count": data.shape[0],
        "dtype": data.dtype.name,
        "crs": crs,
        "transform": transform if transform is not None else Affine.identity(),
        "nodata": nodata,
    }
    if compress:
        profile["compress"] = compress
    if data.shape[1] >= 256 and data.shape[2] >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    with atomic_write(path) as tmp, gdal_env(), rasterio.open(tmp, "w", **profile) as dst:
        dst.write(data)
    return path
