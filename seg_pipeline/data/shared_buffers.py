"""Shared-memory batch buffers that a DataLoader worker reuses once the main process is done.

A worker's batch reaches the main process in shared memory. A fresh shared buffer per batch
costs a page fault on every 4 KiB page the worker writes (and, in a VM, an exit to the host per
fault): 3.9 ms to fill a new 3 MB buffer against 0.06 ms to refill one already mapped
(bench/RESULTS.md, 2026-12-07, "shared buffers"). So each worker keeps a few buffer sets and
reuses one only after the consumer has *released* it: every set carries a one-byte flag in shared
memory, set by the worker when it hands the set out and cleared by the main process
(:func:`release`) once it has copied the batch out. A consumer that never releases (a plain
``DataLoader`` over raw batches) only costs fresh buffers, as before: a set is never reused
while its flag is up.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import get_worker_info

#: (shape, dtype) of one tensor of a buffer set.
BufferSpec = tuple[tuple[int, ...], torch.dtype]

#: Buffer sets a worker keeps: batches in flight (prefetch_factor, 2 by default) plus the one
#: being finished, with room to spare.
DEFAULT_MAX_SETS = 6


def shared_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in shared memory (what ``default_collate`` stacks into in a worker)."""
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    # torch's stubs want a stride with a size; set_ defaults it to the contiguous one
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)  # type: ignore[call-overload]


@dataclass(frozen=True)
class BufferSet:
    """Tensors for one batch, and the flag that says whether its consumer still holds them.

    ``in_use`` is ``None`` outside a worker (plain tensors that never travel) and for sets the
    pool does not keep.
    """

    tensors: tuple[torch.Tensor, ...]
    in_use: torch.Tensor | None

    @property
    def specs(self) -> tuple[BufferSpec, ...]:
        """What the set holds, to match it against the next batch."""
        return tuple((tuple(t.shape), t.dtype) for t in self.tensors)


def release(in_use: torch.Tensor | None) -> None:
    """Tell the worker that made a batch that its buffers may be written again."""
    if in_use is not None:
        in_use.zero_()


class MappedSets:
    """The main process's side: keeps its mappings of released sets open.

    torch maps a received shared buffer again unless a live tensor of the main process already
    maps it (``torch.multiprocessing``'s shared cache); holding on to the last ``size`` released
    sets makes the next batch in the same set arrive without new mappings or page faults. They
    are the workers' pooled buffers, so holding them costs no memory of its own.
    """

    def __init__(self, size: int) -> None:
        self._held: deque[object] = deque(maxlen=max(size, 1))

    def hold(self, raw: object, in_use: torch.Tensor | None) -> None:
        """Keep ``raw`` (a released batch) mapped if it came from a worker's pool."""
        if in_use is not None:
            self._held.append(raw)


class SharedBufferPool:
    """Buffer sets of one worker process, each reused once its consumer released it.

    Holds at most ``max_sets`` sets. When none is free: a new set while there is room; else a
    free set of other shapes (a patch-size schedule changed the batch) makes room; else, every set
    still held by the consumer, a fresh set outside the pool.
    """

    def __init__(self, max_sets: int = DEFAULT_MAX_SETS) -> None:
        if max_sets < 1:
            raise ValueError(f"max_sets={max_sets}: keep at least one buffer set")
        self.max_sets = max_sets
        self._sets: list[BufferSet] = []

    def __getstate__(self) -> dict[str, object]:
        """A copy (a dataset pickled for a worker) starts empty: buffers belong to one process."""
        return {"max_sets": self.max_sets, "_sets": []}

    def __len__(self) -> int:
        return len(self._sets)

    def acquire(self, specs: Sequence[BufferSpec], *, shared: bool | None = None) -> BufferSet:
        """Tensors of ``specs`` for the next batch, marked in use.

        ``shared=None`` shares them only in a DataLoader worker: in the main process a batch never
        travels, so it gets plain tensors.
        """
        specs = tuple((tuple(shape), dtype) for shape, dtype in specs)
        if not (get_worker_info() is not None if shared is None else shared):
            return BufferSet(tuple(torch.empty(shape, dtype=dtype) for shape, dtype in specs), None)
        free = [s for s in self._sets if s.in_use is not None and not bool(s.in_use.item())]
        chosen = next((s for s in free if s.specs == specs), None)
        if chosen is None:
            chosen = BufferSet(
                tuple(shared_tensor(shape, dtype) for shape, dtype in specs),
                shared_tensor((1,), torch.uint8),
            )
            if len(self._sets) >= self.max_sets:
                if not free:  # every set is still being read: this one is not kept
                    return BufferSet(chosen.tensors, None)
                self._sets.remove(free[0])
            self._sets.append(chosen)
        assert chosen.in_use is not None
        chosen.in_use.fill_(1)
        return chosen
