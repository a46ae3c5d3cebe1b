"""Blocking asset checks: quality gates that stop downstream assets when the data is wrong."""

from collections import Counter
from pathlib import Path
from typing import Any

import dagster as dg

from seg_pipeline.data.headers import STATUS_OK, read_catalog
from seg_pipeline.data.shards import read_shard_index, shard_dirs
from seg_pipeline.data.splits import duplicated_items, leaking_groups, read_split_table
from seg_pipeline.defs.assets.ingest import auxiliary_sources, dataset_splits, tile_headers, tile_shards


@dg.asset_check(asset=tile_headers, blocking=True, description="Quarantined share stays below the threshold.")
def quarantine_below_threshold(tile_headers: dict[str, Any]) -> dg.AssetCheckResult:
    """Fail when too many tiles are quarantined (usually a wrong folder, band count or class list)."""
    share = tile_headers["n_quarantined"] / max(tile_headers["n_tiles"], 1)
    limit = tile_headers["max_quarantine_fraction"]
    return dg.AssetCheckResult(
        passed=share <= limit and tile_headers["n_ok"] > 0,
        metadata={"quarantined_share": round(share, 4), "limit": limit, "tiles_ok": tile_headers["n_ok"]},
        description=None if share <= limit else f"see {tile_headers['quarantine_path']} for the reasons",
    )


@dg.asset_check(
    asset=dataset_splits, blocking=True, description="No item and no spatial group in two splits."
)
def splits_leakage_free(dataset_splits: dict[str, Any]) -> dg.AssetCheckResult:
    """An item (or, with grouping, a spatial block of labeled tiles) must sit in exactly one split."""
    splits = read_split_table(dataset_splits["splits_path"])
    duplicates = duplicated_items(splits)
    leaks = leaking_groups(splits) if dataset_splits["grouped"] else []
    return dg.AssetCheckResult(
        passed=not duplicates and not leaks,
        metadata={
            "items_in_two_splits": len(duplicates),
            "groups_in_two_splits": len(leaks),
            "examples": ", ".join((duplicates + leaks)[:10]) or "none",
        },
    )


@dg.asset_check(
    asset=tile_shards,
    blocking=True,
    additional_ins={"dataset_splits": dg.AssetIn("dataset_splits")},
    description="Shards hold exactly the split table's tiles, with the catalog's checksums.",
)
def shards_match_headers(tile_shards: dict[str, Any], dataset_splits: dict[str, Any]) -> dg.AssetCheckResult:
    """Every assigned tile appears once, in its split, with the checksum the catalog recorded."""
    catalog = read_catalog(tile_shards["catalog_path"])
    checksums = dict(zip(catalog["item_id"], catalog["image_sha256"], strict=True))
    expected = dict(
        zip(*[read_split_table(dataset_splits["splits_path"])[c] for c in ("item_id", "split")], strict=True)
    )
    seen: Counter[str] = Counter()
    problems: list[str] = []
    dataset_dir = Path(tile_shards["dataset_dir"])
    for split in sorted(set(expected.values())):
        for shard in shard_dirs(dataset_dir, split):
            for row in read_shard_index(shard):
                seen[row.item_id] += 1
                if expected.get(row.item_id) != split:
                    problems.append(f"{row.item_id} in {split}, expected {expected.get(row.item_id)}")
                if row.extra.get("image_sha256") != checksums.get(row.item_id):
                    problems.append(f"{row.item_id}: checksum differs from the catalog")
    problems += [f"{item} missing from shards" for item in expected if seen[item] == 0]
    problems += [f"{item} in {n} shards" for item, n in seen.items() if n > 1]
    ok_tiles = int((catalog["status"] == STATUS_OK).sum())
    return dg.AssetCheckResult(
        passed=not problems,
        metadata={
            "tiles_in_shards": sum(seen.values()),
            "tiles_ok_in_catalog": ok_tiles,
            "problems": len(problems),
            "examples": "; ".join(problems[:10]) or "none",
        },
    )


@dg.asset_check(
    asset=auxiliary_sources,
    blocking=True,
    description="Each auxiliary source keeps its quarantine share low.",
)
def auxiliary_quarantine_below_threshold(auxiliary_sources: dict[str, Any]) -> dg.AssetCheckResult:
    """The same gate as the target's, per auxiliary dataset."""
    shares = {
        name: src["headers"]["n_quarantined"] / max(src["headers"]["n_tiles"], 1)
        for name, src in auxiliary_sources["sources"].items()
    }
    limits = {
        name: src["headers"]["max_quarantine_fraction"] for name, src in auxiliary_sources["sources"].items()
    }
    failing = [name for name, share in shares.items() if share > limits[name]]
    return dg.AssetCheckResult(
        passed=not failing,
        metadata={
            "quarantined_share": ", ".join(f"{k}={v:.3f}" for k, v in shares.items()) or "no sources",
            "failing": ", ".join(failing) or "none",
        },
    )


INGEST_CHECKS = [
    quarantine_below_threshold,
    splits_leakage_free,
    shards_match_headers,
    auxiliary_quarantine_below_threshold,
]
