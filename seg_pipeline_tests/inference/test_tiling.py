"""Tests for seg_pipeline.inference.tiling: window grid, blend weights and predict_raster on real GeoTIFFs."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from torch import Tensor, nn

from seg_pipeline.inference.ensemble import EnsemblePredictor
from seg_pipeline.inference.tiling import blend_weights, predict_raster, window_grid
from seg_pipeline.inference.tta import TTAConfig

CRS = "EPSG:32633"
TRANSFORM = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4650000.0)  # 0.5 m pixels, UTM 33N


def write_raster(
    path: Path,
    data: np.ndarray,
    *,
    nodata: float | None = None,
    georeferenced: bool = True,
    driver: str = "GTiff",
) -> Path:
    """Write (C, H, W) data as a raster with rasterio (georeferenced unless told otherwise)."""
    profile = {
        "driver": driver,
        "count": data.shape[0],
        "height": data.shape[1],
        "width": data.shape[2],
        "dtype": data.dtype.name,
    }
    if georeferenced:
        profile |= {"crs": CRS, "transform": TRANSFORM}
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def pointwise_conv(in_channels: int = 3, classes: int = 5, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(in_channels, classes, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator))
    return conv.eval()


class NearestValueClassifier(nn.Module):
    """Pointwise model whose argmax is round(band 0): logits_k = -(x0 - k)^2."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("centres", torch.arange(num_classes, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return -((x[:, :1] - self.centres) ** 2)


def random_image(height: int = 257, width: int = 300, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(3, height, width)).astype(np.uint8)


def scale_to_unit(window: np.ndarray) -> np.ndarray:
    return window / 255.0


# --------------------------------------------------------------------------- window_grid


GRID_CASES = [(1000, 777, 256, 32), (513, 512, 128, 0), (2000, 2000, 1024, 32), (4000, 3001, 512, 64)]


@pytest.mark.parametrize(("height", "width", "window", "overlap"), GRID_CASES)
def test_window_grid_covers_every_pixel_with_at_least_the_overlap(
    height: int, width: int, window: int, overlap: int
) -> None:
    windows = window_grid(height, width, window, overlap)
    coverage = np.zeros((height, width), dtype=np.int32)
    for w in windows:
        assert w.row_off >= 0 and w.col_off >= 0
        assert w.row_off + w.height <= height and w.col_off + w.width <= width
        assert (w.height, w.width) == (windows[0].height, windows[0].width)  # one set of blend weights
        assert w.height <= window and w.width <= window
        coverage[w.row_off : w.row_off + w.height, w.col_off : w.col_off + w.width] += 1
    assert coverage.min() >= 1
    assert max(w.row_off + w.height for w in windows) == height
    assert max(w.col_off + w.width for w in windows) == width
    for starts, length in (
        (sorted({w.row_off for w in windows}), windows[0].height),
        (sorted({w.col_off for w in windows}), windows[0].width),
    ):
        assert all(length - (b - a) >= overlap for a, b in itertools.pairwise(starts))


@pytest.mark.parametrize(("height", "width", "window", "overlap"), GRID_CASES)
def test_window_grid_uses_the_fewest_windows_the_overlap_allows(
    height: int, width: int, window: int, overlap: int
) -> None:
    def fewest(size: int) -> int:
        return 1 if size <= window else -(-(size - overlap) // (window - overlap))

    assert len(window_grid(height, width, window, overlap)) == fewest(height) * fewest(width)


def test_window_grid_shrinks_windows_to_the_raster() -> None:
    # 1100 px needs two windows of 1024 (overlap 32); two of 576 (a multiple of 32) cover it as well,
    # so the forward passes see 1152 px per axis instead of 2048.
    windows = window_grid(1100, 1100, 1024, 32)
    assert len(windows) == 4
    assert (windows[0].height, windows[0].width) == (576, 576)
    assert sorted({w.row_off for w in windows}) == [0, 524]


def test_window_grid_spaces_windows_evenly() -> None:
    # 1000 rows, windows of 256 overlapping by 32: 5 windows at equal strides, not 4 plus a flush one
    # that overlaps its neighbour by 184 px; 777 columns: 4 windows of 224.
    windows = window_grid(1000, 777, 256, 32)
    assert sorted({w.row_off for w in windows}) == [0, 186, 372, 558, 744]
    assert sorted({w.col_off for w in windows}) == [0, 184, 368, 553]
    assert (windows[0].height, windows[0].width) == (256, 224)
    assert len(windows) == 20


def test_window_grid_raster_smaller_than_window_is_one_window() -> None:
    windows = window_grid(100, 37, 256, 32)
    assert len(windows) == 1
    assert (windows[0].row_off, windows[0].col_off, windows[0].height, windows[0].width) == (0, 0, 100, 37)


def test_window_grid_exact_fit_has_no_duplicate_windows() -> None:
    windows = window_grid(512, 512, 256, 0)
    assert [(w.row_off, w.col_off) for w in windows] == [(0, 0), (0, 256), (256, 0), (256, 256)]


@pytest.mark.parametrize(
    ("window", "overlap", "message"),
    [
        (256, 256, "overlap"),
        (256, 300, "overlap"),
        (0, 0, "window"),
        (256, -1, "overlap"),
        ((64, 32), 32, "overlap"),
    ],
)
def test_window_grid_rejects_bad_arguments(window: int, overlap: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        window_grid(500, 500, window, overlap)


# --------------------------------------------------------------------------- blend_weights


def test_blend_weights_are_positive_smooth_and_symmetric() -> None:
    weights = blend_weights(64, 48, 16)
    assert weights.shape == (64, 48) and weights.dtype == np.float32
    assert weights.min() > 0
    assert weights.max() == pytest.approx(1.0)
    assert np.allclose(weights, weights[::-1, :]) and np.allclose(weights, weights[:, ::-1])
    assert np.all(weights[32, 16:32] == 1.0)  # inside the overlap band weights are 1
    # Hann ramp: first weight 0.5 * (1 - cos(pi / 17)), rising monotonically to 1
    assert weights[32, 0] == pytest.approx(0.5 * (1 - np.cos(np.pi / 17)), rel=1e-5)
    assert np.all(np.diff(weights[32, :17]) > 0)


def test_blend_weights_uniform_and_zero_overlap() -> None:
    assert np.all(blend_weights(5, 7, 3, kind="uniform") == 1.0)
    assert np.all(blend_weights(5, 7, 0) == 1.0)
    with pytest.raises(ValueError, match="kind"):
        blend_weights(5, 7, 2, kind="gaussian")


# --------------------------------------------------------------------------- predict_raster


def whole_image_probabilities(model: nn.Module, image: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(image / 255.0).float()[None]).softmax(dim=1)[0].numpy()


def test_predict_raster_matches_whole_image_prediction(tmp_path: Path) -> None:
    image = random_image()
    src = write_raster(tmp_path / "scene.tif", image)
    model = pointwise_conv(classes=5)
    predictor = EnsemblePredictor([model], TTAConfig(scales=(1.0,), flips=("none", "h", "v")))
    summary = predict_raster(
        src,
        tmp_path / "classes.tif",
        predictor,
        num_classes=5,
        window=96,
        overlap=24,
        batch_size=3,
        normalize=scale_to_unit,
        write_probabilities=tmp_path / "probs.tif",
    )
    expected = whole_image_probabilities(model, image)
    with rasterio.open(tmp_path / "classes.tif") as classes_ds:
        assert classes_ds.crs.to_string() == CRS
        assert classes_ds.transform == TRANSFORM
        assert (classes_ds.height, classes_ds.width, classes_ds.count) == (257, 300, 1)
        assert classes_ds.dtypes[0] == "uint8" and classes_ds.nodata == 255
        assert classes_ds.profile["tiled"] and classes_ds.compression.name.lower() == "deflate"
        classes = classes_ds.read(1)
    with rasterio.open(tmp_path / "probs.tif") as probs_ds:
        assert probs_ds.count == 5 and probs_ds.dtypes[0] == "float32" and probs_ds.crs.to_string() == CRS
        probabilities = probs_ds.read()
    assert np.allclose(probabilities, expected, atol=1e-5)
    assert np.array_equal(classes, expected.argmax(axis=0))
    assert summary["num_windows"] == 4 * 4  # rows 0,72,144,161 x cols 0,72,144,204
    assert sum(summary["class_pixel_counts"]) == 257 * 300 and summary["nodata_pixels"] == 0
    assert summary["crs"] == CRS


def test_predict_raster_marks_nodata_pixels(tmp_path: Path) -> None:
    image = random_image(height=60, width=70, seed=1)
    image[image == 0] = 1  # no accidental nodata
    image[:, 10:20, 5:9] = 0  # every band nodata -> output nodata
    image[0, 40, 40] = 0  # only one band nodata -> still predicted
    src = write_raster(tmp_path / "scene.tif", image, nodata=0)
    model = NearestValueClassifier(3)
    summary = predict_raster(
        src,
        tmp_path / "classes.tif",
        EnsemblePredictor([model], TTAConfig(scales=(1.0,))),
        num_classes=3,
        window=32,
        overlap=8,
    )
    with rasterio.open(tmp_path / "classes.tif") as dst:
        classes = dst.read(1)
    expected = np.clip(np.rint(image[0].astype(np.float64)), 0, 2)  # argmax of -(x0 - k)^2
    expected[10:20, 5:9] = 255
    assert np.array_equal(classes, expected)
    assert classes[40, 40] == 0
    assert summary["nodata_pixels"] == 40


def test_predict_raster_nan_pixels_are_nodata_in_float_rasters(tmp_path: Path) -> None:
    image = np.random.default_rng(2).random((2, 40, 50)).astype(np.float32)
    image[:, 0, :] = np.nan
    src = write_raster(tmp_path / "scene.tif", image)
    probs_path = tmp_path / "probs.tif"
    predict_raster(
        src,
        tmp_path / "classes.tif",
        EnsemblePredictor([pointwise_conv(in_channels=2, classes=4)], TTAConfig(scales=(1.0,))),
        num_classes=4,
        window=32,
        overlap=8,
        write_probabilities=probs_path,
    )
    with rasterio.open(tmp_path / "classes.tif") as dst:
        classes = dst.read(1)
    with rasterio.open(probs_path) as probs:
        probabilities = probs.read()
    assert np.all(classes[0] == 255) and np.all(classes[1:] < 4)
    assert np.all(np.isnan(probabilities[:, 0])) and not np.isnan(probabilities[:, 1:]).any()


def test_predict_raster_uint16_for_more_than_255_classes(tmp_path: Path) -> None:
    num_classes = 300
    values = np.random.default_rng(3).integers(0, num_classes, size=(1, 20, 17)).astype(np.uint16)
    src = write_raster(tmp_path / "labels.tif", values)
    summary = predict_raster(
        src,
        tmp_path / "classes.tif",
        lambda batch: NearestValueClassifier(num_classes)(batch).softmax(dim=1),
        num_classes=num_classes,
        window=16,
        overlap=4,
    )
    with rasterio.open(tmp_path / "classes.tif") as dst:
        assert dst.dtypes[0] == "uint16" and dst.nodata == 65535
        classes = dst.read(1)
    assert classes.max() > 255
    assert np.array_equal(classes, values[0])
    assert summary["class_dtype"] == "uint16"


def test_predict_raster_smaller_than_window_and_uint8_probabilities(tmp_path: Path) -> None:
    image = random_image(height=45, width=61, seed=4)
    src = write_raster(tmp_path / "small.tif", image)
    model = pointwise_conv(classes=3)
    summary = predict_raster(
        src,
        tmp_path / "classes.tif",
        EnsemblePredictor([model], TTAConfig(scales=(1.0,))),  # pads 45x61 to 64x64 inside TTA
        num_classes=3,
        window=512,
        normalize=scale_to_unit,
        write_probabilities=tmp_path / "probs.tif",
        probability_dtype="uint8",
    )
    assert summary["num_windows"] == 1 and summary["window"] == [45, 61]
    with rasterio.open(tmp_path / "probs.tif") as probs:
        assert probs.dtypes[0] == "uint8"
        scaled = probs.read()
    expected = whole_image_probabilities(model, image)
    assert np.abs(scaled.astype(np.float64) - expected * 255).max() <= 0.51


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_predict_raster_png_input_has_no_crs(tmp_path: Path) -> None:
    image = random_image(height=40, width=48, seed=5)
    src = write_raster(tmp_path / "tile.png", image, georeferenced=False, driver="PNG")
    summary = predict_raster(
        src,
        tmp_path / "tile_classes.tif",
        EnsemblePredictor([pointwise_conv(classes=2)], TTAConfig(scales=(1.0,))),
        num_classes=2,
        window=32,
        overlap=8,
    )
    with rasterio.open(tmp_path / "tile_classes.tif") as dst:
        assert dst.crs is None and (dst.height, dst.width) == (40, 48)
    assert summary["crs"] is None


def test_predict_raster_leaves_no_temporary_files(tmp_path: Path) -> None:
    src = write_raster(tmp_path / "scene.tif", random_image(height=70, width=80))
    out = tmp_path / "out"
    predict_raster(
        src,
        out / "classes.tif",
        EnsemblePredictor([pointwise_conv(classes=2)], TTAConfig(scales=(1.0,))),
        num_classes=2,
        window=32,
        overlap=8,
        write_probabilities=out / "probs.tif",
    )
    assert sorted(p.name for p in out.iterdir()) == ["classes.qml", "classes.tif", "probs.tif"]


def test_predict_raster_failure_leaves_nothing_behind(tmp_path: Path) -> None:
    src = write_raster(tmp_path / "scene.tif", random_image(height=600, width=80))
    out = tmp_path / "out"
    out.mkdir()
    calls = []

    def failing_predict(batch: Tensor) -> Tensor:
        calls.append(batch.shape[0])
        if len(calls) == 15:  # after the first 256 rows were written to the temporary file
            temporaries = [p for p in out.iterdir() if p.name.startswith(".classes.")]
            assert len(temporaries) == 1 and temporaries[0].stat().st_size > 0
            assert not (out / "classes.tif").exists()
            raise RuntimeError("simulated crash")
        return torch.full((batch.shape[0], 2, *batch.shape[-2:]), 0.5)

    with pytest.raises(RuntimeError, match="simulated crash"):
        predict_raster(
            src,
            out / "classes.tif",
            failing_predict,
            num_classes=2,
            window=32,
            overlap=8,
            write_probabilities=out / "p.tif",
        )
    assert list(out.iterdir()) == []


def test_predict_raster_rejects_bad_arguments(tmp_path: Path) -> None:
    src = write_raster(tmp_path / "scene.tif", random_image(height=20, width=20))

    def predict(batch: Tensor) -> Tensor:
        return torch.full((batch.shape[0], 2, *batch.shape[-2:]), 0.5)

    with pytest.raises(ValueError, match="num_classes"):  # predictor returns 2 classes, 3 expected
        predict_raster(src, tmp_path / "a.tif", predict, num_classes=3, window=16, overlap=4)
    with pytest.raises(ValueError, match="bands"):
        predict_raster(src, tmp_path / "a.tif", predict, num_classes=2, bands=[4])
    with pytest.raises(ValueError, match="class_nodata"):
        predict_raster(src, tmp_path / "a.tif", predict, num_classes=2, class_nodata=1)
    with pytest.raises(ValueError, match="overwrite"):
        predict_raster(src, src, predict, num_classes=2)
    with pytest.raises(FileNotFoundError):
        predict_raster(tmp_path / "missing.tif", tmp_path / "a.tif", predict, num_classes=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.tif"]


def test_predict_raster_memory_is_bounded_by_window_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The running buffer may hold at most one window height plus one GeoTIFF block row (256),
    # never the whole 1200-row raster.
    from seg_pipeline.inference import strips

    buffered_rows: list[int] = []
    original_extend = strips.StripBuffer.extend_to

    def recording_extend(self: strips.StripBuffer, bottom: int) -> None:
        original_extend(self, bottom)
        buffered_rows.append(self.weights.shape[0])

    monkeypatch.setattr(strips.StripBuffer, "extend_to", recording_extend)
    image = random_image(height=1200, width=40, seed=6)
    src = write_raster(tmp_path / "tall.tif", image)
    model = pointwise_conv(classes=3)
    predict_raster(
        src,
        tmp_path / "classes.tif",
        EnsemblePredictor([model], TTAConfig(scales=(1.0,), flips=("none",))),
        num_classes=3,
        window=64,
        overlap=16,
        normalize=scale_to_unit,
    )
    assert len(buffered_rows) == 25  # strips start at 0, 48, ..., 1104 and the flush one at 1136
    assert max(buffered_rows) <= 64 + 256
    with rasterio.open(tmp_path / "classes.tif") as dst:
        assert np.array_equal(dst.read(1), whole_image_probabilities(model, image).argmax(axis=0))


def test_a_raster_georeferenced_by_gcps_keeps_them_in_its_class_map(tmp_path: Path) -> None:
    from rasterio.control import GroundControlPoint

    gcps = [
        GroundControlPoint(row=0, col=0, x=32.50, y=0.40),
        GroundControlPoint(row=0, col=40, x=32.51, y=0.40),
        GroundControlPoint(row=30, col=0, x=32.50, y=0.39),
    ]
    src = tmp_path / "gcp.tif"
    profile = {"driver": "GTiff", "width": 40, "height": 30, "count": 3, "dtype": "uint8"}
    with rasterio.open(src, "w", gcps=gcps, crs="EPSG:4326", **profile) as dst:
        dst.write(np.zeros((3, 30, 40), np.uint8))

    def two_classes(batch: torch.Tensor) -> torch.Tensor:
        return torch.stack([batch[:, 0] * 0 + 0.7, batch[:, 0] * 0 + 0.3], dim=1)

    predict_raster(src, tmp_path / "out.tif", two_classes, num_classes=2, window=32, overlap=8)
    with rasterio.open(tmp_path / "out.tif") as out:
        written, crs = out.gcps
    assert [(p.row, p.col, p.x, p.y) for p in written] == [(p.row, p.col, p.x, p.y) for p in gcps]
    assert crs == "EPSG:4326"
