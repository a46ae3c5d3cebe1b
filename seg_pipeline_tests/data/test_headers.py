"""Tests for header building (F3 in docs/architecture.md).

Catalog columns, statistics, checksums, incremental rebuilds.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio

from seg_pipeline.data import headers
from seg_pipeline.data.headers import (
    STATUS_OK,
    HeaderResult,
    build_headers,
    read_catalog,
    read_catalog_class_names,
    write_catalog,
)
from seg_pipeline.data.spec import DatasetSpec

MakeDataset = Callable[..., Path]
WriteRaster = Callable[..., Path]

#: Columns feature F3 promises, under the names the catalog uses.
F3_COLUMNS = {
    "item_id", "image_path", "mask_path", "width", "height", "bands", "dtype", "crs", "transform",
    "minx", "miny", "maxx", "maxy", "nodata_fraction", "has_label", "class_counts", "image_sha256",
    "mask_sha256", "status", "reason",
}  # fmt: skip


def _read(path: Path | str) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


@pytest.fixture(scope="module")
def demo_headers(demo_dataset: Path) -> HeaderResult:
    return build_headers(DatasetSpec(dataset_id="demo", root=demo_dataset), workers=2)


@pytest.fixture
def hand_made(tmp_path: Path, write_tif: WriteRaster) -> tuple[Path, np.ndarray, np.ndarray]:
    """One 3-band image with a quarter nodata and a mask with known class counts and ignored rows."""
    rng = np.random.default_rng(0)
    image = rng.integers(1, 255, size=(3, 32, 32), dtype=np.uint8)
    image[:, :, :8] = 0  # 8 of 32 columns are nodata in every band
    image[0, 5, 20] = 0  # one band at the nodata value is still a valid pixel
    mask = np.full((32, 32), 255, dtype=np.uint8)  # 255 = ignore
    mask[:10] = 0
    mask[10:20] = 2
    write_tif(tmp_path / "images" / "a.tif", image, nodata=0)
    write_tif(tmp_path / "masks" / "a.tif", mask)
    (tmp_path / "classes.txt").write_text("0 bg\n1 water\n2 vegetation\n")
    return tmp_path, image, mask


def test_catalog_has_the_f3_columns_and_one_row_per_tile(
    demo_headers: HeaderResult, demo_dataset: Path
) -> None:
    catalog = demo_headers.catalog
    assert set(catalog.columns) >= F3_COLUMNS
    expected_ids = sorted(p.stem for p in (demo_dataset / "images").glob("*.tif"))
    assert catalog["item_id"].tolist() == expected_ids
    assert (catalog["status"] == STATUS_OK).all()
    assert demo_headers.class_names[0] == "bare_soil" and len(demo_headers.class_names) == 6


def test_geometry_columns_match_rasterio(demo_headers: HeaderResult) -> None:
    for row in demo_headers.catalog.to_dict("records"):
        with rasterio.open(row["image_path"]) as src:
            assert (row["width"], row["height"], row["bands"], row["dtype"]) == (32, 32, 3, "uint8")
            assert row["crs"] == src.crs.to_string()
            assert list(row["transform"]) == list(src.transform)[:6]
            assert (row["minx"], row["miny"], row["maxx"], row["maxy"]) == tuple(src.bounds)
            assert row["georeferenced"]


def test_has_label_follows_the_masks_folder(demo_headers: HeaderResult, demo_dataset: Path) -> None:
    with_masks = {p.stem for p in (demo_dataset / "masks").glob("*.tif")}
    catalog = demo_headers.catalog
    assert set(catalog.loc[catalog["has_label"], "item_id"]) == with_masks
    unlabeled = catalog[~catalog["has_label"]]
    assert len(unlabeled) == 12 - len(with_masks) > 0
    assert unlabeled["mask_path"].isna().all() and unlabeled["mask_sha256"].isna().all()


def test_class_counts_equal_an_independent_bincount(demo_headers: HeaderResult) -> None:
    labeled = demo_headers.catalog[demo_headers.catalog["has_label"]]
    totals = np.zeros(6, dtype=np.int64)
    for row in labeled.to_dict("records"):
        expected = np.bincount(_read(row["mask_path"]).ravel(), minlength=6)
        np.testing.assert_array_equal(np.asarray(row["class_counts"]), expected)
        assert sum(row["class_counts"]) == 32 * 32  # synthetic masks label every pixel
        assert row["labeled_fraction"] == 1.0
        totals += expected
    assert demo_headers.class_histogram() == dict(zip(demo_headers.class_names, totals.tolist(), strict=True))


def test_sha256_equals_hashlib_of_the_files(demo_headers: HeaderResult) -> None:
    for row in demo_headers.catalog.to_dict("records"):
        assert row["image_sha256"] == hashlib.sha256(Path(row["image_path"]).read_bytes()).hexdigest()
        if row["has_label"]:
            assert row["mask_sha256"] == hashlib.sha256(Path(row["mask_path"]).read_bytes()).hexdigest()
        assert row["image_size"] == Path(row["image_path"]).stat().st_size


def test_nodata_fraction_band_stats_and_ignored_pixels(
    hand_made: tuple[Path, np.ndarray, np.ndarray],
) -> None:
    root, image, _mask = hand_made
    row = build_headers(DatasetSpec(dataset_id="d", root=root)).catalog.iloc[0]

    assert row["status"] == STATUS_OK
    assert row["nodata"] == 0
    assert row["nodata_fraction"] == pytest.approx(8 / 32)  # the one zero in band 0 alone stays valid
    valid = image[:, :, 8:].reshape(3, -1).astype(np.float64)
    np.testing.assert_allclose(row["band_mean"], valid.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(row["band_std"], valid.std(axis=1), rtol=1e-6)
    # 10 rows of class 0, 10 rows of class 2, 12 rows of the ignore value 255.
    assert list(row["class_counts"]) == [320, 0, 320]
    assert row["labeled_fraction"] == pytest.approx(640 / 1024)
    assert row["has_label"]


def test_mask_of_only_ignore_pixels_is_unlabeled(tmp_path: Path, write_tif: WriteRaster) -> None:
    write_tif(tmp_path / "images" / "a.tif", np.ones((1, 16, 16), np.uint8))
    write_tif(tmp_path / "masks" / "a.tif", np.full((16, 16), 255, np.uint8))
    row = build_headers(DatasetSpec(dataset_id="d", root=tmp_path, class_names=("bg", "fg"))).catalog.iloc[0]
    assert row["status"] == STATUS_OK
    assert not row["has_label"]
    assert list(row["class_counts"]) == [0, 0]


def test_without_class_names_the_class_set_is_inferred(tmp_path: Path, make_dataset: MakeDataset) -> None:
    root = make_dataset(tmp_path / "d", rows=1, cols=2)
    (root / "classes.txt").unlink()
    result = build_headers(DatasetSpec(dataset_id="d", root=root))
    top = max(int(_read(p).max()) for p in (root / "masks").glob("*.tif"))
    assert result.class_names == tuple(f"class_{i}" for i in range(top + 1))
    assert any("no class names" in w for w in result.warnings)


def test_catalog_parquet_round_trip(demo_headers: HeaderResult, tmp_path: Path) -> None:
    path = write_catalog(demo_headers.catalog, tmp_path / "catalog.parquet", demo_headers.class_names)
    assert read_catalog_class_names(path) == demo_headers.class_names
    pd.testing.assert_frame_equal(read_catalog(path), demo_headers.catalog)
    # 64-bit mtimes in nanoseconds survive exactly (a float64 round trip would lose them).
    assert read_catalog(path)["image_mtime_ns"].tolist() == demo_headers.catalog["image_mtime_ns"].tolist()


def test_same_input_gives_same_content_hash_and_identical_parquet(demo_dataset: Path, tmp_path: Path) -> None:
    spec = DatasetSpec(dataset_id="demo", root=demo_dataset)
    first, second = build_headers(spec, workers=1), build_headers(spec, workers=2)
    assert first.content_hash() == second.content_hash()
    a = write_catalog(first.catalog, tmp_path / "a.parquet", first.class_names)
    b = write_catalog(second.catalog, tmp_path / "b.parquet", second.class_names)
    assert a.read_bytes() == b.read_bytes()
    # A rebuild that reuses every row writes the same bytes as a fresh one.
    reused = build_headers(spec, previous_catalog=a)
    assert reused.n_reused == 12
    c = write_catalog(reused.catalog, tmp_path / "c.parquet", reused.class_names)
    assert c.read_bytes() == a.read_bytes()


def test_content_hash_changes_with_a_file_or_the_class_names(demo_headers: HeaderResult) -> None:
    changed = demo_headers.catalog.copy()
    changed.loc[0, "image_sha256"] = "0" * 64
    assert HeaderResult(changed, demo_headers.class_names).content_hash() != demo_headers.content_hash()
    renamed = (*demo_headers.class_names[:-1], "orchard")
    assert HeaderResult(demo_headers.catalog, renamed).content_hash() != demo_headers.content_hash()
    shuffled = demo_headers.catalog.sample(frac=1.0, random_state=0)
    assert HeaderResult(shuffled, demo_headers.class_names).content_hash() == demo_headers.content_hash()


# --- incremental rebuilds ---------------------------------------------------------------------------


@pytest.fixture
def read_spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the item ids ``build_headers`` actually opens (it reads tiles through ``inspect_tile``)."""
    seen: list[str] = []
    original = headers.inspect_tile

    def spy(record, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(record.item_id)
        return original(record, *args, **kwargs)

    monkeypatch.setattr(headers, "inspect_tile", spy)
    return seen


def _build(root: Path, catalog_path: Path, **spec_fields: object) -> HeaderResult:
    previous = catalog_path if catalog_path.exists() else None
    result = build_headers(DatasetSpec(dataset_id="d", root=root, **spec_fields), previous_catalog=previous)  # type: ignore[arg-type]
    write_catalog(result.catalog, catalog_path, result.class_names)
    return result


def test_unchanged_files_are_not_read_again(
    tmp_path: Path, make_dataset: MakeDataset, read_spy: list[str]
) -> None:
    root = make_dataset(tmp_path / "d", rows=2, cols=3)
    catalog_path = tmp_path / "catalog.parquet"
    first = _build(root, catalog_path)
    assert (first.n_read, first.n_reused) == (6, 0)
    read_spy.clear()

    second = _build(root, catalog_path)

    assert (second.n_read, second.n_reused) == (0, 6)
    assert read_spy == []
    pd.testing.assert_frame_equal(second.catalog, first.catalog)


def test_touching_one_file_rereads_exactly_that_tile(
    tmp_path: Path, make_dataset: MakeDataset, read_spy: list[str]
) -> None:
    root = make_dataset(tmp_path / "d", rows=2, cols=3)
    catalog_path = tmp_path / "catalog.parquet"
    first = _build(root, catalog_path)
    touched = root / "images" / "tile_001_002.tif"
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    read_spy.clear()

    second = _build(root, catalog_path)

    assert (second.n_read, second.n_reused) == (1, 5)
    assert read_spy == ["tile_001_002"]
    assert second.content_hash() == first.content_hash()  # same bytes, so the same data version


def test_rewriting_one_mask_rereads_that_tile_and_changes_the_hash(
    tmp_path: Path, make_dataset: MakeDataset, write_tif: WriteRaster, read_spy: list[str]
) -> None:
    root = make_dataset(tmp_path / "d", rows=2, cols=3)
    catalog_path = tmp_path / "catalog.parquet"
    first = _build(root, catalog_path)
    mask_path = root / "masks" / "tile_000_001.tif"
    with rasterio.open(mask_path) as src:
        transform = src.transform
    write_tif(mask_path, np.full((32, 32), 4, np.uint8), transform=transform)
    read_spy.clear()

    second = _build(root, catalog_path)

    assert read_spy == ["tile_000_001"]
    row = second.catalog.set_index("item_id").loc["tile_000_001"]
    assert list(row["class_counts"]) == [0, 0, 0, 0, 1024, 0]
    assert row["mask_sha256"] == hashlib.sha256(mask_path.read_bytes()).hexdigest()
    assert second.content_hash() != first.content_hash()


def test_added_and_removed_tiles(tmp_path: Path, make_dataset: MakeDataset, read_spy: list[str]) -> None:
    root = make_dataset(tmp_path / "d", rows=2, cols=3)
    catalog_path = tmp_path / "catalog.parquet"
    _build(root, catalog_path)
    (root / "images" / "tile_000_000.tif").unlink()
    (root / "masks" / "tile_000_000.tif").unlink()
    make_dataset(tmp_path / "extra", rows=1, cols=1, seed=1, item_prefix="new")
    for sub in ("images", "masks"):
        os.replace(tmp_path / "extra" / sub / "new_000_000.tif", root / sub / "new_000_000.tif")
    read_spy.clear()

    second = _build(root, catalog_path)

    assert read_spy == ["new_000_000"]
    assert "tile_000_000" not in set(second.catalog["item_id"])
    assert len(second.catalog) == 6


def test_changed_settings_reread_everything(tmp_path: Path, make_dataset: MakeDataset) -> None:
    root = make_dataset(tmp_path / "d", rows=1, cols=3)
    catalog_path = tmp_path / "catalog.parquet"
    _build(root, catalog_path)
    assert _build(root, catalog_path, expected_bands=3).n_read == 3
    assert _build(root, catalog_path, expected_bands=3).n_read == 0


def test_label_settings_relabel_from_stored_counts_without_rereading(
    tmp_path: Path, make_dataset: MakeDataset
) -> None:
    # Raw mask value counts are in the catalog: a new ignore value or recoding costs no reads.
    root = make_dataset(tmp_path / "d", rows=1, cols=3)
    catalog_path = tmp_path / "catalog.parquet"
    first = _build(root, catalog_path)
    again = _build(root, catalog_path, ignore_index=0)
    assert again.n_read == 0
    before = first.class_histogram()
    after = again.class_histogram()
    background = next(iter(before))
    assert after[background] == 0 and before[background] > 0  # class 0 is now "not labelled"
    assert {k: v for k, v in after.items() if k != background} == {
        k: v for k, v in before.items() if k != background
    }


def test_tile_quarantined_for_a_minority_band_count_is_judged_again(
    tmp_path: Path, write_tif: WriteRaster
) -> None:
    # Two 4-band tiles among three 3-band ones are the minority; once the 3-band tiles are gone they
    # are the whole dataset and must not stay quarantined just because their files did not change.
    for name in ("a", "b", "c"):
        write_tif(tmp_path / "d" / "images" / f"{name}.tif", np.ones((3, 16, 16), np.uint8))
    for name in ("x", "y"):
        write_tif(tmp_path / "d" / "images" / f"{name}.tif", np.ones((4, 16, 16), np.uint8))
    catalog_path = tmp_path / "catalog.parquet"
    first = _build(tmp_path / "d", catalog_path)
    assert sorted(first.quarantined["item_id"]) == ["x", "y"]
    for name in ("a", "b", "c"):
        (tmp_path / "d" / "images" / f"{name}.tif").unlink()

    second = _build(tmp_path / "d", catalog_path)

    assert sorted(second.ok["item_id"]) == ["x", "y"]


def test_verify_checksums_catches_an_edit_that_keeps_size_and_mtime(
    tmp_path: Path, write_tif: WriteRaster
) -> None:
    write_tif(tmp_path / "d" / "images" / "a.tif", np.ones((3, 16, 16), np.uint8))
    mask = tmp_path / "d" / "masks" / "a.tif"
    write_tif(mask, np.zeros((16, 16), np.uint8))
    catalog_path = tmp_path / "catalog.parquet"
    spec = DatasetSpec(dataset_id="d", root=tmp_path / "d", class_names=("bg", "fg"))
    first = build_headers(spec)
    write_catalog(first.catalog, catalog_path, first.class_names)
    stat = mask.stat()
    write_tif(mask, np.ones((16, 16), np.uint8))  # same size, new labels
    os.utime(mask, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert mask.stat().st_size == stat.st_size
    missed = build_headers(spec, previous_catalog=catalog_path)
    assert missed.n_read == 0 and missed.class_histogram()["fg"] == 0  # size + mtime cannot see it
    caught = build_headers(spec.model_copy(update={"verify_checksums": True}), previous_catalog=catalog_path)
    assert caught.n_read == 1 and caught.class_histogram()["fg"] == 256
