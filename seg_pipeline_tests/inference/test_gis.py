"""Outputs a GIS opens as meant: valid COGs with overviews and a colour table, QGIS styles, one mosaic VRT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from rio_cogeo.cogeo import cog_validate
from torch import nn

from seg_pipeline.contracts import EnsembleMember, PredictionItem, PredictionSet
from seg_pipeline.data.normalization import BandStats
from seg_pipeline.data.spec import DatasetSpecError, read_classes
from seg_pipeline.inference.palette import class_palette
from seg_pipeline.inference.predict import MOSAIC_NAME, LoadedModel, predict_files
from seg_pipeline.settings import DatasetSettings, PredictSettings
from seg_pipeline.workflows.ingest import class_colors
from seg_pipeline.workflows.predict import georeference_problems
from seg_pipeline_tests.conftest import scratch_dir

CRS = "EPSG:32636"
STATS = BandStats((127.0, 127.0, 127.0), (50.0, 50.0, 50.0))
CLASSES = ("background", "building", "water")


class BandZeroThresholds(nn.Module):
    """Class 0 below 85, 1 up to 170, 2 above on band 0: predictions that follow the image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = x[:, :1] * 50.0 + 127.0
        return torch.cat([-((value - 40) ** 2), -((value - 128) ** 2), -((value - 215) ** 2)], dim=1) / 1e3


def _model() -> LoadedModel:
    return LoadedModel("m", BandZeroThresholds().eval(), CLASSES, STATS, "test")


def _settings(**changes: object) -> PredictSettings:
    one_view = {"tta": {"scales": [1.0], "flips": ["none"]}, "windows": {"window": 512, "overlap": 32}}
    return PredictSettings.parse({**one_view, **changes})


def _scene(path: Path, left: float, top: float, height: int, width: int, seed: int) -> Path:
    data = np.random.default_rng(seed).integers(0, 256, (3, height, width), dtype=np.uint8)
    profile = {"driver": "GTiff", "count": 3, "height": height, "width": width, "dtype": "uint8",
               "crs": CRS, "transform": Affine(0.5, 0, left, 0, -0.5, top)}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


@pytest.fixture(scope="module")
def predicted(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[Path]]:
    """Two neighbouring georeferenced scenes (one large enough for overviews), predicted once."""
    root = scratch_dir(request, tmp_path_factory, "gis")
    scenes = [
        _scene(root / "in" / "west.tif", 500000.0, 100000.0, 1100, 900, 0),
        _scene(root / "in" / "east.tif", 500450.0, 100000.0, 300, 400, 1),  # 900 px x 0.5 m to the east
    ]
    settings = _settings(write_probabilities=True)
    predict_files([_model()], [(p.stem, p) for p in scenes], {"ensemble": root / "out"}, settings)
    return root / "out", scenes


def test_class_maps_are_valid_cogs_with_overviews_and_a_colour_table(
    predicted: tuple[Path, list[Path]],
) -> None:
    out, _ = predicted
    path = out / "west.tif"
    is_valid, errors, _warnings = cog_validate(str(path))
    assert is_valid, errors
    with rasterio.open(path) as src:
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert src.overviews(1) == [2, 4]  # 1100 px in 512 px tiles: halved until one tile fits
        assert src.block_shapes[0] == (512, 512)
        colours = src.colormap(1)
        assert colours[0][:3] == (0, 0, 0) and colours[1][:3] == (220, 20, 20)  # background, building red
        assert colours[2][:3] == (0, 100, 200)  # water blue
        assert colours[src.nodata][3] == 0  # nodata transparent
        assert src.descriptions == ("class",)
        assert json.loads(src.tags(1)["class_names"]) == list(CLASSES)
        assert src.tags(1)["CLASS_2"] == "water"
        assert src.crs == CRS
    assert cog_validate(str(out / "west.probs.tif"))[0]  # probabilities too (AVERAGE overviews)


def test_a_qgis_style_beside_each_class_map_names_the_classes(predicted: tuple[Path, list[Path]]) -> None:
    out, _ = predicted
    style = ElementTree.parse(out / "west.qml").getroot()
    entries = style.findall(".//colorPalette/paletteEntry")
    assert [(e.get("value"), e.get("label"), e.get("color")) for e in entries] == [
        ("0", "background", "#000000"),
        ("1", "building", "#dc1414"),
        ("2", "water", "#0064c8"),
    ]
    assert style.find(".//rasterrenderer").get("type") == "paletted"


def test_the_mosaic_vrt_shows_every_class_map_of_a_set_as_one_layer(
    predicted: tuple[Path, list[Path]],
) -> None:
    out, _ = predicted
    with (
        rasterio.open(out / MOSAIC_NAME) as mosaic,
        rasterio.open(out / "west.tif") as west,
        rasterio.open(out / "east.tif") as east,
    ):
        assert mosaic.crs == CRS
        assert mosaic.bounds == (500000.0, 100000.0 - 550.0, 500650.0, 100000.0)
        assert mosaic.colormap(1)[1][:3] == (220, 20, 20)
        whole = mosaic.read(1)
        np.testing.assert_array_equal(whole[:1100, :900], west.read(1))
        np.testing.assert_array_equal(whole[:300, 900:1300], east.read(1))
        assert (whole[300:, 900:] == mosaic.nodata).all()  # outside both scenes
    assert (out / "mosaic.qml").is_file()


def test_photos_without_a_crs_get_no_mosaic_and_the_log_says_why(tmp_path: Path) -> None:
    photos = []
    for index in range(2):
        path = tmp_path / "in" / f"photo{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(path, "w", driver="PNG", count=3, height=40, width=60, dtype="uint8") as dst:
            dst.write(np.full((3, 40, 60), 100 * index, np.uint8))
        photos.append(path)
    lines: list[str] = []
    predict_files([_model()], [(p.stem, p) for p in photos], {"ensemble": tmp_path / "out"}, _settings(),
                  log_fn=lines.append)  # fmt: skip
    assert not (tmp_path / "out" / MOSAIC_NAME).exists()
    assert any("no mosaic.vrt: photo0.tif has no CRS" in line for line in lines)
    with rasterio.open(tmp_path / "out" / "photo1.tif") as src:
        assert src.colormap(1)[1][:3] == (220, 20, 20)


def test_palette_colours_classes_by_their_names() -> None:
    palette = class_palette(["bare_soil", "water", "vegetation", "Buildings", "road", "cropland", "mystery"])
    assert palette[:6].tolist() == [
        [180, 130, 70], [0, 100, 200], [0, 100, 0], [220, 20, 20], [160, 160, 160], [255, 220, 0],
    ]  # fmt: skip
    assert palette[6].tolist() not in palette[:6].tolist()  # an unknown name gets a colour still free


def test_palette_overrides_win_and_typos_are_named() -> None:
    assert class_palette(["background", "water"], {"water": [1, 2, 3]})[1].tolist() == [1, 2, 3]
    assert class_palette(["forest", "tree"]).tolist()[0] != class_palette(["forest", "tree"]).tolist()[1]
    with pytest.raises(ValueError, match=r"\['watr'\], which are not classes"):
        class_palette(["background", "water"], {"watr": [1, 2, 3]})


def test_classes_txt_may_give_a_colour_after_each_name(tmp_path: Path) -> None:
    (tmp_path / "classes.txt").write_text("0 background\n1 low vegetation #33aa33\n2 water\n")
    assert read_classes(tmp_path / "classes.txt") == (
        ("background", "low vegetation", "water"),
        {"low vegetation": (0x33, 0xAA, 0x33)},
    )
    settings = DatasetSettings(dataset_id="d", class_colors={"water": [0, 0, 255]})
    assert class_colors(settings, tmp_path, ("background", "low vegetation", "water")) == [
        [0, 0, 0], [0x33, 0xAA, 0x33], [0, 0, 255],
    ]  # fmt: skip
    (tmp_path / "classes.txt").write_text("0 background\n1 water #12345\n")
    with pytest.raises(DatasetSpecError, match="'#12345' is not #rrggbb"):
        read_classes(tmp_path / "classes.txt")
    (tmp_path / "classes.txt").write_text("0 water\n")
    with pytest.raises(ValueError, match=r"dataset.class_colors: .*\['watr'\]"):
        class_colors(
            DatasetSettings(dataset_id="d", class_colors={"watr": [0, 0, 255]}), tmp_path, ("water",)
        )


def test_the_overlay_check_names_a_class_map_that_moved(
    predicted: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    out, scenes = predicted
    items = [PredictionItem(item_id=p.stem, input=str(p), target="") for p in scenes]
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    with rasterio.open(moved / "east.tif", "r+", IGNORE_COG_LAYOUT_BREAK="YES") as dst:
        dst.transform = dst.transform * Affine.translation(10, 0)  # ten pixels to the east
    good, bad = (
        PredictionSet(
            split="test",
            out_root=str(folder),
            sets={"ensemble": str(folder)},
            items=items,
            members=[EnsembleMember(name="m", checkpoint="none")],
            candidate="m",
            class_names=list(CLASSES),
            ignore_index=255,
            views_per_input=1,
            settings=_settings(),
        )
        for folder in (out, moved)
    )
    assert georeference_problems(good) == []
    problems = georeference_problems(bad)
    assert len(problems) == 1 and problems[0].startswith(f"{moved / 'east.tif'}: transform")
