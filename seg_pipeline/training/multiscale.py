"""The patch-size schedule of seed 000 on the objective side: one loss normaliser per patch size.

The loader reads patches at the largest size of ``patches.sizes``; each step crops the batch to the
size it trains (one drawn per step, or every size with ``all_per_step``, the losses summed). Each
size keeps an EMA of its loss and the step optimises the loss divided by it, so no size dominates
because its losses are larger.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from seg_pipeline.training.objectives import Batch, Objective


class ScaleNormalizer:
    """One EMA of the loss per patch size; the normalised loss is ``loss / ema``."""

    def __init__(self, decay: float = 0.9, eps: float = 1e-6) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay={decay} must be in [0, 1)")
        self.decay = decay
        self.eps = eps
        self.ema: dict[int, float] = {}

    def normalize(self, size: int, loss: torch.Tensor) -> torch.Tensor:
        """Update the EMA of ``size`` with this loss and return the loss divided by it."""
        value = float(loss.detach())
        previous = self.ema.get(size)
        self.ema[size] = value if previous is None else self.decay * previous + (1 - self.decay) * value
        return loss / max(self.ema[size], self.eps)

    def combined_metric(self) -> float:
        """Geometric mean of the latest EMAs: one number that no single scale dominates."""
        if not self.ema:
            return 0.0
        logs = torch.log(torch.tensor([max(v, self.eps) for v in self.ema.values()]))
        return float(torch.exp(logs.mean()))


def _crop_start(lo: int, hi: int, side: int, size: int, u: float) -> int:
    """Start of a ``size`` crop along an axis of ``side`` px that best covers the span ``[lo, hi)``."""
    extent = hi - lo
    start = lo + int(u * (extent - size + 1)) if extent >= size else lo - int(u * (size - extent + 1))
    return min(max(start, 0), side - size)


def crop_batch(batch: Batch, size: int, rng: random.Random, ignore_index: int) -> Batch:
    """A random ``size`` crop of each sample, the same for all of its tensors (image, mask, views).

    A crop lies within the sample's labelled pixels where they span more than ``size`` and covers
    them where they span less: a small tile padded into a large patch is never cropped to padding.
    """
    image, mask = batch["image"], batch["mask"]
    height, width = image.shape[-2:]
    boxes = []
    for sample_mask in mask:
        labelled = sample_mask != ignore_index
        rows, cols = labelled.any(dim=1).nonzero(), labelled.any(dim=0).nonzero()
        if len(rows) == 0:
            boxes.append((0, height, 0, width))
        else:
            boxes.append((int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1))
    starts = [
        (
            _crop_start(top, bottom, height, size, rng.random()),
            _crop_start(left, right, width, size, rng.random()),
        )
        for top, bottom, left, right in boxes
    ]
    cropped: Batch = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.ndim >= 3 and tuple(value.shape[-2:]) == (height, width):
            cropped[key] = torch.stack(
                [v[..., t : t + size, left : left + size] for v, (t, left) in zip(value, starts, strict=True)]
            )
        else:
            cropped[key] = value
    return cropped


class MultiScaleObjective:
    """Wraps an objective with the patch-size schedule: crops at the step's size(s), per-size normalised.

    Args:
        inner: The objective of one batch (supervised or distillation).
        sizes: Patch sides of the schedule; batches arrive at the largest.
        mode: ``one_per_step`` (each step trains one size, drawn by ``sampling``) or ``all_per_step``.
        ignore_index: Mask value of unlabelled pixels (crops stay on labelled ones).
        sampling: ``uniform`` (seeded draw) or ``cycle`` (sizes in turn).
        seed: Seed of the size draws and crop positions.
        decay: EMA decay of the per-size loss normaliser.
    """

    def __init__(
        self,
        inner: Objective,
        sizes: Sequence[int],
        mode: str,
        *,
        ignore_index: int,
        sampling: str = "uniform",
        seed: int = 0,
        decay: float = 0.9,
    ) -> None:
        if mode not in ("one_per_step", "all_per_step"):
            raise ValueError(f"patches.mode={mode!r}: choose one_per_step or all_per_step")
        if sampling not in ("uniform", "cycle"):
            raise ValueError(f"patches.sampling={sampling!r}: choose uniform or cycle")
        if not sizes:
            raise ValueError("MultiScaleObjective needs the patch sizes of the schedule")
        self.inner = inner
        self.sizes = sorted({int(s) for s in sizes})
        self.mode = mode
        self.sampling = sampling
        self.ignore_index = ignore_index
        self.normalizer = ScaleNormalizer(decay)
        self._rng = random.Random(seed)
        self._steps = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # e.g. DistillationObjective.to / .teachers

    def step_sizes(self) -> list[int]:
        """The sizes the next step trains (one drawn, or all)."""
        self._steps += 1
        if self.mode == "all_per_step":
            return list(self.sizes)
        if self.sampling == "cycle":
            return [self.sizes[(self._steps - 1) % len(self.sizes)]]
        return [self._rng.choice(self.sizes)]

    def __call__(self, model: nn.Module, batch: Batch, epoch: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """The normalised loss of this step's size(s) and the inner parts, averaged over sizes."""
        side = min(int(batch["image"].shape[-2]), int(batch["image"].shape[-1]))
        sizes = [min(size, side) for size in self.step_sizes()]
        total = torch.zeros((), device=batch["image"].device)
        logs: dict[str, Any] = {}
        for size in sizes:
            sub = batch if size == side else crop_batch(batch, size, self._rng, self.ignore_index)
            loss, parts = self.inner(model, sub, epoch)
            logs[f"loss_{size}"] = float(loss.detach())
            total = total + self.normalizer.normalize(size, loss)
            for key, value in _floats(parts).items():
                logs[key] = logs.get(key, 0.0) + value / len(sizes)
        logs["scale_combined"] = self.normalizer.combined_metric()
        return total, logs


def _floats(parts: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in parts.items()}
