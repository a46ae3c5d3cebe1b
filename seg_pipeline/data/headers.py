"""Header building: a parquet catalog with one row per tile, validated, incremental.

Every tile gets a row and a status. Bad tiles are *quarantined* with a reason that names the
file and what to do; they never abort the build. Valid tiles whose files are unchanged (same
size and mtime as in the previous catalog, validated under the same settings) are not re-read.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from seg_pipeline.data.raster_io import RasterInfo, RasterReadError, info_from_dataset, open_raster
from seg_pipeline.data.spec import DatasetSpec, TileRecord, discover
from seg_pipeline.io import atomic_write, file_sha256
from seg_pipeline.progress import ItemProgress

STATUS_OK = "ok"
STATUS_QUARANTINED = "quarantined"
#: Pixels per read block: bounds memory for big rasters (about 16 M values at a time).
_BLOCK_VALUES = 1 << 24
_TRANSFORM_TOLERANCE = 1e-6

CATALOG_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("fixed_split", pa.string()),
        ("image_path", pa.string()),
        ("mask_path", pa.string()),
        ("driver", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("bands", pa.int64()),
        ("dtype", pa.string()),
        ("crs", pa.string()),
        ("transform", pa.list_(pa.float64())),
        ("minx", pa.float64()),
        ("miny", pa.float64()),
        ("maxx", pa.float64()),
        ("maxy", pa.float64()),
        ("georeferenced", pa.bool_()),
        ("nodata", pa.float64()),
        ("nodata_fraction", pa.float64()),
        ("band_mean", pa.list_(pa.float64())),
        ("band_std", pa.list_(pa.float64())),
        ("has_label", pa.bool_()),
        ("labeled_fraction", pa.float64()),
        ("class_counts", pa.list_(pa.int64())),
        ("image_sha256", pa.string()),
        ("mask_sha256", pa.string()),
        ("image_size", pa.int64()),
        ("image_mtime_ns", pa.int64()),
        ("mask_size", pa.int64()),
        ("mask_mtime_ns", pa.int64()),
        ("settings_key", pa.string()),
    ]
)
COLUMNS: tuple[str, ...] = tuple(CATALOG_SCHEMA.names)


@dataclass
class HeaderResult:
    """The catalog plus what the build did (for metadata and logs)."""

    catalog: pd.DataFrame
    class_names: tuple[str, ...]
    n_read: int = 0
    n_reused: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> pd.DataFrame:
        """Rows that passed validation."""
        return self.catalog[self.catalog["status"] == STATUS_OK]

    @property
    def quarantined(self) -> pd.DataFrame:
        """Rows that failed validation, with their reasons."""
        return self.catalog[self.catalog["status"] == STATUS_QUARANTINED]

    def content_hash(self) -> str:
        """Hash of what downstream steps depend on: used as the Dagster data version."""
        return catalog_content_hash(self.catalog, self.class_names)

    def class_histogram(self) -> dict[str, int]:
        """Total labelled pixels per class over the OK tiles."""
        totals = np.zeros(len(self.class_names), dtype=np.int64)
        for counts in self.ok["class_counts"]:
            if counts is not None and len(counts):
                totals[: len(counts)] += np.asarray(counts, dtype=np.int64)[: len(totals)]
        return {name: int(n) for name, n in zip(self.class_names, totals, strict=True)}


def catalog_content_hash(catalog: pd.DataFrame, class_names: Iterable[str]) -> str:
    """Order-independent hash of item ids, checksums, statuses and class names."""
    digest = hashlib.sha256(json.dumps(list(class_names)).encode())
    cols = ["item_id", "status", "image_sha256", "mask_sha256", "fixed_split"]
    for row in catalog.sort_values("item_id")[cols].itertuples(index=False):
        digest.update(json.dumps([None if pd.isna(v) else v for v in row]).encode())
    return digest.hexdigest()


def _empty_row(record: TileRecord, settings_key: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(
        item_id=record.item_id,
        status=STATUS_OK,
        reason="",
        fixed_split=record.fixed_split,
        image_path=str(record.image_path) if record.image_path else None,
        mask_path=str(record.mask_path) if record.mask_path else None,
        has_label=False,
        labeled_fraction=0.0,
        settings_key=settings_key,
    )
    for prefix, path in (("image", record.image_path), ("mask", record.mask_path)):
        if path is not None and path.exists():
            stat = path.stat()
            row[f"{prefix}_size"], row[f"{prefix}_mtime_ns"] = stat.st_size, stat.st_mtime_ns
    return row


def _quarantine(row: dict[str, Any], reason: str) -> dict[str, Any]:
    row["status"], row["reason"] = STATUS_QUARANTINED, reason
    return row


def _row_blocks(height: int, width: int, bands: int) -> Iterable[tuple[int, int]]:
    """Row ranges that keep one read under ``_BLOCK_VALUES`` values."""
    rows = max(1, _BLOCK_VALUES // max(1, width * bands))
    for start in range(0, height, rows):
        yield start, min(height, start + rows)


def _image_stats(path: Path) -> tuple[RasterInfo, np.ndarray, dict[str, Any]]:
    """Read an image block by block: header, valid-pixel mask and per-band statistics."""
    from rasterio.windows import Window

    with open_raster(path) as src:
        info = info_from_dataset(src, path)
        valid = np.empty((info.height, info.width), dtype=bool)
        sums = np.zeros(info.count, dtype=np.float64)
        sq_sums = np.zeros(info.count, dtype=np.float64)
        for r0, r1 in _row_blocks(info.height, info.width, info.count):
            try:
                block = src.read(window=Window(0, r0, info.width, r1 - r0))
            except Exception as exc:  # GDAL raises several types for truncated files
                raise RasterReadError(
                    path, f"pixel data is corrupt or truncated ({exc}); re-export it"
                ) from exc
            finite = (
                np.isfinite(block).all(axis=0) if block.dtype.kind == "f" else np.ones(block.shape[1:], bool)
            )
            ok = finite if info.nodata is None else finite & ~(block == info.nodata).all(axis=0)
            valid[r0:r1] = ok
            picked = block[:, ok].astype(np.float64)
            sums += picked.sum(axis=1)
            sq_sums += np.square(picked).sum(axis=1)
    n_valid = int(valid.sum())
    mean = sums / max(n_valid, 1)
    std = np.sqrt(np.maximum(sq_sums / max(n_valid, 1) - mean**2, 0.0))
    stats = {
        "nodata_fraction": 1.0 - n_valid / max(valid.size, 1),
        "band_mean": mean.tolist(),
        "band_std": std.tolist(),
        "n_valid": n_valid,
    }
    return info, valid, stats


def _mask_problem(mask_info: RasterInfo, image_info: RasterInfo) -> str | None:
    """Why a mask cannot label its image (geometry, bands, dtype), or ``None``."""
    path = mask_info.path
    if mask_info.count != 1:
        return f"mask {path} has {mask_info.count} bands; masks must be single-band class ids"
    if np.dtype(mask_info.dtype).kind == "f":
        return (
            f"mask {path} has float dtype {mask_info.dtype}; masks must hold integer class ids "
            "(convert with gdal_translate -ot Byte)"
        )
    if (mask_info.width, mask_info.height) != (image_info.width, image_info.height):
        return (
            f"mask {path} is {mask_info.width}x{mask_info.height} but image {image_info.path} is "
            f"{image_info.width}x{image_info.height}; they must have the same size"
        )
    if mask_info.crs and image_info.crs and mask_info.crs != image_info.crs:
        return f"mask {path} CRS {mask_info.crs} differs from image CRS {image_info.crs}; reproject the mask"
    if (
        mask_info.georeferenced
        and image_info.georeferenced
        and not np.allclose(mask_info.transform, image_info.transform, atol=_TRANSFORM_TOLERANCE, rtol=0)
    ):
        return f"mask {path} transform {mask_info.transform} differs from the image's {image_info.transform}"
    return None


def _mask_counts(path: Path, num_classes: int | None, ignore_index: int) -> tuple[np.ndarray, int]:
    """Per-value pixel counts of a mask (ignore value excluded) and the count of ignored pixels."""
    from rasterio.windows import Window

    counts = np.zeros(max(num_classes or 0, 1), dtype=np.int64)
    ignored = 0
    with open_raster(path) as src:
        for r0, r1 in _row_blocks(src.height, src.width, 1):
            try:
                block = src.read(1, window=Window(0, r0, src.width, r1 - r0))
            except Exception as exc:
                raise RasterReadError(
                    path, f"pixel data is corrupt or truncated ({exc}); re-export it"
                ) from exc
            if block.min(initial=0) < 0:
                raise RasterReadError(
                    path, f"negative label {int(block.min())}; labels must be class ids >= 0"
                )
            keep = block != ignore_index
            ignored += int((~keep).sum())
            values = np.bincount(block[keep].astype(np.int64).ravel())
            if len(values) > len(counts):
                counts = np.pad(counts, (0, len(values) - len(counts)))
            counts[: len(values)] += values
    return counts, ignored


def inspect_tile(
    record: TileRecord,
    num_classes: int | None,
    ignore_index: int,
    expected_bands: int | None,
    settings_key: str = "",
) -> dict[str, Any]:
    """Read and validate one tile; always returns a catalog row (quarantined on any problem)."""
    row = _empty_row(record, settings_key)
    if record.problem:
        return _quarantine(row, record.problem)
    assert record.image_path is not None
    try:
        info, _valid, stats = _image_stats(record.image_path)
    except RasterReadError as exc:
        return _quarantine(row, f"unreadable image: {exc}")
    row.update(
        driver=info.driver,
        width=info.width,
        height=info.height,
        bands=info.count,
        dtype=info.dtype,
        crs=info.crs,
        transform=list(info.transform),
        minx=info.bounds[0],
        miny=info.bounds[1],
        maxx=info.bounds[2],
        maxy=info.bounds[3],
        georeferenced=info.georeferenced,
        nodata=info.nodata,
        nodata_fraction=stats["nodata_fraction"],
        band_mean=stats["band_mean"],
        band_std=stats["band_std"],
        image_sha256=file_sha256(record.image_path),
    )
    if expected_bands is not None and info.count != expected_bands:
        return _quarantine(
            row, f"image {record.image_path} has {info.count} bands but the dataset expects {expected_bands}"
        )
    if stats["n_valid"] == 0:
        return _quarantine(row, f"image {record.image_path} is all nodata/NaN; nothing to learn from")
    if record.mask_path is None:
        return row
    try:
        with open_raster(record.mask_path) as src:
            mask_info = info_from_dataset(src, record.mask_path)
        problem = _mask_problem(mask_info, info)
        if problem:
            return _quarantine(row, problem)
        counts, ignored = _mask_counts(record.mask_path, num_classes, ignore_index)
    except RasterReadError as exc:
        return _quarantine(row, f"unreadable mask: {exc}")
    row["mask_sha256"] = file_sha256(record.mask_path)
    if num_classes is not None and len(counts) > num_classes and counts[num_classes:].any():
        bad = (np.nonzero(counts[num_classes:])[0] + num_classes).tolist()
        return _quarantine(
            row,
            f"mask {record.mask_path} has labels {bad} outside the class set 0..{num_classes - 1} "
            f"(ignore value {ignore_index}); fix the mask or the class list",
        )
    labelled = int(counts.sum())
    row.update(
        class_counts=counts[: num_classes or len(counts)].tolist(),
        has_label=labelled > 0,
        labeled_fraction=labelled / max(labelled + ignored, 1),
    )
    return row


def _to_frame(table: pa.Table) -> pd.DataFrame:
    """Arrow -> pandas keeping 64-bit ints exact (nullable), so mtimes in ns survive a round trip."""
    return table.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)


def read_catalog(path: Path | str) -> pd.DataFrame:
    """Load a catalog written by :func:`write_catalog`."""
    return _to_frame(pq.read_table(path))


def write_catalog(
    catalog: pd.DataFrame,
    path: Path | str,
    class_names: Iterable[str],
    settings: Mapping[str, Any] | None = None,
) -> Path:
    """Write the catalog as parquet atomically, with class names (and the dataset settings that
    made it, so the catalog describes itself) in the file metadata."""
    path = Path(path)
    table = pa.Table.from_pandas(catalog[list(COLUMNS)], schema=CATALOG_SCHEMA, preserve_index=False)
    metadata = {"class_names": json.dumps(list(class_names))}
    if settings is not None:
        metadata["dataset_settings"] = json.dumps(dict(settings), sort_keys=True)
    table = table.replace_schema_metadata(metadata)
    with atomic_write(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_catalog_settings(path: Path | str) -> dict[str, Any]:
    """The dataset settings stored in a catalog's parquet metadata (empty for older catalogs)."""
    meta = pq.read_schema(path).metadata or {}
    return dict(json.loads(meta.get(b"dataset_settings", b"{}")))


def read_catalog_class_names(path: Path | str) -> tuple[str, ...]:
    """Class names stored in a catalog's parquet metadata."""
    meta = pq.read_schema(path).metadata or {}
    return tuple(json.loads(meta.get(b"class_names", b"[]")))


def _settings_key(num_classes: int | None, ignore_index: int, expected_bands: int | None) -> str:
    return json.dumps({"k": num_classes, "ignore": ignore_index, "bands": expected_bands})


def _none_if_na(value: Any) -> Any:
    return None if value is None or (np.isscalar(value) and pd.isna(value)) else value


def _reusable(previous: dict[str, dict[str, Any]], record: TileRecord, settings_key: str) -> dict | None:
    """The previous row for ``record`` if none of its files changed, else ``None``."""
    old = previous.get(record.item_id)
    if old is None or old.get("settings_key") != settings_key or record.problem:
        return None
    if old.get("status") != STATUS_OK:
        # Quarantine can be a dataset-level verdict (minority band count) that other tiles'
        # changes undo, so quarantined tiles are judged again; they are few and fail fast.
        return None
    fresh = _empty_row(record, settings_key)
    keys = (
        "image_path",
        "mask_path",
        "image_size",
        "image_mtime_ns",
        "mask_size",
        "mask_mtime_ns",
        "fixed_split",
    )
    same = all(_none_if_na(old.get(k)) == fresh.get(k) for k in keys)
    return {k: _none_if_na(v) for k, v in old.items()} if same else None


def build_headers(
    spec: DatasetSpec,
    previous_catalog: Path | str | None = None,
    workers: int | None = None,
    *,
    log_fn: Callable[[str], None] | None = None,
) -> HeaderResult:
    """Discover, read and validate every tile of ``spec``.

    Args:
        spec: The dataset to catalogue.
        previous_catalog: A catalog from an earlier build; rows whose files are unchanged are reused.
        workers: Reader threads (GDAL releases the GIL while decoding); default ``min(8, cpus)``.
        log_fn: Sink for progress lines over the tiles read (default: the ``seg_pipeline`` logger);
            reading and hashing every tile is the slow part of ingest, so it reports throughput and ETA.
    """
    start = time.perf_counter()
    found = discover(spec)
    class_names = found.class_names
    num_classes = len(class_names) or None
    expected_bands = spec.expected_bands
    warnings: list[str] = []
    if num_classes is None:
        warnings.append("no class names (classes.txt or config): labels are not checked against a class set")
    settings_key = _settings_key(num_classes, spec.ignore_index, expected_bands)

    previous: dict[str, dict[str, Any]] = {}
    if previous_catalog is not None and Path(previous_catalog).exists():
        old = read_catalog(previous_catalog)
        previous = {row["item_id"]: row for row in old.to_dict("records")}

    rows: list[dict[str, Any] | None] = []
    to_read: list[tuple[int, TileRecord]] = []
    for record in found.records:
        reused = _reusable(previous, record, settings_key)
        rows.append(reused)
        if reused is None:
            to_read.append((len(rows) - 1, record))

    n_workers = workers or min(8, os.cpu_count() or 1)
    progress = ItemProgress(f"headers {spec.dataset_id}", len(to_read), unit="tiles", log_fn=log_fn)
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        results = pool.map(
            lambda rec: inspect_tile(rec, num_classes, spec.ignore_index, expected_bands, settings_key),
            [rec for _, rec in to_read],
        )
        for (index, _), row in zip(to_read, results, strict=True):
            rows[index] = row
            progress.advance()
    reused_count = len(rows) - len(to_read)
    progress.done(f"reused {reused_count} unchanged" if reused_count else None)

    if expected_bands is None:  # every tile must match the majority band count
        bands = pd.Series([r["bands"] for r in rows if r and r["status"] == STATUS_OK and r["bands"]])
        if not bands.empty and bands.nunique() > 1:
            majority = int(bands.mode().iloc[0])
            for row in rows:
                if row and row["status"] == STATUS_OK and row["bands"] != majority:
                    _quarantine(
                        row,
                        f"image {row['image_path']} has {row['bands']} bands but most tiles have {majority}; "
                        "set expected_bands or remove it",
                    )

    if num_classes is None:  # infer the class set from the data
        max_len = max(
            (len(r["class_counts"]) for r in rows if r and r["class_counts"] is not None), default=0
        )
        class_names = tuple(f"class_{i}" for i in range(max_len))

    rows_sorted = sorted((r for r in rows if r is not None), key=lambda r: r["item_id"])
    catalog = _to_frame(pa.Table.from_pylist(rows_sorted, schema=CATALOG_SCHEMA))
    return HeaderResult(
        catalog=catalog,
        class_names=class_names,
        n_read=len(to_read),
        n_reused=len(rows) - len(to_read),
        seconds=time.perf_counter() - start,
        warnings=warnings,
    )
