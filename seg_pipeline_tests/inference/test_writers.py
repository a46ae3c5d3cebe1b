"""Tests for seg_pipeline.inference.writers: GeoTIFF writers, palettes, colourised PNGs, atomicity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from matplotlib.image import imread

from seg_pipeline.inference.writers import (
    class_dtype_for,
    colorize,
    default_palette,
    save_color_png,
    write_class_map,
    write_probabilities,
)

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")

PROFILE = {"crs": "EPSG:32633", "transform": Affine(10.0, 0.0, 300000.0, 0.0, -10.0, 5000000.0)}


def test_class_dtype_for_never_overflows() -> None:
    assert class_dtype_for(2) == ("uint8", 255)
    assert class_dtype_for(255) == ("uint8", 255)  # classes 0..254, nodata 255 stays free
    assert class_dtype_for(256) == ("uint16", 65535)
    with pytest.raises(ValueError, match="num_classes"):
        class_dtype_for(0)
    with pytest.raises(ValueError, match="uint16"):
        class_dtype_for(70000)


def test_write_class_map_keeps_georeference_and_values(tmp_path: Path) -> None:
    classes = np.array([[0, 1, 2], [2, 255, 0]], dtype=np.int64)
    path = write_class_map(tmp_path / "c.tif", classes, PROFILE, num_classes=3)
    with rasterio.open(path) as dst:
        assert dst.dtypes[0] == "uint8" and dst.nodata == 255
        assert dst.crs.to_string() == "EPSG:32633" and dst.transform == PROFILE["transform"]
        assert np.array_equal(dst.read(1), classes)


def test_write_class_map_uses_uint16_above_255_classes(tmp_path: Path) -> None:
    classes = np.array([[0, 299], [256, 1]])
    with rasterio.open(write_class_map(tmp_path / "c.tif", classes)) as dst:
        assert dst.dtypes[0] == "uint16" and dst.nodata == 65535
        assert np.array_equal(dst.read(1), classes)


def test_write_class_map_rejects_out_of_range_classes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="outside"):
        write_class_map(tmp_path / "c.tif", np.array([[0, 5]]), num_classes=3)
    with pytest.raises(ValueError, match="nodata"):
        write_class_map(tmp_path / "c.tif", np.array([[0, 1]]), num_classes=3, nodata=2)
    assert list(tmp_path.iterdir()) == []


def test_write_probabilities_float_and_uint8(tmp_path: Path) -> None:
    probabilities = np.array([[[0.2, 1.0]], [[0.8, 0.0]]], dtype=np.float32)
    with rasterio.open(write_probabilities(tmp_path / "p.tif", probabilities, PROFILE)) as dst:
        assert dst.count == 2 and dst.dtypes[0] == "float32"
        assert np.array_equal(dst.read(), probabilities)
    with rasterio.open(write_probabilities(tmp_path / "p8.tif", probabilities, dtype="uint8")) as dst:
        assert np.array_equal(dst.read(), [[[51, 255]], [[204, 0]]])


@pytest.mark.parametrize("num_classes", [1, 6, 15, 40, 300])
def test_default_palette_is_distinct_and_deterministic(num_classes: int) -> None:
    palette = default_palette(num_classes)
    assert palette.shape == (num_classes, 3) and palette.dtype == np.uint8
    assert len({tuple(row) for row in palette}) == num_classes
    assert np.array_equal(palette, default_palette(num_classes))


def test_colorize_looks_up_the_palette() -> None:
    palette = np.array([[10, 20, 30], [200, 100, 0]], dtype=np.uint8)
    rgb = colorize(np.array([[0, 1], [255, 0]]), palette, nodata_value=255, nodata_color=(1, 2, 3))
    assert np.array_equal(rgb, [[[10, 20, 30], [200, 100, 0]], [[1, 2, 3], [10, 20, 30]]])
    with pytest.raises(ValueError, match="palette"):
        colorize(np.array([[2]]), palette)


def test_save_color_png_without_legend_is_pixel_exact(tmp_path: Path) -> None:
    classes = np.array([[0, 1, 1], [2, 2, 0]])
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)
    save_color_png(tmp_path / "c.png", classes, palette, legend=False)
    image = imread(tmp_path / "c.png")
    assert image.shape[:2] == (2, 3)
    assert np.array_equal(np.rint(image[..., :3] * 255).astype(np.uint8), palette[classes])


def test_save_color_png_with_legend_is_wider_and_shows_class_colours(tmp_path: Path) -> None:
    classes = np.zeros((120, 160), dtype=np.uint8)
    classes[:, 80:] = 1
    classes[0, 0] = 255
    names = ["background", "building"]
    path = save_color_png(tmp_path / "legend.png", classes, class_names=names, nodata_value=255)
    image = imread(path)
    assert image.shape[1] > 160  # the legend sits to the right of the map
    colours = {tuple(np.rint(pixel[:3] * 255).astype(int)) for pixel in image.reshape(-1, image.shape[-1])}
    for colour in default_palette(2):
        assert tuple(int(c) for c in colour) in colours
    assert [p.name for p in tmp_path.iterdir()] == ["legend.png"]
