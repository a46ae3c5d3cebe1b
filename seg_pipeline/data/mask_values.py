"""Mask values as written on disk -> class ids: recoding, its automatic detection, label checks.

Public building datasets ship binary masks as 0/255 (Nairobi, SpaceNet exports, many PNG sets):
read as class ids with the usual ``ignore_index`` 255, every building pixel would silently become
"not labelled". A dataset therefore declares ``mask_values`` (raw value -> class id, e.g.
``{255: 1}``), or leaves it unset and a binary dataset whose masks hold only 0 and 255 is recoded
``{255: 1}`` with a warning. Ingest counts the raw values of every mask once (sparse, in the
catalog); class counts, labelled fractions and out-of-range checks are derived from them, and the
shards store recoded masks, so training, validation, prediction and evaluation all see class ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

#: Raw values the automatic detection reads as a binary foreground (0 background, 255 foreground).
BINARY_255 = {255: 1}
#: Colour masks (3 or 4 bands of uint8) are counted and recoded by one value per colour,
#: ``r << 16 | g << 8 | b``: above every single-band value, so the two kinds never collide.
COLOR_BASE = 1 << 16


def color_key(rgb: Sequence[int]) -> int:
    """The value a colour-mask pixel of colour ``rgb`` is counted and recoded under."""
    r, g, b = (int(c) for c in rgb)
    return COLOR_BASE + (r << 16 | g << 8 | b)


def color_keys(block: np.ndarray) -> np.ndarray:
    """``(bands >= 3, H, W)`` uint8 colour-mask pixels -> one int64 key per pixel (alpha ignored)."""
    r, g, b = (block[i].astype(np.int64) for i in range(3))
    return COLOR_BASE + (r << 16 | g << 8 | b)


def describe_value(value: int) -> str:
    """A raw value as users know it: the number, or ``rgb(r, g, b)`` for a colour."""
    if value < COLOR_BASE:
        return str(value)
    rgb = value - COLOR_BASE
    return f"rgb({rgb >> 16}, {(rgb >> 8) & 255}, {rgb & 255})"


def colors_to_values(colors: Mapping[str, Sequence[int]], class_names: Sequence[str]) -> dict[int, int]:
    """``mask_colors`` (class name -> rgb) as a recoding of colour keys to class ids.

    Raises:
        ValueError: a name that is no class (the message lists the classes).
    """
    unknown = [name for name in colors if name not in class_names]
    if unknown:
        raise ValueError(
            f"mask_colors names {unknown}, which are not classes {list(class_names)}: name the classes "
            "in class_names or classes.txt"
        )
    return {color_key(rgb): list(class_names).index(name) for name, rgb in colors.items()}


def mask_lookup(mask_values: Mapping[int, int], max_value: int) -> np.ndarray:
    """A table ``raw value -> stored value`` for values ``0..max_value`` (identity outside the recoding)."""
    table = np.arange(max(max_value, *mask_values, 0) + 1, dtype=np.int64)
    for raw, value in mask_values.items():
        table[int(raw)] = int(value)
    return table


def recode_mask(mask: np.ndarray, mask_values: Mapping[int, int]) -> np.ndarray:
    """``mask`` with its raw values recoded, in the smallest dtype holding the result.

    A ``(bands >= 3, H, W)`` colour mask becomes one band of class ids.
    """
    if mask.ndim == 3 and mask.shape[0] >= 3:
        keys, inverse = np.unique(color_keys(mask), return_inverse=True)
        labels = np.array([mask_values.get(int(k), int(k)) for k in keys], dtype=np.int64)
        out = labels[inverse].reshape(mask.shape[1:])[np.newaxis]
        return out.astype(np.min_scalar_type(int(out.max(initial=0))))
    if not mask_values:
        return mask
    table = mask_lookup(mask_values, int(mask.max(initial=0)))
    out = table[mask.astype(np.int64)]
    return out.astype(np.min_scalar_type(int(out.max(initial=0))))


def detect_mask_values(
    raw_counts: Iterable[Mapping[int, int]], num_classes: int | None, ignore_index: int
) -> dict[int, int]:
    """``{255: 1}`` when the masks are binary 0/255 (both values occur, no other anywhere) and the
    class list has two classes or none; else ``{}``. Class 1 would otherwise have no pixel at all, so
    255 must be the foreground, not "ignore". Masks of 255 alone stay "not labelled".
    """
    seen: set[int] = set()
    for counts in raw_counts:
        seen.update(value for value, n in counts.items() if n)
    binary = seen == {0, 255}
    if binary and num_classes in (None, 2) and ignore_index == 255:
        return dict(BINARY_255)
    return {}


def class_counts(
    raw: Mapping[int, int], mask_values: Mapping[int, int], num_classes: int | None, ignore_index: int
) -> tuple[list[int], int, list[int]]:
    """Per-class pixel counts, ignored pixels and out-of-range raw values of one mask's raw counts."""
    counts: dict[int, int] = {}
    ignored = 0
    bad: list[int] = []
    for value, n in raw.items():
        label = int(mask_values.get(value, value))
        if label == ignore_index:
            ignored += n
        elif label >= COLOR_BASE or (num_classes is not None and label >= num_classes):
            bad.append(int(value))
        else:
            counts[label] = counts.get(label, 0) + n
    size = num_classes if num_classes is not None else max(counts, default=-1) + 1
    return [counts.get(k, 0) for k in range(max(size, 1))], ignored, sorted(bad)


def label_row(
    row: dict[str, Any], mask_values: Mapping[int, int], num_classes: int | None, ignore_index: int
) -> str | None:
    """Fill ``class_counts``, ``has_label`` and ``labeled_fraction`` of a row with a mask from its raw
    counts; return why the mask cannot be used (labels outside the classes), or ``None``.
    """
    raw = raw_counts(row)
    counts, ignored, bad = class_counts(raw, mask_values, num_classes, ignore_index)
    if bad:
        if bad[0] >= COLOR_BASE:
            colours = ", ".join(describe_value(v) for v in bad[:10])
            return (
                f"mask {row['mask_path']} is colour-coded and has colours {colours} that dataset.mask_colors "
                "does not name; add them (class name -> [r, g, b]) or fix the mask"
            )
        recoded = f" after mask_values {dict(mask_values)}" if mask_values else ""
        top = (num_classes or 0) - 1
        return (
            f"mask {row['mask_path']} has labels {bad[:10]} outside the class set 0..{top}"
            f"{recoded} (ignore value {ignore_index}); fix the mask, the class list or dataset.mask_values"
        )
    labelled = sum(counts)
    row.update(
        class_counts=counts, has_label=labelled > 0, labeled_fraction=labelled / max(labelled + ignored, 1)
    )
    return None


def raw_counts(row: Mapping[str, Any]) -> dict[int, int]:
    """The raw value -> pixel count of a catalog row's mask (empty without one)."""
    values, counts = row.get("mask_values"), row.get("mask_value_counts")
    if values is None or counts is None:
        return {}
    return {int(v): int(n) for v, n in zip(values, counts, strict=True)}


def empty_classes(rows: Sequence[Mapping[str, Any]], class_names: Sequence[str]) -> list[str]:
    """Names of the classes without a single labelled pixel in ``rows`` (a warning at ingest)."""
    totals = np.zeros(len(class_names), dtype=np.int64)
    for row in rows:
        counts = row.get("class_counts")
        if counts is not None and len(counts):
            totals[: len(counts)] += np.asarray(counts[: len(class_names)], dtype=np.int64)
    return [name for name, total in zip(class_names, totals, strict=True) if total == 0]
