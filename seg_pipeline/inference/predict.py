"""Predict folders of rasters with one model or an ensemble (library entry point for inference).

Models come from stage checkpoints (which carry their spec) or MLflow model URIs; the
normalisation used in training travels with the checkpoint's run config, so predictions use
the same band statistics the model was trained with.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from seg_pipeline.data.normalization import BandStats, normalize
from seg_pipeline.data.raster_io import RASTER_EXTENSIONS, read_array
from seg_pipeline.inference.ensemble import EnsemblePredictor
from seg_pipeline.inference.tiling import predict_raster
from seg_pipeline.inference.tta import TTAConfig
from seg_pipeline.inference.writers import default_palette, save_color_png
from seg_pipeline.models.checkpoint import load_checkpoint
from seg_pipeline.progress import ItemProgress


@dataclass(frozen=True)
class LoadedModel:
    """A model plus what inference must know about how it was trained."""

    name: str
    model: nn.Module
    class_names: tuple[str, ...]
    normalization: BandStats
    source: str


def load_stage_model(checkpoint: Path | str, name: str | None = None) -> LoadedModel:
    """Load a stage checkpoint: weights (EMA when present), spec, classes and band statistics."""
    from seg_pipeline.training.stages import load_trained_model

    state = load_checkpoint(checkpoint)
    run = (state.get("config") or {}).get("run") or {}
    if "normalization" not in run or "class_names" not in run:
        raise ValueError(
            f"checkpoint {checkpoint} lacks class names/normalisation: "
            "use a checkpoint written by a training stage"
        )
    stats = BandStats(tuple(run["normalization"]["mean"]), tuple(run["normalization"]["std"]))
    return LoadedModel(
        name=name or Path(checkpoint).parent.name,
        model=load_trained_model(checkpoint),
        class_names=tuple(run["class_names"]),
        normalization=stats,
        source=str(checkpoint),
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


def predict_files(
    models: Sequence[LoadedModel],
    inputs: Sequence[tuple[str, Path]],
    out_dir: Path | str,
    *,
    tta: TTAConfig | None = None,
    window: int = 512,
    overlap: int = 64,
    batch_size: int = 4,
    device: str = "cpu",
    color_png: bool = True,
    write_probabilities: bool = False,
    log_fn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Predict every ``(item_id, path)`` with the ensemble of ``models``; GeoTIFF class maps out.

    All models must share class names and normalisation (checked); one model is an ensemble of one.
    Progress lines per raster (and per window for large rasters) go to ``log_fn`` (default: the
    ``seg_pipeline`` logger), since TTA ensembles over a whole split take minutes to hours.
    """
    if not models:
        raise ValueError("predict_files needs at least one model")
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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    predictor = EnsemblePredictor([m.model for m in models], tta or TTAConfig(), device=device)
    stats = first.normalization
    palette = default_palette(len(first.class_names))
    started = time.perf_counter()
    written = []
    label = models[0].name if len(models) == 1 else f"ensemble of {len(models)}"
    progress = ItemProgress(f"predict {label}", len(inputs), unit="files", log_fn=log_fn)
    for item_id, path in inputs:
        summary = predict_raster(
            path,
            out / f"{item_id}.tif",
            predictor,
            num_classes=len(first.class_names),
            window=window,
            overlap=overlap,
            batch_size=batch_size,
            normalize=lambda array: np.asarray(normalize(array, stats)),
            write_probabilities=out / f"{item_id}.probs.tif" if write_probabilities else None,
            log_fn=log_fn,
        )
        if color_png:
            classes = read_array(summary["dst_path"])[0]
            save_color_png(
                out / f"{item_id}.png",
                classes,
                palette,
                first.class_names,
                nodata_value=summary["class_nodata"],
            )
        written.append({"item_id": item_id, "input": str(path), **summary})
        progress.advance(detail=item_id)
    views = predictor.forward_views
    progress.done(f"{views} forward view{'s' if views != 1 else ''} per file")
    seconds = time.perf_counter() - started
    return {
        "out_dir": str(out),
        "models": [m.name for m in models],
        "views_per_input": predictor.forward_views,
        "items": written,
        "seconds": seconds,
        "tiles_per_second": len(written) / max(seconds, 1e-9),
    }


def ensemble_and_singles(
    models: Sequence[LoadedModel],
    inputs: Sequence[tuple[str, Path]],
    out_root: Path | str,
    **kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """Predictions of each single model and of the ensemble, in ``out_root/<name>/``.

    ``kwargs`` go to :func:`predict_files` (``log_fn`` included), so each prediction set logs progress.
    """
    out_root = Path(out_root)
    results: dict[str, dict[str, Any]] = {}
    if len(models) > 1:
        for model in models:
            results[model.name] = predict_files([model], inputs, out_root / model.name, **kwargs)
    results["ensemble"] = predict_files(models, inputs, out_root / "ensemble", **kwargs)
    return results


def tta_from_settings(settings: Mapping[str, Any]) -> TTAConfig:
    """Build a TTA config from plain settings (``bf16: true`` = bf16 autocast)."""
    return TTAConfig(
        scales=tuple(settings.get("scales", (0.75, 1.0, 1.25))),
        flips=tuple(settings.get("flips", ("none", "h", "v"))),
        merge=settings.get("merge", "mean_prob"),
        amp_dtype=torch.bfloat16 if settings.get("bf16") else None,
        channels_last=bool(settings.get("channels_last", False)),
    )
