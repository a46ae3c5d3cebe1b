"""Class-imbalance tools: pixel counts and oversampling tiles that hold rare classes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
from rasterio.transform import Affine

from seg_pipeline.contracts import ShardSet
from seg_pipeline.data.combined import InterleavedSources
from seg_pipeline.data.datasets import ShardMapDataset
from seg_pipeline.data.loaders import build_train_loader
from seg_pipeline.data.sampling import (
    WeightedPatchDataset,
    class_pixel_counts,
    rare_class_sample_weights,
    rare_class_sampler,
    rare_classes_auto,
    rows_for_items,
)
from seg_pipeline.settings import (
    DatasetSettings,
    LoaderSettings,
    ShardSettings,
    SplitSettings,
    StageSettings,
)
from seg_pipeline.training.sources import TrainingSource, band_stats, build_training_data
from seg_pipeline.workflows import ingest
from seg_pipeline.workflows.layout import DataLayout
from seg_pipeline_tests.conftest import TEST_ORIGIN, TEST_PIXEL_SIZE, scratch_dir, tiny_stage, write_raster


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


# -- loader.rare_class_weight: the training stream draws rare tiles more often -------------------------

#: The fire dataset: 40 labelled 64 px RGB tiles, background | field halves, the first 4 with a fire blob.
FIRE_CLASSES = ("background", "field", "fire")
FIRE, N_TILES, FIRE_TILES, TILE = 2, 40, 4, 64


def ingest_fire_dataset(data_root: Path, name: str = "fire", seed: int = 0) -> ShardSet:
    """Ingest the fire dataset with the library's catalogue, split (all train) and shard steps.

    Band 0 of an image encodes its mask (``10 + 80 * class``), so a sample's mask can be checked
    against its own pixels; bands 1-2 are random.
    """
    rng = np.random.default_rng(seed)
    raw = data_root / "raw" / name
    for i in range(N_TILES):
        mask = np.zeros((TILE, TILE), np.uint8)
        mask[:, TILE // 2 :] = 1
        if i < FIRE_TILES:
            top, left = rng.integers(0, TILE - 6, 2)
            mask[top : top + 6, left : left + 6] = FIRE
        image = rng.integers(0, 255, (3, TILE, TILE), dtype=np.uint8)
        image[0] = 10 + 80 * mask
        x0 = TEST_ORIGIN[0] + i * TILE * TEST_PIXEL_SIZE
        transform = Affine(TEST_PIXEL_SIZE, 0.0, x0, 0.0, -TEST_PIXEL_SIZE, TEST_ORIGIN[1])
        write_raster(raw / "images" / f"t{i:02d}.tif", image, transform=transform)
        write_raster(raw / "masks" / f"t{i:02d}.tif", mask, transform=transform)
    (raw / "classes.txt").write_text("".join(f"{i} {n}\n" for i, n in enumerate(FIRE_CLASSES)))
    quiet = lambda _: None  # noqa: E731
    catalog = ingest.catalogue(DatasetSettings(dataset_id=name), DataLayout.at(data_root), quiet).catalog
    everything = SplitSettings(policy="supervised", train_fraction=1.0, val_fraction=0.0, test_fraction=0.0)
    table = ingest.split(everything, catalog, quiet)
    return ingest.shard(ShardSettings(tile_format="npy"), catalog, table, quiet).shards


def fire_stage(**changes: Any) -> StageSettings:
    """Stage settings for the fire dataset: 64 px patches (one per tile), seed 3."""
    return StageSettings.parse(tiny_stage(patches={"size": TILE}, loop={"seed": 3}, **changes))


def fire_data(shards: ShardSet, **changes: Any) -> InterleavedSources:
    return build_training_data(
        [TrainingSource(shards=shards)], FIRE_CLASSES, shards.catalog.ignore_index, fire_stage(**changes)
    )


def drawn(data: InterleavedSources, epochs: Sequence[int]) -> list[dict[str, Any]]:
    """Every sample the stream yields in ``epochs`` (as the trainer sees them, set_epoch first)."""
    samples = []
    for epoch in epochs:
        data.set_epoch(epoch)
        samples.extend(data)
    return samples


def fire_share(samples: Sequence[dict[str, Any]]) -> float:
    """Share of samples whose mask holds a fire pixel (read from the drawn pixels)."""
    return float(np.mean([bool((s["mask"] == FIRE).any()) for s in samples]))


@pytest.fixture(scope="module")
def fire(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ShardSet:
    return ingest_fire_dataset(scratch_dir(request, tmp_path_factory, "fire"))


def _train_counts(shards: ShardSet) -> tuple[int, int]:
    """Tiles of the train split and how many of them hold fire (the splitter may keep one for val)."""
    catalog = pd.read_parquet(shards.catalog.catalog_path).set_index("item_id")
    train = ShardMapDataset(shards.dataset_dir, "train", stats=band_stats(shards.catalog.normalization, "f"))
    holding = sum(1 for i in train.item_ids if catalog.loc[i, "class_counts"][FIRE] > 0)
    return len(train), holding


def test_rare_class_weight_draws_fire_patches_about_five_times_as_often(fire: ShardSet) -> None:
    n, holding = _train_counts(fire)
    assert n >= N_TILES - 2 and holding >= FIRE_TILES - 1
    epochs = range(5)
    off = drawn(fire_data(fire), epochs)
    on_data = fire_data(fire, loader={"rare_class_weight": 5.0, "rare_classes": ["fire"]})
    on = drawn(on_data, epochs)
    assert len(on_data) == n and len(on) == len(off) == 5 * n  # the epoch keeps its length
    assert fire_share(off) == holding / n  # unweighted: every tile once an epoch
    expected = 5 * holding / (5 * holding + n - holding)  # about 0.35
    assert fire_share(on) == pytest.approx(expected, abs=0.08)
    assert fire_share(on) > 2.5 * fire_share(off)
    # a tile drawn twice gets another patch number (another window and augmentation), never a copy
    for epoch in epochs:
        ids = [s["item_id"] for s in on[epoch * n : (epoch + 1) * n]]
        assert len(set(ids)) == len(ids)
        assert max(Counter(i.split("#")[0] for i in ids).values()) > 1
    # seeded: the same epoch draws the same patches, the next one draws again
    again = drawn(fire_data(fire, loader={"rare_class_weight": 5.0, "rare_classes": ["fire"]}), [0])
    assert [s["item_id"] for s in again] == [s["item_id"] for s in on[:n]]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(again, on, strict=False))
    assert [s["item_id"] for s in on[:n]] != [s["item_id"] for s in on[n : 2 * n]]


def test_rare_classes_auto_finds_the_fire_class(fire: ShardSet) -> None:
    named = drawn(fire_data(fire, loader={"rare_class_weight": 5.0, "rare_classes": ["fire"]}), [0, 1])
    auto = drawn(fire_data(fire, loader={"rare_class_weight": 5.0}), [0, 1])  # fire: 0.2 % of the pixels
    assert [s["item_id"] for s in auto] == [s["item_id"] for s in named]
    field = drawn(fire_data(fire, loader={"rare_class_weight": 5.0, "rare_classes": ["field"]}), [0, 1])
    n, holding = _train_counts(fire)
    # every tile holds field, so all weigh 5: a draw with replacement, fire at its plain share
    assert fire_share(field) == pytest.approx(holding / n, abs=0.06)


def test_rare_class_weight_with_loader_workers(fire: ShardSet) -> None:
    data = fire_data(fire, loader={"rare_class_weight": 5.0, "rare_classes": ["fire"]})
    loader = build_train_loader(data, LoaderSettings(batch_size=4, num_workers=2), seed=3)

    def epoch_samples(epoch: int) -> tuple[list[str], float]:
        data.set_epoch(epoch)
        batches = list(loader)
        ids = [i for b in batches for i in b["item_id"]]
        holds = [bool((m == FIRE).any()) for b in batches for m in b["mask"]]
        return ids, float(np.mean(holds))

    n, holding = _train_counts(fire)
    ids, _ = epoch_samples(0)
    assert len(ids) == n and epoch_samples(0)[0] == ids  # reproducible across worker restarts
    shares = [epoch_samples(e)[1] for e in range(4)]
    assert np.mean(shares) > 2.5 * holding / n


def test_unknown_rare_class_names_the_field_and_lists_the_classes(fire: ShardSet) -> None:
    with pytest.raises(ValueError, match=r"loader\.rare_classes.*'smoke'.*background.*field.*fire"):
        fire_data(fire, loader={"rare_class_weight": 5.0, "rare_classes": ["smoke"]})
    with pytest.raises(ValueError, match="rare_class_weight"):
        LoaderSettings(rare_class_weight=0.0)


def test_weighted_patch_dataset_needs_patch_mode_and_positive_weights(fire: ShardSet) -> None:
    stats = band_stats(fire.catalog.normalization, "fire")
    with pytest.raises(ValueError, match="patch_size"):
        WeightedPatchDataset(fire.dataset_dir, "train", tile_weights={}, stats=stats)
    with pytest.raises(ValueError, match="> 0"):
        WeightedPatchDataset(fire.dataset_dir, "train", tile_weights={"t00": 0.0}, stats=stats, patch_size=64)
