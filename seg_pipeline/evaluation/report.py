"""Evaluation reports (F23): scoring prediction folders and writing the report files.

Single models vs ensemble, per-class deltas, confusion matrix, overlays, a markdown report. Also
evaluates a prediction folder against a ground-truth folder (seed 002's ``model_metrics.py
--pred-dir --gt-dir``).
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.windows import Window

from seg_pipeline.data.raster_io import RASTER_EXTENSIONS, open_raster, raster_shape, read_array
from seg_pipeline.io import atomic_write
from seg_pipeline.metrics import ConfusionMatrix, SegmentationMetrics
from seg_pipeline.metrics.detection import DetectionCounter, DetectionMetrics
from seg_pipeline.metrics.scores import pooled_metrics
from seg_pipeline.progress import ItemProgress

SCALARS = ("miou", "mdice", "mprecision", "mrecall", "pixel_accuracy", "fwiou", "kappa")


class EvaluationInputError(ValueError):
    """Prediction and ground-truth folders do not line up; the message names the files."""


@dataclass
class FolderEvaluation:
    """Metrics of a prediction folder and the pairing that produced them."""

    metrics: SegmentationMetrics
    matrix: ConfusionMatrix
    pairs: list[tuple[Path, Path]]
    missing_predictions: list[str]
    unpredicted_pixels: int = 0  # input nodata: no prediction, left out of the matrix
    positive_classes: tuple[int, ...] = ()  # pooled as one foreground (seed 003); () = not pooled
    detection: DetectionMetrics | None = None  # each file one "holds a positive class" decision

    def pooled(self) -> dict[str, float]:
        """IoU, Dice, precision and recall of the positive classes pooled (``{}`` when none are set)."""
        if not self.positive_classes:
            return {}
        pooled = pooled_metrics(self.matrix.matrix, self.positive_classes)
        return {key: pooled[key] for key in ("iou", "dice", "precision", "recall")}


def _rasters(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise EvaluationInputError(f"{folder}: folder does not exist")
    found = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in RASTER_EXTENSIONS}
    if not found:
        raise EvaluationInputError(f"{folder}: no raster files (.tif, .png, ...) found")
    return found


#: Rows of a prediction and its mask scored at a time: memory follows the block, not the scene.
_ROWS = 1024


def _check_single_band(path: Path) -> tuple[int, int]:
    """``(height, width)`` of a one-band mask; several bands (an RGB picture of labels) cannot be scored."""
    bands, height, width = raster_shape(path)
    if bands != 1:
        raise EvaluationInputError(
            f"{path} has {bands} bands; ground truth must be one band of class ids "
            "(recode colour masks with dataset.mask_colors at ingest)"
        )
    return height, width


def _nodata(path: Path, dtype: np.dtype) -> int | None:
    """A class map's nodata value (input nodata pixels): the declared one, else the dtype's largest
    value (255 for uint8), which class maps use by convention.
    """
    declared = None
    if path.suffix != ".npy":
        with open_raster(path) as src:
            declared = src.nodata
    if declared is not None:
        return int(declared)
    return int(np.iinfo(dtype).max) if dtype.kind in "ui" else None


def evaluate_pairs(
    pairs: Sequence[tuple[Path, Path]],
    num_classes: int,
    ignore_index: int | None = 255,
    ignore_nonpositive: bool = False,
    missing: Sequence[str] = (),
    progress: ItemProgress | None = None,
    positive_classes: Sequence[int] = (),
    detection_min_pixels: int = 1,
) -> FolderEvaluation:
    """One confusion matrix over ``(prediction, ground truth)`` raster pairs.

    Prediction pixels holding the class map's nodata value (input nodata) are not a class: they
    are left out of the matrix and counted in ``unpredicted_pixels``. ``progress`` (optional) is
    advanced once per pair, so callers scoring many files can report throughput and ETA. With
    ``positive_classes`` each file is also one patch-detection decision (seed 003: it holds at least
    ``detection_min_pixels`` scored pixels of those classes, in prediction and in truth).
    """
    matrix = ConfusionMatrix(num_classes, ignore_index=ignore_index, ignore_nonpositive=ignore_nonpositive)
    positive = sorted(positive_classes)
    detection = DetectionCounter(positive, detection_min_pixels) if positive else None
    unpredicted = 0
    for pred_path, truth_path in pairs:
        positive_pixels = np.zeros(2, dtype=np.int64)
        pred_size, truth_size = _check_single_band(pred_path), _check_single_band(truth_path)
        if pred_size != truth_size:
            raise EvaluationInputError(
                f"{pred_path} is {pred_size[::-1]} but {truth_path} is {truth_size[::-1]} (W x H); "
                "predict at the mask's resolution"
            )
        nodata: int | None = None
        for top in range(0, pred_size[0], _ROWS):
            window = Window(0, top, pred_size[1], min(_ROWS, pred_size[0] - top))
            pred, truth = read_array(pred_path, window)[0], read_array(truth_path, window)[0]
            nodata = _nodata(pred_path, pred.dtype) if top == 0 else nodata
            predicted = pred < num_classes
            outside = ~predicted if nodata is None else ~predicted & (pred != nodata)
            if outside.any():
                raise EvaluationInputError(
                    f"{pred_path} holds class values {np.unique(pred[outside])[:10].tolist()} outside "
                    f"0..{num_classes - 1} (nodata {nodata}); they cannot be scored: check --num-classes / "
                    "classes.txt"
                )
            unpredicted += int((~predicted).sum())
            scored_pred, scored_truth = pred[predicted].astype(np.int64), truth[predicted].astype(np.int64)
            matrix.update(scored_pred, scored_truth)
            if detection is not None:
                scored = matrix.scored(scored_truth)
                positive_pixels += [
                    detection.positive_pixels(scored_pred, scored),
                    detection.positive_pixels(scored_truth, scored),
                ]
        if detection is not None:
            detection.add_decision(int(positive_pixels[0]), int(positive_pixels[1]))
        if progress is not None:
            progress.advance(detail=f"{pred_path.parent.name}/{pred_path.stem}")
    return FolderEvaluation(
        matrix.compute(), matrix, list(pairs), list(missing), unpredicted,
        positive_classes=tuple(positive),
        detection=None if detection is None else detection.compute(),
    )  # fmt: skip


def evaluate_folders(
    pred_dir: Path | str,
    gt_dir: Path | str,
    num_classes: int,
    ignore_index: int | None = 255,
    ignore_nonpositive: bool = False,
    allow_missing: bool = False,
    log_fn: Callable[[str], None] | None = None,
    positive_classes: Sequence[int] = (),
    detection_min_pixels: int = 1,
) -> FolderEvaluation:
    """Evaluate a prediction folder against a ground-truth folder, pairing files by stem.

    Progress lines over the pairs go to ``log_fn`` (default: the ``seg_pipeline`` logger);
    ``positive_classes`` adds pooled and patch-detection scores (see :func:`evaluate_pairs`).

    Raises:
        EvaluationInputError: a mask has no prediction (unless ``allow_missing``) or sizes differ.
    """
    predictions, truths = _rasters(Path(pred_dir)), _rasters(Path(gt_dir))
    missing = sorted(set(truths) - set(predictions))
    if missing and not allow_missing:
        raise EvaluationInputError(
            f"{len(missing)} ground-truth masks have no prediction in {pred_dir} (e.g. {missing[:5]}); "
            "predict them or pass allow_missing"
        )
    pairs = [(predictions[s], truths[s]) for s in sorted(set(truths) & set(predictions))]
    progress = ItemProgress(f"evaluate {Path(pred_dir).name}", len(pairs), unit="files", log_fn=log_fn)
    evaluation = evaluate_pairs(
        pairs, num_classes, ignore_index, ignore_nonpositive, missing, progress,
        positive_classes=positive_classes, detection_min_pixels=detection_min_pixels,
    )  # fmt: skip
    progress.done()
    return evaluation


def comparison_rows(
    results: Mapping[str, SegmentationMetrics], class_names: Sequence[str]
) -> list[dict[str, Any]]:
    """One row per model: scalar metrics and per-class IoU."""
    rows = []
    for name, metrics in results.items():
        row: dict[str, Any] = {"model": name}
        row.update({k: round(float(getattr(metrics, k)), 4) for k in SCALARS})
        row.update({f"iou/{c}": round(float(v), 4) for c, v in zip(class_names, metrics.iou, strict=True)})
        rows.append(row)
    return rows


def per_class_deltas(
    results: Mapping[str, SegmentationMetrics], class_names: Sequence[str], ensemble: str, baseline: str
) -> list[dict[str, Any]]:
    """Per-class IoU of ``ensemble`` minus ``baseline`` (e.g. the best single model)."""
    a, b = results[ensemble], results[baseline]
    return [
        {
            "class": c,
            baseline: round(float(y), 4),
            ensemble: round(float(x), 4),
            "delta": round(float(x - y), 4),
        }
        for c, x, y in zip(class_names, a.iou, b.iou, strict=True)
    ]


def write_confusion_csv(path: Path, matrix: np.ndarray, class_names: Sequence[str]) -> Path:
    """Rows = ground truth, columns = prediction, with class names as headers."""
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["truth \\ prediction", *class_names])
        for name, row in zip(class_names, matrix.tolist(), strict=True):
            writer.writerow([name, *row])
    return path


def _markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    body = "".join("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |\n" for row in rows)
    return head + body


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if not np.isfinite(value) else f"{value:.4f}"
    return str(value)


def _report_tables(
    rows: Sequence[Mapping[str, Any]], deltas: Sequence[Mapping[str, Any]], class_names: Sequence[str]
) -> list[tuple[str, Sequence[Mapping[str, Any]], list[str]]]:
    """(heading, rows, columns) of each table of the report, for the markdown and the HTML page alike."""
    tables: list[tuple[str, Sequence[Mapping[str, Any]], list[str]]] = [
        ("Single models vs ensemble", rows, ["model", *SCALARS]),
        ("Per-class IoU", rows, ["model", *[f"iou/{c}" for c in class_names]]),
    ]
    if deltas:
        baseline = [k for k in deltas[0] if k not in ("class", "delta")]
        tables.append(("Per-class delta (ensemble - best single)", deltas, ["class", *baseline, "delta"]))
    return tables


def write_markdown_report(
    path: Path,
    *,
    title: str,
    rows: Sequence[Mapping[str, Any]],
    deltas: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    images: Mapping[str, str],
    notes: Sequence[str] = (),
) -> Path:
    """The human-readable report: comparison table, per-class deltas, pictures, notes."""
    parts = [f"# {title}\n"]
    for heading, table_rows, columns in _report_tables(rows, deltas, class_names):
        parts += [f"\n## {heading}\n\n", _markdown_table(table_rows, columns)]
    for caption, relative in images.items():
        parts.append(f"\n## {caption}\n\n![{caption}]({relative})\n")
    if notes:
        parts.append("\n## Notes\n\n" + "".join(f"- {n}\n" for n in notes))
    with atomic_write(path) as tmp:
        tmp.write_text("".join(parts))
    return path


def _html_text(text: str) -> str:
    """Escaped text with the notes' `code` spans as <code>."""
    pieces = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(pieces))


def _html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    cells = ("".join(f"<td>{html.escape(_fmt(row.get(c)))}</td>" for c in columns) for row in rows)
    body = "".join(f"<tr>{row}</tr>" for row in cells)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_HTML_STYLE = (
    "body{font-family:sans-serif;margin:1.5em;max-width:70em}table{border-collapse:collapse;margin:.5em 0}"
    "th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}th:first-child,td:first-child"
    "{text-align:left}img{max-width:100%;border:1px solid #ddd}code{background:#f3f3f3;padding:0 .2em}"
)


def write_html_report(
    path: Path,
    *,
    title: str,
    rows: Sequence[Mapping[str, Any]],
    deltas: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    images: Mapping[str, str],
    notes: Sequence[str] = (),
) -> Path:
    """The report as one self-contained HTML page, pictures inlined as data URIs.

    MLflow's artefact viewer renders an HTML file in place but not a markdown file's relative
    images; this page shows the same tables, pictures and notes as ``report.md`` with no other file.
    """
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"]
    parts.append(f"<style>{_HTML_STYLE}</style></head><body><h1>{html.escape(title)}</h1>")
    for heading, table_rows, columns in _report_tables(rows, deltas, class_names):
        parts += [f"<h2>{html.escape(heading)}</h2>", _html_table(table_rows, columns)]
    for caption, relative in images.items():
        picture = path.parent / relative
        mime = "image/jpeg" if picture.suffix.lower() in (".jpg", ".jpeg") else "image/png"
        encoded = base64.b64encode(picture.read_bytes()).decode("ascii")
        parts.append(
            f"<h2>{html.escape(caption)}</h2><img alt='{html.escape(caption)}' "
            f"src='data:{mime};base64,{encoded}'>"
        )
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_html_text(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>\n")
    with atomic_write(path) as tmp:
        tmp.write_text("".join(parts))
    return path


def strict_json(value: Any) -> Any:
    """``value`` with NaN and infinities as ``None``: JSON that jq and JavaScript read (a NaN score is
    a class absent from truth and prediction, or excluded from scoring).
    """
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(item) for item in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(path: Path, payload: Any) -> Path:
    """JSON next to the report (machine-readable metrics; NaN written as null)."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(strict_json(payload), indent=2, allow_nan=False) + "\n")
    return path
