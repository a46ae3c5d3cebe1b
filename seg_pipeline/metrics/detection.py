"""Patch-level detection counts and scores ("does this patch hold a positive class?", seed 003)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from seg_pipeline.metrics._checks import check_same_shape, scalar_ratio, to_numpy
from seg_pipeline.metrics.scores import positive_index


@dataclass(frozen=True)
class DetectionMetrics:
    """Patch-level "has positive class" scores; a 0/0 score is NaN."""

    tp: int
    fp: int
    tn: int
    fn: int
    accuracy: float
    precision: float
    recall: float
    f1: float

    def to_dict(self) -> dict[str, float]:
        """Flat dict with float values, ready for a metrics logger."""
        return {
            "accuracy": self.accuracy,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "tp": float(self.tp),
            "fp": float(self.fp),
            "tn": float(self.tn),
            "fn": float(self.fn),
        }


class DetectionCounter:
    """Counts patch-level detections derived from segmentation (seed 003 "has fire").

    A patch is positive when at least ``min_pixels`` of its pixels belong to
    ``positive_classes``; this is decided separately for prediction and target, and the pair
    is counted as tp/fp/tn/fn. Pixels whose target equals ``ignore_index`` count for neither.

    Args:
        positive_classes: class ids that make a patch positive (e.g. ``range(1, K)`` for fire).
        min_pixels: how many positive pixels a patch needs (1 = "any pixel").
        ignore_index: optional target value whose pixels are left out.
    """

    def __init__(self, positive_classes: Iterable[int], min_pixels: int = 1, ignore_index: int | None = None):
        self.positive_classes = tuple(positive_index(positive_classes, 0, "positive_classes").tolist())
        if isinstance(min_pixels, bool) or not isinstance(min_pixels, int | np.integer) or min_pixels < 1:
            raise ValueError(f"min_pixels must be an int >= 1, got {min_pixels!r}.")
        self.min_pixels = int(min_pixels)
        self._is_positive = np.zeros(1 << 16, dtype=bool)  # label value -> positive: a lookup, no copies
        self._is_positive[list(self.positive_classes)] = True
        self.ignore_index = ignore_index
        self._counts = np.zeros(4, dtype=np.int64)  # tp, fp, tn, fn

    def _has_positive(self, labels: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
        positive = np.isin(labels, self.positive_classes)
        if valid is not None:
            positive &= valid
        has_positive: np.ndarray = positive.sum(axis=1) >= self.min_pixels
        return has_positive

    def update(self, pred: Any, target: Any) -> DetectionCounter:
        """Add a batch ``(B, H, W)`` (or one ``(H, W)`` patch) of predicted and target class ids."""
        pred_array = to_numpy(pred, "pred")
        target_array = to_numpy(target, "target")
        check_same_shape(pred_array, target_array)
        if pred_array.ndim not in (2, 3):
            raise ValueError(f"pred and target must be (B, H, W) or (H, W), got shape {pred_array.shape}.")
        if pred_array.ndim == 2:
            pred_array, target_array = pred_array[None], target_array[None]
        batch = pred_array.shape[0]
        pred_rows = pred_array.reshape(batch, -1)
        target_rows = target_array.reshape(batch, -1)
        valid = None if self.ignore_index is None else target_rows != self.ignore_index

        predicted = self._has_positive(pred_rows, valid)
        actual = self._has_positive(target_rows, valid)
        self._counts += [
            int(np.count_nonzero(predicted & actual)),
            int(np.count_nonzero(predicted & ~actual)),
            int(np.count_nonzero(~predicted & ~actual)),
            int(np.count_nonzero(~predicted & actual)),
        ]
        return self

    def positive_pixels(self, labels: np.ndarray, scored: np.ndarray) -> int:
        """Scored pixels of ``labels`` (any values < 65536: classes, ignore, nodata) in a positive class."""
        return int(np.count_nonzero(self._is_positive[labels] & scored))

    def add_decision(self, predicted_pixels: int, true_pixels: int) -> DetectionCounter:
        """Add one patch known only by its counts of positive pixels (a scene scored strip by strip)."""
        predicted, actual = predicted_pixels >= self.min_pixels, true_pixels >= self.min_pixels
        self._counts += [predicted and actual, predicted and not actual, not predicted and not actual,
                         actual and not predicted]  # fmt: skip
        return self

    def merge(self, other: DetectionCounter) -> DetectionCounter:
        """Add another counter with the same settings in place and return self."""
        mine = (self.positive_classes, self.min_pixels, self.ignore_index)
        theirs = (other.positive_classes, other.min_pixels, other.ignore_index)
        if mine != theirs:
            raise ValueError(f"cannot merge detection counters with different settings: {mine} vs {theirs}.")
        self._counts += other._counts
        return self

    def reset(self) -> None:
        """Zero the counts."""
        self._counts[:] = 0

    def compute(self) -> DetectionMetrics:
        """Accuracy, precision, recall and F1 of the patch decisions so far."""
        tp, fp, tn, fn = (int(v) for v in self._counts)
        return DetectionMetrics(
            tp=tp,
            fp=fp,
            tn=tn,
            fn=fn,
            accuracy=scalar_ratio(tp + tn, tp + fp + tn + fn),
            precision=scalar_ratio(tp, tp + fp),
            recall=scalar_ratio(tp, tp + fn),
            f1=scalar_ratio(2 * tp, 2 * tp + fp + fn),
        )
