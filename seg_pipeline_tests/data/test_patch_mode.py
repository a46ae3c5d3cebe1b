"""Patch mode of the training dataset: tiles of any size (20 px chips to long strips) give square
patches that batch together, read window by window, reproducibly."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from seg_pipeline.data.headers import STATUS_OK, build_headers
from seg_pipeline.data.normalization import band_stats_from_catalog
from seg_pipeline.data.raster_io import write_geotiff
from seg_pipeline.data.shard_datasets import ShardIterableDataset
from seg_pipeline.data.shards import write_shards
from seg_pipeline.data.spec import DatasetSpec
from seg_pipeline.settings import ShardSettings
from seg_pipeline_tests.conftest import scratch_dir

IGNORE = 255
#: (height, width) of the tiles: smaller than a patch, a strip, larger than a patch, exactly one.
SIZES = {"tiny": (20, 20), "strip": (40, 300), "large": (200, 150), "exact": (64, 64)}
PATCH = 64


def write_mixed_tiles(raw: Path) -> None:
    """GeoTIFF tiles of very different sizes; mask = 1 + (row index // 10) % 2, all labelled."""
    rng = np.random.default_rng(0)
    (raw / "images").mkdir(parents=True)
    (raw / "masks").mkdir()
    (raw / "classes.txt").write_text("background\nbuilding\nroad\n")
    for name, (height, width) in SIZES.items():
        image = rng.integers(0, 255, (3, height, width), dtype=np.uint8)
        mask = (1 + (np.arange(height)[:, None] // 10) % 2 + np.zeros((1, width), dtype=int)).astype(np.uint8)
        write_geotiff(raw / "images" / f"{name}.tif", image)
        write_geotiff(raw / "masks" / f"{name}.tif", mask[np.newaxis])


@pytest.fixture(scope="module", params=["npy", "tif"])
def shards(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = scratch_dir(request, tmp_path_factory, "mixed")
    write_mixed_tiles(root / "raw")
    catalog = build_headers(DatasetSpec(dataset_id="mixed", root=root / "raw")).catalog
    assert (catalog["status"] == STATUS_OK).all(), catalog[["item_id", "status", "reason"]]
    splits = pd.DataFrame({"item_id": catalog["item_id"], "split": "train"})
    write_shards(
        catalog, splits, root / "out", ShardSettings(tile_format=request.param, max_items_per_shard=2)
    )
    return root / "out", band_stats_from_catalog(catalog)


def _dataset(shards: tuple[Path, object], **kwargs: object) -> ShardIterableDataset:
    out, stats = shards
    return ShardIterableDataset(out, "train", stats=stats, ignore_index=IGNORE, patch_size=PATCH, **kwargs)


def test_every_tile_gives_patches_by_its_area_and_they_batch(shards) -> None:
    dataset = _dataset(shards)
    expected = sum(max(1, math.ceil(h * w / PATCH**2)) for h, w in SIZES.values())
    batches = list(DataLoader(dataset, batch_size=4))
    samples = [s for b in batches for s in b["item_id"]]
    assert len(dataset) == expected == len(samples)
    assert all(b["image"].shape[1:] == (3, PATCH, PATCH) for b in batches)
    per_tile = pd.Series([s.split("#")[0] for s in samples]).value_counts().to_dict()
    assert per_tile == {"tiny": 1, "strip": 3, "large": 8, "exact": 1}


def test_a_tile_smaller_than_the_patch_is_inside_it_whole_and_the_rest_is_ignored(shards) -> None:
    (tiny,) = [s for s in _dataset(shards) if s["item_id"] == "tiny#0"]
    labelled = tiny["mask"] != IGNORE
    assert int(labelled.sum()) == 20 * 20  # every pixel of the tile, nothing else
    rows, cols = labelled.any(1).nonzero(), labelled.any(0).nonzero()
    assert int(rows[-1] - rows[0]) == 19 and int(cols[-1] - cols[0]) == 19
    assert set(tiny["mask"][labelled].unique().tolist()) <= {1, 2}


def test_patches_of_a_large_tile_lie_inside_it(shards) -> None:
    for sample in _dataset(shards):
        if sample["item_id"].startswith(("large", "exact")):
            assert bool((sample["mask"] != IGNORE).all()), sample["item_id"]


def test_positions_repeat_for_an_epoch_and_change_between_epochs(shards) -> None:
    def masks(epoch: int) -> dict[str, torch.Tensor]:
        dataset = _dataset(shards, seed=5, epoch=epoch)
        return {s["item_id"]: s["mask"] for s in dataset}

    first, again, other = masks(1), masks(1), masks(2)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if k.startswith("large"))


def test_batch_mode_yields_the_same_patches(shards) -> None:
    per_sample = {s["item_id"]: s["mask"] for s in _dataset(shards, shuffle=False)}
    batched = _dataset(shards, shuffle=False, batch_size=3)
    for raw in batched:
        batch = batched.finish_batch(raw)
        for item_id, mask in zip(batch["item_id"], batch["mask"], strict=True):
            assert torch.equal(mask, per_sample[item_id]), item_id


def test_a_schedule_reads_its_largest_size(shards) -> None:
    dataset = _dataset(shards, read_size=96)
    sample = next(iter(dataset))
    assert sample["image"].shape[-2:] == (96, 96)
    assert len(dataset) == len(_dataset(shards))  # patches per tile still follow patch_size


def test_bad_patch_arguments_are_refused(shards) -> None:
    with pytest.raises(ValueError, match="patch_size=0"):
        ShardIterableDataset(shards[0], "train", stats=shards[1], patch_size=0)
    with pytest.raises(ValueError, match="read_size needs patch_size"):
        ShardIterableDataset(shards[0], "train", stats=shards[1], read_size=64)
