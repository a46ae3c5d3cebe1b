"""Torch datasets over shards and large GeoTIFFs (DESIGN F7).

Every dataset yields ``{"image": float32 (C, H, W), "mask": int64 (H, W), "item_id": str}``:
the image normalised with :class:`~seg_pipeline.data.normalization.BandStats`, nodata pixels
(all bands == nodata, or any NaN) set to 0 and marked ``ignore_index`` in the mask, unlabeled
tiles all ``ignore_index``. With ``two_views=True`` a sample also holds ``image_view1/2`` and
``mask_view1/2`` (``image``/``mask`` are view 1). The default collate makes batches of them.

- :class:`ShardIterableDataset` streams a split for training: shard folders are partitioned
  across DDP ranks and DataLoader workers, order is reshuffled per epoch.
- :class:`ShardMapDataset` indexes the same rows (validation, evaluation, weighted sampling).
- :class:`GeoPatchDataset` samples random windows from large GeoTIFFs, one patch size per batch
  through :class:`PatchSizeBatchSampler`.

Epochs: ``set_epoch(n)`` writes into a shared-memory tensor, so DataLoader workers (persistent
or not) see the new epoch on the next ``iter(loader)``. Call it *before* creating the iterator.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.errors import RasterioIOError
from rasterio.windows import Window
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info

from seg_pipeline.data.augment import (
    IDENTITY,
    Augmenter,
    AugmentParams,
    derive_seed,
    geometric_stage,
    photometric_batch,
    write_sample,
)
from seg_pipeline.data.normalization import BandStats, invalid_pixels, scale_stats
from seg_pipeline.data.raster_io import RasterReadError, gdal_env, read_array, read_info
from seg_pipeline.data.shards import ShardError, ShardRow, read_shard_index, shard_dirs

CACHE_MODES = ("none", "lru")
PATCH_SIZE_SAMPLING = ("uniform", "cycle")

#: One decoded tile: raw image ``(C, H, W)``, mask ``(H, W)`` or ``None``, nodata map or ``None``.
RawTile = tuple[np.ndarray, np.ndarray | None, np.ndarray | None]


# -- reading ----------------------------------------------------------------------------------
#: Parsed ``.npy`` headers by their raw bytes: a shard's tiles share a handful of headers, and
#: ``np.load`` re-parses each one with ``ast.literal_eval`` (about as slow as reading the pixels).
_NPY_HEADERS: dict[bytes, tuple[tuple[int, ...], np.dtype, bool]] = {}
_NPY_MAGIC = b"\x93NUMPY"


def load_npy(path: Path | str) -> np.ndarray:
    """Read an ``.npy`` file like ``np.load`` (writable array), caching parsed headers.

    Raises:
        ShardError: the file is not a complete ``.npy`` array.
    """
    with open(path, "rb", buffering=0) as fh:
        prefix = fh.read(12)
        if prefix[:6] != _NPY_MAGIC:
            raise ShardError(f"{path}: not an .npy file (bad magic); rebuild the shard")
        major = prefix[6]
        if major == 1:
            header_len, start = int.from_bytes(prefix[8:10], "little"), 10
        else:
            header_len, start = int.from_bytes(prefix[8:12], "little"), 12
        header = prefix[start:] + fh.read(header_len - (len(prefix) - start))
        parsed = _NPY_HEADERS.get(header)
        if parsed is None:
            fh.seek(0)
            version = np.lib.format.read_magic(fh)
            reader = (
                np.lib.format.read_array_header_1_0
                if version[0] == 1
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = reader(fh)
            parsed = (tuple(shape), dtype, bool(fortran))
            if len(_NPY_HEADERS) < 1024:
                _NPY_HEADERS[header] = parsed
        shape, dtype, fortran = parsed
        if fortran or dtype.hasobject:
            return np.load(path, allow_pickle=False)
        array = np.empty(shape, dtype=dtype)
        view = memoryview(array.reshape(-1).view(np.uint8))
        got = fh.readinto(view)
        if got != array.nbytes:
            raise ShardError(
                f"{path}: truncated .npy ({got} of {array.nbytes} data bytes); rebuild the shard"
            )
        return array


def read_raw_tile(row: ShardRow) -> RawTile:
    """Decode one shard row: ``.npy`` with :func:`load_npy`, anything else with rasterio."""

    def load(path: Path) -> np.ndarray:
        return load_npy(path) if path.suffix == ".npy" else read_array(path)

    image = load(row.input_path)
    if image.ndim == 2:
        image = image[np.newaxis]
    mask = None
    if row.target_path is not None:
        mask = load(row.target_path)
        mask = mask[0] if mask.ndim == 3 else mask
    nodata = row.extra.get("nodata")
    return image, mask, invalid_pixels(image, None if nodata is None else float(nodata))


class TileCache:
    """A least-recently-used cache of decoded tiles, private to one process (one worker).

    Args:
        max_items: Capacity; 0 means unbounded (every tile the worker sees stays in memory).
    """

    def __init__(self, max_items: int = 0) -> None:
        if max_items < 0:
            raise ValueError(f"cache_max_items={max_items}: must be >= 0 (0 = unbounded)")
        self.max_items = max_items
        self._items: OrderedDict[str, RawTile] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> RawTile | None:
        """The cached tile (marked most recently used) or ``None``."""
        tile = self._items.get(key)
        if tile is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return tile

    def put(self, key: str, tile: RawTile) -> None:
        """Store ``tile``, evicting the least recently used one beyond capacity."""
        self._items[key] = tile
        self._items.move_to_end(key)
        if self.max_items and len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()


# -- partitioning -----------------------------------------------------------------------------
def _balanced_assignment(sizes: Sequence[int], order: Sequence[int], num_parts: int) -> list[list[int]]:
    """Assign shards (by index) to parts: largest first to the least-loaded part (ties: lowest)."""
    parts: list[list[int]] = [[] for _ in range(num_parts)]
    loads = [0] * num_parts
    rank_in_order = {shard: pos for pos, shard in enumerate(order)}
    for shard in sorted(order, key=lambda s: (-sizes[s], rank_in_order[s])):
        target = min(range(num_parts), key=lambda p: (loads[p], p))
        parts[target].append(shard)
        loads[target] += sizes[shard]
    return parts


def partition_rows(
    shards: Sequence[Sequence[ShardRow]],
    part: int,
    num_parts: int,
    *,
    shuffle: bool,
    assignment_seed: int,
    order_seed: int,
) -> list[ShardRow]:
    """Rows of one part (``rank * num_workers + worker_id``), in iteration order.

    With at least ``num_parts`` shards, whole shards are assigned (largest first to the least
    loaded part, so parts differ by at most one shard's size). With fewer shards than parts,
    items are dealt round-robin instead, so no part is idle and nothing is lost or duplicated.
    Every part computes the same assignment from ``assignment_seed``; ``order_seed`` shuffles
    the shard order and the items inside each shard.
    """
    if not 0 <= part < num_parts:
        raise ValueError(f"part={part}: must be within [0, {num_parts})")
    n_shards = len(shards)
    assign_rng = np.random.default_rng(assignment_seed)
    order_rng = np.random.default_rng(order_seed)
    if n_shards >= num_parts:
        order = assign_rng.permutation(n_shards).tolist() if shuffle else list(range(n_shards))
        mine = _balanced_assignment([len(s) for s in shards], order, num_parts)[part]
        mine = sorted(mine)
        if shuffle:
            mine = [mine[i] for i in order_rng.permutation(len(mine))]
        rows: list[ShardRow] = []
        for shard_index in mine:
            shard_rows = list(shards[shard_index])
            if shuffle:
                shard_rows = [shard_rows[i] for i in order_rng.permutation(len(shard_rows))]
            rows.extend(shard_rows)
        return rows
    flat = [row for shard in shards for row in shard]
    if shuffle:
        flat = [flat[i] for i in assign_rng.permutation(len(flat))]
    rows = flat[part::num_parts]
    if shuffle:
        rows = [rows[i] for i in order_rng.permutation(len(rows))]
    return rows


def _distributed_position(default: tuple[int, int] = (0, 1)) -> tuple[int, int]:
    """``(rank, world_size)`` of the live process group, else ``default``.

    Workers started with ``spawn``/``forkserver`` have no process group, so datasets remember the
    position seen at construction and pass it as ``default``.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return default


# -- sample assembly --------------------------------------------------------------------------
class _EpochState:
    """An epoch counter in shared memory, visible to DataLoader workers after they start."""

    def __init__(self, epoch: int) -> None:
        self._epoch = torch.full((1,), int(epoch), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration uses."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch}: must be >= 0")
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())


def _buffer(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """An output tensor; in a worker, ``shared`` puts it in shared memory (as ``default_collate``
    does for its stacked batch), so the batch reaches the main process without another copy."""
    if not shared or get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


class _SampleMaker:
    """Turns raw tiles into samples or batches: augment, normalise, nodata -> 0 / ignore_index."""

    def __init__(
        self, stats: BandStats, augmenter: Augmenter | None, ignore_index: int, two_views: bool, seed: int
    ) -> None:
        if two_views and augmenter is None:
            raise ValueError("two_views=True needs an augmenter (two identical views are useless)")
        self.stats = stats
        self.augmenter = augmenter
        self.ignore_index = ignore_index
        self.two_views = two_views
        self.seed = seed

    def _params(self, tile: RawTile) -> tuple[AugmentParams, tuple[int, int, int]]:
        bands, height, width = tile[0].shape
        params: AugmentParams = IDENTITY
        if self.augmenter is not None:
            params = self.augmenter.sample_params(bands, height, width)
        out_h, out_w = params.out_size if params.out_size is not None else (height, width)
        return params, (bands, out_h, out_w)

    def make(self, item_id: str, tile: RawTile, epoch: int) -> dict[str, Any]:
        """One finished sample (the per-sample path; the default collate batches these)."""
        n_views = 2 if self.two_views else 1
        views = []
        for params, shape in self._plans([(item_id, tile)], epoch, n_views)[0]:
            image = torch.empty(shape, dtype=torch.float32)
            mask = torch.empty(shape[1:], dtype=torch.int64)
            write_sample(image, mask, *tile, self.stats, params, self.augmenter, self.ignore_index)
            views.append((image, mask))
        sample: dict[str, Any] = {"image": views[0][0], "mask": views[0][1], "item_id": item_id}
        if self.two_views:
            sample.update(
                image_view1=views[0][0],
                mask_view1=views[0][1],
                image_view2=views[1][0],
                mask_view2=views[1][1],
            )
        return sample

    def build_raw(self, items: Sequence[tuple[str, RawTile]], epoch: int) -> dict[str, Any]:
        """Worker half of batch mode: draws and geometric ops only, pixels still raw.

        A ``uint8`` RGB batch is 4x smaller than its float32 form and its int64 masks 8x larger
        than ``uint8`` ones; on CPU, allocating the shared memory a batch travels in costs more
        than the arithmetic, so the float work happens after the transfer (:meth:`finish`).
        """
        n_views = 2 if self.two_views else 1
        plans = self._plans(items, epoch, n_views)
        views = []
        for v in range(n_views):
            results = [
                geometric_stage(*tile, params[v][0], self.stats.bands, self.ignore_index)
                for (_, tile), params in zip(items, plans, strict=True)
            ]
            views.append(
                {
                    "image": _stack([r.image for r in results]),
                    "mask": _stack([r.mask for r in results]),
                    "invalid": _share_maps([r.invalid for r in results]),
                    "params": [params[v][0] for params in plans],
                }
            )
        return {"raw_views": views, "item_id": [item_id for item_id, _ in items]}

    def finish(self, raw: dict[str, Any], pin_memory: bool = False, threads: int = 1) -> dict[str, Any]:
        """Main-process half of batch mode: photometric ops and normalisation into float32.

        Runs with ``threads`` torch threads (restored afterwards): the workers already occupy
        the cores, and torch's default intra-op threads then spin against them (measured: 10x
        more CPU per tile on 2 cores with the default 2 threads).
        """
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return self._finish(raw, pin_memory)
        finally:
            torch.set_num_threads(previous)

    def _finish(self, raw: dict[str, Any], pin_memory: bool) -> dict[str, Any]:
        outputs = []
        pin = pin_memory and torch.cuda.is_available()
        for view in raw["raw_views"]:
            images_raw = view["image"]
            images = torch.empty(images_raw.shape, dtype=torch.float32, pin_memory=pin)
            photometric_batch(images, images_raw, view["invalid"], self.stats, view["params"], self.augmenter)
            masks = torch.empty(view["mask"].shape, dtype=torch.int64, pin_memory=pin).copy_(view["mask"])
            outputs.append((images, masks))
        batch: dict[str, Any] = {"image": outputs[0][0], "mask": outputs[0][1], "item_id": raw["item_id"]}
        if self.two_views:
            batch.update(
                image_view1=outputs[0][0],
                mask_view1=outputs[0][1],
                image_view2=outputs[1][0],
                mask_view2=outputs[1][1],
            )
        return batch

    def _plans(
        self, items: Sequence[tuple[str, RawTile]], epoch: int, n_views: int
    ) -> list[list[tuple[AugmentParams, tuple[int, int, int]]]]:
        plans = []
        for item_id, tile in items:
            if self.augmenter is not None:
                self.augmenter.reseed(self.seed, epoch, item_id)
            plans.append([self._params(tile) for _ in range(n_views)])
        shape = plans[0][0][1]
        for (item_id, _), views in zip(items, plans, strict=True):
            for _, view_shape in views:
                if view_shape != shape:
                    raise ValueError(
                        f"tile {item_id} gives a {view_shape} sample but the batch holds {shape}; tiles in "
                        "one batch must share a size: set AugmentConfig.crop_size or use batch_size=1"
                    )
        return plans


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack into a (shared-memory, in a worker) buffer of the common dtype."""
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    out = _buffer((len(tensors), *tensors[0].shape), dtype, shared=True)
    for i, tensor in enumerate(tensors):
        out[i].copy_(tensor)
    return out


def _share_maps(maps: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Per-sample nodata maps, each moved to shared memory; most tiles have none, so a batch-wide
    buffer would mostly carry zeros."""
    shared: list[torch.Tensor | None] = []
    for invalid in maps:
        if invalid is None:
            shared.append(None)
            continue
        buffer = _buffer(tuple(invalid.shape), torch.bool, shared=True)
        shared.append(buffer.copy_(invalid))
    return shared


def _check_common(stats: BandStats, ignore_index: int, cache_mode: str, cache_max_items: int) -> None:
    if not isinstance(stats, BandStats):
        raise ValueError(f"stats={stats!r}: pass a BandStats (band_stats_from_catalog or scale_stats)")
    if ignore_index < 0:
        raise ValueError(f"ignore_index={ignore_index}: must be >= 0")
    if cache_mode not in CACHE_MODES:
        raise ValueError(f"cache_mode={cache_mode!r}: choose one of {', '.join(CACHE_MODES)}")
    if cache_max_items < 0:
        raise ValueError(f"cache_max_items={cache_max_items}: must be >= 0 (0 = unbounded)")


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
        batch_size: Batch mode, the fast path for CPU training: each worker yields *raw* batches
            (geometric ops done on ``uint8``, ~5x fewer bytes through shared memory) and the main
            process finishes them (:meth:`finish_batch`: photometric ops, normalisation, int64
            masks). Results equal the per-sample path exactly. Build the loader with
            :func:`~seg_pipeline.data.loaders.build_train_loader`, which wires this up; ``None``
            yields ordinary samples.
        drop_last: In batch mode, drop each worker's last incomplete batch.
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
        self.shuffle = shuffle
        self.batch_size = batch_size
        self.drop_last = drop_last
        self._position = _distributed_position()

    def __len__(self) -> int:
        """Items of the split per rank (rounded up); batches in batch mode. Approximate per worker:
        a worker yields only its part, and in batch mode each worker may end on a partial batch."""
        total = math.ceil(sum(len(shard) for shard in self.shards) / _distributed_position(self._position)[1])
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

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world_size = _distributed_position(self._position)
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        rows = self.rows_for(rank, world_size, worker_id, num_workers, epoch)
        if self.batch_size is None:
            for row in rows:
                yield self._sample(row, epoch)
            return
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            if self.drop_last and len(chunk) < self.batch_size:
                return
            yield self._maker.build_raw([(row.item_id, self._tile(row)) for row in chunk], epoch)

    def finish_batch(self, raw: dict[str, Any], pin_memory: bool = False, threads: int = 1) -> dict[str, Any]:
        """Turn a raw batch of batch mode into the standard batch (done by the train loader)."""
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


# -- large GeoTIFFs ---------------------------------------------------------------------------
class _RasterHandles:
    """Open rasterio datasets kept per process (a forked worker must not reuse its parent's)."""

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._open: dict[Path, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def read(self, path: Path, window: Window) -> np.ndarray:
        if os.getpid() != self._pid:
            self._pid, self._open = os.getpid(), {}
        src = self._open.get(path)
        if src is None:
            try:
                with gdal_env():
                    src = rasterio.open(path)
            except RasterioIOError as exc:
                raise RasterReadError(path, f"not a readable raster ({exc})") from exc
            self._open[path] = src
        try:
            return src.read(window=window)
        except RasterioIOError as exc:
            raise RasterReadError(path, f"pixel data is corrupt or truncated ({exc})") from exc

    def close(self) -> None:
        for src in self._open.values():
            src.close()
        self._open = {}


class GeoPatchDataset(_EpochState, Dataset):
    """Random windows from large GeoTIFFs, read with ``rasterio.windows.Window`` (never whole).

    Index with ``(i, patch_size)`` (what :class:`PatchSizeBatchSampler` yields: one size per
    batch, decided in the main process, so it works with any number of workers) or with a plain
    ``i`` (uses :attr:`patch_size`, set by :meth:`set_patch_size`; with ``num_workers > 0`` call
    it only before workers start). Sample ``i`` of epoch ``e`` is a pure function of
    ``(seed, e, i, patch_size)``: windows lie fully inside the raster; a raster smaller than
    the patch is read whole and padded (image 0 after normalisation, mask ``ignore_index``).

    Args:
        raster_paths: Images, any band count; all must share band count and dtype.
        target_paths: Masks aligned with ``raster_paths`` (``None`` entries, or ``None``: unlabeled).
        patch_sizes: Sizes the batch sampler chooses from (seed 000 default 256/512/1024).
        patch_size_sampling: ``uniform`` (random per batch) or ``cycle`` (round robin).
        samples_per_epoch: Length of the dataset.
        stats: Band statistics; ``None`` uses the dtype scale fallback.
        seed: Base seed of window positions and augmentation.
        augmenter: Optional augmentation (applied after the window read).
        ignore_index: Mask value for unlabeled, nodata and padded pixels.
        weight_by_area: Draw rasters proportionally to their pixel count (else uniformly).
        epoch: Starting epoch.
    """

    def __init__(
        self,
        raster_paths: Sequence[Path | str],
        target_paths: Sequence[Path | str | None] | None = None,
        *,
        patch_sizes: Sequence[int] = (256, 512, 1024),
        patch_size_sampling: str = "uniform",
        samples_per_epoch: int,
        stats: BandStats | None = None,
        seed: int = 0,
        augmenter: Augmenter | None = None,
        ignore_index: int = 255,
        weight_by_area: bool = True,
        epoch: int = 0,
    ) -> None:
        super().__init__(epoch)
        self.raster_paths = [Path(p) for p in raster_paths]
        if not self.raster_paths:
            raise ValueError("raster_paths is empty: give at least one GeoTIFF")
        targets = list(target_paths) if target_paths is not None else [None] * len(self.raster_paths)
        if len(targets) != len(self.raster_paths):
            raise ValueError(
                f"target_paths has {len(targets)} entries but raster_paths {len(self.raster_paths)}; "
                "give one target (or None) per raster"
            )
        self.target_paths = [None if t is None else Path(t) for t in targets]
        self.patch_sizes = tuple(int(s) for s in patch_sizes)
        if not self.patch_sizes or min(self.patch_sizes) < 1:
            raise ValueError(f"patch_sizes={patch_sizes}: give at least one size >= 1")
        if patch_size_sampling not in PATCH_SIZE_SAMPLING:
            raise ValueError(
                f"patch_size_sampling={patch_size_sampling!r}: choose one of {', '.join(PATCH_SIZE_SAMPLING)}"
            )
        if samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch={samples_per_epoch}: must be >= 1")
        self.patch_size_sampling = patch_size_sampling
        self.samples_per_epoch = int(samples_per_epoch)
        self.seed = int(seed)
        self.patch_size = self.patch_sizes[0]
        self.infos = [read_info(p) for p in self.raster_paths]
        bands = {info.count for info in self.infos}
        dtypes = {info.dtype for info in self.infos}
        if len(bands) != 1 or len(dtypes) != 1:
            raise ValueError(
                f"rasters differ in band count {sorted(bands)} or dtype {sorted(dtypes)}; use one kind"
            )
        for info, target in zip(self.infos, self.target_paths, strict=True):
            if target is None:
                continue
            target_info = read_info(target)
            if (target_info.width, target_info.height) != (info.width, info.height) or target_info.count != 1:
                raise ValueError(
                    f"target {target} is {target_info.width}x{target_info.height}x{target_info.count} "
                    f"but raster {info.path} is {info.width}x{info.height}; targets must be single-band "
                    "and the same size"
                )
        self.stats = stats if stats is not None else scale_stats(self.infos[0].count, self.infos[0].dtype)
        _check_common(self.stats, ignore_index, "none", 0)
        if self.stats.bands != self.infos[0].count:
            raise ValueError(
                f"stats describe {self.stats.bands} bands but the rasters have {self.infos[0].count}"
            )
        areas = np.array([info.width * info.height for info in self.infos], dtype=np.float64)
        weights = areas if weight_by_area else np.ones_like(areas)
        self._cumulative = np.cumsum(weights / weights.sum())
        self._maker = _SampleMaker(self.stats, augmenter, ignore_index, False, self.seed)
        self._handles = _RasterHandles()

    def __len__(self) -> int:
        return self.samples_per_epoch

    def batch_sampler(self, batch_size: int, *, drop_last: bool = False) -> PatchSizeBatchSampler:
        """A :class:`PatchSizeBatchSampler` over this dataset with its sizes, sampling and seed."""
        return PatchSizeBatchSampler(
            self.samples_per_epoch,
            batch_size,
            self.patch_sizes,
            sampling=self.patch_size_sampling,
            seed=self.seed,
            drop_last=drop_last,
        )

    def set_patch_size(self, size: int) -> None:
        """Patch size for plain integer indices (main process / before workers start)."""
        if size < 1:
            raise ValueError(f"patch size {size}: must be >= 1")
        self.patch_size = int(size)

    def window_for(self, index: int, patch_size: int, epoch: int | None = None) -> tuple[int, Window]:
        """``(raster index, window)`` of sample ``index``: deterministic, inside the raster."""
        epoch = self.epoch if epoch is None else epoch
        generator = torch.Generator().manual_seed(
            derive_seed("geo-window", self.seed, epoch, index, patch_size)
        )
        u = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
        raster = min(int(np.searchsorted(self._cumulative, u[0], side="right")), len(self.infos) - 1)
        info = self.infos[raster]
        height, width = min(patch_size, info.height), min(patch_size, info.width)
        top = min(int(u[1] * (info.height - height + 1)), info.height - height)
        left = min(int(u[2] * (info.width - width + 1)), info.width - width)
        return raster, Window(left, top, width, height)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, patch_size = key if isinstance(key, tuple) else (key, self.patch_size)
        if not 0 <= index < self.samples_per_epoch:
            raise IndexError(f"index {index} out of range for samples_per_epoch={self.samples_per_epoch}")
        epoch = self.epoch
        raster, window = self.window_for(index, patch_size, epoch)
        image = self._handles.read(self.raster_paths[raster], window)
        target = self.target_paths[raster]
        mask = None if target is None else self._handles.read(target, window)[0]
        invalid = invalid_pixels(image, self.infos[raster].nodata)
        if window.height < patch_size or window.width < patch_size:
            image, mask, invalid = _pad_to(image, mask, invalid, patch_size, self._maker.ignore_index)
        item_id = f"{self.raster_paths[raster].stem}:{window.row_off}:{window.col_off}:{patch_size}"
        return self._maker.make(item_id, (image, mask, invalid), epoch)


def _pad_to(
    image: np.ndarray, mask: np.ndarray | None, invalid: np.ndarray | None, size: int, ignore_index: int
) -> RawTile:
    """Pad a window read from a small raster to ``size x size`` (bottom/right)."""
    bands, height, width = image.shape
    padded = np.zeros((bands, size, size), dtype=image.dtype)
    padded[:, :height, :width] = image
    padded_invalid = np.ones((size, size), dtype=bool)
    padded_invalid[:height, :width] = False if invalid is None else invalid
    padded_mask = None
    if mask is not None:
        padded_mask = np.full(
            (size, size), ignore_index, dtype=np.int64 if ignore_index > 255 else mask.dtype
        )
        padded_mask[:height, :width] = mask
    return padded, padded_mask, padded_invalid


class PatchSizeBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(index, patch_size)`` keys with one patch size per batch (seed 000).

    The size is drawn in the main process, so every worker builds its batch at the size the
    sampler chose. Use with ``DataLoader(dataset, batch_sampler=...)``; call :meth:`set_epoch`
    each epoch (and ``dataset.set_epoch``) for fresh draws.

    Args:
        num_samples: Samples per epoch (``len(dataset)``).
        batch_size: Samples per batch.
        patch_sizes: Sizes to choose from.
        sampling: ``uniform`` (independent draw per batch) or ``cycle`` (round robin).
        seed: Base seed of the size draws.
        drop_last: Drop the last incomplete batch.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        patch_sizes: Sequence[int] = (256, 512, 1024),
        *,
        sampling: str = "uniform",
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if num_samples < 1 or batch_size < 1:
            raise ValueError(f"num_samples={num_samples}, batch_size={batch_size}: both must be >= 1")
        if not patch_sizes or min(patch_sizes) < 1:
            raise ValueError(f"patch_sizes={patch_sizes}: give at least one size >= 1")
        if sampling not in PATCH_SIZE_SAMPLING:
            raise ValueError(f"sampling={sampling!r}: choose one of {', '.join(PATCH_SIZE_SAMPLING)}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.patch_sizes = tuple(int(s) for s in patch_sizes)
        self.sampling = sampling
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def batch_sizes(self) -> list[int]:
        """The patch size of every batch of the current epoch."""
        n = len(self)
        if self.sampling == "cycle":
            start = self.epoch * n
            return [self.patch_sizes[(start + b) % len(self.patch_sizes)] for b in range(n)]
        rng = np.random.default_rng(derive_seed("patch-size", self.seed, self.epoch))
        return [self.patch_sizes[i] for i in rng.integers(0, len(self.patch_sizes), size=n)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for b, size in enumerate(self.batch_sizes()):
            start = b * self.batch_size
            stop = min(start + self.batch_size, self.num_samples)
            yield [(i, size) for i in range(start, stop)]
