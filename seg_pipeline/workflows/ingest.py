"""Ingest as library calls: catalogue a dataset, split it, shard it; auxiliary sources the same way.

Each function reads settings and upstream contracts, calls the data layer, writes its files under
the dataset's processed folder and returns the contract the next step needs.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from seg_pipeline.contracts import AuxiliarySet, BandStatistics, Catalog, ShardSet, SplitTable
from seg_pipeline.contracts.data import class_ids
from seg_pipeline.data.figures import plot_class_shares, plot_split_footprints
from seg_pipeline.data.headers import (
    STATUS_OK,
    HeaderResult,
    build_headers,
    read_catalog,
    read_catalog_class_names,
    read_catalog_settings,
    write_catalog,
)
from seg_pipeline.data.normalization import band_stats_from_catalog
from seg_pipeline.data.shards import read_manifest, read_shard_index, shard_dirs, write_shards
from seg_pipeline.data.spec import DatasetSpec, read_classes
from seg_pipeline.data.splits import (
    assign_splits,
    duplicated_items,
    leaking_groups,
    read_split_table,
    split_counts,
    write_split_table,
)
from seg_pipeline.data.watch import snapshot
from seg_pipeline.inference.palette import class_palette, stored_palette
from seg_pipeline.io import file_sha256, folder_lock, write_json
from seg_pipeline.progress import default_log_fn
from seg_pipeline.settings import AuxiliarySettings, DatasetSettings, ShardSettings, SplitSettings
from seg_pipeline.workflows.layout import DataLayout

LogFn = Callable[[str], None]


@dataclass(frozen=True)
class CatalogueRun:
    """A catalogue step's contract plus what the build did (for logs and metadata)."""

    catalog: Catalog
    result: HeaderResult
    quarantine: list[dict[str, str]]


def _normalization(result: HeaderResult) -> BandStatistics | None:
    try:
        stats = band_stats_from_catalog(result.ok)
    except ValueError:  # no valid tile: the quarantine check reports it
        return None
    return BandStatistics(mean=list(stats.mean), std=list(stats.std))


@dataclass(frozen=True)
class RawDataset:
    """One raw dataset folder as the watcher sees it."""

    dataset_id: str
    fingerprint: str
    n_files: int
    n_masks: int


@dataclass(frozen=True)
class RawObservation:
    """Every raw dataset folder, and one fingerprint over all of them."""

    fingerprint: str
    datasets: list[RawDataset]


def observe_raw(layout: DataLayout) -> RawObservation:
    """Fingerprint every dataset folder under the raw root (paths, sizes, mtimes; nothing is opened)."""
    root = layout.raw_root
    folders = (
        sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if root.is_dir()
        else []
    )
    datasets = []
    for folder in folders:
        snap = snapshot(folder)
        datasets.append(RawDataset(folder.name, snap.fingerprint, snap.n_files, snap.n_masks))
    digest = hashlib.sha256("".join(f"{d.dataset_id}:{d.fingerprint}\n" for d in datasets).encode())
    return RawObservation(digest.hexdigest(), datasets)


def catalogue(settings: DatasetSettings, layout: DataLayout, log_fn: LogFn | None = None) -> CatalogueRun:
    """Build, validate and write the header catalog and quarantine list of one dataset."""
    log = log_fn or default_log_fn()
    spec = DatasetSpec.from_settings(settings, layout.raw_dir(settings.dataset_id, settings.raw_dir))
    out_dir = layout.processed_dir(settings.dataset_id)
    catalog_path = out_dir / "headers.parquet"
    with folder_lock(out_dir, f"{settings.dataset_id} headers", log):
        result = build_headers(
            spec, previous_catalog=catalog_path if settings.incremental else None, log_fn=log
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        write_catalog(
            result.catalog, catalog_path, result.class_names, settings.model_dump(), result.mask_values
        )
    quarantine = [
        {"item_id": str(row["item_id"]), "reason": str(row["reason"])}
        for row in result.quarantined[["item_id", "reason"]].to_dict("records")
    ]
    quarantine_path = write_json(out_dir / "quarantine.json", quarantine)
    catalog = _catalog_contract(settings, spec.root, catalog_path, quarantine_path, result, quarantine)
    log(
        f"{settings.dataset_id}: catalogued {catalog.n_tiles} tiles ({result.n_read} read, {result.n_reused} "
        f"unchanged) in {result.seconds:.2f}s: {catalog.n_ok} ok, {catalog.n_quarantined} quarantined "
        f"-> {catalog_path}"
    )
    return CatalogueRun(catalog=catalog, result=result, quarantine=quarantine)


def _catalog_contract(
    settings: DatasetSettings, root: Path, catalog_path: Path, quarantine_path: Path, result: HeaderResult,
    quarantine: list[dict[str, str]],
) -> Catalog:  # fmt: skip
    ok_bands = result.ok["bands"].dropna()
    return Catalog(
        dataset_id=settings.dataset_id,
        raw_dir=str(root),
        catalog_path=str(catalog_path),
        quarantine_path=str(quarantine_path),
        class_names=list(result.class_names),
        class_colors=class_colors(settings, root, result.class_names),
        ignore_index=settings.ignore_index,
        mask_values=dict(result.mask_values),
        positive_classes=class_ids("dataset.positive_classes", settings.positive_classes, result.class_names),
        bands=int(ok_bands.mode().iloc[0]) if len(ok_bands) else None,
        normalization=_normalization(result),
        n_tiles=len(result.catalog),
        n_ok=len(result.ok),
        n_labeled=int(result.ok["has_label"].sum()),
        n_quarantined=len(quarantine),
        quarantine_limit=settings.max_quarantine_fraction,
        content_hash=result.content_hash(),
        warnings=list(result.warnings),
    )


def class_colors(settings: DatasetSettings, root: Path, class_names: Sequence[str]) -> list[list[int]]:
    """Display colour of each class: ``class_colors``, then ``classes.txt``, ``mask_colors``, the name."""
    listed: dict[str, tuple[int, int, int]] = {}
    if not settings.class_names and (root / "classes.txt").is_file():
        listed = read_classes(root / "classes.txt")[1]
    known = {k: v for k, v in {**settings.mask_colors, **listed}.items() if k in class_names}
    try:
        return class_palette(class_names, {**known, **settings.class_colors}).tolist()
    except ValueError as error:  # a class_colors name that is not a class
        raise ValueError(f"dataset.class_colors: {error}") from error


def split(settings: SplitSettings, catalog: Catalog, log_fn: LogFn | None = None) -> SplitTable:
    """Assign every valid tile of ``catalog`` to a split and write the split table."""
    log = log_fn or default_log_fn()
    tiles = read_catalog(catalog.catalog_path)
    table = assign_splits(tiles, settings)
    path = write_split_table(table, Path(catalog.catalog_path).with_name("splits.parquet"))
    counts = split_counts(table)
    log(f"{catalog.dataset_id}: split {len(table)} tiles with policy {settings.policy!r}: {counts}")
    return SplitTable(
        dataset_id=catalog.dataset_id,
        splits_path=str(path),
        counts=counts,
        policy=settings.policy,
        seed=settings.seed,
        grouped=settings.group_block_size is not None,
        content_hash=file_sha256(path),
        pictures=split_pictures(catalog, tiles.merge(table[["item_id", "split"]], on="item_id"), path.parent),
    )


def split_pictures(catalog: Catalog, tiles: pd.DataFrame, folder: Path) -> dict[str, str]:
    """The split's footprint map and class shares as PNGs beside the split table (name -> path)."""
    palette = stored_palette(catalog.class_names, catalog.class_colors)
    drawn = {
        "footprints": plot_split_footprints(
            folder / "split_footprints.png", tiles, f"{catalog.dataset_id}: tiles by split"
        ),
        "class_shares": plot_class_shares(
            folder / "split_class_shares.png",
            tiles,
            catalog.class_names,
            palette,
            f"{catalog.dataset_id}: classes per split",
        ),
    }
    return {name: str(png) for name, png in drawn.items() if png is not None}


@dataclass(frozen=True)
class ShardRun:
    """A shard step's contract plus what the writer did."""

    shards: ShardSet
    written: int
    reused: int
    seconds: float
    shard_table: list[dict[str, str | int]]


def shard(
    settings: ShardSettings, catalog: Catalog, splits: SplitTable, log_fn: LogFn | None = None
) -> ShardRun:
    """Write the shards and manifest of one dataset from its catalog and split table."""
    log = log_fn or default_log_fn()
    dataset_dir = Path(catalog.catalog_path).parent
    started = time.perf_counter()
    with folder_lock(dataset_dir, f"{catalog.dataset_id} shards", log):
        manifest = write_shards(
            read_catalog(catalog.catalog_path),
            read_split_table(splits.splits_path),
            dataset_dir,
            settings,
            mask_values=catalog.mask_values,
            log_fn=log,
        )
    seconds = time.perf_counter() - started
    items = {name: sum(s["items"] for s in shards) for name, shards in manifest["splits"].items()}
    stats = manifest["stats"]
    log(
        f"{catalog.dataset_id}: shards in {dataset_dir}: {stats['shards_written']} written, "
        f"{stats['shards_reused']} unchanged, {sum(items.values())} tiles in {seconds:.2f}s"
    )
    shards = ShardSet(
        dataset_id=catalog.dataset_id,
        dataset_dir=str(dataset_dir),
        manifest_path=str(dataset_dir / "manifest.json"),
        catalog=catalog,
        splits=splits,
        items=items,
        tile_format=settings.tile_format,
        data_version=manifest["data_version"],
    )
    table = [
        {"shard": s["path"], "tiles": int(s["items"]), "content_hash": s["content_hash"][:12]}
        for group in manifest["splits"].values()
        for s in group
    ]
    return ShardRun(shards, stats["shards_written"], stats["shards_reused"], seconds, table)


def ingest_auxiliary(
    settings: AuxiliarySettings, layout: DataLayout, log_fn: LogFn | None = None
) -> AuxiliarySet:
    """Catalogue, split (train/val) and shard every auxiliary dataset with the auxiliary settings."""
    sources = []
    for aux in settings.datasets:
        dataset = aux.as_dataset().replace(max_quarantine_fraction=settings.max_quarantine_fraction)
        catalog = catalogue(dataset, layout, log_fn).catalog
        table = split(settings.split(), catalog, log_fn)
        sources.append(shard(settings.shards, catalog, table, log_fn).shards)
    return auxiliary_set(sources)


def auxiliary_set(sources: Sequence[ShardSet]) -> AuxiliarySet:
    """The auxiliary sources as one value; its data version changes when any source's does."""
    version = hashlib.sha256("".join(s.data_version for s in sources).encode()).hexdigest()
    return AuxiliarySet(sources=list(sources), data_version=version)


def shard_problems(shards: ShardSet) -> tuple[list[str], int]:
    """Differences between the shards and the split table and catalog they were cut from.

    Every assigned tile must appear once, in its split, with the checksum the catalog recorded.
    Returns the problems and the number of tiles seen in the shards.
    """
    catalog = read_catalog(shards.catalog.catalog_path)
    checksums = dict(zip(catalog["item_id"], catalog["image_sha256"], strict=True))
    table = read_split_table(shards.splits.splits_path)
    expected = dict(zip(table["item_id"], table["split"], strict=True))
    seen: Counter[str] = Counter()
    problems: list[str] = []
    for split_name in sorted(set(expected.values())):
        for folder in shard_dirs(shards.dataset_dir, split_name):
            for row in read_shard_index(folder):
                seen[row.item_id] += 1
                if expected.get(row.item_id) != split_name:
                    problems.append(f"{row.item_id} in {split_name}, expected {expected.get(row.item_id)}")
                if row.extra.get("image_sha256") != checksums.get(row.item_id):
                    problems.append(f"{row.item_id}: checksum differs from the catalog")
    problems += [f"{item} missing from shards" for item in expected if seen[item] == 0]
    problems += [f"{item} in {n} shards" for item, n in seen.items() if n > 1]
    return problems, sum(seen.values())


def ok_tile_count(catalog: Catalog) -> int:
    """Valid tiles in the catalog file (what the shards must hold at most)."""
    frame = read_catalog(catalog.catalog_path)
    return int((frame["status"] == STATUS_OK).sum())


def split_leaks(splits: SplitTable) -> tuple[list[str], list[str]]:
    """Items in two splits, and (with spatial grouping) groups of labeled tiles in two splits."""
    table = read_split_table(splits.splits_path)
    return duplicated_items(table), leaking_groups(table) if splits.grouped else []


def load_shard_set(dataset_dir: Path | str) -> ShardSet:
    """The :class:`ShardSet` of a dataset ingested earlier, rebuilt from its files (for the CLI and torchrun).

    Raises:
        ValueError: the folder holds no catalog, split table or manifest (run ``ingest_job`` first).
    """
    folder = Path(dataset_dir)
    missing = [
        name
        for name in ("headers.parquet", "splits.parquet", "manifest.json")
        if not (folder / name).is_file()
    ]
    if missing:
        raise ValueError(
            f"{folder}: has no {', '.join(missing)}; ingest the dataset first (seg-pipeline ingest --config "
            "run.yaml, or ingest_job) or point at data/processed/<dataset>"
        )
    settings = DatasetSettings.parse(
        {**read_catalog_settings(folder / "headers.parquet"), "dataset_id": folder.name}
    )
    frame = read_catalog(folder / "headers.parquet")
    result = HeaderResult(catalog=frame, class_names=read_catalog_class_names(folder / "headers.parquet"))
    quarantine = [
        {"item_id": str(r["item_id"]), "reason": str(r["reason"])}
        for r in result.quarantined.to_dict("records")
    ]
    catalog = _catalog_contract(
        settings,
        Path(settings.raw_dir) if settings.raw_dir else folder.parent.parent / "raw" / folder.name,
        folder / "headers.parquet",
        folder / "quarantine.json",
        result,
        quarantine,
    )
    table = read_split_table(folder / "splits.parquet")
    manifest = read_manifest(folder)
    splits = SplitTable(
        dataset_id=catalog.dataset_id, splits_path=str(folder / "splits.parquet"), counts=split_counts(table),
        policy="unknown", seed=0, grouped=False, content_hash=file_sha256(folder / "splits.parquet"),
    )  # fmt: skip
    return ShardSet(
        dataset_id=catalog.dataset_id,
        dataset_dir=str(folder),
        manifest_path=str(folder / "manifest.json"),
        catalog=catalog,
        splits=splits,
        items={name: sum(s["items"] for s in shards) for name, shards in manifest["splits"].items()},
        tile_format=str(manifest.get("tile_format", "tif")),
        data_version=str(manifest["data_version"]),
    )
