"""Shards: the training-ready copy of a dataset, one folder per split, size-bounded, atomic.

Layout (seed 000)::

    <processed>/<dataset>/<split>/shard-00000/{inputs/, targets/, index.jsonl}
    <processed>/<dataset>/manifest.json

Each ``index.jsonl`` row is ``{item_id, input, target, split, ...}`` with paths relative to the
shard folder. A shard is built in a hidden temp folder and renamed into place, so a reader
never sees half a shard. The manifest lists every shard with a content hash; its overall
``data_version`` is what Dagster records, and an unchanged shard is not rewritten.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import rasterio
from rasterio.windows import Window

from seg_pipeline.data.headers import STATUS_OK
from seg_pipeline.data.mask_values import recode_mask
from seg_pipeline.data.raster_io import open_raster
from seg_pipeline.io import atomic_dir, atomic_write, sweep_stale_temps
from seg_pipeline.progress import ItemProgress
from seg_pipeline.settings.data import ShardSettings

INDEX_NAME = "index.jsonl"
MANIFEST_NAME = "manifest.json"
SHARD_PREFIX = "shard-"
REQUIRED_INDEX_KEYS = ("item_id", "input", "target", "split")


class ShardError(ValueError):
    """A shard is malformed or unsafe; the message names the shard and the row."""


@dataclass(frozen=True)
class ShardRow:
    """One validated index row with absolute paths resolved inside its shard."""

    item_id: str
    split: str
    input_path: Path
    target_path: Path | None
    extra: dict[str, Any]


def raster_input(row: ShardRow) -> Path:
    """The raster file of a row's image: the shard's GeoTIFF, or the source raster of a ``.npy`` input
    (arrays carry no CRS or transform; anything that writes georeferenced output reads this).
    """
    if row.input_path.suffix != ".npy":
        return row.input_path
    source = row.extra.get("source_image")
    if not source or not Path(source).exists():
        raise ShardError(
            f"{row.item_id}: the shard holds a .npy array and its source raster {source!r} is gone; "
            "restore the raw file, or re-shard with tile_format: tif"
        )
    return Path(source)


def _chunks(rows: list[dict[str, Any]], config: ShardSettings) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    size = 0
    for row in rows:
        row_bytes = int(row.get("image_size") or 0) + int(row.get("mask_size") or 0)
        if chunk and (len(chunk) >= config.max_items_per_shard or size + row_bytes > config.max_shard_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(row)
        size += row_bytes
    if chunk:
        yield chunk


#: Rows converted at a time when a raster becomes a shard file: memory follows the block, not the scene.
_BLOCK_PIXELS = 1 << 24


def _convert(
    src: Path,
    dst_stem: Path,
    tile_format: str,
    recode: Callable[[np.ndarray], np.ndarray] | None = None,
    recoded_max: int = 0,
) -> Path:
    """Write ``src`` (optionally recoded, values up to ``recoded_max``) as ``.npy`` or GeoTIFF block by
    block, never decoding it whole.
    """
    with open_raster(src) as ds:
        colour = recode is not None and ds.count >= 3  # colour masks become one band of class ids
        bands = 1 if colour else ds.count
        shape = (bands, ds.height, ds.width)
        rows = max(1, _BLOCK_PIXELS // max(ds.width * ds.count, 1))
        blocks = [Window(0, top, ds.width, min(rows, ds.height - top)) for top in range(0, ds.height, rows)]
        dtype = np.dtype(ds.dtypes[0])
        if colour:
            dtype = np.dtype(np.min_scalar_type(recoded_max))
        elif recode is not None:
            dtype = np.result_type(dtype, np.min_scalar_type(recoded_max))
        if tile_format == "npy":
            dst = dst_stem.with_suffix(".npy")
            out = np.lib.format.open_memmap(dst, mode="w+", dtype=dtype, shape=shape)
            for window in blocks:
                block = ds.read(window=window)
                rows_of = slice(window.row_off, window.row_off + window.height)
                out[:, rows_of] = block if recode is None else recode(block)
            out.flush()
            del out
            return dst
        dst = dst_stem.with_suffix(".tif")
        profile = {
            "driver": "GTiff", "width": ds.width, "height": ds.height, "count": bands, "dtype": dtype.name,
            "crs": ds.crs, "transform": ds.transform, "nodata": ds.nodata if recode is None else None,
            "compress": "deflate", "tiled": True, "blockxsize": 256, "blockysize": 256,
        }  # fmt: skip
        with rasterio.open(dst, "w", **profile) as out_ds:
            for window in blocks:
                block = ds.read(window=window)
                out_ds.write(block if recode is None else recode(block), window=window)
        return dst


def _store_mask(src: Path, dst_stem: Path, tile_format: str, mask_values: Mapping[int, int]) -> Path:
    """A mask into the shard as class ids (recoded by ``mask_values``; a plain copy without one)."""
    if not mask_values:
        return _store(src, dst_stem, tile_format)
    return _convert(
        src, dst_stem, tile_format, lambda block: recode_mask(block, mask_values), max(mask_values.values())
    )


def _store(src: Path, dst_stem: Path, tile_format: str) -> Path:
    """Copy a raster into the shard: a byte copy for GeoTIFFs, a block-by-block conversion otherwise."""
    if tile_format == "tif" and src.suffix.lower() in (".tif", ".tiff"):
        dst = dst_stem.with_suffix(".tif")
        shutil.copyfile(src, dst)
        return dst
    return _convert(src, dst_stem, tile_format)


def _index_rows(
    items: list[dict[str, Any]], split: str, tile_format: str, mask_values: Mapping[int, int]
) -> list[dict[str, Any]]:
    ext = ".npy" if tile_format == "npy" else ".tif"
    rows = []
    # The recoding is part of a target's content: a changed recoding rewrites the shard.
    recoding = (
        {"mask_values": {str(k): int(v) for k, v in sorted(mask_values.items())}} if mask_values else {}
    )
    for item in items:
        has_target = bool(item.get("mask_path")) and isinstance(item.get("mask_path"), str)
        rows.append(
            ({**recoding} if has_target else {})
            | {
                "item_id": item["item_id"],
                "input": f"inputs/{item['item_id']}{ext}",
                "target": f"targets/{item['item_id']}{ext}" if has_target else None,
                "split": split,
                "width": int(item["width"]),
                "height": int(item["height"]),
                "bands": int(item["bands"]),
                "dtype": item["dtype"],
                "crs": item["crs"] if isinstance(item["crs"], str) else None,
                "transform": [float(v) for v in item["transform"]],
                "nodata": None if pd.isna(item["nodata"]) else float(item["nodata"]),
                "has_label": bool(item["has_label"]),
                "image_sha256": item["image_sha256"],
                # The source raster: .npy inputs carry no georeferencing, so prediction reads this.
                "source_image": str(item["image_path"]),
                "mask_sha256": item["mask_sha256"] if isinstance(item.get("mask_sha256"), str) else None,
            }
        )
    return rows


def _index_text(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)


def _write_shard(
    final_dir: Path,
    items: list[dict[str, Any]],
    index_text: str,
    tile_format: str,
    mask_values: Mapping[int, int],
    progress: ItemProgress | None = None,
) -> None:
    """Build a shard in a hidden temp folder, then swap it into ``final_dir`` (see ``io.atomic_dir``)."""
    with atomic_dir(final_dir) as tmp:
        (tmp / "inputs").mkdir()
        (tmp / "targets").mkdir()
        for item in items:
            _store(Path(item["image_path"]), tmp / "inputs" / item["item_id"], tile_format)
            if isinstance(item.get("mask_path"), str) and item["mask_path"]:
                _store_mask(
                    Path(item["mask_path"]), tmp / "targets" / item["item_id"], tile_format, mask_values
                )
            if progress is not None:
                progress.advance(detail=f"{final_dir.parent.name}/{final_dir.name}")
        (tmp / INDEX_NAME).write_text(index_text)


def _existing_hash(shard_dir: Path) -> str | None:
    index = shard_dir / INDEX_NAME
    return hashlib.sha256(index.read_bytes()).hexdigest() if index.exists() else None


def write_shards(
    catalog: pd.DataFrame,
    splits: pd.DataFrame,
    dataset_dir: Path | str,
    config: ShardSettings | None = None,
    *,
    mask_values: Mapping[int, int] | None = None,
    log_fn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write every split's shards under ``dataset_dir`` and return the manifest.

    Targets are stored as class ids: recoded by ``mask_values`` (the catalog's recoding) when given.

    Unchanged shards (same index content) are kept as they are; shards and splits that no
    longer exist are removed, so the folder always matches the manifest. Progress over the
    tiles (copied or kept) goes to ``log_fn`` (default: the ``seg_pipeline`` logger), since
    copying a large dataset takes a while.
    """
    config = config or ShardSettings()
    dataset_dir = Path(dataset_dir)
    ok = catalog[catalog["status"] == STATUS_OK].set_index("item_id", drop=False)
    manifest: dict[str, Any] = {"format": 1, "tile_format": config.tile_format, "splits": {}}
    written = reused = 0
    split_ids = {
        split: sorted(splits.loc[splits["split"] == split, "item_id"])
        for split in sorted(splits["split"].unique())
    }
    progress = ItemProgress(
        f"shards {dataset_dir.name}",
        sum(len(ids) for ids in split_ids.values()),
        unit="tiles",
        log_fn=log_fn,
    )
    for split, ids in split_ids.items():
        split_dir = dataset_dir / split
        split_dir.mkdir(parents=True, exist_ok=True)
        sweep_stale_temps(split_dir)  # temp/retired shard folders of killed writers, never live ones
        items = [ok.loc[i].to_dict() for i in ids]
        shards: list[dict[str, Any]] = []
        for n, chunk in enumerate(_chunks(items, config)):
            name = f"{SHARD_PREFIX}{n:05d}"
            index_text = _index_text(_index_rows(chunk, split, config.tile_format, mask_values or {}))
            content_hash = hashlib.sha256(index_text.encode()).hexdigest()
            if _existing_hash(split_dir / name) == content_hash:
                reused += 1
                progress.advance(len(chunk), detail=f"{split}/{name} unchanged")
            else:
                _write_shard(
                    split_dir / name, chunk, index_text, config.tile_format, mask_values or {}, progress
                )
                written += 1
            shards.append({"path": f"{split}/{name}", "items": len(chunk), "content_hash": content_hash})
        keep = {Path(s["path"]).name for s in shards}
        for stale in split_dir.glob(f"{SHARD_PREFIX}*"):
            if stale.name not in keep:
                shutil.rmtree(stale)
        manifest["splits"][split] = shards
    for stale_split in dataset_dir.iterdir():
        if (
            stale_split.is_dir()
            and stale_split.name not in manifest["splits"]
            and any(stale_split.glob(f"{SHARD_PREFIX}*"))
        ):
            shutil.rmtree(stale_split)
    all_hashes = [s["content_hash"] for shards in manifest["splits"].values() for s in shards]
    manifest["data_version"] = hashlib.sha256("".join(all_hashes).encode()).hexdigest()
    with atomic_write(dataset_dir / MANIFEST_NAME) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    manifest["stats"] = {"shards_written": written, "shards_reused": reused}
    progress.done(f"{written} written, {reused} unchanged shards")
    return manifest


def read_manifest(dataset_dir: Path | str) -> dict[str, Any]:
    """Load ``manifest.json`` of a sharded dataset."""
    path = Path(dataset_dir) / MANIFEST_NAME
    if not path.exists():
        raise ShardError(f"{path} does not exist: materialize the shards first")
    return json.loads(path.read_text())


def shard_dirs(dataset_dir: Path | str, split: str) -> list[Path]:
    """The shard folders of one split, in order, from the manifest."""
    manifest = read_manifest(dataset_dir)
    if split not in manifest["splits"]:
        raise ShardError(f"split {split!r} not in {dataset_dir}; available: {sorted(manifest['splits'])}")
    return [Path(dataset_dir) / s["path"] for s in manifest["splits"][split]]


def _inside(root: Path, relative: Any, shard: Path, line_no: int, key: str) -> Path:
    if not isinstance(relative, str) or not relative:
        raise ShardError(f"{shard / INDEX_NAME}:{line_no}: {key!r} must be a relative path string")
    candidate = (root / relative).resolve()
    if Path(relative).is_absolute() or not candidate.is_relative_to(root):
        raise ShardError(
            f"{shard / INDEX_NAME}:{line_no}: {key} path {relative!r} escapes the shard root; "
            "index paths must stay inside the shard folder"
        )
    if not candidate.exists():
        raise ShardError(f"{shard / INDEX_NAME}:{line_no}: {key} file {relative!r} is missing")
    return candidate


def read_shard_index(shard_dir: Path | str) -> list[ShardRow]:
    """Read and validate a shard's ``index.jsonl`` (keys present, paths inside the shard)."""
    shard = Path(shard_dir)
    root = shard.resolve()
    index = shard / INDEX_NAME
    if not index.exists():
        raise ShardError(f"{index} does not exist: not a shard folder")
    rows = []
    for line_no, line in enumerate(index.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ShardError(f"{index}:{line_no}: not valid JSON ({exc})") from exc
        missing = [k for k in REQUIRED_INDEX_KEYS if k not in raw]
        if missing:
            raise ShardError(f"{index}:{line_no}: missing keys {missing}")
        target = raw["target"]
        rows.append(
            ShardRow(
                item_id=str(raw["item_id"]),
                split=str(raw["split"]),
                input_path=_inside(root, raw["input"], shard, line_no, "input"),
                target_path=None if target is None else _inside(root, target, shard, line_no, "target"),
                extra={k: v for k, v in raw.items() if k not in REQUIRED_INDEX_KEYS},
            )
        )
    return rows
