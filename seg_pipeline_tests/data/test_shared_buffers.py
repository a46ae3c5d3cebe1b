"""Shared batch blocks: a worker refills a block only after its consumer released it."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from seg_pipeline.data.augment import Augmenter
from seg_pipeline.data.loaders import BlockDataLoader, build_train_loader
from seg_pipeline.data.shard_datasets import ShardIterableDataset
from seg_pipeline.data.shared_buffers import (
    DEFAULT_MAX_SETS,
    SHARED_BLOCK,
    BlockCollate,
    SharedBufferPool,
    plan_block,
    release,
    take_block,
    unpack,
)
from seg_pipeline.settings import AugmentSettings, LoaderSettings

BATCH = (((4, 3, 8, 8), torch.uint8), ((4, 8, 8), torch.uint8), ((8, 8), torch.bool))


def test_a_batch_is_one_block_of_aligned_views() -> None:
    layout, size = plan_block(BATCH)
    block = torch.zeros(size, dtype=torch.uint8)
    image, mask, invalid = unpack(block, layout)
    assert (image.shape, mask.shape, invalid.shape) == ((4, 3, 8, 8), (4, 8, 8), (8, 8))
    assert invalid.dtype == torch.bool and all(offset % 64 == 0 and offset > 0 for offset, _, _ in layout)
    image.fill_(7)
    assert int(mask.sum()) == 0 and int(block[0]) == 0  # views do not overlap, nor the flag byte


def test_a_released_block_is_refilled_in_place() -> None:
    pool = SharedBufferPool()
    first = pool.acquire(BATCH, shared=True)
    assert first.block.is_shared() and first.kept and first.in_use
    release(first.block)
    second = pool.acquire(BATCH, shared=True)
    assert second.block.data_ptr() == first.block.data_ptr()
    assert second.in_use and len(pool) == 1


def test_a_block_still_in_use_is_never_handed_out_again() -> None:
    pool = SharedBufferPool(max_sets=2)
    held = [pool.acquire(BATCH, shared=True) for _ in range(3)]
    assert len({s.block.data_ptr() for s in held}) == 3, "a block the consumer still reads was refilled"
    assert len(pool) == 2 and not held[2].kept  # the pool is full: the third is not kept


def test_a_full_pool_makes_room_for_a_new_batch_shape() -> None:
    pool = SharedBufferPool(max_sets=1)
    release(pool.acquire(BATCH, shared=True).block)
    larger = (((4, 3, 16, 16), torch.uint8), ((4, 16, 16), torch.uint8))
    new = pool.acquire(larger, shared=True)
    assert new.tensors[0].shape == (4, 3, 16, 16) and new.kept and len(pool) == 1


def test_a_full_pool_evicts_a_free_block_of_another_shape() -> None:
    """An epoch's last, smaller batch: the pool swaps a free block for it, never one in use."""
    pool = SharedBufferPool(max_sets=2)
    smaller = (((2, 3, 8, 8), torch.uint8), ((2, 8, 8), torch.uint8))
    busy = pool.acquire(BATCH, shared=True)
    release(pool.acquire(smaller, shared=True).block)
    last = pool.acquire((((1, 3, 8, 8), torch.uint8), ((1, 8, 8), torch.uint8)), shared=True)
    assert last.kept and len(pool) == 2 and busy.in_use


def test_the_main_process_gets_plain_memory_and_a_copy_starts_empty() -> None:
    pool = SharedBufferPool()
    plain = pool.acquire(BATCH)  # not in a DataLoader worker
    assert not plain.kept and not plain.block.is_shared() and len(pool) == 0
    pool.acquire(BATCH, shared=True)
    assert len(pickle.loads(pickle.dumps(pool))) == 0


def _batch_mode(data: dict, **kwargs) -> ShardIterableDataset:
    return ShardIterableDataset(
        data["dirs"][("npy", 3)],
        "train",
        stats=data["stats"],
        augmenter=Augmenter(AugmentSettings(noise_p=1.0)),
        batch_size=2,
        **kwargs,
    )


def test_workers_refill_released_blocks_and_never_others(data: dict) -> None:
    """A real worker process: released blocks come back (same mapping), unreleased ones never do."""
    for releasing in (True, False):
        dataset = _batch_mode(data)
        loader = DataLoader(dataset, batch_size=None, num_workers=1, persistent_workers=True)
        held, pointers, batches = [], set(), 0
        for epoch in range(3):
            dataset.set_epoch(epoch)
            for shared in loader:
                held.append(shared)  # keeps the mapping, so a refilled block arrives at the same address
                pointers.add(shared[SHARED_BLOCK][0].data_ptr())
                batches += 1
                if releasing:
                    release(shared[SHARED_BLOCK][0])
        if releasing:
            assert len(pointers) <= DEFAULT_MAX_SETS < batches  # a few blocks served every batch
        else:
            assert len(pointers) == batches


def test_a_finished_batch_keeps_its_block_until_its_last_view_is_gone(data: dict) -> None:
    """The batch is handed out as views of the worker's block (no copy), so the block goes back to
    the worker only when nothing can read it any more: not the batch, nor a view taken from it.
    """
    dataset = _batch_mode(data)
    shared = next(iter(DataLoader(dataset, batch_size=None, num_workers=1)))
    block = shared[SHARED_BLOCK][0]
    assert int(block[0]) == 1  # set by the worker that filled it
    batch = dataset.finish_batch(shared)
    assert batch["image"].dtype == torch.float32 and batch["mask"].dtype == torch.int64
    first_row = batch["image"][0]
    del batch
    assert int(block[0]) == 1, "the block was released while a view of its batch was alive"
    del first_row
    assert int(block[0]) == 0


def assert_dropped_batches_reuse_blocks(dataset: Any) -> None:
    """Three epochs through one persistent worker, each batch dropped at once (as a training loop
    does): a few blocks serve every batch, so the worker refilled released ones.
    """
    loader = build_train_loader(dataset, LoaderSettings(batch_size=2, num_workers=1, persistent_workers=True))
    addresses, batches = set(), 0
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for batch in loader:
            addresses.add(batch["image"].data_ptr())
            batches += 1
    assert len(addresses) <= DEFAULT_MAX_SETS < batches


def test_a_dropped_batch_lets_the_worker_refill_its_block(data: dict) -> None:
    """A consumer that drops each batch (a training loop) is served by a few blocks, refilled."""
    assert_dropped_batches_reuse_blocks(_batch_mode(data))


@pytest.mark.parametrize("two_views", [False, True])
def test_finished_batches_are_the_same_with_reused_blocks(data: dict, two_views: bool) -> None:
    """Three epochs through two workers that refill their blocks equal the in-process batches."""
    keys = ["image_view1", "mask_view1", "image_view2", "mask_view2"] if two_views else ["image", "mask"]

    def epochs(workers: int) -> dict[tuple[int, str, str], torch.Tensor]:
        dataset = _batch_mode(data, shuffle=False, two_views=two_views)
        loader = build_train_loader(
            dataset, LoaderSettings(batch_size=2, num_workers=workers, persistent_workers=workers > 0)
        )
        out = {}
        for epoch in range(3):
            dataset.set_epoch(epoch)
            for batch in loader:  # every finished batch is kept while the workers go on
                assert batch["image"] is batch[keys[0]]
                for key in keys:
                    for i, item_id in enumerate(batch["item_id"]):
                        out[(epoch, item_id, key)] = batch[key][i]
        return out

    reused, reference = epochs(2), epochs(0)
    assert reused.keys() == reference.keys()
    assert all(torch.equal(reused[key], reference[key]) for key in reference)


# -- the per-sample path: BlockCollate in the workers, BlockDataLoader in the main process ------
def test_per_sample_batches_through_blocks_equal_the_in_process_ones(data: dict) -> None:
    """What the stages train on with workers: samples stacked into refilled blocks, 3 epochs."""

    def epochs(workers: int) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        dataset = ShardIterableDataset(
            data["dirs"][("npy", 3)],
            "train",
            stats=data["stats"],
            augmenter=Augmenter(AugmentSettings(noise_p=1.0)),
            shuffle=False,
        )
        loader = build_train_loader(
            dataset, LoaderSettings(batch_size=2, num_workers=workers, persistent_workers=workers > 0)
        )
        assert isinstance(loader, BlockDataLoader) == (workers > 0)
        out = {}
        for epoch in range(3):
            dataset.set_epoch(epoch)
            for batch in loader:  # kept while the workers refill their blocks
                assert SHARED_BLOCK not in batch
                for i, item_id in enumerate(batch["item_id"]):
                    out[(epoch, item_id)] = (batch["image"][i], batch["mask"][i])
        return out

    blocks, reference = epochs(2), epochs(0)
    assert blocks.keys() == reference.keys()
    for key, (image, mask) in reference.items():
        assert torch.equal(blocks[key][0], image) and torch.equal(blocks[key][1], mask)


def test_a_collated_batch_is_handed_out_as_views_of_its_block() -> None:
    collate = BlockCollate()
    samples = [{"image": torch.full((3, 4, 4), float(i)), "item_id": f"t{i}"} for i in range(2)]
    block = collate._pool.acquire([((2, 3, 4, 4), torch.float32)], shared=True)
    torch.stack([s["image"] for s in samples], out=block.tensors[0])
    batch = {"item_id": ["t0", "t1"], SHARED_BLOCK: (block.block, block.layout, ["image"])}
    taken, held = take_block(batch)
    assert held is block.block and block.in_use  # the consumer still reads it
    assert taken["image"][1].eq(1.0).all() and taken["item_id"] == ["t0", "t1"]
    assert taken["image"].data_ptr() == block.tensors[0].data_ptr()  # no copy
    del taken, batch  # the same dict
    assert not block.in_use  # released to the worker
    assert take_block({"image": torch.ones(1)}) == ({"image": torch.ones(1)}, None)


def test_outside_a_worker_the_collate_is_the_default_one() -> None:
    samples = [{"image": torch.ones(2, 2), "item_id": "a"}, {"image": torch.zeros(2, 2), "item_id": "b"}]
    batch = BlockCollate()(samples)
    assert SHARED_BLOCK not in batch and batch["image"].shape == (2, 2, 2) and batch["item_id"] == ["a", "b"]
