"""Sliding windows over tiles already in memory: validation scores whole tiles of any size.

Inference on files streams strips of a raster (:mod:`~seg_pipeline.inference.tiling`); validation
holds one decoded tile at a time and uses the same window grid and blending, so the number that
picks ``best.pt`` is the number a user gets from ``predict`` on the same tile.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from seg_pipeline.inference.windows import blend_weights, window_grid
from seg_pipeline.settings.inference import WindowSettings

#: ``(N, C, h, w)`` float images -> ``(N, K, h, w)`` class probabilities (an EnsemblePredictor).
PredictFn = Callable[[Tensor], Tensor]


def sliding_probabilities(predict: PredictFn, image: Tensor, windows: WindowSettings) -> Tensor:
    """Class probabilities ``(K, H, W)`` of one ``(C, H, W)`` image, blended over the window grid."""
    _, height, width = image.shape
    grid = window_grid(height, width, windows.window, windows.overlap)
    weights = torch.from_numpy(blend_weights(grid[0].height, grid[0].width, windows.overlap))
    total: Tensor | None = None
    weight_sum = torch.zeros((height, width))
    step = windows.windows_per_pass
    for start in range(0, len(grid), step):
        chunk = grid[start : start + step]
        crops = [image[:, w.row_off : w.row_off + w.height, w.col_off : w.col_off + w.width] for w in chunk]
        probabilities = predict(torch.stack(crops)).float().cpu()
        if total is None:
            total = torch.zeros((probabilities.shape[1], height, width))
        for window, part in zip(chunk, probabilities, strict=True):
            rows = slice(window.row_off, window.row_off + window.height)
            cols = slice(window.col_off, window.col_off + window.width)
            total[:, rows, cols] += part * weights
            weight_sum[rows, cols] += weights
    assert total is not None  # window_grid returns at least one window
    return total / weight_sum


def predict_tiles(predict: PredictFn, images: Sequence[Tensor], windows: WindowSettings) -> list[Tensor]:
    """Probabilities of each ``(C, H, W)`` image: tiles that fit one window are batched together."""
    results: list[Tensor | None] = [None] * len(images)
    small: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        if image.shape[-2] <= windows.window and image.shape[-1] <= windows.window:
            small.setdefault(tuple(image.shape), []).append(index)
        else:
            results[index] = sliding_probabilities(predict, image, windows)
    for indices in small.values():
        for start in range(0, len(indices), windows.windows_per_pass):
            part = indices[start : start + windows.windows_per_pass]
            probabilities = predict(torch.stack([images[i] for i in part])).float().cpu()
            for i, p in zip(part, probabilities, strict=True):
                results[i] = p
    return [r for r in results if r is not None]
