"""LoaderSettings validation and DataLoader construction (knobs, worker seeding, cache wiring)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from seg_pipeline.data.augment import Augmenter
from seg_pipeline.data.datasets import (
    GeoPatchDataset,
    PatchSizeBatchSampler,
    ShardIterableDataset,
    ShardMapDataset,
)
from seg_pipeline.data.loaders import (
    ThreadPrefetchLoader,
    build_eval_loader,
    build_train_loader,
    cache_budget,
    cache_choice,
    prefetch_thread_wanted,
    seed_worker,
    with_prefetch_thread,
)
from seg_pipeline.data.raster_io import write_geotiff
from seg_pipeline.settings import AugmentSettings, LoaderSettings


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_workers": -1}, "num_workers"),
        ({"prefetch_factor": 0}, "prefetch_factor"),
        ({"batch_size": 0}, "batch_size"),
        ({"cache_mode": "disk"}, "cache_mode"),
        ({"cache_max_items": -5}, "cache_max_items"),
        ({"num_workers": 1.5}, "num_workers"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        LoaderSettings(**kwargs)


def test_defaults_follow_seed_000() -> None:
    assert LoaderSettings().model_dump() == {
        "num_workers": 0,
        "prefetch_factor": 2,
        "persistent_workers": False,
        "prefetch_thread": None,
        "pin_memory": False,
        "cache_mode": "auto",
        "cache_max_items": 0,
        "cache_budget_mb": 2048,
        "batch_size": 8,
        "rare_class_weight": None,
        "rare_classes": [],
    }


def test_worker_knobs_only_with_workers(data: dict) -> None:
    dataset = ShardMapDataset(data["dirs"][("npy", 3)], "train", stats=data["stats"])
    main = build_eval_loader(
        dataset, LoaderSettings(num_workers=0, prefetch_factor=4, persistent_workers=True)
    )
    assert main.prefetch_factor is None and main.persistent_workers is False
    workers = build_eval_loader(
        dataset, LoaderSettings(num_workers=2, prefetch_factor=4, persistent_workers=True)
    )
    assert (workers.num_workers, workers.prefetch_factor, workers.persistent_workers) == (2, 4, True)


def test_eval_loader_keeps_order_and_completeness(data: dict) -> None:
    dataset = ShardMapDataset(data["dirs"][("npy", 3)], "train", stats=data["stats"])
    loader = build_eval_loader(dataset, LoaderSettings(num_workers=2, batch_size=5))
    assert [i for batch in loader for i in batch["item_id"]] == dataset.item_ids
    batch = next(iter(loader))
    assert batch["image"].shape == (5, 3, 32, 32) and batch["mask"].dtype == torch.int64


def test_train_loader_shuffles_map_dataset_reproducibly(data: dict) -> None:
    dataset = ShardMapDataset(data["dirs"][("npy", 3)], "train", stats=data["stats"])

    def order(seed: int) -> list[str]:
        loader = build_train_loader(dataset, LoaderSettings(batch_size=4), seed=seed)
        return [i for batch in loader for i in batch["item_id"]]

    assert order(1) == order(1) != order(2)
    assert sorted(order(1)) == sorted(dataset.item_ids)


class _Draws(Dataset):
    """Returns what the worker's global generators give: shows how workers were seeded."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict:
        info = torch.utils.data.get_worker_info()
        return {
            "worker": info.id,
            "np": int(np.random.randint(1 << 30)),
            "torch": int(torch.randint(1 << 30, ())),
        }


def test_workers_seeded_distinctly_and_reproducibly() -> None:
    def draws(seed: int) -> dict[int, tuple[int, int]]:
        loader = build_eval_loader(_Draws(), LoaderSettings(num_workers=2, batch_size=1), seed=seed)
        out = {}
        for batch in loader:
            out.setdefault(int(batch["worker"]), (int(batch["np"]), int(batch["torch"])))
        return out

    first, again, other = draws(0), draws(0), draws(1)
    assert first == again
    assert first[0] != first[1]
    assert first != other


def test_seed_worker_differs_by_rank() -> None:
    seed_worker(0, base_seed=3, rank=0)
    a = np.random.randint(1 << 30)
    seed_worker(0, base_seed=3, rank=1)
    assert np.random.randint(1 << 30) != a


def test_cache_knobs_reach_the_dataset(data: dict) -> None:
    dataset = ShardIterableDataset(data["dirs"][("npy", 3)], "train", stats=data["stats"])
    build_train_loader(dataset, LoaderSettings(cache_mode="lru", cache_max_items=3))
    assert dataset.cache is not None and dataset.cache.max_items == 3
    with pytest.warns(UserWarning, match="persistent_workers"):
        build_train_loader(dataset, LoaderSettings(num_workers=2, cache_mode="lru"))


def test_auto_caches_the_tiles_when_they_fit_the_budget(data: dict) -> None:
    dataset = ShardIterableDataset(data["dirs"][("npy", 3)], "train", stats=data["stats"])
    need = dataset.cache_bytes()
    ok = data["catalog"][data["catalog"]["status"] == "ok"]
    per_pixel = 3 + 2 * ok["has_label"].astype(int) + ok["nodata"].notna().astype(int)
    assert need == int((32 * 32 * per_pixel).sum())  # uint8 RGB, a 2-byte mask, a nodata map
    assert cache_choice(LoaderSettings(), dataset, budget=need)[0] == "lru"
    mode, why = cache_choice(LoaderSettings(), dataset, budget=need - 1)
    assert mode == "none" and "over the budget" in why
    restarting = LoaderSettings(num_workers=2, persistent_workers=False)
    assert cache_choice(restarting, dataset, budget=need)[0] == "none"
    assert cache_choice(LoaderSettings(cache_mode="none"), dataset, budget=need)[0] == "none"
    build_train_loader(dataset, LoaderSettings())  # the demo-sized split fits the default budget
    assert dataset.cache is not None


def test_the_budget_is_at_most_a_quarter_of_free_memory() -> None:
    config = LoaderSettings(cache_budget_mb=100)
    assert cache_budget(config, available=4000 * 2**20) == 100 * 2**20
    assert cache_budget(config, available=200 * 2**20) == 50 * 2**20


def test_an_evaluation_loader_never_caches_by_default(data: dict) -> None:
    dataset = ShardMapDataset(data["dirs"][("npy", 3)], "train", stats=data["stats"])
    build_eval_loader(dataset, LoaderSettings())
    assert dataset.cache is None


def test_lru_loader_reads_each_tile_once_across_epochs(data: dict) -> None:
    dataset = ShardIterableDataset(data["dirs"][("npy", 1)], "train", stats=data["stats"])
    loader = build_train_loader(dataset, LoaderSettings(batch_size=4, cache_mode="lru"))
    for epoch in range(3):
        dataset.set_epoch(epoch)
        assert sorted(i for batch in loader for i in batch["item_id"]) == data["ids"]
    assert dataset.cache.misses == len(data["ids"]) and dataset.cache.hits == 2 * len(data["ids"])


@pytest.mark.parametrize("workers", [0, 2])
def test_batch_mode_equals_per_sample_path(data: dict, workers: int) -> None:
    """Raw batches finished in the main process equal samples augmented one by one in workers."""
    kwargs = dict(stats=data["stats"], augmenter=Augmenter(AugmentSettings(noise_p=1.0)), shuffle=False)
    batched = ShardIterableDataset(data["dirs"][("npy", 3)], "train", batch_size=4, **kwargs)
    plain = ShardIterableDataset(data["dirs"][("npy", 3)], "train", **kwargs)
    config = LoaderSettings(batch_size=4, num_workers=workers)

    def by_item(loader) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for batch in loader:
            assert batch["image"].dtype == torch.float32 and batch["mask"].dtype == torch.int64
            for i, item_id in enumerate(batch["item_id"]):
                out[item_id] = (batch["image"][i], batch["mask"][i])
        return out

    a, b = by_item(build_train_loader(batched, config)), by_item(build_train_loader(plain, config))
    assert sorted(a) == sorted(b) == data["ids"]
    for item_id in a:
        assert torch.equal(a[item_id][0], b[item_id][0]) and torch.equal(a[item_id][1], b[item_id][1])
    with pytest.raises(ValueError, match="batch_size"):
        build_train_loader(batched, LoaderSettings(batch_size=8))


def test_batch_mode_two_views(data: dict) -> None:
    dataset = ShardIterableDataset(
        data["dirs"][("npy", 3)],
        "train",
        stats=data["stats"],
        augmenter=Augmenter(AugmentSettings()),
        two_views=True,
        batch_size=4,
    )
    batch = next(iter(build_train_loader(dataset, LoaderSettings(batch_size=4))))
    assert batch["image_view1"].shape == batch["image_view2"].shape == (4, 3, 32, 32)
    assert batch["image"] is batch["image_view1"]
    assert not torch.equal(batch["image_view1"], batch["image_view2"])


def test_train_loader_with_patch_size_batch_sampler(tmp_path) -> None:
    path = write_geotiff(
        tmp_path / "big.tif",
        np.ones((3, 80, 80), np.uint8),
        crs="EPSG:32633",
        transform=(1, 0, 500, 0, -1, 900),
    )
    dataset = GeoPatchDataset([path], patch_sizes=(16, 32), samples_per_epoch=12)
    sampler = dataset.batch_sampler(3)
    assert isinstance(sampler, PatchSizeBatchSampler) and len(sampler) == 4
    loader = build_train_loader(dataset, LoaderSettings(num_workers=2), batch_sampler=sampler)
    shapes = [tuple(batch["image"].shape) for batch in loader]
    assert shapes == [(3, 3, s, s) for s in sampler.batch_sizes()]
    with pytest.raises(ValueError, match="cache_mode"):
        build_train_loader(dataset, LoaderSettings(cache_mode="lru"), batch_sampler=sampler)


def _augmented_batches(data: dict, epoch: int) -> tuple[ShardIterableDataset, LoaderSettings]:
    dataset = ShardIterableDataset(
        data["dirs"][("npy", 3)], "train", stats=data["stats"], augmenter=Augmenter(AugmentSettings()),
        batch_size=2, seed=7,
    )  # fmt: skip
    dataset.set_epoch(epoch)
    return dataset, LoaderSettings(batch_size=2)


def test_the_prefetch_thread_yields_the_same_seeded_batches_in_the_same_order(data: dict) -> None:
    dataset, config = _augmented_batches(data, epoch=3)
    plain = list(build_train_loader(dataset, config.replace(prefetch_thread=False)))
    dataset, config = _augmented_batches(data, epoch=3)
    threaded = with_prefetch_thread(build_train_loader(dataset, config), config, "cuda")
    assert isinstance(threaded, ThreadPrefetchLoader)  # null = on for a GPU step without workers
    assert threaded.dataset is dataset  # set_epoch and len() reach the wrapped loader
    fetched = list(threaded)
    assert len(fetched) == len(plain) == len(data["ids"]) // 2
    for a, b in zip(fetched, plain, strict=True):
        assert a["item_id"] == b["item_id"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])


def test_a_consumer_that_stops_early_stops_the_thread(data: dict) -> None:
    dataset, config = _augmented_batches(data, epoch=0)
    before = threading.active_count()
    iterator = iter(ThreadPrefetchLoader(build_train_loader(dataset, config)))
    next(iterator)
    iterator.close()  # what a ``break`` (max_steps_per_epoch) does to the generator
    assert threading.active_count() == before


class _Broken(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        if index == 2:
            raise OSError("tile 2 is truncated")
        return torch.zeros(1)


def test_a_loading_error_in_the_thread_is_raised_to_the_training_loop() -> None:
    loader = ThreadPrefetchLoader(build_eval_loader(_Broken(), LoaderSettings(batch_size=1)))
    with pytest.raises(OSError, match="tile 2 is truncated"):
        list(loader)


def test_the_thread_is_refused_beside_worker_processes_and_off_when_asked(data: dict) -> None:
    dataset = ShardMapDataset(data["dirs"][("npy", 3)], "train", stats=data["stats"])
    with pytest.raises(ValueError, match="prefetch_thread=true with num_workers=2"):
        LoaderSettings(num_workers=2, prefetch_thread=True)  # refused with the config, before any work
    workers = build_eval_loader(dataset, LoaderSettings(num_workers=2))
    assert with_prefetch_thread(workers, LoaderSettings(num_workers=2)) is workers  # null: workers prefetch
    main = build_eval_loader(dataset)
    assert with_prefetch_thread(main, LoaderSettings(prefetch_thread=False), "cuda") is main
    assert with_prefetch_thread(main, LoaderSettings(), "cpu") is main  # null: the CPU's cores are busy
    assert isinstance(with_prefetch_thread(main, LoaderSettings(prefetch_thread=True)), ThreadPrefetchLoader)
    assert prefetch_thread_wanted(LoaderSettings(), "cpu") == (
        False,
        "training on the CPU, whose cores torch's threads already use",
    )
