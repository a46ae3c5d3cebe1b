"""``seg-pipeline`` as a user meets it: wrong input is one line on stderr with exit code 2 (the
traceback with ``--debug``), evaluation refuses what it cannot score, predictions never overwrite
their inputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from seg_pipeline.data.raster_io import write_geotiff
from seg_pipeline.inference.predict import check_outputs


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "seg_pipeline.cli", *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    labels = np.tile(np.arange(6, dtype=np.uint8), (6, 1))
    write_geotiff(pred / "a.tif", labels, nodata=255)  # classes 0..5: half of them are not in 0..2
    write_geotiff(truth / "a.tif", labels % 3)
    return pred, truth


def test_evaluate_refuses_classes_it_cannot_score_in_one_line(folders: tuple[Path, Path]) -> None:
    pred, truth = folders
    done = cli("evaluate", "--pred-dir", str(pred), "--gt-dir", str(truth), "--num-classes", "3")
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("seg-pipeline evaluate: error:") and "class values [3, 4, 5] outside 0..2" in line
    assert "a.tif" in line and "Traceback" not in done.stderr
    debug = cli("--debug", "evaluate", "--pred-dir", str(pred), "--gt-dir", str(truth), "--num-classes", "3")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_evaluate_scores_the_right_classes(folders: tuple[Path, Path]) -> None:
    pred, truth = folders
    done = cli("evaluate", "--pred-dir", str(pred), "--gt-dir", str(truth), "--num-classes", "6")
    assert done.returncode == 0, done.stderr
    accuracy = next(line for line in done.stdout.splitlines() if "pixel_accuracy" in line)
    assert float(accuracy.split(":")[1]) == pytest.approx(0.5)  # 0,1,2 right; 3,4,5 predicted as 0,1,2


def test_evaluate_refuses_multiband_ground_truth(folders: tuple[Path, Path]) -> None:
    pred, truth = folders
    write_geotiff(truth / "a.tif", np.zeros((3, 6, 6), np.uint8))
    done = cli("evaluate", "--pred-dir", str(pred), "--gt-dir", str(truth), "--num-classes", "6")
    assert done.returncode == 2 and "has 3 bands; ground truth must be one band" in done.stderr


def test_predictions_never_overwrite_inputs_or_each_other(tmp_path: Path) -> None:
    photo, raster = tmp_path / "a.png", tmp_path / "a.tif"
    with pytest.raises(ValueError, match="share the name 'a'"):
        check_outputs([("a", photo), ("a", raster)], {"ensemble": tmp_path / "out"})
    with pytest.raises(ValueError, match="would overwrite its input"):
        check_outputs([("a", raster)], {"ensemble": tmp_path})
    check_outputs([("a", raster)], {"ensemble": tmp_path / "out"})  # a separate folder is fine


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_predict_on_cuda_without_a_gpu_is_refused_before_loading_anything(tmp_path: Path) -> None:
    done = cli("predict", "--model", str(tmp_path / "never_read.pt"), "--input", str(tmp_path),
               "--output", str(tmp_path / "out"), "--device", "cuda")  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "device='cuda' but torch.cuda.is_available() is False" in line and "use device='auto'" in line
    assert not (tmp_path / "out").exists()


def test_the_data_root_defaults_to_the_environment_like_the_dagster_resources(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "SEG_PIPELINE_DATA_ROOT": str(tmp_path / "store")}
    done = subprocess.run(
        [sys.executable, "-m", "seg_pipeline.cli", "summary", "--dataset", "demo"],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"under {(tmp_path / 'store').resolve()}" in done.stdout.splitlines()[0]
    assert not (tmp_path / "data").exists()  # nothing was made where the command happened to run
