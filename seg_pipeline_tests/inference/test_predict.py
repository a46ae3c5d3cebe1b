"""``predict_files``: every input is checked before the first output, and previews stay small."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from torch import nn

from seg_pipeline.data.normalization import BandStats
from seg_pipeline.data.raster_io import write_geotiff
from seg_pipeline.inference.predict import PREVIEW_MAX_SIDE, LoadedModel, predict_files
from seg_pipeline.settings import PredictSettings

STATS = BandStats((127.0, 127.0, 127.0), (50.0, 50.0, 50.0))


def _model() -> LoadedModel:
    conv = nn.Conv2d(3, 2, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(0)))
    return LoadedModel("m", conv.eval(), ("background", "building"), STATS, "test")


def _settings(**changes: object) -> PredictSettings:
    fast = {"tta": {"scales": [1.0], "flips": ["none"]}, "windows": {"window": 256, "overlap": 32}}
    return PredictSettings.parse({**fast, **changes})


def _image(path: Path, bands: int, height: int = 40, width: int = 40) -> Path:
    rng = np.random.default_rng(bands)
    return write_geotiff(path, rng.integers(0, 255, (bands, height, width), dtype=np.uint8))


def test_rasters_with_the_wrong_band_count_are_all_named_and_nothing_is_written(tmp_path: Path) -> None:
    inputs = [(name, _image(tmp_path / "in" / f"{name}.tif", bands)) for name, bands in
              (("a", 3), ("b", 4), ("c", 1))]  # fmt: skip
    (tmp_path / "in" / "d.tif").write_bytes(b"not a raster")
    inputs.append(("d", tmp_path / "in" / "d.tif"))
    out = tmp_path / "out"
    with pytest.raises(ValueError) as caught:
        predict_files([_model()], inputs, {"ensemble": out}, _settings())
    message = str(caught.value)
    assert message.startswith("3 of 4 input raster(s) do not fit the model, which takes 3 band(s)")
    assert "b.tif has 4 bands" in message and "c.tif has 1 band;" in message
    assert "d.tif cannot be read" in message and "nothing was written" in message
    assert not out.exists()  # the check ran before the first output folder was made


def test_the_preview_is_decimated_and_can_be_turned_off(tmp_path: Path) -> None:
    scene = _image(tmp_path / "in" / "scene.tif", 3, height=300, width=2100)
    predict_files([_model()], [("scene", scene)], {"ensemble": tmp_path / "with"}, _settings())
    with (
        rasterio.open(tmp_path / "with" / "scene.png") as png,
        rasterio.open(tmp_path / "with" / "scene.tif") as tif,
    ):
        assert (tif.height, tif.width) == (300, 2100)  # the class map keeps full resolution
        # the map is drawn at 1024 x 146 px; the legend adds a column on the right
        assert PREVIEW_MAX_SIDE <= png.width <= PREVIEW_MAX_SIDE + 200 and png.height < 300
    predict_files(
        [_model()], [("scene", scene)], {"ensemble": tmp_path / "without"}, _settings(color_png=False)
    )
    assert sorted(p.name for p in (tmp_path / "without").iterdir()) == [
        "detections.csv",
        "scene.qml",
        "scene.tif",
    ]  # + QGIS style and the per-raster detection table


def test_windows_per_pass_follow_the_device_unless_set() -> None:
    from seg_pipeline.settings import WindowSettings

    default = WindowSettings()
    assert default.batch_size is None and default.windows_per_pass == 1
    assert default.for_device("cuda").batch_size == 4 and default.for_device("cpu").batch_size == 1
    assert WindowSettings(batch_size=8).for_device("cpu").batch_size == 8  # a set value always wins
