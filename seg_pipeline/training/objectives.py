"""Objectives: what one training step optimises, as ``objective(model, batch, epoch) -> (loss, parts)``.

The loop knows nothing about losses: an objective turns a batch into a scalar loss plus detached
per-term values for the logs. :class:`SupervisedObjective` wraps a segmentation loss; knowledge
distillation is :class:`seg_pipeline.training.distill.DistillationObjective`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import nn

from seg_pipeline.training.precision import PrecisionPolicy

Batch = dict[str, Any]


class Objective(Protocol):
    """``objective(model, batch, epoch) -> (loss, parts)``: scalar loss and detached per-term values."""

    def __call__(
        self, model: nn.Module, batch: Batch, epoch: int
    ) -> tuple[torch.Tensor, Mapping[str, float | torch.Tensor]]:
        """The scalar loss of ``batch`` at ``epoch`` and its detached per-term parts."""
        ...


class SupervisedObjective:
    """Plain supervised objective: ``loss_fn(model(batch["image"]), batch["mask"])``.

    If ``loss_fn`` has a ``last_parts`` dict (e.g. ``{"ce": .., "dice": ..}`` from a combined loss),
    it is merged into the logs as ``train/<term>``. ``last_scored`` holds the last call's
    ``(logits, mask)`` for the training-side scores (``loop.train_metrics``).
    """

    def __init__(
        self,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        image_key: str = "image",
        target_key: str = "mask",
    ) -> None:
        self.loss_fn = loss_fn
        self.image_key = image_key
        self.target_key = target_key
        self.last_scored: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(
        self, model: nn.Module, batch: Batch, epoch: int
    ) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        """The loss of ``batch`` and its per-term parts."""
        logits = model(batch[self.image_key])
        loss = self.loss_fn(logits, batch[self.target_key])
        self.last_scored = (logits.detach(), batch[self.target_key])
        parts = getattr(self.loss_fn, "last_parts", None) or {}
        return loss, {
            name: value.detach() if isinstance(value, torch.Tensor) else value
            for name, value in parts.items()
        }


def move_batch(batch: Mapping[str, Any], policy: PrecisionPolicy) -> Batch:
    """The batch's tensors on the policy's device and memory format."""
    if not isinstance(batch, Mapping):
        raise ValueError(
            f"train_loader yielded a {type(batch).__name__}; batches must be dicts with 'image' and "
            "'mask' tensors."
        )
    return {
        key: policy.prepare_tensor(value) if isinstance(value, torch.Tensor) else value
        for key, value in batch.items()
    }


def batch_size(batch: Batch) -> int:
    """Samples in a batch (the first dimension of ``image``, else of the first tensor)."""
    image = batch.get("image")
    if isinstance(image, torch.Tensor):
        return int(image.shape[0])
    first = next((value for value in batch.values() if isinstance(value, torch.Tensor)), None)
    return int(first.shape[0]) if first is not None else 1
