"""Validation during training: whole validation tiles through the inference windows, one confusion matrix.

Tiles of any size are scored at full resolution: each goes through the sliding windows and views of
``ValidationSettings`` (one view by default), exactly as ``predict`` would run the model, so the
metric that picks ``best.pt`` measures what users get. Pixels whose truth is ``ignore_index`` are
not scored (the rule of the loss and of the report); an ``ignore_index`` inside the class range is
never predicted, as at inference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch import nn

from seg_pipeline.inference.ensemble import EnsemblePredictor
from seg_pipeline.inference.sliding import predict_tiles
from seg_pipeline.inference.tta import TTAConfig
from seg_pipeline.metrics import ConfusionMatrix
from seg_pipeline.settings.inference import ValidationSettings


def collate_tiles(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep validation samples as a list: whole tiles differ in size and do not stack."""
    return samples


def make_evaluate_fn(
    num_classes: int,
    ignore_index: int,
    class_names: Sequence[str],
    settings: ValidationSettings | None = None,
) -> Callable[[nn.Module, Any], dict[str, float]]:
    """An ``evaluate_fn`` for the trainer over a loader of :func:`collate_tiles` batches.

    Keys are ``val/miou``, ``val/iou/<class>``, ...: prefixed here so per-class keys (which hold a
    ``/`` already) land under ``val/`` like the scalars.
    """
    settings = settings or ValidationSettings()
    suppressed = ignore_index if 0 <= ignore_index < num_classes else None
    tta = TTAConfig.from_settings(settings.tta)

    def evaluate(model: nn.Module, loader: Any) -> dict[str, float]:
        device = next(model.parameters()).device
        was_training = model.training
        predictor = EnsemblePredictor([model], tta, device, suppressed_class=suppressed)
        matrix = ConfusionMatrix(num_classes, ignore_index=ignore_index)
        for batch in loader:
            images = [sample["image"] for sample in batch]
            for sample, probabilities in zip(
                batch, predict_tiles(predictor, images, settings.windows), strict=True
            ):
                matrix.update(probabilities.argmax(0).numpy(), sample["mask"].numpy())
        model.train(was_training)
        metrics = matrix.compute()
        return {f"val/{k}": v for k, v in metrics.to_dict(list(class_names)).items() if np.isfinite(v)}

    return evaluate
