"""Peak RSS of ``seg-pipeline predict`` on one large scene: memory must follow the window, not the raster.

Writes a ``--side`` x ``--side`` RGB GeoTIFF (tiled 512 px, deflate; written in row blocks) and a
stage checkpoint of an untrained SMP Unet-resnet18 (3 bands, 2 classes), then runs the command a
user runs, each in its own process, and prints each process's peak RSS (``ru_maxrss``):

- ``floor``: the same command on a 256 x 256 raster (imports, model, writers);
- ``scene``: the command on the scene, default windows (512, overlap 64, batch 4) and preview.

TTA views run one after another inside a window batch, so they change time, not memory; the
default 3 scales x 3 flips would take about 9 times longer on a CPU, so ``--views`` defaults to
``--scales 1 --flips none`` (the issue's own measurement); ``--views default`` runs all 9.

    .venv/bin/python bench/bench_predict_memory.py --side 10000
    .venv/bin/python bench/bench_predict_memory.py --side 10000 --batch-size 1
    .venv/bin/python bench/bench_predict_memory.py --side 3000 --views default
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

from seg_pipeline.hardware import cpu_flags
from seg_pipeline.models.checkpoint import save_checkpoint
from seg_pipeline.models.factory import build_model
from seg_pipeline.settings import ModelSpec

CLASSES = ["background", "building"]


def write_scene(path: Path, side: int) -> None:
    """An RGB scene written 512 rows at a time (never whole in memory)."""
    profile = {"driver": "GTiff", "width": side, "height": side, "count": 3, "dtype": "uint8",
               "crs": "EPSG:32636", "transform": rasterio.transform.from_origin(4e5, 4e4, 0.5, 0.5),
               "tiled": True, "blockxsize": 512, "blockysize": 512, "compress": "deflate"}  # fmt: skip
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        for top in range(0, side, 512):
            height = min(512, side - top)
            dst.write(
                rng.integers(0, 255, (3, height, side), dtype=np.uint8), window=Window(0, top, side, height)
            )


def write_checkpoint(path: Path) -> Path:
    """A stage checkpoint as training writes it: weights, model spec, classes and band statistics."""
    spec = ModelSpec(architecture="unet", encoder="resnet18", in_channels=3, num_classes=len(CLASSES))
    model = build_model(spec)
    run = {
        "class_names": CLASSES,
        "normalization": {"mean": [127.0] * 3, "std": [60.0] * 3},
        "ignore_index": 255,
    }
    return save_checkpoint(
        path,
        {"model": model.state_dict(), "model_spec": spec.model_dump(), "config": {"run": run}},
        check_plain=False,
    )


def predict(
    checkpoint: Path, folder: Path, out: Path, views: str, batch_size: int | None
) -> tuple[float, float]:
    """Run the CLI in a child process; return (its peak RSS in MB, its wall seconds)."""
    extra = [] if views == "default" else ["--scales", "1", "--flips", "none"]
    extra += [] if batch_size is None else ["--batch-size", str(batch_size)]
    command = [sys.executable, "-c",
               "import resource, runpy, sys; sys.argv = ['seg-pipeline', *sys.argv[1:]]\n"
               "try:\n    runpy.run_module('seg_pipeline.cli', run_name='__main__')\nfinally:\n"
               "    print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)",
               "predict", "--model", str(checkpoint), "--input", str(folder), "--output", str(out),
               "--device", "cpu", *extra]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    peak_kb = next(int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("PEAK"))
    return peak_kb / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=10000)
    parser.add_argument("--views", choices=["one", "default"], default="one")
    parser.add_argument("--batch-size", type=int, help="windows per forward pass (default: the CLI's)")
    args = parser.parse_args()
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma"})
    cache = os.environ.get("GDAL_CACHEMAX", "default")
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} | {platform.platform()} | {os.cpu_count()} cores | "
          f"flags {' '.join(flags) or 'none'} | GDAL_CACHEMAX {cache}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench_predict_memory_") as tmp:
        work = Path(tmp)
        checkpoint = write_checkpoint(work / "model.pt")
        write_scene(work / "small" / "small.tif", 256)
        write_scene(work / "scene" / "scene.tif", args.side)
        floor, floor_s = predict(checkpoint, work / "small", work / "out_small", args.views, args.batch_size)
        peak, seconds = predict(checkpoint, work / "scene", work / "out_scene", args.views, args.batch_size)
    decoded = 3 * args.side**2 / 2**20
    views = "3 scales x 3 flips" if args.views == "default" else "--scales 1 --flips none"
    views += f", --batch-size {args.batch_size}" if args.batch_size else ", default batch size"
    print("\n| case | peak RSS MB | wall s |\n|---|---|---|")
    print(f"| floor: 256 px raster | {floor:.0f} | {floor_s:.1f} |")
    print(f"| {args.side} px scene ({decoded:.0f} MB decoded RGB), {views} | {peak:.0f} | {seconds:.1f} |")
    print(f"\nscene peak - floor = {peak - floor:.0f} MB; peak / decoded scene = {peak / decoded:.2f}")


if __name__ == "__main__":
    main()
