"""Tests for seg_pipeline.inference.postprocess on hand-drawn class maps with known answers.

Then the clean-up as prediction applies it: settings, strips with context (no seams), and class
maps written by ``predict_files`` through real rasterio I/O.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import segmentation_models_pytorch as smp
import torch
from affine import Affine
from scipy import ndimage
from torch import nn

from seg_pipeline.data.normalization import BandStats
from seg_pipeline.inference import tiling
from seg_pipeline.inference.postprocess import (
    Cleanup,
    ReadRows,
    WriteRows,
    clean_in_strips,
    morphological_open_close,
    remove_small_regions,
)
from seg_pipeline.inference.predict import LoadedModel, predict_files
from seg_pipeline.settings import PredictSettings, SettingsError
from seg_pipeline.settings.inference import PostprocessSettings


def field(height: int = 12, width: int = 12, value: int = 0) -> np.ndarray:
    return np.full((height, width), value, dtype=np.uint8)


# --------------------------------------------------------------------------- remove_small_regions


def test_two_pixel_island_is_removed() -> None:
    classes = field()
    classes[5, 5:7] = 1
    cleaned = remove_small_regions(classes, min_area=3)
    assert np.array_equal(cleaned, field())
    assert cleaned.dtype == np.uint8


def test_region_of_exactly_min_area_is_kept_and_input_is_untouched() -> None:
    classes = field()
    classes[5, 5:7] = 1
    original = classes.copy()
    assert np.array_equal(remove_small_regions(classes, min_area=2), classes)
    remove_small_regions(classes, min_area=3)
    assert np.array_equal(classes, original)


def test_island_takes_the_majority_of_its_border() -> None:
    # Left half class 0, right half class 2; a 1-pixel island of class 1 at column 6 touches
    # column 5 (class 0, 3 border pixels) and column 7 (class 2, 3) and column 6 (class 2, 2 pixels).
    classes = field()
    classes[:, 6:] = 2
    classes[4, 6] = 1
    cleaned = remove_small_regions(classes, min_area=2)
    expected = field()
    expected[:, 6:] = 2
    assert np.array_equal(cleaned, expected)  # 5 class-2 neighbours beat 3 class-0 neighbours


def test_connectivity_decides_what_is_one_region() -> None:
    classes = field(6, 6)
    classes[1, 1] = classes[2, 2] = classes[3, 3] = 1  # a diagonal line of 3 pixels
    assert np.array_equal(remove_small_regions(classes, min_area=3, connectivity=8), classes)
    assert np.array_equal(remove_small_regions(classes, min_area=3, connectivity=4), field(6, 6))


def test_nested_small_regions_are_resolved_from_the_outside_in() -> None:
    classes = field(9, 9)
    classes[3:6, 3:6] = 1  # 9-pixel ring region of class 1 ...
    classes[4, 4] = 2  # ... around a 1-pixel island of class 2
    assert np.array_equal(remove_small_regions(classes, min_area=10), field(9, 9))


def test_ignore_value_is_never_changed_and_never_donates() -> None:
    classes = field()
    classes[:, :6] = 255  # nodata half
    classes[5, 6] = 1  # island touching nodata and class 0
    cleaned = remove_small_regions(classes, min_area=2, ignore_value=255)
    expected = field()
    expected[:, :6] = 255
    assert np.array_equal(cleaned, expected)


def test_remove_small_regions_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="min_area"):
        remove_small_regions(field(), min_area=0)
    with pytest.raises(ValueError, match="connectivity"):
        remove_small_regions(field(), min_area=2, connectivity=6)
    with pytest.raises(ValueError, match="classes"):
        remove_small_regions(np.zeros((4, 4), dtype=np.float32), min_area=2)


# --------------------------------------------------------------------------- morphological_open_close


def test_open_removes_a_speck_and_a_thin_line_but_keeps_a_big_block() -> None:
    classes = field(16, 16)
    classes[2, 2] = 1  # speck
    classes[10, 1:15] = 2  # 1-pixel-thick line
    classes[3:9, 8:14] = 3  # 6x6 block survives a radius-1 opening ...
    opened = morphological_open_close(classes, radius=1, op="open")
    expected = field(16, 16)
    expected[3:9, 8:14] = 3
    expected[[3, 3, 8, 8], [8, 13, 8, 13]] = 0  # ... except its corners: a disk of radius 1 is a cross
    assert np.array_equal(opened, expected)


def test_open_keeps_regions_touching_the_border() -> None:
    classes = field(10, 10)
    classes[:, :4] = 1  # a 4-wide band along the left border
    assert np.array_equal(morphological_open_close(classes, radius=1, op="open"), classes)


def test_open_treats_the_raster_edge_as_extending_outwards() -> None:
    # A 2-pixel band along the left edge is half of a plane once the edge is extended, so an
    # opening of radius 2 keeps it (scipy's zero border, or too little padding, would erase it).
    classes = field(12, 12)
    classes[:, :2] = 1
    assert np.array_equal(morphological_open_close(classes, radius=2, op="open"), classes)


def test_close_fills_a_one_pixel_gap_and_rounds_a_hole() -> None:
    classes = field(12, 12, value=1)
    classes[:, 2] = 0  # a 1-pixel-wide line of class 0 splits class 1: closing class 1 fills it
    classes[4:9, 6:11] = 0  # a 5x5 hole in class 1: too big to fill, but its corners get filled
    closed = morphological_open_close(classes, radius=1, op="close")
    expected = field(12, 12, value=1)
    expected[4:9, 6:11] = 0
    expected[[4, 4, 8, 8], [6, 10, 6, 10]] = 1
    assert np.array_equal(closed, expected)


def test_open_close_cleans_a_noisy_map_but_keeps_big_regions() -> None:
    classes = field(20, 20)
    classes[:, 10:] = 1
    noisy = classes.copy()
    noisy[[3, 15, 7], [3, 5, 14]] = [1, 2, 0]  # isolated wrong pixels in both halves
    assert np.array_equal(morphological_open_close(noisy, radius=1, op="open_close"), classes)


def test_radius_zero_is_identity_and_bad_arguments_raise() -> None:
    classes = np.random.default_rng(0).integers(0, 3, size=(8, 8))
    assert np.array_equal(morphological_open_close(classes, radius=0), classes)
    with pytest.raises(ValueError, match="radius"):
        morphological_open_close(classes, radius=-1)
    with pytest.raises(ValueError, match="op"):
        morphological_open_close(classes, radius=1, op="erode")


def test_morphology_never_touches_or_spreads_the_ignore_value() -> None:
    classes = field(10, 10)
    classes[:, :3] = 255  # nodata strip
    classes[4, 3] = 1  # a speck touching nodata: it must become class 0, not 255
    classes[7, 7] = 255  # a single nodata pixel is not "opened" away
    expected = field(10, 10)
    expected[:, :3] = 255
    expected[7, 7] = 255
    result = morphological_open_close(classes, radius=1, op="open_close", ignore_value=255)
    assert np.array_equal(result, expected)


def test_only_cleans_the_listed_classes() -> None:
    classes = field(12, 12)
    classes[2, 2] = 1  # a speck of class 1 ...
    classes[8, 8] = 2  # ... and one of class 2
    cleaned = field(12, 12)
    cleaned[8, 8] = 2
    assert np.array_equal(morphological_open_close(classes, radius=1, op="open", only=[1]), cleaned)
    assert np.array_equal(remove_small_regions(classes, min_area=2, only=[1]), cleaned)
    # A small region of a class not cleaned stays, and counts as a big neighbour for the vote.
    island = field(12, 12)
    island[4:7, 4:7] = 2  # 9 px of class 2 (not cleaned) ...
    island[5, 5] = 1  # ... around 1 px of class 1 (cleaned): it joins class 2
    expected = field(12, 12)
    expected[4:7, 4:7] = 2
    assert np.array_equal(remove_small_regions(island, min_area=10, only=[1]), expected)


def test_class_areas_order_the_classes_like_the_map_itself() -> None:
    classes = blobby_map(40, 30, seed=3)
    cleanup = Cleanup(open_radius=1, close_radius=1, min_area=3)
    areas = np.bincount(classes.ravel(), minlength=3)
    assert np.array_equal(cleanup.apply(classes), cleanup.apply(classes, areas))
    with pytest.raises(ValueError, match="class_areas"):
        morphological_open_close(classes, radius=1, class_areas=[5, 5])  # no entry for class 2


# --------------------------------------------------------------------------- Cleanup and strips


def blobby_map(height: int, width: int, seed: int, classes: int = 3, nodata: int | None = None) -> np.ndarray:
    """Smooth random regions with 5 % single-pixel speckle (and a nodata band plus holes)."""
    rng = np.random.default_rng(seed)
    scores = ndimage.gaussian_filter(rng.normal(size=(classes, height, width)), sigma=(0, 3, 3))
    result = scores.argmax(axis=0).astype(np.uint8)
    speckle = rng.random((height, width)) < 0.05
    result[speckle] = rng.integers(0, classes, int(speckle.sum()))
    if nodata is not None:
        result[:, : width // 6] = nodata
        result[rng.random((height, width)) < 0.01] = nodata
    return result


CLEANUPS = [
    Cleanup(open_radius=1, ignore_value=255),
    Cleanup(close_radius=2, ignore_value=255),
    Cleanup(open_radius=1, close_radius=1, min_area=6, ignore_value=255),
    Cleanup(open_radius=2, close_radius=1, order="close_open", min_area=4, connectivity=4, ignore_value=255),
    Cleanup(open_radius=1, min_area=8, only=(1,), ignore_value=255),
    Cleanup(min_area=5, ignore_value=255),
]


@pytest.mark.parametrize("strip_rows", [1, 7, 32, 500])
@pytest.mark.parametrize("cleanup", CLEANUPS, ids=range(len(CLEANUPS)))
def test_strips_with_context_give_the_whole_map_result(cleanup: Cleanup, strip_rows: int) -> None:
    raw = blobby_map(150, 40, seed=strip_rows, nodata=255)
    areas = np.bincount(raw[raw != 255].ravel(), minlength=3)
    written = np.full_like(raw, 77)
    reads: list[tuple[int, int]] = []
    done: set[int] = set()

    def read(start: int, stop: int) -> np.ndarray:
        assert done.isdisjoint(range(start, stop)), "a row was read after it was written (in place)"
        reads.append((start, stop))
        return raw[start:stop].copy()

    def write(start: int, rows: np.ndarray) -> None:
        done.update(range(start, start + len(rows)))
        written[start : start + len(rows)] = rows

    clean_in_strips(read, write, raw.shape[0], cleanup, areas, strip_rows=strip_rows)
    assert np.array_equal(written, cleanup.apply(raw))  # no seam at any strip boundary
    rows_read = [row for start, stop in reads for row in range(start, stop)]
    assert sorted(rows_read) == list(range(150))  # every row read exactly once
    # Held rows stay bounded: the first read is a strip plus context below, later ones a strip each.
    assert reads[0][1] - reads[0][0] <= strip_rows + cleanup.context_rows(3)
    assert all(stop - start <= strip_rows for start, stop in reads[1:])


def test_a_context_of_only_the_radius_leaves_seams(monkeypatch: pytest.MonkeyPatch) -> None:
    # Why the context is longer: an opening reaches 2 x radius, and each class's step reads the
    # previous one's output. With `radius` rows of context most maps show differences at seams.
    monkeypatch.setattr(Cleanup, "context_rows", lambda self, num_classes: self.open_radius)
    cleanup = Cleanup(open_radius=2, close_radius=1)
    seams = 0
    for seed in range(5):
        raw = blobby_map(120, 40, seed=seed)
        written = np.zeros_like(raw)

        def read(start: int, stop: int, source: np.ndarray = raw) -> np.ndarray:
            return source[start:stop].copy()

        def write(start: int, rows: np.ndarray, out: np.ndarray = written) -> None:
            out[start : start + len(rows)] = rows

        clean_in_strips(read, write, 120, cleanup, np.bincount(raw.ravel()), strip_rows=16)
        seams += not np.array_equal(written, cleanup.apply(raw))
    assert seams >= 4


def test_cleanup_and_its_settings_refuse_bad_values_and_are_off_by_default() -> None:
    assert not Cleanup().enabled and Cleanup(min_area=2).enabled
    with pytest.raises(ValueError, match="open_radius"):
        Cleanup(open_radius=-1)
    with pytest.raises(ValueError, match="connectivity"):
        Cleanup(min_area=3, connectivity=6)
    with pytest.raises(ValueError, match="strip_rows"):
        clean_in_strips(lambda a, b: field(), lambda a, r: None, 12, Cleanup(min_area=2), [1], strip_rows=0)
    default = PredictSettings().postprocess
    assert default == PostprocessSettings() and not default.enabled
    assert (default.open_radius, default.close_radius, default.min_area, default.classes) == (0, 0, 1, [])
    with pytest.raises(SettingsError, match=r"postprocess\.connectivity"):
        PredictSettings.parse({"postprocess": {"connectivity": 6}})
    with pytest.raises(SettingsError, match=r"postprocess\.open_radius"):
        PredictSettings.parse({"postprocess": {"open_radius": -1}})
    assert PredictSettings.parse({"postprocess": {"min_area": 3}}).postprocess.enabled


# --------------------------------------------------------------------------- prediction writes it

CRS = "EPSG:32636"
STATS = BandStats((127.0, 127.0, 127.0), (50.0, 50.0, 50.0))
CLASSES = ("background", "building", "water")


class BandZeroThresholds(nn.Module):
    """Class 0 below 85, 1 up to 170, 2 above on band 0: the class map is the drawn image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = x[:, :1] * 50.0 + 127.0
        return torch.cat([-((value - 40) ** 2), -((value - 128) ** 2), -((value - 215) ** 2)], dim=1) / 1e3


def _scene(path: Path, data: np.ndarray) -> Path:
    count, height, width = data.shape
    transform = Affine(0.5, 0, 500000.0, 0, -0.5, 100000.0)
    profile = {"driver": "GTiff", "count": count, "height": height, "width": width,
               "dtype": data.dtype.name, "crs": CRS, "transform": transform}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def _settings(**changes: object) -> PredictSettings:
    fast = {"tta": {"scales": [1.0], "flips": ["none"]}, "windows": {"window": 64, "overlap": 16}}
    return PredictSettings.parse({**fast, "device": "cpu", "write_probabilities": True, **changes})


def _speckled_scene(path: Path) -> tuple[Path, tuple[np.ndarray, np.ndarray]]:
    """A building block and a water block on background, with 1-2 px speckles of each class."""
    truth = np.zeros((90, 100), dtype=np.uint8)
    truth[20:60, 10:50] = 1  # 40 x 40 building
    truth[30:80, 65:95] = 2  # 50 x 30 water
    noisy = truth.copy()
    noisy[[5, 8, 85, 70], [5, 60, 20, 30]] = [1, 2, 1, 2]  # single pixels on background
    noisy[10, 80:82] = 1  # a 2-pixel speck
    noisy[[30, 45], [25, 40]] = [0, 2]  # holes inside the building
    noisy[50, 80] = 1  # a speck inside the water
    band = np.array([40, 128, 215], dtype=np.uint8)[noisy]
    return _scene(path, np.stack([band, band, band])), (truth, noisy)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_speckles_disappear_from_the_written_class_map_and_large_regions_survive(tmp_path: Path) -> None:
    scene, (truth, noisy) = _speckled_scene(tmp_path / "in" / "scene.tif")
    model = LoadedModel("m", BandZeroThresholds().eval(), CLASSES, STATS, "test")
    inputs = [("scene", scene)]
    raw_run = predict_files([model], inputs, {"ensemble": tmp_path / "raw"}, _settings())
    postprocess = {"open_radius": 1, "close_radius": 1, "min_area": 5}
    run = predict_files([model], inputs, {"ensemble": tmp_path / "clean"}, _settings(postprocess=postprocess))
    with (
        rasterio.open(tmp_path / "raw" / "scene.tif") as raw,
        rasterio.open(tmp_path / "clean" / "scene.tif") as clean,
    ):
        assert np.array_equal(raw.read(1), noisy)  # off: the prediction as it is
        assert "postprocess" not in raw.tags()
        cleaned = clean.read(1)
        tag = json.loads(clean.tags()["postprocess"])
        assert clean.crs == CRS and clean.colormap(1)[1][:3] == raw.colormap(1)[1][:3]
    # Every speck and hole is gone; the blocks survive (a radius-1 disk is a cross: their corners go).
    expected = truth.copy()
    for rows, cols in ((slice(20, 60), slice(10, 50)), (slice(30, 80), slice(65, 95))):
        r, c = (rows.start, rows.stop - 1), (cols.start, cols.stop - 1)
        expected[[r[0], r[0], r[1], r[1]], [c[0], c[1], c[0], c[1]]] = 0
    assert np.array_equal(cleaned, expected)
    assert tag == PostprocessSettings.parse(postprocess).model_dump()
    summary = run.items["ensemble"][0]
    assert summary["postprocess"] == tag and raw_run.items["ensemble"][0]["postprocess"] is None
    assert summary["class_pixel_counts"] == np.bincount(cleaned.ravel(), minlength=3).tolist()
    # Probabilities stay raw: byte for byte those of the run without post-processing.
    assert _sha(tmp_path / "clean" / "scene.probs.tif") == _sha(tmp_path / "raw" / "scene.probs.tif")


def test_off_writes_byte_identical_outputs(tmp_path: Path) -> None:
    scene, _ = _speckled_scene(tmp_path / "in" / "scene.tif")
    model = LoadedModel("m", BandZeroThresholds().eval(), CLASSES, STATS, "test")
    off = {"open_radius": 0, "close_radius": 0, "min_area": 1, "classes": ["building"], "order": "close_open"}
    predict_files([model], [("scene", scene)], {"ensemble": tmp_path / "default"}, _settings())
    predict_files([model], [("scene", scene)], {"ensemble": tmp_path / "off"}, _settings(postprocess=off))
    names = sorted(p.name for p in (tmp_path / "default").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "off").iterdir())
    assert all(_sha(tmp_path / "default" / n) == _sha(tmp_path / "off" / n) for n in names)
    # The library call without any post-processing argument writes the same class map too.
    tiling.predict_raster(
        scene,
        tmp_path / "plain.tif",
        lambda batch: model.model(batch).softmax(dim=1),
        num_classes=3,
        window=64,
        overlap=16,
        normalize=lambda array: (array - 127.0) / 50.0,
        class_names=CLASSES,
        palette=model.palette,
    )
    assert _sha(tmp_path / "plain.tif") == _sha(tmp_path / "default" / "scene.tif")


def test_unknown_class_names_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    scene, _ = _speckled_scene(tmp_path / "in" / "scene.tif")
    model = LoadedModel("m", BandZeroThresholds().eval(), CLASSES, STATS, "test")
    settings = _settings(postprocess={"min_area": 3, "classes": ["roads"]})
    with pytest.raises(ValueError, match=r"postprocess.classes \['roads'\]"):
        predict_files([model], [("scene", scene)], {"ensemble": tmp_path / "out"}, settings)
    assert not list((tmp_path / "out").glob("*.tif"))


def test_a_streamed_raster_of_several_strips_is_cleaned_like_the_whole_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A tiny SMP U-Net (random weights, no download) predicts a 600-row raster in 64-px windows; the
    # clean-up then runs in strips of one GeoTIFF block row (256 rows): 3 strips with context.
    torch.manual_seed(0)
    unet = smp.Unet("resnet18", encoder_weights=None, in_channels=3, classes=3, encoder_depth=3,
                    decoder_channels=(16, 8, 4)).eval()  # fmt: skip
    model = LoadedModel("unet", unet, CLASSES, STATS, "test")
    rng = np.random.default_rng(0)
    smooth = ndimage.gaussian_filter(rng.normal(size=(3, 600, 64)), sigma=(0, 4, 4))
    image = np.clip(127 + 50 * smooth / smooth.std(), 1, 255).astype(np.uint8)
    image[:, 100:140, :20] = 0  # a nodata patch (every band 0), which the clean-up must keep
    scene = _scene(tmp_path / "in" / "tall.tif", image)
    with rasterio.open(scene, "r+") as dst:
        dst.nodata = 0
    strips: list[tuple[int, int]] = []
    original = tiling.clean_in_strips

    def recording(
        read: ReadRows, write: WriteRows, height: int, cleanup: Cleanup, areas: np.ndarray, *, strip_rows: int
    ) -> None:
        strips.append((height, strip_rows))
        original(read, write, height, cleanup, areas, strip_rows=strip_rows)

    monkeypatch.setattr(tiling, "clean_in_strips", recording)
    monkeypatch.setattr(tiling, "CLEANUP_STRIP_PIXELS", 1)  # strips of the smallest size: one block row
    postprocess = PostprocessSettings(open_radius=1, close_radius=1, min_area=6)
    predict_files([model], [("tall", scene)], {"ensemble": tmp_path / "raw"}, _settings())
    predict_files(
        [model], [("tall", scene)], {"ensemble": tmp_path / "clean"}, _settings(postprocess=postprocess)
    )
    assert strips == [(600, 256)]  # the raster was cleaned in 3 strips, never whole
    with (
        rasterio.open(tmp_path / "raw" / "tall.tif") as raw,
        rasterio.open(tmp_path / "clean" / "tall.tif") as clean,
    ):
        raw_classes, nodata, cleaned = raw.read(1), int(raw.nodata), clean.read(1)
    assert (raw_classes == nodata).sum() == 40 * 20 and len(np.unique(raw_classes)) == 4  # 3 classes + nodata
    whole = Cleanup(open_radius=1, close_radius=1, min_area=6, ignore_value=nodata).apply(raw_classes)
    assert np.array_equal(cleaned, whole)  # no seam at rows 256 and 512
    assert (cleaned != raw_classes).sum() > 100  # and the clean-up did change the map
    assert np.array_equal(cleaned == nodata, raw_classes == nodata)
