"""Folder evaluation and the markdown report, on real rasters with hand-computed expectations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from seg_pipeline.data.raster_io import write_geotiff
from seg_pipeline.evaluation.report import (
    EvaluationInputError,
    comparison_rows,
    evaluate_folders,
    per_class_deltas,
    write_confusion_csv,
    write_html_report,
    write_markdown_report,
)


def _write(folder: Path, name: str, array: list[list[int]]) -> None:
    write_geotiff(
        folder / f"{name}.tif",
        np.asarray(array, dtype=np.uint8),
        crs="EPSG:32633",
        transform=(1, 0, 0, 0, -1, 0),
    )


@pytest.fixture()
def folders(tmp_path: Path) -> tuple[Path, Path]:
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    _write(gt, "a", [[0, 0], [1, 1]])
    _write(pred, "a", [[0, 1], [1, 1]])
    _write(gt, "b", [[1, 255], [0, 0]])
    _write(pred, "b", [[1, 0], [255, 0]])  # 255 in a prediction = input nodata: not scored
    return pred, gt


def test_folder_evaluation_matches_hand_counts(folders: tuple[Path, Path]) -> None:
    pred, gt = folders
    ev = evaluate_folders(pred, gt, num_classes=2, ignore_index=255)
    # Scored (truth, pred): a -> (0,0) (0,1) (1,1) (1,1); b -> (1,1) (0,0); b also has one ignored truth.
    assert ev.matrix.matrix.tolist() == [[2, 1], [0, 3]]
    assert ev.unpredicted_pixels == 1  # the 255 in b.tif (its truth, 0, is therefore not scored)
    assert ev.metrics.iou.tolist() == pytest.approx([2 / 3, 3 / 4])
    assert ev.metrics.pixel_accuracy == pytest.approx(5 / 6)


def test_missing_prediction_and_size_mismatch_are_reported_by_name(folders: tuple[Path, Path]) -> None:
    pred, gt = folders
    (pred / "b.tif").unlink()
    with pytest.raises(EvaluationInputError, match=r"1 ground-truth masks have no prediction.*\['b'\]"):
        evaluate_folders(pred, gt, num_classes=2)
    assert evaluate_folders(pred, gt, num_classes=2, allow_missing=True).missing_predictions == ["b"]
    _write(pred, "b", [[1, 0, 0]])
    with pytest.raises(EvaluationInputError, match=r"b\.tif is"):
        evaluate_folders(pred, gt, num_classes=2)


def test_report_tables_and_files(folders: tuple[Path, Path], tmp_path: Path) -> None:
    pred, gt = folders
    metrics = evaluate_folders(pred, gt, num_classes=2).metrics
    results = {"single": metrics, "ensemble": metrics}
    rows = comparison_rows(results, ["soil", "water"])
    assert rows[0]["model"] == "single" and rows[0]["iou/water"] == pytest.approx(0.75)
    deltas = per_class_deltas(results, ["soil", "water"], "ensemble", "single")
    assert [d["delta"] for d in deltas] == [0.0, 0.0]
    csv_path = write_confusion_csv(tmp_path / "cm.csv", np.array([[2, 1], [0, 3]]), ["soil", "water"])
    assert csv_path.read_text().splitlines()[1] == "soil,2,1"
    report = write_markdown_report(
        tmp_path / "r.md",
        title="T",
        rows=rows,
        deltas=deltas,
        class_names=["soil", "water"],
        images={"cm": "cm.png"},
    )
    text = report.read_text()
    assert "| single |" in text and "![cm](cm.png)" in text and "delta" in text


def test_html_report_is_one_file_with_the_pictures_inlined(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    """MLflow's artefact viewer renders HTML but not a markdown file's relative images."""
    import base64
    import html.parser

    pred, gt = folders
    metrics = evaluate_folders(pred, gt, num_classes=2).metrics
    rows = comparison_rows({"single": metrics, "ensemble": metrics}, ["soil", "water"])
    picture = b"\x89PNG\r\n\x1a\n-not-really-a-png"
    (tmp_path / "cm.png").write_bytes(picture)
    page = write_html_report(
        tmp_path / "r.html", title="T <&>", rows=rows, deltas=[], class_names=["soil", "water"],
        images={"cm": "cm.png"}, notes=["best single model: `single` <b>"],
    )  # fmt: skip
    text = page.read_text()

    class Collect(html.parser.HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.cells: list[str] = []
            self.sources: list[str] = []

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            if tag == "img":
                self.sources.append(dict(attrs)["src"] or "")

        def handle_data(self, data: str) -> None:
            self.cells.append(data)

    parsed = Collect()
    parsed.feed(text)
    (source,) = parsed.sources
    assert source == "data:image/png;base64," + base64.b64encode(picture).decode()
    assert "0.7500" in parsed.cells  # the water IoU, as in the markdown table
    assert "T <&>" in parsed.cells and "<b>" not in text  # text is escaped, never markup
    assert "<code>single</code>" in text
