"""``seg-pipeline predict``, ``evaluate`` and ``summary`` run the way a user runs them: a subprocess.

Each section reads as a recipe: one fixture holds the command lines a user would type (run once,
side by side, since every ``seg-pipeline`` process pays for its imports), and each test says what
one of them left on disk and printed. The checkpoint is a real one-step Unet-mobilenet_v2 training
stage, trained once; the rasters are two tiny GeoTIFFs and a PNG.
"""

from __future__ import annotations

import ast
import csv
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import Affine

from seg_pipeline.contracts import AuxiliarySet, ShardSet
from seg_pipeline.data.synthetic import SyntheticSpec
from seg_pipeline.settings import PretrainSettings, SplitSettings
from seg_pipeline.workflows.train import StageRun, pretrain
from seg_pipeline_tests.conftest import TEST_CRS, ingest_synthetic, scratch_dir, tiny_stage, write_raster

Done = subprocess.CompletedProcess[str]

#: The PNG input and its class map have no CRS on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


def cli(*args: str, env: Mapping[str, str] | None = None) -> Done:
    return subprocess.run(
        [sys.executable, "-m", "seg_pipeline.cli", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=None if env is None else {**os.environ, **env},
    )


def cli_side_by_side(
    commands: Mapping[str, Sequence[str]], env: Mapping[str, str] | None = None
) -> dict[str, Done]:
    """Independent invocations by name, two at a time (each its own ``seg-pipeline`` process, on
    one thread, so that two of them share two cores without oversubscribing them)."""
    env = {"OMP_NUM_THREADS": "1", **(env or {})}
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = pool.map(lambda args: cli(*args, env=env), commands.values())
        return dict(zip(commands, done, strict=True))


def error_line(done: Done) -> str:
    """The one stderr line of a refused command (exit code 2, no traceback)."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    return line


def succeeded(done: Done) -> Done:
    assert done.returncode == 0, done.stderr
    return done


# --------------------------------------------------------------------------------------- predict

#: Fast prediction: 32 px windows and one scale on the CPU; each run adds its ``--flips``.
FAST = ("--window", "32", "--overlap", "8", "--scales", "1.0", "--device", "cpu")

#: Input scenes: name -> (height, width, CRS, transform); odd sizes, a few windows each.
SCENES = {
    "north": (36, 44, TEST_CRS, Affine(0.5, 0.0, 500_000.0, 0.0, -0.5, 5_000_020.0)),
    "lakes": (30, 37, "EPSG:4326", Affine(0.0001, 0.0, 32.5, 0.0, -0.0001, 0.3)),
}
PHOTO = "photo"  # a PNG smaller than a window: no CRS, its class map is a plain GeoTIFF
PHOTO_SIZE = (20, 24)


@pytest.fixture(scope="module")
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.pt of a one-step Unet-mobilenet_v2 stage (encoder_weights None) on 32x32 synthetic shards."""
    root = scratch_dir(request, tmp_path_factory, "cli_stage")
    split = SplitSettings(policy="supervised", train_fraction=0.5, val_fraction=0.5, test_fraction=0.0)
    target = ingest_synthetic(
        root, "demo", SyntheticSpec(grid_rows=2, grid_cols=3, tile_size=32), seed=3, split=split
    )
    settings = PretrainSettings.parse(
        tiny_stage(model={"encoder_weights": None}, loop={"max_steps_per_epoch": 1})
    )
    trained = pretrain(settings, target, AuxiliarySet(data_version="none"), StageRun(root / "ckpt"))
    return Path(trained.checkpoint)


@pytest.fixture(scope="module")
def num_classes(checkpoint: Path) -> int:
    from seg_pipeline.models.loading import checkpoint_info

    return len(checkpoint_info(checkpoint).class_names)


@pytest.fixture(scope="module")
def scenes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of two small 3-band GeoTIFFs (in two CRSs) and a PNG, as a user would have them."""
    folder = scratch_dir(request, tmp_path_factory, "scenes")
    rng = np.random.default_rng(0)
    for name, (height, width, crs, transform) in SCENES.items():
        pixels = rng.integers(0, 256, (3, height, width), dtype=np.uint8)
        write_raster(folder / f"{name}.tif", pixels, crs=crs, transform=transform)
    write_raster(
        folder / f"{PHOTO}.png", rng.integers(0, 256, (3, *PHOTO_SIZE), dtype=np.uint8), driver="PNG"
    )
    return folder


class Predictions:
    """The ``predict`` runs of this module and the folders they were given."""

    def __init__(self, root: Path, checkpoint: Path, scenes: Path) -> None:
        self.scenes = scenes
        self.single, self.ensemble = root / "single", root / "ensemble"
        self.empty, self.missing = root / "empty", root / "never_trained" / "best.pt"
        self.empty.mkdir()
        (self.empty / "notes.txt").write_text("no rasters here")
        self.inputs_before = {p.name: p.read_bytes() for p in scenes.iterdir()}
        model, inputs = ("--model", str(checkpoint)), ("--input", str(scenes))
        self.runs = cli_side_by_side(
            {
                # One model, two flips (2 views), a colour PNG beside each class map (the default).
                "single": ("predict", *model, *inputs, "--output", str(self.single), *FAST,
                           "--flips", "none", "h"),
                # An ensemble: --model twice; probabilities too, no previews.
                "ensemble": ("predict", *model, *model, *inputs, "--output", str(self.ensemble), *FAST,
                             "--flips", "none", "--probabilities", "--no-preview"),
                # Refused: a folder without rasters, a checkpoint that is not there, and an output
                # folder that is the input folder (lakes.tif would be replaced by its class map).
                "no rasters": ("predict", *model, "--input", str(self.empty), "--output", str(root / "o1")),
                "no checkpoint": ("predict", "--model", str(self.missing), *inputs,
                                  "--output", str(root / "o2")),
                "into inputs": ("predict", *model, *inputs, "--output", str(scenes)),
            }
        )  # fmt: skip
        self.refused_outputs = (root / "o1", root / "o2")


@pytest.fixture(scope="module")
def predicted(
    request: pytest.FixtureRequest, checkpoint: Path, scenes: Path, tmp_path_factory: pytest.TempPathFactory
) -> Predictions:
    return Predictions(scratch_dir(request, tmp_path_factory, "predicted"), checkpoint, scenes)


def test_predict_writes_a_class_map_on_each_inputs_grid(predicted: Predictions, num_classes: int) -> None:
    succeeded(predicted.runs["single"])
    succeeded(predicted.runs["ensemble"])
    for out in (predicted.single, predicted.ensemble):
        for name, (height, width, crs, transform) in SCENES.items():
            with rasterio.open(out / f"{name}.tif") as src:
                assert (src.count, src.height, src.width) == (1, height, width)
                assert src.crs == CRS.from_user_input(crs)
                assert src.transform.almost_equals(transform)
                classes = src.read(1)
            assert classes.min() >= 0 and classes.max() <= num_classes - 1, np.unique(classes)
        with rasterio.open(out / f"{PHOTO}.tif") as src:  # the PNG's class map: its size, no CRS
            assert (src.count, src.height, src.width) == (1, *PHOTO_SIZE) and src.crs is None
            assert src.read(1).max() <= num_classes - 1


def test_predict_says_how_many_rasters_models_and_views(predicted: Predictions) -> None:
    rasters = len(SCENES) + 1
    (line,) = succeeded(predicted.runs["single"]).stdout.strip().splitlines()
    assert line.startswith(f"predicted {rasters} rasters with 1 model(s) x 2 views in ")
    assert line.endswith(f"-> {predicted.single}")
    (line,) = succeeded(predicted.runs["ensemble"]).stdout.strip().splitlines()
    assert line.startswith(f"predicted {rasters} rasters with 2 model(s) x 1 views in ")


def test_predict_writes_a_colour_preview_unless_told_not_to(predicted: Predictions) -> None:
    for name in [*SCENES, PHOTO]:
        with rasterio.open(predicted.single / f"{name}.png") as png:
            assert png.count >= 3  # a colour picture (with a legend), not a class map
        assert not (predicted.ensemble / f"{name}.png").exists()  # --no-preview


def test_predict_writes_probabilities_only_when_asked(predicted: Predictions, num_classes: int) -> None:
    assert not list(predicted.single.glob("*.probs.tif"))
    for name, (height, width, _, transform) in SCENES.items():
        with rasterio.open(predicted.ensemble / f"{name}.probs.tif") as src:
            assert (src.count, src.height, src.width) == (num_classes, height, width)
            assert src.transform.almost_equals(transform)
            probabilities = src.read().astype(np.float64)
        assert np.allclose(probabilities.sum(axis=0), 1.0, atol=1e-2)
        with rasterio.open(predicted.ensemble / f"{name}.tif") as src:  # the class map is their argmax
            agree = src.read(1) == probabilities.argmax(axis=0)
        assert agree.mean() > 0.99


def test_predict_says_per_raster_whether_it_holds_the_positive_classes(
    predicted: Predictions, num_classes: int
) -> None:
    """Seed 003's detection from segmentation: any positive pixel, their share, the top probability."""
    positive = list(range(1, num_classes))  # the dataset named none: every class after background
    rows = {row["item_id"]: row for row in csv.DictReader((predicted.ensemble / "detections.csv").open())}
    assert set(rows) == {*SCENES, PHOTO}
    for name in SCENES:
        with rasterio.open(predicted.ensemble / f"{name}.tif") as src:
            classes = src.read(1)
        with rasterio.open(predicted.ensemble / f"{name}.probs.tif") as src:
            probabilities = src.read().astype(np.float64)
        row = rows[name]
        assert int(row["positive_pixels"]) == int(np.isin(classes, positive).sum())
        assert int(row["valid_pixels"]) == classes.size
        assert row["has_positive"] == str(int(row["positive_pixels"]) > 0)
        assert float(row["positive_fraction"]) == pytest.approx(int(row["positive_pixels"]) / classes.size)
        top = probabilities[positive].max()
        assert float(row["max_positive_probability"]) == pytest.approx(top, abs=1 / 255)


def test_predict_refuses_bad_input_in_one_line_naming_the_path(predicted: Predictions) -> None:
    line = error_line(predicted.runs["no rasters"])
    assert line.startswith("seg-pipeline predict: error:")
    assert str(predicted.empty) in line and "no raster files" in line
    line = error_line(predicted.runs["no checkpoint"])
    assert line.startswith("seg-pipeline predict: error:")
    assert str(predicted.missing) in line and "does not exist" in line
    assert not any(folder.exists() for folder in predicted.refused_outputs)  # refused before any output


def test_predict_never_writes_into_its_input_folder(predicted: Predictions) -> None:
    line = error_line(predicted.runs["into inputs"])
    assert f"output {(predicted.scenes / 'lakes.tif').resolve()} would overwrite its input" in line
    assert "choose an output folder other than the input" in line
    after = {p.name: p.read_bytes() for p in predicted.scenes.iterdir()}
    assert after == predicted.inputs_before  # inputs untouched, nothing added


# -------------------------------------------------------------------------------------- evaluate

CLASSES = ("background", "building", "water")

# Two tiles of predictions and ground truth; one confusion matrix is pooled over both.
TRUTH = {
    "a": [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [2, 2, 2, 2]],
    "b": [[1, 2], [1, 2]],
}
PRED = {
    "a": [[0, 1, 1, 1], [0, 0, 1, 1], [2, 2, 0, 2], [2, 2, 2, 2]],
    "b": [[1, 2], [2, 2]],
}
# Rows ground truth, columns prediction, counted by hand from the arrays above.
CONFUSION = [
    [3, 1, 0],  # background: 3 right, 1 called building (a[0][1])
    [0, 5, 1],  # building: 5 right, 1 called water (b[1][0])
    [1, 0, 9],  # water: 9 right, 1 called background (a[2][2])
]
# IoU = tp / (tp + fp + fn) per class, from the matrix: row and column sums minus the diagonal.
IOU = {"background": 3 / (3 + 1 + 1), "building": 5 / (5 + 1 + 1), "water": 9 / (9 + 1 + 1)}


def write_scored(folder: Path) -> tuple[Path, Path, Path]:
    """``pred/``, ``truth/`` (one-band uint8 GeoTIFFs paired by file stem) and ``classes.txt``."""
    for name in TRUTH:
        write_raster(folder / "pred" / f"{name}.tif", np.array(PRED[name], np.uint8))
        write_raster(folder / "truth" / f"{name}.tif", np.array(TRUTH[name], np.uint8))
    classes = folder / "classes.txt"
    classes.write_text("".join(f"{i} {name}\n" for i, name in enumerate(CLASSES)))
    return folder / "pred", folder / "truth", classes


@pytest.fixture(scope="module")
def evaluated(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Done]]:
    """The ``evaluate`` runs of this module, and the folder holding their inputs and reports."""
    root = scratch_dir(request, tmp_path_factory, "evaluate")
    pred, truth, classes = write_scored(root / "complete")
    incomplete = root / "incomplete"
    pred_some, truth_more, _ = write_scored(incomplete)
    write_raster(truth_more / "c.tif", np.zeros((4, 4), np.uint8))  # a mask nobody predicted
    folders = ("--pred-dir", str(pred), "--gt-dir", str(truth), "--classes", str(classes))
    partial = ("--pred-dir", str(pred_some), "--gt-dir", str(truth_more), "--classes", str(classes))
    return root, cli_side_by_side(
        {
            "plain": ("evaluate", *folders, "--out", str(root / "report")),
            "seed000": ("evaluate", *folders, "--ignore-nonpositive", "--out", str(root / "seed000")),
            "missing": ("evaluate", *partial),
            "allow missing": ("evaluate", *partial, "--allow-missing", "--out", str(root / "partial")),
        }
    )


def _printed(stdout: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in stdout.splitlines()) if v}


def _confusion(path: Path) -> tuple[list[str], list[str], list[list[int]]]:
    """Header, row names and counts of a ``confusion.csv``."""
    with open(path, newline="") as fh:
        header, *rows = list(csv.reader(fh))
    return header, [row[0] for row in rows], [[int(v) for v in row[1:]] for row in rows]


def test_evaluate_writes_metrics_and_the_confusion_matrix(evaluated: tuple[Path, dict[str, Done]]) -> None:
    root, runs = evaluated
    report, done = root / "report", succeeded(runs["plain"])
    last = done.stdout.strip().splitlines()[-1]
    assert last == f"wrote {report / 'metrics.json'} and {report / 'confusion.csv'}"
    metrics = json.loads((report / "metrics.json").read_text())
    for name, iou in IOU.items():
        assert metrics[f"iou/{name}"] == pytest.approx(iou, abs=1e-4)
    assert metrics["miou"] == pytest.approx(sum(IOU.values()) / 3, abs=1e-4)
    assert metrics["pixel_accuracy"] == pytest.approx((3 + 5 + 9) / 20, abs=1e-4)
    printed = _printed(done.stdout)  # the same row is printed, one "key: value" per line
    assert float(printed["miou"]) == metrics["miou"] and printed["model"] == "predictions"

    header, names, counts = _confusion(report / "confusion.csv")
    assert header == ["truth \\ prediction", *CLASSES] and names == list(CLASSES)
    assert counts == CONFUSION


def test_ignore_nonpositive_leaves_labels_at_or_below_zero_unscored(
    evaluated: tuple[Path, dict[str, Done]],
) -> None:
    root, runs = evaluated
    succeeded(runs["seed000"])
    metrics = json.loads((root / "seed000" / "metrics.json").read_text())
    # The background row of CONFUSION is dropped; a background *prediction* on water still misses.
    building, water = 5 / (5 + 0 + 1), 9 / (9 + 1 + 1)  # building: no fp left from background pixels
    assert metrics["iou/background"] is None  # not scored (null in strict JSON), left out of the mean
    assert metrics["iou/building"] == pytest.approx(building, abs=1e-4)
    assert metrics["iou/water"] == pytest.approx(water, abs=1e-4)
    assert metrics["miou"] == pytest.approx((building + water) / 2, abs=1e-4)
    assert metrics["pixel_accuracy"] == pytest.approx((5 + 9) / 16, abs=1e-4)
    assert _confusion(root / "seed000" / "confusion.csv")[2] == [[0, 0, 0], CONFUSION[1], CONFUSION[2]]


def test_evaluate_refuses_missing_predictions_unless_allowed(evaluated: tuple[Path, dict[str, Done]]) -> None:
    root, runs = evaluated
    line = error_line(runs["missing"])
    assert line.startswith("seg-pipeline evaluate: error: 1 ground-truth masks have no prediction")
    assert "['c']" in line and "allow_missing" in line
    succeeded(runs["allow missing"])  # scores the pairs there are: the same numbers as the full folders
    metrics = json.loads((root / "partial" / "metrics.json").read_text())
    assert metrics["miou"] == pytest.approx(sum(IOU.values()) / 3, abs=1e-4)
    assert metrics["missing_predictions"] == ["c"]  # said, not silently skipped
    assert "skipped 1 ground-truth mask(s) without a prediction: ['c']" in runs["allow missing"].stdout


def test_summary_starts_without_torch(tmp_path: Path) -> None:
    """The light commands stay light: building the whole parser (``export`` included) imports no torch."""
    command = [
        sys.executable,
        "-X",
        "importtime",
        "-m",
        "seg_pipeline.cli",
        "--data-root",
        str(tmp_path),
        "summary",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "seg_pipeline.settings" in imported and "torch" not in imported


# --------------------------------------------------------------------------------------- summary


@pytest.fixture(scope="module")
def summarised(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, ShardSet, dict[str, Done]]:
    """``summary`` of an empty data root and of one holding the processed dataset ``demo``."""
    empty, store = (
        scratch_dir(request, tmp_path_factory, "empty_root"),
        scratch_dir(request, tmp_path_factory, "store"),
    )
    shards = ingest_synthetic(store, "demo")
    (store / "models" / "pretrain").mkdir(parents=True)  # what training would leave
    # --data-root wins over $SEG_PIPELINE_DATA_ROOT (which points at a store without the dataset).
    runs = cli_side_by_side(
        {
            "empty": ("--data-root", str(empty), "summary"),
            "demo": ("--data-root", str(store), "summary", "--dataset", "demo"),
            "other": ("--data-root", str(store), "summary", "--dataset", "other"),
        },
        env={"SEG_PIPELINE_DATA_ROOT": str(empty)},
    )
    return empty, store, shards, runs


def test_summary_of_an_empty_data_root_says_there_is_nothing_yet(
    summarised: tuple[Path, Path, ShardSet, dict[str, Done]],
) -> None:
    empty, _, _, runs = summarised
    assert succeeded(runs["empty"]).stdout.splitlines() == [
        f"seg_pipeline outputs for dataset 'demo' under {empty.resolve()}:",
        "  nothing yet: run `make run`",
    ]


def test_summary_lists_the_catalog_splits_and_shards_of_a_dataset(
    summarised: tuple[Path, Path, ShardSet, dict[str, Done]],
) -> None:
    _, store, shards, runs = summarised
    processed = store / "processed" / "demo"
    header, *lines = succeeded(runs["demo"]).stdout.strip().splitlines()
    assert header == f"seg_pipeline outputs for dataset 'demo' under {store.resolve()}:"
    entries = {ln.split(":", 1)[0].strip(): ln.split(":", 1)[1].strip() for ln in lines}

    catalog = shards.catalog
    assert entries["header catalog"] == (
        f"{processed / 'headers.parquet'} ({catalog.n_tiles} tiles, {{'ok': {catalog.n_ok}}})"
    )
    splits_path, _, counts = entries["split table"].partition(" ")
    assert splits_path == str(processed / "splits.parquet")
    assert ast.literal_eval(counts) == shards.splits.counts
    n_shards = len(list(processed.glob("*/shard-*")))
    assert n_shards > 0
    assert f"({n_shards} shards, manifest {processed / 'manifest.json'})" in entries["shards"]
    assert entries["models"] == str(store / "models" / "pretrain")
    assert "nothing yet" not in runs["demo"].stdout


def test_summary_is_per_dataset(summarised: tuple[Path, Path, ShardSet, dict[str, Done]]) -> None:
    _, store, _, runs = summarised
    header, *lines = succeeded(runs["other"]).stdout.strip().splitlines()
    assert header == f"seg_pipeline outputs for dataset 'other' under {store.resolve()}:"
    assert not any(ln.strip().startswith(("header catalog", "split table", "shards")) for ln in lines)
    assert [ln.split(":", 1)[0].strip() for ln in lines] == ["models"]  # the data root's own folders
