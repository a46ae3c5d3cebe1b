"""Class-imbalance tools on the data side (F8 in docs/architecture.md, seed 003 ``--weighted-sampling``).

The header catalog holds per-tile pixel counts per class, so imbalance is handled without
reading a single pixel: :func:`class_pixel_counts` feeds inverse-frequency loss weights
(``seg_pipeline.training.losses``), and :func:`rare_class_sample_weights` oversamples tiles
that contain rare classes (seed 003: fire tiles get ``--fire-weight 5.0``) through torch's
``WeightedRandomSampler``.

Training streams patches, so the stage's knob (``loader.rare_class_weight``, with
``loader.rare_classes`` naming the rare classes or, empty, :func:`rare_classes_auto`) uses
:class:`WeightedPatchDataset` instead of a sampler: each epoch, every DataLoader worker (of every
rank) draws as many patches as it would read unweighted from its own tiles, with replacement, a
tile's chance proportional to its patch count times its weight (``rare_class_weight`` for a tile
whose catalog counts hold a rare class, else 1). The draw is seeded by ``(seed, epoch, rank,
worker)``, so an epoch repeats exactly and the next one draws again; a tile drawn more often than
it has patches gets further patch numbers, i.e. other windows and other augmentation, never a
copy. The epoch length is unchanged: rare tiles are seen more often, the others less.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
from torch.utils.data import WeightedRandomSampler, get_worker_info

from seg_pipeline.data.augment import derive_seed
from seg_pipeline.data.catalog import ok_rows
from seg_pipeline.data.partition import _distributed_position
from seg_pipeline.data.shard_datasets import ShardIterableDataset
from seg_pipeline.data.shards import ShardRow

#: ``auto`` calls a class rare when it holds less than this share of labelled pixels.
DEFAULT_RARE_SHARE = 0.05


def _counts(value: Any) -> np.ndarray:
    # cast: np.isscalar narrows to generic | memoryview, which pandas-stubs' isna does not list (takes both)
    if value is None or (np.isscalar(value) and pd.isna(cast(Any, value))):
        return np.zeros(0, dtype=np.int64)
    return np.asarray(value, dtype=np.int64)


def class_pixel_counts(
    catalog: pd.DataFrame, item_ids: Iterable[str] | None = None, num_classes: int | None = None
) -> np.ndarray:
    """Labelled pixels per class summed over OK tiles (``ignore_index`` pixels are not counted).

    Args:
        catalog: Header catalog.
        item_ids: Restrict to these tiles (e.g. the training split).
        num_classes: Length of the result (default: the longest ``class_counts`` list).
    """
    rows = ok_rows(catalog, item_ids)
    per_tile = [_counts(v) for v in rows["class_counts"]]
    length = num_classes if num_classes is not None else max((len(c) for c in per_tile), default=0)
    totals = np.zeros(length, dtype=np.int64)
    for counts in per_tile:
        n = min(len(counts), length)
        totals[:n] += counts[:n]
    return totals


def rare_classes_auto(counts: Sequence[int] | np.ndarray, max_share: float = DEFAULT_RARE_SHARE) -> list[int]:
    """Classes present in the data whose share of labelled pixels is below ``max_share``."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return []
    share = counts / total
    return [int(c) for c in np.nonzero((counts > 0) & (share < max_share))[0]]


def rare_class_sample_weights(
    catalog_rows: pd.DataFrame,
    rare_classes: Sequence[int] | str = "auto",
    boost: float = 5.0,
    *,
    min_pixels: int = 1,
    max_share: float = DEFAULT_RARE_SHARE,
) -> torch.Tensor:
    """Per-tile sampling weights: ``boost`` for tiles holding a rare class, 1 otherwise.

    Args:
        catalog_rows: Catalog rows in the order of the dataset being sampled.
        rare_classes: Class ids, or ``auto`` (classes below ``max_share`` of the pixels of these rows).
        boost: Weight of a tile containing at least ``min_pixels`` of a rare class (seed 003: 5.0).
        min_pixels: Pixels of a rare class a tile needs to count as containing it.
        max_share: Threshold of ``auto``.

    Returns:
        A float64 tensor of one weight per row (unlabeled tiles weigh 1).
    """
    if boost <= 0:
        raise ValueError(f"boost={boost}: must be > 0 (1 disables oversampling)")
    if min_pixels < 1:
        raise ValueError(f"min_pixels={min_pixels}: must be >= 1")
    per_tile = [_counts(v) for v in catalog_rows["class_counts"]]
    if isinstance(rare_classes, str):
        if rare_classes != "auto":
            raise ValueError(f"rare_classes={rare_classes!r}: give class ids or 'auto'")
        length = max((len(c) for c in per_tile), default=0)
        totals = np.zeros(length, dtype=np.int64)
        for counts in per_tile:
            totals[: len(counts)] += counts
        rare = rare_classes_auto(totals, max_share)
    else:
        rare = [int(c) for c in rare_classes]
        if any(c < 0 for c in rare):
            raise ValueError(f"rare_classes={list(rare_classes)}: class ids must be >= 0")
    weights = torch.ones(len(per_tile), dtype=torch.float64)
    for i, counts in enumerate(per_tile):
        if any(c < len(counts) and counts[c] >= min_pixels for c in rare):
            weights[i] = boost
    return weights


def rows_for_items(catalog: pd.DataFrame, item_ids: Sequence[str]) -> pd.DataFrame:
    """Catalog rows in the order of ``item_ids`` (e.g. ``ShardMapDataset.item_ids``)."""
    indexed = catalog.drop_duplicates("item_id").set_index("item_id", drop=False)
    missing = [i for i in item_ids if i not in indexed.index]
    if missing:
        raise ValueError(f"item_ids: {len(missing)} ids are not in the catalog (first: {missing[:3]})")
    return indexed.loc[list(item_ids)].reset_index(drop=True)


def rare_class_sampler(
    dataset: Any,
    catalog: pd.DataFrame,
    rare_classes: Sequence[int] | str = "auto",
    boost: float = 5.0,
    *,
    num_samples: int | None = None,
    replacement: bool = True,
    seed: int = 0,
    min_pixels: int = 1,
) -> WeightedRandomSampler:
    """A ``WeightedRandomSampler`` over a :class:`~seg_pipeline.data.datasets.ShardMapDataset`.

    Args:
        dataset: Anything with ``item_ids`` in index order (``ShardMapDataset``).
        catalog: The header catalog the shards were built from.
        rare_classes: Class ids or ``auto``.
        boost: Weight of tiles with a rare class.
        num_samples: Draws per epoch (default ``len(dataset)``).
        replacement: Draw with replacement (needed for oversampling beyond one copy).
        seed: Seed of the sampler's own generator.
        min_pixels: See :func:`rare_class_sample_weights`.
    """
    item_ids = list(dataset.item_ids)
    weights = rare_class_sample_weights(
        rows_for_items(catalog, item_ids), rare_classes, boost, min_pixels=min_pixels
    )
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(
        cast(Sequence[float], weights),  # torch's stub says Sequence[float]; it takes a tensor (as_tensor)
        num_samples if num_samples is not None else len(item_ids),
        replacement=replacement,
        generator=generator,
    )


def rare_tile_weights(
    catalog: pd.DataFrame, item_ids: Sequence[str], rare_classes: Sequence[int], boost: float
) -> dict[str, float]:
    """``{item_id: weight}`` for :class:`WeightedPatchDataset`: ``boost`` where a tile holds a rare class.

    ``rare_classes`` are class ids of the catalog's own scheme (its ``class_counts``).
    """
    rows = rows_for_items(catalog, item_ids)
    weights = rare_class_sample_weights(rows, list(rare_classes), boost)
    return dict(zip(rows["item_id"].tolist(), weights.tolist(), strict=True))


class WeightedPatchDataset(ShardIterableDataset):
    """A :class:`~seg_pipeline.data.shard_datasets.ShardIterableDataset` in patch mode whose epochs draw
    their patches by tile weight (the module docstring says how), for ``loader.rare_class_weight``.

    Args:
        dataset_dir: As :class:`ShardIterableDataset`.
        split: As :class:`ShardIterableDataset`.
        tile_weights: ``{item_id: weight > 0}``; tiles not listed weigh 1.
        **kwargs: As :class:`ShardIterableDataset`; ``patch_size`` is required.
    """

    def __init__(
        self, dataset_dir: Path | str, split: str, *, tile_weights: Mapping[str, float], **kwargs: Any
    ) -> None:
        super().__init__(dataset_dir, split, **kwargs)
        if self.patch_size is None:
            raise ValueError("WeightedPatchDataset draws patches: give patch_size (patch mode)")
        bad = {item: w for item, w in tile_weights.items() if not w > 0}
        if bad:
            raise ValueError(f"tile_weights must be > 0; got {dict(list(bad.items())[:3])}")
        self.tile_weights = {str(item): float(w) for item, w in tile_weights.items()}

    def _units(self, rows: list[ShardRow], epoch: int) -> list[tuple[ShardRow, int]]:
        """This reader's patches of ``epoch``: as many as unweighted, drawn by weight with replacement."""
        patches = np.array([self._patches(row) for row in rows], dtype=np.float64)
        total = int(patches.sum())
        if total == 0:
            return []
        weights = patches * np.array([self.tile_weights.get(row.item_id, 1.0) for row in rows])
        info = get_worker_info()
        rank, world_size = _distributed_position(self._position)
        worker = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = np.random.default_rng(
            derive_seed("weighted-patches", self.seed, epoch, rank, world_size, *worker)
        )
        draws = rng.multinomial(total, weights / weights.sum()).tolist()
        units = [(row, k) for row, n in zip(rows, draws, strict=True) for k in range(n)]
        if self.shuffle:
            random.Random(derive_seed("patch-order", self.seed, epoch)).shuffle(units)
        return units
