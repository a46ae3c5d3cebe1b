"""Mask values -> class ids: 0/255 masks keep their foreground, recodings reach the shards, and
labels that are no class are quarantined with the recoding named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio

from seg_pipeline.data.headers import STATUS_OK, STATUS_QUARANTINED, build_headers
from seg_pipeline.data.mask_values import class_counts, detect_mask_values, recode_mask
from seg_pipeline.data.shards import read_shard_index, shard_dirs, write_shards
from seg_pipeline.data.spec import DatasetSpec
from seg_pipeline.data.tiles import read_raw_tile
from seg_pipeline_tests.conftest import WriteRaster, copy_real

BINARY = ("background", "building")


def test_only_binary_0_255_masks_of_two_classes_are_detected() -> None:
    assert detect_mask_values([{0: 10, 255: 5}], 2, 255) == {255: 1}
    assert detect_mask_values([{0: 10}, {255: 5}], None, 255) == {255: 1}  # over the dataset
    assert detect_mask_values([{0: 10, 1: 3, 255: 5}], 2, 255) == {}  # 255 really is "ignore"
    assert detect_mask_values([{255: 5}], 2, 255) == {}  # all unlabelled, not all building
    assert detect_mask_values([{0: 10, 255: 5}], 3, 255) == {}  # a third class: 255 is no building
    assert detect_mask_values([{0: 10, 255: 5}], 2, 0) == {}


def test_counts_follow_the_recoding_and_name_values_outside_the_classes() -> None:
    assert class_counts({0: 4, 255: 6}, {}, 2, 255) == ([4, 0], 6, [])
    assert class_counts({0: 4, 255: 6}, {255: 1}, 2, 255) == ([4, 6], 0, [])
    assert class_counts({0: 4, 7: 1}, {7: 255}, 2, 255) == ([4, 0], 1, [])  # 7 declared "ignore"
    assert class_counts({0: 4, 3: 1}, {}, 2, 255) == ([4, 0], 0, [3])


def test_recode_mask_keeps_unlisted_values() -> None:
    mask = np.array([[0, 255], [1, 7]], dtype=np.uint8)
    np.testing.assert_array_equal(recode_mask(mask, {255: 1, 7: 255}), [[0, 1], [1, 255]])
    assert recode_mask(mask, {}) is mask


def test_real_nairobi_0_255_masks_keep_their_buildings_through_the_shards(tmp_path: Path) -> None:
    root = copy_real("nairobi", tmp_path)
    result = build_headers(DatasetSpec(dataset_id="nairobi", root=root, class_names=BINARY))
    assert result.mask_values == {255: 1}
    assert any("0 and 255" in w for w in result.warnings)
    ok = result.catalog[result.catalog["status"] == STATUS_OK]
    assert len(ok) == 6 and ok["labeled_fraction"].eq(1.0).all()
    building = result.class_histogram()["building"]
    assert 0.05 < building / sum(result.class_histogram().values()) < 0.6  # README: ~29.7 % overall

    splits = pd.DataFrame({"item_id": ok["item_id"], "split": "train"})
    write_shards(result.catalog, splits, tmp_path / "out", mask_values=result.mask_values)
    stored = 0
    for shard in shard_dirs(tmp_path / "out", "train"):
        for row in read_shard_index(shard):
            _image, mask, _ = read_raw_tile(row)
            assert mask is not None and set(np.unique(mask)) <= {0, 1}
            stored += int((mask == 1).sum())
    assert stored == building
    assert not list(root.rglob("*.npy"))  # the raw folder is untouched


def test_declared_mask_values_win_over_detection(tmp_path: Path) -> None:
    root = copy_real("nairobi", tmp_path)
    as_ignore = build_headers(DatasetSpec(dataset_id="n", root=root, class_names=BINARY, mask_values={}))
    assert as_ignore.mask_values == {} and as_ignore.class_histogram()["building"] == 0
    assert any("building" in w and "no labelled pixel" in w for w in as_ignore.warnings)


def test_labels_outside_the_classes_after_recoding_are_quarantined(
    tmp_path: Path, write_tif: WriteRaster
) -> None:
    write_tif(tmp_path / "images" / "a.tif", np.ones((3, 8, 8), np.uint8))
    write_tif(tmp_path / "masks" / "a.tif", np.full((8, 8), 4, np.uint8))
    write_tif(tmp_path / "images" / "b.tif", np.ones((3, 8, 8), np.uint8))
    write_tif(tmp_path / "masks" / "b.tif", np.full((8, 8), 1, np.uint8))
    spec = DatasetSpec(dataset_id="d", root=tmp_path, class_names=BINARY, mask_values={1: 5})
    catalog = build_headers(spec).catalog.set_index("item_id")
    assert (catalog["status"] == STATUS_QUARANTINED).all()
    assert "mask_values {1: 5}" in catalog.loc["b", "reason"] and "masks/b.tif" in catalog.loc["b", "reason"]


def test_jpeg_masks_get_a_warning(tmp_path: Path, write_tif: WriteRaster) -> None:
    write_tif(tmp_path / "images" / "a.tif", np.ones((3, 16, 16), np.uint8))
    (tmp_path / "masks").mkdir()
    profile = {"driver": "JPEG", "width": 16, "height": 16, "count": 1, "dtype": "uint8"}
    with rasterio.open(tmp_path / "masks" / "a.jpg", "w", **profile) as dst:
        dst.write(np.zeros((1, 16, 16), np.uint8))
    result = build_headers(DatasetSpec(dataset_id="d", root=tmp_path, class_names=BINARY))
    assert any("JPEG" in w and "PNG or GeoTIFF" in w for w in result.warnings), result.warnings


COLORS = {"background": [0, 0, 0], "building": [255, 0, 0], "road": [255, 255, 255]}


def _colour_dataset(root: Path, write_tif: WriteRaster, extra_colour: bool = False) -> np.ndarray:
    """One RGB image and its colour-coded mask (black / red / white stripes); returns the class ids."""
    ids = (np.arange(16)[:, None] // 4 % 3 + np.zeros((1, 16), int)).astype(np.uint8)
    palette = np.array([COLORS["background"], COLORS["building"], COLORS["road"]], dtype=np.uint8)
    rgb = palette[ids].transpose(2, 0, 1).copy()
    if extra_colour:
        rgb[:, 0, 0] = [0, 128, 0]
    write_tif(root / "images" / "a.tif", np.ones((3, 16, 16), np.uint8))
    write_tif(root / "masks" / "a.tif", rgb)
    return ids


def test_colour_masks_are_recoded_to_class_ids(tmp_path: Path, write_tif: WriteRaster) -> None:
    ids = _colour_dataset(tmp_path / "raw", write_tif)
    spec = DatasetSpec(dataset_id="c", root=tmp_path / "raw", class_names=list(COLORS), mask_colors=COLORS)
    result = build_headers(spec)
    assert (result.catalog["status"] == STATUS_OK).all()
    assert result.class_histogram() == {name: int((ids == k).sum()) for k, name in enumerate(COLORS)}
    splits = pd.DataFrame({"item_id": ["a"], "split": "train"})
    for fmt in ("npy", "tif"):
        from seg_pipeline.settings import ShardSettings

        out = tmp_path / fmt
        write_shards(
            result.catalog, splits, out, ShardSettings(tile_format=fmt), mask_values=result.mask_values
        )
        (row,) = read_shard_index(shard_dirs(out, "train")[0])
        _image, mask, _ = read_raw_tile(row)
        np.testing.assert_array_equal(mask, ids)


def test_an_unnamed_colour_is_quarantined_by_its_rgb(tmp_path: Path, write_tif: WriteRaster) -> None:
    _colour_dataset(tmp_path, write_tif, extra_colour=True)
    spec = DatasetSpec(dataset_id="c", root=tmp_path, class_names=list(COLORS), mask_colors=COLORS)
    (reason,) = build_headers(spec).catalog["reason"]
    assert "rgb(0, 128, 0)" in reason and "mask_colors" in reason


def test_colours_naming_no_class_fail_before_reading(tmp_path: Path, write_tif: WriteRaster) -> None:
    _colour_dataset(tmp_path, write_tif)
    spec = DatasetSpec(dataset_id="c", root=tmp_path, class_names=["background"], mask_colors=COLORS)
    with pytest.raises(ValueError, match=r"mask_colors names \['building', 'road'\]"):
        build_headers(spec)
