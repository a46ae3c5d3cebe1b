"""Tests for the seeded synthetic scene generator (F9 in docs/architecture.md)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio

from seg_pipeline.data.synthetic import (
    AUX_CLASSES,
    TARGET_CLASSES,
    TARGET_TO_AUX,
    SyntheticSpec,
    main,
    write_synthetic_dataset,
)

MakeDataset = Callable[..., Path]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def test_same_seed_gives_byte_identical_files(tmp_path: Path, make_dataset: MakeDataset) -> None:
    first = _files(make_dataset(tmp_path / "a", rows=2, cols=3, labeled_fraction=0.5, seed=3))
    second = _files(make_dataset(tmp_path / "b", rows=2, cols=3, labeled_fraction=0.5, seed=3))
    assert len(first) > 6
    assert first.keys() == second.keys()
    assert all(first[name] == second[name] for name in first)


def test_different_seed_gives_different_scenes(tmp_path: Path, make_dataset: MakeDataset) -> None:
    first = make_dataset(tmp_path / "a", rows=2, cols=3, seed=3)
    second = make_dataset(tmp_path / "b", rows=2, cols=3, seed=4)
    images = sorted(p.name for p in (first / "images").iterdir())
    assert images == sorted(p.name for p in (second / "images").iterdir())
    differing = [
        n for n in images if (first / "images" / n).read_bytes() != (second / "images" / n).read_bytes()
    ]
    assert differing == images


def test_rgb_variant_is_three_uint8_bands(demo_dataset: Path) -> None:
    images = sorted((demo_dataset / "images").glob("*.tif"))
    assert len(images) == 12
    with rasterio.open(images[0]) as src:
        assert (src.count, src.dtypes[0], src.width, src.height) == (3, "uint8", 32, 32)


def test_s2_variant_is_seven_uint16_bands(tmp_path: Path, make_dataset: MakeDataset) -> None:
    root = make_dataset(tmp_path / "s2", rows=1, cols=2, bands="s2")
    pixels = _read(root / "images" / "tile_000_000.tif")
    assert pixels.shape == (7, 32, 32)
    assert pixels.dtype == np.uint16
    assert 0 < pixels.max() <= 10_000  # reflectance scaled to 0..10000


def test_tiles_are_georeferenced_on_one_grid(demo_dataset: Path) -> None:
    def bounds(name: str) -> rasterio.coords.BoundingBox:
        with rasterio.open(demo_dataset / "images" / f"{name}.tif") as src:
            assert src.crs.to_string() == "EPSG:32633"
            return src.bounds

    with rasterio.open(demo_dataset / "images" / "tile_000_000.tif") as src:
        assert tuple(src.transform)[:6] == (0.5, 0.0, 500_000.0, 0.0, -0.5, 5_000_000.0)
    origin, right, below = bounds("tile_000_000"), bounds("tile_000_001"), bounds("tile_001_000")
    # 32 pixels of 0.5 m = 16 m per tile; neighbours share an edge, no gap and no overlap.
    assert origin == (500_000.0, 4_999_984.0, 500_016.0, 5_000_000.0)
    assert right.left == origin.right and (right.bottom, right.top) == (origin.bottom, origin.top)
    assert below.top == origin.bottom and (below.left, below.right) == (origin.left, origin.right)


def test_masks_share_the_image_grid(demo_dataset: Path) -> None:
    for mask_path in sorted((demo_dataset / "masks").glob("*.tif")):
        with (
            rasterio.open(mask_path) as mask,
            rasterio.open(demo_dataset / "images" / mask_path.name) as image,
        ):
            assert (mask.count, mask.dtypes[0]) == (1, "uint8")
            assert mask.transform == image.transform and mask.crs == image.crs
            assert mask.shape == image.shape


def test_classes_are_textured_not_flat_colours(tmp_path: Path, make_dataset: MakeDataset) -> None:
    root = make_dataset(tmp_path / "d", rows=3, cols=3, tile_size=64, seed=5)
    images = [_read(p) for p in sorted((root / "images").glob("*.tif"))]
    masks = [_read(p)[0] for p in sorted((root / "masks").glob("*.tif"))]
    image = np.concatenate([im.reshape(3, -1) for im in images], axis=1).astype(np.float64)
    mask = np.concatenate([m.ravel() for m in masks])
    present = [c for c in np.unique(mask) if (mask == c).sum() >= 50]
    assert len(present) >= 3
    for class_id in present:
        pixels = image[:, mask == class_id]
        assert (pixels.std(axis=1) > 1.0).all(), f"class {TARGET_CLASSES[class_id]} is a flat colour"
        assert len(np.unique(pixels[1])) > 10


@pytest.mark.parametrize(("fraction", "low", "high"), [(0.0, 0, 0), (1.0, 48, 48), (0.5, None, None)])
def test_labeled_fraction_is_respected(
    tmp_path: Path, make_dataset: MakeDataset, fraction: float, low: int | None, high: int | None
) -> None:
    root = make_dataset(tmp_path / "d", rows=6, cols=8, tile_size=16, labeled_fraction=fraction, seed=11)
    n_images = len(list((root / "images").glob("*.tif")))
    n_masks = len(list((root / "masks").glob("*.tif")))
    assert n_images == 48
    if low is None or high is None:  # binomial(48, p): within 3 standard deviations
        sd = math.sqrt(48 * fraction * (1 - fraction))
        low, high = math.floor(48 * fraction - 3 * sd), math.ceil(48 * fraction + 3 * sd)
    assert low <= n_masks <= high


def test_nodata_tiles_have_a_nodata_edge(tmp_path: Path, make_dataset: MakeDataset) -> None:
    root = make_dataset(tmp_path / "d", rows=1, cols=2, nodata_tile_fraction=1.0)
    with rasterio.open(root / "images" / "tile_000_001.tif") as src:
        pixels = src.read()
        assert src.nodata == 0
    assert (pixels[:, :, :8] == 0).all()  # a quarter of 32 columns
    assert (pixels[:, :, 8:] != 0).any(axis=0).all()


def test_classes_txt_lists_the_target_scheme(demo_dataset: Path) -> None:
    expected = "".join(f"{i} {name}\n" for i, name in enumerate(TARGET_CLASSES))
    assert (demo_dataset / "classes.txt").read_text() == expected


def test_aux_scheme_uses_the_eight_class_names_and_remaps_labels(
    tmp_path: Path, make_dataset: MakeDataset
) -> None:
    target = make_dataset(tmp_path / "target", rows=3, cols=3, seed=9)
    aux = make_dataset(tmp_path / "aux", rows=3, cols=3, seed=9, class_scheme="aux")
    lines = (aux / "classes.txt").read_text().splitlines()
    assert [line.split(" ", 1) for line in lines] == [[str(i), name] for i, name in enumerate(AUX_CLASSES)]
    lut = np.array([TARGET_TO_AUX[i] for i in range(len(TARGET_CLASSES))], dtype=np.uint8)
    vegetation, tree = TARGET_CLASSES.index("vegetation"), AUX_CLASSES.index("tree")
    rangeland = AUX_CLASSES.index("rangeland")
    seen_rangeland = 0
    for mask_path in sorted((target / "masks").glob("*.tif")):
        target_mask = _read(mask_path)[0]
        aux_mask = _read(aux / "masks" / mask_path.name)[0]
        # Same scene: every class maps through TARGET_TO_AUX, except that vegetation splits into
        # tree and (sparse) rangeland, two aux classes folding into one target class.
        other = target_mask != vegetation
        np.testing.assert_array_equal(aux_mask[other], lut[target_mask[other]])
        assert set(np.unique(aux_mask[~other]).tolist()) <= {tree, rangeland}
        seen_rangeland += int((aux_mask == rangeland).sum())
        assert not (aux_mask == AUX_CLASSES.index("unknown")).any()  # no nodata tiles here
    assert seen_rangeland > 0


def test_aux_scheme_labels_nodata_edges_unknown(tmp_path: Path, make_dataset: MakeDataset) -> None:
    aux = make_dataset(tmp_path / "aux", rows=1, cols=2, class_scheme="aux", nodata_tile_fraction=1.0)
    for mask_path in sorted((aux / "masks").glob("*.tif")):
        labels = _read(mask_path)[0]
        assert (labels[:, :8] == AUX_CLASSES.index("unknown")).all()
        assert not (labels[:, 8:] == AUX_CLASSES.index("unknown")).any()


def test_smallest_allowed_scene_does_not_crash(tmp_path: Path, make_dataset: MakeDataset) -> None:
    # One row of 16-pixel tiles is a valid spec; the building sizes must fit in a 16-pixel-high scene.
    root = make_dataset(tmp_path / "d", rows=1, cols=24, tile_size=16, seed=0)
    assert len(list((root / "images").glob("*.tif"))) == 24


@pytest.mark.parametrize(
    ("field", "value"),
    [("bands", "hsv"), ("class_scheme", "coco"), ("labeled_fraction", 1.5), ("tile_size", 8)],
)
def test_invalid_spec_names_the_field(tmp_path: Path, field: str, value: object) -> None:
    spec = SyntheticSpec(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=field):
        write_synthetic_dataset(tmp_path / "d", spec)
    assert not (tmp_path / "d").exists()


def test_cli_writes_once_then_skips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    args = ["--out", str(out), "--rows", "1", "--cols", "2", "--tile-size", "16", "--bands", "s2"]
    main(args)
    assert "wrote 2 synthetic s2 tiles" in capsys.readouterr().out
    main(args)
    assert "already present" in capsys.readouterr().out
