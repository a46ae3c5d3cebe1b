"""Shared-memory batch blocks that a DataLoader worker reuses once the main process is done.

A worker's batch reaches the main process in shared memory, and two costs dominate the transfer
of a raw batch (bench/RESULTS.md, 2026-12-07, "shared buffers"):

- *fresh memory*: a new shared buffer per batch costs a page fault on every 4 KiB page the
  worker writes (in a VM, an exit to the host per fault): 3.9 ms to fill a new 3 MB buffer
  against 0.06 ms to refill one already mapped;
- *one file descriptor per tensor*: each shared storage travels as its own descriptor, fetched
  by the main process over a socket from the worker.

So a batch travels as one flat ``uint8`` block (:class:`BufferSet`) holding all its tensors,
and each worker keeps a few blocks and refills one only after the consumer has *released* it:
byte 0 of a block is a flag, set by the worker when it hands the block out and cleared by the
main process (:func:`release`) once nothing reads the batch any more. The main process hands the
batch out as views of the block (:func:`lease`: copying 1.3 MB per 256 px tile into fresh memory
was a third of its loading cost) and the block is released when the last of them is gone. A
consumer that keeps batches, or never releases (a plain ``DataLoader`` over raw batches), only
costs fresh blocks, as before: a block is never refilled while its flag is up.
"""

from __future__ import annotations

import math
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate, get_worker_info

#: (shape, dtype) of one tensor of a buffer set.
BufferSpec = tuple[tuple[int, ...], torch.dtype]
#: Where a tensor lies in a block: (byte offset, shape, dtype).
Slot = tuple[int, tuple[int, ...], torch.dtype]

#: Blocks a worker keeps: batches in flight (prefetch_factor, 2 by default) plus the one being
#: finished, with room to spare.
DEFAULT_MAX_SETS = 6
#: Tensors start on this byte boundary in a block (byte 0 holds the in-use flag).
_ALIGN = 64


def shared_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in shared memory (what ``default_collate`` stacks into in a worker)."""
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    # torch's stubs want a stride with a size; set_ defaults it to the contiguous one
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)  # type: ignore[call-overload]


def plan_block(specs: Sequence[BufferSpec]) -> tuple[tuple[Slot, ...], int]:
    """The slots of ``specs`` in one block, and the block's size in bytes."""
    slots = []
    offset = _ALIGN
    for shape, dtype in specs:
        slots.append((offset, tuple(shape), dtype))
        offset += -(-math.prod(shape) * dtype.itemsize // _ALIGN) * _ALIGN
    return tuple(slots), offset


def unpack(block: torch.Tensor, layout: Sequence[Slot]) -> tuple[torch.Tensor, ...]:
    """The tensors of a block, as views (no copy)."""
    return tuple(
        block[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
        for offset, shape, dtype in layout
    )


@dataclass(frozen=True, eq=False)  # a set is itself: comparing its tensors would be elementwise
class BufferSet:
    """One batch's tensors in one flat ``uint8`` block, which is what travels between processes.

    ``kept`` says whether the pool refills the block once released; a block made outside a
    worker (it never travels) or beyond the pool's size is not kept.
    """

    block: torch.Tensor
    layout: tuple[Slot, ...]
    kept: bool

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The batch's tensors, views into the block."""
        return unpack(self.block, self.layout)

    @property
    def in_use(self) -> bool:
        """Whether the consumer may still read the block."""
        return bool(self.block[0])


def release(block: torch.Tensor | None) -> None:
    """Tell the worker that made a batch that its block may be refilled."""
    if block is not None:
        block[0] = 0


class MappedSets:
    """The main process's side: keeps its mappings of released blocks open.

    torch maps a received shared buffer again unless a live tensor of the main process already
    maps it (``torch.multiprocessing``'s shared cache); holding on to the last ``size`` released
    blocks makes the next batch in the same block arrive without new mappings or page faults.
    They are the workers' pooled blocks, so holding them costs no memory of its own.
    """

    def __init__(self, size: int) -> None:
        self._held: deque[torch.Tensor] = deque(maxlen=max(size, 1))

    def hold(self, block: torch.Tensor | None) -> None:
        """Keep ``block`` (of a released batch) mapped."""
        if block is not None and block.is_shared():
            self._held.append(block)


class SharedBufferPool:
    """Blocks of one worker process, each refilled once its consumer released it.

    Holds at most ``max_sets`` blocks. When none is free: a new block while there is room; else
    a free block of another layout (a patch-size schedule changed the batch) makes room; else,
    every block still held by the consumer, a fresh block outside the pool.
    """

    def __init__(self, max_sets: int = DEFAULT_MAX_SETS) -> None:
        if max_sets < 1:
            raise ValueError(f"max_sets={max_sets}: keep at least one buffer set")
        self.max_sets = max_sets
        self._sets: list[BufferSet] = []

    def __getstate__(self) -> dict[str, object]:
        """A copy (a dataset pickled for a worker) starts empty: blocks belong to one process."""
        return {"max_sets": self.max_sets, "_sets": []}

    def __len__(self) -> int:
        return len(self._sets)

    def acquire(self, specs: Sequence[BufferSpec], *, shared: bool | None = None) -> BufferSet:
        """A block holding tensors of ``specs`` for the next batch, marked in use.

        ``shared=None`` shares it only in a DataLoader worker: in the main process a batch never
        travels, so it gets plain memory.
        """
        layout, size = plan_block(specs)
        if not (get_worker_info() is not None if shared is None else shared):
            return BufferSet(torch.empty(size, dtype=torch.uint8), layout, kept=False)
        free = [s for s in self._sets if not s.in_use]
        chosen = next((s for s in free if s.layout == layout), None)
        if chosen is None:
            chosen = BufferSet(shared_tensor((size,), torch.uint8), layout, kept=True)
            if len(self._sets) >= self.max_sets:
                if not free:  # every block is still being read: this one is not kept
                    chosen = BufferSet(chosen.block, layout, kept=False)
                else:
                    self._sets.remove(free[0])
            if chosen.kept:
                self._sets.append(chosen)
        chosen.block[0] = 1
        return chosen


#: The key under which a batch stacked by :class:`BlockCollate` carries its block.
SHARED_BLOCK = "_shared_block"


class BlockCollate:
    """A ``collate_fn`` for DataLoader workers: samples stacked into one of the worker's blocks.

    ``default_collate`` stacks a worker's batch into fresh shared memory every time; this stacks
    the samples' tensors into a pooled block instead (other fields go through
    ``default_collate``), and :func:`take_block` in the main process copies them out and
    releases the block. Samples whose tensors differ in shape or dtype, and batches built in the
    main process, are collated by ``default_collate`` as they are.
    """

    def __init__(self, max_sets: int = DEFAULT_MAX_SETS) -> None:
        self._pool = SharedBufferPool(max_sets)

    def __call__(self, samples: list[Any]) -> Any:
        """One batch of ``samples``, its tensors in a block when they stack."""
        first = samples[0] if samples else None
        if get_worker_info() is None or not isinstance(first, dict):
            return default_collate(samples)
        keys = [key for key, value in first.items() if isinstance(value, torch.Tensor)]
        stackable = keys and all(
            isinstance(sample.get(key), torch.Tensor)
            and sample[key].shape == first[key].shape
            and sample[key].dtype == first[key].dtype
            for sample in samples
            for key in keys
        )
        if not stackable:
            return default_collate(samples)
        block = self._pool.acquire([((len(samples), *first[key].shape), first[key].dtype) for key in keys])
        for key, out in zip(keys, block.tensors, strict=True):
            torch.stack([sample[key] for sample in samples], out=out)
        rest = default_collate([{k: v for k, v in sample.items() if k not in keys} for sample in samples])
        return {**rest, SHARED_BLOCK: (block.block, block.layout, keys)}


class _Lease:
    """The numpy-visible owner of a block's batch: when the last tensor viewing it is gone, it is
    freed and the block is released to its worker.

    ``torch.from_numpy`` keeps the array (and so this object, its base) alive for exactly as long
    as any view of the tensor lives, views of views included; a weak finalizer then clears the flag.
    """

    def __init__(self, block: torch.Tensor) -> None:
        self.__array_interface__ = {
            "shape": (block.numel(),),
            "typestr": "|u1",
            "data": (block.data_ptr(), False),
            "version": 3,
        }
        self._block = block
        weakref.finalize(self, release, block)


def lease(block: torch.Tensor, layout: Sequence[Slot]) -> tuple[torch.Tensor, ...]:
    """The tensors of a block without a copy; the block is released once none of them (nor any
    view of them) is alive any more. A consumer that keeps a batch only keeps its block busy (the
    worker then fills a fresh one).
    """
    return unpack(torch.from_numpy(np.asarray(_Lease(block))), layout)


def take_block(batch: Any, pin_memory: bool = False) -> tuple[Any, torch.Tensor | None]:
    """A batch of :class:`BlockCollate` with its tensors handed out of the block, and the block
    (to keep mapped); other batches pass unchanged.

    The tensors are views of the block (:func:`lease`; no copy: 1.3 MB per 256 px tile into
    fresh memory cost the main process a page fault per 4 KiB), or, with ``pin_memory``, pinned
    copies, the block released at once.
    """
    if not isinstance(batch, dict) or SHARED_BLOCK not in batch:
        return batch, None
    block, layout, keys = batch.pop(SHARED_BLOCK)
    if pin_memory:
        try:
            tensors: Sequence[torch.Tensor] = [
                torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t) for t in unpack(block, layout)
            ]
        finally:
            release(block)
    else:
        tensors = lease(block, layout)
    batch.update(zip(keys, tensors, strict=True))
    return batch, block
