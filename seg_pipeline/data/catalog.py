"""The header catalog: its parquet schema, one row per tile with a status, and reading/writing it.

The catalog holds, per tile, the paths, geometry, bands, dtype, CRS, transform, bounds, nodata
share, band statistics, label counts and checksums, plus ``status`` ``ok`` or ``quarantined`` with
the reason. Its parquet metadata names the classes and the dataset settings that made it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from seg_pipeline.io import atomic_write


def described(name: str, type_: pa.DataType, description: str) -> pa.Field:
    """A parquet column with its meaning in the field metadata (readers and Dagster show it)."""
    return pa.field(name, type_, metadata={"description": description})


STATUS_OK = "ok"
STATUS_QUARANTINED = "quarantined"
#: Pixels per read block: bounds memory for big rasters (about 16 M values at a time).

#: The catalog's columns; each field's ``description`` is shown as the asset's column schema.
CATALOG_SCHEMA = pa.schema(
    [
        described("item_id", pa.string(), "Tile id, unique in the dataset; the key of every later table."),
        described("status", pa.string(), "ok, or quarantined (left out of every split, with a reason)."),
        described("reason", pa.string(), "Why the tile was quarantined (null when ok)."),
        described(
            "fixed_split", pa.string(), "Split named by the folder layout (train/val/test), for policy fixed."
        ),
        described("image_path", pa.string(), "Absolute path of the image raster."),
        described("mask_path", pa.string(), "Absolute path of the mask raster (null: unlabeled)."),
        described("driver", pa.string(), "GDAL driver of the image (GTiff, PNG, JPEG, ...)."),
        described("width", pa.int64(), "Image width in pixels."),
        described("height", pa.int64(), "Image height in pixels."),
        described("bands", pa.int64(), "Image band count."),
        described("dtype", pa.string(), "Image data type."),
        described("crs", pa.string(), "CRS as rasterio writes it (e.g. EPSG:4326; null: none)."),
        described("transform", pa.list_(pa.float64()), "Affine geotransform (a, b, c, d, e, f)."),
        described("minx", pa.float64(), "Footprint bounds in the CRS: west."),
        described("miny", pa.float64(), "Footprint bounds in the CRS: south."),
        described("maxx", pa.float64(), "Footprint bounds in the CRS: east."),
        described("maxy", pa.float64(), "Footprint bounds in the CRS: north."),
        described("georeferenced", pa.bool_(), "Whether the image has a CRS and transform (or GCPs)."),
        described("nodata", pa.float64(), "Declared nodata value of the image (null: none)."),
        described("nodata_fraction", pa.float64(), "Share of pixels whose bands are all nodata."),
        described(
            "band_mean",
            pa.list_(pa.float64()),
            "Per-band mean of the valid pixels (feeds the normalisation).",
        ),
        described("band_std", pa.list_(pa.float64()), "Per-band standard deviation of the valid pixels."),
        described("has_label", pa.bool_(), "Whether the tile has a usable mask."),
        described("labeled_fraction", pa.float64(), "Share of mask pixels that hold a class (not ignore)."),
        described("class_counts", pa.list_(pa.int64()), "Pixels per class id after mask recoding."),
        described("mask_driver", pa.string(), "GDAL driver of the mask."),
        described("mask_values", pa.list_(pa.int64()), "Raw values found in the mask before recoding."),
        described(
            "mask_value_counts",
            pa.list_(pa.int64()),
            "Pixels per raw mask value (same order as mask_values).",
        ),
        described("image_sha256", pa.string(), "Content hash of the image file."),
        described("mask_sha256", pa.string(), "Content hash of the mask file."),
        described(
            "image_size", pa.int64(), "Image file size in bytes (with mtime: reuse a row without re-reading)."
        ),
        described("image_mtime_ns", pa.int64(), "Image file modification time (ns)."),
        described("mask_size", pa.int64(), "Mask file size in bytes."),
        described("mask_mtime_ns", pa.int64(), "Mask file modification time (ns)."),
        described(
            "settings_key",
            pa.string(),
            "Hash of the ingest settings the row was read with (a change re-reads it).",
        ),
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
    #: The recoding of raw mask values the class counts (and the shards) use: given, detected or none.
    mask_values: dict[int, int] = field(default_factory=dict)

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
        return catalog_content_hash(self.catalog, self.class_names, self.mask_values)

    def class_histogram(self) -> dict[str, int]:
        """Total labelled pixels per class over the OK tiles."""
        totals = np.zeros(len(self.class_names), dtype=np.int64)
        for counts in self.ok["class_counts"]:
            if counts is not None and len(counts):
                totals[: len(counts)] += np.asarray(counts, dtype=np.int64)[: len(totals)]
        return {name: int(n) for name, n in zip(self.class_names, totals, strict=True)}


def catalog_content_hash(
    catalog: pd.DataFrame, class_names: Iterable[str], mask_values: Mapping[int, int] | None = None
) -> str:
    """Order-independent hash of item ids, checksums, statuses, class names and the mask recoding."""
    digest = hashlib.sha256(json.dumps(list(class_names)).encode())
    if mask_values:
        digest.update(json.dumps(sorted((int(k), int(v)) for k, v in mask_values.items())).encode())
    cols = ["item_id", "status", "image_sha256", "mask_sha256", "fixed_split"]
    for row in catalog.sort_values("item_id")[cols].itertuples(index=False):
        digest.update(json.dumps([None if pd.isna(v) else v for v in row]).encode())
    return digest.hexdigest()


def to_frame(table: pa.Table) -> pd.DataFrame:
    """Arrow -> pandas keeping 64-bit ints exact (nullable), so mtimes in ns survive a round trip."""
    return table.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)


def read_catalog(path: Path | str) -> pd.DataFrame:
    """Load a catalog written by :func:`write_catalog`."""
    return to_frame(pq.read_table(path))


def write_catalog(
    catalog: pd.DataFrame,
    path: Path | str,
    class_names: Iterable[str],
    settings: Mapping[str, Any] | None = None,
    mask_values: Mapping[int, int] | None = None,
) -> Path:
    """Write the catalog as parquet atomically, with class names (and the dataset settings that
    made it, so the catalog describes itself) in the file metadata.
    """
    path = Path(path)
    table = pa.Table.from_pandas(catalog[list(COLUMNS)], schema=CATALOG_SCHEMA, preserve_index=False)
    metadata = {"class_names": json.dumps(list(class_names))}
    if mask_values:
        metadata["mask_values"] = json.dumps({str(k): int(v) for k, v in mask_values.items()})
    if settings is not None:
        metadata["dataset_settings"] = json.dumps(dict(settings), sort_keys=True)
    table = table.replace_schema_metadata(metadata)
    with atomic_write(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_catalog_mask_values(path: Path | str) -> dict[int, int]:
    """The mask recoding a catalog's class counts use (empty: raw values are class ids)."""
    meta = pq.read_schema(path).metadata or {}
    return {int(k): int(v) for k, v in json.loads(meta.get(b"mask_values", b"{}")).items()}


def read_catalog_settings(path: Path | str) -> dict[str, Any]:
    """The dataset settings stored in a catalog's parquet metadata (empty for older catalogs)."""
    meta = pq.read_schema(path).metadata or {}
    return dict(json.loads(meta.get(b"dataset_settings", b"{}")))


def read_catalog_class_names(path: Path | str) -> tuple[str, ...]:
    """Class names stored in a catalog's parquet metadata."""
    meta = pq.read_schema(path).metadata or {}
    return tuple(json.loads(meta.get(b"class_names", b"[]")))


def ok_rows(catalog: pd.DataFrame, item_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """The valid (``ok``) rows of ``catalog``, restricted to ``item_ids`` when given.

    Raises:
        ValueError: an id is not a valid tile of the catalog (named, with the first few).
    """
    rows = catalog[catalog["status"] == STATUS_OK]
    if item_ids is None:
        return rows
    wanted = list(item_ids)
    missing = sorted(set(wanted) - set(rows["item_id"]))
    if missing:
        raise ValueError(
            f"item_ids: {len(missing)} ids are not OK tiles of the catalog (first: {missing[:3]}); "
            "pass ids from the same catalog"
        )
    return rows[rows["item_id"].isin(wanted)]
