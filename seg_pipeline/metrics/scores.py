"""Scores of one confusion matrix, per class and macro-averaged, plus pooled positive-class scores.

IoU, Dice, precision, recall, accuracy, FWIoU and kappa; the conventions are in the
``seg_pipeline.metrics`` docstring.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from seg_pipeline.metrics._checks import class_names_for, nanmean, readonly, safe_divide, scalar_ratio


@dataclass(frozen=True, eq=False)
class SegmentationMetrics:
    """Every pixel metric of one confusion matrix; per-class arrays are indexed by class id.

    ``eq=False`` because the fields are numpy arrays (elementwise ``==`` has no single truth
    value); the arrays are read-only so the object really is immutable.
    """

    matrix: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    tn: np.ndarray
    support: np.ndarray
    iou: np.ndarray
    dice: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    miou: float
    mdice: float
    mprecision: float
    mrecall: float
    pixel_accuracy: float
    fwiou: float
    kappa: float
    excluded_classes: tuple[int, ...] = ()

    @property
    def num_classes(self) -> int:
        """Number of classes ``K`` of the matrix."""
        return int(self.matrix.shape[0])

    @classmethod
    def from_matrix(cls, matrix: np.ndarray, excluded_classes: Iterable[int] = ()) -> SegmentationMetrics:
        """Compute all metrics from a ``(K, K)`` count matrix (rows ground truth, columns prediction).

        ``excluded_classes`` are reported as NaN and left out of the macro means (see module doc).
        """
        counts = np.array(matrix, dtype=np.int64)
        if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
            raise ValueError(f"matrix must be square (K, K), got shape {counts.shape}.")
        num_classes = counts.shape[0]
        excluded = tuple(sorted({int(c) for c in excluded_classes if 0 <= int(c) < num_classes}))

        total = int(counts.sum())
        tp = np.diag(counts).copy()
        gt_count = counts.sum(axis=1)
        pred_count = counts.sum(axis=0)
        fp = pred_count - tp
        fn = gt_count - tp
        tn = total - tp - fp - fn

        iou = safe_divide(tp, tp + fp + fn)
        dice = safe_divide(2 * tp, 2 * tp + fp + fn)
        precision = safe_divide(tp, tp + fp)
        recall = safe_divide(tp, tp + fn)
        for per_class in (iou, dice, precision, recall):
            per_class[list(excluded)] = np.nan

        gt_frequency = safe_divide(gt_count, total)
        weighted_iou = gt_frequency * iou
        fwiou = float(np.nansum(weighted_iou)) if total else math.nan

        observed_agreement = scalar_ratio(int(tp.sum()), total)
        chance_pairs = float(np.dot(gt_count.astype(np.float64), pred_count))  # float: no int64 overflow
        chance_agreement = scalar_ratio(chance_pairs, float(total) ** 2)
        kappa = scalar_ratio(observed_agreement - chance_agreement, 1.0 - chance_agreement)

        return cls(
            matrix=readonly(counts),
            tp=readonly(tp),
            fp=readonly(fp),
            fn=readonly(fn),
            tn=readonly(tn),
            support=readonly(gt_count),
            iou=readonly(iou),
            dice=readonly(dice),
            precision=readonly(precision),
            recall=readonly(recall),
            miou=nanmean(iou),
            mdice=nanmean(dice),
            mprecision=nanmean(precision),
            mrecall=nanmean(recall),
            pixel_accuracy=observed_agreement,
            fwiou=fwiou,
            kappa=kappa,
            excluded_classes=excluded,
        )

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, float]:
        """Flat ``{"iou/<class>": ..., "miou": ...}`` dict for MLflow / Dagster metadata (NaN kept)."""
        names = class_names_for(class_names, self.num_classes)
        flat: dict[str, float] = {}
        for metric_name in ("iou", "dice", "precision", "recall", "support"):
            values = getattr(self, metric_name)
            for name, value in zip(names, values.tolist(), strict=True):
                flat[f"{metric_name}/{name}"] = float(value)
        for scalar_name in ("miou", "mdice", "mprecision", "mrecall", "pixel_accuracy", "fwiou", "kappa"):
            flat[scalar_name] = float(getattr(self, scalar_name))
        return flat

    def per_class_table(self, class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """One row per class (index, name, scores and raw counts) for a report table or CSV."""
        names = class_names_for(class_names, self.num_classes)
        rows: list[dict[str, Any]] = []
        for index, name in enumerate(names):
            rows.append(
                {
                    "class_index": index,
                    "class_name": name,
                    "iou": float(self.iou[index]),
                    "dice": float(self.dice[index]),
                    "precision": float(self.precision[index]),
                    "recall": float(self.recall[index]),
                    "support": int(self.support[index]),
                    "predicted": int(self.tp[index] + self.fp[index]),
                    "tp": int(self.tp[index]),
                    "fp": int(self.fp[index]),
                    "fn": int(self.fn[index]),
                    "tn": int(self.tn[index]),
                }
            )
        return rows


def positive_index(positive_classes: Iterable[int], num_classes: int, name: str) -> np.ndarray:
    """The sorted positive class ids, checked to be non-empty and (with ``num_classes``) in range."""
    classes = np.unique(np.asarray(list(positive_classes), dtype=np.int64))
    if classes.size == 0:
        raise ValueError(f"{name} is empty; name at least one class id, e.g. range(1, num_classes).")
    if num_classes and (classes.min() < 0 or classes.max() >= num_classes):
        raise ValueError(f"{name} {classes.tolist()} must lie in [0, {num_classes}).")
    return classes


def pooled_metrics(matrix: np.ndarray | Any, positive_classes: Iterable[int]) -> dict[str, float]:
    """IoU, Dice, precision, recall of the union of ``positive_classes`` as one class vs the rest.

    Seed 003's ``fire_iou``: all classes with index > 0 pooled, so confusing two fire
    grades still counts as a hit. Counts ``tp``, ``fp``, ``fn``, ``tn`` are returned too;
    a 0/0 score (no positive pixel in ground truth or prediction) is NaN.
    """
    counts = np.asarray(getattr(matrix, "matrix", matrix), dtype=np.int64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"matrix must be square (K, K), got shape {counts.shape}.")
    positive = positive_index(positive_classes, counts.shape[0], "positive_classes")
    is_positive = np.zeros(counts.shape[0], dtype=bool)
    is_positive[positive] = True

    total = int(counts.sum())
    tp = int(counts[np.ix_(is_positive, is_positive)].sum())
    fp = int(counts[np.ix_(~is_positive, is_positive)].sum())
    fn = int(counts[np.ix_(is_positive, ~is_positive)].sum())
    tn = total - tp - fp - fn
    return {
        "iou": scalar_ratio(tp, tp + fp + fn),
        "dice": scalar_ratio(2 * tp, 2 * tp + fp + fn),
        "precision": scalar_ratio(tp, tp + fp),
        "recall": scalar_ratio(tp, tp + fn),
        "tp": float(tp),
        "fp": float(fp),
        "fn": float(fn),
        "tn": float(tn),
    }
