"""Peak RSS of every stage on whole scenes: memory must follow blocks and windows, not the scene.

Writes two ``--side`` x ``--side`` RGB GeoTIFF scenes (train/ and val/ folders, tiled, deflate) with
2-class masks, then runs each stage in its own Python process through the library workflows (the
calls the Dagster assets make) and prints the process's peak RSS (``ru_maxrss``) next to the
scene's decoded size, and the RSS of a process that only imports the same modules (the floor):

    .venv/bin/python bench/bench_scene_memory.py --side 6000
    .venv/bin/python bench/bench_scene_memory.py --side 10000 --tile-format npy

Stages: headers (catalogue), splits, shards, train (stage 1, 4 steps of 4 patches of 512 px, then
validation of the whole val scene from disk), predict (the val scene, one TTA view), evaluate.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("imports", "headers", "splits", "shards", "train", "predict", "evaluate")


def write_scenes(raw: Path, side: int) -> None:
    """Two scenes (one per fixed split) and masks, written in row blocks (never whole in memory)."""
    import numpy as np
    import rasterio
    from rasterio.windows import Window

    profile = {"driver": "GTiff", "width": side, "height": side, "dtype": "uint8", "crs": "EPSG:32636",
               "transform": rasterio.transform.from_origin(4e5, 4e4, 0.5, 0.5), "tiled": True,
               "blockxsize": 512, "blockysize": 512, "compress": "deflate"}  # fmt: skip
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for sub in ("images", "masks"):
            (raw / split / sub).mkdir(parents=True, exist_ok=True)
        image_path, mask_path = (
            raw / split / "images" / f"{split}.tif",
            raw / split / "masks" / f"{split}.tif",
        )
        with (
            rasterio.open(image_path, "w", count=3, **profile) as image,
            rasterio.open(mask_path, "w", count=1, **profile) as mask,
        ):
            for top in range(0, side, 500):
                height = min(500, side - top)
                rows = np.arange(top, top + height)[:, None]
                labels = (((rows // 97) + (np.arange(side) // 131)) % 2).astype(np.uint8)
                noise = rng.integers(0, 40, (3, height, side), dtype=np.uint8)
                window = Window(0, top, side, height)
                image.write(
                    noise + np.stack([labels * 120, labels * 60 + 60, 150 - labels * 100]), window=window
                )
                mask.write(labels[np.newaxis], window=window)
    (raw / "classes.txt").write_text("background\nbuilding\n")


def run_stage(stage: str, work: Path, tile_format: str) -> None:
    """One stage, reading its inputs' contracts from ``work`` and writing its own there."""
    from seg_pipeline.contracts import (
        AuxiliarySet,
        Catalog,
        PredictionSet,
        ShardSet,
        SplitTable,
        TrainedModel,
    )
    from seg_pipeline.settings import (
        DatasetSettings,
        EvaluationSettings,
        PredictSettings,
        PretrainSettings,
        ShardSettings,
        SplitSettings,
    )  # fmt: skip
    from seg_pipeline.workflows import ingest
    from seg_pipeline.workflows.layout import DataLayout
    from seg_pipeline.workflows.predict import predict_split
    from seg_pipeline.workflows.report import build_report
    from seg_pipeline.workflows.train import StageRun, pretrain

    layout, log = DataLayout.at(work / "data"), lambda _line: None
    contract = work / "contracts"
    contract.mkdir(exist_ok=True)
    if stage == "headers":
        run = ingest.catalogue(DatasetSettings(dataset_id="scene"), layout, log)
        (contract / "catalog.json").write_text(run.catalog.to_json())
    elif stage == "splits":
        catalog = Catalog.from_json((contract / "catalog.json").read_text())
        table = ingest.split(SplitSettings(policy="fixed"), catalog, log)
        (contract / "splits.json").write_text(table.to_json())
    elif stage == "shards":
        catalog = Catalog.from_json((contract / "catalog.json").read_text())
        table = SplitTable.from_json((contract / "splits.json").read_text())
        shards = ingest.shard(ShardSettings(tile_format=tile_format), catalog, table, log).shards
        (contract / "shards.json").write_text(shards.to_json())
    elif stage == "train":
        shards = ShardSet.from_json((contract / "shards.json").read_text())
        settings = PretrainSettings.parse({
            "model": {"architecture": "unet", "encoder": "resnet18"},
            "loop": {"epochs": 1, "max_steps_per_epoch": 4, "ema_decay": None,
                     "early_stopping_patience": None},
            "scheduler": {"warmup_epochs": 0.0}, "loader": {"batch_size": 4}, "patches": {"size": 512},
        })  # fmt: skip
        trained = pretrain(
            settings, shards, AuxiliarySet(data_version="none"), StageRun(work / "ckpt", log_fn=log)
        )
        (contract / "trained.json").write_text(trained.to_json())
    elif stage == "predict":
        shards = ShardSet.from_json((contract / "shards.json").read_text())
        trained = TrainedModel.from_json((contract / "trained.json").read_text())
        predict = PredictSettings.parse({"split": "val", "tta": {"scales": [1.0], "flips": ["none"]}})
        predictions = predict_split(
            predict, shards, [("pretrain", trained)], "pretrain", work / "pred", log_fn=log
        )
        (contract / "predictions.json").write_text(predictions.to_json())
    elif stage == "evaluate":
        predictions = PredictionSet.from_json((contract / "predictions.json").read_text())
        build_report(EvaluationSettings(), predictions, work / "report", log_fn=log)


def child(stage: str, work: Path, tile_format: str) -> None:
    started = time.perf_counter()
    if stage != "imports":
        run_stage(stage, work, tile_format)
    else:
        run_stage("none", work, tile_format)  # the imports of every stage, no work
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"RESULT {stage} {rss_mb:.0f} {time.perf_counter() - started:.1f}")


def cpu_flags() -> str:
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma")
    return " ".join(f for f in wanted if f" {f}" in flags) or "none of " + ",".join(wanted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=6000)
    parser.add_argument("--tile-format", choices=["tif", "npy"], default="tif")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        child(args.stage, args.work, args.tile_format)
        return
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.machine())  # fmt: skip
    now = f"{datetime.datetime.now():%Y-%m-%d %H:%M}"
    print(f"# {now} | {model} | {os.cpu_count()} cores | flags: {cpu_flags()}")
    with tempfile.TemporaryDirectory(prefix="bench_scene_") as tmp:
        work = Path(tmp)
        write_scenes(work / "data" / "raw" / "scene", args.side)
        decoded = 3 * args.side * args.side * 4 / 2**20
        print(
            f"scene {args.side} x {args.side} x 3: {decoded:.0f} MB as float32 (uint8 {decoded / 4:.0f} MB)"
        )
        print("| stage | peak RSS MB | above the imports floor MB | seconds |\n|---|---|---|---|")
        floor = None
        for stage in STAGES:
            out = subprocess.run(
                [sys.executable, __file__, "--stage", stage, "--work", str(work), "--tile-format",
                 args.tile_format],
                capture_output=True, text=True, cwd=REPO,
            )  # fmt: skip
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")), None)
            if out.returncode != 0 or line is None:
                print(out.stdout[-2000:], out.stderr[-4000:])
                raise SystemExit(f"stage {stage} failed")
            _, name, rss, seconds = line.split()
            floor = float(rss) if floor is None else floor
            print(f"| {name} | {float(rss):.0f} | {float(rss) - floor:.0f} | {seconds} |")


if __name__ == "__main__":
    main()
