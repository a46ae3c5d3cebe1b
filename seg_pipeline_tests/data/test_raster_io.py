"""Tests for raster I/O (F1 in docs/architecture.md).

Headers, non-georeferenced rasters, read errors, atomic writes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from seg_pipeline.data.raster_io import (
    RasterReadError,
    read_array,
    read_info,
    write_geotiff,
)

WriteRaster = Callable[..., Path]

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


def _tiled_compressed_tif(path: Path, write_tif: WriteRaster) -> np.ndarray:
    """A valid 3-band 64x64 GeoTIFF with 16x16 deflate tiles; returns the pixels written."""
    pixels = np.random.default_rng(0).integers(0, 255, size=(3, 64, 64), dtype=np.uint8)
    write_tif(path, pixels, tiled=True, blockxsize=16, blockysize=16, compress="deflate")
    return pixels


def test_read_info_of_a_georeferenced_geotiff(tmp_path: Path, write_tif: WriteRaster) -> None:
    transform = Affine(10.0, 0.0, 600_000.0, 0.0, -10.0, 4_000_000.0)
    pixels = np.arange(2 * 20 * 30, dtype=np.uint16).reshape(2, 20, 30)
    path = write_tif(tmp_path / "s2.tif", pixels, crs="EPSG:32632", transform=transform, nodata=0)

    info = read_info(path)

    assert info.path == path
    assert (info.driver, info.width, info.height, info.count, info.dtype) == ("GTiff", 30, 20, 2, "uint16")
    assert info.crs == "EPSG:32632"
    assert info.transform == (10.0, 0.0, 600_000.0, 0.0, -10.0, 4_000_000.0)
    # 30 columns and 20 rows of 10 m pixels from the top-left corner.
    assert info.bounds == (600_000.0, 3_999_800.0, 600_300.0, 4_000_000.0)
    assert info.nodata == 0
    assert info.georeferenced is True


def test_geotiff_without_crs_is_not_georeferenced(tmp_path: Path, write_tif: WriteRaster) -> None:
    path = write_tif(tmp_path / "plain.tif", np.zeros((8, 8), np.uint8), crs=None)
    info = read_info(path)
    assert info.crs is None
    assert info.georeferenced is False


def test_png_is_accepted_and_flagged_not_georeferenced(tmp_path: Path, write_tif: WriteRaster) -> None:
    mask = np.random.default_rng(1).integers(0, 6, size=(24, 40), dtype=np.uint8)
    path = write_tif(tmp_path / "mask.png", mask, driver="PNG")

    info = read_info(path)

    assert info.driver == "PNG"
    assert (info.width, info.height, info.count, info.dtype) == (40, 24, 1, "uint8")
    assert info.crs is None
    assert info.georeferenced is False
    np.testing.assert_array_equal(read_array(path), mask[np.newaxis])


def test_zero_byte_file_raises_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "empty.tif"
    path.write_bytes(b"")
    with pytest.raises(RasterReadError, match="empty") as caught:
        read_info(path)
    assert str(path) in str(caught.value)
    assert caught.value.path == path


def test_missing_file_raises_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.tif"
    with pytest.raises(RasterReadError, match="does not exist") as caught:
        read_array(path)
    assert str(path) in str(caught.value)


def test_garbage_bytes_raise_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "garbage.tif"
    path.write_bytes(b"definitely not a TIFF " * 50)
    with pytest.raises(RasterReadError, match="not a readable raster") as caught:
        read_info(path)
    assert str(path) in str(caught.value)


def test_truncated_geotiff_raises_naming_the_path(tmp_path: Path, write_tif: WriteRaster) -> None:
    path = tmp_path / "cut.tif"
    _tiled_compressed_tif(path, write_tif)
    assert read_array(path).shape == (3, 64, 64)  # valid before the cut
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(RasterReadError, match="corrupt or truncated") as caught:
        read_array(path)
    assert str(path) in str(caught.value)


def test_read_array_returns_bands_first(tmp_path: Path, write_tif: WriteRaster) -> None:
    path = tmp_path / "tiled.tif"
    pixels = _tiled_compressed_tif(path, write_tif)
    np.testing.assert_array_equal(read_array(path), pixels)
    window = rasterio.windows.Window(col_off=16, row_off=8, width=10, height=5)
    np.testing.assert_array_equal(read_array(path, window=window), pixels[:, 8:13, 16:26])


def test_write_geotiff_round_trips_georeferencing(tmp_path: Path) -> None:
    pixels = np.random.default_rng(2).normal(size=(4, 12, 9)).astype(np.float32)
    transform = (2.0, 0.0, 100.0, 0.0, -2.0, 500.0)
    path = write_geotiff(
        tmp_path / "sub" / "out.tif", pixels, crs="EPSG:4326", transform=transform, nodata=-1
    )

    with rasterio.open(path) as src:  # read back with rasterio itself, not the code under test
        np.testing.assert_array_equal(src.read(), pixels)
        assert src.crs.to_string() == "EPSG:4326"
        assert tuple(src.transform)[:6] == transform
        assert src.nodata == -1
    assert [p.name for p in path.parent.iterdir()] == ["out.tif"]  # no temp file left


def test_write_geotiff_2d_array_gives_one_band_and_big_rasters_are_tiled(tmp_path: Path) -> None:
    small = write_geotiff(tmp_path / "small.tif", np.ones((10, 10), np.uint8))
    big = write_geotiff(tmp_path / "big.tif", np.ones((256, 300), np.uint8))
    with rasterio.open(small) as src:
        assert src.count == 1
    with rasterio.open(big) as src:
        assert src.block_shapes == [(256, 256)]
