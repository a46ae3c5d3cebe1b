"""Tiles of mixed sizes and formats train through ``train_job``: a 20 px chip, an 8 x 4000 px strip,
a JPEG photo with a PNG mask and a 2000 px GeoTIFF scene, in one dataset (they used to crash the
default collate with ``stack expects each tensor to be equal size``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio

from seg_pipeline.contracts import TrainedModel
from seg_pipeline.data.raster_io import write_geotiff
from seg_pipeline.defs.definitions import defs
from seg_pipeline_tests.conftest import tiny_stage
from seg_pipeline_tests.defs.cli_helpers import instance_for

#: name -> (height, width, format); fixed train/val folders so every kind is in train.
TILES = {
    "train": {"chip20": (20, 20, "tif"), "strip": (8, 4000, "tif"), "photo": (300, 500, "jpg"),
              "scene": (2000, 600, "tif")},
    "val": {"small": (100, 100, "tif"), "wide": (300, 700, "tif")},
}  # fmt: skip


def _write(path: Path, array: np.ndarray, fmt: str) -> None:
    if fmt == "tif":
        write_geotiff(
            path.with_suffix(".tif"), array, crs="EPSG:32636", transform=(0.5, 0, 4e5, 0, -0.5, 4e4)
        )
        return
    driver, suffix = ("JPEG", ".jpg") if array.shape[0] == 3 else ("PNG", ".png")
    profile = {"driver": driver, "width": array.shape[2], "height": array.shape[1], "count": array.shape[0]}
    with rasterio.open(path.with_suffix(suffix), "w", dtype="uint8", **profile) as dst:
        dst.write(array)


def write_mixed_dataset(raw: Path) -> None:
    """Images and 3-class masks (stripes of class 1 and 2 on background) in train/ and val/ folders."""
    rng = np.random.default_rng(0)
    for split, tiles in TILES.items():
        for name, (height, width, fmt) in tiles.items():
            (raw / split / "images").mkdir(parents=True, exist_ok=True)
            (raw / split / "masks").mkdir(parents=True, exist_ok=True)
            mask = ((np.arange(width)[None, :] // 7 + np.arange(height)[:, None] // 5) % 3).astype(np.uint8)
            image = rng.integers(0, 60, (3, height, width)).astype(np.uint8) + (mask * 80).astype(np.uint8)
            _write(raw / split / "images" / name, image, fmt)
            _write(raw / split / "masks" / name, mask[np.newaxis], "png" if fmt == "jpg" else fmt)
    (raw / "classes.txt").write_text("background\nbuilding\nroad\n")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_a_mixed_size_dataset_trains_through_train_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_mixed_dataset(tmp_path / "raw" / "mixed")
    monkeypatch.setenv("SEG_PIPELINE_DATA_ROOT", str(tmp_path))
    stage = tiny_stage(loop={"max_steps_per_epoch": None}, patches={"size": 256})
    result = defs.resolve_job_def("train_job").execute_in_process(
        run_config={
            "ops": {
                "dataset_splits": {"config": {"policy": "fixed"}},
                "auxiliary_sources": {"config": {"datasets": []}},
                "pretrained_model": {"config": stage},
                "kd_student_model": {"config": {**stage, "kd": {"warmup_epochs": 0}}},
            }
        },
        instance=instance_for("mixed"),
        partition_key="mixed",  # the dataset in data/raw/mixed
    )
    assert result.success
    headers = result.output_for_node("tile_headers")
    assert headers.n_ok == 6 and headers.n_quarantined == 0
    assert not [w for w in headers.warnings if "JPEG" in w]  # JPEG *images* are fine; only masks warn
    assert result.output_for_node("tile_shards").items == {"train": 4, "val": 2}
    # One epoch reads every patch: ceil(H * W / 256^2) per tile, at least one -> 1 + 1 + 3 + 19 = 24.
    batches = -(-24 // 4)
    for node in ("pretrained_model", "kd_student_model"):
        trained: TrainedModel = result.output_for_node(node)
        assert Path(trained.checkpoint).exists() and trained.epochs_run == 1
        assert trained.best_score is not None and 0.0 <= trained.best_score <= 1.0  # whole val tiles
        assert trained.history[-1]["train/steps"] == batches, trained.history[-1]
