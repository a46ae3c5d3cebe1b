"""Training on patches: which windows of which tiles an epoch reads, drawn from seeds alone.

A tile of ``H x W`` pixels gives ``ceil(H * W / size**2)`` patches per epoch (at least one), so an
epoch covers the data about once whatever the tile sizes: a 10980 px Sentinel-2 scene gives 460
patches of 512, a 256 px chip one. Each patch is a ``size x size`` window at a random position:
inside the tile when the tile is larger, covering the whole tile (the rest padded with nodata and
``ignore_index``) when it is smaller, so tiles of any size batch together and memory depends on
the patch, not on the tile. Positions depend only on ``(seed, epoch, item, k)``, not on which
worker or rank reads the patch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from seg_pipeline.data.augment import derive_seed


@dataclass(frozen=True)
class PatchWindow:
    """A window of a tile in its pixel grid; it may reach past the tile (that part is padded)."""

    top: int
    left: int
    height: int
    width: int


def patches_per_tile(height: int, width: int, size: int) -> int:
    """How many patches of ``size`` cover a ``height x width`` tile about once (at least one)."""
    return max(1, math.ceil(height * width / (size * size)))


def _start(extent: int, side: int, u: float) -> int:
    """Top (or left) of a ``side`` window along an axis of ``extent`` pixels, from a uniform draw."""
    if side <= extent:
        return min(int(u * (extent - side + 1)), extent - side)
    return -min(int(u * (side - extent + 1)), side - extent)


def draw_window(
    height: int, width: int, side: int, keys: Sequence[object], scale: float = 1.0
) -> PatchWindow:
    """The window of one patch: ``side / scale`` pixels of the tile (resized to ``side`` later).

    ``keys`` (seed, epoch, item id, patch number) make the draw reproducible anywhere.
    """
    rng = np.random.default_rng(derive_seed("patch", *keys))
    u_top, u_left = rng.random(2)
    extent = max(1, round(side / scale))
    return PatchWindow(_start(height, extent, u_top), _start(width, extent, u_left), extent, extent)


def size_for_batch(sizes: Sequence[int], keys: Sequence[object], sampling: str = "uniform") -> int:
    """The patch side of one batch from the schedule (seed 000: one size per step).

    ``uniform`` draws from ``sizes`` with the batch's keys; ``cycle`` takes them in turn by the
    last key (the batch number).
    """
    if not sizes:
        raise ValueError("size_for_batch needs at least one patch size")
    if sampling == "cycle":
        return int(sizes[int(keys[-1]) % len(sizes)])  # type: ignore[call-overload]
    return int(sizes[derive_seed("patch-size", *keys) % len(sizes)])


def intersect(window: PatchWindow, height: int, width: int) -> tuple[slice, slice, slice, slice] | None:
    """Where ``window`` meets the tile: (tile rows, tile cols, window rows, window cols), or None."""
    top, left = max(window.top, 0), max(window.left, 0)
    bottom, right = min(window.top + window.height, height), min(window.left + window.width, width)
    if bottom <= top or right <= left:
        return None
    return (
        slice(top, bottom),
        slice(left, right),
        slice(top - window.top, bottom - window.top),
        slice(left - window.left, right - window.left),
    )
