"""Input checks and NaN-safe arithmetic shared by the metric accumulators (numpy only)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

#: How many offending values an error message lists at most.
MAX_LISTED_VALUES = 10
TARGET_HINT = "pass ignore_index=<value> for unlabeled pixels or remap the labels."
PRED_HINT = "predictions must be class ids from 0 to num_classes-1 (check num_classes)."


def to_numpy(values: Any, name: str) -> np.ndarray:
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


def check_same_shape(pred: np.ndarray, target: np.ndarray) -> None:
    if pred.shape != target.shape:
        raise ValueError(
            f"pred shape {pred.shape} differs from target shape {target.shape}; "
            "pass one predicted class id per target pixel, e.g. (B, H, W) and (B, H, W)."
        )


def safe_divide(numerator: npt.ArrayLike, denominator: npt.ArrayLike) -> np.ndarray:
    """Elementwise ratio as float64 with NaN where the denominator is 0 (0/0 is undefined, not 0)."""
    top = np.asarray(numerator, dtype=np.float64)
    bottom = np.asarray(denominator, dtype=np.float64)
    out = np.full(np.broadcast(top, bottom).shape, np.nan)
    np.divide(top, bottom, out=out, where=bottom != 0)
    return out


def scalar_ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator != 0 else math.nan


def nanmean(values: np.ndarray) -> float:
    """Mean of the non-NaN entries, NaN (without a RuntimeWarning) when there are none."""
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def as_unsigned(values: np.ndarray) -> np.ndarray:
    """View signed ints as unsigned of the same width, so negatives become huge.

    One ``>= K`` test (or one ``max()``) then checks both bounds, a pass fewer than min and max.
    """
    return values.view(values.dtype.str.replace("i", "u")) if values.dtype.kind == "i" else values


def check_range(
    values: np.ndarray, num_classes: int, name: str, hint: str, valid: np.ndarray | None = None
) -> None:
    """Raise ValueError naming the labels outside ``[0, num_classes)`` at counted (``valid``) pixels.

    Without a mask this is a single ``max()`` pass when everything is in range.
    """
    if values.size == 0:
        return
    if valid is None:
        if as_unsigned(values).max() < num_classes:
            return
        bad_mask = as_unsigned(values) >= num_classes
    else:
        bad_mask = as_unsigned(values) >= num_classes
        bad_mask &= valid
        if not bad_mask.any():
            return
    bad = np.unique(values[bad_mask])
    listed = ", ".join(str(v) for v in bad[:MAX_LISTED_VALUES].tolist())
    more = f" (and {bad.size - MAX_LISTED_VALUES} more)" if bad.size > MAX_LISTED_VALUES else ""
    raise ValueError(
        f"{name} holds values [{listed}]{more} outside [0, {num_classes}) that are not ignored; {hint}"
    )


def class_names_for(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(index) for index in range(num_classes)]
    names = [str(name) for name in class_names]
    if len(names) != num_classes:
        raise ValueError(
            f"class_names has {len(names)} entries but the metrics cover {num_classes} classes; "
            "pass one name per class index."
        )
    return names


def readonly(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array
