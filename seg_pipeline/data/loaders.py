"""DataLoader construction with seed 000's loader knobs (F7 in docs/architecture.md).

One :class:`~seg_pipeline.settings.LoaderSettings` carries every knob; :func:`build_train_loader` and
:func:`build_eval_loader` turn a dataset into a ``torch.utils.data.DataLoader`` with
reproducible worker seeding. ``prefetch_factor`` and ``persistent_workers`` are only passed
when ``num_workers > 0`` (torch rejects them otherwise). The cache knobs are applied to shard
datasets here, so the config is the single place to set them.

Without workers, :class:`ThreadPrefetchLoader` reads the next batches in one background thread:
tile decoding (GDAL, numpy) releases the GIL, so it overlaps the model's step instead of stalling it.
"""

from __future__ import annotations

import functools
import queue
import random
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from seg_pipeline.data.augment import derive_seed
from seg_pipeline.data.shared_buffers import (
    DEFAULT_MAX_SETS,
    SHARED_BLOCK,
    BlockCollate,
    MappedSets,
    take_block,
)
from seg_pipeline.hardware import available_memory, torch_threads
from seg_pipeline.settings.batches import LoaderSettings


def seed_worker(worker_id: int, base_seed: int = 0, rank: int = 0) -> None:
    """Seed ``random``, numpy and torch in a worker from ``(base_seed, rank, worker_id)``.

    Every worker of every rank gets a distinct, reproducible seed, for any code that draws
    from the global generators (our datasets seed per item and do not rely on this).
    """
    seed = derive_seed("worker", base_seed, rank, worker_id)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def cache_budget(config: LoaderSettings, available: int | None = None) -> int:
    """Bytes the decoded tiles may take for ``cache_mode: auto``: ``loader.cache_budget_mb``, and at
    most a quarter of the memory available now (``available``: measured when not given).
    """
    budget = config.cache_budget_mb * 2**20
    available = available_memory() if available is None else available
    return budget if available is None else min(budget, available // 4)


def cache_choice(config: LoaderSettings, dataset: Dataset, budget: int | None = None) -> tuple[str, str]:
    """The tile cache a training loader over ``dataset`` uses (``none`` or ``lru``), and why.

    ``auto`` caches when every tile the dataset would cache fits :func:`cache_budget` (``budget``
    bytes when given): from the second epoch on, no tile is decoded again (the demo's data wait fell
    from 4-6 % to 1 % of each epoch, bench/RESULTS.md 2026-12-07 "leases"). Workers that restart
    every epoch would start with empty caches, so they get none.
    """
    if config.cache_mode != "auto":
        return config.cache_mode, f"loader.cache_mode={config.cache_mode}"
    size = getattr(dataset, "cache_bytes", None)
    if size is None:
        return "none", f"{type(dataset).__name__} has no tile cache"
    if config.num_workers > 0 and not config.persistent_workers:
        return "none", "workers restart every epoch (loader.persistent_workers=false): it would never hit"
    need = size()
    budget = cache_budget(config) if budget is None else budget
    fits = need <= budget
    return "lru" if fits else "none", (
        f"auto: the decoded tiles take {need / 2**20:.1f} MB, {'within' if fits else 'over'} the "
        f"budget of {budget / 2**20:.0f} MB (loader.cache_budget_mb, at most a quarter of free memory)"
    )


def _apply_cache(dataset: Dataset, config: LoaderSettings) -> None:
    configure = getattr(dataset, "configure_cache", None)
    if config.cache_mode == "auto":
        config = config.replace(cache_mode=cache_choice(config, dataset)[0])
    if configure is not None:
        configure(config.cache_mode, config.cache_max_items)
    elif config.cache_mode != "none":
        raise ValueError(
            f"cache_mode={config.cache_mode!r} but {type(dataset).__name__} has no tile cache; "
            "use cache_mode='none' or a shard dataset"
        )
    if config.cache_mode == "lru" and config.num_workers > 0 and not config.persistent_workers:
        warnings.warn(
            "cache_mode='lru' with num_workers>0 and persistent_workers=False: workers (and their "
            "caches) are rebuilt every epoch, so the cache never hits; set persistent_workers=True",
            stacklevel=3,
        )


def _common_kwargs(config: LoaderSettings, seed: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "num_workers": config.num_workers,
        "pin_memory": config.pin_memory,
        "worker_init_fn": functools.partial(seed_worker, base_seed=seed, rank=_rank()),
        "generator": torch.Generator().manual_seed(derive_seed("loader", seed)),
    }
    if config.num_workers > 0:
        kwargs["prefetch_factor"] = config.prefetch_factor
        kwargs["persistent_workers"] = config.persistent_workers
    return kwargs


class FinishingDataLoader(DataLoader):
    """A DataLoader over a dataset in batch mode; iteration hands out standard batches
    (``dataset.finish_batch``, in the main process, optionally pinned).

    Workers send batches they finished in shared blocks: ``finish_batch`` hands one out as views
    of its block, released to the worker once the batch is gone, and the last blocks stay mapped here
    (:mod:`~seg_pipeline.data.shared_buffers`), so a worker refills memory both processes have
    already mapped instead of faulting in new pages every batch. Without workers the raw
    batches are finished here.
    """

    def __init__(self, dataset: Dataset, *, finish_pin_memory: bool = False, **kwargs: Any) -> None:
        if not hasattr(dataset, "finish_batch"):
            raise ValueError(f"{type(dataset).__name__} has no finish_batch(); use a plain DataLoader")
        self.finish_pin_memory = finish_pin_memory
        super().__init__(dataset, **kwargs)

    def __iter__(self) -> Any:
        finish = self.dataset.finish_batch  # type: ignore[attr-defined]
        # without workers nothing competes for the cores: finish with torch's threads (1.35x
        # faster on 2 cores, bench/RESULTS.md 2026-12-07 "shared buffers"); with workers, one
        threads = torch.get_num_threads() if self.num_workers == 0 else 1
        mapped = MappedSets(self.num_workers * DEFAULT_MAX_SETS)
        for raw in super().__iter__():
            batch = finish(raw, pin_memory=self.finish_pin_memory, threads=threads)
            mapped.hold(raw[SHARED_BLOCK][0] if SHARED_BLOCK in raw else None)
            yield batch


class BlockDataLoader(DataLoader):
    """A DataLoader whose workers stack batches into blocks they refill
    (:class:`~seg_pipeline.data.shared_buffers.BlockCollate`): iteration hands each batch out as
    views of its block, released to the worker once the batch is gone (with ``pin_memory`` on
    CUDA: a pinned copy made with one torch thread, the workers using the other cores); the last
    blocks stay mapped here.
    """

    def __init__(self, dataset: Dataset, *, copy_pin_memory: bool = False, **kwargs: Any) -> None:
        self.copy_pin_memory = copy_pin_memory
        super().__init__(dataset, collate_fn=BlockCollate(), **kwargs)

    def __iter__(self) -> Any:
        mapped = MappedSets(self.num_workers * DEFAULT_MAX_SETS)
        pin = self.copy_pin_memory and torch.cuda.is_available()
        for batch in super().__iter__():
            with torch_threads(1):
                batch, block = take_block(batch, pin)
            mapped.hold(block)
            yield batch


class ThreadPrefetchLoader:
    """A loader read ``depth`` batches ahead by one background thread (same batches, same order).

    Only the thread iterates the wrapped loader, so seeded datasets draw exactly what they would
    in the main process. Attributes (``dataset``, ``sampler``, ...) are the wrapped loader's, so
    ``set_epoch`` and ``len()`` work as before. A failure in the thread is raised in the consumer;
    a consumer that stops early (``max_steps_per_epoch``) stops the thread.
    """

    def __init__(self, loader: DataLoader, depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"depth={depth}: prefetch at least one batch")
        self.loader = loader
        self.depth = depth

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Any]:
        ready: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def put(item: tuple[str, Any]) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for batch in self.loader:
                    if not put(("batch", batch)):
                        return
                put(("end", None))
            except BaseException as error:  # handed to the consumer, raised there
                put(("error", error))

        thread = threading.Thread(target=produce, name="seg_pipeline-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                kind, item = ready.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()


def prefetch_thread_wanted(config: LoaderSettings, device_type: str) -> tuple[bool, str]:
    """Whether batches are read ahead in a thread, and why (for the stage's log).

    ``null`` turns it on where the CPU has time to spare: no worker processes, and the model steps
    on an accelerator. On the CPU torch's own threads already use every core, and the thread only
    moved the loading (bench/RESULTS.md, 2026-12-07: data wait 11 % -> 2 %, epochs 3.5 % slower).
    """
    if config.prefetch_thread is not None:
        return config.prefetch_thread, f"loader.prefetch_thread={str(config.prefetch_thread).lower()}"
    if config.num_workers > 0:
        return False, f"{config.num_workers} worker processes prefetch"
    if device_type == "cpu":
        return False, "training on the CPU, whose cores torch's threads already use"
    return True, f"no worker processes, the model steps on {device_type}"


def with_prefetch_thread(
    loader: DataLoader, config: LoaderSettings, device_type: str = "cpu"
) -> DataLoader | ThreadPrefetchLoader:
    """``loader`` read ahead in a thread when :func:`prefetch_thread_wanted` says so."""
    if not prefetch_thread_wanted(config, device_type)[0]:
        return loader
    return ThreadPrefetchLoader(loader, depth=config.prefetch_factor)


def build_train_loader(
    dataset: Dataset,
    config: LoaderSettings | None = None,
    *,
    seed: int = 0,
    sampler: Sampler | None = None,
    batch_sampler: Sampler | None = None,
    drop_last: bool = False,
    collate_fn: Any = None,
) -> DataLoader:
    """A training DataLoader.

    Map-style datasets are shuffled unless a ``sampler`` (e.g. a weighted sampler) or a
    ``batch_sampler`` (e.g. :class:`~seg_pipeline.data.datasets.PatchSizeBatchSampler`) is given;
    iterable datasets shuffle themselves (call ``dataset.set_epoch`` each epoch). A dataset with
    its own ``batch_size`` (``ShardIterableDataset(batch_size=...)``) yields raw batches: the
    result is a :class:`FinishingDataLoader` that finishes them in the main process.
    """
    config = config or LoaderSettings()
    _apply_cache(dataset, config)
    kwargs = _common_kwargs(config, seed)
    loader_class: Any = DataLoader
    if collate_fn is not None:
        kwargs["collate_fn"] = collate_fn
    elif config.num_workers > 0:  # workers stack into blocks they refill, not fresh shared memory
        loader_class = BlockDataLoader
        kwargs["copy_pin_memory"] = kwargs.pop("pin_memory")
        kwargs["pin_memory"] = False
    if batch_sampler is not None:
        if sampler is not None:
            raise ValueError("give sampler or batch_sampler, not both")
        return loader_class(dataset, batch_sampler=batch_sampler, **kwargs)
    if isinstance(dataset, IterableDataset):
        if sampler is not None:
            raise ValueError(
                f"sampler given for iterable {type(dataset).__name__}: iterable datasets order themselves"
            )
        dataset_batch = getattr(dataset, "batch_size", None)
        if dataset_batch is not None:  # the dataset assembles batches itself
            if dataset_batch != config.batch_size:
                raise ValueError(
                    f"dataset batch_size={dataset_batch} but loader.batch_size={config.batch_size}; "
                    "build the dataset with the loader's batch size"
                )
            dataset.drop_last = drop_last  # type: ignore[attr-defined]
            kwargs.pop("copy_pin_memory", None)  # the dataset batches: no collate
            kwargs["pin_memory"] = False  # pinned when finish_batch copies the batch out
            return FinishingDataLoader(
                dataset, finish_pin_memory=config.pin_memory, batch_size=None, **kwargs
            )
        return loader_class(dataset, batch_size=config.batch_size, drop_last=drop_last, **kwargs)
    return loader_class(
        dataset,
        batch_size=config.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=drop_last,
        **kwargs,
    )


def build_eval_loader(
    dataset: Dataset,
    config: LoaderSettings | None = None,
    *,
    seed: int = 0,
    collate_fn: Any = None,
) -> DataLoader:
    """An evaluation DataLoader: dataset order, nothing dropped (use a map-style dataset).

    ``cache_mode: auto`` caches nothing here: an evaluation reads each tile once.
    """
    config = config or LoaderSettings()
    if config.cache_mode == "auto":
        config = config.replace(cache_mode="none")
    _apply_cache(dataset, config)
    kwargs = _common_kwargs(config, seed)
    if collate_fn is not None:
        kwargs["collate_fn"] = collate_fn
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=False, drop_last=False, **kwargs)
