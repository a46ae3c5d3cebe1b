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
    matrix: ConfusionMatrix,
    ignore_index: int,
) -> None:
    """Predict one large tile with the inference code into a temporary class map, then score it by rows."""
    assert row.target_path is not None
    with tempfile.TemporaryDirectory(prefix="seg-val-") as tmp:
        summary = predict_raster_sets(
            raster_input(row),
            {"model": SetTarget(Path(tmp) / "class.tif")},
            lambda batch: {"model": predictor(batch)},
            num_classes=matrix.num_classes,
            window=settings.windows.window,
            overlap=settings.windows.overlap,
            batch_size=settings.windows.for_device(predictor.device.type).windows_per_pass,
            normalize=lambda array: np.asarray(normalize(array, stats)),
            progress_delay_s=60.0,
        )["model"]
        nodata = summary["class_nodata"]
        with rasterio.open(summary["dst_path"]) as classes:
            for top in range(0, classes.height, _SCORE_ROWS):
                window = Window(0, top, classes.width, min(_SCORE_ROWS, classes.height - top))
                predicted = classes.read(1, window=window)
                truth = read_array(row.target_path, window=window)[0].astype(np.int64)
                truth[predicted == nodata] = ignore_index  # input nodata: never scored
                matrix.update(predicted, truth)


def make_evaluate_fn(
    num_classes: int,
    ignore_index: int,
    class_names: Sequence[str],
    settings: ValidationSettings | None = None,
    *,
    streamed: Sequence[ShardRow] = (),
    stats: BandStats | None = None,
) -> Callable[[nn.Module, Any], dict[str, float]]:
    """An ``evaluate_fn`` for the trainer over a loader of :func:`collate_tiles` batches, plus the
    ``streamed`` large tiles (normalised with ``stats``).

    Keys are ``val/miou``, ``val/iou/<class>``, ...: prefixed here so per-class keys (which hold a
    ``/`` already) land under ``val/`` like the scalars.
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
        matrix = ConfusionMatrix(num_classes, ignore_index=ignore_index)
        for batch in loader:
            images = [sample["image"] for sample in batch]
            for sample, probabilities in zip(
                batch, predict_tiles(predictor, images, settings.windows.for_device(device.type)), strict=True
            ):
                matrix.update(probabilities.argmax(0).numpy(), sample["mask"].numpy())
        for row in streamed:
            assert stats is not None
            _score_streamed(predictor, row, stats, settings, matrix, ignore_index)
        model.train(was_training)
        metrics = matrix.compute()
        return {f"val/{k}": v for k, v in metrics.to_dict(list(class_names)).items() if np.isfinite(v)}

    return evaluate
