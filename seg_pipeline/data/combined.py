"""Combined training sources (F6): the target plus auxiliary datasets, each with a class remap.

Nothing is copied: each source streams from its own shards and its masks are remapped on the
fly through a lookup table. Source classes with no target class map to ``ignore_index`` (they
are neither rewarded nor penalised), e.g. OpenEarthMap's ``unknown``.

Two views per sample (``augment.views_per_sample: 2``): a :class:`RemappedSource` with ``views=2``
wraps a dataset built with ``two_views=True`` and yields each of its samples as two
(:func:`~seg_pipeline.data.samples.split_views`), each mask remapped; its length counts both, so
the interleaving and the per-epoch caps see the doubled epoch.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import IterableDataset

from seg_pipeline.data.samples import PendingView, split_views

#: Mask values are at most uint16, so a 65536-entry table covers every possible label.
_LUT_SIZE = 1 << 16
#: A remap's keys: class names, class ids, or both (``Mapping`` is invariant in its key type).
RemapKey = TypeVar("RemapKey", bound=str | int)
T = TypeVar("T")


@dataclass(frozen=True)
class SourcedView:
    """One training sample (one view of it) of a source, drawn but not yet written, and what its
    source does to it: the mask lookup into the target classes.

    ``index`` is the view's number in a two-view sample (``None``: one view), as the per-sample
    path's ``view`` field.
    """

    key: str
    view: PendingView
    index: int | None
    source: str
    lut: torch.Tensor | None


class ClassRemapError(ValueError):
    """A class remap names a class that does not exist; the message lists the valid names."""


def resolve_remap(
    remap: Mapping[RemapKey, str | int | None],
    source_classes: Sequence[str],
    target_classes: Sequence[str],
) -> dict[int, int | None]:
    """Turn a remap given by names or ids into ``{source_id: target_id | None}``.

    Keys name a source class, values a target class (``None`` or ``""`` = ignore). Source
    classes missing from ``remap`` keep their id when the name also exists in the target
    scheme, else they are ignored.
    """

    def index(name: str | int, names: Sequence[str], side: str) -> int:
        if isinstance(name, int) or (isinstance(name, str) and name.isdigit()):
            value = int(name)
            if not 0 <= value < len(names):
                raise ClassRemapError(f"class remap: {side} class id {value} outside 0..{len(names) - 1}")
            return value
        if name not in names:
            raise ClassRemapError(f"class remap: unknown {side} class {name!r}; valid: {list(names)}")
        return list(names).index(name)

    resolved: dict[int, int | None] = {}
    for source_id, source_name in enumerate(source_classes):
        if source_name in target_classes:
            resolved[source_id] = list(target_classes).index(source_name)
        else:
            resolved[source_id] = None
    for key, value in remap.items():
        src = index(key, source_classes, "source")
        resolved[src] = None if value in (None, "") else index(value, target_classes, "target")
    return resolved


def remap_table(remap: Mapping[int, int | None], ignore_index: int) -> np.ndarray:
    """A uint16 lookup table applying ``remap``; unlisted values (and ignore) map to ``ignore_index``."""
    lut = np.full(_LUT_SIZE, ignore_index, dtype=np.int64)
    for source, target in remap.items():
        lut[source] = ignore_index if target is None else target
    return lut


class RemappedSource(IterableDataset):
    """Wrap a dataset of samples ``{"image", "mask", ...}`` and remap its masks through a table.

    ``views=2``: the dataset yields two-view samples, and each is yielded as two samples.
    """

    def __init__(
        self, dataset: Iterable[dict[str, Any]], lut: np.ndarray | None, name: str, views: int = 1
    ) -> None:
        super().__init__()
        if views not in (1, 2):
            raise ValueError(f"views={views}: use 1 or 2 (two-view samples)")
        self.dataset = dataset
        self.lut = None if lut is None else torch.from_numpy(lut)
        self.name = name
        self.views = views

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to the wrapped dataset (reshuffles it)."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return self.views * len(self.dataset)  # type: ignore[arg-type]

    def pending(self) -> Iterator[SourcedView]:
        """The samples ``__iter__`` yields, in the same order, drawn but not written (one per view)."""
        pending = getattr(self.dataset, "pending", None)
        if pending is None:
            raise ValueError(f"{self.name}: {type(self.dataset).__name__} cannot draw samples ahead")
        for key, views in pending():
            if self.views != len(views):
                raise ValueError(f"{self.name}: views={self.views} but the dataset draws {len(views)}")
            for index, view in enumerate(views):
                yield SourcedView(key, view, index if self.views > 1 else None, self.name, self.lut)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for two_view in self.dataset:
            if self.views > 1 and "image_view1" not in two_view:
                raise ValueError(
                    f"{self.name}: views=2 but the dataset yields one view; build it with two_views"
                )
            for sample in split_views(two_view) if self.views > 1 else [two_view]:
                if self.lut is not None:
                    sample = {**sample, "mask": self.lut[sample["mask"].long()]}
                sample["source"] = self.name
                yield sample


class InterleavedSources(IterableDataset):
    """Draw samples from several sources in a seeded random order, proportional to their size.

    Chaining sources would train on one, then the other; interleaving keeps every batch mixed.
    ``limits`` caps the samples a source gives per epoch (each epoch reshuffles it, so the capped
    source shows another part of itself every epoch).
    """

    def __init__(
        self, sources: Sequence[RemappedSource], seed: int = 0, limits: Sequence[int | None] | None = None
    ) -> None:
        super().__init__()
        if not sources:
            raise ValueError("InterleavedSources needs at least one source")
        self.sources = list(sources)
        self.limits = list(limits) if limits is not None else [None] * len(self.sources)
        if len(self.limits) != len(self.sources) or any(n is not None and n < 1 for n in self.limits):
            raise ValueError(f"limits={self.limits} must give one positive count (or None) per source")
        self.seed = seed
        self.epoch = 0

    def configure_cache(self, cache_mode: str, cache_max_items: int = 0) -> None:
        """Switch the per-worker tile cache of every source (each source's shard dataset keeps its own)."""
        for configure in self._cache_methods("configure_cache"):
            configure(cache_mode, cache_max_items)

    def cache_bytes(self) -> int:
        """Memory the sources' tile caches take once every cached tile was read (all workers together)."""
        return sum(size() for size in self._cache_methods("cache_bytes"))

    def _cache_methods(self, name: str) -> list[Any]:
        """Each source dataset's tile-cache method ``name``; a source without a cache is an error."""
        methods = []
        for source in self.sources:
            method = getattr(source.dataset, name, None)
            if method is None:
                raise ValueError(f"source {source.name!r} has no tile cache; use loader.cache_mode='none'")
            methods.append(method)
        return methods

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle every source and the interleaving for ``epoch``."""
        self.epoch = epoch
        for source in self.sources:
            source.set_epoch(epoch)

    def per_epoch(self, workers: int = 1) -> list[int]:
        """Samples each source gives one reader (of ``workers``) per epoch."""
        return [
            -(-(len(s) if n is None else min(len(s), n)) // workers)
            for s, n in zip(self.sources, self.limits, strict=True)
        ]

    def __len__(self) -> int:
        return sum(self.per_epoch())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._interleave([iter(s) for s in self.sources])

    def pending(self) -> Iterator[SourcedView]:
        """The samples ``__iter__`` yields, in the same order, drawn but not written (one per view)."""
        return self._interleave([s.pending() for s in self.sources])

    def _interleave(self, iterators: list[Iterator[T]]) -> Iterator[T]:
        """One item of each source's iterator at a time, in this reader's seeded order."""
        info = torch.utils.data.get_worker_info()
        rng = random.Random(f"{self.seed}:{self.epoch}:{info.id if info else 0}")
        # each worker reads its own share of every source, so each takes its share of a cap
        remaining = [max(n, 1) for n in self.per_epoch(info.num_workers if info else 1)]
        capped = [n is not None for n in self.limits]
        while iterators:
            pick = rng.choices(range(len(iterators)), weights=remaining)[0]
            try:
                yield next(iterators[pick])
            except StopIteration:
                del iterators[pick], remaining[pick], capped[pick]
                continue
            remaining[pick] -= 1
            if remaining[pick] <= 0:
                if capped[pick]:
                    del iterators[pick], remaining[pick], capped[pick]
                else:
                    remaining[pick] = 1
