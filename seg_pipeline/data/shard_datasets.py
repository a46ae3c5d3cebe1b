"""Torch datasets over one split of a sharded dataset (F7 in docs/architecture.md).

- :class:`ShardIterableDataset` streams a split for training: shard folders are partitioned
  across DDP ranks and DataLoader workers, order is reshuffled per epoch.
- :class:`ShardMapDataset` indexes the same rows (validation, evaluation, weighted sampling).

Samples are made as :mod:`seg_pipeline.data.samples` describes (including how ``set_epoch``
reaches DataLoader workers); tiles are read and cached by :mod:`seg_pipeline.data.tiles`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, IterableDataset, get_worker_info

from seg_pipeline.data.augment import Augmenter, derive_seed
from seg_pipeline.data.normalization import BandStats
from seg_pipeline.data.partition import _distributed_position, partition_rows
from seg_pipeline.data.patching import draw_window, patches_per_tile
from seg_pipeline.data.samples import PendingView, _check_common, _EpochState, _SampleMaker
from seg_pipeline.data.shards import ShardRow, read_shard_index, shard_dirs
from seg_pipeline.data.tiles import (
    RawTile,
    TileCache,
    cut_window,
    decoded_bytes,
    read_raw_tile,
    read_raw_window,
)


def _load_shards(
    dataset_dir: Path | str, split: str, drop_unlabeled: bool, stats: BandStats
) -> list[list[ShardRow]]:
    shards = [read_shard_index(path) for path in shard_dirs(dataset_dir, split)]
    if drop_unlabeled:
        shards = [[row for row in shard if row.target_path is not None] for shard in shards]
        shards = [shard for shard in shards if shard]
    for shard in shards:
        for row in shard:
            bands = row.extra.get("bands")
            if bands is not None and int(bands) != stats.bands:
                raise ValueError(
                    f"tile {row.item_id} has {bands} bands but stats describe {stats.bands}; "
                    "compute stats from the same catalog"
                )
            break
    return shards


class _ShardDatasetBase:
    """What the shard datasets share: rows, cache, sample making, epoch."""

    def __init__(
        self,
        dataset_dir: Path | str,
        split: str,
        *,
        stats: BandStats,
        augmenter: Augmenter | None,
        ignore_index: int,
        seed: int,
        cache_mode: str,
        cache_max_items: int,
        epoch: int,
        drop_unlabeled: bool,
        two_views: bool,
    ) -> None:
        _check_common(stats, ignore_index, cache_mode, cache_max_items)
        self.dataset_dir = Path(dataset_dir)
        self.split = split
        self.stats = stats
        self.seed = int(seed)
        self.shards = _load_shards(dataset_dir, split, drop_unlabeled, stats)
        self._maker = _SampleMaker(stats, augmenter, ignore_index, two_views, self.seed)
        self._epoch_state = _EpochState(epoch)
        self.configure_cache(cache_mode, cache_max_items)

    @property
    def augmenter(self) -> Augmenter | None:
        return self._maker.augmenter

    @property
    def ignore_index(self) -> int:
        return self._maker.ignore_index

    @property
    def epoch(self) -> int:
        return self._epoch_state.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (shuffle order and augmentation draws); call before ``iter(loader)``."""
        self._epoch_state.set_epoch(epoch)

    def configure_cache(self, cache_mode: str, cache_max_items: int = 0) -> None:
        """Switch the per-process tile cache (do it before DataLoader workers start)."""
        _check_common(self.stats, self.ignore_index, cache_mode, cache_max_items)
        self.cache_mode = cache_mode
        self.cache_max_items = cache_max_items
        self.cache = TileCache(cache_max_items) if cache_mode == "lru" else None

    def cache_bytes(self) -> int:
        """Memory the LRU cache takes once every tile it keeps was read (for ``cache_mode: auto``)."""
        return sum(decoded_bytes(row) for shard in self.shards for row in shard if self._cached(row))

    def _cached(self, row: ShardRow) -> bool:
        """Whether ``row``'s decoded tile goes through the cache."""
        return True

    def _tile(self, row: ShardRow) -> RawTile:
        if self.cache is None:
            return read_raw_tile(row)
        key = str(row.input_path)
        tile = self.cache.get(key)
        if tile is None:
            tile = read_raw_tile(row)
            self.cache.put(key, tile)
        return tile

    def _sample(self, row: ShardRow, epoch: int) -> dict[str, Any]:
        return self._maker.make(row.item_id, self._tile(row), epoch)


class ShardIterableDataset(_ShardDatasetBase, IterableDataset):
    """Streams one split of a sharded dataset, partitioned across DDP ranks and workers.

    Each of the ``world_size * num_workers`` parts reads its own shard folders (whole shards,
    balanced by item count); with fewer shards than parts it falls back to dealing items, so
    every item is read exactly once per epoch either way. Per-rank counts can differ by up to
    one shard: the training loop keeps DDP ranks in lockstep (``distributed.in_lockstep``).

    Args:
        dataset_dir: ``<processed>/<dataset>`` holding ``manifest.json``.
        split: Split name (``train``, ``val``, ...).
        stats: Band statistics for normalisation.
        augmenter: Augmentation (``None``: normalise only).
        ignore_index: Mask value of unlabeled and nodata pixels.
        shuffle: Reshuffle shard order and items within shards every epoch.
        seed: Base seed of shuffling and of per-item augmentation.
        cache_mode: ``none`` or ``lru`` (per-worker cache of decoded tiles; with ``lru`` the
            shard-to-worker assignment is fixed across epochs so a worker meets its cached
            tiles again; needs ``persistent_workers=True`` when ``num_workers > 0``).
        cache_max_items: LRU capacity per worker; 0 = unbounded.
        epoch: Starting epoch (see :meth:`set_epoch`).
        drop_unlabeled: Skip tiles without a mask.
        two_views: Also yield ``image_view1/2``, ``mask_view1/2`` (needs an augmenter).
        batch_size: Batch mode, the fast path for CPU training: each worker assembles and
            finishes whole batches (geometric ops on ``uint8``, then photometric ops and
            normalisation for the batch at once) into shared blocks it refills once the main
            process has copied them out (:mod:`~seg_pipeline.data.shared_buffers`); without
            workers the main process finishes raw batches (:meth:`finish_batch`). Results equal
            the per-sample path exactly. Build the loader with
            :func:`~seg_pipeline.data.loaders.build_train_loader`, which wires this up; ``None``
            yields ordinary samples.
        drop_last: In batch mode, drop each worker's last incomplete batch.
        patch_size: Patch mode (:mod:`seg_pipeline.data.patching`): each tile gives
            ``ceil(H * W / patch_size**2)`` square patches per epoch instead of itself, so tiles of
            any size batch together; large tiles are read window by window (only tiles that fit a
            patch are cached). A patch's ``item_id`` is ``<item>#<k>``. ``None`` yields whole tiles.
        read_size: Side of the patches read (default ``patch_size``); a patch-size schedule reads
            its largest size and the objective crops the smaller ones.
    """

    def __init__(
        self,
        dataset_dir: Path | str,
        split: str,
        *,
        stats: BandStats,
        augmenter: Augmenter | None = None,
        ignore_index: int = 255,
        shuffle: bool = True,
        seed: int = 0,
        cache_mode: str = "none",
        cache_max_items: int = 0,
        epoch: int = 0,
        drop_unlabeled: bool = False,
        two_views: bool = False,
        batch_size: int | None = None,
        drop_last: bool = False,
        patch_size: int | None = None,
        read_size: int | None = None,
    ) -> None:
        super().__init__(
            dataset_dir,
            split,
            stats=stats,
            augmenter=augmenter,
            ignore_index=ignore_index,
            seed=seed,
            cache_mode=cache_mode,
            cache_max_items=cache_max_items,
            epoch=epoch,
            drop_unlabeled=drop_unlabeled,
            two_views=two_views,
        )
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1 (or None to yield samples)")
        for name, value in (("patch_size", patch_size), ("read_size", read_size)):
            if value is not None and value < 1:
                raise ValueError(f"{name}={value}: must be >= 1 (or None)")
        if read_size is not None and patch_size is None:
            raise ValueError("read_size needs patch_size (patch mode)")
        self.shuffle = shuffle
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.patch_size = patch_size
        self.read_size = read_size or patch_size
        self._position = _distributed_position()

    def _patches(self, row: ShardRow) -> int:
        if self.patch_size is None:
            return 1
        return patches_per_tile(int(row.extra["height"]), int(row.extra["width"]), self.patch_size)

    def __len__(self) -> int:
        """Samples (tiles, or patches in patch mode) of the split per rank, rounded up; batches in batch
        mode. Approximate per worker: a worker yields only its part, and may end on a partial batch.
        """
        samples = sum(self._patches(row) for shard in self.shards for row in shard)
        total = math.ceil(samples / _distributed_position(self._position)[1])
        return total if self.batch_size is None else math.ceil(total / self.batch_size)

    def rows_for(
        self,
        rank: int = 0,
        world_size: int = 1,
        worker_id: int = 0,
        num_workers: int = 1,
        epoch: int | None = None,
    ) -> list[ShardRow]:
        """The rows one (rank, worker) reads in ``epoch`` (default: the current one), in order."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
        if num_workers < 1 or not 0 <= worker_id < num_workers:
            raise ValueError(
                f"worker_id={worker_id}, num_workers={num_workers}: need 0 <= worker_id < num_workers"
            )
        epoch = self.epoch if epoch is None else epoch
        fixed_assignment = self.cache_mode == "lru"
        return partition_rows(
            self.shards,
            rank * num_workers + worker_id,
            world_size * num_workers,
            shuffle=self.shuffle,
            assignment_seed=derive_seed("assign", self.seed, 0 if fixed_assignment else epoch),
            order_seed=derive_seed("order", self.seed, epoch),
        )

    def _reader_units(self) -> tuple[list[tuple[ShardRow, int]], int]:
        """This reader's ``(row, patch number)`` units of the current epoch, and the epoch."""
        rank, world_size = _distributed_position(self._position)
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        return self._units(self.rows_for(rank, world_size, worker_id, num_workers, epoch), epoch), epoch

    def pending(self) -> Iterator[tuple[str, list[PendingView]]]:
        """What ``__iter__`` yields without ``batch_size``, drawn but not written: each sample's key and
        views (:class:`~seg_pipeline.data.samples.PendingView`), for a batch assembler to write in place.
        """
        units, epoch = self._reader_units()
        for row, k in units:
            key, tile = self._unit(row, k, epoch)
            yield key, self._maker.draw(key, tile, epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        units, epoch = self._reader_units()
        info = get_worker_info()
        if self.batch_size is None:
            for row, k in units:
                yield self._maker.make(*self._unit(row, k, epoch), epoch)
            return
        for start in range(0, len(units), self.batch_size):
            chunk = units[start : start + self.batch_size]
            if self.drop_last and len(chunk) < self.batch_size:
                return
            raw = self._maker.build_raw([self._unit(row, k, epoch) for row, k in chunk], epoch)
            yield raw if info is None else self._maker.finish_shared(raw)

    def _cached(self, row: ShardRow) -> bool:
        """Outside patch mode every tile; in patch mode tiles that fit a read (larger ones are read
        window by window).
        """
        if self.read_size is None:
            return True
        return int(row.extra["height"]) <= self.read_size and int(row.extra["width"]) <= self.read_size

    def _units(self, rows: list[ShardRow], epoch: int) -> list[tuple[ShardRow, int]]:
        """``(row, patch number)`` in reading order; a tile's patches are spread over the epoch."""
        units = [(row, k) for row in rows for k in range(self._patches(row))]
        if self.patch_size is not None and self.shuffle:
            random.Random(derive_seed("patch-order", self.seed, epoch)).shuffle(units)
        return units

    def _unit(self, row: ShardRow, k: int, epoch: int) -> tuple[str, RawTile]:
        """The sample key and raw pixels of patch ``k`` of ``row`` (the whole tile outside patch mode)."""
        if self.read_size is None:
            return row.item_id, self._tile(row)
        height, width = int(row.extra["height"]), int(row.extra["width"])
        window = draw_window(height, width, self.read_size, (self.seed, epoch, row.item_id, k))
        key = f"{row.item_id}#{k}"
        if self._cached(row):
            return key, cut_window(self._tile(row), window, self.ignore_index)
        return key, read_raw_window(row, window, self.ignore_index)

    def finish_batch(self, raw: dict[str, Any], pin_memory: bool = False, threads: int = 1) -> dict[str, Any]:
        """Turn a batch of batch mode into the standard batch (done by the train loader): a raw one
        read in this process is finished here, one a worker finished is handed out as views of its block.
        """
        return self._maker.finish(raw, pin_memory, threads)


class ShardMapDataset(_ShardDatasetBase, Dataset):
    """Map-style view of a split: row ``i`` is the ``i``-th item in manifest/index order.

    Use it where order and completeness matter (validation, evaluation) and with samplers
    (e.g. :func:`seg_pipeline.data.sampling.rare_class_sampler`). Arguments as
    :class:`ShardIterableDataset` (no ``shuffle``: the sampler decides the order).
    """

    def __init__(
        self,
        dataset_dir: Path | str,
        split: str,
        *,
        stats: BandStats,
        augmenter: Augmenter | None = None,
        ignore_index: int = 255,
        seed: int = 0,
        cache_mode: str = "none",
        cache_max_items: int = 0,
        epoch: int = 0,
        drop_unlabeled: bool = False,
        two_views: bool = False,
    ) -> None:
        super().__init__(
            dataset_dir,
            split,
            stats=stats,
            augmenter=augmenter,
            ignore_index=ignore_index,
            seed=seed,
            cache_mode=cache_mode,
            cache_max_items=cache_max_items,
            epoch=epoch,
            drop_unlabeled=drop_unlabeled,
            two_views=two_views,
        )
        self.rows: list[ShardRow] = [row for shard in self.shards for row in shard]

    def take_large(self, max_pixels: int) -> list[ShardRow]:
        """Remove the rows of tiles above ``max_pixels`` and return them (validation streams those
        from disk window by window instead of decoding them whole).
        """
        large = [r for r in self.rows if int(r.extra["height"]) * int(r.extra["width"]) > max_pixels]
        self.rows = [r for r in self.rows if r not in large]
        return large

    @property
    def item_ids(self) -> list[str]:
        """Item ids by index (align per-item weights with this order)."""
        return [row.item_id for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self.rows) <= index < len(self.rows):
            raise IndexError(f"index {index} out of range for {len(self.rows)} items")
        return self._sample(self.rows[index], self.epoch)
