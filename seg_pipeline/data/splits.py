"""Deterministic, hash-stable split assignment.

A tile's split is a pure function of (its key, the seed, the policy): the key is the item id,
or its spatial group when grouping is on. Adding or removing tiles therefore never moves
another tile. The price is that split sizes follow the fractions statistically, not exactly:
no assignment can be both exact at every dataset size and stable under removal (remove the
one ``metrics_train`` tile of four and the remaining three would need one of their own).

Policies:

- ``v0`` (seed 000): labeled tiles -> 25% ``metrics_train`` (held out, for the champion's metrics),
  ``v0_train_fraction`` ``train`` and the rest ``val``; unlabeled tiles -> ``train`` (seed 000 put
  every labeled tile in metrics_train/val, which left the stages nothing to learn from).
- ``supervised``: labeled tiles -> ``train``/``val``/``test`` by fractions; unlabeled -> ``unlabeled``.
- ``fixed``: the split folder the tile came from (``train|val|test``); tiles outside one go to
  ``unassigned_split`` when it is set.

Grouping: ``group_block_size`` keeps the tiles of one grid block together, ``group_footprints``
the tiles whose ground overlaps (:mod:`~seg_pipeline.data.footprints`).

Small datasets: training needs labeled tiles in ``train`` and ``val``, and the report needs a
``test`` split apart from ``val`` (``supervised`` with three labeled groups or more). When the hash
leaves one of them empty, a group moves there from a split that keeps at least one group: the group
whose draw lies nearest the empty split's range. With fewer labeled groups than required splits the
error says how many there are and what to change.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, cast

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from seg_pipeline.data.catalog import described
from seg_pipeline.data.footprints import footprint_groups
from seg_pipeline.data.headers import STATUS_OK
from seg_pipeline.io import atomic_write
from seg_pipeline.settings.data import SplitSettings

#: The split table's columns; each field's ``description`` is shown as the asset's column schema.
SPLIT_SCHEMA = pa.schema(
    [
        described("item_id", pa.string(), "Tile id (the catalog's item_id)."),
        described("split", pa.string(), "The split the tile belongs to (train, val, test, ...)."),
        described("group", pa.string(), "Spatial group of overlapping footprints (or the item itself)."),
        described("has_label", pa.bool_(), "Whether the tile has a usable mask."),
        described("hash_u", pa.float64(), "Stable hash of (group, seed) in [0, 1) that placed the tile."),
    ]
)


class SplitError(ValueError):
    """The split cannot be made as configured; the message names the field or the tiles."""


def unit_hash(key: str, seed: int) -> float:
    """Map ``key`` to a uniform number in [0, 1) that depends only on (key, seed)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def spatial_group(row: pd.Series | dict, block_size: float | None) -> str:
    """Grid block of the tile centre (``crs:col:row``); the item id when not georeferenced."""
    if block_size is None or not row.get("georeferenced") or row.get("crs") is None:
        return str(row["item_id"])
    cx = (row["minx"] + row["maxx"]) / 2
    cy = (row["miny"] + row["maxy"]) / 2
    return f"{row['crs']}:{math.floor(cx / block_size)}:{math.floor(cy / block_size)}"


def _split_for(u: float, labeled: bool, fixed: str | None, config: SplitSettings) -> str:
    if config.policy == "fixed":
        return fixed or config.unassigned_split or ""
    if config.policy == "v0":
        if not labeled:
            return "train"
        if u < config.metrics_fraction:
            return "metrics_train"
        return "train" if u < config.metrics_fraction + config.v0_train_fraction else "val"
    if not labeled:
        return "unlabeled"
    if u < config.train_fraction:
        return "train"
    return "val" if u < config.train_fraction + config.val_fraction else "test"


def assign_splits(catalog: pd.DataFrame, config: SplitSettings) -> pd.DataFrame:
    """One row per OK tile: item id, split, spatial group, has_label and the hash draw.

    Raises:
        SplitError: no usable tiles; no labeled tile for a policy that needs them; a tile
            without a split folder under the ``fixed`` policy.
    """
    ok = catalog[catalog["status"] == STATUS_OK]
    if ok.empty:
        raise SplitError(
            "the catalog holds no valid tile (all quarantined or none found): see the quarantine list"
        )
    if config.policy in ("v0", "supervised") and not ok["has_label"].any():
        raise SplitError(
            f"policy {config.policy!r} needs labeled tiles but none of the {len(ok)} valid tiles has a mask; "
            "add masks or check the masks folder name"
        )
    records = cast(list[dict[str, Any]], ok.to_dict("records"))
    groups = {str(row["item_id"]): spatial_group(row, config.group_block_size) for row in records}
    if config.group_footprints:
        groups = footprint_groups(records, groups)
    rows = []
    for row in records:
        group = groups[str(row["item_id"])]
        u = unit_hash(group, config.seed)
        fixed = row.get("fixed_split") if isinstance(row.get("fixed_split"), str) else None
        split = _split_for(u, bool(row["has_label"]), fixed, config)
        if not split:
            raise SplitError(
                f"policy 'fixed' but tile {row['item_id']} ({row['image_path']}) is not under a "
                "train/val/test folder; move it, set unassigned_split (e.g. train) or use policy 'supervised'"
            )
        rows.append(
            {
                "item_id": row["item_id"],
                "split": split,
                "group": group,
                "has_label": bool(row["has_label"]),
                "hash_u": u,
            }
        )
    table = pd.DataFrame(rows, columns=SPLIT_SCHEMA.names).sort_values("item_id").reset_index(drop=True)
    if config.policy != "fixed":
        table = ensure_training_splits(table, config)
    return table


#: The splits the stages cannot run without: ``train`` to learn from and ``val`` to pick a checkpoint.
REQUIRED_SPLITS = ("train", "val")


def ensure_training_splits(table: pd.DataFrame, config: SplitSettings) -> pd.DataFrame:
    """Give ``train`` and ``val`` labeled tiles on small datasets, moving whole groups (see module doc);
    with ``supervised`` and a ``test_fraction`` also ``test`` once there are three labeled groups, so
    the report never scores on the split that picked the checkpoint.

    Raises:
        SplitError: fewer labeled groups than required splits; the message says what to change.
    """
    table = table.copy()
    labeled = table[table["has_label"]]
    n_groups = labeled["group"].nunique()
    required = list(REQUIRED_SPLITS)
    if config.policy == "supervised" and config.test_fraction > 0 and n_groups >= 3:
        required.append("test")
    for split in required:
        if (labeled["split"] == split).any():
            continue
        per_split = labeled.groupby("split")["group"].nunique()
        # A required split gives a group only when it keeps one; others (metrics_train) always can.
        donors = [str(s) for s, n in per_split.items() if n >= (2 if s in required else 1)]
        if not donors or n_groups < len(REQUIRED_SPLITS):
            raise SplitError(
                f"split {split!r} gets no labeled tile: {len(labeled)} labeled tiles in {n_groups} "
                f"group(s) ({dict(per_split)}) under policy {config.policy!r}; training needs "
                f"{list(REQUIRED_SPLITS)}. "
                "Add labeled tiles, turn spatial grouping off, or use policy 'fixed' with your own folders"
            )
        candidates = labeled[labeled["split"].isin(donors)].groupby("group")["hash_u"].first()
        target = 0.0 if split == "train" else 1.0  # train draws are the lowest, val/test above
        moved = (candidates - target).abs().idxmin()
        table.loc[table["group"] == moved, "split"] = split
        labeled = table[table["has_label"]]
    return table


def leaking_groups(table: pd.DataFrame) -> list[str]:
    """Spatial groups whose *labeled* tiles sit in more than one split (spatial leakage).

    Unlabeled tiles are left out: they never reach a metric, so they cannot leak into one.
    """
    labeled = table[table["has_label"]]
    per_group = labeled.groupby("group")["split"].nunique()
    return sorted(per_group[per_group > 1].index.astype(str))


def duplicated_items(table: pd.DataFrame) -> list[str]:
    """Item ids that appear in more than one row (an item in two splits)."""
    return sorted(table.loc[table["item_id"].duplicated(), "item_id"].astype(str).unique())


def split_counts(table: pd.DataFrame) -> dict[str, int]:
    """Tiles per split, sorted by split name."""
    return {str(k): int(v) for k, v in table["split"].value_counts().sort_index().items()}


def write_split_table(table: pd.DataFrame, path: Path | str) -> Path:
    """Write the split table as parquet, atomically; same input gives the same bytes."""
    path = Path(path)
    with atomic_write(path) as tmp:
        pq.write_table(pa.Table.from_pandas(table, schema=SPLIT_SCHEMA, preserve_index=False), tmp)
    return path


def read_split_table(path: Path | str) -> pd.DataFrame:
    """Load a split table written by :func:`write_split_table`."""
    return pq.read_table(path).to_pandas()
