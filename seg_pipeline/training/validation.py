"""Validation during training: one confusion matrix over the validation loader, macro metrics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from seg_pipeline.metrics import ConfusionMatrix


def make_evaluate_fn(
    num_classes: int, ignore_index: int, class_names: Sequence[str]
) -> Callable[[nn.Module, Any], dict[str, float]]:
    """An ``evaluate_fn`` for the trainer; keys are ``val/miou``, ``val/iou/<class>``, ...

    Prefixed here so per-class keys (which hold a ``/`` already) land under ``val/`` like the scalars.
    Pixels whose truth is ``ignore_index`` are not scored (the same rule as the loss and the report);
    an ``ignore_index`` inside the class range is never predicted, as at inference.
    """
    suppressed = ignore_index if 0 <= ignore_index < num_classes else None

    @torch.inference_mode()
    def evaluate(model: nn.Module, loader: Any) -> dict[str, float]:
        device = next(model.parameters()).device
        matrix = ConfusionMatrix(num_classes, ignore_index=ignore_index)
        was_training = model.training
        model.eval()
        for batch in loader:
            logits = model(batch["image"].to(device))
            if suppressed is not None:
                logits[:, suppressed] = float("-inf")
            matrix.update(logits.argmax(1).cpu().numpy(), batch["mask"].numpy())
        model.train(was_training)
        metrics = matrix.compute()
        return {f"val/{k}": v for k, v in metrics.to_dict(list(class_names)).items() if np.isfinite(v)}

    return evaluate
