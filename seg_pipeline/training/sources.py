"""The training data of a stage: sharded sources interleaved into one stream, masks in the target scheme.

A stage trains on the target's ``train`` split plus, in stage 1, auxiliary sources whose masks are
remapped to the target classes on the fly (no data is copied). Every source reads its tiles with the
target's ``ignore_index``; a source whose own ignore value or class list differs gets a lookup table,
so its "not labelled" pixels become the target's and never train as a class.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import Field

from seg_pipeline.contracts import BandStatistics, ShardSet
from seg_pipeline.contracts.base import Contract
from seg_pipeline.data.augment import Augmenter
from seg_pipeline.data.combined import InterleavedSources, RemappedSource, remap_table, resolve_remap
from seg_pipeline.data.datasets import ShardIterableDataset, ShardMapDataset
from seg_pipeline.data.headers import read_catalog
from seg_pipeline.data.normalization import BandStats
from seg_pipeline.settings import StageSettings


class TrainingSource(Contract):
    """One sharded dataset feeding a stage: which splits, and how its classes map to the target's.

    ``class_remap`` maps source class -> target class by name or id (``None``/``""`` = ignore);
    ``None`` means the source already uses the target's class list.
    """

    shards: ShardSet
    splits: list[str] = Field(default_factory=lambda: ["train"])
    class_remap: dict[str, str | None] | None = None

    @property
    def name(self) -> str:
        """The source's dataset id."""
        return self.shards.dataset_id


def band_stats(statistics: BandStatistics | None, where: str) -> BandStats:
    """The runtime normalisation object of a contract's band statistics."""
    if statistics is None:
        raise ValueError(f"{where}: the catalog has no band statistics (no valid tile); fix the data first")
    return BandStats(tuple(statistics.mean), tuple(statistics.std))


def mask_lookup(
    source: TrainingSource, target_classes: Sequence[str], ignore_index: int
) -> np.ndarray | None:
    """A table taking the source's mask values to target class ids, or None when none is needed."""
    catalog = source.shards.catalog
    same_scheme = list(catalog.class_names) == list(target_classes) and catalog.ignore_index == ignore_index
    if source.class_remap is None and same_scheme:
        return None
    remap = resolve_remap(source.class_remap or {}, catalog.class_names, target_classes)
    return remap_table(remap, ignore_index)


def build_training_data(
    sources: Sequence[TrainingSource],
    target_classes: Sequence[str],
    ignore_index: int,
    settings: StageSettings,
    *,
    include_unlabeled: bool = False,
) -> InterleavedSources:
    """Interleave every (source, split) as one stream with masks in the target scheme."""
    streams = []
    seed = settings.loop.seed
    for index, source in enumerate(sources):
        stats = band_stats(source.shards.catalog.normalization, source.name)
        lookup = mask_lookup(source, target_classes, ignore_index)
        for split in source.splits:
            dataset = ShardIterableDataset(
                source.shards.dataset_dir,
                split,
                stats=stats,
                augmenter=Augmenter(settings.augment, seed=seed + index),
                ignore_index=ignore_index,
                seed=seed + index,
                cache_mode=settings.loader.cache_mode,
                cache_max_items=settings.loader.cache_max_items,
                drop_unlabeled=not include_unlabeled,
            )
            streams.append(RemappedSource(dataset, lookup, name=f"{source.name}/{split}"))
    return InterleavedSources(streams, seed=seed)


def build_validation_data(target: ShardSet, split: str, normalization: BandStats) -> ShardMapDataset:
    """The target's validation split, un-augmented, with the target's ignore value."""
    return ShardMapDataset(
        target.dataset_dir, split, stats=normalization, ignore_index=target.catalog.ignore_index
    )


def class_pixel_totals(
    sources: Sequence[TrainingSource], target_classes: Sequence[str], ignore_index: int
) -> list[int]:
    """Labelled pixels per target class over the sources' valid tiles (for class weighting)."""
    totals = np.zeros(len(target_classes), dtype=np.int64)
    for source in sources:
        catalog = read_catalog(source.shards.catalog.catalog_path)
        lookup = mask_lookup(source, target_classes, ignore_index)
        for counts in catalog.loc[catalog["status"] == "ok", "class_counts"]:
            if counts is None or not len(counts):
                continue
            for source_class, n in enumerate(counts):
                target_class = source_class if lookup is None else int(lookup[source_class])
                if target_class < len(target_classes):
                    totals[target_class] += int(n)
    return totals.tolist()
