"""Benchmark: seconds per training step of our ``fit`` machinery vs a bare SMP loop.

Rows (same model: SMP Unet-resnet18, encoder_weights=None, 3 -> 6 classes; data already in memory):
  a  bare loop, fp32: forward, F.cross_entropy, backward, AdamW step (torch defaults)
  b  our fit() in fp32, contiguous: objective + grad clipping + EMA + progress logging + cosine scheduler
  c  bare loop with bf16 autocast + channels_last (input converted every step, as a loader would need)
  d  our fit() with the default CPU policy (``amp: null``: bf16 + channels_last where the CPU has
     AMX, else fp32 + channels_last; the resolved policy is printed in the row's label)
  e  our fit() with CPU AMP forced on (bf16 autocast + channels_last)
Goals (issue 13): b within 5% of a; e within 5% of c (our bf16 fit() vs the bare bf16 loop); on an
AMX CPU the default (d) picks bf16 by itself.
``--device cuda`` runs the same rows on the GPU (model and batch on the device, autocast on CUDA,
row d = fit()'s CUDA default policy), synchronizing the device at each step boundary so the wall
times are the GPU's; the CPU-time columns then only say how busy the host was.
``--detail`` adds a2 (bare loop with the same fused AdamW as ours, isolating the machinery cost)
and b0 (our fit() fp32 without EMA, isolating the EMA cost).

Step time = time between the starts of consecutive steps (so it includes optimizer, EMA, scheduler
and logging work); warm-up steps excluded; median over all measured steps of all rounds; rounds
interleave the rows so that load from other processes hits them alike. Both wall time and process
CPU time (all threads) are reported: on a shared 2-core machine wall time swings several-fold with
other people's load, CPU time much less. With a quiet machine, CPU s/step is ~threads x wall s/step.

    .venv/bin/python bench/bench_train_step.py --size 256 --batch 8 --steps 6 --rounds 2
    python bench/bench_train_step.py --device cuda --size 512 --batch 8 --steps 30 --rounds 3
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

from seg_pipeline.hardware import cpu_flags, resolve_device
from seg_pipeline.settings import LoopSettings
from seg_pipeline.training.objectives import SupervisedObjective
from seg_pipeline.training.optim import build_optimizer, build_scheduler
from seg_pipeline.training.precision import PrecisionPolicy
from seg_pipeline.training.trainer import fit

CLASSES = 6
IGNORE_INDEX = 255
Sample = tuple[float, float]  # (wall seconds, CPU seconds) of one step
DEVICE = torch.device("cpu")  # set from --device in main()


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


def _durations(stamps: list[Sample]) -> list[Sample]:
    return [(b[0] - a[0], b[1] - a[1]) for a, b in itertools.pairwise(stamps)]


def _stamp() -> Sample:
    if DEVICE.type == "cuda":  # the step's kernels are queued: wait for them so the wall time is theirs
        torch.cuda.synchronize(DEVICE)
    return time.perf_counter(), time.process_time()


def bare_loop(
    batch: dict[str, Any], steps: int, amp: bool, channels_last: bool, fused: bool | None = None
) -> list[Sample]:
    """What a user writes by hand: AdamW (torch default unless ``fused``), no clipping/EMA/logging."""
    model = make_model().to(DEVICE)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=1e-2, fused=fused)
    stamps = []
    for _ in range(steps + 1):
        stamps.append(_stamp())
        image = batch["image"].to(memory_format=memory_format)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(image), batch["mask"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return _durations(stamps)


class TimedObjective:
    """Records when each step starts (the objective is the first thing ``fit`` does per step)."""

    def __init__(self, inner: Callable) -> None:
        self.inner = inner
        self.stamps: list[Sample] = []

    def __call__(self, model: nn.Module, batch: dict[str, Any], epoch: int) -> Any:
        self.stamps.append(_stamp())
        return self.inner(model, batch, epoch)


def our_fit(
    batch: dict[str, Any], steps: int, amp: bool | None, channels_last: bool | None, ema: bool = True
) -> list[Sample]:
    """Our machinery: param groups + fused AdamW, cosine warmup per step, clipping, EMA, progress lines."""
    model = make_model()
    batches = [batch] * (steps + 2)  # the last step's end is not observable; one spare step
    optimizer = build_optimizer(model, lr=3e-4, weight_decay=1e-2)
    scheduler = build_scheduler(
        optimizer, "cosine", epochs=1, steps_per_epoch=len(batches), warmup_epochs=0.2
    )
    objective = TimedObjective(SupervisedObjective(loss_fn))
    config = LoopSettings(
        epochs=1,
        device=DEVICE.type,
        amp=amp,
        channels_last=channels_last,
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
    return _durations(objective.stamps)[: steps + 1]


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
    parser.add_argument("--steps", type=int, default=6, help="measured steps per row and round")
    parser.add_argument("--warmup", type=int, default=2, help="steps excluded at the start of each run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of all rows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the rows run")
    parser.add_argument("--detail", action="store_true", help="add rows a2 and b0 (see module doc)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = resolve_device(args.device)  # refuses cuda where torch sees no GPU
    torch.set_num_threads(args.threads)
    batch = make_batch(args.batch, args.size)
    batch.update(image=batch["image"].to(DEVICE), mask=batch["mask"].to(DEVICE))
    total = args.warmup + args.steps

    def policy(amp: bool | None, channels_last: bool | None) -> str:
        """What fit() resolves these settings to on this device (CUDA keeps AMP on even with amp=False)."""
        described = PrecisionPolicy.from_rule(DEVICE, amp, channels_last).describe()
        return described.removeprefix(f"{DEVICE.type} ").split(" (")[0]

    rows: dict[str, tuple[str, Callable[[], list[Sample]]]] = {
        "a": ("bare SMP loop, fp32", lambda: bare_loop(batch, total, amp=False, channels_last=False)),
        "b": (f"our fit(), amp=False ({policy(False, False)})", lambda: our_fit(batch, total, False, False)),
        "c": ("bare loop, bf16 autocast + channels_last", lambda: bare_loop(batch, total, True, True)),
        "d": (f"our fit(), default ({policy(None, None)})", lambda: our_fit(batch, total, None, None)),
        "e": (f"our fit(), amp=True ({policy(True, None)})", lambda: our_fit(batch, total, True, None)),
    }
    if args.detail:
        rows["a2"] = (
            "bare loop, fp32, fused AdamW (as ours)",
            lambda: bare_loop(batch, total, amp=False, channels_last=False, fused=True),
        )
        rows["b0"] = (
            "our fit(), fp32 contiguous, no EMA",
            lambda: our_fit(batch, total, False, False, ema=False),
        )
    load_before = os.getloadavg()
    samples: dict[str, list[Sample]] = {key: [] for key in rows}
    started = time.perf_counter()
    for _ in range(args.rounds):
        for key, (_, run) in rows.items():
            samples[key].extend(run()[args.warmup : args.warmup + args.steps])
    load_after = os.getloadavg()

    wall = {key: statistics.median(w for w, _ in values) for key, values in samples.items()}
    cpu = {key: statistics.median(c for _, c in values) for key, values in samples.items()}
    print(f"# train-step benchmark  {dt.datetime.now().isoformat(timespec='seconds')}")
    print(
        f"# machine: {cpu_name()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"threads {args.threads}, python {platform.python_version()}"
    )
    if DEVICE.type == "cuda":
        print(f"# device: {torch.cuda.get_device_name(DEVICE)}, CUDA {torch.version.cuda}")
    wanted = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")
    present = [flag for flag in wanted if flag in cpu_flags()]
    print(f"# CPU flags: {' '.join(present) or 'none of ' + ' '.join(wanted)}")
    print(
        f"# Unet-resnet18 3->{CLASSES}, batch {args.batch} x {args.size}x{args.size}, "
        f"{args.steps} steps x {args.rounds} rounds (+{args.warmup} warm-up each), "
        f"load avg {load_before[0]:.2f} -> {load_after[0]:.2f}, wall {time.perf_counter() - started:.0f}s"
    )
    header = (
        f"{'row':<4}{'setting':<50}{'wall s/step':>12}{'img/s':>7}{'a/row':>7}{'CPU s/step':>12}{'a/row':>7}"
    )
    print(header)
    for key, (label, _) in rows.items():
        print(
            f"{key:<4}{label:<50}{wall[key]:>12.3f}{args.batch / wall[key]:>7.2f}"
            f"{wall['a'] / wall[key]:>6.2f}x{cpu[key]:>12.3f}{cpu['a'] / cpu[key]:>6.2f}x"
        )
    for label, metric in (("wall", wall), ("CPU", cpu)):
        print(
            f"[{label}] fit() fp32 overhead vs bare (b/a - 1): {metric['b'] / metric['a'] - 1:+.1%} "
            "(goal <= +5%); "
            f"{DEVICE.type} default speed-up (a/d): {metric['a'] / metric['d']:.2f}x; "
            f"amp=True speed-up (a/e): {metric['a'] / metric['e']:.2f}x; "
            f"our bf16 fit() vs bare bf16 (e/c - 1): {metric['e'] / metric['c'] - 1:+.1%} (goal <= +5%)"
        )
        if args.detail:
            print(
                f"[{label}] fit() fp32 vs bare with the same fused AdamW (b/a2 - 1): "
                f"{metric['b'] / metric['a2'] - 1:+.1%}; EMA share of a fit() fp32 step ((b - b0)/b): "
                f"{(metric['b'] - metric['b0']) / metric['b']:.1%}"
            )


if __name__ == "__main__":
    main()
