"""Tests for item progress lines (F31): ItemProgress rules, and lines from every long step."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from seg_pipeline.contracts import EnsembleMember, PredictionItem, PredictionSet
from seg_pipeline.data.headers import build_headers
from seg_pipeline.data.normalization import BandStats
from seg_pipeline.data.shards import write_shards
from seg_pipeline.data.spec import DatasetSpec
from seg_pipeline.data.splits import assign_splits
from seg_pipeline.inference.predict import LoadedModel, predict_files
from seg_pipeline.inference.tta import TTAConfig
from seg_pipeline.progress import ItemProgress, format_duration
from seg_pipeline.settings import EvaluationSettings, PredictSettings, ShardSettings, SplitSettings
from seg_pipeline.training import progress as training_progress
from seg_pipeline.workflows.report import build_report

MakeDataset = Callable[..., Path]
WriteRaster = Callable[..., Path]

#: ``label: n/N unit (p%) | r unit/s | elapsed .. | eta ..`` (optionally `` | detail``).
LINE = re.compile(
    r"^(?P<label>.+): (?P<n>\d+)/(?P<total>\d+) (?P<unit>\w+) \((?P<pct>\d+)%\) \| "
    r"(?P<rate>[\d.]+) (?P=unit)/s \| elapsed \S+ \| eta \S+( \| .+)?$"
)
#: ``label: n/N unit in 9s (13.1 unit/s)`` (optionally `` | detail``).
CLOSING = re.compile(
    r"^(?P<label>.+): (?P<n>\d+)/(?P<total>\d+) (?P<unit>\w+) in \S+ \([\d.]+ (?P=unit)/s\)( \| .+)?$"
)


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _progress(
    total: int, every_n: int | None = None, min_interval_s: float = 5.0, delay_s: float = 0.0
) -> tuple[ItemProgress, list[str], FakeClock]:
    lines: list[str] = []
    clock = FakeClock()
    progress = ItemProgress(
        "headers demo",
        total,
        unit="tiles",
        log_fn=lines.append,
        every_n=every_n,
        min_interval_s=min_interval_s,
        delay_s=delay_s,
        clock=clock,
    )
    return progress, lines, clock


# --------------------------------------------------------------------------- ItemProgress


def test_line_has_count_percent_rate_elapsed_and_eta() -> None:
    progress, lines, clock = _progress(120, every_n=40)
    clock.now += 3.25
    assert progress.advance(39) is None
    line = progress.advance(1)
    assert line == "headers demo: 40/120 tiles (33%) | 12.3 tiles/s | elapsed 3s | eta 6s"
    assert lines == [line]


def test_closing_line_has_count_duration_and_rate() -> None:
    progress, lines, clock = _progress(120)
    clock.now += 9.15
    progress.advance(120)
    closing = progress.done()
    assert closing == "headers demo: 120/120 tiles in 9s (13.1 tiles/s)"
    assert lines[-1] == closing
    assert progress.done("reused 3 unchanged").endswith(" | reused 3 unchanged")


def test_default_every_n_is_about_ten_percent() -> None:
    progress, lines, clock = _progress(95)
    assert progress.every_n == 10
    for _ in range(95):
        clock.now += 0.01  # far below min_interval_s
        progress.advance()
    counts = [int(LINE.match(line)["n"]) for line in lines]  # type: ignore[index]
    assert counts == [10, 20, 30, 40, 50, 60, 70, 80, 90]  # the last item is the closing line's
    progress.done()
    assert CLOSING.match(lines[-1])["n"] == "95"  # type: ignore[index]
    assert ItemProgress("x", 3, log_fn=lambda _: None).every_n == 1


def test_every_n_counts_boundaries_crossed_by_big_advances() -> None:
    progress, lines, _ = _progress(100, every_n=10, min_interval_s=1e9)
    assert progress.advance(7) is None
    assert progress.advance(7) is not None  # 14 crossed 10
    assert progress.advance(5) is None  # 19: no boundary
    assert progress.advance(1) is not None  # 20
    assert len(lines) == 2


def test_min_interval_makes_a_line_due_between_every_n() -> None:
    progress, lines, clock = _progress(1000, every_n=500, min_interval_s=5.0)
    clock.now += 4.9
    assert progress.advance() is None
    clock.now += 0.2  # 5.1 s since start (no line yet)
    assert progress.advance(detail="a.tif") is not None
    assert lines[-1].startswith("headers demo: 2/1000 tiles (0%) | ")
    assert lines[-1].endswith(" | a.tif")
    clock.now += 4.0  # only 4 s since that line
    assert progress.advance() is None
    clock.now += 1.0
    assert progress.advance() is not None
    assert len(lines) == 2


def test_last_item_is_reported_once_by_the_closing_line() -> None:
    progress, lines, clock = _progress(7, every_n=1, min_interval_s=1e9)
    for _ in range(6):
        progress.advance()
    clock.now += 10.0
    assert progress.advance() is None  # the 7th: no "100%" line, even with min_interval_s passed
    assert progress.done() == "headers demo: 7/7 tiles in 10s (0.7 tiles/s)"
    assert [int(LINE.match(line)["n"]) for line in lines[:-1]] == [1, 2, 3, 4, 5, 6]  # type: ignore[index]
    assert len(lines) == 7  # six progress lines, then one closing line: no 100% line next to it


def test_unknown_pace_shows_a_question_mark_for_the_eta() -> None:
    progress, _, _ = _progress(10, every_n=1)
    assert progress.advance() == "headers demo: 1/10 tiles (10%) | 0.0 tiles/s | elapsed 0s | eta ?"


def test_zero_total_does_not_divide_by_zero() -> None:
    progress, lines, clock = _progress(0)
    assert progress.every_n == 1
    assert progress.eta() == 0.0 and progress.rate() == 0.0
    assert progress.format_line() == "headers demo: 0/0 tiles (100%) | 0.0 tiles/s | elapsed 0s | eta 0s"
    clock.now += 1.0
    assert progress.done() == "headers demo: 0/0 tiles in 1s (0.0 tiles/s)"
    assert lines == ["headers demo: 0/0 tiles in 1s (0.0 tiles/s)"]


def test_delay_keeps_quick_steps_silent() -> None:
    progress, lines, clock = _progress(4, every_n=1, delay_s=5.0)
    for _ in range(4):
        clock.now += 0.5
        assert progress.advance() is None
    assert progress.done().startswith("headers demo: 4/4 tiles in 2s")
    assert lines == []
    slow, slow_lines, slow_clock = _progress(4, every_n=1, delay_s=5.0)
    slow_clock.now += 6.0
    slow.advance()
    slow.done()
    assert len(slow_lines) == 2


def test_rejects_bad_every_n_and_logs_to_the_package_logger_by_default(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(ValueError, match="every_n"):
        ItemProgress("x", 3, every_n=0)
    with caplog.at_level(logging.INFO, logger="seg_pipeline"):
        ItemProgress("x", 2, unit="files").advance()
    assert [(r.name, r.levelno) for r in caplog.records] == [("seg_pipeline", logging.INFO)]
    assert caplog.records[0].getMessage().startswith("x: 1/2 files (50%)")


def test_format_duration_is_shared_with_training() -> None:
    assert training_progress.format_duration is format_duration
    assert format_duration(62) == "1m02s"


# --------------------------------------------------------------------------- long steps


def _assert_progress(lines: list[str], label: str, unit: str, total: int) -> None:
    """Progress lines for ``label`` below ``total``, in order, then the closing line at ``total``."""
    assert len(lines) >= 2, f"too few progress lines for {label}: {lines}"
    *steps, closing = lines
    for line in steps:
        match = LINE.match(line)
        assert match and match["label"] == label and match["unit"] == unit, line
    counts = [int(LINE.match(line)["n"]) for line in steps]  # type: ignore[index]
    assert counts == sorted(counts) and counts[-1] < total
    match = CLOSING.match(closing)
    assert match, closing
    assert (match["label"], match["unit"], int(match["n"]), int(match["total"])) == (
        label,
        unit,
        total,
        total,
    )


def test_build_headers_and_write_shards_log_progress(tmp_path: Path, make_dataset: MakeDataset) -> None:
    root = make_dataset(tmp_path / "raw", rows=2, cols=3)
    header_lines: list[str] = []
    result = build_headers(DatasetSpec(dataset_id="demo", root=root), workers=1, log_fn=header_lines.append)
    _assert_progress(header_lines, "headers demo", "tiles", 6)
    assert len(header_lines) == 6  # tiles 1-5 (each is 10% or more), then the closing line

    again: list[str] = []
    build_headers(
        DatasetSpec(dataset_id="demo", root=root),
        previous_catalog=_catalog(tmp_path, result),
        log_fn=again.append,
    )
    assert len(again) == 1
    assert re.fullmatch(r"headers demo: 0/0 tiles in \d+s \(0\.0 tiles/s\) \| reused 6 unchanged", again[0])

    splits = assign_splits(result.catalog, SplitSettings(policy="v0", seed=1))
    config = ShardSettings(max_items_per_shard=2)
    shard_lines: list[str] = []
    manifest = write_shards(result.catalog, splits, tmp_path / "demo", config, log_fn=shard_lines.append)
    n_shards = manifest["stats"]["shards_written"]
    _assert_progress(shard_lines, "shards demo", "tiles", 6)
    assert re.search(r"\| \w+/shard-\d{5}$", shard_lines[0]), shard_lines[0]
    assert shard_lines[-1].endswith(f" | {n_shards} written, 0 unchanged shards")
    rerun: list[str] = []
    write_shards(result.catalog, splits, tmp_path / "demo", config, log_fn=rerun.append)
    _assert_progress(rerun, "shards demo", "tiles", 6)
    assert rerun[-1].endswith(f" | 0 written, {n_shards} unchanged shards")
    assert all(" unchanged" in line for line in rerun[:-1])


def _catalog(tmp_path: Path, result: object) -> Path:
    from seg_pipeline.data.headers import write_catalog

    path = tmp_path / "headers.parquet"
    write_catalog(result.catalog, path, result.class_names)  # type: ignore[attr-defined]
    return path


def _pointwise_model(classes: int) -> nn.Module:
    conv = nn.Conv2d(3, classes, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(0)))
    return conv.eval()


def test_predict_files_and_build_report_log_progress(tmp_path: Path, write_tif: WriteRaster) -> None:
    rng = np.random.default_rng(0)
    classes = ("a", "b", "c")
    items = []
    for i in range(3):
        item_id = f"t{i}"
        image = write_tif(
            tmp_path / "in" / f"{item_id}.tif", rng.integers(1, 255, (3, 40, 40), dtype=np.uint8)
        )
        mask = write_tif(tmp_path / "gt" / f"{item_id}.tif", rng.integers(0, 3, (40, 40), dtype=np.uint8))
        items.append({"item_id": item_id, "input": str(image), "target": str(mask)})
    stats = BandStats((127.0, 127.0, 127.0), (50.0, 50.0, 50.0))
    models = [LoadedModel(f"m{i}", _pointwise_model(3), classes, stats, "test") for i in range(2)]
    inputs = [(item["item_id"], Path(item["input"])) for item in items]
    settings = PredictSettings.parse(
        {
            "tta": {"scales": [1.0], "flips": ["none"]},
            "windows": {"window": 32, "overlap": 8},
            "color_png": False,
        }
    )

    predict_lines: list[str] = []
    out_dirs = {"m0": tmp_path / "m0", "ensemble": tmp_path / "ensemble"}
    result = predict_files(models, inputs, out_dirs, settings, log_fn=predict_lines.append)
    # first what the forward passes run in and why, then the progress lines
    precision, *predict_lines = predict_lines
    assert precision == f"inference precision: {result.precision}" and precision.startswith(
        "inference precision: cpu "
    )
    assert [line for line in predict_lines if " windows " in line] == []  # small rasters: no window lines
    _assert_progress(predict_lines, "predict ensemble of 2", "files", 3)
    assert predict_lines[0].endswith(" | t0")
    single_lines: list[str] = []
    predict_files(models[:1], inputs, {"ensemble": tmp_path / "single"}, settings, log_fn=single_lines.append)
    _assert_progress(single_lines[1:], "predict m0", "files", 3)

    predictions = PredictionSet(
        split="test",
        out_root=str(tmp_path),
        sets={name: str(folder) for name, folder in out_dirs.items()},
        items=[PredictionItem(**item) for item in items],
        members=[EnsembleMember(name=m.name, checkpoint="none") for m in models],
        candidate="m0",
        class_names=list(classes),
        ignore_index=255,
        views_per_input=result.views_per_input,
        settings=settings,
    )
    report_lines: list[str] = []
    build_report(EvaluationSettings(overlays=0), predictions, tmp_path / "report", log_fn=report_lines.append)
    _assert_progress(report_lines, "evaluate test", "files", 6)
    assert report_lines[-1].endswith(" | 2 prediction sets")


def test_large_rasters_log_window_progress(tmp_path: Path, write_tif: WriteRaster) -> None:
    from seg_pipeline.inference.ensemble import EnsemblePredictor
    from seg_pipeline.inference.tiling import predict_raster

    src = write_tif(
        tmp_path / "big.tif", np.random.default_rng(1).integers(1, 255, (3, 64, 64), dtype=np.uint8)
    )
    lines: list[str] = []
    summary = predict_raster(
        src,
        tmp_path / "out.tif",
        EnsemblePredictor([_pointwise_model(2)], TTAConfig(scales=(1.0,), flips=("none",))),
        num_classes=2,
        window=16,
        overlap=0,
        batch_size=4,
        log_fn=lines.append,
        progress_delay_s=0.0,
    )
    assert summary["num_windows"] == 16
    _assert_progress(lines, "predict big.tif", "windows", 16)
    assert lines[0].endswith(" | strip 1/4")
