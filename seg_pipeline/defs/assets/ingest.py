"""Ingest assets: raw tiles -> header catalog -> split table -> shards.

No ``from __future__ import annotations`` here: Dagster resolves Config and resource
annotations at definition time and cannot read them as strings.

Each asset reads its config and resources, calls one library function, and returns a small
dict (paths, counts, hashes) that downstream assets use: never "the newest file on disk".
The content hash of what an asset wrote is its Dagster data version.
"""

import hashlib
import json
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from seg_pipeline.data.headers import build_headers, write_catalog
from seg_pipeline.data.raster_io import atomic_write
from seg_pipeline.data.shards import ShardConfig, write_shards
from seg_pipeline.data.spec import DatasetSpec
from seg_pipeline.data.splits import SplitConfig, assign_splits, split_counts, write_split_table
from seg_pipeline.defs.metadata import table
from seg_pipeline.defs.resources import StorageResource

GROUP = "ingest"
_SHOWN_QUARANTINE_ROWS = 50


class HeadersConfig(dg.Config):
    """Which dataset to catalogue and how to validate it."""

    dataset_id: str = Field(default="demo", description="Dataset name; raw tiles in <data>/raw/<dataset_id>.")
    raw_dir: str | None = Field(default=None, description="Override the raw folder (absolute or relative).")
    images_glob: str | None = Field(default=None, description="Glob for images relative to raw_dir.")
    masks_glob: str | None = Field(default=None, description="Glob for masks relative to raw_dir.")
    class_names: list[str] = Field(default=[], description="Class names by id; empty = read classes.txt.")
    ignore_index: int = Field(default=255, description="Mask value meaning 'not labelled'.")
    expected_bands: int | None = Field(default=None, description="Required band count (null = majority).")
    incremental: bool = Field(
        default=True, description="Reuse rows of unchanged files from the last catalog."
    )
    max_quarantine_fraction: float = Field(
        default=0.5, description="Blocking check: fail when more than this share of tiles is quarantined."
    )


class SplitsConfig(dg.Config):
    """Split policy (see seg_pipeline.data.splits)."""

    policy: str = Field(default="supervised", description="v0 | supervised | fixed")
    seed: int = Field(default=0, description="Hash salt; same seed => same split, byte for byte.")
    metrics_fraction: float = Field(default=0.25, description="v0: share of labeled tiles in metrics_train.")
    train_fraction: float = 0.7
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    group_block_size: float | None = Field(
        default=None, description="Spatial grouping block in CRS units (e.g. 256.0 metres); null = off."
    )


class ShardsConfig(dg.Config):
    """Shard size bounds and tile format."""

    max_items_per_shard: int = 256
    max_shard_bytes: int = 512 * 1024 * 1024
    tile_format: str = Field(default="tif", description="tif (GeoTIFF) or npy (fastest to load).")


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dg.asset(
    group_name=GROUP,
    code_version="1",
    kinds={"python", "parquet"},
    description="Per-tile catalog (shape, bands, dtype, CRS, transform, bounds, nodata, labels, checksums) "
    "with validation; bad tiles are quarantined with a reason.",
)
def tile_headers(
    context: dg.AssetExecutionContext, config: HeadersConfig, storage: StorageResource
) -> dg.Output[dict[str, Any]]:
    """Catalogue and validate the raw tiles of one dataset."""
    raw_dir = (
        Path(config.raw_dir).expanduser().resolve() if config.raw_dir else storage.raw_dir(config.dataset_id)
    )
    spec = DatasetSpec(
        dataset_id=config.dataset_id,
        root=raw_dir,
        images_glob=config.images_glob,
        masks_glob=config.masks_glob,
        class_names=tuple(config.class_names),
        ignore_index=config.ignore_index,
        expected_bands=config.expected_bands,
    )
    out_dir = storage.processed_dir(config.dataset_id)
    catalog_path = out_dir / "headers.parquet"
    result = build_headers(spec, previous_catalog=catalog_path if config.incremental else None)
    write_catalog(result.catalog, catalog_path, result.class_names)
    quarantine = result.quarantined[["item_id", "reason"]].to_dict("records")
    quarantine_path = out_dir / "quarantine.json"
    with atomic_write(quarantine_path) as tmp:
        tmp.write_text(json.dumps(quarantine, indent=2) + "\n")
    for warning in result.warnings:
        context.log.warning(warning)
    for row in quarantine:
        context.log.warning(f"quarantined {row['item_id']}: {row['reason']}")
    n_tiles = len(result.catalog)
    value = {
        "dataset_id": config.dataset_id,
        "raw_dir": str(raw_dir),
        "catalog_path": str(catalog_path),
        "quarantine_path": str(quarantine_path),
        "class_names": list(result.class_names),
        "ignore_index": config.ignore_index,
        "n_tiles": n_tiles,
        "n_ok": len(result.ok),
        "n_labeled": int(result.ok["has_label"].sum()),
        "n_quarantined": len(quarantine),
        "max_quarantine_fraction": config.max_quarantine_fraction,
        "content_hash": result.content_hash(),
    }
    histogram = result.class_histogram()
    total_pixels = max(sum(histogram.values()), 1)
    context.log.info(
        f"catalogued {n_tiles} tiles ({result.n_read} read, {result.n_reused} unchanged) in "
        f"{result.seconds:.2f}s: {len(result.ok)} ok, {len(quarantine)} quarantined -> {catalog_path}"
    )
    metadata = {
        "catalog_path": dg.MetadataValue.path(str(catalog_path)),
        "tiles": n_tiles,
        "tiles_ok": len(result.ok),
        "tiles_labeled": value["n_labeled"],
        "tiles_quarantined": len(quarantine),
        "tiles_read": result.n_read,
        "tiles_reused": result.n_reused,
        "files_per_second": round(result.n_read / max(result.seconds, 1e-9), 1),
        "class_histogram": table(
            [
                {"class_id": i, "class": name, "pixels": n, "share": round(n / total_pixels, 4)}
                for i, (name, n) in enumerate(histogram.items())
            ]
        ),
        "quarantine": table(quarantine[:_SHOWN_QUARANTINE_ROWS], columns=["item_id", "reason"]),
    }
    return dg.Output(value, metadata=metadata, data_version=dg.DataVersion(value["content_hash"]))


@dg.asset(
    group_name=GROUP,
    code_version="1",
    kinds={"python", "parquet"},
    description="Hash-stable split table: a tile's split depends only on "
    "(item id or spatial group, seed, policy).",
)
def dataset_splits(
    context: dg.AssetExecutionContext,
    config: SplitsConfig,
    tile_headers: dict[str, Any],
    storage: StorageResource,
) -> dg.Output[dict[str, Any]]:
    """Assign every valid tile to a split and write the split table."""
    from seg_pipeline.data.headers import read_catalog

    split_config = SplitConfig(
        policy=config.policy,
        seed=config.seed,
        metrics_fraction=config.metrics_fraction,
        train_fraction=config.train_fraction,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        group_block_size=config.group_block_size,
    )
    splits = assign_splits(read_catalog(tile_headers["catalog_path"]), split_config)
    path = write_split_table(splits, storage.processed_dir(tile_headers["dataset_id"]) / "splits.parquet")
    counts = split_counts(splits)
    context.log.info(f"split {len(splits)} tiles with policy {config.policy!r}: {counts} -> {path}")
    value = {
        "dataset_id": tile_headers["dataset_id"],
        "splits_path": str(path),
        "counts": counts,
        "policy": config.policy,
        "seed": config.seed,
        "grouped": config.group_block_size is not None,
        "content_hash": _file_hash(path),
    }
    metadata = {
        "splits_path": dg.MetadataValue.path(str(path)),
        "split_sizes": table([{"split": k, "tiles": v} for k, v in counts.items()]),
        "policy": config.policy,
        **{f"tiles_{k}": v for k, v in counts.items()},
    }
    return dg.Output(value, metadata=metadata, data_version=dg.DataVersion(value["content_hash"]))


@dg.asset(
    group_name=GROUP,
    code_version="1",
    kinds={"python"},
    description="Training-ready shards "
    "<processed>/<dataset>/<split>/shard-xxxxx/{inputs,targets,index.jsonl} "
    "plus a manifest of content hashes.",
)
def tile_shards(
    context: dg.AssetExecutionContext,
    config: ShardsConfig,
    tile_headers: dict[str, Any],
    dataset_splits: dict[str, Any],
    storage: StorageResource,
) -> dg.Output[dict[str, Any]]:
    """Write the split table's tiles as atomic, size-bounded shards."""
    import time

    from seg_pipeline.data.headers import read_catalog
    from seg_pipeline.data.splits import read_split_table

    dataset_dir = storage.processed_dir(tile_headers["dataset_id"])
    shard_config = ShardConfig(
        max_items_per_shard=config.max_items_per_shard,
        max_shard_bytes=config.max_shard_bytes,
        tile_format=config.tile_format,
    )
    start = time.perf_counter()
    manifest = write_shards(
        read_catalog(tile_headers["catalog_path"]),
        read_split_table(dataset_splits["splits_path"]),
        dataset_dir,
        shard_config,
    )
    seconds = time.perf_counter() - start
    items = {split: sum(s["items"] for s in shards) for split, shards in manifest["splits"].items()}
    stats = manifest["stats"]
    context.log.info(
        f"shards in {dataset_dir}: {stats['shards_written']} written, {stats['shards_reused']} unchanged, "
        f"{sum(items.values())} tiles in {seconds:.2f}s"
    )
    value = {
        "dataset_id": tile_headers["dataset_id"],
        "dataset_dir": str(dataset_dir),
        "manifest_path": str(dataset_dir / "manifest.json"),
        "catalog_path": tile_headers["catalog_path"],
        "class_names": tile_headers["class_names"],
        "ignore_index": tile_headers["ignore_index"],
        "items": items,
        "tile_format": config.tile_format,
        "data_version": manifest["data_version"],
    }
    metadata = {
        "dataset_dir": dg.MetadataValue.path(str(dataset_dir)),
        "shards": table(
            [
                {"shard": s["path"], "tiles": s["items"], "content_hash": s["content_hash"][:12]}
                for shards in manifest["splits"].values()
                for s in shards
            ]
        ),
        "shards_written": stats["shards_written"],
        "shards_reused": stats["shards_reused"],
        "tiles_per_second": round(sum(items.values()) / max(seconds, 1e-9), 1),
        "data_version": manifest["data_version"],
    }
    return dg.Output(value, metadata=metadata, data_version=dg.DataVersion(manifest["data_version"]))
