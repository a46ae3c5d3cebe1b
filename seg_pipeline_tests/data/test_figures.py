"""Split pictures: the class shares they draw, and which tiles a footprint map can place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rasterio.warp import transform_bounds

from seg_pipeline.data.figures import (
    _footprints_lonlat,
    class_shares,
    ordered_splits,
    plot_class_shares,
    plot_split_footprints,
)

PALETTE = np.array([[0, 0, 0], [220, 20, 20], [0, 100, 200]], dtype=np.uint8)
CLASSES = ["background", "building", "water"]


def _tiles(**columns: list) -> pd.DataFrame:
    n = len(next(iter(columns.values())))
    base = {
        "item_id": [f"t{i}" for i in range(n)],
        "crs": ["EPSG:32633"] * n,
        "georeferenced": [True] * n,
        "minx": [500_000.0 + 100 * i for i in range(n)],
        "miny": [5_000_000.0] * n,
        "maxx": [500_100.0 + 100 * i for i in range(n)],
        "maxy": [5_000_100.0] * n,
        "has_label": [True] * n,
        "class_counts": [[1, 1, 0]] * n,
    }
    return pd.DataFrame({**base, **columns})


def test_class_shares_sum_each_splits_labelled_pixels() -> None:
    tiles = _tiles(
        split=["train", "val", "train", "unlabeled"],
        class_counts=[[30, 10, 0], [5, 0, 5], [50, 10, 0], None],
        has_label=[True, True, True, False],
    )
    shares = class_shares(tiles, CLASSES)
    assert list(shares.index) == ["train", "val"]  # reading order; no labelled pixels, no row
    assert shares.loc["train"].tolist() == pytest.approx([0.8, 0.2, 0.0])
    assert shares.loc["val"].tolist() == pytest.approx([0.5, 0.0, 0.5])


def test_splits_read_in_the_usual_order() -> None:
    assert ordered_splits(["unlabeled", "test", "zz", "train", "val", "metrics_train"]) == [
        "train", "val", "test", "metrics_train", "unlabeled", "zz",
    ]  # fmt: skip


def test_tiles_in_several_crs_are_mapped_in_longitude_latitude() -> None:
    tiles = _tiles(split=["train", "val"], crs=["EPSG:32633", "EPSG:32634"])
    mapped, crs = _footprints_lonlat(tiles)
    assert crs == "EPSG:4326"
    expected = transform_bounds("EPSG:32634", "EPSG:4326", 500_100.0, 5_000_000.0, 500_200.0, 5_000_100.0)
    assert mapped.loc[1, ["minx", "miny", "maxx", "maxy"]].tolist() == pytest.approx(list(expected))
    same, own = _footprints_lonlat(_tiles(split=["train", "val"]))
    assert own == "EPSG:32633" and same["minx"].tolist() == [500_000.0, 500_100.0]


def test_pictures_are_written_and_skipped_when_there_is_nothing_to_draw(tmp_path: Path) -> None:
    tiles = _tiles(split=["train", "val", "test"])
    assert plot_split_footprints(tmp_path / "map.png", tiles, "t") == tmp_path / "map.png"
    assert plot_class_shares(tmp_path / "shares.png", tiles, CLASSES, PALETTE, "t") == tmp_path / "shares.png"
    assert (tmp_path / "map.png").stat().st_size > 5_000 and (tmp_path / "shares.png").stat().st_size > 5_000
    # photos without georeferencing have no place on a map; tiles without labels have no classes
    photos = _tiles(split=["train"], georeferenced=[False], crs=[None])
    assert plot_split_footprints(tmp_path / "none.png", photos, "t") is None
    unlabeled = _tiles(split=["train"], has_label=[False])
    assert plot_class_shares(tmp_path / "none.png", unlabeled, CLASSES, PALETTE, "t") is None
    assert not (tmp_path / "none.png").exists()
