"""Predict rasters with one model or an ensemble: the library entry point for inference.

Models come from stage checkpoints, which carry their spec, classes, ignore value and the band
normalisation they were trained with, so predictions use exactly the statistics of training. Every
prediction set (each model on its own, and the ensemble) is written in one pass over the rasters.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.enums import Resampling
from rasterio.errors import RasterioIOError
from torch import nn

from seg_pipeline.contracts.data import positive_ids
from seg_pipeline.data.normalization import BandStats, normalize
from seg_pipeline.data.raster_io import RASTER_EXTENSIONS
from seg_pipeline.inference.ensemble import (
    ENSEMBLE,
    EnsemblePredictor,
    inference_channels_last,
    inference_dtype,
    resolve_device,
)
from seg_pipeline.inference.folding import fold_batchnorm
from seg_pipeline.inference.gis import ClassStyle, write_mosaic_vrt, write_qml
from seg_pipeline.inference.palette import stored_palette
from seg_pipeline.inference.tiling import SetTarget, predict_raster_sets
from seg_pipeline.inference.tta import TTAConfig
from seg_pipeline.inference.writers import save_color_png
from seg_pipeline.io import atomic_write
from seg_pipeline.models.loading import checkpoint_info, load_trained_model
from seg_pipeline.progress import ItemProgress
from seg_pipeline.settings import PredictSettings

logger = logging.getLogger(__name__)

LogFn = Callable[[str], None]


@dataclass(frozen=True)
class LoadedModel:
    """A model plus what inference must know about how it was trained."""

    name: str
    model: nn.Module
    class_names: tuple[str, ...]
    normalization: BandStats
    source: str
    ignore_index: int = 255
    class_colors: tuple[tuple[int, int, int], ...] = ()
    positive_classes: tuple[int, ...] = ()

    @property
    def palette(self) -> np.ndarray:
        """``(K, 3)`` display colours: the dataset's, stored with the model, else by class name."""
        return stored_palette(self.class_names, self.class_colors)


def load_stage_model(checkpoint: Path | str, name: str | None = None) -> LoadedModel:
    """Load a stage checkpoint: weights (EMA when present), spec, classes and band statistics."""
    info = checkpoint_info(checkpoint)
    return LoadedModel(
        name=name or Path(checkpoint).parent.name,
        model=load_trained_model(checkpoint),
        class_names=info.class_names,
        normalization=BandStats(info.normalization_mean, info.normalization_std),
        source=str(checkpoint),
        ignore_index=info.ignore_index,
        class_colors=info.class_colors,
        positive_classes=info.positive_classes,
    )


def list_rasters(folder: Path | str) -> list[Path]:
    """Raster files directly in ``folder`` (sorted), with a clear error when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: input folder does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in RASTER_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"{folder}: no raster files (.tif, .png, ...) to predict")
    return files


def check_outputs(inputs: Sequence[tuple[str, Path]], out_dirs: Mapping[str, Path | str]) -> None:
    """Refuse, before any work, outputs that would overwrite an input or each other.

    Each item writes ``<folder>/<item_id>.tif`` (+ ``.png``, ``.probs.tif``): two inputs with one
    stem (``a.png`` and ``a.tif``) would write one file, and an output folder equal to the input
    folder could replace ``a.tif`` itself.
    """
    seen: dict[str, Path] = {}
    for item_id, path in inputs:
        if item_id in seen:
            raise ValueError(
                f"{seen[item_id]} and {path} share the name {item_id!r}: their predictions would be one "
                "file; rename one or predict them separately"
            )
        seen[item_id] = path
    sources = {Path(path).resolve() for _, path in inputs}
    for folder in out_dirs.values():
        for item_id in seen:
            for suffix in (".tif", ".png", ".probs.tif"):
                target = (Path(folder) / f"{item_id}{suffix}").resolve()
                if target in sources:
                    raise ValueError(
                        f"output {target} would overwrite its input; choose an output folder other than "
                        "the input folder"
                    )


def check_band_counts(inputs: Sequence[tuple[str, Path]], bands: int) -> None:
    """Refuse, before any output, rasters the models cannot read: unreadable or another band count.

    Headers only, so a folder of large scenes is checked in moments; every bad file is named at
    once instead of stopping after some predictions were written.
    """
    wrong: list[str] = []
    for _, path in inputs:
        try:
            with rasterio.open(path) as src:
                if src.count != bands:
                    wrong.append(f"{path} has {src.count} band{'s' if src.count != 1 else ''}")
        except RasterioIOError as error:
            wrong.append(f"{path} cannot be read ({error})")
    if wrong:
        shown = "; ".join(wrong[:5]) + (f"; and {len(wrong) - 5} more" if len(wrong) > 5 else "")
        raise ValueError(
            f"{len(wrong)} of {len(inputs)} input raster(s) do not fit the model, which takes {bands} "
            f"band(s): {shown}. Give rasters with the bands it was trained on; nothing was written"
        )


def check_compatible(models: Sequence[LoadedModel]) -> LoadedModel:
    """The first model, after checking every model shares its classes and band statistics."""
    if not models:
        raise ValueError("prediction needs at least one model")
    first = models[0]
    for other in models[1:]:
        if other.class_names != first.class_names:
            raise ValueError(
                f"model {other.name} classes {other.class_names} differ from {first.class_names}"
            )
        if other.normalization != first.normalization:
            raise ValueError(
                f"model {other.name} was trained with different band statistics than {first.name}"
            )
    return first


def build_predictor(
    models: Sequence[LoadedModel],
    settings: PredictSettings,
    weights: Sequence[float] | None = None,
    class_bias: Sequence[float] | None = None,
) -> EnsemblePredictor:
    """The ensemble of ``models`` with the TTA, device and precision of ``settings``."""
    first = check_compatible(models)
    device = resolve_device(settings.device)
    amp_dtype, reason = inference_dtype(device, settings.bf16)
    channels_last = inference_channels_last(device, settings.channels_last)
    tta = TTAConfig.from_settings(settings.tta, amp_dtype=amp_dtype, channels_last=channels_last)
    suppressed = first.ignore_index if first.ignore_index < len(first.class_names) else None
    nets = [m.model for m in models]
    note = ""
    if settings.fold_batchnorm:
        folds = [fold_batchnorm(net) for net in nets]
        nets = [fold.model for fold in folds]
        note = "; ".join(dict.fromkeys(fold.note for fold in folds if fold.note))
    return EnsemblePredictor(
        nets,
        tta,
        device=settings.device,
        names=[m.name for m in models],
        weights=weights,
        suppressed_class=suppressed,
        class_bias=class_bias,
        precision_reason=reason,
        model_note=note,
    )


@dataclass
class PredictionRun:
    """What one call of :func:`predict_files` wrote, per prediction set."""

    out_dirs: dict[str, Path]
    views_per_input: int
    items: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    seconds: float = 0.0
    precision: str = ""

    @property
    def tiles_per_second(self) -> float:
        """Rasters predicted per second (all sets together: they share every forward pass)."""
        count = len(next(iter(self.items.values()), []))
        return count / max(self.seconds, 1e-9)


#: Longest side of a colour preview: a quick look, read decimated (nearest), so its memory stays
#: bounded (about 120 bytes per preview pixel with the legend) whatever the raster's size.
PREVIEW_MAX_SIDE = 1024

#: The VRT over all class maps of a prediction set (written when they share a CRS).
MOSAIC_NAME = "mosaic.vrt"


def _write_preview(summary: Mapping[str, Any], path: Path, model: LoadedModel) -> None:
    with rasterio.open(summary["dst_path"]) as src:
        scale = max(src.height, src.width) / PREVIEW_MAX_SIDE
        shape = (max(1, round(src.height / scale)), max(1, round(src.width / scale))) if scale > 1 else None
        classes = src.read(1, out_shape=shape, resampling=Resampling.nearest)
    save_color_png(path, classes, model.palette, model.class_names, nodata_value=summary["class_nodata"])


def _write_mosaics(run: PredictionRun, model: LoadedModel, log_fn: LogFn | None) -> None:
    """``mosaic.vrt`` (+ ``.qml``) in each set's folder when its class maps share a CRS: one layer in QGIS."""
    for name, folder in run.out_dirs.items():
        items = run.items[name]
        if len(items) < 2:
            continue
        style = ClassStyle(model.class_names, model.palette, int(items[0]["class_nodata"]))
        vrt, reason = write_mosaic_vrt(
            [Path(item["dst_path"]) for item in items], folder / MOSAIC_NAME, style
        )
        if vrt is not None:
            write_qml(vrt.with_suffix(".qml"), style)
        elif log_fn is not None:
            log_fn(f"{name}: no {MOSAIC_NAME}: {reason}")


#: Per prediction set: one row per raster, "does it hold the positive classes?" (seed 003).
DETECTIONS_NAME = "detections.csv"
DETECTION_COLUMNS = (
    "item_id", "has_positive", "positive_pixels", "valid_pixels", "positive_fraction",
    "max_positive_probability",
)  # fmt: skip


def detection_rows(items: Sequence[Mapping[str, Any]], positive: Sequence[int]) -> list[dict[str, Any]]:
    """Patch-level detection from segmentation (seed 003's ``predict_fire_detection`` and co.).

    Any positive pixel, the positive share of the valid pixels, and the highest blended probability
    of a positive class. Counts are of the class map before post-processing.
    """
    rows = []
    for item in items:
        counts = item["class_pixel_counts"]
        positive_pixels = int(sum(counts[k] for k in positive))
        valid = int(sum(counts))
        rows.append(
            {
                "item_id": item["item_id"],
                "has_positive": positive_pixels > 0,
                "positive_pixels": positive_pixels,
                "valid_pixels": valid,
                "positive_fraction": round(positive_pixels / valid, 6) if valid else 0.0,
                "max_positive_probability": max(item["class_max_probability"][k] for k in positive),
            }
        )
    return rows


def _write_detections(run: PredictionRun, model: LoadedModel) -> None:
    positive = positive_ids(list(model.positive_classes), len(model.class_names))
    if not positive:
        return
    for name, folder in run.out_dirs.items():
        with atomic_write(folder / DETECTIONS_NAME) as tmp, tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=DETECTION_COLUMNS)
            writer.writeheader()
            writer.writerows(detection_rows(run.items[name], positive))


def predict_files(
    models: Sequence[LoadedModel],
    inputs: Sequence[tuple[str, Path]],
    out_dirs: Mapping[str, Path | str],
    settings: PredictSettings,
    *,
    weights: Sequence[float] | None = None,
    class_bias: Sequence[float] | None = None,
    log_fn: LogFn | None = None,
) -> PredictionRun:
    """Predict every ``(item_id, path)`` into each requested prediction set, in one pass.

    ``out_dirs`` maps set names (a model's ``name``, or ``"ensemble"``) to folders that receive
    ``<item_id>.tif`` class maps (plus ``.png`` previews and ``.probs.tif`` as ``settings`` ask).
    With ``settings.postprocess`` on, the class maps (and so the previews) are the cleaned ones and
    carry the settings in their ``postprocess`` tag; the probabilities stay raw. Each folder also
    gets ``detections.csv``: per raster, whether it holds the model's positive classes (all but the
    first unless the dataset named them), their pixel share and highest probability.
    """
    first = check_compatible(models)
    check_outputs(inputs, out_dirs)
    check_band_counts(inputs, len(first.normalization.mean))
    predictor = build_predictor(models, settings, weights, class_bias)
    unknown = sorted(set(out_dirs) - {*predictor.names, ENSEMBLE})
    if unknown:
        raise ValueError(f"unknown prediction sets {unknown}; choose among {[*predictor.names, ENSEMBLE]}")
    folders = {name: Path(folder) for name, folder in out_dirs.items()}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    run = PredictionRun(
        out_dirs=folders,
        views_per_input=predictor.forward_views,
        items={n: [] for n in folders},
        precision=predictor.precision,
    )
    (log_fn or logger.info)(f"inference precision: {predictor.precision}")
    label = first.name if len(models) == 1 else f"ensemble of {len(models)}"
    progress = ItemProgress(f"predict {label}", len(inputs), unit="files", log_fn=log_fn)
    started = time.perf_counter()

    def predict_fn(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = predictor.predict_sets(batch)
        return {name: outputs[name] for name in folders}

    stats = first.normalization
    windows = settings.windows.for_device(predictor.device.type)
    for item_id, path in inputs:
        targets = {
            name: SetTarget(
                folder / f"{item_id}.tif",
                folder / f"{item_id}.probs.tif" if settings.write_probabilities else None,
            )
            for name, folder in folders.items()
        }
        summaries = predict_raster_sets(
            path,
            targets,
            predict_fn,
            num_classes=len(first.class_names),
            window=settings.windows.window,
            overlap=settings.windows.overlap,
            batch_size=windows.windows_per_pass,
            normalize=lambda array: np.asarray(normalize(array, stats)),
            log_fn=log_fn,
            class_names=first.class_names,
            palette=first.palette,
            postprocess=settings.postprocess,
        )
        for name, summary in summaries.items():
            if settings.color_png:
                _write_preview(summary, folders[name] / f"{item_id}.png", first)
            run.items[name].append({"item_id": item_id, "input": str(path), **summary})
        progress.advance(detail=item_id)
    _write_mosaics(run, first, log_fn)
    _write_detections(run, first)
    views = predictor.forward_views
    progress.done(f"{views} forward view{'s' if views != 1 else ''} per file")
    run.seconds = time.perf_counter() - started
    return run
