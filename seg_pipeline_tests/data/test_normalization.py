"""Band statistics pooled from the header catalog, normalisation, the scale fallback, nodata maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from seg_pipeline.data.headers import build_headers
from seg_pipeline.data.normalization import (
    BandStats,
    band_stats_from_catalog,
    invalid_pixels,
    normalize,
    scale_stats,
)
from seg_pipeline.data.raster_io import write_geotiff
from seg_pipeline.data.spec import DatasetSpec

GEO = {"crs": "EPSG:32633", "transform": (1.0, 0.0, 500.0, 0.0, -1.0, 900.0)}


def test_pooled_stats_by_hand() -> None:
    """Tile a: 2x2 of one band [1, 2, 3, 4]; tile b: 4x2, half nodata, valid [10, 10, 12, 12].

    Pooled over the 8 valid pixels: mean = (10 + 44) / 8 = 6.75;
    E[x^2] = (30 + 488) / 8 = 64.75; var = 64.75 - 6.75^2 = 19.1875.
    """
    catalog = pd.DataFrame(
        {
            "item_id": ["a", "b", "bad"],
            "status": ["ok", "ok", "quarantined"],
            "width": [2, 4, 10],
            "height": [2, 2, 10],
            "nodata_fraction": [0.0, 0.5, 0.0],
            "band_mean": [[2.5], [11.0], [1000.0]],
            "band_std": [[np.sqrt(1.25)], [1.0], [1.0]],
        }
    )
    stats = band_stats_from_catalog(catalog)
    assert stats.mean == pytest.approx((6.75,))
    assert stats.std == pytest.approx((np.sqrt(19.1875),))
    assert stats.std[0] != pytest.approx((np.sqrt(1.25) + 1.0) / 2)  # not an average of stds
    only_a = band_stats_from_catalog(catalog, item_ids=["a"])
    assert only_a.mean == pytest.approx((2.5,)) and only_a.std == pytest.approx((np.sqrt(1.25),))


def test_pooled_stats_from_real_headers_match_pixels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    small = rng.integers(1, 200, size=(3, 16, 16), dtype=np.uint8)
    large = rng.integers(50, 255, size=(3, 40, 24), dtype=np.uint8)
    large[:, :10, :] = 0  # nodata rows
    write_geotiff(tmp_path / "images" / "small.tif", small, nodata=0, **GEO)
    write_geotiff(tmp_path / "images" / "large.tif", large, nodata=0, **GEO)
    catalog = build_headers(DatasetSpec(dataset_id="s", root=tmp_path)).catalog
    stats = band_stats_from_catalog(catalog)
    pixels = np.concatenate([small.reshape(3, -1), large[:, 10:, :].reshape(3, -1)], axis=1).astype(
        np.float64
    )
    np.testing.assert_allclose(stats.mean, pixels.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(stats.std, pixels.std(axis=1), rtol=1e-9)


def test_normalize_numpy_and_torch() -> None:
    stats = BandStats((10.0, 20.0), (2.0, 4.0))
    array = np.array([[[12, 14]], [[20, 28]]], dtype=np.uint8)
    expected = np.array([[[1.0, 2.0]], [[0.0, 2.0]]], dtype=np.float32)
    out = normalize(array, stats)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected)
    out_t = normalize(torch.from_numpy(array)[None], stats)
    assert out_t.dtype == torch.float32 and out_t.shape == (1, 2, 1, 2)
    np.testing.assert_allclose(out_t[0].numpy(), expected)
    with pytest.raises(ValueError, match="bands"):
        normalize(np.zeros((3, 2, 2)), stats)


def test_scale_fallback() -> None:
    assert scale_stats(3, "uint8") == BandStats((0.0,) * 3, (255.0,) * 3)
    assert scale_stats(7, "uint16", max_value=10000).std == (10000.0,) * 7
    assert scale_stats(2, "float32").std == (1.0, 1.0)
    image = np.full((3, 2, 2), 255, dtype=np.uint8)
    np.testing.assert_allclose(normalize(image, scale_stats(3, "uint8")), 1.0)
    with pytest.raises(ValueError, match="max_value"):
        scale_stats(1, "int32")
    with pytest.raises(ValueError, match="max_value"):
        scale_stats(1, "uint8", max_value=0)


def test_bad_stats_are_rejected() -> None:
    with pytest.raises(ValueError, match="std"):
        BandStats((0.0,), (0.0,))
    with pytest.raises(ValueError, match="one mean and one std"):
        BandStats((0.0, 1.0), (1.0,))
    empty = pd.DataFrame(
        {
            "item_id": ["a"],
            "status": ["quarantined"],
            "width": [1],
            "height": [1],
            "nodata_fraction": [0.0],
            "band_mean": [None],
            "band_std": [None],
        }
    )
    with pytest.raises(ValueError, match="no OK tile"):
        band_stats_from_catalog(empty)
    with pytest.raises(ValueError, match="item_ids"):
        band_stats_from_catalog(empty, item_ids=["zzz"])


def test_invalid_pixels() -> None:
    image = np.ones((3, 4, 4), dtype=np.uint8)
    assert invalid_pixels(image, 0) is None and invalid_pixels(image, None) is None
    image[:, 0, 0] = 0
    image[1, 2, 2] = 0  # one band at nodata: the pixel is still valid
    expected = np.zeros((4, 4), dtype=bool)
    expected[0, 0] = True
    np.testing.assert_array_equal(invalid_pixels(image, 0), expected)
    image[:, 3, 3] = 7
    only_33 = np.zeros((4, 4), dtype=bool)
    only_33[3, 3] = True
    np.testing.assert_array_equal(invalid_pixels(image, 7), only_33)
    assert invalid_pixels(image, 300) is None  # cannot occur in uint8
    floats = np.ones((2, 3, 3), dtype=np.float32)
    floats[0, 1, 1] = np.nan
    floats[:, 2, 0] = -9999.0
    got = invalid_pixels(floats, -9999.0)
    assert sorted(map(tuple, np.argwhere(got))) == [(1, 1), (2, 0)]
    assert sorted(map(tuple, np.argwhere(invalid_pixels(floats, None)))) == [(1, 1)]
