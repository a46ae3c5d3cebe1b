"""Training-side scores (seed 001's train F1/accuracy): each step's own predictions, counted on the device.

Objectives expose what they scored as ``last_scored = (logits, mask)``; :class:`TrainScores` adds
the argmax of those logits against the mask to one confusion matrix kept on the device (one
``bincount`` per step, no host sync) and reduces it across ranks once per epoch. The scores are of
augmented training patches before the step's update, so they lag the weights by part of an epoch:
a gap between them and ``val/*`` is the usual over-fitting signal, not a bug.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from seg_pipeline.metrics.scores import SegmentationMetrics
from seg_pipeline.training.distributed import all_reduce_sum


def scored_pair(objective: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``(logits, mask)`` the objective scored in its last call, or None when it exposes none."""
    pair = getattr(objective, "last_scored", None)
    return pair if isinstance(pair, tuple) and len(pair) == 2 else None


class TrainScores:
    """One epoch's confusion matrix of training predictions; pixels whose label is not a class are skipped."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.counts: torch.Tensor | None = None

    def add(self, logits: torch.Tensor, mask: torch.Tensor) -> None:
        """Count one micro-batch: ``logits`` (B, C, H, W) against ``mask`` (B, H, W) of class ids."""
        num_classes = int(logits.shape[1])
        with torch.no_grad():
            predicted = logits.detach().argmax(dim=1).flatten()
            truth = mask.detach().to(predicted.device).long().flatten()
            valid = (truth >= 0) & (truth < num_classes)
            pairs = truth[valid] * num_classes + predicted[valid]
            counts = torch.bincount(pairs, minlength=num_classes * num_classes)
        if self.counts is None:
            self.counts = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=self.device)
        if self.device.type == "mps":  # no float64 there
            self.counts = self.counts.float()
        self.counts += counts.to(self.counts)

    def reduce(self) -> dict[str, float]:
        """``train/accuracy``, ``train/f1`` (mean Dice = per-pixel F1) and ``train/miou`` of all ranks."""
        if self.counts is None:
            return {}
        all_reduce_sum(self.counts)
        size = round(self.counts.numel() ** 0.5)
        matrix = self.counts.cpu().numpy().reshape(size, size).astype(np.int64)
        scores = SegmentationMetrics.from_matrix(matrix)
        logs = {
            "train/accuracy": float(scores.pixel_accuracy),
            "train/f1": float(scores.mdice),
            "train/miou": float(scores.miou),
        }
        return {key: value for key, value in logs.items() if np.isfinite(value)}
