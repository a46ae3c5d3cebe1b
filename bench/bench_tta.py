"""Benchmark: our ensemble TTA (2 models x 3 scales x 3 flips = 18 views) against ttach and bare forwards.

Variants, all on the same input and the same two SMP Unet-resnet18 models (6 classes, random init):

- ``bare``: only the 18 forward passes, on inputs augmented beforehand (the compute floor).
- ``ours seq fp32``: ``EnsemblePredictor`` one view per forward pass (``batch_augmentations=False``).
- ``ours batched fp32``: the 3 flips of a scale in one forward pass (``batch_augmentations=True``).
- ``ours seq|batched bf16+CL``: the same with bf16 autocast and channels-last models/inputs.
- ``ttach same job``: one ``ttach.SegmentationTTAWrapper`` per model with a ttach ``DualTransform`` whose
  params are none/h/v, composed with ``ttach.Scale([0.75, 1, 1.25], "bilinear")``: 9 views per model,
  like ours; ttach averages logits, so the models' mean logits are softmaxed at the end.
- ``ttach default``: ``Compose([HorizontalFlip(), VerticalFlip(), Scale([0.75, 1, 1.25])])``, what one
  gets from ttach's building blocks: a product, 2 x 2 x 3 = 12 views per model (adds h+v), nearest
  interpolation (ttach's default), logits averaged.

Run: ``.venv/bin/python bench/bench_tta.py [--repeats 3] [--batches 1 4] [--size 256] [--threads 2]``.
Timings are the best of ``--repeats`` after one warm-up; variants are interleaved in every repeat
so background load hits them alike. Both wall-clock and process CPU seconds are printed. On a
shared machine (load average above the core count) 2-thread timings swing 3-10x because OpenMP
threads wait on each other; ``--threads 1`` with the CPU-time table was stable to a few percent.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import segmentation_models_pytorch as smp
import torch
import ttach
from torch import Tensor, nn
from ttach.base import DualTransform

from seg_pipeline.inference.ensemble import EnsemblePredictor
from seg_pipeline.inference.tta import TTAConfig, apply_transform

NUM_CLASSES = 6
SCALES = (0.75, 1.0, 1.25)
FLIPS = ("none", "h", "v")


class NoneHFlipVFlip(DualTransform):
    """ttach transform with three params (none, h, v): lets ttach do exactly our 9 views per model."""

    identity_param = "none"

    def __init__(self) -> None:
        super().__init__("flip", list(FLIPS))

    def apply_aug_image(self, image: Tensor, flip: str = "none", **kwargs: object) -> Tensor:
        return apply_transform(image, flip)

    def apply_deaug_mask(self, mask: Tensor, flip: str = "none", **kwargs: object) -> Tensor:
        return apply_transform(mask, flip)  # h and v flips are their own inverse


def build_models(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return smp.Unet("resnet18", encoder_weights=None, in_channels=3, classes=NUM_CLASSES).eval()


def bare_forwards(models: list[nn.Module], x: Tensor) -> Callable[[], None]:
    """The 18 forward passes alone, on inputs resized and flipped beforehand."""
    inputs = []
    for scale in SCALES:
        size = (round(x.shape[-2] * scale), round(x.shape[-1] * scale))
        scaled = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
        inputs.extend(apply_transform(scaled, name).contiguous() for name in FLIPS)

    def run() -> None:
        with torch.inference_mode():
            for model in models:
                for augmented in inputs:
                    model(augmented)

    return run


def ttach_ensemble(models: list[nn.Module], transforms: ttach.Compose) -> Callable[[Tensor], Tensor]:
    wrappers = [ttach.SegmentationTTAWrapper(model, transforms, merge_mode="mean") for model in models]

    def run(x: Tensor) -> Tensor:
        with torch.inference_mode():
            return (sum(wrapper(x) for wrapper in wrappers) / len(wrappers)).softmax(dim=1)

    return run


def time_variants(
    variants: dict[str, Callable[[], object]], repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Warm every variant up once, then time them round-robin.

    Returns wall-clock and process CPU seconds per run. CPU time (all threads of this process)
    is far less sensitive than wall time to other jobs competing for the same 2 cores.
    """
    for run in variants.values():  # warm-up (allocator, oneDNN primitive caches)
        run()
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(repeats):
        for name, run in variants.items():
            started, started_cpu = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - started)
            cpu[name].append(time.process_time() - started_cpu)
        progress = ", ".join(f"{name} {wall[name][-1]:.2f}s/{cpu[name][-1]:.2f}cpu" for name in variants)
        print(f"  round {round_index + 1}/{repeats}: {progress}", file=sys.stderr, flush=True)
    return wall, cpu


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    models = [build_models(0), build_models(1)]
    models_cl = [copy.deepcopy(model) for model in models]  # EnsemblePredictor converts these in place
    ours = {
        "ours seq fp32": EnsemblePredictor(models, TTAConfig(batch_augmentations=False)),
        "ours batched fp32": EnsemblePredictor(models, TTAConfig(batch_augmentations=True)),
        "ours seq bf16+CL": EnsemblePredictor(
            models_cl, TTAConfig(batch_augmentations=False, amp_dtype=torch.bfloat16, channels_last=True)
        ),
        "ours batched bf16+CL": EnsemblePredictor(
            models_cl, TTAConfig(batch_augmentations=True, amp_dtype=torch.bfloat16, channels_last=True)
        ),
    }
    same_job = ttach.Compose([NoneHFlipVFlip(), ttach.Scale(list(SCALES), interpolation="bilinear")])
    product = ttach.Compose([ttach.HorizontalFlip(), ttach.VerticalFlip(), ttach.Scale(list(SCALES))])
    ttach_same = ttach_ensemble(models, same_job)
    ttach_default = ttach_ensemble(models, product)
    views = {
        "bare": 18,
        **{name: predictor.forward_views for name, predictor in ours.items()},
        "ttach same job": len(models) * len(same_job),
        "ttach default": len(models) * len(product),
    }

    print(f"bench_tta  {dt.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} torch threads, {platform.platform()}")
    print(f"torch {torch.__version__}, segmentation_models_pytorch {smp.__version__}, ttach 0.0.3")
    print(
        f"2 x Unet-resnet18, {NUM_CLASSES} classes, {args.size}x{args.size}, "
        f"best of {args.repeats} after 1 warm-up"
    )

    print(f"load average at start: {os.getloadavg()[0]:.2f} (other jobs share these 2 cores)", flush=True)
    for batch in args.batches:
        x = torch.rand(batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(batch))
        # Sanity check: our mean_logit merge and ttach's "same job" compute the same thing.
        reference = EnsemblePredictor(models, TTAConfig(merge="mean_logit"))(x)
        difference = (reference - ttach_same(x)).abs().max().item()
        variants: dict[str, Callable[[], object]] = {"bare": bare_forwards(models, x)}
        variants |= {name: (lambda p=predictor, x=x: p(x)) for name, predictor in ours.items()}
        variants |= {
            "ttach same job": lambda x=x: ttach_same(x),
            "ttach default": lambda x=x: ttach_default(x),
        }
        wall, cpu = time_variants(variants, args.repeats)
        print(f"\nbatch {batch}  (max |ours mean_logit - ttach same job| = {difference:.1e})")
        print(f"load average now: {os.getloadavg()[0]:.2f}")
        for label, timings in (("wall-clock", wall), ("process CPU", cpu)):
            seconds = {name: min(values) for name, values in timings.items()}
            ours_best = min(seconds["ours seq fp32"], seconds["ours batched fp32"])
            print(f"[{label} seconds, best of {args.repeats}]")
            header = f"{'variant':<22}{'views':>6}{'best s':>9}{'median s':>10}{'ms/view':>9}"
            print(f"{header}{'vs best ours fp32':>19}")
            for name, value in seconds.items():
                median = statistics.median(timings[name])
                print(
                    f"{name:<22}{views[name]:>6}{value:>9.3f}{median:>10.3f}"
                    f"{1000 * value / views[name]:>9.1f}{value / ours_best:>18.2f}x"
                )
            seq, batched = seconds["ours seq fp32"], seconds["ours batched fp32"]
            bf16 = min(seconds["ours seq bf16+CL"], seconds["ours batched bf16+CL"])
            print(
                f"  overhead ours seq fp32 vs bare: {100 * (seq / seconds['bare'] - 1):+.1f}% | "
                f"batched/seq (fp32): {batched / seq:.2f} | bf16+CL speed-up: {ours_best / bf16:.2f}x | "
                f"ttach same job/ours: {seconds['ttach same job'] / ours_best:.2f}x | "
                f"ttach default/ours: {seconds['ttach default'] / ours_best:.2f}x"
            )

    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
