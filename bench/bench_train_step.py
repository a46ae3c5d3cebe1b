"""Benchmark: seconds per training step of our ``fit`` machinery vs a bare SMP loop (DESIGN section 8).

Rows (same model: SMP Unet-resnet18, encoder_weights=None, 3 -> 6 classes; data already in memory):
  a  bare loop, fp32: forward, F.cross_entropy, backward, AdamW step
  b  our fit() in fp32: objective + grad clipping + EMA + progress logging + cosine scheduler
  c  bare loop with bf16 autocast + channels_last (input converted every step, as a loader would need)
  d  our fit() with the default CPU policy (bf16 autocast + channels_last)
Goals: b within 5% of a; d at least 2.3x faster than a.
``--detail`` adds a2 (bare loop with the same fused AdamW as ours, isolating the machinery cost)
and b0 (our fit() without EMA, isolating the EMA cost).

Step time = time between the starts of consecutive steps (so it includes optimizer, EMA, scheduler
and logging work), warm-up steps excluded, median over all measured steps of all rounds (the
fastest step is printed too: on a shared 2-core box it is the least disturbed figure). Rounds
interleave the rows so that load from other processes hits them alike.

    .venv/bin/python bench/bench_train_step.py --size 256 --batch 8 --steps 10
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from seg_pipeline.training.loop import SupervisedObjective, TrainConfig, fit
from seg_pipeline.training.optim import build_optimizer, build_scheduler

CLASSES = 6
IGNORE_INDEX = 255


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return smp.Unet("resnet18", encoder_weights=None, in_channels=3, classes=CLASSES)


def make_batch(batch: int, size: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(batch, 3, size, size, generator=generator)
    mask = torch.randint(0, CLASSES, (batch, size, size), generator=generator)
    mask[:, :8, :] = IGNORE_INDEX  # a band of unlabeled pixels, as in real tiles
    return {"image": image, "mask": mask, "item_id": [str(i) for i in range(batch)]}


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)


def bare_loop(
    batch: dict[str, Any], steps: int, amp: bool, channels_last: bool, fused: bool | None = None
) -> list[float]:
    """What a user writes by hand: AdamW (torch default unless ``fused``), no clipping/EMA/logging."""
    model = make_model()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=1e-2, fused=fused)
    starts = []
    for _ in range(steps + 1):
        starts.append(time.perf_counter())
        image = batch["image"].to(memory_format=memory_format)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(image), batch["mask"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return [later - earlier for earlier, later in itertools.pairwise(starts)]


class TimedObjective:
    """Records when each step starts (the objective is the first thing ``fit`` does per step)."""

    def __init__(self, inner: Callable) -> None:
        self.inner = inner
        self.starts: list[float] = []

    def __call__(self, model: nn.Module, batch: dict[str, Any], epoch: int) -> Any:
        self.starts.append(time.perf_counter())
        return self.inner(model, batch, epoch)


def our_fit(batch: dict[str, Any], steps: int, amp: bool | None, ema: bool = True) -> list[float]:
    """Our machinery: param groups + foreach AdamW, cosine warmup per step, clipping, EMA, progress lines."""
    model = make_model()
    batches = [batch] * (steps + 2)  # the last step's end is not observable; one spare step
    optimizer = build_optimizer(model, lr=3e-4, weight_decay=1e-2)
    scheduler = build_scheduler(
        optimizer, "cosine", epochs=1, steps_per_epoch=len(batches), warmup_epochs=0.2
    )
    objective = TimedObjective(SupervisedObjective(loss_fn))
    config = TrainConfig(
        epochs=1,
        device="cpu",
        amp=amp,
        clip_grad_norm=1.0,
        ema_decay=0.999 if ema else None,
        log_every_n_steps=5,
        monitor="train/loss",
        mode="min",
        save_every=0,
    )
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as folder:
        fit(model, objective, batches, None, None, optimizer, scheduler, config, folder, log_fn=lines.append)
    return [later - earlier for earlier, later in itertools.pairwise(objective.starts)][: steps + 1]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="measured steps per row and round")
    parser.add_argument("--warmup", type=int, default=2, help="steps excluded at the start of each run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of all rows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--detail", action="store_true", help="also time fit() fp32 without EMA")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch = make_batch(args.batch, args.size)
    total = args.warmup + args.steps

    rows: dict[str, tuple[str, Callable[[], list[float]]]] = {
        "a": ("bare SMP loop, fp32", lambda: bare_loop(batch, total, amp=False, channels_last=False)),
        "b": ("our fit(), fp32 (clip+EMA+log+sched)", lambda: our_fit(batch, total, amp=False)),
        "c": (
            "bare loop, bf16 autocast + channels_last",
            lambda: bare_loop(batch, total, amp=True, channels_last=True),
        ),
        "d": ("our fit(), CPU default (bf16 + cl)", lambda: our_fit(batch, total, amp=None)),
    }
    if args.detail:
        rows["a2"] = (
            "bare loop, fp32, fused AdamW (as ours)",
            lambda: bare_loop(batch, total, amp=False, channels_last=False, fused=True),
        )
        rows["b0"] = ("our fit(), fp32, no EMA", lambda: our_fit(batch, total, amp=False, ema=False))
    load_before = os.getloadavg()
    samples: dict[str, list[float]] = {key: [] for key in rows}
    started = time.perf_counter()
    for _ in range(args.rounds):
        for key, (_, run) in rows.items():
            samples[key].extend(run()[args.warmup : args.warmup + args.steps])
    load_after = os.getloadavg()

    medians = {key: statistics.median(values) for key, values in samples.items()}
    print(f"# train-step benchmark  {dt.datetime.now().isoformat(timespec='seconds')}")
    print(
        f"# machine: {cpu_name()}, {os.cpu_count()} cpus, torch {torch.__version__}, threads {args.threads}, "
        f"python {platform.python_version()}"
    )
    print(
        f"# Unet-resnet18 3->{CLASSES}, batch {args.batch} x {args.size}x{args.size}, {args.steps} steps x "
        f"{args.rounds} rounds (+{args.warmup} warm-up each), "
        f"load avg {load_before[0]:.2f} -> {load_after[0]:.2f}, wall {time.perf_counter() - started:.0f}s"
    )
    print(
        f"{'row':<4}{'setting':<44}{'s/step':>9}{'img/s':>8}{'vs a':>8}{'IQR s':>14}{'min s':>8}{'vs a':>7}"
    )
    for key, (label, _) in rows.items():
        values = sorted(samples[key])
        q1, q3 = values[len(values) // 4], values[(3 * len(values)) // 4]
        ratio = medians["a"] / medians[key]
        print(
            f"{key:<4}{label:<44}{medians[key]:>9.3f}{args.batch / medians[key]:>8.1f}{ratio:>7.2f}x"
            f"{q1:>7.3f}-{q3:.3f}{values[0]:>8.3f}{min(samples['a']) / values[0]:>6.2f}x"
        )
    overhead = medians["b"] / medians["a"] - 1.0
    speedup = medians["a"] / medians["d"]
    print(f"fit() fp32 overhead vs bare (b/a - 1): {overhead * 100:+.1f}%  (goal <= +5%)")
    print(f"CPU default speed-up vs bare fp32 (a/d): {speedup:.2f}x  (goal >= 2.3x)")
    print(f"bare bf16+channels_last speed-up (a/c): {medians['a'] / medians['c']:.2f}x")
    if args.detail:
        same_optimizer = medians["b"] / medians["a2"] - 1.0
        ema_share = (medians["b"] - medians["b0"]) / medians["b"]
        print(f"fit() fp32 overhead vs bare with the same fused AdamW (b/a2 - 1): {same_optimizer:+.1%}")
        print(f"EMA share of a fit() fp32 step ((b - b0)/b): {ema_share:.1%}")


if __name__ == "__main__":
    main()
