"""A deployable bundle: one folder that predicts what the report scored, wherever it is copied."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio

from seg_pipeline.contracts import AuxiliarySet, DeployableModel, DeployedMember
from seg_pipeline.data.raster_io import write_geotiff
from seg_pipeline.data.synthetic import SyntheticSpec
from seg_pipeline.inference.bundle import (
    is_bundle,
    predict_bundle,
    read_bundle,
    same_predictions,
    write_bundle,
)
from seg_pipeline.io import file_sha256
from seg_pipeline.models.checkpoint import link_or_copy
from seg_pipeline.settings import PredictSettings, PretrainSettings, SplitSettings
from seg_pipeline.workflows.train import StageRun, pretrain
from seg_pipeline_tests.conftest import ingest_synthetic, scratch_dir, tiny_stage

#: Offsets for the 6 synthetic classes.
BIAS = [0.0, 0.7, 0.0, -0.3, 0.0, 0.0]
VIEWS = {"tta": {"scales": [1.0], "flips": ["none", "h"]}, "color_png": False}


@pytest.fixture(scope="module")
def checkpoints(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """best.pt of two one-step Unet-mobilenet_v2 stages (different seeds) on 32x32 synthetic shards."""
    root = scratch_dir(request, tmp_path_factory, "bundle_stage")
    split = SplitSettings(policy="supervised", train_fraction=0.5, val_fraction=0.5, test_fraction=0.0)
    target = ingest_synthetic(
        root, "demo", SyntheticSpec(grid_rows=2, grid_cols=3, tile_size=32), seed=3, split=split
    )
    paths = []
    for seed in (0, 1):
        settings = PretrainSettings.parse(tiny_stage(loop={"max_steps_per_epoch": 1, "seed": seed}))
        run = StageRun(root / f"ckpt{seed}")
        paths.append(Path(pretrain(settings, target, AuxiliarySet(data_version="none"), run).checkpoint))
    return paths[0], paths[1]


def _ensemble(a: Path, b: Path, **changes: object) -> DeployableModel:
    return DeployableModel(
        kind="ensemble",
        members=[DeployedMember(name="a", checkpoint=str(a)), DeployedMember(name="b", checkpoint=str(b))],
        class_bias=BIAS,
        predict=PredictSettings.parse(VIEWS),
        score=0.5,
        split="test",
        reason="test",
    ).model_copy(update=changes)


def _classes(folder: Path, name: str) -> np.ndarray:
    with rasterio.open(folder / f"{name}.tif") as src:
        return src.read(1)


def test_a_bundle_moved_elsewhere_predicts_as_its_members_did(
    checkpoints: tuple[Path, Path], tmp_path: Path
) -> None:
    model = _ensemble(*checkpoints)
    scene = write_geotiff(
        tmp_path / "scene.tif", np.random.default_rng(0).integers(0, 255, (3, 48, 40), dtype=np.uint8)
    )
    predict_bundle(model, [("scene", scene)], tmp_path / "from_checkpoints")

    folder = write_bundle(model, tmp_path / "bundle")
    assert is_bundle(folder) and not is_bundle(tmp_path)
    moved = tmp_path / "elsewhere"
    shutil.move(folder, moved)  # bundle.json holds relative paths: the folder travels whole
    loaded = read_bundle(moved)
    assert [Path(m.checkpoint).parent for m in loaded.members] == [moved / "members"] * 2
    assert loaded.class_bias == BIAS and loaded.predict.tta == model.predict.tta
    predict_bundle(loaded, [("scene", scene)], tmp_path / "from_bundle")
    np.testing.assert_array_equal(
        _classes(tmp_path / "from_bundle", "scene"), _classes(tmp_path / "from_checkpoints", "scene")
    )


def test_a_bundle_links_its_members_and_keeps_them_when_a_stage_saves_again(
    checkpoints: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = checkpoints
    best = tmp_path / "best.pt"
    shutil.copyfile(a, best)
    member = write_bundle(_ensemble(best, b), tmp_path / "bundle") / "members" / "a.pt"
    assert member.stat().st_ino == best.stat().st_ino  # one file on disk, not a second copy
    link_or_copy(b, best)  # a later save replaces best.pt's directory entry, as every save does
    assert file_sha256(member) == file_sha256(a) != file_sha256(best)


def test_same_predictions_compares_weights_files_by_content_and_every_setting(
    checkpoints: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = checkpoints
    model = _ensemble(a, b)
    copy = read_bundle(write_bundle(model, tmp_path / "bundle"))  # same files, other paths
    assert same_predictions(model, copy)
    assert not same_predictions(model, _ensemble(b, a))  # members compared in order, by their bytes
    assert not same_predictions(model, _ensemble(a, b, class_bias=[0.0] * 6))
    other_views = PredictSettings.parse({**VIEWS, "tta": {"scales": [1.0], "flips": ["none"]}})
    assert not same_predictions(model, _ensemble(a, b, predict=other_views))
    weighted = _ensemble(a, b)
    weighted.members[1] = weighted.members[1].model_copy(update={"weight": 0.5})
    assert not same_predictions(model, weighted)


def test_a_folder_without_bundle_json_is_named_in_the_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no bundle.json"):
        read_bundle(tmp_path)
