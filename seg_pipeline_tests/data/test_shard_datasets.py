"""Shard datasets on real shards built from synthetic tiles: partitioning across ranks and
workers, sample contents, caching."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
from torch.utils.data import DataLoader

from seg_pipeline.data.augment import Augmenter
from seg_pipeline.data.headers import STATUS_OK, build_headers
from seg_pipeline.data.normalization import BandStats, band_stats_from_catalog
from seg_pipeline.data.raster_io import write_geotiff
from seg_pipeline.data.shard_datasets import ShardIterableDataset, ShardMapDataset
from seg_pipeline.data.shards import read_shard_index, shard_dirs, write_shards
from seg_pipeline.data.spec import DatasetSpec
from seg_pipeline.data.synthetic import SyntheticSpec, write_synthetic_dataset
from seg_pipeline.settings import AugmentSettings, ShardSettings

IGNORE = 255


def build_sharded_dataset(root: Path, *, rows: int = 4, cols: int = 4, tile_size: int = 32) -> dict:
    """Synthetic tiles -> catalog -> every OK tile in split ``train`` -> shards of several sizes.

    Folders ``<root>/<fmt>_<n>`` hold ``npy``/``tif`` shards of at most ``n`` items.
    """
    spec = SyntheticSpec(
        grid_rows=rows, grid_cols=cols, tile_size=tile_size, labeled_fraction=0.7, nodata_tile_fraction=0.3
    )
    write_synthetic_dataset(root / "raw", spec, seed=3)
    catalog = build_headers(DatasetSpec(dataset_id="t", root=root / "raw")).catalog
    ok = catalog[catalog["status"] == STATUS_OK]
    splits = pd.DataFrame({"item_id": ok["item_id"], "split": "train"})
    dirs = {}
    for fmt in ("npy", "tif"):
        for per_shard in (1, 3, 16):
            out = root / f"{fmt}_{per_shard}"
            write_shards(catalog, splits, out, ShardSettings(tile_format=fmt, max_items_per_shard=per_shard))
            dirs[(fmt, per_shard)] = out
    return {
        "catalog": catalog,
        "ids": sorted(ok["item_id"]),
        "dirs": dirs,
        "stats": band_stats_from_catalog(catalog),
    }


def _raw(catalog: pd.DataFrame, item_id: str) -> tuple[np.ndarray, np.ndarray | None]:
    row = catalog.set_index("item_id").loc[item_id]
    with rasterio.open(row["image_path"]) as src:
        image = src.read()
    mask = None
    if isinstance(row["mask_path"], str):
        with rasterio.open(row["mask_path"]) as src:
            mask = src.read(1)
    return image, mask


# -- partitioning -------------------------------------------------------------------------------
@pytest.mark.parametrize("per_shard", [1, 3, 16])
def test_two_ranks_two_workers_partition_exactly(data: dict, per_shard: int) -> None:
    dataset = ShardIterableDataset(data["dirs"][("npy", per_shard)], "train", stats=data["stats"])
    parts = [
        [row.item_id for row in dataset.rows_for(rank, 2, worker, 2)]
        for rank in range(2)
        for worker in range(2)
    ]
    seen = Counter(i for part in parts for i in part)
    assert sorted(seen) == data["ids"]
    assert set(seen.values()) == {1}
    assert all(parts)  # nobody idle, even with a single shard (item-level fallback)
    if len(dataset.shards) >= 4:  # whole shards: each shard's items live in one part
        for shard in dataset.shards:
            owners = {p for p, part in enumerate(parts) for row in shard if row.item_id in part}
            assert len(owners) == 1


def test_set_epoch_changes_order_deterministically(data: dict) -> None:
    dataset = ShardIterableDataset(data["dirs"][("npy", 3)], "train", stats=data["stats"], seed=5)
    order0 = [r.item_id for r in dataset.rows_for()]
    assert order0 == [r.item_id for r in dataset.rows_for()]
    dataset.set_epoch(1)
    order1 = [r.item_id for r in dataset.rows_for()]
    assert order1 != order0 and sorted(order1) == sorted(order0)
    other = ShardIterableDataset(data["dirs"][("npy", 3)], "train", stats=data["stats"], seed=5, epoch=1)
    assert [r.item_id for r in other.rows_for()] == order1
    unshuffled = ShardIterableDataset(data["dirs"][("npy", 3)], "train", stats=data["stats"], shuffle=False)
    assert [r.item_id for r in unshuffled.rows_for()] == data["ids"]


def _epoch_ids(loader: DataLoader) -> list[str]:
    return [i for batch in loader for i in batch["item_id"]]


@pytest.mark.parametrize("per_shard", [1, 16])  # 16 shards (> workers) and 1 shard (< workers)
@pytest.mark.parametrize("batched", [False, True])
def test_dataloader_two_workers_sees_every_item_once(data: dict, per_shard: int, batched: bool) -> None:
    dataset = ShardIterableDataset(
        data["dirs"][("npy", per_shard)], "train", stats=data["stats"], batch_size=4 if batched else None
    )
    loader = DataLoader(dataset, batch_size=None if batched else 4, num_workers=2, persistent_workers=True)
    for epoch in range(2):
        dataset.set_epoch(epoch)
        ids = _epoch_ids(loader)
        assert sorted(ids) == data["ids"], f"epoch {epoch}: duplicates or gaps"


def test_set_epoch_reaches_persistent_workers(data: dict) -> None:
    dataset = ShardIterableDataset(data["dirs"][("npy", 3)], "train", stats=data["stats"], seed=1)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, persistent_workers=True)
    first = _epoch_ids(loader)
    dataset.set_epoch(1)
    second = _epoch_ids(loader)
    assert sorted(first) == sorted(second) and first != second
    fresh = ShardIterableDataset(data["dirs"][("npy", 3)], "train", stats=data["stats"], seed=1, epoch=1)
    assert _epoch_ids(DataLoader(fresh, batch_size=2, num_workers=2)) == second


# -- samples ------------------------------------------------------------------------------------
def test_samples_match_independent_normalisation(data: dict) -> None:
    dataset = ShardMapDataset(data["dirs"][("npy", 3)], "train", stats=data["stats"])
    mean = np.asarray(data["stats"].mean)[:, None, None]
    std = np.asarray(data["stats"].std)[:, None, None]
    n_nodata = n_unlabeled = 0
    for index in range(len(dataset)):
        sample = dataset[index]
        image, mask = _raw(data["catalog"], sample["item_id"])
        assert sample["image"].dtype == torch.float32 and sample["mask"].dtype == torch.int64
        nodata = (image == 0).all(axis=0)
        expected = np.where(nodata[None], 0.0, (image - mean) / std)
        np.testing.assert_allclose(sample["image"].numpy(), expected, rtol=1e-5, atol=1e-5)
        if mask is None:
            n_unlabeled += 1
            assert (sample["mask"] == IGNORE).all()
        else:
            expected_mask = np.where(nodata, IGNORE, mask)
            np.testing.assert_array_equal(sample["mask"].numpy(), expected_mask)
        n_nodata += int(nodata.any())
    assert n_nodata > 0 and n_unlabeled > 0, "fixture must contain nodata and unlabeled tiles"


def test_nan_pixels_are_ignored(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    image = np.random.default_rng(0).random((2, 16, 16)).astype(np.float32)
    image[1, 3, 4] = np.nan
    image[:, 5, 6] = -1.0  # nodata in every band
    image[0, 7, 8] = -1.0  # nodata in one band only: still valid
    geo = {"crs": "EPSG:32633", "transform": (1, 0, 500, 0, -1, 900)}
    write_geotiff(raw / "images" / "a.tif", image, nodata=-1.0, **geo)
    write_geotiff(raw / "masks" / "a.tif", np.ones((16, 16), np.uint8), **geo)
    catalog = build_headers(DatasetSpec(dataset_id="n", root=raw)).catalog
    splits = pd.DataFrame({"item_id": ["a"], "split": "train"})
    write_shards(catalog, splits, tmp_path / "s", ShardSettings(tile_format="npy"))
    sample = ShardMapDataset(tmp_path / "s", "train", stats=BandStats((0.5, 0.5), (0.25, 0.25)))[0]
    ignored = sorted(map(tuple, np.argwhere(sample["mask"].numpy() == IGNORE)))
    assert ignored == [(3, 4), (5, 6)]
    assert torch.isfinite(sample["image"]).all()
    assert sample["image"][:, 3, 4].tolist() == [0.0, 0.0] and sample["image"][:, 5, 6].tolist() == [0.0, 0.0]
    assert sample["image"][0, 7, 8].item() == pytest.approx((-1.0 - 0.5) / 0.25)


def test_npy_and_tif_shards_give_identical_tensors(data: dict) -> None:
    kwargs = dict(stats=data["stats"], augmenter=Augmenter(AugmentSettings(), seed=2), seed=9)
    npy = ShardMapDataset(data["dirs"][("npy", 3)], "train", **kwargs)
    tif = ShardMapDataset(data["dirs"][("tif", 3)], "train", **kwargs)
    assert npy.item_ids == tif.item_ids
    for index in range(len(npy)):
        a, b = npy[index], tif[index]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])


def test_augmentation_depends_on_item_not_worker(data: dict) -> None:
    """Same (seed, epoch, item) -> same augmented sample, whichever loader layout drew it."""

    def samples(per_shard: int, workers: int) -> dict[str, torch.Tensor]:
        dataset = ShardIterableDataset(
            data["dirs"][("npy", per_shard)],
            "train",
            stats=data["stats"],
            augmenter=Augmenter(AugmentSettings()),
        )
        loader = DataLoader(dataset, batch_size=None, num_workers=workers)
        return {s["item_id"]: s["image"] for s in loader}

    a, b = samples(1, 0), samples(16, 2)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_views_and_drop_unlabeled(data: dict) -> None:
    dataset = ShardMapDataset(
        data["dirs"][("npy", 3)],
        "train",
        stats=data["stats"],
        augmenter=Augmenter(AugmentSettings()),
        two_views=True,
        drop_unlabeled=True,
    )
    labeled = data["catalog"].query("status == 'ok' and has_label")["item_id"]
    assert sorted(dataset.item_ids) == sorted(labeled)
    batch = next(iter(DataLoader(dataset, batch_size=3)))
    assert batch["image_view1"].shape == batch["image_view2"].shape == (3, 3, 32, 32)
    assert batch["mask_view2"].shape == (3, 32, 32)
    assert torch.equal(batch["image"], batch["image_view1"])
    assert not torch.equal(batch["image_view1"], batch["image_view2"])
    with pytest.raises(ValueError, match="two_views"):
        ShardMapDataset(data["dirs"][("npy", 3)], "train", stats=data["stats"], two_views=True)


def test_stats_band_mismatch_is_rejected(data: dict) -> None:
    with pytest.raises(ValueError, match="bands"):
        ShardMapDataset(data["dirs"][("npy", 3)], "train", stats=BandStats((0.0,), (1.0,)))
    with pytest.raises(ValueError, match="cache_mode"):
        ShardMapDataset(data["dirs"][("npy", 3)], "train", stats=data["stats"], cache_mode="disk")


# -- caching ------------------------------------------------------------------------------------
def test_lru_cache_hit_returns_identical_sample(data: dict) -> None:
    dataset = ShardMapDataset(
        data["dirs"][("npy", 3)], "train", stats=data["stats"], cache_mode="lru", cache_max_items=2
    )
    first = dataset[0]
    again = dataset[0]
    assert dataset.cache.hits == 1
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["mask"], again["mask"])
    dataset[1]
    dataset[2]
    assert len(dataset.cache) == 2
    dataset[0]  # evicted by items 1 and 2
    assert dataset.cache.misses == 4
    uncached = ShardMapDataset(data["dirs"][("npy", 3)], "train", stats=data["stats"])
    assert torch.equal(uncached[0]["image"], first["image"])


def test_lru_cache_keeps_worker_assignment_across_epochs(data: dict) -> None:
    dataset = ShardIterableDataset(data["dirs"][("npy", 1)], "train", stats=data["stats"], cache_mode="lru")
    mine = {r.item_id for r in dataset.rows_for(worker_id=0, num_workers=2)}
    dataset.set_epoch(3)
    assert {r.item_id for r in dataset.rows_for(worker_id=0, num_workers=2)} == mine


def test_shard_rows_exist(data: dict) -> None:
    rows = [r for d in shard_dirs(data["dirs"][("npy", 3)], "train") for r in read_shard_index(d)]
    assert sorted(r.item_id for r in rows) == data["ids"]


# -- real gloo ranks ----------------------------------------------------------------------------
def _ddp_rank(
    rank: int, world: int, init_file: str, dataset_dir: str, stats: BandStats, out_dir: str
) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        dataset = ShardIterableDataset(dataset_dir, "train", stats=stats, seed=4)
        loader = DataLoader(dataset, batch_size=3, num_workers=2, multiprocessing_context="spawn")
        ids = [i for batch in loader for i in batch["item_id"]]
        Path(out_dir, f"rank{rank}.txt").write_text("\n".join(ids))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # about a minute on 2 busy cores: 6 spawned processes each import torch
def test_real_gloo_ranks_with_spawned_workers_partition_exactly(data: dict, tmp_path: Path) -> None:
    """Two gloo ranks, each with two *spawned* workers (no process group inside them)."""
    torch.multiprocessing.spawn(
        _ddp_rank,
        args=(2, str(tmp_path / "init"), str(data["dirs"][("npy", 3)]), data["stats"], str(tmp_path)),
        nprocs=2,
    )
    per_rank = [(tmp_path / f"rank{r}.txt").read_text().split("\n") for r in range(2)]
    assert all(per_rank)
    assert sorted(per_rank[0] + per_rank[1]) == data["ids"]
