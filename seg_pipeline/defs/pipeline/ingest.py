"""Ingest assets: raw tiles -> header catalog -> split table -> shards; the auxiliary sources; their checks.

No ``from __future__ import annotations``: Dagster reads Config and resource annotations at runtime.
Each asset reads its config and resources, calls one library function (``seg_pipeline.workflows.ingest``)
and returns its typed value plus metadata. The content hash of what it wrote is its data version.
"""

from typing import TYPE_CHECKING, Any

import dagster as dg

from seg_pipeline.contracts import AuxiliarySet, Catalog, ShardSet, SplitTable
from seg_pipeline.data.catalog import CATALOG_SCHEMA
from seg_pipeline.data.splits import SPLIT_SCHEMA
from seg_pipeline.defs.config import dagster_config, to_settings
from seg_pipeline.defs.metadata import column_schema, picture, table, without_none
from seg_pipeline.defs.ownership import owners, stage_tags
from seg_pipeline.defs.partitions import (
    DATA_VERSION_TAG,
    DATASET_PARTITIONS,
    DATASETS,
    dataset_of,
)
from seg_pipeline.defs.resources import StorageResource
from seg_pipeline.defs.versions import code_version
from seg_pipeline.settings import AuxiliarySettings, DatasetSettings, ShardSettings, SplitSettings

GROUP = "ingest"
_SHOWN_QUARANTINE_ROWS = 50

# For the type checker the derived classes are plain dg.Config (fields are reached via to_settings).
if TYPE_CHECKING:
    from seg_pipeline.workflows import ingest

    HeadersConfig = dg.Config
    SplitsConfig = dg.Config
    ShardsConfig = dg.Config
    AuxiliaryConfig = dg.Config
else:
    HeadersConfig = dagster_config(DatasetSettings, name="HeadersConfig")
    SplitsConfig = dagster_config(SplitSettings, name="SplitsConfig")
    ShardsConfig = dagster_config(ShardSettings, name="ShardsConfig")
    AuxiliaryConfig = dagster_config(AuxiliarySettings, name="AuxiliaryConfig")


def _catalog_metadata(run: "ingest.CatalogueRun") -> dict[str, Any]:
    catalog, result = run.catalog, run.result
    histogram = result.class_histogram()
    total = max(sum(histogram.values()), 1)
    return {
        "catalog_path": dg.MetadataValue.path(catalog.catalog_path),
        "dagster/column_schema": column_schema(CATALOG_SCHEMA),
        "tiles": catalog.n_tiles,
        "tiles_ok": catalog.n_ok,
        "tiles_labeled": catalog.n_labeled,
        "tiles_quarantined": catalog.n_quarantined,
        "tiles_read": result.n_read,
        "tiles_reused": result.n_reused,
        "files_per_second": round(result.n_read / max(result.seconds, 1e-9), 1),
        "class_histogram": table(
            [
                {"class_id": i, "class": name, "pixels": n, "share": n / total}
                for i, (name, n) in enumerate(histogram.items())
            ]
        ),
        "quarantine": table(run.quarantine[:_SHOWN_QUARANTINE_ROWS], columns=["item_id", "reason"]),
        # The recoding every mask went through (given or detected): lineage shows what a class id means.
        "mask_values": dg.MetadataValue.json({str(k): v for k, v in catalog.mask_values.items()}),
        "warnings": dg.MetadataValue.md("\n".join(f"- {w}" for w in catalog.warnings) or "none"),
    }


@dg.observable_source_asset(
    group_name=GROUP,
    tags=stage_tags(GROUP),  # Dagster 1.13 takes no owners on an observable source asset
    partitions_def=DATASETS,
    description="The raw tile folders under data/raw, one partition per dataset. Each partition's data "
    "version is a fingerprint of its rasters' paths, sizes and mtimes, so new or changed tiles show that "
    "dataset's ingest assets as unsynced.",
)
def raw_tiles(context: dg.OpExecutionContext, storage: StorageResource) -> dg.DataVersionsByPartition:
    """Fingerprint each dataset folder without opening a raster (what the sensor compares too)."""
    from seg_pipeline.workflows import ingest

    registered = set(context.instance.get_dynamic_partitions(DATASET_PARTITIONS))
    for dataset in ingest.observe_raw(storage.layout).datasets:
        if dataset.dataset_id not in registered:  # a folder nobody ran yet (or an auxiliary source)
            continue
        # One observation per partition, holding its data version and what was counted (what
        # returning DataVersionsByPartition would log, plus the metadata it cannot carry).
        context.log_event(
            dg.AssetObservation(
                asset_key=dg.AssetKey("raw_tiles"),
                partition=dataset.dataset_id,
                tags={DATA_VERSION_TAG: dataset.fingerprint},
                metadata={"files": dataset.n_files, "masks": dataset.n_masks},
            )
        )
    return dg.DataVersionsByPartition({})


@dg.asset(
    group_name=GROUP,
    owners=owners(),
    tags=stage_tags(GROUP),
    partitions_def=DATASETS,
    deps=[raw_tiles],
    code_version=code_version("seg_pipeline.workflows.ingest"),
    kinds={"python", "parquet"},
    description="Per-tile catalog (shape, bands, dtype, CRS, transform, bounds, nodata, labels, checksums) "
    "with validation; bad tiles are quarantined with a reason.",
)
def tile_headers(
    context: dg.AssetExecutionContext, config: HeadersConfig, storage: StorageResource
) -> dg.Output[Catalog]:
    """Catalogue and validate the raw tiles of the target dataset."""
    from seg_pipeline.workflows import ingest

    settings = to_settings(config, DatasetSettings, "tile_headers", dataset_id=dataset_of(context))
    run = ingest.catalogue(settings, storage.layout, context.log.info)
    for warning in run.catalog.warnings:
        context.log.warning(f"{run.catalog.dataset_id}: {warning}")
    for row in run.quarantine:
        context.log.warning(f"{run.catalog.dataset_id}: quarantined {row['item_id']}: {row['reason']}")
    return dg.Output(
        run.catalog, metadata=_catalog_metadata(run), data_version=dg.DataVersion(run.catalog.content_hash)
    )


@dg.asset(
    group_name=GROUP,
    owners=owners(),
    tags=stage_tags(GROUP),
    partitions_def=DATASETS,
    code_version=code_version("seg_pipeline.workflows.ingest"),
    kinds={"python", "parquet"},
    description="Hash-stable split table: a tile's split depends only on (item id or spatial group, seed, "
    "policy).",
)
def dataset_splits(
    context: dg.AssetExecutionContext, config: SplitsConfig, tile_headers: Catalog
) -> dg.Output[SplitTable]:
    """Assign every valid tile of the target dataset to a split."""
    from seg_pipeline.workflows import ingest

    splits = ingest.split(
        to_settings(config, SplitSettings, "dataset_splits"), tile_headers, context.log.info
    )
    metadata: dict[str, Any] = {
        "splits_path": dg.MetadataValue.path(splits.splits_path),
        "dagster/column_schema": column_schema(SPLIT_SCHEMA),
        "split_sizes": table([{"split": k, "tiles": v} for k, v in splits.counts.items()]),
        "policy": splits.policy,
        **{f"tiles_{k}": v for k, v in splits.counts.items()},
        **{name: picture(png) for name, png in splits.pictures.items()},
    }
    return dg.Output(
        splits, metadata=without_none(metadata), data_version=dg.DataVersion(splits.content_hash)
    )


def _shard_metadata(run: "ingest.ShardRun") -> dict[str, Any]:
    return {
        "dataset_dir": dg.MetadataValue.path(run.shards.dataset_dir),
        "shards": table(run.shard_table),
        "shards_written": run.written,
        "shards_reused": run.reused,
        "tiles_per_second": round(sum(run.shards.items.values()) / max(run.seconds, 1e-9), 1),
        "data_version": run.shards.data_version,
    }


@dg.asset(
    group_name=GROUP,
    owners=owners(),
    tags=stage_tags(GROUP),
    partitions_def=DATASETS,
    code_version=code_version("seg_pipeline.workflows.ingest"),
    kinds={"python"},
    description="Training-ready shards (processed/DATASET/SPLIT/shard-xxxxx holding inputs/, targets/ and "
    "index.jsonl) plus a manifest of content hashes.",
)
def tile_shards(
    context: dg.AssetExecutionContext, config: ShardsConfig, tile_headers: Catalog, dataset_splits: SplitTable
) -> dg.Output[ShardSet]:
    """Write the target dataset's split table as atomic, size-bounded shards."""
    from seg_pipeline.workflows import ingest

    settings = to_settings(config, ShardSettings, "tile_shards")
    run = ingest.shard(settings, tile_headers, dataset_splits, context.log.info)
    return dg.Output(
        run.shards, metadata=_shard_metadata(run), data_version=dg.DataVersion(run.shards.data_version)
    )


def _source_row(shards: ShardSet) -> dict[str, Any]:
    catalog = shards.catalog
    return {
        "dataset": shards.dataset_id,
        "tiles": catalog.n_tiles,
        "quarantined": catalog.n_quarantined,
        "classes": ", ".join(catalog.class_names),
        **{f"tiles_{k}": v for k, v in shards.items.items()},
    }


@dg.asset(
    group_name=GROUP,
    owners=owners(),
    tags=stage_tags(GROUP),
    partitions_def=DATASETS,
    code_version=code_version("seg_pipeline.workflows.ingest"),
    kinds={"python"},
    description="Auxiliary sources for pretraining (catalog + split + shards each); class remapping "
    "happens at training time, the raw data is never modified.",
)
def auxiliary_sources(
    context: dg.AssetExecutionContext, config: AuxiliaryConfig, storage: StorageResource
) -> dg.Output[AuxiliarySet]:
    """Catalogue, split (train/val) and shard every auxiliary dataset."""
    from seg_pipeline.workflows import ingest

    settings = to_settings(config, AuxiliarySettings, "auxiliary_sources")
    value = ingest.ingest_auxiliary(settings, storage.layout, context.log.info)
    metadata = {
        "datasets": ", ".join(s.dataset_id for s in value.sources) or "none",
        "sources": table([_source_row(s) for s in value.sources]),
    }
    return dg.Output(value, metadata=without_none(metadata), data_version=dg.DataVersion(value.data_version))


@dg.asset_check(
    partitions_def=DATASETS,
    asset=tile_headers,
    blocking=True,
    description="Quarantined share stays below the threshold.",
)
def quarantine_below_threshold(tile_headers: Catalog) -> dg.AssetCheckResult:
    """Fail when too many tiles are quarantined (usually a wrong folder, band count or class list)."""
    share = tile_headers.n_quarantined / max(tile_headers.n_tiles, 1)
    limit = tile_headers.quarantine_limit
    return dg.AssetCheckResult(
        passed=share <= limit and tile_headers.n_ok > 0,
        metadata={"quarantined_share": round(share, 4), "limit": limit, "tiles_ok": tile_headers.n_ok},
        description=None if share <= limit else f"see {tile_headers.quarantine_path} for the reasons",
    )


@dg.asset_check(
    partitions_def=DATASETS,
    asset=dataset_splits,
    blocking=True,
    description="No item and no spatial group in two splits.",
)
def splits_leakage_free(dataset_splits: SplitTable) -> dg.AssetCheckResult:
    """An item (or, with grouping, a spatial block of labeled tiles) must sit in exactly one split."""
    from seg_pipeline.workflows import ingest

    duplicates, leaks = ingest.split_leaks(dataset_splits)
    return dg.AssetCheckResult(
        passed=not duplicates and not leaks,
        metadata={
            "items_in_two_splits": len(duplicates),
            "groups_in_two_splits": len(leaks),
            "examples": ", ".join((duplicates + leaks)[:10]) or "none",
        },
    )


@dg.asset_check(
    partitions_def=DATASETS,
    asset=tile_shards,
    blocking=True,
    description="Shards hold exactly the split table's tiles, with the catalog's checksums.",
)
def shards_match_headers(tile_shards: ShardSet) -> dg.AssetCheckResult:
    """Every assigned tile appears once, in its split, with the checksum the catalog recorded."""
    from seg_pipeline.workflows import ingest

    problems, seen = ingest.shard_problems(tile_shards)
    return dg.AssetCheckResult(
        passed=not problems,
        metadata={
            "tiles_in_shards": seen,
            "tiles_ok_in_catalog": tile_shards.catalog.n_ok,
            "problems": len(problems),
            "examples": "; ".join(problems[:10]) or "none",
        },
    )


@dg.asset_check(
    partitions_def=DATASETS,
    asset=auxiliary_sources,
    blocking=True,
    description="Each auxiliary source keeps its quarantine share low.",
)
def auxiliary_quarantine_below_threshold(auxiliary_sources: AuxiliarySet) -> dg.AssetCheckResult:
    """The same gate as the target's, per auxiliary dataset."""
    shares = {
        s.dataset_id: s.catalog.n_quarantined / max(s.catalog.n_tiles, 1) for s in auxiliary_sources.sources
    }
    failing = [
        s.dataset_id for s in auxiliary_sources.sources if shares[s.dataset_id] > s.catalog.quarantine_limit
    ]
    return dg.AssetCheckResult(
        passed=not failing,
        metadata={
            "quarantined_share": ", ".join(f"{k}={v:.3f}" for k, v in shares.items()) or "no sources",
            "failing": ", ".join(failing) or "none",
        },
    )
