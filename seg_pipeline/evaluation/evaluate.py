"""Evaluation stage as library calls: score prediction sets, write the report, run the champion gate.

Both are MLflow-tracked; the Dagster assets only call :func:`build_report` and :func:`champion_gate`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from seg_pipeline.data.raster_io import read_array
from seg_pipeline.evaluation.plots import plot_confusion_matrix, plot_overlay
from seg_pipeline.evaluation.report import (
    SCALARS,
    comparison_rows,
    evaluate_pairs,
    per_class_deltas,
    write_confusion_csv,
    write_json,
    write_markdown_report,
)
from seg_pipeline.progress import ItemProgress


def _pairs(prediction_dir: str | Path, items: list[Mapping[str, str]]) -> list[tuple[Path, Path]]:
    return [(Path(prediction_dir) / f"{item['item_id']}.tif", Path(item["target"])) for item in items]


def build_report(
    predictions: Mapping[str, Any],
    report_dir: Path | str,
    *,
    ignore_nonpositive: bool = False,
    overlays: int = 3,
    tracking: Any = None,
    run_tags: Mapping[str, str] | None = None,
    log_fn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Score each prediction set (single models and ``ensemble``) and write the report.

    Args:
        predictions: The ``ensemble_predictions`` value (prediction dirs, items, classes).
        report_dir: Where ``report.md``, CSVs, PNGs and ``metrics.json`` go.
        tracking: :class:`seg_pipeline.tracking.TrackingSettings` for the MLflow run, or ``None``.
        log_fn: Sink for progress lines over the scored files, all prediction sets together
            (default: the ``seg_pipeline`` logger).
    """
    from seg_pipeline.inference.writers import default_palette

    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    class_names = list(predictions["class_names"])
    k = len(class_names)
    items = list(predictions["items"])
    progress = ItemProgress(
        f"evaluate {predictions['split']}",
        len(items) * len(predictions["prediction_dirs"]),
        unit="files",
        log_fn=log_fn,
    )
    evaluations = {
        name: evaluate_pairs(
            _pairs(folder, items), k, predictions["ignore_index"], ignore_nonpositive, progress=progress
        )
        for name, folder in predictions["prediction_dirs"].items()
    }
    progress.done(f"{len(evaluations)} prediction sets")
    results = {name: ev.metrics for name, ev in evaluations.items()}
    singles = [name for name in results if name != "ensemble"] or ["ensemble"]
    best_single = max(singles, key=lambda name: np.nan_to_num(results[name].miou, nan=-1.0))
    rows = comparison_rows(results, class_names)
    deltas = per_class_deltas(results, class_names, "ensemble", best_single)

    for name, ev in evaluations.items():
        write_confusion_csv(report_dir / f"confusion_{name}.csv", ev.matrix.matrix, class_names)
    confusion_png = plot_confusion_matrix(
        report_dir / "confusion_ensemble.png",
        evaluations["ensemble"].matrix.matrix,
        class_names,
        f"ensemble ({predictions['split']} split, recall-normalised)",
    )
    palette = default_palette(k)
    overlay_paths = []
    for item in items[:overlays]:
        prediction = read_array(Path(predictions["prediction_dirs"]["ensemble"]) / f"{item['item_id']}.tif")[
            0
        ]
        overlay_paths.append(
            plot_overlay(
                report_dir / f"overlay_{item['item_id']}.png",
                read_array(item["input"]),
                read_array(item["target"])[0],
                prediction,
                palette,
                class_names,
                f"{item['item_id']} (ensemble)",
                ignore_index=predictions["ignore_index"],
            )
        )
    scores = {name: {s: float(getattr(m, s)) for s in SCALARS} for name, m in results.items()}
    notes = [
        f"split `{predictions['split']}`: {len(items)} labeled tiles; "
        f"models: {', '.join(predictions['models'])}; "
        f"{predictions['views_per_input']} forward views per tile in the ensemble",
        f"best single model: `{best_single}` (mIoU {scores[best_single]['miou']:.4f}); "
        f"ensemble mIoU {scores['ensemble']['miou']:.4f}",
        "macro means skip classes absent from both truth and prediction (NaN); "
        f"{evaluations['ensemble'].unpredicted_pixels} input-nodata pixels have no prediction "
        "and are not scored",
    ]
    images = {"Confusion matrix (ensemble)": confusion_png.name}
    images.update({f"Overlay {p.stem.removeprefix('overlay_')}": p.name for p in overlay_paths})
    markdown = write_markdown_report(
        report_dir / "report.md",
        title="Evaluation report",
        rows=rows,
        deltas=deltas,
        class_names=class_names,
        images=images,
        notes=notes,
    )
    write_json(
        report_dir / "metrics.json",
        {"scores": scores, "rows": rows, "deltas": deltas, "best_single": best_single},
    )
    run_id = None
    if tracking is not None:
        from seg_pipeline import tracking as trk

        with trk.start_run(
            tracking, run_name="evaluation", tags={**(run_tags or {}), "seg_pipeline.stage": "evaluation"}
        ) as run:
            run.log_params(
                {
                    "split": predictions["split"],
                    "models": predictions["models"],
                    "views_per_input": predictions["views_per_input"],
                    "ignore_nonpositive": ignore_nonpositive,
                }
            )
            run.log_metrics(
                {
                    f"{name}/{key}": value
                    for name, s in scores.items()
                    for key, value in s.items()
                    if np.isfinite(value)
                },
                step=0,
            )
            run.log_artifact(report_dir, artifact_path="report")
            run_id = run.run_id
    return {
        "report_dir": str(report_dir),
        "markdown": str(markdown),
        "rows": rows,
        "deltas": deltas,
        "scores": scores,
        "best_single": best_single,
        "confusion_png": str(confusion_png),
        "overlays": [str(p) for p in overlay_paths],
        "run_id": run_id,
        "split": predictions["split"],
    }


def champion_gate(
    predictions: Mapping[str, Any],
    *,
    candidate_score: float,
    alias: str,
    margin: float,
    work_dir: Path | str,
    tracking: Any,
    log_fn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Move ``alias`` to the candidate only if it beats the current holder by ``margin`` mIoU.

    The current champion is re-scored on the same split with the same TTA settings, so both
    numbers come from one protocol (F32). With no champion yet, the candidate is promoted.
    Re-scoring predicts the whole split, so it logs progress to ``log_fn`` (default: the
    ``seg_pipeline`` logger).
    """
    from seg_pipeline import tracking as trk

    if margin < 0:
        raise ValueError(f"margin={margin}: must be >= 0")
    model_name, version = predictions["registered"]["kd_student"]
    current = trk.get_alias_version(model_name, alias, settings=tracking)
    champion_score: float | None = None
    if current is None:
        promote, reason = True, f"no '{alias}' yet: promoting {model_name} v{version}"
    elif str(current.version) == str(version):
        promote, reason = False, f"{model_name} v{version} already holds '{alias}'"
    else:
        champion_score = _score_registered(predictions, current, work_dir, tracking, log_fn)
        promote = candidate_score > champion_score + margin
        verdict = "promoting" if promote else "keeping"
        reason = (
            f"candidate v{version} mIoU {candidate_score:.4f} vs champion v{current.version} "
            f"{champion_score:.4f} (margin {margin}): {verdict} "
            f"{'v' + str(version) if promote else 'v' + str(current.version)}"
        )
    if promote:
        trk.set_alias(model_name, alias, version, settings=tracking)
    return {
        "promoted": promote,
        "reason": reason,
        "model_name": model_name,
        "alias": alias,
        "candidate_version": str(version),
        "previous_version": None if current is None else str(current.version),
        "candidate_score": candidate_score,
        "champion_score": champion_score,
        "margin": margin,
    }


def _score_registered(
    predictions: Mapping[str, Any],
    version_info: Any,
    work_dir: Path | str,
    tracking: Any,
    log_fn: Callable[[str], None] | None = None,
) -> float:
    """mIoU of a registered model version on the predictions' split, with the same TTA settings."""
    from seg_pipeline import tracking as trk
    from seg_pipeline.inference.predict import load_stage_model, predict_files, tta_from_settings

    checkpoint = trk.run_tag(version_info.run_id, "seg_pipeline.best_checkpoint", settings=tracking)
    if not checkpoint or not Path(checkpoint).exists():
        raise FileNotFoundError(
            f"champion {version_info.name} v{version_info.version}: its checkpoint {checkpoint!r} is gone; "
            "restore it or move the alias by hand"
        )
    settings = predictions["predict_settings"]
    out = Path(work_dir) / f"v{version_info.version}"
    items = list(predictions["items"])
    predict_files(
        [load_stage_model(checkpoint, f"champion_v{version_info.version}")],
        [(item["item_id"], Path(item["input"])) for item in items],
        out,
        tta=tta_from_settings(settings),
        window=settings["window"],
        overlap=settings["overlap"],
        batch_size=settings["batch_size"],
        device=settings["device"],
        color_png=False,
        log_fn=log_fn,
    )
    progress = ItemProgress(
        f"evaluate champion v{version_info.version}", len(items), unit="files", log_fn=log_fn
    )
    evaluation = evaluate_pairs(
        _pairs(out, items), len(predictions["class_names"]), predictions["ignore_index"], progress=progress
    )
    progress.done()
    return float(evaluation.metrics.miou)
