"""Header building: a parquet catalog with one row per tile, validated, incremental.

Every tile gets a row and a status (:mod:`~seg_pipeline.data.inspect`). Bad tiles are
*quarantined* with a reason that names the file and what to do; they never abort the build. Valid
tiles whose files are unchanged (same size and mtime as in the previous catalog, validated under
the same settings) are not re-read. The catalog format is :mod:`~seg_pipeline.data.catalog`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import pyarrow as pa

from seg_pipeline.data.catalog import (
    CATALOG_SCHEMA,
    COLUMNS,
    STATUS_OK,
    STATUS_QUARANTINED,
    HeaderResult,
    catalog_content_hash,
    read_catalog,
    read_catalog_class_names,
    read_catalog_settings,
    to_frame,
    write_catalog,
)
from seg_pipeline.data.inspect import empty_row, inspect_tile, quarantine
from seg_pipeline.data.mask_values import (
    colors_to_values,
    detect_mask_values,
    empty_classes,
    label_row,
    raw_counts,
)
from seg_pipeline.data.spec import DatasetSpec, TileRecord, discover
from seg_pipeline.io import file_sha256
from seg_pipeline.progress import ItemProgress

__all__ = [
    "CATALOG_SCHEMA",
    "COLUMNS",
    "STATUS_OK",
    "STATUS_QUARANTINED",
    "HeaderResult",
    "build_headers",
    "catalog_content_hash",
    "inspect_tile",
    "read_catalog",
    "read_catalog_class_names",
    "read_catalog_settings",
    "write_catalog",
]


#: Bumped when the catalog gains columns that reused rows must have (v2: raw mask value counts).
_CATALOG_VERSION = 2


def _settings_key(expected_bands: int | None) -> str:
    # Class list, ignore value and mask recoding act on the stored raw counts, so rows stay reusable.
    return json.dumps({"v": _CATALOG_VERSION, "bands": expected_bands})


def _none_if_na(value: Any) -> Any:
    # cast: np.isscalar narrows to generic | memoryview, which pandas-stubs' isna does not list
    # (it takes both)
    return None if value is None or (np.isscalar(value) and pd.isna(cast(Any, value))) else value


def _same_checksums(old: dict[str, Any], record: TileRecord) -> bool:
    for prefix, path in (("image", record.image_path), ("mask", record.mask_path)):
        if path is not None and _none_if_na(old.get(f"{prefix}_sha256")) != file_sha256(path):
            return False
    return True


def _reusable(
    previous: dict[str, dict[str, Any]], record: TileRecord, settings_key: str, verify: bool = False
) -> dict | None:
    """The previous row for ``record`` if none of its files changed (size and mtime, and with
    ``verify`` the sha256 too), else ``None``.
    """
    old = previous.get(record.item_id)
    if old is None or old.get("settings_key") != settings_key or record.problem:
        return None
    if old.get("status") != STATUS_OK:
        # Quarantine can be a dataset-level verdict (minority band count) that other tiles'
        # changes undo, so quarantined tiles are judged again; they are few and fail fast.
        return None
    fresh = empty_row(record, settings_key)
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
    if same and verify:
        same = _same_checksums(old, record)
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
    settings_key = _settings_key(expected_bands)
    # Checked before any tile is read: a colour naming no class is a settings error.
    colors = colors_to_values(spec.mask_colors, class_names) if spec.mask_colors else {}

    previous: dict[str, dict[str, Any]] = {}
    if previous_catalog is not None and Path(previous_catalog).exists():
        old = read_catalog(previous_catalog)
        # cast: pandas-stubs types records as dict[Hashable, Any]; the catalog's column names are str
        previous = {row["item_id"]: cast(dict[str, Any], row) for row in old.to_dict("records")}

    rows: list[dict[str, Any] | None] = []
    to_read: list[tuple[int, TileRecord]] = []
    for record in found.records:
        reused = _reusable(previous, record, settings_key, spec.verify_checksums)
        rows.append(reused)
        if reused is None:
            to_read.append((len(rows) - 1, record))

    n_workers = workers or min(8, os.cpu_count() or 1)
    progress = ItemProgress(f"headers {spec.dataset_id}", len(to_read), unit="tiles", log_fn=log_fn)
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        results = pool.map(
            lambda rec: inspect_tile(rec, expected_bands, settings_key),
            [rec for _, rec in to_read],
        )
        for (index, _), fresh in zip(to_read, results, strict=True):
            rows[index] = fresh
            progress.advance()
    reused_count = len(rows) - len(to_read)
    progress.done(f"reused {reused_count} unchanged" if reused_count else None)

    if expected_bands is None:  # every tile must match the majority band count
        bands = pd.Series([r["bands"] for r in rows if r and r["status"] == STATUS_OK and r["bands"]])
        if not bands.empty and bands.nunique() > 1:
            majority = int(bands.mode().iloc[0])
            for row in rows:
                if row and row["status"] == STATUS_OK and row["bands"] != majority:
                    quarantine(
                        row,
                        f"image {row['image_path']} has {row['bands']} bands but most tiles have {majority}; "
                        "set expected_bands or remove it",
                    )

    mask_values = _label_rows([r for r in rows if r is not None], spec, num_classes, warnings, colors)

    if num_classes is None:  # infer the class set from the data
        max_len = max(
            (len(r["class_counts"]) for r in rows if r and r["class_counts"] is not None), default=0
        )
        class_names = tuple(f"class_{i}" for i in range(max_len))

    rows_sorted = sorted((r for r in rows if r is not None), key=lambda r: r["item_id"])
    catalog = to_frame(pa.Table.from_pylist(rows_sorted, schema=CATALOG_SCHEMA))
    return HeaderResult(
        catalog=catalog,
        class_names=class_names,
        n_read=len(to_read),
        n_reused=len(rows) - len(to_read),
        seconds=time.perf_counter() - start,
        warnings=warnings + _class_warnings(catalog, class_names) + _crs_warnings(catalog),
        mask_values=mask_values,
    )


def _label_rows(
    rows: list[dict[str, Any]],
    spec: DatasetSpec,
    num_classes: int | None,
    warnings: list[str],
    colors: dict[int, int],
) -> dict[int, int]:
    """Choose the mask recoding, then derive every valid mask's class counts from its raw counts
    (quarantining masks with values that are no class). Returns the recoding used.
    """
    labelled = [r for r in rows if r["status"] == STATUS_OK and r.get("mask_path")]
    if colors:
        mask_values = {**colors, **{int(k): int(v) for k, v in (spec.mask_values or {}).items()}}
    elif spec.mask_values is not None:
        mask_values = {int(k): int(v) for k, v in spec.mask_values.items()}
    else:
        mask_values = detect_mask_values((raw_counts(r) for r in labelled), num_classes, spec.ignore_index)
        if mask_values:
            warnings.append(
                f"masks hold only the values 0 and 255: read as background / class 1 (mask_values "
                f"{mask_values}), not as 255 = ignore; set dataset.mask_values to say otherwise"
            )
    for row in labelled:
        problem = label_row(row, mask_values, num_classes, spec.ignore_index)
        if problem:
            quarantine(row, problem)
    lossy = sum(1 for r in labelled if str(r.get("mask_driver") or "") == "JPEG")
    if lossy:
        warnings.append(
            f"{lossy} masks are JPEG files: lossy compression changes label values along edges; "
            "store masks as PNG or GeoTIFF"
        )
    return mask_values


def _crs_warnings(catalog: pd.DataFrame) -> list[str]:
    """A warning when valid tiles come in several CRSs (spatial grouping compares like with like)."""
    crs = catalog.loc[catalog["status"] == STATUS_OK, "crs"].dropna().value_counts()
    if len(crs) <= 1:
        return []
    counts = ", ".join(f"{name}: {n}" for name, n in crs.items())
    return [f"tiles are in {len(crs)} CRSs ({counts}); footprints are grouped within one CRS only"]


def _class_warnings(catalog: pd.DataFrame, class_names: tuple[str, ...]) -> list[str]:
    """A warning naming the classes that no valid tile labels (a typo in classes.txt, or a recoding)."""
    ok = catalog[(catalog["status"] == STATUS_OK) & catalog["has_label"].fillna(False).astype(bool)]
    if ok.empty:
        return []
    missing = empty_classes(cast(list[dict[str, Any]], ok.to_dict("records")), class_names)
    if not missing:
        return []
    return [f"classes {missing} have no labelled pixel in any valid tile; check class_names and mask_values"]
