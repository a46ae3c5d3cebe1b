"""Tests for dataset discovery (F2 in docs/architecture.md).

Layouts, pairing, fixed splits, class names, spec errors.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from seg_pipeline.data.spec import (
    DatasetSpec,
    DatasetSpecError,
    Discovery,
    TileRecord,
    discover,
    read_class_names,
)
from seg_pipeline.settings import SettingsError

WriteRaster = Callable[..., Path]
MakeDataset = Callable[..., Path]

_IMAGE = np.full((3, 16, 16), 100, dtype=np.uint8)
_MASK = np.ones((16, 16), dtype=np.uint8)


def _by_id(found: Discovery) -> dict[str, TileRecord]:
    return {record.item_id: record for record in found.records}


def _write_pairs(write_tif: WriteRaster, root: Path, pairs: dict[str, str | None], ext: str = "tif") -> None:
    """``pairs`` maps an image path (relative, no suffix) to its mask path or ``None``."""
    driver = "PNG" if ext == "png" else "GTiff"
    for image, mask in pairs.items():
        write_tif(root / f"{image}.{ext}", _IMAGE, driver=driver)
        if mask is not None:
            write_tif(root / f"{mask}.{ext}", _MASK, driver=driver)


def test_images_and_masks_folders(make_dataset: MakeDataset, tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d", rows=2, cols=2, labeled_fraction=1.0)
    found = discover(DatasetSpec(dataset_id="demo", root=root))
    records = _by_id(found)
    assert sorted(records) == ["tile_000_000", "tile_000_001", "tile_001_000", "tile_001_001"]
    for item_id, record in records.items():
        assert record.image_path == root / "images" / f"{item_id}.tif"
        assert record.mask_path == root / "masks" / f"{item_id}.tif"
        assert record.fixed_split is None and record.problem is None
    assert found.layout == "folders"


@pytest.mark.parametrize("mask_dir", ["masks", "labels", "gt", "annotations", "Masks"])
def test_mask_folder_aliases(write_tif: WriteRaster, tmp_path: Path, mask_dir: str) -> None:
    _write_pairs(write_tif, tmp_path, {"images/a": f"{mask_dir}/a", "images/b": None})
    records = _by_id(discover(DatasetSpec(dataset_id="d", root=tmp_path)))
    assert records["a"].mask_path == tmp_path / mask_dir / "a.tif"
    assert records["b"].mask_path is None and records["b"].problem is None


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_images_png_and_masks_png(write_tif: WriteRaster, tmp_path: Path) -> None:
    _write_pairs(
        write_tif, tmp_path, {"images_png/1366": "masks_png/1366", "images_png/1367": "masks_png/1367"}, "png"
    )
    (tmp_path / "images_png" / "notes.txt").write_text("not a raster")
    records = _by_id(discover(DatasetSpec(dataset_id="loveda", root=tmp_path)))
    assert sorted(records) == ["1366", "1367"]
    assert records["1366"].image_path == tmp_path / "images_png" / "1366.png"
    assert records["1366"].mask_path == tmp_path / "masks_png" / "1366.png"


@pytest.mark.parametrize("val_name", ["val", "valid", "validation"])
def test_split_folders_above_images(write_tif: WriteRaster, tmp_path: Path, val_name: str) -> None:
    _write_pairs(
        write_tif,
        tmp_path,
        {
            "train/images/a": "train/masks/a",
            f"{val_name}/images/b": f"{val_name}/masks/b",
            "test/images/c": None,
        },
    )
    records = _by_id(discover(DatasetSpec(dataset_id="d", root=tmp_path)))
    assert {k: r.fixed_split for k, r in records.items()} == {"a": "train", "b": "val", "c": "test"}
    assert records["b"].mask_path == tmp_path / val_name / "masks" / "b.tif"
    assert all(r.problem is None for r in records.values())


@pytest.mark.parametrize("val_name", ["val", "valid", "validation"])
def test_split_folders_below_images(write_tif: WriteRaster, tmp_path: Path, val_name: str) -> None:
    _write_pairs(
        write_tif,
        tmp_path,
        {
            "images/train/a": "masks/train/a",
            f"images/{val_name}/b": f"masks/{val_name}/b",
            "images/test/c": None,
        },
    )
    records = _by_id(discover(DatasetSpec(dataset_id="d", root=tmp_path)))
    assert {k: r.fixed_split for k, r in records.items()} == {"a": "train", "b": "val", "c": "test"}
    assert records["a"].mask_path == tmp_path / "masks" / "train" / "a.tif"


def test_image_and_mask_in_different_split_folders_is_a_problem(
    write_tif: WriteRaster, tmp_path: Path
) -> None:
    _write_pairs(write_tif, tmp_path, {"train/images/a": "val/masks/a"})
    record = _by_id(discover(DatasetSpec(dataset_id="d", root=tmp_path)))["a"]
    assert record.problem is not None
    assert "'train'" in record.problem and "'val'" in record.problem


@pytest.mark.parametrize("suffix", ["_mask", "_label", "_gt", "-mask"])
def test_masks_pair_by_stem_with_a_mask_suffix(write_tif: WriteRaster, tmp_path: Path, suffix: str) -> None:
    _write_pairs(write_tif, tmp_path, {"images/scene_01": f"masks/scene_01{suffix}"})
    record = _by_id(discover(DatasetSpec(dataset_id="d", root=tmp_path)))["scene_01"]
    assert record.mask_path == tmp_path / "masks" / f"scene_01{suffix}.tif"
    assert record.problem is None


def test_explicit_globs_override_folder_detection(write_tif: WriteRaster, tmp_path: Path) -> None:
    _write_pairs(
        write_tif, tmp_path, {"rgb_2024/x1": "truth/x1_mask", "rgb_2024/x2": None, "rgb_2023/old": None}
    )
    spec = DatasetSpec(
        dataset_id="d", root=tmp_path, images_glob="rgb_2024/*.tif", masks_glob="truth/*_mask.tif"
    )
    found = discover(spec)
    records = _by_id(found)
    assert found.layout == "globs"
    assert sorted(records) == ["x1", "x2"]  # rgb_2023 is outside the glob
    assert records["x1"].mask_path == tmp_path / "truth" / "x1_mask.tif"
    assert records["x2"].mask_path is None


def test_glob_matching_nothing_names_the_glob(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetSpecError, match=r"images_glob='tiles/\*\.tif'"):
        discover(DatasetSpec(dataset_id="d", root=tmp_path, images_glob="tiles/*.tif"))


def test_masks_glob_without_images_glob_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="masks_glob is set but images_glob is not"):
        DatasetSpec.parse({"dataset_id": "d", "root": tmp_path, "masks_glob": "masks/*.tif"})


def test_hidden_files_and_sidecars_are_skipped(write_tif: WriteRaster, tmp_path: Path) -> None:
    _write_pairs(write_tif, tmp_path, {"images/a": "masks/a"})
    (tmp_path / "images" / ".a.tif.tmp.tif").write_bytes(b"partial")
    (tmp_path / "images" / "a.tif.aux.xml").write_text("<PAMDataset/>")
    assert sorted(_by_id(discover(DatasetSpec(dataset_id="d", root=tmp_path)))) == ["a"]


def test_classes_txt_with_ids(tmp_path: Path) -> None:
    path = tmp_path / "classes.txt"
    path.write_text("# id name\n1 water\n0 bare soil\n\n2 low vegetation\n")
    assert read_class_names(path) == ("bare soil", "water", "low vegetation")


def test_classes_txt_one_name_per_line(tmp_path: Path) -> None:
    path = tmp_path / "classes.txt"
    path.write_text("background\nbuilding\nroad\n")
    assert read_class_names(path) == ("background", "building", "road")


def test_classes_txt_with_a_gap_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "classes.txt"
    path.write_text("0 a\n2 c\n")
    with pytest.raises(DatasetSpecError, match=r"classes\.txt.*without gaps"):
        read_class_names(path)


def test_discover_reads_classes_txt_unless_the_spec_names_classes(
    make_dataset: MakeDataset, tmp_path: Path
) -> None:
    root = make_dataset(tmp_path / "d", rows=1, cols=1)
    assert discover(DatasetSpec(dataset_id="d", root=root)).class_names[:2] == ("bare_soil", "water")
    assert discover(DatasetSpec(dataset_id="d", root=root, class_names=("bg", "fg"))).class_names == (
        "bg",
        "fg",
    )
    (root / "classes.txt").unlink()
    assert discover(DatasetSpec(dataset_id="d", root=root)).class_names == ()


def test_empty_folder_names_the_folder(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DatasetSpecError, match="no raster tiles found") as caught:
        discover(DatasetSpec(dataset_id="d", root=tmp_path))
    assert str(tmp_path) in str(caught.value)


@pytest.mark.parametrize("bad_id", ["", "../escape", "my data", "/abs", ".hidden"])
def test_bad_dataset_id_names_the_field(tmp_path: Path, bad_id: str) -> None:
    with pytest.raises(SettingsError, match=f"dataset_id={bad_id!r}: use letters"):
        DatasetSpec.parse({"dataset_id": bad_id, "root": tmp_path})


def test_missing_root_names_the_field(tmp_path: Path) -> None:
    missing = tmp_path / "not_there"
    with pytest.raises(DatasetSpecError, match="root=") as caught:
        discover(DatasetSpec(dataset_id="d", root=missing))
    assert str(missing) in str(caught.value)


@pytest.mark.parametrize(
    ("field", "value"), [("expected_bands", 0), ("ignore_index", -1), ("ignore_index", 70000)]
)
def test_impossible_spec_values_name_the_field(tmp_path: Path, field: str, value: int) -> None:
    with pytest.raises(SettingsError, match=f"{field}={value}"):
        DatasetSpec.parse({"dataset_id": "d", "root": tmp_path, field: value})
