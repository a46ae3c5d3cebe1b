"""Prediction of a split as a library call: every single model and their TTA ensemble, in one pass."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import rasterio
import torch

from seg_pipeline.contracts import (
    EnsembleMember,
    EnsembleTuning,
    PredictionItem,
    PredictionSet,
    ShardSet,
    TrainedModel,
)
from seg_pipeline.data.normalization import normalize
from seg_pipeline.data.shards import ShardRow, raster_input, read_manifest, read_shard_index, shard_dirs
from seg_pipeline.inference.ensemble import ENSEMBLE
from seg_pipeline.inference.predict import LoadedModel, build_predictor, load_stage_model, predict_files
from seg_pipeline.inference.tta import TTAConfig
from seg_pipeline.inference.tuning import (
    VIEW_SAMPLE_BYTES,
    choose_members,
    choose_views,
    collect_sample,
    combine,
    member_probabilities,
    tune_class_bias,
)
from seg_pipeline.progress import default_log_fn
from seg_pipeline.settings import PredictSettings
from seg_pipeline.tracking import TrackingSettings
from seg_pipeline.workflows.resolve import resolve_model_checkpoint

LogFn = Callable[[str], None]
#: View sets whose tuning score is kept in the record (the best ones; the chosen and full sets too).
VIEW_SCORES_KEPT = 5


def _labeled(shards: ShardSet, split: str) -> list[ShardRow]:
    """The rows of ``split`` that have a mask."""
    rows = [row for folder in shard_dirs(shards.dataset_dir, split) for row in read_shard_index(folder)]
    return [row for row in rows if row.target_path is not None]


def labeled_rows(shards: ShardSet, split: str) -> tuple[str, list[ShardRow]]:
    """The labeled tiles of ``split`` (or of ``val`` when the dataset has no such split)."""
    available = read_manifest(shards.dataset_dir)["splits"]
    chosen = split if split in available else "val"
    labeled = _labeled(shards, chosen)
    if not labeled:
        raise ValueError(
            f"split {chosen!r} of {shards.dataset_dir} has no labeled tile to evaluate; choose another split "
            f"(the dataset has {sorted(available)})"
        )
    return chosen, labeled


def tune_ensemble(
    settings: PredictSettings,
    shards: ShardSet,
    loaded: Sequence[LoadedModel],
    evaluated_split: str,
    log: LogFn,
) -> EnsembleTuning | None:
    """Member weights and the ensemble's class offsets, scored on ``settings.tuning.split``.

    Returns ``None`` (and says why) when nothing is tuned or the tuning split is missing, unlabeled
    or the evaluated split itself: choices tuned on the reported split would inflate its scores.
    """
    tuning = settings.tuning
    if not tuning.enabled:
        return None
    available = read_manifest(shards.dataset_dir)["splits"]
    if tuning.split == evaluated_split or tuning.split not in available:
        reason = "is the evaluated split" if tuning.split == evaluated_split else "does not exist"
        log(f"ensemble tuning skipped: split {tuning.split!r} {reason} (splits: {sorted(available)})")
        return None
    rows = _labeled(shards, tuning.split)
    if not rows:
        log(f"ensemble tuning skipped: split {tuning.split!r} has no labeled tile")
        return None
    first = loaded[0]
    predictor = build_predictor(loaded, settings)
    classes = len(first.class_names)
    views = predictor.tta.views_per_model if tuning.views and predictor.tta.views_per_model > 1 else 1

    def members_fn(batch: torch.Tensor) -> torch.Tensor:
        if views > 1:
            return predictor.predict_views(batch)
        sets = predictor.predict_sets(batch)
        return torch.cat([sets[m.name] for m in loaded], dim=1)

    rows_per_pixel = len(loaded) * views
    if views > 1:  # the per-view sample is views times larger: keep it within VIEW_SAMPLE_BYTES
        affordable = VIEW_SAMPLE_BYTES // (rows_per_pixel * classes * 4)
        tuning = tuning.replace(max_pixels=max(1000, min(tuning.max_pixels, affordable)))
    sample = collect_sample(
        members_fn,
        rows,
        lambda image: np.asarray(normalize(image, first.normalization)),
        settings.windows.for_device(predictor.device.type),
        tuning,
        classes,
        rows_per_pixel,
        first.ignore_index,
    )
    probabilities, truth = sample.arrays()
    if truth.size == 0:
        log(f"ensemble tuning skipped: split {tuning.split!r} has no labelled pixel")
        return None
    record = _decide(
        settings,
        [m.name for m in loaded],
        list(first.class_names),
        probabilities,
        truth,
        predictor.tta if views > 1 else None,
    )
    for note in record.notes:  # record.pixels is the sample's size: arrays() thinned it
        log(f"ensemble tuning on {tuning.split} ({record.pixels} pixels of {len(rows)} tiles): {note}")
    return record


def _decide(
    settings: PredictSettings,
    names: list[str],
    classes: list[str],
    probabilities: np.ndarray,
    truth: np.ndarray,
    views: TTAConfig | None = None,
) -> EnsembleTuning:
    """The views, member weights and class offsets the sample supports, with the scores and reasons.

    With ``views`` the sample holds every member's every view (``(M * V, N, K)``); the views are
    chosen first, then the members and offsets on each member's merge of the chosen views.
    """
    split, merge = settings.tuning.split, settings.tta.merge
    scores: dict[str, float] = {}
    notes: list[str] = []
    scales: list[float] | None = None
    flips: list[str] | None = None
    if views is not None:
        view_choice = choose_views(probabilities, truth, len(names), views.scales, views.transforms, merge)
        every = view_choice.scores[(views.scales, views.transforms)]
        ranked = sorted(view_choice.scores.items(), key=lambda item: -item[1])[:VIEW_SCORES_KEPT]
        for (s_set, t_set), value in dict([*ranked, (view_choice.key, view_choice.score)]).items():
            scores[f"views {list(s_set)} x {list(t_set)}"] = value
        scores[f"views {list(views.scales)} x {list(views.transforms)}"] = every
        count = len(view_choice.indices)
        if count < views.views_per_model:
            scales, flips = list(view_choice.scales), list(view_choice.transforms)
            notes.append(
                f"TTA views: scales {scales} x {flips} ({count} of {views.views_per_model} per model): "
                f"{split} mIoU {view_choice.score:.4f}, all views {every:.4f}"
            )
        else:
            notes.append(f"kept all {count} TTA views: no subset beat their {split} mIoU {every:.4f}")
        probabilities = member_probabilities(probabilities, len(names), view_choice.indices, merge)
    weights = [1.0] * len(names)
    if settings.tuning.members and len(names) > 1:
        choice = choose_members(probabilities, truth, merge)
        scores.update({" + ".join(names[i] for i in subset): s for subset, s in choice.scores.items()})
        weights = list(choice.weights)
        everyone = choice.scores[tuple(range(len(names)))]
        kept = tuple(i for i, w in enumerate(weights) if w)
        if len(kept) < len(names):
            dropped = ", ".join(n for n, w in zip(names, weights, strict=True) if not w)
            notes.append(
                f"dropped {dropped} from the ensemble: {split} mIoU {choice.scores[kept]:.4f} without, "
                f"{everyone:.4f} with"
            )
        else:
            notes.append(f"kept all {len(names)} members: no subset beat their {split} mIoU {everyone:.4f}")
    bias = [0.0] * len(classes)
    if settings.tuning.class_bias:
        tuned = tune_class_bias(combine(probabilities, weights, merge), truth)
        bias = list(tuned.bias)
        scores["ensemble, no class bias"], scores["ensemble, class bias"] = tuned.before, tuned.after
        offsets = ", ".join(f"{c} {b:+.2f}" for c, b in zip(classes, bias, strict=True))
        notes.append(
            f"class offsets {offsets}: {split} mIoU {tuned.before:.4f} -> {tuned.after:.4f}"
            if any(bias)
            else f"no class offset: none raised the {split} mIoU {tuned.before:.4f}"
        )
    weights_by_name = dict(zip(names, weights, strict=True))
    return EnsembleTuning(
        split=split,
        pixels=int(truth.size),
        weights=weights_by_name,
        class_bias=bias,
        scores=scores,
        notes=notes,
        scales=scales,
        flips=flips,
    )


def _members(
    models: Sequence[tuple[str, TrainedModel]], settings: PredictSettings, tracking: TrackingSettings | None
) -> tuple[list[LoadedModel], list[EnsembleMember]]:
    loaded, members = [], []
    for name, trained in models:
        loaded.append(load_stage_model(trained.checkpoint, name))
        record = trained.tracking
        members.append(
            EnsembleMember(
                name=name,
                checkpoint=trained.checkpoint,
                registered_model=record.registered_model if record else None,
                registered_version=record.registered_version if record else None,
            )
        )
    for index, reference in enumerate(settings.extra_checkpoints):
        path = resolve_model_checkpoint(reference, tracking) if tracking else Path(reference)
        name = f"extra_{index}"
        loaded.append(load_stage_model(path, name))
        members.append(EnsembleMember(name=name, checkpoint=str(path)))
    return loaded, members


def predict_split(
    settings: PredictSettings,
    shards: ShardSet,
    models: Sequence[tuple[str, TrainedModel]],
    candidate: str,
    out_root: Path,
    *,
    tracking: TrackingSettings | None = None,
    log_fn: LogFn | None = None,
) -> PredictionSet:
    """Class maps of the evaluation split by each model and by the ensemble, in ``out_root/<set>/``.

    ``candidate`` names the member the champion gate may promote (it must be a registered model).
    With ``settings.postprocess`` on, the class maps written (and so scored by the evaluation) are
    the cleaned ones; the settings are kept in the result's ``settings`` and each map's tags.
    """
    log = log_fn or default_log_fn()
    split, rows = labeled_rows(shards, settings.split)
    loaded, members = _members(models, settings, tracking)
    if candidate not in {m.name for m in members}:
        raise ValueError(f"candidate {candidate!r} is not among the members {[m.name for m in members]}")
    started = time.perf_counter()
    tuning = tune_ensemble(settings, shards, loaded, split, log)
    tune_seconds = time.perf_counter() - started
    if tuning is not None and tuning.scales is not None and tuning.flips is not None:
        # the chosen views are what is predicted, scored and (in the deployable bundle) shipped
        settings = settings.replace(tta=settings.tta.replace(scales=tuning.scales, flips=tuning.flips))
    names = [m.name for m in loaded] + [ENSEMBLE] if len(loaded) > 1 else [ENSEMBLE]
    out_dirs = {name: out_root / name for name in names}
    run = predict_files(
        loaded,
        [(row.item_id, raster_input(row)) for row in rows],
        out_dirs,
        settings,
        weights=list(tuning.weights.values()) if tuning else None,
        class_bias=tuning.class_bias if tuning else None,
        log_fn=log,
    )
    log(
        f"predicted {len(rows)} {split} tiles with {len(loaded)} models x "
        f"{run.views_per_input // len(loaded)} views in {run.seconds:.1f}s -> {out_root}"
    )
    if settings.postprocess.enabled:
        log(f"class maps post-processed with {settings.postprocess.model_dump()} (probabilities stay raw)")
    first = loaded[0]
    return PredictionSet(
        split=split,
        out_root=str(out_root),
        sets={name: str(folder) for name, folder in out_dirs.items()},
        items=[
            PredictionItem(item_id=row.item_id, input=str(raster_input(row)), target=str(row.target_path))
            for row in rows
        ],
        members=members,
        candidate=candidate,
        class_names=list(first.class_names),
        class_colors=first.palette.tolist(),
        ignore_index=first.ignore_index,
        positive_classes=list(first.positive_classes),
        views_per_input=run.views_per_input,
        settings=settings,
        seconds={"predict": round(run.seconds, 3), "tune": round(tune_seconds, 3)},
        precision=run.precision,
        tuning=tuning,
    )


def georeference_problems(predictions: PredictionSet) -> list[str]:
    """One line per class map whose CRS, transform or size differs from its input raster.

    A class map that does not overlay its image in a GIS is wrong however good its classes are.
    """
    problems = []
    for folder in predictions.sets.values():
        for item in predictions.items:
            output = Path(folder) / f"{item.item_id}.tif"
            with rasterio.open(item.input) as src, rasterio.open(output) as dst:
                if (src.height, src.width) != (dst.height, dst.width):
                    problems.append(f"{output}: {dst.width}x{dst.height} px, input {src.width}x{src.height}")
                if src.crs != dst.crs:
                    problems.append(f"{output}: CRS {dst.crs}, input {src.crs}")
                if src.crs is not None and not src.transform.almost_equals(dst.transform):
                    problems.append(
                        f"{output}: transform {tuple(dst.transform)[:6]}, input {tuple(src.transform)[:6]}"
                    )
    return problems
