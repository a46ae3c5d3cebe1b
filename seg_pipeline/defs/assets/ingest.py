"""Ingest assets: raw tiles -> header catalog -> split table -> shards.

No ``from __future__ import annotations`` here: Dagster resolves Config and resource
annotations at definition time and cannot read them as strings.

Each asset reads its config and resources, calls one library function, and returns a small
dict (paths, counts, hashes) that downstream assets use: never "the newest file on disk".
The content hash of what an asset wrote is its Dagster data version.
"""

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from seg_pipeline.data.headers import build_headers, read_catalog, write_catalog
from seg_pipeline.data.shards import ShardConfig, write_shards
from seg_pipeline.data.spec import DatasetSpec
from seg_pipeline.data.splits import (
    SplitConfig,
    assign_splits,
    read_split_table,
    split_counts,
    write_split_table,
)
from seg_pipeline.defs.metadata import table
from seg_pipeline.defs.resources import StorageResource
from seg_pipeline.io import atomic_write, file_sha256

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


class AuxDatasetConfig(dg.Config):
    """One auxiliary source (e.g. an OpenEarthMap-like set) catalogued, split and sharded like the target."""

    dataset_id: str = Field(description="Dataset name; raw tiles in <data>/raw/<dataset_id>.")
    raw_dir: str | None = Field(default=None, description="Override the raw folder.")
    class_names: list[str] = Field(default=[], description="Class names by id; empty = read classes.txt.")
    ignore_index: int = 255


class AuxiliaryConfig(dg.Config):
    """Auxiliary sources for stage-1 pretraining; empty list = target only."""

    datasets: list[AuxDatasetConfig] = Field(
        default=[{"dataset_id": "demo_aux"}],
        description="Auxiliary datasets; each keeps its own class scheme (remapped at training time).",
    )
    split_seed: int = 0
    val_fraction: float = Field(default=0.1, description="Share of labeled aux tiles held out as aux val.")
    max_quarantine_fraction: float = 0.5


def _resolve_raw(storage: StorageResource, dataset_id: str, raw_dir: str | None) -> Path:
    return Path(raw_dir).expanduser().resolve() if raw_dir else storage.raw_dir(dataset_id)


def catalogue(
    context: dg.AssetExecutionContext,
    storage: StorageResource,
    spec: DatasetSpec,
    incremental: bool,
    max_quarantine_fraction: float,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Build, write and describe the header catalog of one dataset: (value, metadata)."""
    out_dir = storage.processed_dir(spec.dataset_id)
    catalog_path = out_dir / "headers.parquet"
    result = build_headers(
        spec, previous_catalog=catalog_path if incremental else None, log_fn=context.log.info
    )
    write_catalog(result.catalog, catalog_path, result.class_names)
    quarantine = result.quarantined[["item_id", "reason"]].to_dict("records")
    quarantine_path = out_dir / "quarantine.json"
    with atomic_write(quarantine_path) as tmp:
        tmp.write_text(json.dumps(quarantine, indent=2) + "\n")
    for warning in result.warnings:
        context.log.warning(f"{spec.dataset_id}: {warning}")
    for row in quarantine:
        context.log.warning(f"{spec.dataset_id}: quarantined {row['item_id']}: {row['reason']}")
    n_tiles = len(result.catalog)
    value = {
        "dataset_id": spec.dataset_id,
        "raw_dir": str(spec.root),
        "catalog_path": str(catalog_path),
        "quarantine_path": str(quarantine_path),
        "class_names": list(result.class_names),
        "ignore_index": spec.ignore_index,
        "n_tiles": n_tiles,
        "n_ok": len(result.ok),
        "n_labeled": int(result.ok["has_label"].sum()),
        "n_quarantined": len(quarantine),
        "max_quarantine_fraction": max_quarantine_fraction,
        "content_hash": result.content_hash(),
    }
    histogram = result.class_histogram()
    total_pixels = max(sum(histogram.values()), 1)
    context.log.info(
        f"{spec.dataset_id}: catalogued {n_tiles} tiles ({result.n_read} read, {result.n_reused} unchanged) "
        f"in {result.seconds:.2f}s: {len(result.ok)} ok, {len(quarantine)} quarantined -> {catalog_path}"
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
    return value, metadata


def split(
    context: dg.AssetExecutionContext, storage: StorageResource, headers: dict[str, Any], config: SplitConfig
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Assign splits for one catalogued dataset and write the split table: (value, metadata)."""
    splits = assign_splits(read_catalog(headers["catalog_path"]), config)
    path = write_split_table(splits, storage.processed_dir(headers["dataset_id"]) / "splits.parquet")
    counts = split_counts(splits)
    context.log.info(
        f"{headers['dataset_id']}: split {len(splits)} tiles with policy {config.policy!r}: {counts}"
    )
    value = {
        "dataset_id": headers["dataset_id"],
        "splits_path": str(path),
        "counts": counts,
        "policy": config.policy,
        "seed": config.seed,
        "grouped": config.group_block_size is not None,
        "content_hash": file_sha256(path),
    }
    metadata = {
        "splits_path": dg.MetadataValue.path(str(path)),
        "split_sizes": table([{"split": k, "tiles": v} for k, v in counts.items()]),
        "policy": config.policy,
        **{f"tiles_{k}": v for k, v in counts.items()},
    }
    return value, metadata


def shard(
    context: dg.AssetExecutionContext,
    storage: StorageResource,
    headers: dict[str, Any],
    splits: dict[str, Any],
    config: ShardConfig,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write one dataset's shards and manifest: (value, metadata)."""
    dataset_dir = storage.processed_dir(headers["dataset_id"])
    start = time.perf_counter()
    manifest = write_shards(
        read_catalog(headers["catalog_path"]),
        read_split_table(splits["splits_path"]),
        dataset_dir,
        config,
        log_fn=context.log.info,
    )
    seconds = time.perf_counter() - start
    items = {name: sum(s["items"] for s in shards) for name, shards in manifest["splits"].items()}
    stats = manifest["stats"]
    context.log.info(
        f"{headers['dataset_id']}: shards in {dataset_dir}: {stats['shards_written']} written, "
        f"{stats['shards_reused']} unchanged, {sum(items.values())} tiles in {seconds:.2f}s"
    )
    value = {
        "dataset_id": headers["dataset_id"],
        "dataset_dir": str(dataset_dir),
        "manifest_path": str(dataset_dir / "manifest.json"),
        "catalog_path": headers["catalog_path"],
        "class_names": headers["class_names"],
        "ignore_index": headers["ignore_index"],
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
    return value, metadata


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
    """Catalogue and validate the raw tiles of the target dataset."""
    spec = DatasetSpec(
        dataset_id=config.dataset_id,
        root=_resolve_raw(storage, config.dataset_id, config.raw_dir),
        images_glob=config.images_glob,
        masks_glob=config.masks_glob,
        class_names=tuple(config.class_names),
        ignore_index=config.ignore_index,
        expected_bands=config.expected_bands,
    )
    value, metadata = catalogue(context, storage, spec, config.incremental, config.max_quarantine_fraction)
    return dg.Output(value, metadata=metadata, data_version=dg.DataVersion(value["content_hash"]))


def _split_config(config: SplitsConfig) -> SplitConfig:
    return SplitConfig(
        policy=config.policy,
        seed=config.seed,
        metrics_fraction=config.metrics_fraction,
        train_fraction=config.train_fraction,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        group_block_size=config.group_block_size,
    )


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
    """Assign every valid tile of the target dataset to a split."""
    value, metadata = split(context, storage, tile_headers, _split_config(config))
    return dg.Output(value, metadata=metadata, data_version=dg.DataVersion(value["content_hash"]))


def _shard_config(config: ShardsConfig) -> ShardConfig:
    return ShardConfig(
        max_items_per_shard=config.max_items_per_shard,
        max_shard_bytes=config.max_shard_bytes,
        tile_format=config.tile_format,
    )


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
    """Write the target dataset's split table as atomic, size-bounded shards."""
    value, metadata = shard(context, storage, tile_headers, dataset_splits, _shard_config(config))
    return dg.Output(value, metadata=metadata, data_version=dg.DataVersion(value["data_version"]))


@dg.asset(
    group_name=GROUP,
    code_version="1",
    kinds={"python"},
    description="Auxiliary sources for pretraining (catalog + split + shards each); "
    "class remapping happens at training time, the raw data is never modified.",
)
def auxiliary_sources(
    context: dg.AssetExecutionContext, config: AuxiliaryConfig, storage: StorageResource
) -> dg.Output[dict[str, Any]]:
    """Catalogue, split (supervised train/val) and shard every auxiliary dataset."""
    sources: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    split_config = SplitConfig(
        policy="supervised",
        seed=config.split_seed,
        train_fraction=1.0 - config.val_fraction,
        val_fraction=config.val_fraction,
        test_fraction=0.0,
    )
    for aux in config.datasets:
        spec = DatasetSpec(
            dataset_id=aux.dataset_id,
            root=_resolve_raw(storage, aux.dataset_id, aux.raw_dir),
            class_names=tuple(aux.class_names),
            ignore_index=aux.ignore_index,
        )
        headers, header_meta = catalogue(context, storage, spec, True, config.max_quarantine_fraction)
        splits, _ = split(context, storage, headers, split_config)
        shards, _ = shard(context, storage, headers, splits, ShardConfig())
        sources[aux.dataset_id] = {**shards, "headers": headers, "split_counts": splits["counts"]}
        metadata[f"{aux.dataset_id}_tiles"] = header_meta["tiles"]
        metadata[f"{aux.dataset_id}_quarantined"] = header_meta["tiles_quarantined"]
        metadata[f"{aux.dataset_id}_class_histogram"] = header_meta["class_histogram"]
    version = hashlib.sha256("".join(s["data_version"] for s in sources.values()).encode()).hexdigest()
    metadata["datasets"] = ", ".join(sources) or "none"
    return dg.Output(
        {"sources": sources, "data_version": version}, metadata=metadata, data_version=dg.DataVersion(version)
    )
