"""Sliding-window ensemble TTA against the bare forward passes over exactly the same pixels.

Two SMP Unet-resnet18 models (2 classes, random init), 3 scales x 3 flips = 18 views per window, as
``ensemble_predictions`` runs them (``predict_files``: every member's and the ensemble's class map
from one set of forward passes, blended windows, GeoTIFF writers). The baseline runs the same
forward passes (same window batches, same scales and flips, same precision and memory layout) and
nothing else, with the models as SMP builds them; ``fold_batchnorm`` is on by default in ours, so
the script also times the bare passes over the same BatchNorm-folded models ("overhead vs
folded": what the sliding windows, blending and writers cost beyond those passes).
``overhead_pct`` = (ours - bare) / bare x 100; window overlap is counted as overhead (the bare
passes see each window once, with no overlap). Cases:

- ``tiles``: a folder of ``--tiles`` 480 x 320 RGB photos (one window each);
- ``raster``: one ``--side`` x ``--side`` GeoTIFF (default windows: up to 1024 px, overlap >= 32).

A smaller overlap is cheaper but blends fewer pixels, so the script also prints how much of a
``--seam-side`` crop's class map differs from one whole-crop forward pass (one member, one view)
for the default windows and for the former 512 px / 64 px ones: what the windows cost in agreement.

    .venv/bin/python bench/bench_predict.py --tiles 8 --side 4000
    python bench/bench_predict.py --device cuda --tiles 64 --side 8000   # on a GPU: same comparison

With ``--device cuda`` ours and the bare passes run on the GPU (the bare passes wait for the device
before their clock stops), at the GPU defaults of ``windows.batch_size`` and precision.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import segmentation_models_pytorch as smp
import torch

from seg_pipeline.data.normalization import BandStats
from seg_pipeline.hardware import cpu_flags, resolve_device
from seg_pipeline.inference.ensemble import inference_channels_last, inference_dtype
from seg_pipeline.inference.folding import fold_batchnorm
from seg_pipeline.inference.predict import LoadedModel, predict_files
from seg_pipeline.inference.sliding import sliding_probabilities
from seg_pipeline.inference.tta import TTAConfig, apply_transform, invert_transform
from seg_pipeline.inference.windows import window_grid
from seg_pipeline.settings import PredictSettings
from seg_pipeline.settings.inference import WindowSettings

SCALES, FLIPS = (0.75, 1.0, 1.25), ("none", "h", "v")


def write_rgb(path: Path, height: int, width: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    profile = {"driver": "GTiff", "height": height, "width": width, "count": 3, "dtype": "uint8",
               "tiled": True, "blockxsize": 256, "blockysize": 256}  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(rng.integers(0, 255, (3, height, width), dtype=np.uint8))


def models() -> list[LoadedModel]:
    stats = BandStats((120.0, 120.0, 120.0), (60.0, 60.0, 60.0))
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = smp.Unet("resnet18", encoder_weights=None, classes=2).eval()
        out.append(LoadedModel(f"m{seed}", net, ("background", "building"), stats, f"seed {seed}"))
    return out


def bare_passes(
    members: list[torch.nn.Module],
    paths: list[Path],
    window: int,
    batch: int,
    tta: TTAConfig,
    device: torch.device,
) -> float:
    """Seconds of the forward passes alone over the same windows, views, precision and layout."""
    layout = torch.channels_last if tta.channels_last else torch.contiguous_format
    nets = [member.to(device, memory_format=layout) for member in members]  # once, outside the timing
    started = time.perf_counter()
    for path in paths:
        with rasterio.open(path) as src:
            grid = window_grid(src.height, src.width, window, 0)
            for start in range(0, len(grid), batch):
                crops = [src.read(window=w).astype(np.float32) for w in grid[start : start + batch]]
                x = torch.from_numpy(np.stack(crops)).to(device)
                with torch.inference_mode(), torch.autocast(device.type, dtype=tta.amp_dtype or torch.float32,
                                                            enabled=tta.amp_dtype is not None):  # fmt: skip
                    for net in nets:
                        for scale in SCALES:
                            size = [max(32, round(s * scale / 32) * 32) for s in x.shape[-2:]]
                            scaled = torch.nn.functional.interpolate(x, size=size, mode="bilinear")
                            for flip in FLIPS:
                                view = apply_transform(scaled, flip).contiguous(memory_format=layout)
                                invert_transform(net(view), flip)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def seam_disagreement(member: LoadedModel, side: int, windows: WindowSettings) -> float:
    """Percent of a ``side`` px crop whose windowed class differs from one whole-crop forward pass."""
    image = torch.from_numpy(np.random.default_rng(7).normal(0.0, 1.0, (3, side, side)).astype(np.float32))
    image = image.to(next(member.model.parameters()).device)

    def predict(x: torch.Tensor) -> torch.Tensor:
        return member.model(x).softmax(1)

    with torch.inference_mode():
        whole = predict(image[None])[0].argmax(0)
        windowed = sliding_probabilities(predict, image, windows).argmax(0)
    return 100.0 * float((whole != windowed).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=8)
    parser.add_argument("--side", type=int, default=2000)
    parser.add_argument(
        "--batch-size", type=int, default=None, help="windows per pass (default: the CPU default, 1)"
    )
    parser.add_argument("--seam-side", type=int, default=1536, help="crop side of the seam check (0 = skip)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where both sides run")
    args = parser.parse_args()
    device = resolve_device(args.device)  # refuses cuda where torch sees no GPU
    flags = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in cpu_flags())
    now, cpu = f"{datetime.datetime.now():%Y-%m-%d %H:%M}", platform.processor() or platform.machine()
    print(f"# {now} | {cpu} | {os.cpu_count()} cores | flags: {flags} | torch {torch.__version__} | "
          f"threads {torch.get_num_threads()}")  # fmt: skip
    if device.type == "cuda":
        print(f"# device: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}")
    members = models()
    tta_settings = {"scales": list(SCALES), "flips": list(FLIPS)}
    settings = PredictSettings.parse(
        {
            "tta": tta_settings,
            "windows": {"batch_size": args.batch_size},
            "color_png": False,
            "device": args.device,
        }
    )
    amp_dtype, reason = inference_dtype(device, settings.bf16)
    channels_last = inference_channels_last(device, settings.channels_last)
    tta = TTAConfig.from_settings(settings.tta, amp_dtype=amp_dtype, channels_last=channels_last)
    print(f"precision: {reason}; channels_last={channels_last}; "
          f"windows per pass {settings.windows.for_device(device.type).windows_per_pass}")  # fmt: skip
    overheads = []
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        work = Path(tmp)
        cases = {
            "tiles": [work / f"tile_{i}.tif" for i in range(args.tiles)],
            "raster": [work / "raster.tif"],
        }
        for i, path in enumerate(cases["tiles"]):
            write_rgb(path, 320, 480, i)
        write_rgb(cases["raster"][0], args.side, args.side, 99)
        print(
            "| case | pixels | ours s | bare forwards s | overhead_pct | bare, BN folded s "
            "| overhead vs folded pct | Mpx/s |\n|---|---|---|---|---|---|---|---|"
        )
        for name, paths in cases.items():
            outs = {m.name: work / name / m.name for m in members} | {"ensemble": work / name / "ensemble"}
            started = time.perf_counter()
            predict_files(members, [(p.stem, p) for p in paths], outs, settings)
            ours = time.perf_counter() - started
            batch = settings.windows.for_device(device.type).windows_per_pass
            bare = bare_passes([m.model for m in members], paths, settings.windows.window, batch, tta, device)
            folded = [fold_batchnorm(m.model).model for m in members]
            bare_folded = bare_passes(folded, paths, settings.windows.window, batch, tta, device)
            pixels = sum(rasterio.open(p).width * rasterio.open(p).height for p in paths)
            overhead = 100 * (ours - bare) / bare
            machinery = 100 * (ours - bare_folded) / bare_folded
            overheads.append(overhead)
            mpx = pixels / 1e6
            print(f"| {name} | {mpx:.2f} M | {ours:.1f} | {bare:.1f} | {overhead:.1f} | {bare_folded:.1f} "
                  f"| {machinery:.1f} | {mpx / ours:.3f} |")  # fmt: skip
    if args.seam_side:
        for label, windows in (
            ("default", settings.windows),
            ("512/64", WindowSettings(window=512, overlap=64)),
        ):
            grid = window_grid(args.seam_side, args.seam_side, windows.window, windows.overlap)
            pct = seam_disagreement(members[0], args.seam_side, windows)
            print(f"seams {label}: {len(grid)} windows of {grid[0].height} px (overlap >= {windows.overlap})"
                  f" over {args.seam_side} px: {pct:.3f} % differ from one whole-crop pass")  # fmt: skip
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    print(f"overhead_pct={max(overheads):.1f}")


if __name__ == "__main__":
    main()
