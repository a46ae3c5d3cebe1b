"""Loader benchmark: our shard datasets vs a plain per-file rasterio Dataset, same augmentation.

Run: ``.venv/bin/python bench/bench_loader.py`` (writes 512 synthetic 256x256 RGB tiles to a temp
folder; ``--data DIR`` uses an existing raw dataset instead). Every loader gets the same tiles,
the same augmentation (D4 flips/rotations + light photometric), ``--workers`` DataLoader
workers, batch ``--batch-size`` and persistent workers. Epoch 1 includes worker start-up and is
reported separately; epoch 2 is the steady state (and, with ``cache_mode=lru``, served from the
per-worker cache). Ratios are against the baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing as mp
import os
import platform
import resource
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import rasterio
import torch
from torch.utils.data import DataLoader, Dataset

from seg_pipeline.data.augment import Augmenter
from seg_pipeline.data.batching import SourceBatches
from seg_pipeline.data.combined import InterleavedSources, RemappedSource
from seg_pipeline.data.datasets import ShardIterableDataset
from seg_pipeline.data.headers import STATUS_OK, build_headers
from seg_pipeline.data.loaders import build_train_loader
from seg_pipeline.data.normalization import BandStats, band_stats_from_catalog, invalid_pixels
from seg_pipeline.data.shards import write_shards
from seg_pipeline.data.spec import DatasetSpec
from seg_pipeline.data.synthetic import SyntheticSpec, write_synthetic_dataset
from seg_pipeline.settings import AugmentSettings, LoaderSettings, ShardSettings


class PerFileRasterioDataset(Dataset):
    """The baseline: open each GeoTIFF with ``rasterio.open`` in every ``__getitem__``."""

    def __init__(
        self, rows: list[dict[str, Any]], stats: BandStats, augmenter: Augmenter, seed: int = 0
    ) -> None:
        self.rows = rows
        self.stats = stats
        self.augmenter = augmenter
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        with rasterio.open(row["image_path"]) as src:
            image = src.read()
            nodata = src.nodata
        mask = None
        if row["mask_path"]:
            with rasterio.open(row["mask_path"]) as src:
                mask = src.read(1)
        self.augmenter.reseed(self.seed, self.epoch, row["item_id"])
        tensor, target = self.augmenter(
            image, mask, stats=self.stats, invalid=invalid_pixels(image, nodata), ignore_index=255
        )
        return {"image": tensor, "mask": target, "item_id": row["item_id"]}


def machine_line() -> str:
    """CPU model, core count, Python/torch versions and the current load."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (
        f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
        f"load average {load}"
    )


def prepare(
    data: Path | None, work: Path, rows: int, cols: int, tile_size: int, per_shard: int
) -> dict[str, Any]:
    """Raw tiles -> catalog -> one ``train`` split -> npy and tif shards."""
    raw = data if data is not None else work / "raw"
    if data is None and not (raw / "images").is_dir():
        write_synthetic_dataset(
            raw, SyntheticSpec(grid_rows=rows, grid_cols=cols, tile_size=tile_size), seed=0
        )
    catalog = build_headers(DatasetSpec(dataset_id="bench", root=raw)).catalog
    ok = catalog[catalog["status"] == STATUS_OK]
    splits = pd.DataFrame({"item_id": ok["item_id"], "split": "train"})
    for fmt in ("npy", "tif"):
        write_shards(
            catalog, splits, work / fmt, ShardSettings(tile_format=fmt, max_items_per_shard=per_shard)
        )
    rows_list = [
        {
            "item_id": r["item_id"],
            "image_path": r["image_path"],
            "mask_path": r["mask_path"] if isinstance(r["mask_path"], str) else None,
        }
        for r in ok.to_dict("records")
    ]
    return {"catalog": catalog, "rows": rows_list, "stats": band_stats_from_catalog(catalog), "n": len(ok)}


def cpu_seconds(loader: DataLoader) -> float:
    """CPU time (user + system) of this process plus the loader's live worker processes."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    total = usage.ru_utime + usage.ru_stime
    workers = getattr(getattr(loader, "_iterator", None), "_workers", None) or []
    ticks = os.sysconf("SC_CLK_TCK")
    for worker in workers:
        try:
            fields = Path(f"/proc/{worker.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, IndexError, ValueError):
            pass
    return total


def time_epochs(
    loader: DataLoader, epochs: int, n_items: int, set_epoch: Callable[[int], None], touch: bool
) -> list[tuple[float, float]]:
    """Per epoch: tiles per second and CPU milliseconds per tile (every item arrives exactly once)."""
    results = []
    cpu_before = cpu_seconds(loader)
    for epoch in range(epochs):
        set_epoch(epoch)
        start = time.perf_counter()
        seen = 0
        for batch in loader:
            seen += batch["image"].shape[0]
            if touch:  # read every pixel in the main process, as a training step would
                float(batch["image"].sum()) + int(batch["mask"].sum())
        elapsed = time.perf_counter() - start
        if seen != n_items:
            raise RuntimeError(f"epoch {epoch}: saw {seen} tiles, expected {n_items}")
        cpu_after = cpu_seconds(loader)
        results.append((n_items / elapsed, (cpu_after - cpu_before) / n_items * 1e3))
        cpu_before = cpu_after
    return results


def work_cost_ms(dataset: ShardIterableDataset, n_items: int, epochs: int = 2) -> float:
    """CPU ms per tile of decode + augment alone: a batch-mode dataset read in this process, one
    torch thread, no workers (so no transfer between processes); the first epoch warms up.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cost = 0.0
        for epoch in range(epochs + 1):
            dataset.set_epoch(epoch)
            start = time.process_time()
            for raw in dataset:
                dataset.finish_batch(raw, threads=1)
            if epoch > 0:
                cost += time.process_time() - start
        return cost / (epochs * n_items) * 1e3
    finally:
        torch.set_num_threads(previous)


def _timed_work(make: Callable[[], ShardIterableDataset], out: Any) -> None:
    """In a child process: wall seconds of one epoch of decode + augment alone, after a warm-up one."""
    torch.set_num_threads(1)
    dataset = make()
    for epoch in range(2):  # the first epoch warms up
        dataset.set_epoch(epoch)
        start = time.perf_counter()
        for raw in dataset:
            dataset.finish_batch(raw, threads=1)
    out.put(time.perf_counter() - start)


def side_by_side_rate(make: Callable[[], ShardIterableDataset], n_items: int, copies: int) -> float:
    """Tiles/s of ``copies`` processes doing decode + augment alone at the same time (fork): what
    the cores give when all of them work, which can be less than ``copies`` x one process alone
    (shared caches and memory bandwidth; on a VM, the host).
    """
    context = mp.get_context("fork")
    out = context.Queue()
    processes = [context.Process(target=_timed_work, args=(make, out)) for _ in range(copies)]
    for process in processes:
        process.start()
    walls = [out.get() for _ in processes]
    for process in processes:
        process.join()
    return sum(n_items / wall for wall in walls)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="existing raw dataset (images/ + masks/)")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--cols", type=int, default=32)
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--per-shard", type=int, default=32, help="max items per shard")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None, help="subset of loader names to run")
    parser.add_argument("--touch", action="store_true", help="sum every batch in the main process")
    parser.add_argument(
        "--work", type=Path, default=None, help="keep prepared shards here (reused if present)"
    )
    args = parser.parse_args(argv)
    print(f"date: {dt.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {machine_line()}")
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        work = args.work if args.work is not None else Path(tmp)
        start = time.perf_counter()
        data = prepare(args.data, work, args.rows, args.cols, args.tile_size, args.per_shard)
        n = data["n"]
        print(
            f"prepared {n} tiles in {time.perf_counter() - start:.1f}s; workers={args.workers}, "
            f"batch={args.batch_size}, epochs={args.epochs}, augmentation=AugmentSettings()"
        )
        config = AugmentSettings()
        stats = data["stats"]

        def ours(fmt: str, cache: str, batched: bool = False) -> tuple[DataLoader, Callable[[int], None]]:
            dataset = ShardIterableDataset(
                work / fmt,
                "train",
                stats=stats,
                augmenter=Augmenter(config, seed=0),
                batch_size=args.batch_size if batched else None,
            )
            loader_config = LoaderSettings(
                num_workers=args.workers,
                batch_size=args.batch_size,
                persistent_workers=args.workers > 0,
                cache_mode=cache,
            )
            return build_train_loader(dataset, loader_config, seed=0), dataset.set_epoch

        def stage(fmt: str, batches: bool) -> tuple[DataLoader, Callable[[int], None]]:
            """What a training stage builds: one source interleaved, collated or in SourceBatches."""
            source = ShardIterableDataset(
                work / fmt, "train", stats=stats, augmenter=Augmenter(config, seed=0)
            )
            stream = InterleavedSources([RemappedSource(source, None, name="bench/train")], seed=0)
            dataset: Any = SourceBatches(stream, args.batch_size) if batches else stream
            loader_config = LoaderSettings(
                num_workers=args.workers,
                batch_size=args.batch_size,
                persistent_workers=args.workers > 0,
                cache_mode="none",
            )
            return build_train_loader(dataset, loader_config, seed=0), dataset.set_epoch

        def baseline() -> tuple[DataLoader, Callable[[int], None]]:
            dataset = PerFileRasterioDataset(data["rows"], stats, Augmenter(config, seed=0))
            loader = DataLoader(
                dataset,
                batch_size=args.batch_size,
                shuffle=True,
                num_workers=args.workers,
                persistent_workers=args.workers > 0,
            )

            def set_epoch(epoch: int) -> None:
                dataset.epoch = epoch

            return loader, set_epoch

        candidates: dict[str, Callable[[], tuple[DataLoader, Callable[[int], None]]]] = {
            "baseline: per-file rasterio Dataset": baseline,
            "ShardIterableDataset npy": lambda: ours("npy", "none"),
            "ShardIterableDataset tif": lambda: ours("tif", "none"),
            "ShardIterableDataset npy + lru cache": lambda: ours("npy", "lru"),
            "ShardIterableDataset tif + lru cache": lambda: ours("tif", "lru"),
            "ShardIterableDataset npy, batched": lambda: ours("npy", "none", batched=True),
            "ShardIterableDataset tif, batched": lambda: ours("tif", "none", batched=True),
            "ShardIterableDataset tif, batched + lru": lambda: ours("tif", "lru", batched=True),
            "stage path npy, per sample + collate": lambda: stage("npy", batches=False),
            "stage path npy, SourceBatches": lambda: stage("npy", batches=True),
        }

        def batch_mode_dataset() -> ShardIterableDataset:
            """Decode + augment alone: the npy shards in batch mode, read where it is made."""
            return ShardIterableDataset(
                work / "npy",
                "train",
                stats=stats,
                augmenter=Augmenter(config, seed=0),
                batch_size=args.batch_size,
            )

        def alone() -> float:
            return work_cost_ms(batch_mode_dataset(), n)

        work_before = alone()
        results: dict[str, list[tuple[float, float]]] = {}
        for name, make in candidates.items():
            if args.only and not any(key in name for key in args.only):
                continue
            loader, set_epoch = make()
            results[name] = time_epochs(loader, args.epochs, n, set_epoch, args.touch)
            del loader
        base = results.get("baseline: per-file rasterio Dataset")
        print(
            f"{'loader':44s} {'epoch 1':>8s} | {'epoch 2+ tiles/s':>16s} {'x base':>7s} "
            f"{'CPU ms/tile':>11s} {'x base':>7s}"
        )
        for name, per_epoch in results.items():
            first = per_epoch[0][0]
            rate = sum(r for r, _ in per_epoch[1:]) / max(len(per_epoch) - 1, 1)
            cpu = sum(c for _, c in per_epoch[1:]) / max(len(per_epoch) - 1, 1)
            line = f"{name:44s} {first:8.0f} | {rate:16.0f}"
            if base:
                base_rate = sum(r for r, _ in base[1:]) / max(len(base) - 1, 1)
                base_cpu = sum(c for _, c in base[1:]) / max(len(base) - 1, 1)
                line += f" {rate / base_rate:7.2f} {cpu:11.2f} {base_cpu / cpu:7.2f}"
            print(line)
        print(
            "epoch 1 includes worker start-up; 'epoch 2+' averages the later epochs (served from the "
            "per-worker cache with lru); CPU ms/tile counts the main process and the workers."
        )
        cost = (work_before + alone()) / 2
        ceiling = args.workers / (cost / 1e3) if args.workers else 1 / (cost / 1e3)
        print(
            f"decode + augment alone (npy, batch mode, one process, one thread): {cost:.2f} CPU ms/tile "
            f"(mean of {work_before:.2f} before the loaders and {2 * cost - work_before:.2f} after: this VM "
            f"drifts); {max(args.workers, 1)} cores at that cost: {ceiling:.0f} tiles/s"
        )
        copies = max(args.workers, 1)
        together = side_by_side_rate(batch_mode_dataset, n, copies)
        print(
            f"{copies} copies of decode + augment alone side by side (one process each): "
            f"{together:.0f} tiles/s together, {together / ceiling:.0%} of {copies} x one alone"
        )
        for name, per_epoch in results.items():
            if "batched" in name or "SourceBatches" in name:
                rate = sum(r for r, _ in per_epoch[1:]) / max(len(per_epoch) - 1, 1)
                print(
                    f"  {name}: {rate / ceiling:.0%} of {copies} x one alone, "
                    f"{rate / together:.0%} of side by side"
                )
        print(f"load average after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
