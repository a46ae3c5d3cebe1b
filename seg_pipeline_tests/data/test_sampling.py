"""Class-imbalance tools: pixel counts and oversampling tiles that hold rare classes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest
import rasterio
import torch

from seg_pipeline.data.datasets import ShardMapDataset
from seg_pipeline.data.sampling import (
    class_pixel_counts,
    rare_class_sample_weights,
    rare_class_sampler,
    rare_classes_auto,
    rows_for_items,
)
from seg_pipeline_tests.data.test_shard_datasets import build_sharded_dataset


def _catalog() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item_id": ["a", "b", "c", "d", "q"],
            "status": ["ok", "ok", "ok", "ok", "quarantined"],
            "class_counts": [[90, 10, 0], [100, 0, 0], [50, 0, 2], None, [0, 0, 999]],
        }
    )


def test_class_pixel_counts() -> None:
    catalog = _catalog()
    np.testing.assert_array_equal(class_pixel_counts(catalog), [240, 10, 2])
    np.testing.assert_array_equal(class_pixel_counts(catalog, ["a", "d"]), [90, 10, 0])
    np.testing.assert_array_equal(class_pixel_counts(catalog, num_classes=4), [240, 10, 2, 0])
    with pytest.raises(ValueError, match="item_ids"):
        class_pixel_counts(catalog, ["q"])


def test_rare_classes_auto() -> None:
    assert rare_classes_auto([240, 10, 2]) == [1, 2]  # 4% and 0.8% of 252 pixels
    assert rare_classes_auto([240, 10, 2], max_share=0.01) == [2]
    assert rare_classes_auto([10, 0, 10]) == []  # absent classes are not "rare"
    assert rare_classes_auto([0, 0]) == []


def test_rare_class_weights() -> None:
    rows = _catalog().iloc[:4]
    weights = rare_class_sample_weights(rows, rare_classes=[2], boost=5.0)
    assert weights.dtype == torch.float64
    assert weights.tolist() == [1.0, 1.0, 5.0, 1.0]
    assert rare_class_sample_weights(rows, "auto", boost=3.0).tolist() == [3.0, 1.0, 3.0, 1.0]
    assert rare_class_sample_weights(rows, [2], boost=5.0, min_pixels=3).tolist() == [1.0] * 4
    with pytest.raises(ValueError, match="boost"):
        rare_class_sample_weights(rows, [1], boost=0)
    with pytest.raises(ValueError, match="rare_classes"):
        rare_class_sample_weights(rows, "rarest")


def test_rows_for_items_keeps_order() -> None:
    rows = rows_for_items(_catalog(), ["c", "a"])
    assert rows["item_id"].tolist() == ["c", "a"]
    with pytest.raises(ValueError, match="not in the catalog"):
        rows_for_items(_catalog(), ["zz"])


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return build_sharded_dataset(tmp_path_factory.mktemp("sampling"))


def test_sampler_boosts_tiles_with_rare_classes(data: dict) -> None:
    dataset = ShardMapDataset(data["dirs"][("npy", 3)], "train", stats=data["stats"])
    catalog = data["catalog"].set_index("item_id")
    # the rare class and which tiles hold it, read from the mask files (independent of class_counts)
    holders: dict[int, set[str]] = {}
    for item_id in dataset.item_ids:
        mask_path = catalog.loc[item_id, "mask_path"]
        if isinstance(mask_path, str):
            with rasterio.open(mask_path) as src:
                for value in np.unique(src.read(1)):
                    holders.setdefault(int(value), set()).add(item_id)
    n_tiles = len(dataset)
    rare = next(
        c for c, tiles in sorted(holders.items(), key=lambda kv: len(kv[1])) if 0 < len(tiles) < n_tiles / 2
    )
    boosted = holders[rare]
    sampler = rare_class_sampler(
        dataset, data["catalog"], rare_classes=[rare], boost=5.0, num_samples=20000, seed=1
    )
    draws = Counter(dataset.item_ids[i] for i in sampler)
    share = sum(draws[i] for i in boosted) / 20000
    expected = 5.0 * len(boosted) / (5.0 * len(boosted) + (n_tiles - len(boosted)))
    assert share == pytest.approx(expected, abs=0.02)
    per_boosted = np.mean([draws[i] for i in boosted])
    per_plain = np.mean([draws[i] for i in dataset.item_ids if i not in boosted])
    assert per_boosted / per_plain == pytest.approx(5.0, rel=0.15)
    again = rare_class_sampler(
        dataset, data["catalog"], rare_classes=[rare], boost=5.0, num_samples=50, seed=1
    )
    assert list(again) == list(
        rare_class_sampler(dataset, data["catalog"], [rare], 5.0, num_samples=50, seed=1)
    )


def test_sampler_default_draws_one_epoch(data: dict) -> None:
    dataset = ShardMapDataset(data["dirs"][("npy", 16)], "train", stats=data["stats"])
    sampler = rare_class_sampler(dataset, data["catalog"])
    assert len(sampler) == len(dataset)
    assert all(0 <= i < len(dataset) for i in sampler)
