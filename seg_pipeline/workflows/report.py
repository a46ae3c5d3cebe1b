"""The evaluation report as a library call: score every prediction set, compare, write, track.

Every prediction set of a :class:`~seg_pipeline.contracts.PredictionSet` (each single model and the
ensemble) is scored against the ground truth with one confusion matrix, the ensemble is compared
with the best single model class by class, and the report (markdown, CSVs, PNGs, metrics.json)
goes to ``report_dir`` and, with tracking, into one MLflow run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from seg_pipeline.contracts import ClassDelta, EvaluationReport, ModelScores, PredictionSet
from seg_pipeline.contracts.data import positive_ids
from seg_pipeline.data.raster_io import read_decimated
from seg_pipeline.evaluation.plots import (
    GalleryTile,
    plot_confusion_matrix,
    plot_gallery,
    plot_overlay,
    plot_per_class_iou,
)
from seg_pipeline.evaluation.report import (
    FolderEvaluation,
    comparison_rows,
    evaluate_pairs,
    per_class_deltas,
    write_confusion_csv,
    write_html_report,
    write_json,
    write_markdown_report,
)
from seg_pipeline.inference.ensemble import ENSEMBLE
from seg_pipeline.inference.palette import stored_palette
from seg_pipeline.progress import ItemProgress
from seg_pipeline.settings import EvaluationSettings, ScoringSettings
from seg_pipeline.tracking import TrackingSettings, start_run
from seg_pipeline.workflows.deployable import deployable_candidate

LogFn = Callable[[str], None]


def _positive(predictions: PredictionSet) -> list[int]:
    return positive_ids(predictions.positive_classes, len(predictions.class_names))


def prediction_pairs(folder: Path, predictions: PredictionSet) -> list[tuple[Path, Path]]:
    """``(class map, ground truth)`` of every predicted item, the class map taken from ``folder``."""
    return [(folder / f"{item.item_id}.tif", Path(item.target or "")) for item in predictions.items]


def score_sets(
    predictions: PredictionSet, scoring: ScoringSettings, log_fn: LogFn | None = None
) -> dict[str, FolderEvaluation]:
    """One confusion matrix per prediction set, with progress over all files of all sets."""
    progress = ItemProgress(
        f"evaluate {predictions.split}",
        len(predictions.items) * len(predictions.sets),
        unit="files",
        log_fn=log_fn,
    )
    evaluations = {
        name: evaluate_pairs(
            prediction_pairs(Path(folder), predictions),
            len(predictions.class_names),
            predictions.ignore_index,
            scoring.ignore_nonpositive,
            progress=progress,
            positive_classes=_positive(predictions),
            detection_min_pixels=scoring.detection_min_pixels,
        )
        for name, folder in predictions.sets.items()
    }
    progress.done(f"{len(evaluations)} prediction sets")
    return evaluations


def model_scores(name: str, evaluation: FolderEvaluation, class_names: Sequence[str]) -> ModelScores:
    """The contract form of one set's metrics."""
    metrics = evaluation.metrics
    detection = evaluation.detection
    return ModelScores(
        pooled=evaluation.pooled(),
        detection={}
        if detection is None
        else {k: v for k, v in detection.to_dict().items() if k in ("accuracy", "precision", "recall", "f1")},
        name=name,
        miou=float(metrics.miou),
        mdice=float(metrics.mdice),
        mprecision=float(metrics.mprecision),
        mrecall=float(metrics.mrecall),
        pixel_accuracy=float(metrics.pixel_accuracy),
        fwiou=float(metrics.fwiou),
        kappa=float(metrics.kappa),
        iou={c: float(v) for c, v in zip(class_names, metrics.iou, strict=True)},
    )


#: Longest side of the rasters drawn in an overlay (read decimated: a scene costs what a tile does).
OVERLAY_SIDE = 1024
#: Longest side of a gallery tile.
GALLERY_SIDE = 384
#: Where the report folder goes in the evaluation's MLflow run.
REPORT_ARTIFACTS = "report"
FIGURE_TITLES = {"per_class_iou": "Per-class IoU by model", "gallery": "Prediction gallery"}


def _overlays(predictions: PredictionSet, report_dir: Path, count: int) -> list[Path]:
    palette = stored_palette(predictions.class_names, predictions.class_colors)
    paths = []
    for item in predictions.items[:count]:
        prediction = read_decimated(predictions.folder(ENSEMBLE) / f"{item.item_id}.tif", OVERLAY_SIDE)[0]
        paths.append(
            plot_overlay(
                report_dir / f"overlay_{item.item_id}.png",
                read_decimated(item.input, OVERLAY_SIDE),
                read_decimated(item.target or "", OVERLAY_SIDE)[0],
                prediction,
                palette,
                predictions.class_names,
                f"{item.item_id} (ensemble)",
                ignore_index=predictions.ignore_index,
            )
        )
    return paths


def _gallery_tiles(predictions: PredictionSet, count: int) -> list[GalleryTile]:
    """``count`` items picked evenly over the split, read decimated (a scene costs what a tile does)."""
    items = predictions.items
    if count <= 0 or not items:
        return []
    step = (len(items) - 1) / max(count - 1, 1)
    picked = sorted({round(i * step) for i in range(min(count, len(items)))})
    tiles = []
    for item in (items[i] for i in picked):
        ensemble_map = predictions.folder(ENSEMBLE) / f"{item.item_id}.tif"
        tiles.append(
            GalleryTile(
                name=item.item_id,
                image=read_decimated(item.input, GALLERY_SIDE),
                prediction=read_decimated(ensemble_map, GALLERY_SIDE)[0],
                truth=read_decimated(item.target, GALLERY_SIDE)[0] if item.target else None,
            )
        )
    return tiles


def _figures(
    predictions: PredictionSet,
    evaluations: Mapping[str, FolderEvaluation],
    best_single: str,
    settings: EvaluationSettings,
    report_dir: Path,
) -> dict[str, Path]:
    """Per-class IoU of every model (with the ensemble's gain) and the prediction gallery."""
    iou = {
        name: dict(zip(predictions.class_names, (float(v) for v in ev.metrics.iou), strict=True))
        for name, ev in evaluations.items()
    }
    figures = {
        "per_class_iou": plot_per_class_iou(
            report_dir / "per_class_iou.png",
            iou,
            predictions.class_names,
            ENSEMBLE,
            best_single,
            f"per-class IoU on the {predictions.split} split",
        )
    }
    palette = stored_palette(predictions.class_names, predictions.class_colors)
    gallery = plot_gallery(
        report_dir / "gallery.png",
        _gallery_tiles(predictions, settings.gallery),
        palette,
        predictions.class_names,
        f"ensemble predictions ({predictions.split} split)",
    )
    if gallery is not None:
        figures["gallery"] = gallery
    return figures


def _pooled_notes(predictions: PredictionSet, evaluations: Mapping[str, FolderEvaluation]) -> list[str]:
    """One line per set: the positive classes pooled (seed 003's fire IoU) and the tile detection F1."""
    names = [predictions.class_names[i] for i in _positive(predictions)]
    lines = []
    for name, ev in evaluations.items():
        pooled, detection = ev.pooled(), ev.detection
        if not pooled or detection is None:
            continue
        lines.append(
            f"`{name}`: {' + '.join(names)} pooled IoU {pooled['iou']:.4f}, recall {pooled['recall']:.4f}; "
            f"tile detection F1 {detection.f1:.4f} (tp {detection.tp}, fp {detection.fp}, fn {detection.fn}, "
            f"tn {detection.tn})"
        )
    return lines


def _write_files(
    predictions: PredictionSet,
    evaluations: Mapping[str, FolderEvaluation],
    best_single: str,
    settings: EvaluationSettings,
    report_dir: Path,
    figures: Mapping[str, Path],
    extra_notes: Sequence[str] = (),
) -> tuple[Path, Path, list[Path]]:
    """CSV per set, the ensemble's confusion PNG, overlays, report.md and metrics.json."""
    class_names = predictions.class_names
    results = {name: ev.metrics for name, ev in evaluations.items()}
    rows = comparison_rows(results, class_names)
    deltas = per_class_deltas(results, class_names, ENSEMBLE, best_single)
    for name, ev in evaluations.items():
        write_confusion_csv(report_dir / f"confusion_{name}.csv", ev.matrix.matrix, class_names)
    confusion_png = plot_confusion_matrix(
        report_dir / "confusion_ensemble.png",
        evaluations[ENSEMBLE].matrix.matrix,
        class_names,
        f"ensemble ({predictions.split} split, recall-normalised)",
    )
    overlays = _overlays(predictions, report_dir, settings.overlays)
    best, ensemble = results[best_single], results[ENSEMBLE]
    notes = [
        f"split `{predictions.split}`: {len(predictions.items)} labeled tiles; models: "
        f"{', '.join(m.name for m in predictions.members)}; "
        f"{predictions.views_per_input} forward views per tile in the ensemble",
        f"best single model: `{best_single}` (mIoU {best.miou:.4f}); ensemble mIoU {ensemble.miou:.4f}",
        *_pooled_notes(predictions, evaluations),
        *extra_notes,
        "macro means skip classes absent from both truth and prediction (NaN); "
        f"{evaluations[ENSEMBLE].unpredicted_pixels} input-nodata pixels have no prediction "
        "and are not scored",
    ]
    tuning = predictions.tuning
    if tuning is None:
        notes.append("ensemble: every member at equal weight, no class offsets (tuning off or skipped)")
    else:
        notes += [
            f"ensemble tuned on `{tuning.split}` ({tuning.pixels} sampled pixels): {n}" for n in tuning.notes
        ]
    images = {f"{FIGURE_TITLES[name]}": png.name for name, png in figures.items()}
    images["Confusion matrix (ensemble)"] = confusion_png.name
    images.update({f"Overlay {p.stem.removeprefix('overlay_')}": p.name for p in overlays})
    # report.md for the Dagster page and the repo; report.html (pictures inlined) for MLflow's viewer
    markdown, _ = (
        write(report_dir / name, title="Evaluation report", rows=rows, deltas=deltas,
              class_names=class_names, images=images, notes=notes)
        for write, name in ((write_markdown_report, "report.md"), (write_html_report, "report.html"))
    )  # fmt: skip
    scores = {
        name: {
            "miou": float(ev.metrics.miou),
            "mdice": float(ev.metrics.mdice),
            **{f"pooled/{k}": v for k, v in ev.pooled().items()},
            **{f"detection/{k}": v for k, v in (ev.detection.to_dict() if ev.detection else {}).items()},
        }
        for name, ev in evaluations.items()
    }
    write_json(
        report_dir / "metrics.json",
        {"scores": scores, "rows": rows, "deltas": deltas, "best_single": best_single},
    )
    return markdown, confusion_png, overlays


def _track(
    tracking: TrackingSettings, run_tags: Mapping[str, str], predictions: PredictionSet,
    settings: EvaluationSettings, scores: Sequence[ModelScores], report_dir: Path,
) -> tuple[str, str]:  # fmt: skip
    with start_run(
        tracking, run_name="evaluation", tags={**run_tags, "seg_pipeline.stage": "evaluation"}
    ) as run:
        run.log_params(
            {
                "split": predictions.split,
                "models": [m.name for m in predictions.members],
                "views_per_input": predictions.views_per_input,
                "inference_precision": predictions.precision,
                "ignore_nonpositive": settings.scoring.ignore_nonpositive,
                "positive_classes": [predictions.class_names[i] for i in _positive(predictions)],
                **(
                    {
                        "tuning_split": predictions.tuning.split,
                        "ensemble_weights": predictions.tuning.weights,
                        "class_bias": predictions.tuning.class_bias,
                    }
                    if predictions.tuning
                    else {}
                ),
            }
        )
        metrics: dict[str, float] = {}
        for s in scores:
            metrics.update(model_metrics(s, s.name))
        run.log_metrics(metrics, step=0)
        by_name = {s.name: s for s in scores}
        for member in predictions.members:
            if member.registered_model and member.registered_version and member.name in by_name:
                run.score_model_version(
                    member.registered_model,
                    member.registered_version,
                    model_metrics(by_name[member.name], f"evaluation/{predictions.split}"),
                    summary_keys=(f"evaluation/{predictions.split}/miou",),
                )
        run.log_artifact(report_dir, artifact_path=REPORT_ARTIFACTS)
        return run.run_id, run.url


def model_metrics(scores: ModelScores, prefix: str) -> dict[str, float]:
    """One model's finite scores as ``<prefix>/miou``, ``<prefix>/iou/<class>``, ``<prefix>/pooled/...``.

    With ``evaluation/<split>`` as prefix every model shares the key names
    (``evaluation/test/miou``, apart from training's ``val/*``), which is how they are logged against
    each registered version; the run's own keys carry the model name instead.
    """
    flat = dict(scores.model_dump(exclude={"name", "iou", "pooled", "detection"}))
    flat.update({f"iou/{cls}": value for cls, value in scores.iou.items()})
    flat.update({f"pooled/{key}": value for key, value in scores.pooled.items()})
    flat.update({f"detection/{key}": value for key, value in scores.detection.items()})
    return {f"{prefix}/{key}": float(value) for key, value in flat.items() if np.isfinite(value)}


def build_report(
    settings: EvaluationSettings,
    predictions: PredictionSet,
    report_dir: Path,
    *,
    tracking: TrackingSettings | None = None,
    run_tags: Mapping[str, str] | None = None,
    log_fn: LogFn | None = None,
) -> EvaluationReport:
    """Score each prediction set (single models and ``ensemble``) and write the report."""
    report_dir.mkdir(parents=True, exist_ok=True)
    evaluations = score_sets(predictions, settings.scoring, log_fn)
    singles = [name for name in evaluations if name != ENSEMBLE] or [ENSEMBLE]
    best_single = max(singles, key=lambda name: np.nan_to_num(evaluations[name].metrics.miou, nan=-1.0))
    figures = _figures(predictions, evaluations, best_single, settings, report_dir)
    deployable = deployable_candidate(
        predictions, {name: float(ev.metrics.miou) for name, ev in evaluations.items()}, best_single
    )
    deploy_note = (
        f"deployable model (what the champion gate registers): {deployable.kind}, "
        f"{', '.join(m.name for m in deployable.members)}: {deployable.reason}"
    )
    markdown, confusion_png, overlays = _write_files(
        predictions, evaluations, best_single, settings, report_dir, figures, [deploy_note]
    )
    scores = [model_scores(name, ev, predictions.class_names) for name, ev in evaluations.items()]
    run_id = run_url = None
    figure_urls: dict[str, str] = {}
    if tracking is not None:
        run_id, run_url = _track(tracking, run_tags or {}, predictions, settings, scores, report_dir)
        for name, png in {**figures, "confusion_matrix": confusion_png}.items():
            url = tracking.artifact_link(run_id, f"{REPORT_ARTIFACTS}/{Path(png).name}")
            if url is not None:
                figure_urls[name] = url
    best, ensemble = evaluations[best_single].metrics, evaluations[ENSEMBLE].metrics
    return EvaluationReport(
        split=predictions.split,
        report_dir=str(report_dir),
        markdown=str(markdown),
        scores=scores,
        deltas=[
            ClassDelta(class_name=c, best_single=float(b), ensemble=float(e), delta=float(e - b))
            for c, e, b in zip(predictions.class_names, ensemble.iou, best.iou, strict=True)
        ],
        best_single=best_single,
        confusion_png=str(confusion_png),
        overlays=[str(p) for p in overlays],
        figures={name: str(png) for name, png in figures.items()},
        figure_urls=figure_urls,
        run_id=run_id,
        run_url=run_url,
        miou_floor=settings.miou_floor,
        ensemble_tolerance=settings.ensemble_tolerance,
    )
