"""Tests for deterministic, hash-stable splitting (F4 in docs/architecture.md)."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from seg_pipeline.data.headers import STATUS_OK, STATUS_QUARANTINED, build_headers
from seg_pipeline.data.spec import DatasetSpec
from seg_pipeline.data.splits import (
    SplitError,
    SplitSettings,
    assign_splits,
    duplicated_items,
    leaking_groups,
    read_split_table,
    split_counts,
    write_split_table,
)

MakeDataset = Callable[..., Path]
TILE_METRES = 16.0


def _catalog(n_labeled: int, n_unlabeled: int = 0, *, grid_cols: int = 50, prefix: str = "t") -> pd.DataFrame:
    """A catalog with just the columns ``assign_splits`` reads: 16 m tiles on a georeferenced grid."""
    rows = []
    for i in range(n_labeled + n_unlabeled):
        row, col = divmod(i, grid_cols)
        minx, maxy = 500_000.0 + col * TILE_METRES, 5_000_000.0 - row * TILE_METRES
        rows.append(
            {
                "item_id": f"{prefix}{i:05d}",
                "status": STATUS_OK,
                "has_label": i < n_labeled,
                "fixed_split": None,
                "image_path": f"/data/{prefix}{i:05d}.tif",
                "georeferenced": True,
                "crs": "EPSG:32633",
                "minx": minx,
                "maxx": minx + TILE_METRES,
                "miny": maxy - TILE_METRES,
                "maxy": maxy,
            }
        )
    return pd.DataFrame(rows)


def _assignment(table: pd.DataFrame) -> dict[str, str]:
    return dict(zip(table["item_id"], table["split"], strict=True))


def _within_3_sd(count: int, n: int, p: float) -> bool:
    sd = math.sqrt(n * p * (1 - p))
    return abs(count - n * p) <= 3 * sd


def test_same_seed_gives_a_byte_identical_split_file(tmp_path: Path) -> None:
    catalog = _catalog(300, 50)
    first = write_split_table(assign_splits(catalog, SplitSettings(seed=5)), tmp_path / "a.parquet")
    shuffled = catalog.sample(frac=1.0, random_state=1)  # row order must not matter
    second = write_split_table(assign_splits(shuffled, SplitSettings(seed=5)), tmp_path / "b.parquet")
    assert first.read_bytes() == second.read_bytes()
    table = read_split_table(first)
    assert list(table.columns) == ["item_id", "split", "group", "has_label", "hash_u"]
    assert table["item_id"].tolist() == sorted(catalog["item_id"])


def test_different_seed_gives_a_different_assignment() -> None:
    catalog = _catalog(400)
    first = _assignment(assign_splits(catalog, SplitSettings(policy="v0", seed=0)))
    second = _assignment(assign_splits(catalog, SplitSettings(policy="v0", seed=1)))
    moved = sum(first[k] != second[k] for k in first)
    # Two independent 25/50/25 draws disagree with probability 1 - (0.25^2 + 0.5^2 + 0.25^2) = 0.625.
    assert _within_3_sd(moved, 400, 0.625)


@pytest.mark.parametrize("policy", ["v0", "supervised"])
@pytest.mark.parametrize("block", [None, 64.0])
def test_adding_and_removing_tiles_moves_no_other_tile(policy: str, block: float | None) -> None:
    config = SplitSettings(policy=policy, seed=3, group_block_size=block)
    base = _catalog(200, 40)
    before = _assignment(assign_splits(base, config))

    grown = pd.concat([base, _catalog(10, grid_cols=10, prefix="new")], ignore_index=True)
    after_adding = _assignment(assign_splits(grown, config))
    assert len(after_adding) == 250
    assert {k: after_adding[k] for k in before} == before

    shrunk = base.drop(index=range(0, 240, 3))
    after_removing = _assignment(assign_splits(shrunk, config))
    assert after_removing == {k: before[k] for k in shrunk["item_id"]}


def test_adding_ten_real_tiles_moves_none_of_the_old_ones(tmp_path: Path, make_dataset: MakeDataset) -> None:
    root = make_dataset(tmp_path / "d", rows=3, cols=4, labeled_fraction=0.75, seed=2)
    config = SplitSettings(policy="supervised", seed=0)
    before = _assignment(assign_splits(build_headers(DatasetSpec(dataset_id="d", root=root)).catalog, config))
    extra = make_dataset(tmp_path / "extra", rows=2, cols=5, seed=3, item_prefix="new")
    for sub in ("images", "masks"):
        for path in (extra / sub).glob("*.tif"):
            shutil.move(path, root / sub / path.name)

    after = _assignment(assign_splits(build_headers(DatasetSpec(dataset_id="d", root=root)).catalog, config))

    assert len(before) == 12 and len(after) == 22
    assert {k: after[k] for k in before} == before


def test_v0_policy_statistics_over_2000_labeled_tiles() -> None:
    table = assign_splits(_catalog(2000, 500), SplitSettings(policy="v0", seed=0))
    labeled, unlabeled = table[table["has_label"]], table[~table["has_label"]]
    assert set(labeled["split"]) == {"metrics_train", "train", "val"}  # the stages get labeled tiles
    for split, p in (("metrics_train", 0.25), ("train", 0.5), ("val", 0.25)):
        assert _within_3_sd(int((labeled["split"] == split).sum()), 2000, p), split
    assert (unlabeled["split"] == "train").all() and len(unlabeled) == 500
    # The hash draw is uniform: its mean over 2500 tiles is 0.5 within 3 standard errors.
    assert abs(table["hash_u"].mean() - 0.5) <= 3 * math.sqrt(1 / 12 / 2500)


def test_v0_metrics_fraction_is_configurable() -> None:
    table = assign_splits(
        _catalog(2000), SplitSettings(policy="v0", metrics_fraction=0.6, v0_train_fraction=0.3)
    )
    assert _within_3_sd(int((table["split"] == "metrics_train").sum()), 2000, 0.6)
    assert _within_3_sd(int((table["split"] == "train").sum()), 2000, 0.3)
    with pytest.raises(ValueError, match=r"metrics_fraction 0\.6 \+ v0_train_fraction 0\.5 exceed 1"):
        SplitSettings(policy="v0", metrics_fraction=0.6)


def test_supervised_policy_statistics_over_2000_labeled_tiles() -> None:
    config = SplitSettings(policy="supervised", train_fraction=0.6, val_fraction=0.25, test_fraction=0.15)
    table = assign_splits(_catalog(2000, 300), config)
    counts = split_counts(table)
    assert set(counts) == {"train", "val", "test", "unlabeled"}
    assert counts["unlabeled"] == 300
    assert (table.loc[table["split"] == "unlabeled", "has_label"] == False).all()  # noqa: E712
    for split, p in (("train", 0.6), ("val", 0.25), ("test", 0.15)):
        assert _within_3_sd(counts[split], 2000, p), (split, counts)


def test_fixed_policy_uses_the_folder_split() -> None:
    catalog = _catalog(6)
    catalog["fixed_split"] = ["train", "train", "val", "test", "val", "train"]
    catalog.loc[5, "has_label"] = False
    table = assign_splits(catalog, SplitSettings(policy="fixed"))
    assert table["split"].tolist() == ["train", "train", "val", "test", "val", "train"]


def test_quarantined_tiles_get_no_split() -> None:
    catalog = _catalog(10)
    catalog.loc[[2, 7], "status"] = STATUS_QUARANTINED
    table = assign_splits(catalog, SplitSettings())
    assert sorted(table["item_id"]) == sorted(catalog["item_id"].drop(index=[2, 7]))


def test_no_valid_tile_is_an_error() -> None:
    catalog = _catalog(3)
    catalog["status"] = STATUS_QUARANTINED
    with pytest.raises(SplitError, match="no valid tile"):
        assign_splits(catalog, SplitSettings())


def test_spatial_grouping_keeps_each_block_in_one_split() -> None:
    # 16 x 16 tiles of 16 m; 32 m blocks hold 2 x 2 tiles, so there are 64 groups of 4.
    catalog = _catalog(256, grid_cols=16)
    table = assign_splits(catalog, SplitSettings(policy="supervised", group_block_size=32.0, seed=1))
    merged = table.merge(catalog, on="item_id")
    block_of = (
        ((merged["minx"] + 8) // 32).astype(int).astype(str)
        + ":"
        + ((merged["miny"] + 8) // 32).astype(int).astype(str)
    )
    splits_per_block = merged.groupby(block_of)["split"].nunique()
    assert len(splits_per_block) == 64
    assert (merged.groupby(block_of).size() == 4).all()
    assert (splits_per_block == 1).all()
    assert table["group"].nunique() == 64
    assert len(set(table["split"])) == 3  # groups still spread over the splits
    assert leaking_groups(table) == []


def test_without_grouping_every_tile_is_its_own_group() -> None:
    table = assign_splits(_catalog(20), SplitSettings(group_block_size=None))
    assert table["group"].tolist() == table["item_id"].tolist()


def test_non_georeferenced_tiles_are_grouped_by_item_id() -> None:
    catalog = _catalog(8)
    catalog["georeferenced"] = False
    catalog["crs"] = None
    table = assign_splits(catalog, SplitSettings(group_block_size=1000.0))
    assert table["group"].tolist() == table["item_id"].tolist()


def test_leaking_groups_reports_a_group_in_two_splits() -> None:
    table = pd.DataFrame(
        {
            "item_id": ["a", "b", "c", "d", "e", "f"],
            "split": ["train", "val", "train", "train", "val", "train"],
            "group": ["g1", "g1", "g2", "g2", "g3", "g3"],
            "has_label": [True, True, True, True, False, True],
            "hash_u": [0.1] * 6,
        }
    )
    # g1 leaks; g3 mixes splits only through an unlabeled tile, which never reaches a metric.
    assert leaking_groups(table) == ["g1"]


def test_duplicated_items_finds_a_duplicate() -> None:
    table = pd.DataFrame(
        {"item_id": ["a", "b", "a", "c", "c", "c"], "split": ["train", "val", "val", "test", "test", "val"]}
    )
    assert duplicated_items(table) == ["a", "c"]
    assert duplicated_items(table.drop_duplicates("item_id")) == []


def test_split_counts_are_sorted_by_name() -> None:
    table = pd.DataFrame({"split": ["val", "train", "val", "metrics_train"]})
    assert list(split_counts(table).items()) == [("metrics_train", 1), ("train", 1), ("val", 2)]


def _degree_tiles(boxes: dict[str, tuple[float, float, float, float]], labeled: bool = True) -> pd.DataFrame:
    """Tiles in EPSG:4326 (degrees) with the given (minx, miny, maxx, maxy) footprints."""
    rows = [
        {
            "item_id": item,
            "status": STATUS_OK,
            "has_label": labeled,
            "fixed_split": None,
            "image_path": f"/data/{item}.tif",
            "georeferenced": True,
            "crs": "EPSG:4326",
            "minx": b[0],
            "miny": b[1],
            "maxx": b[2],
            "maxy": b[3],
        }
        for item, b in boxes.items()
    ]
    return pd.DataFrame(rows)


def test_footprint_grouping_keeps_zoom_levels_of_one_place_together() -> None:
    # Kampala-like: a zoom-19 tile over four zoom-21 tiles (degrees), and a separate pair sharing an edge.
    step = 0.0008
    boxes = {f"z21_{r}{c}": (32.59 + c * step, 0.35 + r * step, 32.59 + (c + 1) * step, 0.35 + (r + 1) * step)
             for r in range(2) for c in range(2)}  # fmt: skip
    boxes["z19"] = (32.59, 0.35, 32.59 + 2 * step, 0.35 + 2 * step)
    boxes["east_a"] = (33.0, 0.35, 33.0 + step, 0.35 + step)
    boxes["east_b"] = (33.0 + step, 0.35, 33.0 + 2 * step, 0.35 + step)  # only an edge in common
    table = assign_splits(_degree_tiles(boxes), SplitSettings(seed=0, group_footprints=True))
    groups = dict(zip(table["item_id"], table["group"], strict=True))
    assert {groups[k] for k in boxes if k.startswith("z")} == {"z19"}  # one group, named by its smallest id
    assert groups["east_a"] == "east_a" and groups["east_b"] == "east_b"
    assert leaking_groups(table) == []
    without = assign_splits(_degree_tiles(boxes), SplitSettings(seed=0))
    assert without["group"].nunique() == len(boxes)


def test_a_tiny_dataset_still_gets_train_and_val() -> None:
    for seed in range(20):
        table = assign_splits(_catalog(3), SplitSettings(seed=seed))
        assert {"train", "val"} <= set(table["split"]), (seed, _assignment(table))


def test_too_few_labeled_tiles_name_what_to_change() -> None:
    with pytest.raises(
        SplitError, match=r"split '(train|val)' gets no labeled tile: 1 labeled tiles in 1 group"
    ):
        assign_splits(_catalog(1, 5), SplitSettings(seed=0))


def test_fixed_policy_sends_tiles_outside_split_folders_to_unassigned_split() -> None:
    catalog = _catalog(6)
    catalog.loc[:1, "fixed_split"] = "val"
    table = assign_splits(catalog, SplitSettings(policy="fixed", unassigned_split="train"))
    assert split_counts(table) == {"train": 4, "val": 2}
    with pytest.raises(SplitError, match="set unassigned_split"):
        assign_splits(catalog, SplitSettings(policy="fixed"))


def test_a_test_tile_moves_to_an_empty_val_before_train_gives_one_up() -> None:
    # Two labeled tiles whose draws put one in train and one in test: val takes the test tile.
    for seed in range(50):
        table = assign_splits(_catalog(2), SplitSettings(seed=seed))
        assert set(table["split"]) == {"train", "val"}, (seed, _assignment(table))


def test_three_labeled_groups_give_train_val_and_test_apart() -> None:
    # Seven footprint groups (Kampala: one per zoom-19 tile) must still leave a test split apart from
    # val, which picks the checkpoint; repairs move whole groups.
    for seed in range(30):
        table = assign_splits(_catalog(7), SplitSettings(seed=seed))
        assert {"train", "val", "test"} <= set(table["split"]), (seed, _assignment(table))
