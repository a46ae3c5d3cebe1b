"""Segmentation metrics derived from one accumulated confusion matrix (DESIGN F22).

Why one matrix: every pixel metric (IoU, Dice/F1, precision, recall, pixel accuracy,
frequency-weighted IoU, Cohen's kappa, pooled positive-class scores) is a function of the
``K x K`` count matrix, so batches are reduced to ``K*K`` integers as they stream in (one
``np.bincount``) and the metrics are computed once at the end. Accumulators merge exactly,
so per-worker or per-rank matrices can be summed.

Conventions (read these before comparing numbers with another tool):

* ``matrix[i, j]`` counts pixels whose ground truth is ``i`` and prediction is ``j``.
* Per class ``c``: ``tp = M[c, c]``, ``fp = column sum - tp``, ``fn = row sum - tp``,
  ``tn = total - tp - fp - fn``.
* A 0/0 ratio is ``NaN``, never 0 or 1. A class absent from both ground truth and
  prediction therefore has NaN IoU, Dice, precision and recall. Precision is also NaN for a
  class present in the ground truth but never predicted, and recall for a class predicted
  but absent from the ground truth (IoU and Dice are then defined and 0).
* Macro means (``miou``, ``mdice``, ``mprecision``, ``mrecall``) are the unweighted mean of
  the per-class values that are not NaN (``np.nanmean``, as mmseg does), never micro
  (pooled-pixel) averages. If every class is NaN the mean is NaN.
* Classes whose ground truth is ignored by construction (class 0 under
  ``ignore_nonpositive``, or ``ignore_index`` when it lies inside ``[0, K)``) are reported as
  NaN and left out of the macro means: pixels predicted as that class on valid ground truth
  still count as misses (``fn``) of the true class, so they lower the other scores.
* ``pixel_accuracy``, ``fwiou`` and ``kappa`` use every non-ignored pixel; they are NaN when
  no pixel was counted (kappa also when chance agreement is 1).

The module needs only numpy; torch tensors are accepted and converted lazily.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ConfusionMatrix",
    "DetectionCounter",
    "DetectionMetrics",
    "SegmentationMetrics",
    "pooled_metrics",
]

#: How many offending values an error message lists at most.
_MAX_LISTED_VALUES = 10
_TARGET_HINT = "pass ignore_index=<value> for unlabeled pixels or remap the labels."
_PRED_HINT = "predictions must be class ids from 0 to num_classes-1 (check num_classes)."


def _to_numpy(values: Any, name: str) -> np.ndarray:
    """Return ``values`` as a numpy integer array, converting torch tensors without importing torch."""
    if hasattr(values, "detach") and hasattr(values, "cpu"):  # a torch tensor, on any device
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.dtype == np.bool_:
        return array.view(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"{name} must hold integer class indices, got dtype {array.dtype}; "
            "pass class ids (e.g. logits.argmax(1)), not scores or probabilities."
        )
    return array


def _check_same_shape(pred: np.ndarray, target: np.ndarray) -> None:
    if pred.shape != target.shape:
        raise ValueError(
            f"pred shape {pred.shape} differs from target shape {target.shape}; "
            "pass one predicted class id per target pixel, e.g. (B, H, W) and (B, H, W)."
        )


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise ratio as float64 with NaN where the denominator is 0 (0/0 is undefined, not 0)."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.full(np.broadcast(numerator, denominator).shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _scalar_ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator != 0 else math.nan


def _nanmean(values: np.ndarray) -> float:
    """Mean of the non-NaN entries, NaN (without a RuntimeWarning) when there are none."""
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def _as_unsigned(values: np.ndarray) -> np.ndarray:
    """View signed ints as unsigned of the same width, so negatives become huge.

    One ``>= K`` test (or one ``max()``) then checks both bounds, a pass fewer than min and max.
    """
    return values.view(values.dtype.str.replace("i", "u")) if values.dtype.kind == "i" else values


def _check_range(
    values: np.ndarray, num_classes: int, name: str, hint: str, valid: np.ndarray | None = None
) -> None:
    """Raise ValueError naming the labels outside ``[0, num_classes)`` at counted (``valid``) pixels.

    Without a mask this is a single ``max()`` pass when everything is in range.
    """
    if values.size == 0:
        return
    if valid is None:
        if _as_unsigned(values).max() < num_classes:
            return
        bad_mask = _as_unsigned(values) >= num_classes
    else:
        bad_mask = _as_unsigned(values) >= num_classes
        bad_mask &= valid
        if not bad_mask.any():
            return
    bad = np.unique(values[bad_mask])
    listed = ", ".join(str(v) for v in bad[:_MAX_LISTED_VALUES].tolist())
    more = f" (and {bad.size - _MAX_LISTED_VALUES} more)" if bad.size > _MAX_LISTED_VALUES else ""
    raise ValueError(
        f"{name} holds values [{listed}]{more} outside [0, {num_classes}) that are not ignored; {hint}"
    )


def _class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(index) for index in range(num_classes)]
    names = [str(name) for name in class_names]
    if len(names) != num_classes:
        raise ValueError(
            f"class_names has {len(names)} entries but the metrics cover {num_classes} classes; "
            "pass one name per class index."
        )
    return names


def _readonly(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


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

        iou = _safe_divide(tp, tp + fp + fn)
        dice = _safe_divide(2 * tp, 2 * tp + fp + fn)
        precision = _safe_divide(tp, tp + fp)
        recall = _safe_divide(tp, tp + fn)
        for per_class in (iou, dice, precision, recall):
            per_class[list(excluded)] = np.nan

        gt_frequency = _safe_divide(gt_count, total)
        weighted_iou = gt_frequency * iou
        fwiou = float(np.nansum(weighted_iou)) if total else math.nan

        observed_agreement = _scalar_ratio(int(tp.sum()), total)
        chance_pairs = float(np.dot(gt_count.astype(np.float64), pred_count))  # float: no int64 overflow
        chance_agreement = _scalar_ratio(chance_pairs, float(total) ** 2)
        kappa = _scalar_ratio(observed_agreement - chance_agreement, 1.0 - chance_agreement)

        return cls(
            matrix=_readonly(counts),
            tp=_readonly(tp),
            fp=_readonly(fp),
            fn=_readonly(fn),
            tn=_readonly(tn),
            support=_readonly(gt_count),
            iou=_readonly(iou),
            dice=_readonly(dice),
            precision=_readonly(precision),
            recall=_readonly(recall),
            miou=_nanmean(iou),
            mdice=_nanmean(dice),
            mprecision=_nanmean(precision),
            mrecall=_nanmean(recall),
            pixel_accuracy=observed_agreement,
            fwiou=fwiou,
            kappa=kappa,
            excluded_classes=excluded,
        )

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, float]:
        """Flat ``{"iou/<class>": ..., "miou": ...}`` dict for MLflow / Dagster metadata (NaN kept)."""
        names = _class_names(class_names, self.num_classes)
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
        names = _class_names(class_names, self.num_classes)
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


class ConfusionMatrix:
    """Streaming ``K x K`` pixel confusion matrix: ``update`` per batch, ``compute`` once.

    Args:
        num_classes: number of classes ``K``; valid labels are ``0 .. K-1``.
        ignore_index: target value whose pixels are dropped (e.g. 255 for "unlabeled").
        ignore_nonpositive: also drop pixels whose target is ``<= 0`` (the seed-000 rule: IoU
            masks out labels ``<= 0`` so unlabeled/background pixels are not penalised).
    """

    def __init__(self, num_classes: int, ignore_index: int | None = None, ignore_nonpositive: bool = False):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
        if ignore_index is not None and (
            isinstance(ignore_index, bool) or not isinstance(ignore_index, int | np.integer)
        ):
            raise ValueError(f"ignore_index must be an int or None, got {ignore_index!r}.")
        self.num_classes = int(num_classes)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.ignore_nonpositive = bool(ignore_nonpositive)
        self._counts = np.zeros(self.num_classes * self.num_classes, dtype=np.int64)

    @property
    def matrix(self) -> np.ndarray:
        """Counts so far, ``(K, K)`` int64, rows ground truth and columns prediction (a copy)."""
        return self._counts.reshape(self.num_classes, self.num_classes).copy()

    @property
    def excluded_classes(self) -> tuple[int, ...]:
        """Classes whose ground truth can never be counted because the ignore rule drops it."""
        excluded: set[int] = set()
        if self.ignore_nonpositive:
            excluded.add(0)
        if self.ignore_index is not None and 0 <= self.ignore_index < self.num_classes:
            excluded.add(self.ignore_index)
        return tuple(sorted(excluded))

    def _valid_mask(self, target: np.ndarray) -> np.ndarray | None:
        """Boolean mask of counted pixels, or None when no rule is set (no mask pass at all)."""
        valid: np.ndarray | None = None
        if self.ignore_index is not None:
            valid = target != self.ignore_index
        if self.ignore_nonpositive:
            positive = target > 0
            valid = positive if valid is None else valid & positive
        return valid

    def update(self, pred: Any, target: Any) -> ConfusionMatrix:
        """Add one batch of predicted and target class ids, any equal shapes (e.g. (B,H,W) or (H,W)).

        Raises:
            ValueError: shapes differ, dtypes are not integer, or a non-ignored label or a
                prediction at a non-ignored pixel is outside ``[0, num_classes)``.
        """
        pred_array = _to_numpy(pred, "pred")
        target_array = _to_numpy(target, "target")
        _check_same_shape(pred_array, target_array)
        target_flat = target_array.reshape(-1)
        pred_flat = pred_array.reshape(-1)

        valid = self._valid_mask(target_flat)
        if valid is not None and valid.all():
            valid = None  # nothing ignored in this batch: take the mask-free path
        _check_range(target_flat, self.num_classes, "target", _TARGET_HINT, valid)
        _check_range(pred_flat, self.num_classes, "pred", _PRED_HINT, valid)

        num_bins = self._counts.size
        # Ignored pixels go to one extra sentinel bin (index K*K), dropped after counting: this is
        # ~20% faster than compressing both arrays with the boolean mask.
        sentinel_bins = 0 if valid is None else 1
        # The smallest integer dtype that holds every bin: uint8 for uint8 masks and K <= 16,
        # measured ~30% faster than widening to int64 first (bincount casts internally anyway).
        index_dtype = np.result_type(
            target_flat.dtype, pred_flat.dtype, np.min_scalar_type(num_bins - 1 + sentinel_bins)
        )
        if index_dtype.kind not in "iu" or index_dtype == np.uint64:  # bincount refuses uint64
            index_dtype = np.dtype(np.int64)
        # Counted labels lie in [0, K), so K*t+p fits index_dtype and the cast is exact there;
        # ignored pixels may wrap around, but they are overwritten with the sentinel below.
        pair_index = target_flat.astype(index_dtype)  # a fresh array, so the in-place ops are safe
        pair_index *= self.num_classes
        np.add(pair_index, pred_flat, out=pair_index, casting="unsafe")
        if valid is not None:
            np.copyto(pair_index, num_bins, where=~valid)
        self._counts += np.bincount(pair_index, minlength=num_bins + sentinel_bins)[:num_bins]
        return self

    def update_matrix(self, matrix: np.ndarray) -> ConfusionMatrix:
        """Add an already reduced ``(K, K)`` count matrix (e.g. from another process)."""
        counts = np.asarray(matrix)
        if counts.shape != (self.num_classes, self.num_classes):
            raise ValueError(
                f"matrix shape {counts.shape} does not match ({self.num_classes}, {self.num_classes})."
            )
        if not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
            raise ValueError("matrix must hold non-negative integer pixel counts.")
        self._counts += counts.reshape(-1).astype(np.int64)
        return self

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another accumulator's counts in place (same classes and ignore rules) and return self."""
        if not isinstance(other, ConfusionMatrix):
            raise ValueError(f"other must be a ConfusionMatrix, got {type(other).__name__}.")
        mine = (self.num_classes, self.ignore_index, self.ignore_nonpositive)
        theirs = (other.num_classes, other.ignore_index, other.ignore_nonpositive)
        if mine != theirs:
            raise ValueError(
                "cannot merge confusion matrices with different (num_classes, ignore_index, "
                f"ignore_nonpositive): {mine} vs {theirs}."
            )
        self._counts += other._counts
        return self

    def reset(self) -> None:
        """Zero the counts, e.g. at the start of each validation epoch."""
        self._counts[:] = 0

    def compute(self) -> SegmentationMetrics:
        """All metrics of the counts so far (see the module docstring for NaN handling)."""
        return SegmentationMetrics.from_matrix(self.matrix, excluded_classes=self.excluded_classes)

    def pooled(self, positive_classes: Iterable[int]) -> dict[str, float]:
        """Shortcut for ``pooled_metrics(self.matrix, positive_classes)``."""
        return pooled_metrics(self.matrix, positive_classes)

    def __repr__(self) -> str:
        return (
            f"ConfusionMatrix(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
            f"ignore_nonpositive={self.ignore_nonpositive}, pixels={int(self._counts.sum())})"
        )


def _positive_index(positive_classes: Iterable[int], num_classes: int, name: str) -> np.ndarray:
    classes = np.unique(np.asarray(list(positive_classes), dtype=np.int64))
    if classes.size == 0:
        raise ValueError(f"{name} is empty; name at least one class id, e.g. range(1, num_classes).")
    if num_classes and (classes.min() < 0 or classes.max() >= num_classes):
        raise ValueError(f"{name} {classes.tolist()} must lie in [0, {num_classes}).")
    return classes


def pooled_metrics(matrix: np.ndarray | ConfusionMatrix, positive_classes: Iterable[int]) -> dict[str, float]:
    """IoU, Dice, precision, recall of the union of ``positive_classes`` as one class vs the rest.

    Seed 003's ``fire_iou``: all classes with index > 0 pooled, so confusing two fire
    grades still counts as a hit. Counts ``tp``, ``fp``, ``fn``, ``tn`` are returned too;
    a 0/0 score (no positive pixel in ground truth or prediction) is NaN.
    """
    counts = matrix.matrix if isinstance(matrix, ConfusionMatrix) else np.asarray(matrix, dtype=np.int64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"matrix must be square (K, K), got shape {counts.shape}.")
    positive = _positive_index(positive_classes, counts.shape[0], "positive_classes")
    is_positive = np.zeros(counts.shape[0], dtype=bool)
    is_positive[positive] = True

    total = int(counts.sum())
    tp = int(counts[np.ix_(is_positive, is_positive)].sum())
    fp = int(counts[np.ix_(~is_positive, is_positive)].sum())
    fn = int(counts[np.ix_(is_positive, ~is_positive)].sum())
    tn = total - tp - fp - fn
    return {
        "iou": _scalar_ratio(tp, tp + fp + fn),
        "dice": _scalar_ratio(2 * tp, 2 * tp + fp + fn),
        "precision": _scalar_ratio(tp, tp + fp),
        "recall": _scalar_ratio(tp, tp + fn),
        "tp": float(tp),
        "fp": float(fp),
        "fn": float(fn),
        "tn": float(tn),
    }


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
        self.positive_classes = tuple(_positive_index(positive_classes, 0, "positive_classes").tolist())
        if isinstance(min_pixels, bool) or not isinstance(min_pixels, int | np.integer) or min_pixels < 1:
            raise ValueError(f"min_pixels must be an int >= 1, got {min_pixels!r}.")
        self.min_pixels = int(min_pixels)
        self.ignore_index = ignore_index
        self._counts = np.zeros(4, dtype=np.int64)  # tp, fp, tn, fn

    def _has_positive(self, labels: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
        positive = np.isin(labels, self.positive_classes)
        if valid is not None:
            positive &= valid
        return positive.sum(axis=1) >= self.min_pixels

    def update(self, pred: Any, target: Any) -> DetectionCounter:
        """Add a batch ``(B, H, W)`` (or one ``(H, W)`` patch) of predicted and target class ids."""
        pred_array = _to_numpy(pred, "pred")
        target_array = _to_numpy(target, "target")
        _check_same_shape(pred_array, target_array)
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
            accuracy=_scalar_ratio(tp + tn, tp + fp + tn + fn),
            precision=_scalar_ratio(tp, tp + fp),
            recall=_scalar_ratio(tp, tp + fn),
            f1=_scalar_ratio(2 * tp, 2 * tp + fp + fn),
        )
