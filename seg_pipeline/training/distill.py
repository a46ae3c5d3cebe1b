"""Stage-2 knowledge distillation objective (F18), an objective of the :class:`~.trainer.Trainer`.

``alpha*CE + (1-alpha)*T^2*KL`` from :class:`~seg_pipeline.training.losses.KnowledgeDistillationLoss`,
with:

- CE-only warmup epochs (seed 002: 5 epochs CE, then KD), during which teachers do not run;
- one teacher or several (their class probabilities are averaged; the KD target is the log of
  that mean, so a single teacher gives exactly its own logits up to a constant);
- a transfer set: samples without any label (mask all ``ignore_index``) get the KD term only;
- an optional multi-scale schedule (seed 000): each step resizes the batch to one patch size
  (``sample_one_scale_per_step``) or to every size (``per_step_all_scales``); each size keeps
  an EMA of its loss and the step optimises the normalised loss, so no size dominates.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seg_pipeline.training.losses import KnowledgeDistillationLoss

MULTI_SCALE_MODES = ("sample_one_scale_per_step", "per_step_all_scales")


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


def _resize(batch_image: torch.Tensor, mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    if batch_image.shape[-2:] == (size, size):
        return batch_image, mask
    image = F.interpolate(batch_image, size=(size, size), mode="bilinear", align_corners=False)
    resized = F.interpolate(mask[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
    return image, resized


class DistillationObjective:
    """``objective(model, batch, epoch) -> (loss, parts)`` for KD finetuning.

    Args:
        teachers: Frozen teacher models (put in eval mode, gradients off).
        loss: The KD loss (alpha, temperature, confidence threshold, ignore_index).
        warmup_epochs: Epochs ``1..warmup_epochs`` train with CE only.
        patch_sizes: Optional multi-scale schedule; ``None`` trains at the loaded size.
        multi_scale_mode: ``sample_one_scale_per_step`` or ``per_step_all_scales``.
        seed: Seed of the per-step size draw.
    """

    def __init__(
        self,
        teachers: Sequence[nn.Module],
        loss: KnowledgeDistillationLoss,
        warmup_epochs: int = 5,
        patch_sizes: Sequence[int] | None = None,
        multi_scale_mode: str = "sample_one_scale_per_step",
        normalizer_decay: float = 0.9,
        seed: int = 0,
    ) -> None:
        if not teachers:
            raise ValueError("DistillationObjective needs at least one teacher model")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs={warmup_epochs} must be >= 0")
        if multi_scale_mode not in MULTI_SCALE_MODES:
            raise ValueError(f"multi_scale_mode={multi_scale_mode!r}: choose one of {MULTI_SCALE_MODES}")
        if patch_sizes is not None and (not patch_sizes or min(patch_sizes) < 8):
            raise ValueError(f"patch_sizes={patch_sizes}: give sizes >= 8, or None to disable multi-scale")
        self.teachers = list(teachers)
        for teacher in self.teachers:
            teacher.eval()
            teacher.requires_grad_(False)
        self.loss = loss
        self.warmup_epochs = warmup_epochs
        self.patch_sizes = tuple(patch_sizes) if patch_sizes else None
        self.multi_scale_mode = multi_scale_mode
        self.normalizer = ScaleNormalizer(normalizer_decay)
        self._rng = random.Random(seed)

    def to(self, device: torch.device | str) -> DistillationObjective:
        """Move the teachers to ``device`` (the loop moves only the student)."""
        self.teachers = [t.to(device) for t in self.teachers]
        return self

    @torch.no_grad()
    def teacher_logits(self, image: torch.Tensor) -> torch.Tensor:
        """Ensemble teacher output as logits: log of the mean class probabilities."""
        if len(self.teachers) == 1:
            return self.teachers[0](image).float()
        probs = torch.stack([torch.softmax(t(image).float(), dim=1) for t in self.teachers]).mean(0)
        return torch.log(probs.clamp_min(1e-8))

    def _sizes(self) -> list[int | None]:
        if self.patch_sizes is None:
            return [None]
        if self.multi_scale_mode == "per_step_all_scales":
            return list(self.patch_sizes)
        return [self._rng.choice(self.patch_sizes)]

    def _one_scale(
        self, model: nn.Module, image: torch.Tensor, mask: torch.Tensor, kd_enabled: bool
    ) -> tuple[torch.Tensor, dict[str, float]]:
        student = model(image)
        teacher = self.teacher_logits(image) if kd_enabled else None
        labeled = (mask != self.loss.ignore_index).flatten(1).any(dim=1)
        parts: dict[str, float] = {"ce": 0.0, "kd": 0.0, "ignored_fraction": 0.0}
        if labeled.all() or not kd_enabled:
            loss = self.loss(student, teacher, mask, kd_enabled=kd_enabled)
            return loss, dict(self.loss.last_parts)
        total = student.new_zeros(())
        n = image.shape[0]
        for selector, target in ((labeled, mask), (~labeled, None)):
            if not selector.any():
                continue
            assert teacher is not None
            part = self.loss(
                student[selector], teacher[selector], None if target is None else target[selector]
            )
            share = float(selector.sum()) / n
            total = total + part * share
            for key, value in self.loss.last_parts.items():
                parts[key] += value * share
        return total, parts

    def __call__(
        self, model: nn.Module, batch: Mapping[str, Any], epoch: int
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The KD (or, during warmup, CE-only) loss of one batch and its logged parts."""
        kd_enabled = epoch > self.warmup_epochs
        image, mask = batch["image"], batch["mask"]
        total = image.new_zeros((), dtype=torch.float32)
        logs: dict[str, float] = {"ce": 0.0, "kd": 0.0, "ignored_fraction": 0.0}
        sizes = self._sizes()
        for size in sizes:
            scaled_image, scaled_mask = (image, mask) if size is None else _resize(image, mask, size)
            loss, parts = self._one_scale(model, scaled_image, scaled_mask, kd_enabled)
            if size is not None:
                logs[f"loss_{size}"] = float(loss.detach())
                loss = self.normalizer.normalize(size, loss)
            total = total + loss
            for key in ("ce", "kd", "ignored_fraction"):
                logs[key] += parts.get(key, 0.0) / len(sizes)
        logs["kd_active"] = float(kd_enabled)
        if self.patch_sizes is not None:
            logs["scale_combined"] = self.normalizer.combined_metric()
        return total, logs
