"""Post-processing of class maps: morphological opening/closing and minimum region area (F21).

Built on ``scipy.ndimage`` (binary morphology, connected-component labelling, Euclidean distance
transform): it is already installed as a hard dependency of mlflow and scikit-learn, and is far
better tested than a hand-written union-find. It is imported lazily so the rest of the inference
package does not pay for it.

Both operations work on multi-class maps, not only binary masks: pixels a class loses are handed to
a neighbouring class (the nearest pixel of another class, or the surrounding majority), so the
result is again a complete class map. Pixels equal to ``ignore_value`` (e.g. nodata) never change
and never spread.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = ["morphological_open_close", "remove_small_regions"]

MorphologyOp = Literal["open", "close", "open_close", "close_open"]


def _disk(radius: int) -> np.ndarray:
    offsets = np.arange(-radius, radius + 1)
    return (offsets[:, None] ** 2 + offsets[None, :] ** 2) <= radius * radius


def _check_classes(classes: np.ndarray) -> np.ndarray:
    classes = np.asarray(classes)
    if classes.ndim != 2 or not np.issubdtype(classes.dtype, np.integer):
        raise ValueError(f"classes must be an integer array (H, W), got {classes.dtype} {classes.shape}.")
    return classes


def _classes_by_area(classes: np.ndarray, movable: np.ndarray, *, descending: bool) -> list[int]:
    values, counts = np.unique(classes[movable], return_counts=True)
    order = np.argsort(-counts if descending else counts, kind="stable")
    return [values[index] for index in order]


def _binary(mask: np.ndarray, footprint: np.ndarray, radius: int, operation: str) -> np.ndarray:
    """Binary opening/closing as if the raster's edge pixels extended outwards forever.

    Both steps of an opening/closing reach ``radius`` pixels, so ``2 * radius`` pixels of edge
    padding make the result on the raster exact; without it scipy's zero border erodes regions
    that touch the raster edge.
    """
    from scipy import ndimage

    pad = 2 * radius
    padded = np.pad(mask, pad, mode="edge")
    function = ndimage.binary_opening if operation == "open" else ndimage.binary_closing
    return function(padded, structure=footprint)[pad:-pad, pad:-pad]


def _open(classes: np.ndarray, footprint: np.ndarray, radius: int, movable: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    result = classes.copy()
    for value in _classes_by_area(classes, movable, descending=False):
        mask = (result == value) & movable
        removed = mask & ~_binary(mask, footprint, radius, "open")
        donors = movable & ~mask
        if not removed.any() or not donors.any():
            continue
        # Removed pixels take the class of the nearest pixel of another class (ignored pixels never donate).
        _, (rows, cols) = ndimage.distance_transform_edt(~donors, return_indices=True)
        result[removed] = result[rows[removed], cols[removed]]
    return result


def _close(classes: np.ndarray, footprint: np.ndarray, radius: int, movable: np.ndarray) -> np.ndarray:
    result = classes.copy()
    for value in _classes_by_area(classes, movable, descending=True):
        mask = (result == value) & movable
        gained = _binary(mask, footprint, radius, "close") & ~mask & movable
        result[gained] = value
    return result


def morphological_open_close(
    classes: np.ndarray,
    radius: int = 1,
    op: MorphologyOp = "open_close",
    *,
    ignore_value: int | None = None,
) -> np.ndarray:
    """Smooth a class map with per-class binary opening and/or closing by a disk of ``radius``.

    - ``"open"`` removes, class by class, the parts thinner than the disk (specks, spurs, thin lines,
      sharp corners); each removed pixel takes the class of the nearest pixel of another class.
      Classes go from the smallest to the largest area, so specks of rare classes are gone before
      the gaps they leave in big classes are judged.
    - ``"close"`` fills, class by class, gaps and holes thinner than the disk with that class,
      from the largest class to the smallest.
    - ``"open_close"`` / ``"close_open"`` run both, in that order.

    Each per-class step is a binary opening/closing (``scipy.ndimage``) of the current map with the
    raster edge replicated, so regions touching the border are not eroded by it.

    Args:
        classes: Integer class map (H, W).
        radius: Disk radius in pixels (0 returns a copy).
        op: Which operation(s) to run.
        ignore_value: Class value (e.g. nodata) that is left untouched and never spreads.

    Returns:
        A new class map of the same shape and dtype.
    """
    classes = _check_classes(classes)
    if not isinstance(radius, int) or radius < 0:
        raise ValueError(f"radius must be an int >= 0, got {radius!r}.")
    steps = {
        "open": ("open",),
        "close": ("close",),
        "open_close": ("open", "close"),
        "close_open": ("close", "open"),
    }
    if op not in steps:
        raise ValueError(f"op must be one of {sorted(steps)}, got {op!r}.")
    result = classes.copy()
    if radius == 0 or classes.size == 0:
        return result
    footprint = _disk(radius)
    movable = classes != ignore_value if ignore_value is not None else np.ones(classes.shape, dtype=bool)
    for step in steps[op]:
        result = (_open if step == "open" else _close)(result, footprint, radius, movable)
    return result


_NEIGHBOURS = {
    4: ((0, 1), (1, 0), (0, -1), (-1, 0)),
    8: ((0, 1), (1, 0), (0, -1), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1)),
}


def _shifted_pairs(height: int, width: int, offset: tuple[int, int]) -> tuple[tuple[slice, slice], ...]:
    """Slices (a, b) such that pixel a[i] and b[i] are neighbours along ``offset``."""
    dr, dc = offset
    a = (slice(max(0, -dr), height - max(0, dr)), slice(max(0, -dc), width - max(0, dc)))
    b = (slice(max(0, dr), height - max(0, -dr)), slice(max(0, dc), width - max(0, -dc)))
    return a, b


def remove_small_regions(
    classes: np.ndarray,
    min_area: int,
    connectivity: int = 8,
    *,
    ignore_value: int | None = None,
) -> np.ndarray:
    """Relabel connected regions smaller than ``min_area`` pixels to the surrounding majority class.

    The majority is counted over the region's outer border pixels (with the same ``connectivity``)
    that belong to regions big enough to stay. Repeats until nothing changes, so a small island
    inside another small region is resolved once its surroundings are. A small region with no big
    neighbour at all (e.g. a map made only of small regions) is kept.

    Args:
        classes: Integer class map (H, W).
        min_area: Regions with fewer pixels than this are relabelled (1 keeps everything).
        connectivity: 4 or 8 (diagonal neighbours connect).
        ignore_value: Class value (e.g. nodata) that is never relabelled and never donates.

    Returns:
        A new class map of the same shape and dtype.
    """
    from scipy import ndimage

    classes = _check_classes(classes)
    if not isinstance(min_area, int) or min_area < 1:
        raise ValueError(f"min_area must be an int >= 1, got {min_area!r}.")
    if connectivity not in _NEIGHBOURS:
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}.")
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    result = classes.copy()
    values, dense = np.unique(result, return_inverse=True)  # dense class ids for bincount
    dense = dense.reshape(result.shape)
    ignore_dense = (
        int(np.searchsorted(values, ignore_value))
        if ignore_value is not None and ignore_value in values
        else -1
    )
    height, width = result.shape
    while True:
        region_ids = np.zeros(result.shape, dtype=np.int64)
        next_id = 0
        for value in range(len(values)):
            if value == ignore_dense:
                continue
            labels, count = ndimage.label(dense == value, structure=structure)
            region_ids[labels > 0] = labels[labels > 0] + next_id
            next_id += count
        sizes = np.bincount(region_ids.ravel(), minlength=next_id + 1)
        small = (sizes < min_area) & (np.arange(next_id + 1) > 0)  # id 0 = ignored pixels
        if not small.any():
            return result
        # Votes[region, class]: border pixels of each small region that lie in a big region of class.
        num_values = len(values)
        flat_votes = np.zeros((next_id + 1) * num_values, dtype=np.int64)
        for offset in _NEIGHBOURS[connectivity]:
            a, b = _shifted_pairs(height, width, offset)
            here, there, there_class = region_ids[a], region_ids[b], dense[b]
            counted = small[here] & ~small[there] & (there > 0)
            flat_votes += np.bincount(
                here[counted] * num_values + there_class[counted], minlength=flat_votes.size
            )
        votes = flat_votes.reshape(next_id + 1, num_values)
        winners = votes.argmax(axis=1)  # ties go to the lower class value
        resolved = small & (votes.sum(axis=1) > 0)
        if not resolved.any():
            return result
        moving = resolved[region_ids]
        dense[moving] = winners[region_ids[moving]]
        result = values[dense].astype(classes.dtype, copy=False)
