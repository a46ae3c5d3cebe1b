"""The training data of a stage: sharded sources interleaved into one stream, masks in the target scheme.

A stage trains on the target's ``train`` split plus, in stage 1, auxiliary sources whose masks are
remapped to the target classes on the fly (no data is copied). Every source reads its tiles with the
target's ``ignore_index``; a source whose own ignore value or class list differs gets a lookup table,
so its "not labelled" pixels become the target's and never train as a class.

Three data-side knobs shape what a step sees. ``loader.rare_class_weight`` (seed 003's
``--weighted-sampling --fire-weight 5.0``) draws each epoch's patches again, tiles whose catalog
counts hold a rare class that many times as often
(:class:`~seg_pipeline.data.sampling.WeightedPatchDataset`). ``augment.rare_boost`` (seed 003's
``fire_augment``) widens the colour jitter of samples whose mask holds a rare class. Both take the
rare classes from ``loader.rare_classes`` (target class names) or, when it is empty, the library's
auto rule (classes under ``DEFAULT_RARE_SHARE`` of the sources' labelled pixels, in the target
scheme); :func:`rare_class_ids` resolves them once and each source gets them in its own scheme
through its class remap. ``augment.views_per_sample: 2`` (seed 000's two views) trains on two
augmented views of every patch read, as separate samples (``RemappedSource(views=2)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import Field

from seg_pipeline.contracts import BandStatistics, ShardSet
from seg_pipeline.contracts.base import Contract
from seg_pipeline.contracts.data import class_ids
from seg_pipeline.data.augment import Augmenter
from seg_pipeline.data.catalog import ok_rows
from seg_pipeline.data.combined import InterleavedSources, RemappedSource, remap_table, resolve_remap
from seg_pipeline.data.datasets import ShardIterableDataset, ShardMapDataset
from seg_pipeline.data.headers import read_catalog
from seg_pipeline.data.normalization import BandStats
from seg_pipeline.data.sampling import WeightedPatchDataset, rare_classes_auto, rare_tile_weights
from seg_pipeline.settings import PretrainSettings, StageSettings
from seg_pipeline.settings.batches import MIN_PATCH, PatchSettings

#: The automatic patch side stays within these bounds: below, encoders lose their deepest maps;
#: above, a CPU batch of 8 RGB float patches passes 50 MB and a step gets slow.
AUTO_PATCH_RANGE = (MIN_PATCH, 512)


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


def patch_size(sources: Sequence[TrainingSource], patches: PatchSettings) -> int:
    """The patch side of a stage: ``patches.size``, or the median tile side of the sources' valid tiles
    rounded up to a multiple of 32 and kept within :data:`AUTO_PATCH_RANGE` (256 px chips give 256).
    """
    if patches.size is not None:
        return patches.size
    sides = [
        max(int(h), int(w))
        for source in sources
        for h, w in ok_rows(read_catalog(source.shards.catalog.catalog_path))[["height", "width"]].itertuples(
            index=False
        )
    ]
    median = float(np.median(sides)) if sides else AUTO_PATCH_RANGE[1]
    low, high = AUTO_PATCH_RANGE
    return int(min(max(32 * np.ceil(median / 32), low), high))


def build_training_data(
    sources: Sequence[TrainingSource],
    target_classes: Sequence[str],
    ignore_index: int,
    settings: StageSettings,
    *,
    include_unlabeled: bool = False,
    size: int | None = None,
) -> InterleavedSources:
    """Interleave every (source, split) as one stream of patches with masks in the target scheme.

    ``size`` is the patch side (default :func:`patch_size` of these sources); a patch-size schedule
    reads its largest size.
    """
    streams = []
    seed = settings.loop.seed
    size = size or patch_size(sources, settings.patches)
    read_size = max([size, *settings.patches.sizes]) if settings.patches.sizes else size
    rare = rare_class_ids(sources, target_classes, ignore_index, settings)
    weight = settings.loader.rare_class_weight
    views = settings.augment.views_per_sample
    for index, source in enumerate(sources):
        stats = band_stats(source.shards.catalog.normalization, source.name)
        lookup = mask_lookup(source, target_classes, ignore_index)
        source_rare = _in_source_scheme(rare, lookup, len(source.shards.catalog.class_names))
        tile_weights = None
        if weight is not None:
            catalog = read_catalog(source.shards.catalog.catalog_path)
            tile_weights = rare_tile_weights(
                catalog, ok_rows(catalog)["item_id"].tolist(), source_rare, weight
            )
        for split in source.splits:
            kwargs: dict[str, Any] = {
                "stats": stats,
                "augmenter": Augmenter(settings.augment, seed=seed + index, rare_values=source_rare),
                "ignore_index": ignore_index,
                "seed": seed + index,
                "cache_mode": "none",  # the training loader switches it (loader.cache_mode)
                "drop_unlabeled": not include_unlabeled,
                "two_views": views == 2,
                "patch_size": size,
                "read_size": read_size,
            }
            dataset = (
                ShardIterableDataset(source.shards.dataset_dir, split, **kwargs)
                if tile_weights is None
                else WeightedPatchDataset(
                    source.shards.dataset_dir, split, tile_weights=tile_weights, **kwargs
                )
            )
            streams.append(RemappedSource(dataset, lookup, name=f"{source.name}/{split}", views=views))
    return InterleavedSources(streams, seed=seed, limits=_aux_limits(sources, streams, settings))


def rare_class_ids(
    sources: Sequence[TrainingSource],
    target_classes: Sequence[str],
    ignore_index: int,
    settings: StageSettings,
) -> list[int]:
    """Target class ids counted as rare: ``loader.rare_classes`` by name, or (empty) the classes under
    ``DEFAULT_RARE_SHARE`` of the sources' labelled pixels; ``[]`` while no knob uses them
    (``loader.rare_class_weight`` null and ``augment.rare_boost`` 1). Unknown names raise ``ValueError``.
    """
    named = class_ids("loader.rare_classes", settings.loader.rare_classes, target_classes)
    if settings.loader.rare_class_weight is None and settings.augment.rare_boost == 1.0:
        return []
    if named:
        return sorted(set(named))
    return rare_classes_auto(class_pixel_totals(sources, target_classes, ignore_index))


def _in_source_scheme(
    target_ids: Sequence[int], lookup: np.ndarray | None, n_source_classes: int
) -> list[int]:
    """The source class ids that the mask lookup takes to ``target_ids``."""
    if lookup is None:
        return list(target_ids)
    return [c for c in range(n_source_classes) if int(lookup[c]) in target_ids]


def _aux_limits(
    sources: Sequence[TrainingSource], streams: Sequence[RemappedSource], settings: StageSettings
) -> list[int | None] | None:
    """Per-epoch caps of the auxiliary streams (``aux_ratio`` x the target's patches, shared by size).

    The first source is the target: its streams are never capped.
    """
    ratio = settings.aux_ratio if isinstance(settings, PretrainSettings) else None
    target_streams = len(sources[0].splits) if sources else 0
    aux = list(streams[target_streams:])
    if ratio is None or not aux:
        return None
    budget = ratio * sum(len(s) for s in streams[:target_streams])
    total = max(sum(len(s) for s in aux), 1)
    caps: list[int | None] = [None] * target_streams
    caps += [max(1, min(len(s), round(budget * len(s) / total))) for s in aux]
    return caps


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
