"""Bad config values and unreachable services fail early, naming the field and what to do."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from seg_pipeline.data.synthetic import TARGET_CLASSES
from seg_pipeline.defs.assets.ingest import tile_headers
from seg_pipeline.defs.resources import StorageResource
from seg_pipeline.inference.tiling import window_grid
from seg_pipeline.models import ModelSpec
from seg_pipeline.tracking import TrackingSettings, TrackingUnavailableError
from seg_pipeline.training.loop import TrainConfig
from seg_pipeline.training.stages import KDSettings, SourceSpec, StageConfig, run_stage


def _config(**changes) -> StageConfig:
    config = StageConfig(
        model=ModelSpec("unet", "resnet18", 3, len(TARGET_CLASSES)), train=TrainConfig(epochs=1)
    )
    for key, value in changes.items():
        setattr(config, key, value)
    return config


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lr": -1e-3}, r"lr=-0.001: the learning rate must be > 0"),
        ({"weight_decay": -0.1}, r"weight_decay=-0.1: must be >= 0"),
        ({"kd": KDSettings(alpha=1.5)}, r"kd.alpha=1.5: must be within \[0, 1\]"),
        ({"kd": KDSettings(temperature=0)}, r"kd.temperature=0: must be > 0"),
        ({"train": TrainConfig(epochs=0)}, r"TrainConfig.epochs=0 is invalid"),
    ],
)
def test_impossible_training_values_are_refused_with_the_field_name(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _config(**changes).validate()


def test_overlap_not_smaller_than_window_is_refused() -> None:
    with pytest.raises(ValueError, match="overlap"):
        window_grid(100, 100, window=64, overlap=64)


def test_unreachable_tracking_server_fails_before_any_training(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    target = SourceSpec("demo", tmp_path / "missing", tmp_path / "missing.parquet", TARGET_CLASSES)
    settings = TrackingSettings(tracking_uri=f"http://127.0.0.1:{port}")
    with pytest.raises(TrackingUnavailableError, match=f"127.0.0.1:{port}"):
        run_stage("pretrain", _config(), [target], target, tmp_path / "ckpt", tracking=settings)
    assert not (tmp_path / "ckpt").exists()


def test_unknown_config_key_is_rejected_by_dagster_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(dg.DagsterInvalidConfigError, match="learning_rate"):
        dg.materialize(
            [tile_headers],
            resources={"storage": StorageResource(data_root=str(tmp_path))},
            run_config=dg.RunConfig(ops={"tile_headers": {"config": {"learning_rate": 0.1}}}),
        )
