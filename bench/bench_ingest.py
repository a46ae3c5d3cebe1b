"""Ingest throughput: header building (cold and incremental) and shard writing (tif, npy).

Prints files/s side by side; the incremental rebuild is compared with the cold build it skips.

    .venv/bin/python bench/bench_ingest.py --rows 16 --cols 32 --tile-size 256
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from seg_pipeline.data.headers import build_headers, write_catalog
from seg_pipeline.data.shards import write_shards
from seg_pipeline.data.spec import DatasetSpec
from seg_pipeline.data.splits import assign_splits
from seg_pipeline.data.synthetic import SyntheticSpec, write_synthetic_dataset
from seg_pipeline.settings import ShardSettings, SplitSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--cols", type=int, default=32)
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--bands", choices=("rgb", "s2"), default="rgb")
    args = parser.parse_args()
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} | {platform.platform()} | cpus={os.cpu_count()}")
    work = Path(tempfile.mkdtemp(prefix="bench_ingest_"))
    try:
        spec = SyntheticSpec(
            grid_rows=args.rows, grid_cols=args.cols, tile_size=args.tile_size, bands=args.bands
        )
        raw = write_synthetic_dataset(work / "raw", spec, seed=0)
        n_files = sum(1 for _ in raw.rglob("*.tif"))
        n_tiles = args.rows * args.cols
        print(f"{n_tiles} tiles ({n_files} files incl. masks) of {args.tile_size}^2 {args.bands}")
        dataset = DatasetSpec(dataset_id="bench", root=raw)
        cold = build_headers(dataset)
        write_catalog(cold.catalog, work / "headers.parquet", cold.class_names)
        warm = build_headers(dataset, previous_catalog=work / "headers.parquet")
        splits = assign_splits(cold.catalog, SplitSettings(policy="supervised"))
        rows = [
            ("headers, cold", cold.seconds, n_files),
            ("headers, incremental (unchanged)", warm.seconds, n_files),
        ]
        for fmt in ("tif", "npy"):
            start = time.perf_counter()
            write_shards(cold.catalog, splits, work / f"shards_{fmt}", ShardSettings(tile_format=fmt))
            rows.append((f"shards, {fmt}", time.perf_counter() - start, n_tiles))
        print(f"{'step':<36}{'seconds':>9}{'items/s':>11}")
        for name, seconds, items in rows:
            print(f"{name:<36}{seconds:>9.3f}{items / seconds:>11.0f}")
        print(
            f"incremental rebuild vs cold: {cold.seconds / warm.seconds:.1f}x faster ({warm.n_reused} reused)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
