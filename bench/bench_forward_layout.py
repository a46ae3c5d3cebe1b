"""Seconds per megapixel of one forward pass by dtype, memory layout, window side and batch.

What the inference defaults rest on (``PredictSettings.bf16``, ``channels_last`` and the CPU's
one window per pass): an SMP Unet-resnet18 (2 classes, random init) in eval mode under
``torch.inference_mode``, softmax included, best of ``--repeats`` after one warm-up, and the system
(kernel) CPU seconds of that pass, which show the page faults of large activations.

    .venv/bin/python bench/bench_forward_layout.py [--sides 384 512 768 1024 1280] [--batches 1 4]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import time

import segmentation_models_pytorch as smp
import torch

from seg_pipeline.hardware import cpu_flags


def timed_pass(
    model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None, repeats: int
) -> tuple[float, float]:
    """(wall s, system CPU s) of the fastest of ``repeats`` passes after one warm-up."""
    best = (float("inf"), 0.0)
    with (
        torch.inference_mode(),
        torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None),
    ):
        for attempt in range(repeats + 1):
            sys_before, started = resource.getrusage(resource.RUSAGE_SELF).ru_stime, time.perf_counter()
            model(x).float().softmax(1)
            wall = time.perf_counter() - started
            if attempt and wall < best[0]:
                best = (wall, resource.getrusage(resource.RUSAGE_SELF).ru_stime - sys_before)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[384, 512, 768, 1024, 1280])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flags = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in cpu_flags())
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} | {platform.machine()} | {os.cpu_count()} cores | "
          f"flags: {flags} | torch {torch.__version__} | threads {args.threads}")  # fmt: skip
    torch.manual_seed(0)
    model = smp.Unet("resnet18", encoder_weights=None, classes=2).eval()
    print("| dtype | layout | side | batch | s/pass | s/Mpx | sys s |\n|---|---|---|---|---|---|---|")
    for dtype in (None, torch.bfloat16):
        for channels_last in (False, True):
            layout = torch.channels_last if channels_last else torch.contiguous_format
            model = model.to(memory_format=layout)
            for side in args.sides:
                for batch in args.batches:
                    x = torch.rand(batch, 3, side, side).contiguous(memory_format=layout)
                    wall, system = timed_pass(model, x, dtype, args.repeats)
                    name, order = "bf16" if dtype else "fp32", "NHWC" if channels_last else "NCHW"
                    per_mpx = wall / (batch * side * side / 1e6)
                    cells = (name, order, side, batch, f"{wall:.3f}", f"{per_mpx:.3f}", f"{system:.2f}")
                    print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
