"""Datasets as they come: the Kampala layout (``chips/`` + ``binarymasks/x.mask.tif``, ``val-`` folders),
PNG images with GeoTIFF masks, and raw folders made of symbolic links."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from seg_pipeline.data.headers import STATUS_OK, build_headers
from seg_pipeline.data.spec import DatasetSpec, discover, walk_files
from seg_pipeline_tests.conftest import WriteRaster, copy_real

BINARY = ("background", "building")


def test_the_kampala_layout_pairs_without_configuration(tmp_path: Path) -> None:
    root = copy_real("kampala", tmp_path)
    found = discover(DatasetSpec(dataset_id="kampala", root=root, class_names=BINARY))
    assert len(found.records) == 11 and not [r for r in found.records if r.problem]
    for record in found.records:
        assert record.mask_path is not None and record.mask_path.name == f"{record.item_id}.mask.tif"
    assert {r.fixed_split for r in found.records} == {None, "val"}  # val-chips/ is the source's val
    assert sum(r.fixed_split == "val" for r in found.records) == 3


def test_real_kampala_tiles_are_catalogued_with_their_classes(tmp_path: Path) -> None:
    root = copy_real("kampala", tmp_path)
    result = build_headers(DatasetSpec(dataset_id="kampala", root=root, class_names=BINARY))
    assert (result.catalog["status"] == STATUS_OK).all()
    assert result.mask_values == {}  # 0/1 masks need no recoding
    assert set(result.catalog["crs"]) == {"EPSG:4326"}
    histogram = result.class_histogram()
    assert histogram["building"] > 0 and histogram["background"] > histogram["building"]


def test_ungeoreferenced_images_pair_with_georeferenced_masks(tmp_path: Path) -> None:
    # Nairobi's "*.png" files hold JPEG data: GDAL reads them by content, whatever the suffix says.
    root = copy_real("nairobi", tmp_path)
    catalog = build_headers(DatasetSpec(dataset_id="nairobi", root=root, class_names=BINARY)).catalog
    assert (catalog["status"] == STATUS_OK).all() and set(catalog["driver"]) == {"JPEG"}
    assert not catalog["georeferenced"].any()


def test_explicit_globs_pair_masks_with_a_suffix(tmp_path: Path) -> None:
    root = copy_real("kampala", tmp_path)
    spec = DatasetSpec(
        dataset_id="k",
        root=root,
        images_glob="*chips/*.tif",
        masks_glob="*binarymasks/*.tif",
        class_names=BINARY,
    )
    records = discover(spec).records
    assert len(records) == 11 and all(r.mask_path is not None and not r.problem for r in records)


def test_a_raw_folder_of_links_is_followed_and_a_link_loop_walked_once(
    tmp_path: Path, write_tif: WriteRaster
) -> None:
    real = tmp_path / "real"
    write_tif(real / "images" / "a.tif", np.ones((3, 8, 8), np.uint8))
    write_tif(real / "masks" / "a.tif", np.zeros((8, 8), np.uint8))
    raw = tmp_path / "raw"
    raw.mkdir()
    os.symlink(real / "images", raw / "images")
    os.symlink(real / "masks", raw / "masks")
    os.symlink(raw, real / "images" / "loop")  # raw/images/loop -> raw: a cycle
    assert [p.name for p in walk_files(raw)] == ["a.tif", "a.tif"]
    (record,) = discover(DatasetSpec(dataset_id="d", root=raw, class_names=BINARY)).records
    assert record.image_path is not None and record.mask_path is not None and not record.problem
