"""Post-processing of class maps: morphological opening/closing and minimum region area (F21).

Built on ``scipy.ndimage`` (binary morphology, connected-component labelling, Euclidean distance
transform): it is already installed as a hard dependency of mlflow and scikit-learn, and is far
better tested than a hand-written union-find. It is imported lazily so the rest of the inference
package does not pay for it.

Both operations work on multi-class maps, not only binary masks: pixels a class loses are handed to
a neighbouring class (the nearest pixel of another class, or the surrounding majority), so the
result is again a complete class map. Pixels equal to ``ignore_value`` (e.g. nodata) never change
and never spread. ``only`` limits the cleaning to some classes: only their specks are removed, their
gaps filled and their small regions relabelled (other classes still give and take pixels at their
borders).

:class:`Cleanup` bundles both into the clean-up prediction applies to a written class map, and
:func:`clean_in_strips` runs it over a raster of any height with bounded memory: strips of rows with
:meth:`Cleanup.context_rows` rows of context above and below, which gives the whole-map result.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["Cleanup", "clean_in_strips", "morphological_open_close", "remove_small_regions"]

MorphologyOp = Literal["open", "close", "open_close", "close_open"]


def _disk(radius: int) -> np.ndarray:
    offsets = np.arange(-radius, radius + 1)
    return (offsets[:, None] ** 2 + offsets[None, :] ** 2) <= radius * radius


def _check_classes(classes: np.ndarray) -> np.ndarray:
    classes = np.asarray(classes)
    if classes.ndim != 2 or not np.issubdtype(classes.dtype, np.integer):
        raise ValueError(f"classes must be an integer array (H, W), got {classes.dtype} {classes.shape}.")
    return classes


def _area_order(
    classes: np.ndarray,
    movable: np.ndarray,
    class_areas: Sequence[int] | np.ndarray | None,
    only: Collection[int] | None,
) -> list[int]:
    """The classes present (and in ``only``) from the smallest area to the largest, ties by value.

    Areas are ``class_areas[value]`` when given (e.g. the whole raster's, for a strip of it), else
    counted on ``classes``.
    """
    values, counts = np.unique(classes[movable], return_counts=True)
    if class_areas is not None:
        areas = np.asarray(class_areas, dtype=np.int64)
        if values.size and int(values.max()) >= areas.size:
            raise ValueError(f"class_areas has {areas.size} entries but the map holds class {values.max()}.")
        counts = areas[values]
    if only is not None:
        keep = np.isin(values, np.asarray(list(only)))
        values, counts = values[keep], counts[keep]
    order = np.argsort(counts, kind="stable")
    return [int(values[index]) for index in order]


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


def _open(
    classes: np.ndarray, footprint: np.ndarray, radius: int, movable: np.ndarray, order: list[int]
) -> np.ndarray:
    from scipy import ndimage

    result = classes.copy()
    for value in order:
        mask = (result == value) & movable
        removed = mask & ~_binary(mask, footprint, radius, "open")
        donors = movable & ~mask
        if not removed.any() or not donors.any():
            continue
        # Removed pixels take the class of the nearest pixel of another class (ignored pixels never donate).
        _, (rows, cols) = ndimage.distance_transform_edt(~donors, return_indices=True)
        result[removed] = result[rows[removed], cols[removed]]
    return result


def _close(
    classes: np.ndarray, footprint: np.ndarray, radius: int, movable: np.ndarray, order: list[int]
) -> np.ndarray:
    result = classes.copy()
    for value in reversed(order):
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
    only: Collection[int] | None = None,
    class_areas: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Smooth a class map with per-class binary opening and/or closing by a disk of ``radius``.

    - ``"open"`` removes, class by class, the parts thinner than the disk (specks, spurs, thin lines,
      sharp corners); each removed pixel takes the class of the nearest pixel of another class.
      Classes go from the smallest to the largest area, so specks of rare classes are gone before
      the gaps they leave in big classes are judged.
    - ``"close"`` fills, class by class, gaps and holes thinner than the disk with that class,
      from the largest class to the smallest.
    - ``"open_close"`` / ``"close_open"`` run both, in that order.

    Areas are those of the input map (for every step), or ``class_areas``. Each per-class step is
    a binary opening/closing (``scipy.ndimage``) of the current map with the raster edge
    replicated, so regions touching the border are not eroded by it.

    Args:
        classes: Integer class map (H, W).
        radius: Disk radius in pixels (0 returns a copy).
        op: Which operation(s) to run.
        ignore_value: Class value (e.g. nodata) that is left untouched and never spreads.
        only: Class values that are opened/closed (default: all).
        class_areas: Pixels per class value that order the classes (default: counted on
            ``classes``); a strip of a raster passes the whole raster's so its order is the same.

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
    order = _area_order(classes, movable, class_areas, only)
    for step in steps[op]:
        result = (_open if step == "open" else _close)(result, footprint, radius, movable, order)
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
    only: Collection[int] | None = None,
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
        only: Class values whose small regions are relabelled (default: all); small regions of
            other classes stay, and count as big ones for the majority.

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
    cleaned = np.ones(len(values), dtype=bool) if only is None else np.isin(values, np.asarray(list(only)))
    height, width = result.shape
    while True:
        region_ids = np.zeros(result.shape, dtype=np.int64)
        region_cleaned = [False]  # id 0 = ignored pixels
        next_id = 0
        for value in range(len(values)):
            if value == ignore_dense:
                continue
            labels, count = ndimage.label(dense == value, structure=structure)
            region_ids[labels > 0] = labels[labels > 0] + next_id
            region_cleaned += [bool(cleaned[value])] * count
            next_id += count
        sizes = np.bincount(region_ids.ravel(), minlength=next_id + 1)
        small = (sizes < min_area) & np.asarray(region_cleaned, dtype=bool)
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


@dataclass(frozen=True)
class Cleanup:
    """The clean-up of a class map: opening and/or closing, then small regions relabelled.

    ``open_radius``/``close_radius`` 0 skip that operation; ``order`` says which runs first when
    both do; ``min_area`` 1 keeps every region. ``only`` (class values) limits all of it to some
    classes; ``ignore_value`` (nodata) never changes and never spreads.
    """

    open_radius: int = 0
    close_radius: int = 0
    order: Literal["open_close", "close_open"] = "open_close"
    min_area: int = 1
    connectivity: int = 8
    only: tuple[int, ...] | None = None
    ignore_value: int | None = None

    def __post_init__(self) -> None:
        for name in ("open_radius", "close_radius"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}.")
        if self.order not in ("open_close", "close_open"):
            raise ValueError(f"order must be 'open_close' or 'close_open', got {self.order!r}.")
        if not isinstance(self.min_area, int) or self.min_area < 1:
            raise ValueError(f"min_area must be an int >= 1, got {self.min_area!r}.")
        if self.connectivity not in _NEIGHBOURS:
            raise ValueError(f"connectivity must be 4 or 8, got {self.connectivity!r}.")

    @property
    def enabled(self) -> bool:
        """Whether anything can change (else :meth:`apply` returns a copy)."""
        return self.open_radius > 0 or self.close_radius > 0 or self.min_area > 1

    def apply(self, classes: np.ndarray, class_areas: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """The cleaned map: a new array of the same shape and dtype.

        Classes are ordered by their area in ``classes``, or in ``class_areas`` (pixels per class
        value; a strip of a raster passes the whole raster's, so every strip orders them alike).
        """
        classes = _check_classes(classes)
        movable = (
            classes != self.ignore_value if self.ignore_value is not None else np.ones(classes.shape, bool)
        )
        areas = class_areas
        if areas is None:  # counted once on the input: every step orders the classes by the same areas
            values, counts = np.unique(classes[movable], return_counts=True)
            areas = np.zeros(int(values.max()) + 1 if values.size else 0, dtype=np.int64)
            areas[values] = counts
        steps: tuple[tuple[MorphologyOp, int], ...] = (
            ("open", self.open_radius),
            ("close", self.close_radius),
        )
        result = classes.copy()
        for op, radius in steps if self.order == "open_close" else steps[::-1]:
            if radius:
                result = morphological_open_close(
                    result, radius, op, ignore_value=self.ignore_value, only=self.only, class_areas=areas
                )
        if self.min_area > 1:
            result = remove_small_regions(
                result, self.min_area, self.connectivity, ignore_value=self.ignore_value, only=self.only
            )
        return result

    def context_rows(self, num_classes: int) -> int:
        """Rows of context above and below a strip that make its cleaned rows those of the whole map.

        An opening or closing by a disk of radius r reaches 2r pixels (erosion then dilation, or
        the reverse) and the classes are opened/closed one after the other, each step reading what
        the previous one wrote: ``2 * (open_radius + close_radius)`` rows per cleaned class. A
        region smaller than ``min_area`` spans fewer rows than that, and its neighbours are judged
        big or small within as many again: ``2 * min_area`` more rows. (Exact except where a
        removed speck's nearest other class lies beyond nodata, or small regions nest inside
        small regions deeper than the context; both are then judged within the context.)
        """
        classes = len(self.only) if self.only is not None else num_classes
        morphology = 2 * (self.open_radius + self.close_radius) * classes
        return morphology + (2 * self.min_area if self.min_area > 1 else 0)


ReadRows = Callable[[int, int], np.ndarray]
WriteRows = Callable[[int, np.ndarray], None]


def clean_in_strips(
    read_rows: ReadRows,
    write_rows: WriteRows,
    height: int,
    cleanup: Cleanup,
    class_areas: Sequence[int] | np.ndarray,
    *,
    strip_rows: int,
) -> None:
    """Clean a class map of ``height`` rows strip by strip, holding about ``strip_rows + 2 * context``.

    ``read_rows(start, stop)`` returns rows ``start .. stop`` (full width) of the raw map and
    ``write_rows(start, rows)`` stores cleaned rows from ``start``. Every row is read once and
    before it is written, so both may address one file (cleaned in place). Each strip of
    ``strip_rows`` rows is cleaned with :meth:`Cleanup.context_rows` raw rows above and below and
    ``class_areas`` (the whole map's pixels per class), so the result is that of
    ``cleanup.apply(whole map, class_areas)``: no seam at strip boundaries. A map of at most
    ``strip_rows`` rows is one strip.
    """
    if strip_rows < 1:
        raise ValueError(f"strip_rows must be >= 1, got {strip_rows}.")
    context = cleanup.context_rows(len(class_areas))
    raw: np.ndarray | None = None  # raw rows raw_top .. raw_top + len(raw)
    raw_top = 0
    for top in range(0, height, strip_rows):
        bottom = min(height, top + strip_rows)
        low, high = max(0, top - context), min(height, bottom + context)
        loaded = raw_top + (0 if raw is None else len(raw))
        if high > loaded:
            new = read_rows(loaded, high)
            raw = new if raw is None else np.concatenate([raw, new], axis=0)
        assert raw is not None
        raw, raw_top = raw[low - raw_top :], low  # rows above the context are done
        cleaned = cleanup.apply(raw[: high - low], class_areas)
        write_rows(top, cleaned[top - low : bottom - low])
