"""Whole training batches of a stage's interleaved sources, each sample written in place.

The per-sample path gives every sample its own float32 image and int64 mask and then stacks them
(``default_collate``): two allocations and a copy of 1.3 MB per 256 px sample. Here the sources
draw their samples in the same order (:meth:`~seg_pipeline.data.combined.InterleavedSources.pending`)
and each is written straight into a row of the batch, with the same operations, so batches equal
the per-sample path's bit for bit (with and without workers). In a DataLoader worker the batch
lies in one of the worker's pooled shared blocks (:mod:`~seg_pipeline.data.shared_buffers`), which
the main process hands out as views.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset

from seg_pipeline.data.combined import InterleavedSources, SourcedView
from seg_pipeline.data.samples import write_views
from seg_pipeline.data.shared_buffers import SHARED_BLOCK, SharedBufferPool, take_block
from seg_pipeline.hardware import torch_threads


class SourceBatches(IterableDataset):
    """Batches of ``batch_size`` samples of ``sources`` (a reader's last batch may be smaller, or
    dropped with ``drop_last``), as ``{"image", "mask", "item_id", "source"}`` plus ``view`` with
    two views per sample: what a DataLoader would collate from the samples of ``sources``.

    Build the loader with :func:`~seg_pipeline.data.loaders.build_train_loader` (it hands batches
    out of the workers' blocks through :meth:`finish_batch`).
    """

    def __init__(self, sources: InterleavedSources, batch_size: int, drop_last: bool = False) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        self.sources = sources
        self.batch_size = batch_size
        self.drop_last = drop_last
        self._pool = SharedBufferPool()

    def __len__(self) -> int:
        """Batches per epoch in one reader (approximate with workers, as for the per-sample path)."""
        return math.ceil(len(self.sources) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of every source (order and augmentation draws)."""
        self.sources.set_epoch(epoch)

    def configure_cache(self, cache_mode: str, cache_max_items: int = 0) -> None:
        """Switch the sources' tile caches."""
        self.sources.configure_cache(cache_mode, cache_max_items)

    def cache_bytes(self) -> int:
        """Memory the sources' tile caches take once every cached tile was read."""
        return self.sources.cache_bytes()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        chunk: list[SourcedView] = []
        for sample in self.sources.pending():
            chunk.append(sample)
            if len(chunk) == self.batch_size:
                yield self._assemble(chunk)
                chunk = []
        if chunk and not self.drop_last:
            yield self._assemble(chunk)

    def _assemble(self, chunk: list[SourcedView]) -> dict[str, Any]:
        shape = chunk[0].view.shape
        for sample in chunk:
            if sample.view.shape != shape:
                raise ValueError(
                    f"sample {sample.key} of {sample.source} is {sample.view.shape} but the batch holds "
                    f"{shape}; samples in one batch must share a size (patches.size, augment.crop_size)"
                )
        block = self._pool.acquire(
            [((len(chunk), *shape), torch.float32), ((len(chunk), *shape[1:]), torch.int64)]
        )
        images, masks = block.tensors
        start = 0
        for end in range(1, len(chunk) + 1):  # runs of one source: photometric ops for the run at once
            if end < len(chunk) and chunk[end].view.maker is chunk[start].view.maker:
                continue
            run = chunk[start:end]
            write_views([s.view for s in run], images[start:end], masks[start:end])
            if run[0].lut is not None:
                masks[start:end] = run[0].lut[masks[start:end]]
            start = end
        batch: dict[str, Any] = {
            "item_id": [sample.key for sample in chunk],
            "source": [sample.source for sample in chunk],
        }
        if chunk[0].index is not None:
            batch["view"] = torch.tensor([sample.index for sample in chunk])
        if block.block.is_shared():  # a worker's block: the main process hands it out as views
            batch[SHARED_BLOCK] = (block.block, block.layout, ["image", "mask"])
        else:
            batch.update(image=images, mask=masks)
        return batch

    def finish_batch(self, raw: dict[str, Any], pin_memory: bool = False, threads: int = 1) -> dict[str, Any]:
        """The batch a reader made, as the training step takes it (done by the train loader): out of
        its worker's block, or as it is (pinned when asked, on CUDA).
        """
        pin = pin_memory and torch.cuda.is_available()
        with torch_threads(threads):  # a pinned copy with workers busy on the other cores wants one
            if SHARED_BLOCK in raw:
                return take_block(dict(raw), pin)[0]
            if pin:
                return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in raw.items()}
        return raw
