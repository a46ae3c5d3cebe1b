"""Validation during training: whole validation tiles through the inference windows, one confusion matrix.

Tiles of any size are scored at full resolution: each goes through the sliding windows and views of
``ValidationSettings`` (one view by default), exactly as ``predict`` would run the model, so the
metric that picks ``best.pt`` measures what users get. Tiles up to :data:`STREAM_PIXELS` are
decoded whole (fast); larger scenes are validated from disk by the inference code itself
(:func:`~seg_pipeline.inference.tiling.predict_raster_sets`, strip by strip into a temporary class
map), so memory follows the window strip, not the scene. Pixels whose truth is ``ignore_index``
are not scored (the rule of the loss and of the report); an ``ignore_index`` inside the class range
is never predicted, as at inference.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.windows import Window
from torch import nn

from seg_pipeline.data.normalization import BandStats, normalize
from seg_pipeline.data.raster_io import read_array
from seg_pipeline.data.shards import ShardRow, raster_input
from seg_pipeline.inference.ensemble import EnsemblePredictor
from seg_pipeline.inference.sliding import predict_tiles
from seg_pipeline.inference.tiling import SetTarget, predict_raster_sets
from seg_pipeline.inference.tta import TTAConfig
from seg_pipeline.metrics import ConfusionMatrix
from seg_pipeline.metrics.detection import DetectionCounter
from seg_pipeline.metrics.scores import pooled_metrics
from seg_pipeline.settings.evaluation import ScoringSettings
from seg_pipeline.settings.inference import ValidationSettings

#: Tiles above this many pixels (a 4096 x 4096 scene) are validated from disk, window by window.
STREAM_PIXELS = 4096 * 4096
#: Rows of a streamed tile scored at a time.
_SCORE_ROWS = 512


def collate_tiles(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep validation samples as a list: whole tiles differ in size and do not stack."""
    return samples


def _score_streamed(
    predictor: EnsemblePredictor,
    row: ShardRow,
    stats: BandStats,
    settings: ValidationSettings,
    scores: ValidationScores,
) -> None:
    """Predict one large tile with the inference code into a temporary class map, then score it by rows."""
    assert row.target_path is not None
    with tempfile.TemporaryDirectory(prefix="seg-val-") as tmp:
        summary = predict_raster_sets(
            raster_input(row),
            {"model": SetTarget(Path(tmp) / "class.tif")},
            lambda batch: {"model": predictor(batch)},
            num_classes=scores.matrix.num_classes,
            window=settings.windows.window,
            overlap=settings.windows.overlap,
            batch_size=settings.windows.for_device(predictor.device.type).windows_per_pass,
            normalize=lambda array: np.asarray(normalize(array, stats)),
            progress_delay_s=60.0,
        )["model"]
        nodata = summary["class_nodata"]
        detection = scores.detection
        positive_pixels = np.zeros(2, dtype=np.int64)  # predicted, true
        with rasterio.open(summary["dst_path"]) as classes:
            for top in range(0, classes.height, _SCORE_ROWS):
                window = Window(0, top, classes.width, min(_SCORE_ROWS, classes.height - top))
                predicted = classes.read(1, window=window)
                truth = read_array(row.target_path, window=window)[0].astype(np.int64)
                truth[predicted == nodata] = scores.ignore_index  # input nodata: never scored
                scores.matrix.update(predicted, truth)
                if detection is not None:
                    scored = scores.matrix.scored(truth)
                    positive_pixels += [
                        detection.positive_pixels(predicted, scored),
                        detection.positive_pixels(truth, scored),
                    ]
        if detection is not None:
            detection.add_decision(int(positive_pixels[0]), int(positive_pixels[1]))


class ValidationScores:
    """What one validation pass accumulates: the confusion matrix, patch detections and the loss."""

    def __init__(
        self,
        num_classes: int,
        ignore_index: int,
        positive_classes: Sequence[int],
        scoring: ScoringSettings,
    ) -> None:
        self.matrix = ConfusionMatrix(
            num_classes, ignore_index=ignore_index, ignore_nonpositive=scoring.ignore_nonpositive
        )
        self.positive = sorted(positive_classes)
        # No positive classes (a caller that pools none): no pooled or detection scores.
        self.detection = (
            DetectionCounter(self.positive, scoring.detection_min_pixels) if self.positive else None
        )
        self.ignore_index = ignore_index
        self.loss_sum = 0.0
        self.loss_pixels = 0

    def add_tile(self, predicted: np.ndarray, truth: np.ndarray) -> None:
        """Score one whole tile: pixels into the matrix, the tile as one patch-detection decision."""
        self.matrix.update(predicted, truth)
        if self.detection is not None:
            scored = self.matrix.scored(truth)
            self.detection.add_decision(
                self.detection.positive_pixels(predicted, scored),
                self.detection.positive_pixels(truth, scored),
            )

    def add_loss(self, loss: float, pixels: int) -> None:
        """One tile's mean loss over its ``pixels`` scored pixels."""
        if pixels:
            self.loss_sum += loss * pixels
            self.loss_pixels += pixels

    def to_logs(self, class_names: Sequence[str]) -> dict[str, float]:
        """``val/<key>`` logs: the confusion-matrix scores, their seed names, pooled and detection scores."""
        metrics = self.matrix.compute()
        logs = metrics.to_dict(list(class_names))
        logs["f1"] = logs["mdice"]  # per-pixel F1 = Dice, macro over classes (seed 001's "mean F1")
        logs["accuracy"] = logs["pixel_accuracy"]
        if self.detection is not None:
            pooled = pooled_metrics(self.matrix.matrix, self.positive)
            logs.update({f"pooled/{k}": pooled[k] for k in ("iou", "dice", "precision", "recall")})
            detection = self.detection.compute().to_dict()
            logs.update({f"detection/{k}": detection[k] for k in ("accuracy", "precision", "recall", "f1")})
        if self.loss_pixels:
            logs["loss"] = self.loss_sum / self.loss_pixels
        return {f"val/{k}": v for k, v in logs.items() if np.isfinite(v)}


def validation_keys(class_names: Sequence[str], positive_classes: Sequence[int], with_loss: bool) -> set[str]:
    """Every key validation can log (a class absent from the validation tiles leaves out its keys)."""
    scores = ValidationScores(len(class_names), 255, positive_classes, ScoringSettings())
    eye = np.arange(len(class_names))
    scores.add_tile(eye, eye)
    scores.add_tile(np.zeros_like(eye), np.full_like(eye, positive_classes[0] if positive_classes else 0))
    if with_loss:
        scores.add_loss(1.0, 1)
    return set(scores.to_logs(class_names))


def tile_loss(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    probabilities: torch.Tensor,
    mask: torch.Tensor,
) -> float:
    """The stage's supervised loss of one tile's merged prediction (log-probabilities act as logits)."""
    logits = torch.log(probabilities.float().clamp_min(1e-8))[None]
    with torch.no_grad():
        return float(loss_fn(logits, mask.long()[None]))


def make_evaluate_fn(
    num_classes: int,
    ignore_index: int,
    class_names: Sequence[str],
    settings: ValidationSettings | None = None,
    *,
    positive_classes: Sequence[int] = (),
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    streamed: Sequence[ShardRow] = (),
    stats: BandStats | None = None,
) -> Callable[[nn.Module, Any], dict[str, float]]:
    """An ``evaluate_fn`` for the trainer over a loader of :func:`collate_tiles` batches, plus the
    ``streamed`` large tiles (normalised with ``stats``).

    Keys are ``val/miou``, ``val/iou/<class>``, ``val/f1``, ``val/accuracy``, ``val/pooled/iou`` (the
    ``positive_classes`` as one class), ``val/detection/f1`` (each tile one "has a positive class"
    decision) and, with ``loss_fn``, ``val/loss`` (that loss of the merged prediction, over the tiles
    decoded whole): prefixed here so per-class keys (which hold a ``/`` already) land under ``val/``.
    """
    settings = settings or ValidationSettings()
    if streamed and stats is None:
        raise ValueError("streamed validation tiles need the band statistics to normalise them")
    suppressed = ignore_index if 0 <= ignore_index < num_classes else None
    tta = TTAConfig.from_settings(settings.tta)

    def evaluate(model: nn.Module, loader: Any) -> dict[str, float]:
        device = next(model.parameters()).device
        was_training = model.training
        predictor = EnsemblePredictor([model], tta, device, suppressed_class=suppressed)
        scores = ValidationScores(num_classes, ignore_index, positive_classes, settings.scoring)
        for batch in loader:
            images = [sample["image"] for sample in batch]
            for sample, probabilities in zip(
                batch, predict_tiles(predictor, images, settings.windows.for_device(device.type)), strict=True
            ):
                truth = sample["mask"].numpy()
                scores.add_tile(probabilities.argmax(0).numpy(), truth)
                if loss_fn is not None:
                    pixels = int(np.count_nonzero(scores.matrix.scored(truth)))
                    scores.add_loss(tile_loss(loss_fn, probabilities, sample["mask"]), pixels)
        for row in streamed:
            assert stats is not None
            _score_streamed(predictor, row, stats, settings, scores)
        model.train(was_training)
        return scores.to_logs(class_names)

    return evaluate
