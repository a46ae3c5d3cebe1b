"""Bad input, one test per data row of docs/bad_inputs_and_faults.md.

A bad tile is quarantined with a reason that names its file and says what is wrong; it never
raises out of ``build_headers`` and never changes the rows of the good tiles next to it.
Dataset- and config-level problems raise a ``ValueError`` subclass naming the field or path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rasterio.transform import Affine

from seg_pipeline.data.headers import STATUS_OK, STATUS_QUARANTINED, HeaderResult, build_headers
from seg_pipeline.data.shards import ShardError, read_shard_index
from seg_pipeline.data.spec import DatasetSpec, DatasetSpecError
from seg_pipeline.data.splits import SplitError, assign_splits
from seg_pipeline.settings import SettingsError, ShardSettings, SplitSettings

MakeDataset = Callable[..., Path]
WriteRaster = Callable[..., Path]

GOOD_IDS = ["tile_000_000", "tile_000_001", "tile_001_000", "tile_001_001"]
#: Columns that must come out the same for the good tiles whatever bad tile sits next to them.
STABLE_COLUMNS = ["item_id", "status", "image_sha256", "mask_sha256", "nodata_fraction", "bands", "has_label"]


class Dataset:
    """Four clean labelled tiles plus whatever a test adds; knows their clean catalog rows."""

    def __init__(self, root: Path, write_tif: WriteRaster) -> None:
        self.root = root
        self.write_tif = write_tif
        self.clean = build_headers(DatasetSpec(dataset_id="d", root=root)).catalog
        assert self.clean["item_id"].tolist() == GOOD_IDS and (self.clean["status"] == STATUS_OK).all()

    def image(self, name: str, array: np.ndarray | None = None, **kwargs: object) -> Path:
        pixels = np.full((3, 32, 32), 90, np.uint8) if array is None else array
        return self.write_tif(self.root / "images" / f"{name}.tif", pixels, **kwargs)

    def mask(self, name: str, array: np.ndarray | None = None, **kwargs: object) -> Path:
        labels = np.full((32, 32), 2, np.uint8) if array is None else array
        return self.write_tif(self.root / "masks" / f"{name}.tif", labels, **kwargs)

    def build(self, **spec_fields: object) -> HeaderResult:
        return build_headers(DatasetSpec(dataset_id="d", root=self.root, **spec_fields))  # type: ignore[arg-type]

    def assert_good_tiles_unaffected(self, result: HeaderResult, bad_id: str) -> None:
        others = result.catalog[result.catalog["item_id"] != bad_id].reset_index(drop=True)
        pd.testing.assert_frame_equal(others[STABLE_COLUMNS], self.clean[STABLE_COLUMNS])
        class_counts = [list(c) for c in others["class_counts"]]
        assert class_counts == [list(c) for c in self.clean["class_counts"]]


@pytest.fixture
def dataset(tmp_path: Path, make_dataset: MakeDataset, write_tif: WriteRaster) -> Dataset:
    return Dataset(make_dataset(tmp_path / "d", rows=2, cols=2), write_tif)


def _quarantined(result: HeaderResult, item_id: str, path: Path, *words: str) -> str:
    """Assert ``item_id`` is quarantined with a reason naming ``path`` and ``words``; return the reason."""
    row = result.catalog.set_index("item_id").loc[item_id]
    assert row["status"] == STATUS_QUARANTINED
    reason = str(row["reason"])
    assert str(path) in reason, reason
    for word in words:
        assert word.lower() in reason.lower(), (word, reason)
    return reason


def _truncated_tif(path: Path, write_tif: WriteRaster, array: np.ndarray) -> Path:
    """A valid tiled, compressed GeoTIFF cut to half its bytes."""
    write_tif(path, array, tiled=True, blockxsize=16, blockysize=16, compress="deflate")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# --- unreadable files -------------------------------------------------------------------------------


def test_garbage_bytes_with_tif_suffix(dataset: Dataset) -> None:
    path = dataset.root / "images" / "bad.tif"
    path.write_bytes(os.urandom(4096))
    result = dataset.build()
    _quarantined(result, "bad", path, "unreadable image", "not a readable raster")
    dataset.assert_good_tiles_unaffected(result, "bad")


def test_truncated_geotiff(dataset: Dataset, write_tif: WriteRaster) -> None:
    pixels = np.random.default_rng(0).integers(0, 255, (3, 64, 64), dtype=np.uint8)
    path = _truncated_tif(dataset.root / "images" / "bad.tif", write_tif, pixels)
    dataset.mask("bad", np.zeros((64, 64), np.uint8))
    result = dataset.build()
    _quarantined(result, "bad", path, "unreadable image", "corrupt or truncated")
    dataset.assert_good_tiles_unaffected(result, "bad")


def test_truncated_mask(dataset: Dataset, write_tif: WriteRaster) -> None:
    dataset.image("bad")
    labels = np.random.default_rng(0).integers(0, 6, (32, 32), dtype=np.uint8)
    path = _truncated_tif(dataset.root / "masks" / "bad.tif", write_tif, labels)
    result = dataset.build()
    _quarantined(result, "bad", path, "unreadable mask", "corrupt or truncated")
    dataset.assert_good_tiles_unaffected(result, "bad")


def test_zero_byte_file(dataset: Dataset) -> None:
    path = dataset.root / "images" / "bad.tif"
    path.write_bytes(b"")
    dataset.mask("bad")
    result = dataset.build()
    _quarantined(result, "bad", path, "empty (0 bytes)")
    dataset.assert_good_tiles_unaffected(result, "bad")


# --- pairing ----------------------------------------------------------------------------------------


def test_image_without_mask_is_fine_and_unlabeled(dataset: Dataset) -> None:
    path = dataset.image("lonely")
    result = dataset.build()
    row = result.catalog.set_index("item_id").loc["lonely"]
    assert row["status"] == STATUS_OK and row["reason"] == ""
    assert row["image_path"] == str(path)
    assert not row["has_label"] and pd.isna(row["mask_path"])
    dataset.assert_good_tiles_unaffected(result, "lonely")


def test_mask_without_image(dataset: Dataset) -> None:
    path = dataset.mask("orphan")
    result = dataset.build()
    _quarantined(result, "orphan", path, "mask without image", "'orphan'")
    dataset.assert_good_tiles_unaffected(result, "orphan")


def test_duplicate_item_ids(dataset: Dataset) -> None:
    first = dataset.image("twin")
    second = dataset.write_tif(dataset.root / "images" / "2023" / "twin.tif", np.ones((3, 32, 32), np.uint8))
    result = dataset.build()
    reason = _quarantined(result, "twin", first, "duplicate item id", "rename")
    assert str(second) in reason
    assert (result.catalog["item_id"] == "twin").sum() == 1
    dataset.assert_good_tiles_unaffected(result, "twin")


# --- image / mask geometry --------------------------------------------------------------------------


def test_image_mask_size_mismatch(dataset: Dataset) -> None:
    image = dataset.image("bad")
    mask = dataset.mask("bad", np.zeros((16, 24), np.uint8))
    result = dataset.build()
    reason = _quarantined(result, "bad", mask, "24x16", "32x32", "same size")
    assert str(image) in reason
    dataset.assert_good_tiles_unaffected(result, "bad")


def test_crs_mismatch(dataset: Dataset) -> None:
    dataset.image("bad")
    mask = dataset.mask("bad", crs="EPSG:32634")
    result = dataset.build()
    _quarantined(result, "bad", mask, "CRS EPSG:32634", "EPSG:32633", "reproject")
    dataset.assert_good_tiles_unaffected(result, "bad")


def test_transform_mismatch(dataset: Dataset) -> None:
    dataset.image("bad")
    shifted = Affine(0.5, 0.0, 500_000.5, 0.0, -0.5, 5_000_000.0)  # one pixel to the east
    mask = dataset.mask("bad", transform=shifted)
    result = dataset.build()
    _quarantined(result, "bad", mask, "transform", "500000.5")
    dataset.assert_good_tiles_unaffected(result, "bad")


# --- mask content -----------------------------------------------------------------------------------


def test_mask_values_outside_the_class_set(dataset: Dataset) -> None:
    labels = np.full((32, 32), 1, np.uint8)
    labels[0, :3] = [9, 6, 255]  # 6 classes (0..5): 6 and 9 are unknown, 255 is the ignore value
    dataset.image("bad")
    mask = dataset.mask("bad", labels)
    result = dataset.build()
    _quarantined(result, "bad", mask, "labels [6, 9]", "outside the class set 0..5")
    dataset.assert_good_tiles_unaffected(result, "bad")


def test_float_mask(dataset: Dataset) -> None:
    dataset.image("bad")
    mask = dataset.mask("bad", np.full((32, 32), 1.0, np.float32))
    result = dataset.build()
    _quarantined(result, "bad", mask, "float dtype float32", "integer class ids")
    dataset.assert_good_tiles_unaffected(result, "bad")


def test_negative_mask_labels(dataset: Dataset) -> None:
    labels = np.zeros((32, 32), np.int16)
    labels[3, 3] = -1
    dataset.image("bad")
    mask = dataset.mask("bad", labels)
    result = dataset.build()
    _quarantined(result, "bad", mask, "negative label -1")
    dataset.assert_good_tiles_unaffected(result, "bad")


def test_multi_band_mask(dataset: Dataset) -> None:
    dataset.image("bad")
    mask = dataset.mask("bad", np.zeros((3, 32, 32), np.uint8))
    result = dataset.build()
    # Three bands are read as a colour-coded mask, which needs dataset.mask_colors to mean classes.
    _quarantined(result, "bad", mask, "colour-coded", "rgb(0, 0, 0)", "mask_colors")
    dataset.assert_good_tiles_unaffected(result, "bad")


# --- image content ----------------------------------------------------------------------------------


def test_all_nodata_tile(dataset: Dataset) -> None:
    path = dataset.image("bad", np.zeros((3, 32, 32), np.uint8), nodata=0)
    dataset.mask("bad")
    result = dataset.build()
    _quarantined(result, "bad", path, "all nodata")
    dataset.assert_good_tiles_unaffected(result, "bad")


def test_some_nan_pixels_stay_ok_with_a_nodata_fraction(dataset: Dataset) -> None:
    pixels = np.random.default_rng(0).random((3, 32, 32), dtype=np.float32)
    pixels[:, :4, :] = np.nan  # 128 pixels NaN in every band
    pixels[1, 10, :4] = np.nan  # 4 more pixels NaN in one band only: unusable too
    dataset.image("floaty", pixels)
    dataset.mask("floaty")
    result = dataset.build()
    row = result.catalog.set_index("item_id").loc["floaty"]
    assert row["status"] == STATUS_OK
    assert row["nodata_fraction"] == pytest.approx(132 / 1024)
    valid = np.isfinite(pixels).all(axis=0)
    expected_mean = pixels[:, valid].astype(np.float64).mean(axis=1)
    np.testing.assert_allclose(row["band_mean"], expected_mean, rtol=1e-9)
    assert list(row["class_counts"]) == [0, 0, 1024, 0, 0, 0]  # the mask is unaffected by image NaNs
    dataset.assert_good_tiles_unaffected(result, "floaty")


def test_all_nan_tile(dataset: Dataset) -> None:
    path = dataset.image("bad", np.full((3, 32, 32), np.nan, np.float32))
    result = dataset.build()
    _quarantined(result, "bad", path, "all nodata/NaN")
    dataset.assert_good_tiles_unaffected(result, "bad")


def test_band_count_differs_from_expected_bands(dataset: Dataset) -> None:
    path = dataset.image("bad", np.ones((4, 32, 32), np.uint8))
    result = dataset.build(expected_bands=3)
    _quarantined(result, "bad", path, "has 4 bands", "expects 3")
    dataset.assert_good_tiles_unaffected(result, "bad")


def test_every_tile_with_the_wrong_band_count_is_quarantined(dataset: Dataset) -> None:
    result = dataset.build(expected_bands=7)  # e.g. a Sentinel-2 config pointed at RGB tiles
    assert (result.catalog["status"] == STATUS_QUARANTINED).all()
    assert all("expects 7" in reason for reason in result.catalog["reason"])


def test_minority_band_count_without_expected_bands(dataset: Dataset) -> None:
    path = dataset.image("bad", np.ones((1, 32, 32), np.uint8))
    result = dataset.build()
    _quarantined(result, "bad", path, "has 1 bands", "most tiles have 3", "expected_bands")
    dataset.assert_good_tiles_unaffected(result, "bad")


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_many_bad_tiles_at_once_never_abort_the_build(dataset: Dataset, write_tif: WriteRaster) -> None:
    (dataset.root / "images" / "garbage.tif").write_bytes(b"II*\x00" + os.urandom(500))
    (dataset.root / "images" / "empty.tif").write_bytes(b"")
    dataset.mask("orphan")
    dataset.image("size")
    dataset.mask("size", np.zeros((8, 8), np.uint8))
    dataset.image("floatmask")
    dataset.mask("floatmask", np.zeros((32, 32), np.float64))
    dataset.image("nodata", np.zeros((3, 32, 32), np.uint8), nodata=0)
    _truncated_tif(dataset.root / "images" / "cut.tif", write_tif, np.ones((3, 64, 64), np.uint8))
    result = dataset.build()
    assert sorted(result.quarantined["item_id"]) == [
        "cut",
        "empty",
        "floatmask",
        "garbage",
        "nodata",
        "orphan",
        "size",
    ]
    assert sorted(result.ok["item_id"]) == GOOD_IDS
    assert all(reason for reason in result.quarantined["reason"])


# --- dataset-level problems -------------------------------------------------------------------------


def test_empty_dataset_folder(tmp_path: Path) -> None:
    for sub in ("images", "masks"):
        (tmp_path / "empty" / sub).mkdir(parents=True)
    with pytest.raises(DatasetSpecError, match="no raster tiles found") as caught:
        build_headers(DatasetSpec(dataset_id="d", root=tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(caught.value)


@pytest.mark.parametrize("policy", ["v0", "supervised"])
def test_no_labeled_tiles_for_a_policy_that_needs_them(
    tmp_path: Path, make_dataset: MakeDataset, policy: str
) -> None:
    root = make_dataset(tmp_path / "d", rows=1, cols=3, labeled_fraction=0.0)
    catalog = build_headers(DatasetSpec(dataset_id="d", root=root)).catalog
    with pytest.raises(SplitError, match=f"policy '{policy}' needs labeled tiles"):
        assign_splits(catalog, SplitSettings(policy=policy))


def test_fixed_policy_with_a_tile_outside_the_split_folders(tmp_path: Path, write_tif: WriteRaster) -> None:
    pixels = np.ones((3, 16, 16), np.uint8)
    write_tif(tmp_path / "train" / "images" / "a.tif", pixels)
    write_tif(tmp_path / "val" / "images" / "b.tif", pixels)
    stray = write_tif(tmp_path / "images" / "stray.tif", pixels)
    catalog = build_headers(DatasetSpec(dataset_id="d", root=tmp_path)).catalog
    with pytest.raises(SplitError, match="policy 'fixed' but tile stray") as caught:
        assign_splits(catalog, SplitSettings(policy="fixed"))
    assert str(stray) in str(caught.value)


# --- shard index ------------------------------------------------------------------------------------


@pytest.fixture
def shard(tmp_path: Path) -> Path:
    folder = tmp_path / "data" / "train" / "shard-00000"
    (folder / "inputs").mkdir(parents=True)
    (folder / "inputs" / "a.tif").write_bytes(b"tile")
    (tmp_path / "data" / "secret.tif").write_bytes(b"outside the shard")
    return folder


def _write_index(shard: Path, *rows: dict) -> None:
    (shard / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


_GOOD_ROW = {"item_id": "a", "input": "inputs/a.tif", "target": None, "split": "train"}


@pytest.mark.parametrize("key", ["input", "target"])
@pytest.mark.parametrize("bad_path", ["../../etc/passwd", "/etc/passwd", "inputs/../../secret.tif"])
def test_index_paths_escaping_the_shard_root(shard: Path, key: str, bad_path: str) -> None:
    _write_index(shard, _GOOD_ROW, {**_GOOD_ROW, "item_id": "b", key: bad_path})
    with pytest.raises(ShardError, match=r"index\.jsonl:2: .*escapes the shard root") as caught:
        read_shard_index(shard)
    assert repr(bad_path) in str(caught.value)


def test_index_symlink_escaping_the_shard_root(shard: Path) -> None:
    (shard / "inputs" / "link.tif").symlink_to(shard.parent.parent / "secret.tif")
    _write_index(shard, {**_GOOD_ROW, "input": "inputs/link.tif"})
    with pytest.raises(ShardError, match=r"index\.jsonl:1: input path 'inputs/link.tif' escapes"):
        read_shard_index(shard)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"item_id": "a", "input": "inputs/a.tif"}', r"index\.jsonl:1: missing keys \['target', 'split'\]"),
        ("{not json", r"index\.jsonl:1: not valid JSON"),
        (
            json.dumps({**_GOOD_ROW, "input": "inputs/gone.tif"}),
            r"index\.jsonl:1: input file 'inputs/gone.tif' is missing",
        ),
        (json.dumps({**_GOOD_ROW, "input": 3}), r"index\.jsonl:1: 'input' must be a relative path string"),
    ],
)
def test_malformed_index_lines(shard: Path, line: str, message: str) -> None:
    (shard / "index.jsonl").write_text(line + "\n")
    with pytest.raises(ShardError, match=message):
        read_shard_index(shard)


def test_a_valid_index_row_is_accepted(shard: Path) -> None:
    _write_index(shard, _GOOD_ROW)
    (row,) = read_shard_index(shard)
    assert row.input_path == (shard / "inputs" / "a.tif").resolve() and row.target_path is None


# --- impossible config values -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_items_per_shard": -1}, "max_items_per_shard=-1"),
        ({"max_items_per_shard": 0}, "max_items_per_shard=0"),
        ({"max_shard_bytes": 0}, "max_shard_bytes=0"),
        ({"tile_format": "zarr"}, "tile_format='zarr'"),
    ],
)
def test_bad_shard_settings_name_the_field(fields: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        ShardSettings.parse(fields)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"policy": "random"}, "policy='random'"),
        ({"metrics_fraction": 1.5}, "metrics_fraction=1.5"),
        ({"metrics_fraction": -0.1}, "metrics_fraction=-0.1"),
        ({"train_fraction": 0.5, "val_fraction": 0.3, "test_fraction": 0.1}, r"fractions.*sum to 1.*0\.900"),
        ({"train_fraction": 1.2, "val_fraction": -0.2, "test_fraction": 0.0}, "train_fraction=1.2"),
        ({"group_block_size": 0.0}, "group_block_size=0.0"),
    ],
)
def test_bad_split_settings_name_the_field(fields: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        SplitSettings.parse(fields)


def test_a_shifted_mask_without_crs_is_quarantined_like_one_with_a_crs(
    tmp_path: Path, write_tif: WriteRaster
) -> None:
    import rasterio

    placed = rasterio.transform.from_origin(100.0, 200.0, 1.0, 1.0)
    shifted = rasterio.transform.from_origin(105.0, 200.0, 1.0, 1.0)
    for name, transform in (("image", placed), ("mask", shifted)):
        folder = tmp_path / ("images" if name == "image" else "masks")
        folder.mkdir(exist_ok=True)
        bands = 3 if name == "image" else 1
        profile = {"driver": "GTiff", "width": 8, "height": 8, "count": bands, "dtype": "uint8"}
        with rasterio.open(folder / "a.tif", "w", transform=transform, **profile) as dst:
            dst.write(np.zeros((bands, 8, 8), np.uint8))
    result = build_headers(DatasetSpec(dataset_id="d", root=tmp_path, class_names=("bg", "fg")))
    _quarantined(result, "a", tmp_path / "masks" / "a.tif", "transform", "differs")


def test_tiles_in_several_crs_get_a_warning(tmp_path: Path, write_tif: WriteRaster) -> None:
    import rasterio

    for name, crs in (("a", "EPSG:32636"), ("b", "EPSG:4326")):
        (tmp_path / "images").mkdir(exist_ok=True)
        profile = {"driver": "GTiff", "width": 8, "height": 8, "count": 3, "dtype": "uint8", "crs": crs}
        transform = rasterio.transform.from_origin(1.0, 1.0, 0.1, 0.1)
        with rasterio.open(tmp_path / "images" / f"{name}.tif", "w", transform=transform, **profile) as dst:
            dst.write(np.zeros((3, 8, 8), np.uint8))
    warnings = build_headers(DatasetSpec(dataset_id="d", root=tmp_path, class_names=("bg", "fg"))).warnings
    assert any("2 CRSs" in w and "EPSG:4326: 1" in w for w in warnings), warnings
