"""Stage-2 knowledge distillation objective (F18), an objective of the :class:`~.trainer.Trainer`.

``alpha*CE + (1-alpha)*T^2*KL`` from :class:`~seg_pipeline.training.losses.KnowledgeDistillationLoss`,
with:

- CE-only warmup epochs (seed 002: 5 epochs CE, then KD), during which teachers do not run;
- one teacher or several (their class probabilities are averaged; the KD target is the log of
  that mean, so a single teacher gives exactly its own logits up to a constant);
- a transfer set: samples without any label (mask all ``ignore_index``) get the KD term only;
- the patch-size schedule and its per-size loss normalisation, for both stages, are
  :mod:`seg_pipeline.training.multiscale`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from seg_pipeline.training.losses import KnowledgeDistillationLoss


class DistillationObjective:
    """``objective(model, batch, epoch) -> (loss, parts)`` for KD finetuning.

    Args:
        teachers: Frozen teacher models (put in eval mode, gradients off).
        loss: The KD loss (alpha, temperature, confidence threshold, ignore_index).
        warmup_epochs: Epochs ``1..warmup_epochs`` train with CE only.
    """

    def __init__(
        self,
        teachers: Sequence[nn.Module],
        loss: KnowledgeDistillationLoss,
        warmup_epochs: int = 5,
    ) -> None:
        if not teachers:
            raise ValueError("DistillationObjective needs at least one teacher model")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs={warmup_epochs} must be >= 0")
        self.teachers = list(teachers)
        for teacher in self.teachers:
            teacher.eval()
            teacher.requires_grad_(False)
        self.loss = loss
        self.warmup_epochs = warmup_epochs
        #: The last call's ``(student logits, mask)`` for the training-side scores.
        self.last_scored: tuple[torch.Tensor, torch.Tensor] | None = None

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

    def _one_scale(
        self, model: nn.Module, image: torch.Tensor, mask: torch.Tensor, kd_enabled: bool
    ) -> tuple[torch.Tensor, dict[str, float]]:
        student = model(image)
        self.last_scored = (student.detach(), mask)
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
        loss, parts = self._one_scale(model, batch["image"], batch["mask"], kd_enabled)
        return loss, {**parts, "kd_active": float(kd_enabled)}
